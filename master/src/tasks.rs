//! The service layer: task intake and every operation the routes offer — turning a
//! `POST /task` body into a stored task, reading, waiting for, cancelling and redriving
//! tasks, recording worker reports, and the operators' views of workers and queues. It
//! answers in [`ServiceError`], never in HTTP terms; `routes/` does the mapping.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::registry::MalformedRecord;
use common::wire::{
    Capability, MAX_JSON_DEPTH, ResultReport, SignalRequest, SignalResponse, SignalStatus,
    StepProgress, SubmitTask, TaskEvent, TaskId, TaskResult, TaskStatus, TaskView, WorkerRecord,
    json_depth, now_ms,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::Caller;
use crate::config::{Config, PipelineConfig};
use crate::dispatch::{Dispatcher, WorkerSource};
use crate::error::ServiceError;
use crate::graph::{self, GraphError};
use crate::hub::Hub;
use crate::metrics::publish_queue_gauges;
use crate::store::{
    CancelOutcome, MAX_PRIORITY, NewTask, PlannedStep, ProgressOutcome, RateLimit, RedriveOutcome,
    ReportOutcome, SignalOutcome, StoreError, SubmitOutcome, TaskRecord, TaskStore,
    events::EventCursor,
    search::{DeadLetterCursor, DeadLetterPage, TaskPage, TaskQuery},
};

/// Longest `?wait=` on `GET /result/{id}`, in seconds.
pub(crate) const MAX_WAIT_SECS: u64 = 60;
/// Longest idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Dead letters redriven by one `POST /dispatch` with a capability and no `limit`.
const REDRIVE_LIMIT: usize = 1000;
/// Most dead letters one `POST /dispatch` redrives, whatever its `limit`: the request
/// must end within a client's timeout.
const MAX_REDRIVE_LIMIT: usize = 100_000;

/// The answer to `POST /task`.
pub(crate) struct Submitted {
    /// The task (new, or the one the idempotency key names).
    pub(crate) task_id: TaskId,
    /// Whether the task is new (not an idempotent repeat of an earlier submission).
    pub(crate) created: bool,
    /// The task's status now.
    pub(crate) task_status: TaskStatus,
}

/// A submission checked and planned, ready for the store.
struct Prepared {
    /// What the store keeps.
    task: NewTask,
    /// What its acceptance wakes.
    wake: Wake,
    /// The submit's span (none unless traces are exported).
    span: tracing::Span,
}

/// What an accepted task wakes: its dispatch loops, and the queues its first steps join.
struct Wake {
    id: TaskId,
    /// Every capability it uses.
    every: Vec<Capability>,
    /// The capabilities of the steps queued at once.
    roots: Vec<Capability>,
}

/// What `GET /workers` shows.
#[derive(Debug, Serialize)]
pub(crate) struct WorkerList {
    /// Every live worker that parses, with its load.
    workers: Vec<WorkerLoad>,
    /// Worker ids per capability: which capabilities have no one to serve them.
    by_capability: BTreeMap<String, Vec<String>>,
    /// Live records that do not parse; such a worker gets no work, and an operator should
    /// know why.
    malformed: Vec<MalformedRecord>,
}

/// A live worker with its load.
#[derive(Debug, Serialize)]
struct WorkerLoad {
    #[serde(flatten)]
    record: WorkerRecord,
    /// Steps leased to it, by the store's count: its record's `in_flight` is what it last
    /// reported, this is what the master thinks it holds.
    leased: u32,
}

/// One capability's row of `GET /queues`: the figures published as gauges (see
/// [`crate::metrics::QueueRow`], whose fields the undocumented ones here are), with the
/// ready and the delayed steps apart, where the gauge adds them up.
#[derive(Debug, Serialize)]
pub(crate) struct QueueView {
    capability: Capability,
    /// Ready to be claimed now.
    queued: u64,
    /// Waiting out a retry backoff: queued soon, but not claimable now.
    delayed: u64,
    in_flight: u64,
    dead_lettered: u64,
    live_workers: u64,
    backlog_per_worker: f64,
    oldest_queued_age_seconds: f64,
}

/// The service layer: every task operation the routes offer, without HTTP. It holds what
/// those operations need and nothing of the web side (credentials, connection caps), so it
/// can be built and tested on its own, against any [`TaskStore`].
pub(crate) struct Tasks {
    /// Settings read per request (rate limit, retention, step defaults, callbacks).
    config: Arc<Config>,
    /// Every task transition goes through it.
    store: Arc<dyn TaskStore>,
    /// Shown to operators on `GET /workers` and `GET /queues`.
    workers: Arc<dyn WorkerSource>,
    /// A new or redriven step needs its capability's dispatch loop, and a report frees a
    /// worker slot it counts.
    dispatcher: Arc<Dispatcher>,
    /// Wakes dispatchers when work is queued, and long polls when a task finishes.
    hub: Arc<Hub>,
    /// Built once from the settings: every submission names one (or `default`).
    pipelines: BTreeMap<String, PipelineConfig>,
    /// Long polls answer early at shutdown, so they do not hold the drain up.
    shutdown: CancellationToken,
    /// The capabilities the live workers served at the last registry read made for a
    /// submission naming one the dispatcher did not know, and when. Submissions in the
    /// next [`REGISTRY_READ_EVERY`] share that read, so a client repeating bad submissions
    /// cannot make every one of them read the whole registry.
    served: tokio::sync::Mutex<Option<(std::time::Instant, HashSet<Capability>)>>,
}

/// Most one registry read per this long for submissions naming unknown capabilities (the
/// dispatcher's own view refreshes at about the same pace).
const REGISTRY_READ_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

impl Tasks {
    /// The service over these parts; `dispatcher` need not be started.
    pub(crate) fn new(
        config: Arc<Config>,
        store: Arc<dyn TaskStore>,
        workers: Arc<dyn WorkerSource>,
        dispatcher: Arc<Dispatcher>,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            pipelines: config.all_pipelines(),
            config,
            store,
            workers,
            dispatcher,
            hub,
            shutdown,
            served: tokio::sync::Mutex::new(None),
        }
    }

    /// Validates and stores a new task, and wakes the dispatchers of the steps that start
    /// at once (those that need nothing).
    pub(crate) async fn submit(
        &self,
        client: &str,
        body: SubmitTask,
        header_key: Option<String>,
        request_id: String,
    ) -> Result<Submitted, ServiceError> {
        let Prepared { task, wake, span } =
            self.prepare(client, body, header_key, request_id).await?;
        let outcome = self
            .store
            .submit(task, self.rate_limit(), self.config.retention())
            .instrument(span)
            .await;
        self.settle(client, wake, outcome.map_err(ServiceError::from))
            .await
    }

    /// The rate limit every task counts against.
    fn rate_limit(&self) -> RateLimit {
        RateLimit {
            per_sec: self.config.rate_limit_per_sec,
            burst: self.config.rate_limit_burst,
        }
    }

    /// Checks a submission and plans it into the task to store: everything of a submit
    /// but the store's call.
    async fn prepare(
        &self,
        client: &str,
        mut body: SubmitTask,
        header_key: Option<String>,
        request_id: String,
    ) -> Result<Prepared, ServiceError> {
        let key = match (header_key, body.idempotency_key.take()) {
            (Some(h), Some(b)) if h != b => {
                return Err(ServiceError::Invalid(
                    "`idempotency_key` and the `Idempotency-Key` header differ".into(),
                ));
            }
            (h, b) => h.or(b),
        };
        if let Some(k) = &key
            && (k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY)
        {
            return Err(ServiceError::Invalid(format!(
                "`idempotency_key` must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
            )));
        }
        // A range check, not `abs()`: `i32::MIN.abs()` overflows.
        if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&body.priority) {
            return Err(ServiceError::Invalid(format!(
                "`priority` must be between -{MAX_PRIORITY} and {MAX_PRIORITY}"
            )));
        }
        if let Some(url) = &body.callback_url {
            crate::callbacks::check_url(url, self.config.callback_allow_private)
                .map_err(|why| ServiceError::Invalid(format!("`callback_url` {why}")))?;
            if self.config.callback_secret.is_empty() {
                return Err(ServiceError::Invalid(
                "`callback_url`: callbacks need CALLBACK_SECRET, which this master does not have \
                 (callbacks are always signed)"
                    .into(),
            ));
            }
        }
        if let Some(budget) = &body.budget {
            check_budget(budget, self.store.keeps_ledger())?;
        }
        if json_depth(&body.input) > MAX_JSON_DEPTH {
            return Err(ServiceError::Invalid(format!(
                "`input` nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
            )));
        }
        let (pipeline, steps) = self.plan(&body)?;
        if pipeline.is_none() {
            self.check_capabilities(&steps).await?;
        }
        let input = serde_json::to_string(&body.input)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let id = TaskId::generate();
        let (every, roots) = capabilities_to_wake(&steps);
        // The submit's span: the parent, across the queue, of every step attempt's span.
        let span = if common::traces::enabled() {
            tracing::info_span!("task.submit", task_id = %id, steps = steps.len())
        } else {
            tracing::Span::none()
        };
        let traceparent = common::traces::traceparent(&span);
        let task = NewTask {
            id: id.clone(),
            client: client.to_string(),
            pipeline,
            steps,
            input,
            priority: body.priority,
            idempotency_key: key,
            callback_url: body.callback_url,
            request_id,
            budget: body.budget,
            traceparent,
        };
        Ok(Prepared {
            task,
            wake: Wake { id, every, roots },
            span,
        })
    }

    /// What the store's answer to a prepared submission means for the client.
    async fn settle(
        &self,
        client: &str,
        wake: Wake,
        outcome: Result<SubmitOutcome, ServiceError>,
    ) -> Result<Submitted, ServiceError> {
        let Wake { id, every, roots } = wake;
        match outcome? {
            SubmitOutcome::Created => {
                crate::metrics::task_submitted();
                for capability in &every {
                    self.dispatcher.ensure_loop(capability);
                }
                for capability in &roots {
                    self.hub.work_queued(capability.as_str());
                }
                tracing::info!(task_id = %id, client, "task accepted");
                Ok(Submitted {
                    task_id: id,
                    created: true,
                    task_status: TaskStatus::Queued,
                })
            }
            SubmitOutcome::Existing(existing) => {
                let status = self
                    .store
                    .get(&existing)
                    .await?
                    .map_or(TaskStatus::Queued, |r| r.view.status);
                Ok(Submitted {
                    task_id: existing,
                    created: false,
                    task_status: status,
                })
            }
            SubmitOutcome::RateLimited(retry_after) => {
                Err(ServiceError::RateLimited { retry_after })
            }
        }
    }

    /// Submits a batch (`POST /tasks`): each element as [`Self::submit`] would, in order,
    /// each with its own idempotency key, rate-limit token, checks and events. An element
    /// that could not be read arrives as its error and is answered with it; one element's
    /// refusal does not hold the others back. The elements are checked one by one, then
    /// stored with one store call ([`TaskStore::submit_many`]: one round trip to Redis,
    /// each task's script atomic on its own).
    ///
    /// A store failure (`Unavailable`, `StorageFull`) is the whole batch's answer when no
    /// element of it was accepted: nothing was stored, so the client can send the same
    /// batch again. When one was, the failure is the answer of each element it refused:
    /// answering the whole batch with an error then would hide tasks that do exist. (An
    /// idempotent repeat stores nothing, so it does not count as accepted.) The store
    /// unreachable for the call itself is the whole answer, as for a single submit.
    pub(crate) async fn submit_many<E: From<ServiceError>>(
        &self,
        client: &str,
        items: Vec<Result<SubmitTask, E>>,
        request_id: &str,
    ) -> Result<Vec<Result<Submitted, E>>, ServiceError> {
        let mut failure = None;
        let mut noted = |e: ServiceError| {
            if failure.is_none() {
                failure = match e {
                    ServiceError::Unavailable => Some(ServiceError::Unavailable),
                    ServiceError::StorageFull => Some(ServiceError::StorageFull),
                    _ => None,
                };
            }
            E::from(e)
        };
        let mut checked: Vec<Result<Wake, E>> = Vec::with_capacity(items.len());
        let mut tasks = Vec::new();
        for item in items {
            match item {
                Err(e) => checked.push(Err(e)),
                Ok(body) => match self
                    .prepare(client, body, None, request_id.to_string())
                    .await
                {
                    Ok(Prepared { task, wake, .. }) => {
                        tasks.push(task);
                        checked.push(Ok(wake));
                    }
                    Err(e) => checked.push(Err(noted(e))),
                },
            }
        }
        let mut outcomes = self
            .store
            .submit_many(tasks, self.rate_limit(), self.config.retention())
            .await?
            .into_iter();
        let mut answers = Vec::with_capacity(checked.len());
        let mut accepted = false;
        for slot in checked {
            let answer = match slot {
                Err(e) => Err(e),
                Ok(wake) => {
                    let outcome = outcomes.next().unwrap_or_else(|| {
                        Err(StoreError::Corrupt("the store answered fewer tasks".into()))
                    });
                    match self
                        .settle(client, wake, outcome.map_err(ServiceError::from))
                        .await
                    {
                        Ok(done) => {
                            accepted |= done.created;
                            Ok(done)
                        }
                        Err(e) => Err(noted(e)),
                    }
                }
            };
            answers.push(answer);
        }
        match failure {
            Some(e) if !accepted => Err(e),
            _ => Ok(answers),
        }
    }

    /// `BODY_LIMIT_BYTES`: the routes bound a batch submit's body by a multiple of it, and
    /// each of its tasks by it, as `POST /task` is.
    pub(crate) fn body_limit(&self) -> usize {
        self.config.body_limit_bytes
    }

    /// The pipeline name and steps of a submission, planned into a checked graph.
    fn plan(&self, body: &SubmitTask) -> Result<(Option<String>, Vec<PlannedStep>), ServiceError> {
        let defaults = graph::StepDefaults::from(self.config.as_ref());
        match (&body.pipeline, &body.steps) {
            (Some(_), Some(_)) => Err(ServiceError::Invalid(
                "give either `pipeline` or `steps`, not both".into(),
            )),
            (None, Some(steps)) => {
                let planned = graph::plan_steps(steps, defaults).map_err(|e| invalid_steps(&e))?;
                Ok((None, planned))
            }
            (name, None) => {
                // Neither given: the `default` pipeline, like a queue's default task.
                let name = name.clone().unwrap_or_else(|| "default".to_string());
                let pipeline = self.pipelines.get(&name).ok_or_else(|| {
                    ServiceError::Invalid(format!("`pipeline`: unknown pipeline `{name}`"))
                })?;
                // Checked at start (`Config::validate`); a failure here means a pipeline
                // that skipped that check, and the caller is told which.
                let planned = graph::plan_steps(&pipeline.steps, defaults).map_err(|e| {
                    ServiceError::Invalid(format!("`pipeline` `{name}` cannot run: {e}"))
                })?;
                Ok((Some(name), planned))
            }
        }
    }

    /// Every worker step of inline `steps` needs a capability the master knows: one a
    /// pipeline uses, one seen before, or one a live worker serves. The dispatcher's view
    /// of the live workers is refreshed now and then; a capability it does not know is
    /// looked up in the registry itself before it is refused, so a worker that has just
    /// registered can be used at once.
    async fn check_capabilities(&self, steps: &[PlannedStep]) -> Result<(), ServiceError> {
        let unknown: Vec<&Capability> = steps
            .iter()
            .filter_map(PlannedStep::capability)
            .filter(|c| !self.dispatcher.knows(c))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let mut last = self.served.lock().await;
        let fresh = last
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < REGISTRY_READ_EVERY);
        if !fresh {
            let live = self.workers.live().await?;
            let caps = live.into_iter().flat_map(|w| w.capabilities).collect();
            *last = Some((std::time::Instant::now(), caps));
        }
        let served = |c: &Capability| last.as_ref().is_some_and(|(_, caps)| caps.contains(c));
        match unknown.into_iter().find(|c| !served(c)) {
            Some(c) => Err(ServiceError::Invalid(format!(
                "`steps`: unknown capability `{c}` (no pipeline uses it and no live worker serves it)"
            ))),
            None => Ok(()),
        }
    }

    /// `GET /task/{id}`: a task the caller may see (its client's, or any for an operator),
    /// with its model usage from the llm-gateway's ledger per step and in total.
    pub(crate) async fn view(&self, caller: &Caller, id: &str) -> Result<TaskView, ServiceError> {
        let mut view = self.visible(caller, id).await?.view;
        if self.store.keeps_ledger() {
            let usage = self.store.usage(&view.task_id).await?;
            attach_usage(&mut view, usage);
        }
        Ok(view)
    }

    /// A task the client owns (another client's task is `404`, as if it did not exist).
    pub(crate) async fn owned(&self, client: &str, id: &str) -> Result<TaskRecord, ServiceError> {
        self.visible(&Caller::Client(client.to_string()), id).await
    }

    /// Events of a task the caller may see, after `after` (docs/events.md).
    pub(crate) async fn events(
        &self,
        caller: &Caller,
        id: &str,
        after: Option<&EventCursor>,
        limit: usize,
    ) -> Result<(TaskId, Vec<TaskEvent>), ServiceError> {
        let record = self.visible(caller, id).await?;
        let id = record.view.task_id;
        let events = self.store.events(&id, after, limit).await?;
        Ok((id, events))
    }

    /// Events of a task, with no owner check: a stream already opened by [`Self::events`]
    /// goes on with it.
    pub(crate) async fn more_events(
        &self,
        id: &TaskId,
        after: Option<&EventCursor>,
        limit: usize,
    ) -> Result<Vec<TaskEvent>, ServiceError> {
        Ok(self.store.events(id, after, limit).await?)
    }

    /// Every task's events but partial output, for operators.
    pub(crate) async fn all_events(
        &self,
        after: Option<&EventCursor>,
        limit: usize,
    ) -> Result<Vec<TaskEvent>, ServiceError> {
        Ok(self.store.all_events(after, limit).await?)
    }

    /// Where an operators' stream that starts now begins.
    pub(crate) async fn latest_event(&self) -> Result<Option<EventCursor>, ServiceError> {
        Ok(self.store.latest_event().await?)
    }

    /// Waits until the stream may have more after `after`, `timeout` at most, or shutdown.
    pub(crate) async fn wait_events(
        &self,
        id: Option<&TaskId>,
        after: Option<&EventCursor>,
        timeout: std::time::Duration,
    ) {
        tokio::select! {
            () = self.store.wait_events(id, after, timeout) => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    /// Whether the master is shutting down (event streams end, so the drain is not held).
    pub(crate) fn stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Records a worker's partial output (`POST /progress`).
    pub(crate) async fn progress(
        &self,
        progress: &StepProgress,
    ) -> Result<ProgressOutcome, ServiceError> {
        if progress.messages.is_empty() {
            return Err(ServiceError::Invalid(
                "`messages` must hold at least one message".into(),
            ));
        }
        if progress
            .messages
            .iter()
            .any(|m| json_depth(m) > MAX_JSON_DEPTH)
        {
            return Err(ServiceError::Invalid(format!(
                "a progress message nests deeper than {MAX_JSON_DEPTH} levels"
            )));
        }
        Ok(self.store.progress(progress).await?)
    }

    /// A task the caller may see: its client's, or any for an operator.
    async fn visible(&self, caller: &Caller, id: &str) -> Result<TaskRecord, ServiceError> {
        let not_found = || ServiceError::NotFound(id.to_string());
        let id = TaskId::new(id).map_err(|_| not_found())?;
        let record = self.store.get(&id).await?.ok_or_else(not_found)?;
        match caller {
            // With auth off every caller is `anonymous`: it sees every task, those submitted
            // while auth was on included.
            Caller::Client(client) if record.client != *client && !self.config.auth_disabled => {
                Err(not_found())
            }
            _ => Ok(record),
        }
    }

    /// The result of a task, waiting up to `wait` for it to finish.
    pub(crate) async fn result(
        &self,
        client: &str,
        id: &str,
        wait: Duration,
    ) -> Result<TaskResult, ServiceError> {
        if wait.is_zero() {
            return Ok(task_result(self.owned(client, id).await?.view));
        }
        let deadline = tokio::time::Instant::now() + wait;
        // Released when this future ends or is dropped (the client went away).
        let waiter = self.hub.task_waiter(id);
        self.wait_for_end(client, id, &waiter, deadline).await
    }

    /// Reads the task until it has finished or the deadline passed. The wake-up is registered
    /// before each read, so a task finishing in between is never missed; a result this replica
    /// recorded is taken from the waiter instead of being read back — but only once a read
    /// has shown that `client` owns the task: the waiter is shared by everyone polling this
    /// id, and what it holds must reach the owner alone (ids are never reused, so one check
    /// holds for the whole poll).
    async fn wait_for_end(
        &self,
        client: &str,
        id: &str,
        waiter: &crate::hub::TaskWaiter,
        deadline: tokio::time::Instant,
    ) -> Result<TaskResult, ServiceError> {
        let mut owner_checked = false;
        loop {
            let notified = waiter.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if owner_checked && let Some(done) = waiter.outcome() {
                return Ok(done);
            }
            let record = self.owned(client, id).await?;
            owner_checked = true;
            let last_round =
                tokio::time::Instant::now() >= deadline || self.shutdown.is_cancelled();
            if record.view.status.is_terminal() || last_round {
                return Ok(task_result(record.view));
            }
            // Re-read at least every second in case a pub/sub message was missed.
            let next = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(next) => {}
                // Shutting down: answer now (202) rather than hold the drain up.
                () = self.shutdown.cancelled() => {}
            }
        }
    }

    /// Cancels a task: the client's own, or any task for an operator.
    pub(crate) async fn cancel(&self, caller: &Caller, id: &str) -> Result<TaskView, ServiceError> {
        let record = self.visible(caller, id).await?;
        let task_id = record.view.task_id.clone();
        match self.store.cancel(&task_id, self.config.retention()).await? {
            CancelOutcome::Cancelled => {
                crate::metrics::task_finished(TaskStatus::Cancelled);
                self.hub.task_finished(id);
                tracing::info!(task_id = %task_id, "task cancelled");
            }
            CancelOutcome::AlreadyFinished(status) => {
                return Err(ServiceError::Conflict(format!(
                    "task already finished ({})",
                    status.as_str()
                )));
            }
            CancelOutcome::NotFound => return Err(ServiceError::NotFound(id.to_string())),
        }
        Ok(self.visible(caller, id).await?.view)
    }

    /// Delivers a signal to a task's wait step: by the task's client, or by an operator
    /// (any task). Another client's task is `NotFound`, as everywhere.
    pub(crate) async fn signal(
        &self,
        caller: &Caller,
        id: &str,
        request: SignalRequest,
    ) -> Result<SignalResponse, ServiceError> {
        if !graph::valid_name(&request.name) {
            return Err(ServiceError::Invalid(format!(
                "`name` must be 1 to {} characters of `a-z`, `0-9`, `_` and `-`",
                graph::MAX_ID_LEN
            )));
        }
        if json_depth(&request.payload) > MAX_JSON_DEPTH {
            // It becomes the wait step's output, and so a later step's input.
            return Err(ServiceError::Invalid(format!(
                "`payload` nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
            )));
        }
        let record = self.visible(caller, id).await?;
        let task_id = record.view.task_id;
        let payload = serde_json::to_string(&request.payload)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let name = &request.name;
        let outcome = self
            .store
            .signal(&task_id, name, &payload, self.config.retention())
            .await?;
        let status = match outcome {
            SignalOutcome::Delivered(advance) => {
                self.dispatcher.after_advance(&task_id, &advance);
                SignalStatus::Delivered
            }
            SignalOutcome::Buffered => SignalStatus::Buffered,
            SignalOutcome::UnknownSignal => {
                return Err(ServiceError::Invalid(format!(
                    "`name`: no wait step of task `{task_id}` listens for signal `{name}`"
                )));
            }
            SignalOutcome::AlreadyReceived => {
                return Err(ServiceError::Conflict(format!(
                    "the wait step for signal `{name}` is no longer waiting for it (it already \
                     received it, timed out or was skipped)"
                )));
            }
            SignalOutcome::Finished(status) => {
                return Err(ServiceError::Conflict(format!(
                    "task already finished ({})",
                    status.as_str()
                )));
            }
            SignalOutcome::NotFound => return Err(ServiceError::NotFound(id.to_string())),
        };
        tracing::info!(task_id = %task_id, signal = %name, status = ?status, "signal received");
        Ok(SignalResponse { status })
    }

    /// Records a worker's report.
    pub(crate) async fn record_report(&self, report: ResultReport) -> Result<bool, ServiceError> {
        check_report(&report)?;
        let outcome = self
            .store
            .report(
                &report,
                self.dispatcher.retry_policy(),
                rand::random(),
                self.config.retention(),
            )
            .await?;
        Ok(self.after_recorded(&report, &outcome))
    }

    /// Records a batch of reports (`POST /results`) with one store call, each as
    /// [`Self::record_report`] would. Each entry is a report, or why it could not be read;
    /// each answer is whether it was recorded, or why it was refused. A store failure is
    /// the whole batch's: none is known to be settled, and the worker delivers them again.
    pub(crate) async fn record_reports(
        &self,
        reports: Vec<Result<ResultReport, ServiceError>>,
    ) -> Result<Vec<Result<bool, ServiceError>>, ServiceError> {
        let mut answers: Vec<Option<Result<bool, ServiceError>>> = Vec::new();
        let mut valid = Vec::new();
        for report in reports {
            match report.and_then(|r| check_report(&r).map(|()| r)) {
                Ok(report) => {
                    answers.push(None);
                    valid.push(report);
                }
                Err(e) => answers.push(Some(Err(e))),
            }
        }
        let outcomes = if valid.is_empty() {
            Vec::new()
        } else {
            self.store
                .report_many(
                    &valid,
                    self.dispatcher.retry_policy(),
                    self.config.retention(),
                )
                .await?
        };
        let mut recorded = valid
            .iter()
            .zip(&outcomes)
            .map(|(report, outcome)| self.after_recorded(report, outcome));
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Ok(recorded.next().unwrap_or(false))))
            .collect())
    }

    /// Frees the worker's slot, wakes the dispatchers and logs, after a report's outcome
    /// was stored. Returns whether it was recorded (not discarded).
    fn after_recorded(&self, report: &ResultReport, outcome: &ReportOutcome) -> bool {
        let recorded = *outcome != ReportOutcome::Discarded;
        if matches!(
            outcome,
            ReportOutcome::Next { .. } | ReportOutcome::Retry { .. } | ReportOutcome::Done { .. }
        ) {
            self.dispatcher.step_done(&report.worker_id);
        }
        self.dispatcher.after_report(report, outcome);
        match outcome {
            ReportOutcome::Discarded => {
                tracing::info!(task_id = %report.task_id, step = report.step,
            attempt = report.attempt, worker = %report.worker_id,
            "report discarded (attempt not current, or the worker does not hold the lease)")
            }
            ReportOutcome::Replayed(_) => tracing::info!(task_id = %report.task_id,
            step = report.step, attempt = report.attempt,
            "report repeated after its first answer was lost; answered as recorded again"),
            ReportOutcome::Retry { delay, .. } => tracing::info!(task_id = %report.task_id,
            step = report.step, delay_ms = delay.as_millis() as u64, "step will be retried"),
            // A callback was put in the outbox by the same store step (see callbacks.rs).
            ReportOutcome::Done { status, .. } => {
                tracing::info!(task_id = %report.task_id, status = status.as_str(), "task finished");
            }
            ReportOutcome::Next { .. } => {}
        }
        recorded
    }

    /// Redrives one failed task (`POST /dispatch` with `task_id`).
    pub(crate) async fn redrive_task(&self, id: &str) -> Result<TaskId, ServiceError> {
        let task_id =
            TaskId::new(id).map_err(|e| ServiceError::Invalid(format!("`task_id`: {e}")))?;
        self.redrive(&task_id).await?;
        Ok(task_id)
    }

    /// Redrives up to `limit` (default [`REDRIVE_LIMIT`]) of a capability's dead letters. A
    /// task that changed meanwhile (redriven by someone else, expired) is skipped. A store
    /// failure stops the loop and is the answer, not a shorter list: the tasks redriven before
    /// it have left the dead letters, so the same request, repeated, redrives the rest.
    pub(crate) async fn redrive_dead_letters(
        &self,
        capability: &Capability,
        limit: Option<usize>,
    ) -> Result<Vec<TaskId>, ServiceError> {
        let limit = limit.unwrap_or(REDRIVE_LIMIT).clamp(1, MAX_REDRIVE_LIMIT);
        let mut redriven = Vec::new();
        for id in self.store.dead_letters(capability, limit).await? {
            match self.redrive(&id).await {
                Ok(()) => redriven.push(id),
                Err(ServiceError::NotFound(_) | ServiceError::Conflict(_)) => {}
                Err(e) => {
                    tracing::warn!(capability = %capability, redriven = redriven.len(),
                    "redriving dead letters stopped part-way by a store error");
                    return Err(e);
                }
            }
        }
        Ok(redriven)
    }

    /// Runs a failed task's failed and stopped steps again and wakes the dispatchers of
    /// those it queued.
    async fn redrive(&self, id: &TaskId) -> Result<(), ServiceError> {
        match self.store.redrive(id, self.config.retention()).await? {
            RedriveOutcome::Redriven(queued) => {
                for capability in &queued {
                    self.dispatcher.ensure_loop(capability);
                    self.hub.work_queued(capability.as_str());
                }
                tracing::info!(task_id = %id, capabilities = ?queued, "task redriven");
                Ok(())
            }
            RedriveOutcome::NotFailed(status) => Err(ServiceError::Conflict(format!(
                "task `{id}` is {}, not failed",
                status.as_str()
            ))),
            RedriveOutcome::Purged => Err(ServiceError::Conflict(format!(
                "task `{id}` was purged from the dead letters; it stays failed and is not redriven"
            ))),
            RedriveOutcome::NotFound => Err(ServiceError::NotFound(id.to_string())),
        }
    }

    /// One page of the task search (`GET /tasks`).
    pub(crate) async fn search(&self, query: &TaskQuery) -> Result<TaskPage, ServiceError> {
        Ok(self.store.search_tasks(query).await?)
    }

    /// One page of dead letters (`GET /deadletters`): of one capability, or of every
    /// capability this master knows (its pipelines', its workers', and those inline steps
    /// named).
    pub(crate) async fn dead_letters(
        &self,
        capability: Option<Capability>,
        after: Option<&DeadLetterCursor>,
        limit: usize,
    ) -> Result<DeadLetterPage, ServiceError> {
        let capabilities = match capability {
            Some(c) => vec![c],
            None => {
                let mut all = self.dispatcher.capabilities();
                all.extend(self.store.capabilities().await?);
                all
            }
        };
        Ok(self
            .store
            .dead_letter_page(&capabilities, after, limit)
            .await?)
    }

    /// Purges a capability's dead letters, or one task of them (`DELETE
    /// /deadletters/{capability}`): they stay failed, and are no longer redriven.
    pub(crate) async fn purge_dead_letters(
        &self,
        capability: &Capability,
        task: Option<&TaskId>,
    ) -> Result<u64, ServiceError> {
        let purged = self.store.purge_dead_letters(capability, task).await?;
        tracing::info!(capability = %capability, task_id = ?task, purged, "dead letters purged");
        Ok(purged)
    }

    /// The live workers with their loads, for `GET /workers`.
    pub(crate) async fn workers(&self) -> Result<WorkerList, ServiceError> {
        let (records, malformed) = self.workers.scan().await?;
        let load = self.store.worker_loads().await?;
        let mut by_capability = BTreeMap::<String, Vec<String>>::new();
        for w in &records {
            for c in &w.capabilities {
                by_capability
                    .entry(c.to_string())
                    .or_default()
                    .push(w.id.to_string());
            }
        }
        let workers = records
            .into_iter()
            .map(|record| WorkerLoad {
                leased: load.get(record.id.as_str()).copied().unwrap_or(0),
                record,
            })
            .collect();
        Ok(WorkerList {
            workers,
            by_capability,
            malformed,
        })
    }

    /// Each capability's queue figures, for `GET /queues`; published as gauges on the way.
    pub(crate) async fn queues(&self) -> Result<Vec<QueueView>, ServiceError> {
        let capabilities = self.dispatcher.capabilities();
        let stats = self
            .store
            .stats(&capabilities, self.config.retention())
            .await?;
        let workers = self.workers.live().await?;
        let rows = publish_queue_gauges(&stats, &workers, now_ms());
        Ok(rows
            .into_iter()
            .zip(stats)
            .map(|(row, (_, stats))| QueueView {
                capability: row.capability,
                queued: stats.queued,
                delayed: stats.delayed,
                in_flight: row.in_flight,
                dead_lettered: row.dead_lettered,
                live_workers: row.live_workers,
                backlog_per_worker: row.backlog_per_worker,
                oldest_queued_age_seconds: row.oldest_queued_age_seconds,
            })
            .collect())
    }
}

/// What a new task's submission wakes: every capability of the graph gets a dispatch loop
/// (a step queued later, by a report, a signal or a timer, only wakes its loop, it does
/// not start one), and the capabilities of the steps that need nothing are queued by the
/// submission itself. Each sorted, once.
fn capabilities_to_wake(steps: &[PlannedStep]) -> (Vec<Capability>, Vec<Capability>) {
    let sorted = |caps: Vec<Capability>| {
        let mut caps = caps;
        caps.sort();
        caps.dedup();
        caps
    };
    let every = sorted(
        steps
            .iter()
            .filter_map(|s| s.capability().cloned())
            .collect(),
    );
    let roots = sorted(
        steps
            .iter()
            .filter(|s| s.needs.is_empty())
            .filter_map(|s| s.capability().cloned())
            .collect(),
    );
    (every, roots)
}

/// A graph the planner refused, as the `422` of `POST /task`.
/// The most tokens a budget may name (a trillion: far above any task, far below overflow).
const MAX_BUDGET_TOKENS: u64 = 1_000_000_000_000;
/// The most dollars a budget may name.
const MAX_BUDGET_USD: f64 = 1_000_000.0;

/// A budget names at least one limit, each positive and in range, and needs a store the
/// llm-gateway shares (otherwise nothing could enforce it).
fn check_budget(budget: &common::usage::Budget, keeps_ledger: bool) -> Result<(), ServiceError> {
    if budget.max_tokens.is_none() && budget.max_cost_usd.is_none() {
        return Err(ServiceError::Invalid(
            "`budget` needs `max_tokens`, `max_cost_usd` or both".into(),
        ));
    }
    if let Some(tokens) = budget.max_tokens
        && !(1..=MAX_BUDGET_TOKENS).contains(&tokens)
    {
        return Err(ServiceError::Invalid(format!(
            "`budget.max_tokens` must be between 1 and {MAX_BUDGET_TOKENS}"
        )));
    }
    if let Some(usd) = budget.max_cost_usd
        && !(usd.is_finite() && usd > 0.0 && usd <= MAX_BUDGET_USD)
    {
        return Err(ServiceError::Invalid(format!(
            "`budget.max_cost_usd` must be above 0 and at most {MAX_BUDGET_USD}"
        )));
    }
    if !keeps_ledger {
        return Err(ServiceError::Invalid(
            "`budget` needs the Redis store, shared with the llm-gateway (USE_REDIS), to be \
             enforced; this master runs on the in-memory store"
                .into(),
        ));
    }
    Ok(())
}

/// Puts the ledger's figures in the view: each step's under the step (by id, a chain's
/// steps by index), the totals with the budget in `usage`.
fn attach_usage(view: &mut TaskView, usage: common::usage::TaskUsage) {
    let common::usage::TaskUsage {
        total,
        mut steps,
        budget,
    } = usage;
    let mut attach = |step: &mut common::wire::StepView| {
        let by_id = (!step.id.is_empty())
            .then(|| steps.remove(&step.id))
            .flatten();
        step.usage = by_id.or_else(|| steps.remove(&step.index.to_string()));
    };
    for step in &mut view.steps {
        attach(step);
        for instance in &mut step.instances {
            attach(instance);
        }
    }
    if total.calls > 0 || budget.is_some() {
        let budget = budget.or_else(|| view.usage.take().and_then(|u| u.budget));
        view.usage = Some(common::usage::UsageSummary { total, budget });
    }
}

fn invalid_steps(e: &GraphError) -> ServiceError {
    ServiceError::Invalid(format!("`steps`: {e}"))
}

fn task_result(v: TaskView) -> TaskResult {
    TaskResult {
        task_id: v.task_id,
        status: v.status,
        result: v.result,
        error: v.error,
    }
}

/// Whether a report may be recorded: valid fields, and an output no deeper than a task
/// input may be (it becomes the next step's input).
fn check_report(report: &ResultReport) -> Result<(), ServiceError> {
    report.validate().map_err(ServiceError::Invalid)?;
    if report
        .output
        .as_ref()
        .is_some_and(|o| json_depth(o) > MAX_JSON_DEPTH)
    {
        return Err(ServiceError::Invalid(format!(
            "`output` nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;

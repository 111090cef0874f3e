//! The dispatcher: for each capability with queued steps, claims steps for live workers
//! with free slots and `POST`s them to `{worker}/work`; a reaper re-queues steps whose
//! lease lapsed and moves retries whose backoff is over; a metrics loop publishes queue
//! gauges (and CloudWatch EMF lines). Every replica runs all of it: the store's scripts
//! make the races harmless.

pub(crate) mod events;
pub(crate) mod select;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::registry::{MalformedRecord, Registry};
use common::wire::{
    Capability, ReportStatus, ResultReport, StepError, TaskId, WorkerId, WorkerRecord, now_ms,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::hub::Hub;
use crate::metrics;
use crate::store::{
    Advance, Claimed, ExpiredLease, MAX_FREE_DISPATCH_FAILURES, ReleaseOutcome, ReleaseReason,
    ReportOutcome, RetryPolicy, StoreError, TaskStore, lease_expired_error,
};

/// Where the dispatcher learns which workers are alive.
#[async_trait]
pub trait WorkerSource: Send + Sync + 'static {
    /// The live workers' records.
    async fn live(&self) -> Result<Vec<WorkerRecord>, StoreError>;

    /// The live workers' records and the live records that do not parse (shown to
    /// operators on `GET /workers`; such a worker gets no work).
    async fn scan(&self) -> Result<(Vec<WorkerRecord>, Vec<MalformedRecord>), StoreError> {
        Ok((self.live().await?, Vec::new()))
    }

    /// The live workers' records for a reader that asks 4 times a second (the dispatcher's
    /// view): as [`WorkerSource::live`], read as cheaply as the source can.
    async fn changed(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        self.live().await
    }
}

#[async_trait]
impl WorkerSource for Registry {
    async fn live(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        Ok(Registry::live(self).await?)
    }

    async fn scan(&self) -> Result<(Vec<WorkerRecord>, Vec<MalformedRecord>), StoreError> {
        let scan = Registry::scan(self).await?;
        Ok((scan.records, scan.malformed))
    }

    async fn changed(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        Ok(Registry::changed(self).await?.records)
    }
}

/// Most steps claimed in one round trip.
const BATCH: usize = 64;
/// How often the worker view is refreshed from the registry.
const REFRESH: Duration = Duration::from_millis(250);
/// How often leases and retry backoffs are checked.
const REAP: Duration = Duration::from_millis(250);

/// Most timers fired in one store call (the reaper calls again while it gets this many).
const TIMERS_PER_ROUND: usize = 100;

/// Task-index members the sweep looks at per metrics round (once a second by default):
/// enough to keep up with 1,000 tasks expiring a second, one bounded pass of reads each.
const INDEX_SWEEP_BUDGET: usize = 1_000;

/// What became of one `POST {worker}/work`.
enum Sent {
    /// The worker took the step.
    Taken,
    /// Full or draining: back to the queue for free; avoid the worker this long.
    Busy(Duration, String),
    /// The request failed (`5xx`, connection, timeout): back to the queue, free but for
    /// every few (see `MAX_FREE_DISPATCH_FAILURES`); avoid the worker this long.
    Failed(Duration, String),
    /// The worker will not take this step (`4xx` other than `429`), or no worker could:
    /// the attempt is spent with this error.
    Refused(StepError),
}

/// The span of one step attempt's dispatch, when traces are exported: a child of the
/// task's submit (whose `traceparent` the claim read back from the store), since the
/// dispatch happens later, on whichever replica claimed the step. Its own `traceparent`
/// goes to the worker with the step.
fn attempt_span(claimed: &Claimed) -> tracing::Span {
    if !common::traces::enabled() {
        return tracing::Span::none();
    }
    let work = &claimed.work;
    let span = tracing::info_span!(
        parent: None,
        "step.attempt",
        task_id = %work.task_id,
        step = work.step,
        attempt = work.attempt,
        capability = %work.capability,
        worker_id = %claimed.worker,
    );
    common::traces::adopt(&span, claimed.traceparent.as_deref());
    span
}

/// A step whose request would be over `WORK_BODY_LIMIT_BYTES`: no worker would take it, so
/// it fails now rather than being offered forever.
fn too_large(bytes: usize, limit: usize) -> Sent {
    Sent::Refused(StepError::permanent(
        "step_too_large",
        format!(
            "the step's request to a worker would be {bytes} bytes (task input plus the \
             previous step's output), over WORK_BODY_LIMIT_BYTES ({limit})"
        ),
    ))
}

/// The first part of a refusal's body (a worker's JSON error message, or its text).
async fn error_detail(response: reqwest::Response) -> String {
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(String::from))
        .unwrap_or(text);
    let message: String = message.chars().take(300).collect();
    if message.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", message.trim())
    }
}

/// Until when a lease that came due is extended, or `None` if it lapses. Only a heartbeat
/// that lists the step extends it, to that heartbeat's time plus the lease, so a worker
/// that died is noticed one lease after its last beat, however long its record lingers.
/// A degraded worker (it cannot deliver results) extends nothing, so its steps go to a
/// healthy one; and no lease outlives the step's own deadline plus one lease of grace.
fn lease_renewal(
    lease: &ExpiredLease,
    holder: &WorkerRecord,
    now: u64,
    lease_ms: u64,
) -> Option<u64> {
    if holder.degraded.is_some() || !holder.in_flight.contains(&lease.step) {
        return None;
    }
    // A record without a heartbeat time (an older or hand-written worker) counts as fresh.
    let beat = if holder.heartbeat_at_ms == 0 {
        now
    } else {
        holder.heartbeat_at_ms.min(now)
    };
    let deadline = lease.dispatched_at_ms + lease.timeout_ms + lease_ms;
    let until = (beat + lease_ms).min(deadline);
    (until > now).then_some(until)
}

/// What the dispatcher knows about workers, refreshed every [`REFRESH`].
#[derive(Default)]
struct View {
    /// The live workers: whom steps are assigned to, and the URLs they are sent to.
    workers: Vec<WorkerRecord>,
    /// Steps in flight per worker: the store's count, plus what this replica claimed since.
    load: HashMap<String, u32>,
    /// Configured, served by a live worker, or submitted before: each has a dispatch loop
    /// and is reaped, and a submission may name it in `steps`.
    capabilities: Vec<Capability>,
}

/// The dispatcher of one master replica.
pub(crate) struct Dispatcher {
    /// Lease, poll interval, dispatch timeout, retry backoff, the worker token.
    config: Arc<Config>,
    /// Steps are claimed, released, and failed there.
    store: Arc<dyn TaskStore>,
    /// Read every [`REFRESH`] into the view, not per dispatch.
    workers: Arc<dyn WorkerSource>,
    /// The loops sleep on it between polls; work queued anywhere wakes them early.
    hub: Arc<Hub>,
    /// For `POST {worker}/work`, with `DISPATCH_TIMEOUT_MS` as its timeout.
    http: reqwest::Client,
    /// Read by every dispatch round; written by the refresher and by claims.
    view: RwLock<View>,
    /// Workers not to use until the instant (they refused or failed a dispatch).
    skip: Mutex<HashMap<String, Instant>>,
    /// Capabilities that have a dispatch loop.
    loops: Mutex<HashSet<String>>,
    /// The pipelines' capabilities: they get loops at start, before any worker registers.
    configured: Vec<Capability>,
    /// In-flight dispatches finish at shutdown (bounded by the dispatch timeout).
    tracker: TaskTracker,
    /// Stops every loop.
    shutdown: CancellationToken,
    /// Whether the last store call failed (to log an outage once, not per call).
    store_down: std::sync::atomic::AtomicBool,
}

impl Dispatcher {
    /// A dispatcher; call [`Dispatcher::start`] to run it.
    pub(crate) fn new(
        config: Arc<Config>,
        store: Arc<dyn TaskStore>,
        workers: Arc<dyn WorkerSource>,
        hub: Arc<Hub>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let mut configured: Vec<Capability> = config
            .all_pipelines()
            .values()
            .flat_map(|p| p.capabilities().cloned())
            .collect();
        configured.sort();
        configured.dedup();
        Arc::new(Self {
            http: common::http::client(Duration::from_millis(config.dispatch_timeout_ms)),
            config,
            store,
            workers,
            hub,
            view: RwLock::new(View::default()),
            skip: Mutex::new(HashMap::new()),
            loops: Mutex::new(HashSet::new()),
            configured,
            tracker,
            shutdown,
            store_down: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Starts the refresher, the reaper, the metrics loop and a dispatch loop per
    /// capability (more start as capabilities appear).
    pub(crate) fn start(self: &Arc<Self>) {
        let me = self.clone();
        self.tracker.spawn(async move { me.refresh_loop().await });
        let me = self.clone();
        self.tracker.spawn(async move { me.reap_loop().await });
        let me = self.clone();
        self.tracker.spawn(async move { me.metrics_loop().await });
        for cap in self.configured.clone() {
            self.ensure_loop(&cap);
        }
    }

    /// The capabilities this replica dispatches.
    pub(crate) fn capabilities(&self) -> Vec<Capability> {
        self.read_view().capabilities.clone()
    }

    /// Whether a capability is known (configured, served by a live worker, or seen before).
    pub(crate) fn knows(&self, capability: &Capability) -> bool {
        self.configured.contains(capability) || self.read_view().capabilities.contains(capability)
    }

    /// Starts a dispatch loop for a capability if it has none.
    pub(crate) fn ensure_loop(self: &Arc<Self>, capability: &Capability) {
        let new = self
            .loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(capability.to_string());
        if new {
            let me = self.clone();
            let cap = capability.clone();
            self.tracker
                .spawn(async move { me.dispatch_loop(cap).await });
        }
    }

    /// A step this replica recorded finished: its worker has a free slot again.
    pub(crate) fn step_done(&self, worker: &WorkerId) {
        let mut v = self.write_view();
        if let Some(n) = v.load.get_mut(worker.as_str()) {
            *n = n.saturating_sub(1);
        }
    }

    fn read_view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_view(&self) -> std::sync::RwLockWriteGuard<'_, View> {
        self.view.write().unwrap_or_else(|p| p.into_inner())
    }

    fn skipped(&self) -> HashSet<String> {
        let now = Instant::now();
        let mut skip = self.skip.lock().unwrap_or_else(|p| p.into_inner());
        skip.retain(|_, until| *until > now);
        skip.keys().cloned().collect()
    }

    fn skip_worker(&self, worker: &WorkerId, for_how_long: Duration) {
        self.skip
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(worker.to_string(), Instant::now() + for_how_long);
    }

    fn store_result<T>(&self, what: &str, r: Result<T, StoreError>) -> Option<T> {
        use std::sync::atomic::Ordering;
        match r {
            Ok(v) => {
                if self.store_down.swap(false, Ordering::Relaxed) {
                    tracing::info!("task store reachable again");
                }
                Some(v)
            }
            Err(e) => {
                // Logged once per streak of failures; the loop retries on its next tick.
                if !self.store_down.swap(true, Ordering::Relaxed) {
                    if matches!(e, StoreError::Unavailable(_) | StoreError::NotReady(_)) {
                        // An outage: the message the Redis-errors alarm matches.
                        tracing::warn!(error = %e, during = what, "{}", common::redis::UNAVAILABLE_LOG);
                    } else {
                        // A full store, a script error, bad data: retrying will not mend it.
                        tracing::error!(error = %e, during = what, "task store error");
                    }
                }
                None
            }
        }
    }

    async fn refresh(self: &Arc<Self>) {
        let workers = self.workers.changed().await;
        let Some(workers) = self.store_result("listing workers", workers) else {
            return;
        };
        let loads = self.store.worker_loads().await;
        let Some(load) = self.store_result("reading worker loads", loads) else {
            return;
        };
        let stored = self.store.capabilities().await.unwrap_or_default();
        let mut caps: Vec<Capability> = self.configured.clone();
        caps.extend(workers.iter().flat_map(|w| w.capabilities.iter().cloned()));
        caps.extend(stored);
        caps.sort();
        caps.dedup();
        let appeared = {
            let v = self.read_view();
            workers
                .iter()
                .any(|w| !v.workers.iter().any(|o| o.id == w.id))
        };
        for cap in &caps {
            self.ensure_loop(cap);
        }
        *self.write_view() = View {
            workers,
            load,
            capabilities: caps,
        };
        if appeared {
            self.hub.wake_all_dispatchers();
        }
    }

    async fn refresh_loop(self: Arc<Self>) {
        loop {
            self.refresh().await;
            tokio::select! {
                () = tokio::time::sleep(REFRESH) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn dispatch_loop(self: Arc<Self>, cap: Capability) {
        let notify = self.hub.capability(cap.as_str());
        let poll = Duration::from_millis(self.config.dispatch_poll_ms);
        loop {
            while self.dispatch_batch(&cap).await {
                if self.shutdown.is_cancelled() {
                    return;
                }
            }
            tokio::select! {
                () = notify.notified() => {}
                () = tokio::time::sleep(poll) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Claims and sends one batch. Returns whether there may be more to do right away.
    async fn dispatch_batch(self: &Arc<Self>, cap: &Capability) -> bool {
        let skipped = self.skipped();
        let skip = |w: &WorkerId| skipped.contains(w.as_str());
        let assigned = {
            let v = self.read_view();
            let free = select::free_slots(cap, &v.workers, &v.load, &skip);
            select::assign(cap, &v.workers, &v.load, &skip, free.min(BATCH))
        };
        if assigned.is_empty() {
            return false;
        }
        let lease = self.config.lease();
        let claimed = self.store.claim(cap, &assigned, lease).await;
        let Some(claimed) = self.store_result("claiming steps", claimed) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return false;
        };
        let more = claimed.len() == assigned.len();
        {
            let mut v = self.write_view();
            for c in &claimed {
                *v.load.entry(c.worker.to_string()).or_insert(0) += 1;
            }
        }
        // One request per worker that takes batches (and no span per step to carry, when
        // traces are exported); else one per step.
        let batching = !common::traces::enabled();
        let mut batches: Vec<(usize, Vec<Claimed>)> = Vec::new();
        for c in claimed {
            let max_batch = if batching {
                self.max_batch(&c.worker)
            } else {
                1
            };
            if max_batch <= 1 {
                let me = self.clone();
                let span = attempt_span(&c);
                self.tracker
                    .spawn(async move { me.send(c).await }.instrument(span));
                continue;
            }
            match batches
                .iter_mut()
                .find(|(max, b)| b[0].worker == c.worker && b.len() < *max)
            {
                Some((_, batch)) => batch.push(c),
                None => batches.push((max_batch, vec![c])),
            }
        }
        for (_, mut batch) in batches {
            let me = self.clone();
            match batch.pop() {
                Some(c) if batch.is_empty() => {
                    self.tracker.spawn(async move { me.send(c).await });
                }
                Some(c) => {
                    batch.push(c);
                    self.tracker
                        .spawn(async move { me.send_batch(batch).await });
                }
                None => {}
            }
        }
        more
    }

    /// The most steps `worker` takes in one request (its record's `max_batch`; 1 if it
    /// takes one at a time or is gone).
    fn max_batch(&self, worker: &WorkerId) -> usize {
        let v = self.read_view();
        v.workers.iter().find(|w| w.id == *worker).map_or(1, |w| {
            (w.max_batch as usize).clamp(1, common::wire::MAX_BATCH)
        })
    }

    /// The URL steps for `worker` go to, while it is in the view.
    fn worker_url(&self, worker: &WorkerId) -> Option<String> {
        let v = self.read_view();
        v.workers
            .iter()
            .find(|w| w.id == *worker)
            .map(|w| w.url.trim_end_matches('/').to_string())
    }

    async fn send(self: Arc<Self>, claimed: Claimed) {
        let outcome = match self.worker_url(&claimed.worker) {
            None => Sent::Busy(Duration::from_secs(1), "worker is gone".into()),
            Some(url) => self.post_work(&url, &claimed).await,
        };
        self.settle(claimed, outcome).await;
    }

    /// Sends steps claimed for one worker in one `POST /work` (a JSON array; each step is
    /// answered on its own), and settles each as if it had been sent alone.
    async fn send_batch(self: Arc<Self>, mut batch: Vec<Claimed>) {
        // In a batch, each step carries its own request id (one request has one header).
        for claimed in &mut batch {
            claimed.work.request_id = Some(claimed.request_id.clone());
        }
        let outcomes = match self.worker_url(&batch[0].worker) {
            None => batch
                .iter()
                .map(|_| Sent::Busy(Duration::from_secs(1), "worker is gone".into()))
                .collect(),
            Some(url) => self.post_batch(&url, &batch).await,
        };
        for (claimed, outcome) in batch.into_iter().zip(outcomes) {
            self.settle(claimed, outcome).await;
        }
    }

    /// What follows a step's dispatch: counted when taken; otherwise back to the queue
    /// (free, or counted against `MAX_FREE_DISPATCH_FAILURES`), or the attempt spent.
    async fn settle(&self, claimed: Claimed, outcome: Sent) {
        let cap = claimed.work.capability.clone();
        let step = claimed.work.step_ref();
        let (skip, why, failure) = match outcome {
            Sent::Taken => {
                metrics::step_dispatched(&cap);
                tracing::debug!(task_id = %step.task_id, step = step.step, attempt = step.attempt,
                    worker = %claimed.worker, "step dispatched");
                return;
            }
            // The attempt is spent: the step is the problem, not the worker.
            Sent::Refused(error) => {
                tracing::warn!(task_id = %step.task_id, step = step.step, worker = %claimed.worker,
                    reason = %error.message, "dispatch refused; the attempt is spent");
                self.fail_attempt(&claimed, error).await;
                return;
            }
            Sent::Busy(skip, why) => (skip, why, ReleaseReason::Capacity),
            Sent::Failed(skip, why) => (skip, why, ReleaseReason::Failure),
        };
        if !skip.is_zero() {
            tracing::warn!(task_id = %step.task_id, worker = %claimed.worker, reason = %why,
                "dispatch failed; step goes back to the queue");
            self.skip_worker(&claimed.worker, skip);
        }
        let released = self.store.release(&step, failure).await;
        match self.store_result("releasing a step", released) {
            Some(ReleaseOutcome::Released) => {
                self.step_done(&claimed.worker);
                self.hub.work_queued(cap.as_str());
            }
            Some(ReleaseOutcome::OverLimit) => {
                let error = StepError::retryable(
                    "dispatch_failed",
                    format!(
                        "dispatching the step failed {} times (last, to worker {}: {why})",
                        MAX_FREE_DISPATCH_FAILURES + 1,
                        claimed.worker
                    ),
                );
                self.fail_attempt(&claimed, error).await;
            }
            // Stale, or the store is down: the lease lapses and the reaper re-queues it.
            Some(ReleaseOutcome::Stale) | None => self.step_done(&claimed.worker),
        }
    }

    /// `POST {url}/work`, sorted by what it means for the step.
    async fn post_work(&self, url: &str, claimed: &Claimed) -> Sent {
        let body = match serde_json::to_vec(&claimed.work) {
            Ok(body) => body,
            Err(e) => {
                return Sent::Refused(StepError::permanent(
                    "step_unencodable",
                    format!("the step could not be encoded: {e}"),
                ));
            }
        };
        let limit = self.config.work_body_limit_bytes;
        if body.len() > limit {
            return too_large(body.len(), limit);
        }
        let sent = self
            .http
            .post(format!("{url}/work"))
            .bearer_auth(self.config.worker_token.expose())
            .header(&common::telemetry::REQUEST_ID, &claimed.request_id)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let sent = common::traces::propagate(sent).send().await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => return Sent::Failed(Duration::from_secs(2), format!("dispatch failed: {e}")),
        };
        let status = response.status();
        if status.is_success() {
            return Sent::Taken;
        }
        let detail = if status.is_client_error() {
            error_detail(response).await
        } else {
            String::new()
        };
        self.refusal(status, &detail, &claimed.worker, url)
    }

    /// `POST {url}/work` of a batch: a JSON array, in as many requests as
    /// `WORK_BODY_LIMIT_BYTES` needs. Returns each step's outcome, in order.
    async fn post_batch(&self, url: &str, batch: &[Claimed]) -> Vec<Sent> {
        let limit = self.config.work_body_limit_bytes;
        let mut outcomes: Vec<Option<Sent>> = batch.iter().map(|_| None).collect();
        // The requests' bodies, with the steps each carries.
        let mut bodies: Vec<(Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, claimed) in batch.iter().enumerate() {
            let encoded = match serde_json::to_vec(&claimed.work) {
                Ok(encoded) => encoded,
                Err(e) => {
                    outcomes[i] = Some(Sent::Refused(StepError::permanent(
                        "step_unencodable",
                        format!("the step could not be encoded: {e}"),
                    )));
                    continue;
                }
            };
            // Counted with the array's brackets, which a batch of one still has.
            if encoded.len() + 2 > limit {
                outcomes[i] = Some(too_large(encoded.len() + 2, limit));
                continue;
            }
            match bodies.last_mut() {
                Some((steps, body)) if body.len() + encoded.len() + 2 <= limit => {
                    body.push(b',');
                    body.extend_from_slice(&encoded);
                    steps.push(i);
                }
                _ => {
                    let mut body =
                        Vec::with_capacity((encoded.len() * (batch.len() - i) + 2).min(limit));
                    body.push(b'[');
                    body.extend_from_slice(&encoded);
                    bodies.push((vec![i], body));
                }
            }
        }
        let requests = bodies.into_iter().map(|(steps, mut body)| {
            body.push(b']');
            let request_id = batch[steps[0]].request_id.clone();
            async move {
                let answers =
                    self.post_array(url, body, &request_id, &batch[steps[0]].worker, steps.len());
                (steps, answers.await)
            }
        });
        for (steps, answers) in futures::future::join_all(requests).await {
            for (i, sent) in steps.into_iter().zip(answers) {
                outcomes[i] = Some(sent);
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Sent::Failed(Duration::ZERO, "not sent".into())))
            .collect()
    }

    /// One `POST {url}/work` with an array of `count` steps: each step's outcome, read from
    /// its answer; a failure of the whole request is every step's.
    async fn post_array(
        &self,
        url: &str,
        body: Vec<u8>,
        request_id: &str,
        worker: &WorkerId,
        count: usize,
    ) -> Vec<Sent> {
        let all = |sent: &dyn Fn() -> Sent| (0..count).map(|_| sent()).collect::<Vec<_>>();
        let sent = self
            .http
            .post(format!("{url}/work"))
            .bearer_auth(self.config.worker_token.expose())
            .header(&common::telemetry::REQUEST_ID, request_id)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                let why = format!("dispatch failed: {e}");
                return all(&|| Sent::Failed(Duration::from_secs(2), why.clone()));
            }
        };
        let status = response.status();
        if status == reqwest::StatusCode::OK {
            let answer = response
                .bytes()
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<common::wire::WorkBatchAnswer>(&b).ok());
            return match answer {
                Some(answer) if answer.steps.len() == count => answer
                    .steps
                    .into_iter()
                    .map(|a| self.answered(a, worker, url))
                    .collect(),
                // Not an answer per step: nothing is known to be taken. Free, like a lost
                // connection; a step that was taken meanwhile is a duplicate next time.
                _ => all(&|| {
                    Sent::Failed(
                        Duration::from_secs(2),
                        "the worker's answer to a batch is not one answer per step".into(),
                    )
                }),
            };
        }
        let detail = if status.is_client_error() {
            error_detail(response).await
        } else {
            String::new()
        };
        match status.as_u16() {
            // The batch itself was refused (a worker that says it takes batches but does
            // not parse them): not the steps' fault. Free, like a failed connection.
            400 | 404 | 405 | 413 | 415 | 422 => all(&|| {
                Sent::Failed(
                    Duration::from_secs(2),
                    format!("worker {worker} refused a batch: {status}{detail}"),
                )
            }),
            _ => all(&|| self.refusal(status, &detail, worker, url)),
        }
    }

    /// One step's answer in a batch, sorted like the answer to a single request.
    fn answered(&self, answer: common::wire::WorkItemAnswer, worker: &WorkerId, url: &str) -> Sent {
        let Ok(status) = reqwest::StatusCode::from_u16(answer.status) else {
            return Sent::Failed(
                Duration::from_secs(2),
                format!("worker answered status {} for a step", answer.status),
            );
        };
        if status.is_success() {
            return Sent::Taken;
        }
        let detail = answer
            .error
            .map(|e| {
                let message: String = e.message.chars().take(300).collect();
                format!(": {}", message.trim())
            })
            .unwrap_or_default();
        self.refusal(status, &detail, worker, url)
    }

    /// What a refusal (any status but `2xx`) means for the step, and for the worker.
    /// `detail` is `": message"` or empty.
    fn refusal(
        &self,
        status: reqwest::StatusCode,
        detail: &str,
        worker: &WorkerId,
        url: &str,
    ) -> Sent {
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            // Full: its slots look taken until the next refresh, so others are tried.
            let mut v = self.write_view();
            let max = v
                .workers
                .iter()
                .find(|w| w.id == *worker)
                .map_or(0, |w| w.max_concurrency);
            v.load.insert(worker.to_string(), max);
            return Sent::Busy(Duration::ZERO, "worker at capacity (429)".into());
        }
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            return Sent::Busy(
                Duration::from_secs(2),
                "worker unavailable (503: draining or degraded)".into(),
            );
        }
        if status == reqwest::StatusCode::MISDIRECTED_REQUEST {
            // Another worker answered at this worker's address (two records share it), and
            // it refused a step not leased to it. Not the step's fault: free, like a failed
            // connection, and this worker is skipped for a while so the step goes elsewhere.
            tracing::error!(
                worker_id = %worker,
                url,
                "another worker answers at this worker's advertised address; give each worker \
                 an address of its own (ADVERTISE_URL)"
            );
            self.skip_worker(worker, Duration::from_secs(10));
            return Sent::Failed(
                Duration::ZERO,
                format!("another worker answers at {url} (421 misdirected)"),
            );
        }
        if status.is_client_error() {
            let message = format!("worker {worker} refused the step: {status}{detail}");
            if matches!(status.as_u16(), 401 | 403) {
                // The worker's token differs from ours: the worker is the problem, not the
                // step. Keep away from it, but the attempt is still spent, so a fleet of
                // misconfigured workers cannot hold a step forever.
                self.skip_worker(worker, Duration::from_secs(10));
            }
            return Sent::Refused(StepError::retryable("dispatch_refused", message));
        }
        Sent::Failed(Duration::from_secs(2), format!("worker answered {status}"))
    }

    /// Spends the claimed attempt with `error`, as if its worker had reported it.
    async fn fail_attempt(&self, claimed: &Claimed, error: StepError) {
        let step = claimed.work.step_ref();
        let report = ResultReport {
            task_id: step.task_id.clone(),
            step: step.step,
            attempt: step.attempt,
            worker_id: claimed.worker.clone(),
            status: ReportStatus::Failed,
            output: None,
            error: Some(error),
            duration_ms: None,
        };
        let recorded = self
            .store
            .report(
                &report,
                self.retry_policy(),
                rand::random(),
                self.config.retention(),
            )
            .await;
        if let Some(outcome) = self.store_result("failing a refused step", recorded) {
            if outcome != ReportOutcome::Discarded {
                self.step_done(&claimed.worker);
            }
            self.after_report(&report, &outcome);
        }
    }

    async fn reap_loop(self: Arc<Self>) {
        loop {
            for cap in self.capabilities() {
                self.reap(&cap).await;
            }
            self.fire_timers().await;
            tokio::select! {
                () = tokio::time::sleep(REAP) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn reap(&self, cap: &Capability) {
        let promoted = self.store.promote_due(cap).await;
        if self
            .store_result("promoting retries", promoted)
            .is_some_and(|n| n > 0)
        {
            self.hub.work_queued(cap.as_str());
        }
        let expired = self.store.expired_leases(cap, 500).await;
        let Some(expired) = self.store_result("reading leases", expired) else {
            return;
        };
        if expired.is_empty() {
            return;
        }
        let now = now_ms();
        let mut extend = Vec::new();
        let mut lapse = Vec::new();
        {
            let v = self.read_view();
            for l in expired {
                let holder = v.workers.iter().find(|w| w.id == l.worker);
                match holder.and_then(|w| lease_renewal(&l, w, now, self.config.lease_ms)) {
                    Some(until) => extend.push((l.step, until)),
                    None => lapse.push(l),
                }
            }
        }
        let extended = self.store.extend_leases(cap, &extend).await;
        self.store_result("extending leases", extended);
        for l in lapse {
            let report = ResultReport {
                task_id: l.step.task_id.clone(),
                step: l.step.step,
                attempt: l.step.attempt,
                worker_id: l.worker.clone(),
                status: ReportStatus::Failed,
                output: None,
                error: Some(lease_expired_error(&l.worker)),
                duration_ms: None,
            };
            let recorded = self
                .store
                .report(
                    &report,
                    self.retry_policy(),
                    rand::random(),
                    self.config.retention(),
                )
                .await;
            if let Some(outcome) = self.store_result("re-queueing a lapsed step", recorded) {
                if matches!(
                    outcome,
                    ReportOutcome::Next { .. }
                        | ReportOutcome::Retry { .. }
                        | ReportOutcome::Done { .. }
                ) {
                    tracing::warn!(task_id = %l.step.task_id, step = l.step.step,
                        attempt = l.step.attempt, worker = %l.worker,
                        "lease lapsed; step re-queued");
                    metrics::lease_expired(cap);
                    self.step_done(&l.worker);
                }
                self.after_report(&report, &outcome);
            }
        }
    }

    /// Fires the wait and sleep timers that are due (any replica may; each fires once,
    /// atomically, in the store).
    async fn fire_timers(self: &Arc<Self>) {
        loop {
            let fired = self
                .store
                .fire_timers(TIMERS_PER_ROUND, self.config.retention())
                .await;
            let Some(fired) = self.store_result("firing timers", fired) else {
                return;
            };
            let more = fired.len() == TIMERS_PER_ROUND;
            for timer in fired {
                tracing::info!(task_id = %timer.task_id, step = timer.step, "timer fired");
                self.after_advance(&timer.task_id, &timer.advance);
            }
            if !more {
                return;
            }
        }
    }

    /// Wake-ups and metrics after a transition the master made by itself (a signal, a
    /// timer): dispatch what it queued; hand a final outcome to the long polls.
    pub(crate) fn after_advance(self: &Arc<Self>, task_id: &TaskId, advance: &Advance) {
        for cap in &advance.queued {
            self.ensure_loop(cap);
            self.hub.work_queued(cap.as_str());
        }
        if let Some(done) = &advance.done {
            metrics::task_finished(done.status);
            let succeeded = done.status == common::wire::TaskStatus::Succeeded;
            self.hub.task_finished_with(common::wire::TaskResult {
                task_id: task_id.clone(),
                status: done.status,
                result: succeeded.then(|| done.result.clone().unwrap_or_default()),
                error: done.error.clone(),
            });
            tracing::info!(task_id = %task_id, status = done.status.as_str(), "task finished");
        }
    }

    /// The retry policy from the config.
    pub(crate) fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(self.config.retry_base_ms),
            max: Duration::from_millis(self.config.retry_max_ms),
        }
    }

    /// Wake-ups and metrics after a report (or lapse) was recorded. A replayed report
    /// (recorded before; its first reply was lost) wakes again, which is harmless, but is
    /// not counted again.
    pub(crate) fn after_report(&self, report: &ResultReport, outcome: &ReportOutcome) {
        match outcome {
            ReportOutcome::Discarded => {}
            ReportOutcome::Replayed(first) => self.wake_after(report, first),
            ReportOutcome::Next { finished, .. } => {
                metrics::step_finished(finished, true);
                self.wake_after(report, outcome);
            }
            ReportOutcome::Retry { finished, .. } => {
                metrics::step_finished(finished, false);
                metrics::step_retried(&finished.capability);
                self.wake_after(report, outcome);
            }
            ReportOutcome::Done {
                finished, status, ..
            } => {
                metrics::step_finished(finished, *status == common::wire::TaskStatus::Succeeded);
                metrics::task_finished(*status);
                self.wake_after(report, outcome);
            }
        }
    }

    /// Every recorded outcome frees a worker slot of the finished step's capability: wake
    /// its dispatcher (and the next step's) so a backlog does not wait for the next poll;
    /// hand a task's final outcome to this replica's long polls.
    fn wake_after(&self, report: &ResultReport, outcome: &ReportOutcome) {
        match outcome {
            ReportOutcome::Discarded | ReportOutcome::Replayed(_) => {}
            ReportOutcome::Next { finished, queued } => {
                for cap in queued {
                    self.hub.work_queued(cap.as_str());
                }
                self.hub.work_queued(finished.capability.as_str());
            }
            ReportOutcome::Retry { finished, .. } => {
                self.hub.work_queued(finished.capability.as_str());
            }
            ReportOutcome::Done {
                finished,
                status,
                result,
                ..
            } => {
                self.hub.work_queued(finished.capability.as_str());
                let succeeded = *status == common::wire::TaskStatus::Succeeded;
                self.hub.task_finished_with(common::wire::TaskResult {
                    task_id: report.task_id.clone(),
                    status: *status,
                    // A graph's result is not always the reported output (several final
                    // steps, or a map instance that finished its map step).
                    result: succeeded.then(|| {
                        result
                            .clone()
                            .or_else(|| report.output.clone())
                            .unwrap_or_default()
                    }),
                    error: (!succeeded).then(|| report.error.clone()).flatten(),
                });
            }
        }
    }

    async fn metrics_loop(self: Arc<Self>) {
        let every = Duration::from_millis(self.config.metrics_interval_ms);
        let mut emf = crate::emf::EmfState::default();
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.shutdown.cancelled() => return,
            }
            let caps = self.capabilities();
            let stats = self.store.stats(&caps, self.config.retention()).await;
            let Some(stats) = self.store_result("reading queue stats", stats) else {
                metrics::redis_error();
                continue;
            };
            // The task index does not expire with the tasks: drop what expired (the dead
            // letters are pruned by `stats` the same way).
            let swept = self
                .store
                .sweep_task_index(self.config.retention(), INDEX_SWEEP_BUDGET)
                .await;
            self.store_result("sweeping the task index", swept);
            let workers = self.read_view().workers.clone();
            let rows = metrics::publish_queue_gauges(&stats, &workers, now_ms());
            if self.config.metrics_emf {
                for line in emf.lines(&rows, now_ms()) {
                    println!("{line}");
                }
            }
        }
    }
}

//! The task store: every state transition of tasks and steps, behind one trait with a
//! Redis implementation (Lua scripts, one round trip per transition) and an in-memory one
//! (the all-in-one launcher without Redis, and a reference for the conformance tests).

pub mod events;
pub mod memory;
pub mod redis;
mod reply;
pub mod schema;
pub mod search;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use common::wire::{
    Capability, ResultReport, StepError, StepRef, TaskId, TaskStatus, TaskView, WorkRequest,
    WorkerId,
};

pub use memory::MemoryStore;
pub use redis::RedisStore;

/// The store could not do what was asked. Only connection-level failures are worth a
/// retry (`Unavailable`); a full store needs an operator (`StorageFull`); the rest are
/// bugs or tampered data (`Backend`, `Corrupt`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing store is unreachable, timed out, or (during a failover) not a writable
    /// primary; the client should retry (`503`).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Redis is at `maxmemory` and refuses writes (`OOM` under `noeviction`): `507`.
    #[error("store full: {0}")]
    StorageFull(String),
    /// Redis rejected a command for a reason that is not an outage (a script error,
    /// `WRONGTYPE`, `NOPERM`, …): `500`, logged in full.
    #[error("store error: {0}")]
    Backend(String),
    /// Stored data did not have the expected shape.
    #[error("corrupt task data: {0}")]
    Corrupt(String),
    /// What the readiness check found: reachable but unable to take writes now (a
    /// replica, loading, full), or not reachable.
    #[error("store not ready: {0}")]
    NotReady(common::redis::NotReady),
}

impl From<common::redis::Unavailable> for StoreError {
    fn from(e: common::redis::Unavailable) -> Self {
        use common::redis::Failure;
        match e.failure {
            Failure::Unavailable => Self::Unavailable(e.message),
            Failure::StorageFull => Self::StorageFull(e.message),
            Failure::Other => Self::Backend(e.message),
        }
    }
}

impl From<common::redis::NotReady> for StoreError {
    fn from(e: common::redis::NotReady) -> Self {
        Self::NotReady(e)
    }
}

impl From<::redis::RedisError> for StoreError {
    fn from(e: ::redis::RedisError) -> Self {
        use common::redis::Failure;
        match common::redis::classify(&e) {
            Failure::Unavailable => Self::Unavailable(common::redis::describe(&e)),
            Failure::StorageFull => Self::StorageFull(e.to_string()),
            Failure::Other => Self::Backend(e.to_string()),
        }
    }
}

impl StoreError {
    /// What `/ready` answers for this error.
    pub fn not_ready(self) -> common::redis::NotReady {
        use common::redis::NotReady;
        match self {
            Self::NotReady(n) => n,
            Self::Unavailable(message) => NotReady {
                reason: "unavailable",
                message,
            },
            Self::StorageFull(_) => NotReady {
                reason: "storage_full",
                message: common::redis::STORAGE_FULL_MESSAGE.to_string(),
            },
            Self::Backend(detail) | Self::Corrupt(detail) => {
                tracing::error!(error = %detail, "readiness check failed");
                NotReady {
                    reason: "internal",
                    message:
                        "the store answered the readiness check with an error; see the service log"
                            .to_string(),
                }
            }
        }
    }
}

/// One step of a task about to be submitted (validated: ids unique, `needs` point at
/// other steps of the task, no cycles; see `docs/workflows.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedStep {
    /// Its id in the task.
    pub id: String,
    /// The indices of the steps it needs (empty: ready at submit).
    pub needs: Vec<u32>,
    /// When it fails for good, the task goes on and its dependants receive its error.
    pub allow_failure: bool,
    /// What it is.
    pub kind: PlannedKind,
}

/// What a planned step is.
#[derive(Debug, Clone, PartialEq)]
pub enum PlannedKind {
    /// Runs on a worker.
    Work {
        /// What it needs.
        capability: Capability,
        /// Attempts before it fails for good.
        max_attempts: u32,
        /// How long one attempt may run.
        timeout_ms: u64,
        /// Its fan-out, when it maps over an array.
        map: Option<MapPlan>,
        /// Its output's `next` picks which of its dependants run.
        router: bool,
    },
    /// Waits for a signal.
    Wait {
        /// The signal's name.
        signal: String,
        /// How long it waits.
        timeout_ms: u64,
        /// What a timeout does.
        on_timeout: common::wire::OnTimeout,
    },
    /// Sleeps.
    Sleep {
        /// For this long.
        ms: u64,
    },
}

/// Where a map step's array is and how wide it may run.
#[derive(Debug, Clone, PartialEq)]
pub struct MapPlan {
    /// `over` as written (shown in the task view).
    pub over: String,
    /// The step whose output holds the array (one the map step needs), or `None` for the
    /// task input.
    pub from: Option<u32>,
    /// Object keys and array indices (as text) from there to the array.
    pub path: Vec<String>,
    /// Most instances running at once.
    pub concurrency: u32,
}

impl PlannedStep {
    /// Step `index` of a chain: a worker step that needs the step before it.
    pub fn chain_link(
        index: u32,
        id: impl Into<String>,
        capability: Capability,
        max_attempts: u32,
        timeout_ms: u64,
    ) -> Self {
        Self {
            id: id.into(),
            needs: index.checked_sub(1).into_iter().collect(),
            allow_failure: false,
            kind: PlannedKind::Work {
                capability,
                max_attempts,
                timeout_ms,
                map: None,
                router: false,
            },
        }
    }

    /// Its capability, for a worker step.
    pub fn capability(&self) -> Option<&Capability> {
        match &self.kind {
            PlannedKind::Work { capability, .. } => Some(capability),
            _ => None,
        }
    }
}

/// Most elements a map step may fan out over (more fails the step, `map_too_wide`).
pub const MAX_MAP_WIDTH: usize = 1_000;

/// Largest output of a map step, its instances' outputs together (more fails the step,
/// `map_output_too_large`): it is kept in one hash field and sent whole to the steps that
/// need it.
pub const MAX_MAP_OUTPUT_BYTES: usize = 16 * 1024 * 1024;

/// Most entries a task's event stream keeps (`XADD … MAXLEN ~`): every transition of the
/// widest map task allowed, with room for its progress, fits; the oldest go first beyond.
pub const MAX_TASK_EVENTS: u32 = 20_000;

/// Entries the operators' stream of every task's events keeps (`GET /events`): a window of
/// recent history to resume within, not an archive.
pub const FIREHOSE_EVENTS: u32 = 10_000;

/// A task about to be submitted (already validated).
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Its id.
    pub id: TaskId,
    /// The client that owns it.
    pub client: String,
    /// Its pipeline's name, if any.
    pub pipeline: Option<String>,
    /// Its steps (at least one).
    pub steps: Vec<PlannedStep>,
    /// The input, as JSON text.
    pub input: String,
    /// Higher first.
    pub priority: i32,
    /// The client's idempotency key.
    pub idempotency_key: Option<String>,
    /// Where to POST the final view.
    pub callback_url: Option<String>,
    /// The submitting request's id, passed on to workers.
    pub request_id: String,
    /// A budget for its model calls.
    pub budget: Option<common::usage::Budget>,
    /// The W3C `traceparent` of the submit's span; `None` when traces are not exported.
    /// Stored with the task so each step attempt's span, made later by whichever replica
    /// claims it, has the submit as its parent.
    pub traceparent: Option<String>,
}

/// Per-client submission rate limit (GCRA).
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    /// Sustained submissions per second; 0 turns the limit off.
    pub per_sec: f64,
    /// Submissions allowed at once above the rate.
    pub burst: u32,
}

/// What `submit` did.
#[derive(Debug, Clone, PartialEq)]
pub enum SubmitOutcome {
    /// A new task was stored and its first step queued.
    Created,
    /// The idempotency key was used before: this is that task.
    Existing(TaskId),
    /// Over the client's rate: retry after this long.
    RateLimited(Duration),
}

/// A stored task with what only the master sees.
#[derive(Debug, Clone)]
pub struct TaskRecord {
    /// The client view.
    pub view: TaskView,
    /// The owner.
    pub client: String,
    /// The callback URL.
    pub callback_url: Option<String>,
    /// The submitting request's id.
    pub request_id: String,
}

/// A step claimed for a worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// What to send to the worker.
    pub work: WorkRequest,
    /// The worker it was claimed for.
    pub worker: WorkerId,
    /// The task's request id.
    pub request_id: String,
    /// The submit span's W3C `traceparent` ([`NewTask::traceparent`]), the parent of the
    /// step attempt's span.
    pub traceparent: Option<String>,
}

/// Retry timing: doubling from `base` to `max` with equal jitter (the formula `report.lua`
/// also computes). The backoff before attempt `tries + 1` is `delay_with(tries - 1, jitter)`.
pub use common::backoff::Backoff as RetryPolicy;

/// Why a claimed step goes back to its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// The worker was full or draining (`429`, `503`): nobody's fault, free.
    Capacity,
    /// The dispatch failed (`5xx`, connection error, timeout): free [`MAX_FREE_DISPATCH_FAILURES`] times, then every next one spends an attempt.
    Failure,
}

/// What `release` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// Back in the queue, no attempt spent.
    Released,
    /// The attempt is no longer current: nothing to do.
    Stale,
    /// One failed dispatch over the free ones: the step is still dispatched; report a failure
    /// to spend the attempt.
    OverLimit,
}

/// Failed dispatches of a step that cost no attempt before one does (see [`TaskStore::release`]);
/// the count restarts after it, so every (N+1)-th failed dispatch spends an attempt.
pub const MAX_FREE_DISPATCH_FAILURES: u32 = 3;

/// Whether a failure report says the attempt was lost on its worker rather than failed
/// by the agent, so the retry should prefer another worker.
pub fn lost_on_worker(report: &ResultReport) -> bool {
    report.status == common::wire::ReportStatus::Failed
        && report
            .error
            .as_ref()
            .and_then(|e| e.kind.as_deref())
            .is_some_and(|k| matches!(k, "lease_expired" | "dispatch_refused" | "dispatch_failed"))
}

/// What recording a report (or a lapsed lease) did.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportOutcome {
    /// The attempt was not current, the reporting worker does not hold the step's lease,
    /// or the task is finished or unknown: ignored.
    Discarded,
    /// This report (same attempt, same worker) was recorded before, and this is its
    /// outcome. Its effects in the store happened once; the caller answers `recorded`.
    Replayed(Box<ReportOutcome>),
    /// Recorded; the task goes on. The steps it made ready were queued (none when other
    /// branches still run, or only waits started).
    Next {
        /// The reported step's capability and when its attempt was dispatched.
        finished: FinishedStep,
        /// The capabilities of the steps it queued (each once).
        queued: Vec<Capability>,
    },
    /// Recorded a retryable failure; the step will be queued again after `delay`.
    Retry {
        /// The reported step.
        finished: FinishedStep,
        /// The backoff.
        delay: Duration,
    },
    /// Recorded; the task finished (succeeded, or failed into the dead-letter set).
    Done {
        /// The reported step.
        finished: FinishedStep,
        /// The task's final status.
        status: TaskStatus,
        /// Whether the task has a callback URL to notify.
        callback: bool,
        /// The task's result when it succeeded and it is not the reported output (a graph
        /// whose final step is not the one reported, or with several final steps).
        result: Option<serde_json::Value>,
    },
}

/// What a transition that the master makes by itself (a signal, a timer) set going.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Advance {
    /// The capabilities of the steps it queued (each once).
    pub queued: Vec<Capability>,
    /// The task's final status, when it finished, with whether it has a callback URL and
    /// its result when it succeeded.
    pub done: Option<Finished>,
}

/// A task that finished in a transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Succeeded or failed.
    pub status: TaskStatus,
    /// Whether the task has a callback URL to notify.
    pub callback: bool,
    /// The result, when it succeeded.
    pub result: Option<serde_json::Value>,
    /// The error, when it failed.
    pub error: Option<StepError>,
}

/// What `signal` did.
#[derive(Debug, Clone, PartialEq)]
pub enum SignalOutcome {
    /// A wait step was waiting for it: it succeeded with the payload.
    Delivered(Advance),
    /// Its wait step has not been reached yet: kept until it is.
    Buffered,
    /// No wait step of the task listens for this name.
    UnknownSignal,
    /// Its wait step already received a signal (or timed out, or was skipped).
    AlreadyReceived,
    /// The task has finished with this status.
    Finished(TaskStatus),
    /// No such task.
    NotFound,
}

/// A wait or sleep step whose timer fired.
#[derive(Debug, Clone, PartialEq)]
pub struct FiredTimer {
    /// The task.
    pub task_id: TaskId,
    /// The step's slot.
    pub step: u32,
    /// What it set going.
    pub advance: Advance,
}

/// The step a report was about, for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedStep {
    /// Its capability.
    pub capability: Capability,
    /// When the attempt was dispatched (ms since the epoch).
    pub dispatched_at_ms: u64,
}

/// A lease that has run out.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpiredLease {
    /// The step attempt.
    pub step: StepRef,
    /// The worker it was leased to.
    pub worker: WorkerId,
    /// When the attempt was dispatched.
    pub dispatched_at_ms: u64,
    /// The step's timeout.
    pub timeout_ms: u64,
}

/// What `cancel` did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The task is now cancelled.
    Cancelled,
    /// It had already finished with this status.
    AlreadyFinished(TaskStatus),
    /// No such task.
    NotFound,
}

/// A completion callback claimed for delivery (see [`TaskStore::claim_callbacks`]).
#[derive(Debug, Clone)]
pub struct CallbackClaim {
    /// The finished task; `record.view.callback` shows this attempt as started.
    pub record: TaskRecord,
    /// Where to POST it.
    pub url: String,
    /// This delivery attempt, from 1. It is the fencing token of
    /// [`TaskStore::finish_callback`]: a claim whose visibility ran out and was taken over
    /// by another replica can no longer record anything.
    pub attempt: u32,
}

/// How one callback delivery attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum CallbackResult {
    /// The receiver answered `2xx`: done, out of the outbox.
    Delivered,
    /// It failed; try again after `delay`.
    Retry {
        /// What went wrong, shown as `last_error`.
        error: String,
        /// The backoff.
        delay: Duration,
    },
    /// It failed and no attempts are left: the callback is `failed`, out of the outbox.
    Failed {
        /// What went wrong, shown as `last_error`.
        error: String,
    },
}

/// `last_error` of a callback whose attempts ran out because the replicas that claimed
/// them stopped before finishing.
pub const CALLBACK_ABANDONED: &str =
    "the delivery attempt was never finished (master replica stopped)";

/// What `progress` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressOutcome {
    /// A `step.progress` event was added.
    Recorded,
    /// The attempt is not current, the worker does not hold it, or the task finished.
    Discarded,
    /// The task has [`MAX_PROGRESS_EVENTS`](common::wire::MAX_PROGRESS_EVENTS) already.
    Limited,
}

/// What `redrive` did.
#[derive(Debug, Clone, PartialEq)]
pub enum RedriveOutcome {
    /// The failed and stopped steps run again (attempts reset); these capabilities got
    /// steps queued.
    Redriven(Vec<Capability>),
    /// The task is not failed.
    NotFailed(TaskStatus),
    /// The task failed and was dead-lettered, but an operator purged it from the dead
    /// letters since: it stays failed.
    Purged,
    /// No such task.
    NotFound,
}

/// A capability's queue figures.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct QueueStats {
    /// Steps ready to dispatch.
    pub queued: u64,
    /// Steps waiting out a retry backoff.
    pub delayed: u64,
    /// Steps leased to workers.
    pub in_flight: u64,
    /// Dead-lettered tasks whose failed step has this capability.
    pub dead_lettered: u64,
    /// When the step at the head of the queue was queued (ms since the epoch). With mixed
    /// priorities this is the next step to run, not necessarily the oldest.
    pub head_queued_at_ms: Option<u64>,
}

/// Every task and step transition.
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// Stores a task and queues its first step, unless the client is over its rate or the
    /// idempotency key was used before.
    async fn submit(
        &self,
        task: NewTask,
        limit: RateLimit,
        retention: Duration,
    ) -> Result<SubmitOutcome, StoreError>;

    /// Submits several tasks, in order, each as [`TaskStore::submit`] would (its own
    /// idempotency key, rate-limit token and script call), and answers each's outcome. The
    /// Redis store sends the calls in one pipeline: one round trip, each call atomic on
    /// its own. An item's error (a full Redis, say) is that item's alone; the outer error
    /// means the store could not be reached, and none of them may have been stored, or
    /// some: a repeat with the same idempotency keys is safe.
    async fn submit_many(
        &self,
        tasks: Vec<NewTask>,
        limit: RateLimit,
        retention: Duration,
    ) -> Result<Vec<Result<SubmitOutcome, StoreError>>, StoreError> {
        let mut outcomes = Vec::with_capacity(tasks.len());
        for task in tasks {
            outcomes.push(self.submit(task, limit, retention).await);
        }
        Ok(outcomes)
    }

    /// A task, if it exists.
    async fn get(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError>;

    /// Claims up to `workers.len()` queued steps of a capability, highest priority first,
    /// leasing the i-th to `workers[i]` for `lease`. A claimed step's attempt number goes
    /// up by one: it is the fencing token.
    async fn claim(
        &self,
        capability: &Capability,
        workers: &[WorkerId],
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError>;

    /// Puts a claimed step back in its queue without spending an attempt: the worker never
    /// took it. Capacity refusals are free without limit; of a step's failed dispatches,
    /// [`MAX_FREE_DISPATCH_FAILURES`] are free and the next one is not: the step stays
    /// dispatched and the caller spends the attempt by reporting a failure.
    async fn release(
        &self,
        step: &StepRef,
        why: ReleaseReason,
    ) -> Result<ReleaseOutcome, StoreError>;

    /// Records a worker's report, if its attempt is current and `report.worker_id` holds
    /// the step's lease. A repeat of the report that was recorded answers
    /// [`ReportOutcome::Replayed`] with the first outcome. When the attempt was lost on its
    /// worker ([`lost_on_worker`]), the retry goes to another worker if one is free.
    async fn report(
        &self,
        report: &ResultReport,
        retry: RetryPolicy,
        jitter: f64,
        retention: Duration,
    ) -> Result<ReportOutcome, StoreError>;

    /// Records several reports, as [`TaskStore::report`] would one by one (each with a
    /// jitter of its own), and answers each's outcome in order. The Redis store does it in
    /// one script call. An error settles none of them for sure: some may have been
    /// recorded, and a repeat of those is answered [`ReportOutcome::Replayed`].
    async fn report_many(
        &self,
        reports: &[ResultReport],
        retry: RetryPolicy,
        retention: Duration,
    ) -> Result<Vec<ReportOutcome>, StoreError> {
        let mut outcomes = Vec::with_capacity(reports.len());
        for report in reports {
            outcomes.push(
                self.report(report, retry, rand::random(), retention)
                    .await?,
            );
        }
        Ok(outcomes)
    }

    /// Leases of a capability that have run out (at most `limit`).
    async fn expired_leases(
        &self,
        capability: &Capability,
        limit: usize,
    ) -> Result<Vec<ExpiredLease>, StoreError>;

    /// Extends leases whose workers are still running them, each to its own expiry (ms
    /// since the epoch): the time of the heartbeat that listed the step plus the lease, so
    /// a dead worker's steps lapse one lease after its last heartbeat.
    async fn extend_leases(
        &self,
        capability: &Capability,
        leases: &[(StepRef, u64)],
    ) -> Result<(), StoreError>;

    /// Moves steps of a capability whose retry backoff is over into its queue. Returns how
    /// many moved.
    async fn promote_due(&self, capability: &Capability) -> Result<usize, StoreError>;

    /// Claims up to `limit` completion callbacks that are due (oldest first) from the
    /// outbox that `report` and `cancel` add finished tasks with a callback URL to, in the
    /// same atomic step that records the outcome. Each claim starts a delivery attempt and
    /// hides the entry from other claims for `visibility`, so a replica that dies holding
    /// it is replaced by another one after that. Entries whose task expired, is running
    /// again (redriven) or has no pending callback are dropped; one whose `max_attempts`
    /// were all claimed but never finished is marked failed ([`CALLBACK_ABANDONED`]).
    async fn claim_callbacks(
        &self,
        limit: usize,
        visibility: Duration,
        max_attempts: u32,
    ) -> Result<Vec<CallbackClaim>, StoreError>;

    /// Records how delivery attempt `attempt` of a task's callback ended, if that attempt
    /// is still the latest one claimed. Returns whether it was recorded.
    async fn finish_callback(
        &self,
        id: &TaskId,
        attempt: u32,
        result: &CallbackResult,
    ) -> Result<bool, StoreError>;

    /// Completion callbacks waiting in the outbox (due or backing off, claimed or not).
    async fn callbacks_pending(&self) -> Result<u64, StoreError>;

    /// Cancels a task. A task with a callback URL enters the callback outbox.
    async fn cancel(&self, id: &TaskId, retention: Duration) -> Result<CancelOutcome, StoreError>;

    /// Runs a failed task's failed and stopped steps again, with their attempts reset;
    /// steps that succeeded keep their outputs.
    async fn redrive(&self, id: &TaskId, retention: Duration)
    -> Result<RedriveOutcome, StoreError>;

    /// Delivers a signal to the task's wait step that listens for `name`: the step
    /// succeeds with `payload` (JSON text) and the task goes on. A signal whose step has
    /// not been reached yet is kept and used when it is.
    async fn signal(
        &self,
        id: &TaskId,
        name: &str,
        payload: &str,
        retention: Duration,
    ) -> Result<SignalOutcome, StoreError>;

    /// Fires up to `limit` wait and sleep timers that are due: a sleep succeeds, a wait
    /// times out (fails, or succeeds with `{"timed_out": true}`).
    async fn fire_timers(
        &self,
        limit: usize,
        retention: Duration,
    ) -> Result<Vec<FiredTimer>, StoreError>;

    /// Dead-lettered tasks whose failed step has this capability.
    async fn dead_letters(
        &self,
        capability: &Capability,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError>;

    /// Dead-lettered tasks of these capabilities, newest failure first, after `after`, at
    /// most `limit`, each with its client, failed step and error (`GET /deadletters`).
    async fn dead_letter_page(
        &self,
        capabilities: &[Capability],
        after: Option<&search::DeadLetterCursor>,
        limit: usize,
    ) -> Result<search::DeadLetterPage, StoreError>;

    /// Removes a capability's dead letters (only `task` when given); the tasks stay failed
    /// and can no longer be redriven. Returns how many were removed.
    async fn purge_dead_letters(
        &self,
        capability: &Capability,
        task: Option<&TaskId>,
    ) -> Result<u64, StoreError>;

    /// One page of the task search (`GET /tasks`), newest submit first.
    async fn search_tasks(&self, query: &search::TaskQuery)
    -> Result<search::TaskPage, StoreError>;

    /// Looks at up to `budget` members of the task index submitted more than `retention`
    /// ago, from where the last sweep stopped, and removes those of tasks that are gone.
    /// Returns how many tasks it removed.
    async fn sweep_task_index(
        &self,
        retention: Duration,
        budget: usize,
    ) -> Result<usize, StoreError>;

    /// Queue figures per capability (dead letters older than `retention` are pruned: their
    /// tasks have expired).
    async fn stats(
        &self,
        capabilities: &[Capability],
        retention: Duration,
    ) -> Result<Vec<(Capability, QueueStats)>, StoreError>;

    /// Steps in flight per worker id.
    async fn worker_loads(&self) -> Result<HashMap<String, u32>, StoreError>;

    /// Capabilities that tasks were submitted with (for inline steps).
    async fn capabilities(&self) -> Result<Vec<Capability>, StoreError>;

    /// Whether the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// A task's events after `after` (from its first without), oldest first: those of at
    /// most `limit` transitions. Nothing for an unknown or expired task.
    async fn events(
        &self,
        id: &TaskId,
        after: Option<&events::EventCursor>,
        limit: usize,
    ) -> Result<Vec<common::wire::TaskEvent>, StoreError>;

    /// Every task's events but partial output, after `after` (the newest
    /// [`FIREHOSE_EVENTS`] entries are kept), oldest first: at most `limit` transitions'.
    async fn all_events(
        &self,
        after: Option<&events::EventCursor>,
        limit: usize,
    ) -> Result<Vec<common::wire::TaskEvent>, StoreError>;

    /// The id of the newest event in the operators' stream, where a reader that wants only
    /// what happens from now on starts.
    async fn latest_event(&self) -> Result<Option<events::EventCursor>, StoreError>;

    /// Returns once the task's stream (every task's, with `None`) may have events after
    /// `after`, or after `timeout`. A reader calls it when it has read everything.
    async fn wait_events(
        &self,
        id: Option<&TaskId>,
        after: Option<&events::EventCursor>,
        timeout: Duration,
    );

    /// Records a worker's partial output of a step attempt it holds as a `step.progress`
    /// event.
    async fn progress(
        &self,
        progress: &common::wire::StepProgress,
    ) -> Result<ProgressOutcome, StoreError>;

    /// Whether the llm-gateway can share this store's ledger (the same Redis): only then
    /// can a task's budget be enforced and its usage shown.
    fn keeps_ledger(&self) -> bool {
        false
    }

    /// A task's model usage from the llm-gateway's ledger (nothing in a store without one).
    async fn usage(&self, _id: &TaskId) -> Result<common::usage::TaskUsage, StoreError> {
        Ok(common::usage::TaskUsage::default())
    }
}

/// The error recorded when a lease lapses.
pub fn lease_expired_error(worker: &WorkerId) -> StepError {
    StepError::retryable(
        "lease_expired",
        format!("worker {worker} stopped reporting the step (lease expired)"),
    )
}

/// Queue order: higher priority first, then first queued first. Priorities are limited to
/// ±[`MAX_PRIORITY`] so the score stays exact in a double (Redis keeps scores as
/// doubles); `lib.lua`'s `score` is the same formula, held to it by a test.
pub fn queue_score(priority: i32, queued_at_ms: u64) -> i64 {
    let queued = i64::try_from(queued_at_ms).unwrap_or(i64::MAX);
    -i64::from(priority) * PRIORITY_WEIGHT + queued.saturating_sub(SCORE_EPOCH_MS)
}

/// Largest absolute priority.
pub const MAX_PRIORITY: i32 = 100;

/// How much one priority level outweighs time in a queue score: more milliseconds than
/// any two queue times are apart (about 316 years).
pub const PRIORITY_WEIGHT: i64 = 10_000_000_000_000;

/// 2025-01-01, subtracted from queue times to keep scores small.
pub const SCORE_EPOCH_MS: i64 = 1_735_689_600_000;

/// The task's result from its declared steps once it succeeded: the output of the step
/// no other step needs (the last step of a chain), or, when there are several such steps,
/// an object of their outputs by id (skipped ones left out). Both stores build
/// `TaskView::result` with it, and the Lua that finishes a task builds the same.
pub fn graph_result(steps: &[common::wire::StepView]) -> serde_json::Value {
    let needed: std::collections::HashSet<&str> = steps
        .iter()
        .flat_map(|s| s.needs.iter().map(String::as_str))
        .collect();
    let sinks: Vec<&common::wire::StepView> = steps
        .iter()
        .filter(|s| !needed.contains(s.id.as_str()))
        .collect();
    match sinks.as_slice() {
        [one] => one.output.clone().unwrap_or_default(),
        several => serde_json::Value::Object(
            several
                .iter()
                .filter(|s| s.status != common::wire::StepStatus::Skipped)
                .map(|s| (s.id.clone(), s.output.clone().unwrap_or_default()))
                .collect(),
        ),
    }
}

/// `running` becomes `waiting` when nothing of the task is queued or running and a wait or
/// sleep step holds it. Both stores derive the status shown this way.
pub fn derive_waiting(view: &mut TaskView) {
    use common::wire::StepStatus;
    if view.status != TaskStatus::Running {
        return;
    }
    let all = || {
        view.steps
            .iter()
            .flat_map(|s| std::iter::once(s).chain(s.instances.iter()))
    };
    let busy = all().any(|s| matches!(s.status, StepStatus::Queued | StepStatus::Dispatched));
    if !busy && all().any(|s| s.status == StepStatus::Waiting) {
        view.status = TaskStatus::Waiting;
    }
}

/// A step's `input` from its needs (docs/workflows.md): the task input with none, the
/// output of its one need, or an object of its needs' outputs by id. Both stores use it.
pub fn step_input(
    previous: &[common::wire::PriorOutput],
    task_input: &serde_json::Value,
) -> serde_json::Value {
    match previous {
        [] => task_input.clone(),
        [one] => one.output.clone(),
        several => serde_json::Value::Object(
            several
                .iter()
                .map(|p| (p.id.clone(), p.output.clone()))
                .collect(),
        ),
    }
}

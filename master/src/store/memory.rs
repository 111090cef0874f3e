//! The in-memory task store: the same transitions as the Redis store, for the all-in-one
//! launcher when no `redis-server` is available, and as the reference the conformance
//! tests hold both stores to. State lives in one mutex; nothing survives a restart.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use common::wire::{
    CallbackStatus, CallbackView, Capability, PriorOutput, ReportStatus, ResultReport, StepContext,
    StepError, StepRef, StepStatus, StepView, TaskId, TaskStatus, TaskView, WorkRequest, WorkerId,
    now_ms,
};
use serde_json::Value;

use super::{
    CALLBACK_ABANDONED, CallbackClaim, CallbackResult, CancelOutcome, Claimed, ExpiredLease,
    FinishedStep, MAX_FREE_DISPATCH_FAILURES, NewTask, QueueStats, RateLimit, RedriveOutcome,
    ReleaseOutcome, ReleaseReason, ReportOutcome, RetryPolicy, StoreError, SubmitOutcome,
    TaskRecord, TaskStore, lost_on_worker, queue_score,
};

/// The in-memory [`TaskStore`].
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryStore")
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, StoreError> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store lock poisoned".into()))?;
        Ok(f(&mut state))
    }
}

/// A queue entry: (score, task id, step), ordered like the Redis sorted set.
type Entry = (i64, String, u32);

#[derive(Default)]
struct State {
    tasks: HashMap<String, Task>,
    queues: HashMap<String, BTreeSet<Entry>>,
    delayed: HashMap<String, BTreeSet<(u64, String, u32)>>,
    /// capability → (task id, step) → lease expiry.
    leases: HashMap<String, HashMap<(String, u32), u64>>,
    /// capability → task id → when it failed.
    dead: HashMap<String, HashMap<String, u64>>,
    load: HashMap<String, i64>,
    /// (client, key) → (task id, expiry).
    idempotency: HashMap<(String, String), (String, u64)>,
    /// client → theoretical arrival time (GCRA), ms.
    rate: HashMap<String, f64>,
    capabilities: BTreeSet<String>,
    /// The completion-callback outbox: task id → when its delivery is due.
    outbox: HashMap<String, u64>,
}

struct Task {
    id: TaskId,
    client: String,
    pipeline: Option<String>,
    priority: i32,
    input: Value,
    status: TaskStatus,
    error: Option<StepError>,
    callback_url: Option<String>,
    request_id: String,
    created: u64,
    started: Option<u64>,
    finished: Option<u64>,
    expires_at: Option<u64>,
    steps: Vec<Step>,
    /// The callback's delivery since the task last finished; `None` before that (the
    /// Redis hash has no `CALLBACK_STATUS` then).
    delivery: Option<Delivery>,
}

/// Where a finished task's completion callback stands (the `CALLBACK_*` fields of
/// `schema::task_field` in Redis).
struct Delivery {
    status: CallbackStatus,
    /// Attempts claimed, finished or not: the fencing token of `finish_callback`.
    attempts: u32,
    last_error: Option<String>,
}

struct Step {
    capability: Capability,
    status: StepStatus,
    attempt: u32,
    tries: u32,
    max_attempts: u32,
    timeout_ms: u64,
    worker: Option<WorkerId>,
    output: Option<Value>,
    error: Option<StepError>,
    queued: Option<u64>,
    dispatched: Option<u64>,
    finished: Option<u64>,
    /// The worker the last attempt was lost on: the next claim prefers another.
    avoid: Option<WorkerId>,
    /// Failed dispatches that cost no attempt since the last one that did.
    free_failures: u32,
    /// The last report recorded from a worker (attempt, worker, status) and its outcome,
    /// for replays (see report.lua).
    recorded: Option<(u32, WorkerId, ReportStatus, ReportOutcome)>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl State {
    /// A live task (expired ones are dropped on the way).
    fn task(&mut self, id: &str, now: u64) -> Option<&mut Task> {
        if self
            .tasks
            .get(id)
            .is_some_and(|t| t.expires_at.is_some_and(|e| e <= now))
        {
            self.tasks.remove(id);
        }
        self.tasks.get_mut(id)
    }

    fn release_load(&mut self, worker: Option<&WorkerId>) {
        if let Some(w) = worker {
            let entry = self.load.entry(w.to_string()).or_insert(0);
            *entry -= 1;
            if *entry <= 0 {
                self.load.remove(w.as_str());
            }
        }
    }

    fn enqueue(&mut self, cap: &Capability, priority: i32, queued: u64, id: &str, step: u32) {
        self.queues.entry(cap.to_string()).or_default().insert((
            queue_score(priority, queued),
            id.to_string(),
            step,
        ));
    }

    /// A finished task's callback enters the outbox, due now (lib.lua: queue_callback).
    fn queue_callback(&mut self, id: &str, now: u64) {
        if let Some(t) = self.tasks.get_mut(id) {
            t.delivery = Some(Delivery {
                status: CallbackStatus::Pending,
                attempts: 0,
                last_error: None,
            });
            self.outbox.insert(id.to_string(), now);
        }
    }

    fn remove_lease(&mut self, cap: &Capability, id: &str, step: u32) -> bool {
        self.leases
            .get_mut(cap.as_str())
            .and_then(|l| l.remove(&(id.to_string(), step)))
            .is_some()
    }
}

#[async_trait]
impl TaskStore for MemoryStore {
    async fn submit(
        &self,
        task: NewTask,
        limit: RateLimit,
        retention: Duration,
    ) -> Result<SubmitOutcome, StoreError> {
        let input: Value = serde_json::from_str(&task.input)
            .map_err(|e| StoreError::Corrupt(format!("task input is not JSON: {e}")))?;
        let now = now_ms();
        self.with(|s| {
            let idem = task
                .idempotency_key
                .as_ref()
                .map(|k| (task.client.clone(), k.clone()));
            if let Some(key) = &idem
                && let Some((existing, expires)) = s.idempotency.get(key).cloned()
                && expires > now
                && s.task(&existing, now).is_some()
            {
                return TaskId::new(existing)
                    .map(SubmitOutcome::Existing)
                    .map_err(|e| StoreError::Corrupt(e.to_string()));
            }
            if limit.per_sec > 0.0 {
                let interval = 1000.0 / limit.per_sec;
                let tolerance = interval * f64::from(limit.burst.max(1));
                let now_f = now as f64;
                let tat = s.rate.get(&task.client).copied().unwrap_or(0.0).max(now_f);
                let new_tat = tat + interval;
                if new_tat - now_f > tolerance {
                    let wait = (new_tat - now_f - tolerance).ceil() as u64;
                    return Ok(SubmitOutcome::RateLimited(Duration::from_millis(wait)));
                }
                s.rate.insert(task.client.clone(), new_tat);
            }
            if let Some(key) = idem {
                s.idempotency
                    .insert(key, (task.id.to_string(), now + ms(retention)));
            }
            if task.pipeline.is_none() {
                for step in &task.steps {
                    s.capabilities.insert(step.capability.to_string());
                }
            }
            let steps: Vec<Step> = task
                .steps
                .iter()
                .enumerate()
                .map(|(i, p)| Step {
                    capability: p.capability.clone(),
                    status: if i == 0 {
                        StepStatus::Queued
                    } else {
                        StepStatus::Pending
                    },
                    attempt: 0,
                    tries: 0,
                    max_attempts: p.max_attempts,
                    timeout_ms: p.timeout_ms,
                    worker: None,
                    output: None,
                    error: None,
                    queued: (i == 0).then_some(now),
                    dispatched: None,
                    finished: None,
                    avoid: None,
                    free_failures: 0,
                    recorded: None,
                })
                .collect();
            let first = steps[0].capability.clone();
            s.enqueue(&first, task.priority, now, task.id.as_str(), 0);
            s.tasks.insert(
                task.id.to_string(),
                Task {
                    id: task.id.clone(),
                    client: task.client,
                    pipeline: task.pipeline,
                    priority: task.priority,
                    input,
                    status: TaskStatus::Queued,
                    error: None,
                    callback_url: task.callback_url,
                    request_id: task.request_id,
                    created: now,
                    started: None,
                    finished: None,
                    expires_at: None,
                    steps,
                    delivery: None,
                },
            );
            Ok(SubmitOutcome::Created)
        })?
    }

    async fn get(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let now = now_ms();
        self.with(|s| s.task(id.as_str(), now).map(|t| record(t)))
    }

    async fn claim(
        &self,
        capability: &Capability,
        workers: &[WorkerId],
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        let now = now_ms();
        self.with(|s| {
            let mut claimed = Vec::new();
            // Like claim.lua: workers in order, except that a step whose last attempt was
            // lost on a worker swaps in the next other worker of the batch.
            let mut pool: Vec<WorkerId> = workers.to_vec();
            let mut next_worker = 0;
            while next_worker < pool.len() {
                let Some((_, id, step)) = s
                    .queues
                    .get_mut(capability.as_str())
                    .and_then(|q| q.pop_first())
                else {
                    break;
                };
                let Some(task) = s.task(&id, now) else {
                    continue;
                };
                let idx = step as usize;
                if task.status.is_terminal()
                    || task.steps.get(idx).map(|st| st.status) != Some(StepStatus::Queued)
                {
                    continue;
                }
                if let Some(avoid) = &task.steps[idx].avoid
                    && let Some(j) = (next_worker..pool.len()).find(|&j| &pool[j] != avoid)
                {
                    pool.swap(next_worker, j);
                }
                let worker = &pool[next_worker];
                next_worker += 1;
                if task.status == TaskStatus::Queued {
                    task.started = Some(now);
                }
                task.status = TaskStatus::Running;
                let st = &mut task.steps[idx];
                st.attempt += 1;
                st.tries += 1;
                st.status = StepStatus::Dispatched;
                st.worker = Some(worker.clone());
                st.dispatched = Some(now);
                // The step before only, never the whole history (see claim.lua).
                let previous: Vec<PriorOutput> = idx
                    .checked_sub(1)
                    .map(|i| PriorOutput {
                        step: i as u32,
                        capability: task.steps[i].capability.clone(),
                        output: task.steps[i].output.clone().unwrap_or(Value::Null),
                    })
                    .into_iter()
                    .collect();
                let st = &task.steps[idx];
                let work = WorkRequest {
                    task_id: task.id.clone(),
                    step,
                    attempt: st.attempt,
                    capability: capability.clone(),
                    input: previous
                        .last()
                        .map(|p| p.output.clone())
                        .unwrap_or_else(|| task.input.clone()),
                    context: StepContext {
                        task_input: task.input.clone(),
                        previous,
                        pipeline: task.pipeline.clone(),
                        total_steps: task.steps.len() as u32,
                    },
                    deadline_ms: now + st.timeout_ms,
                    worker_id: Some(worker.clone()),
                };
                let request_id = task.request_id.clone();
                s.leases
                    .entry(capability.to_string())
                    .or_default()
                    .insert((id.clone(), step), now + ms(lease));
                *s.load.entry(worker.to_string()).or_insert(0) += 1;
                claimed.push(Claimed {
                    work,
                    worker: worker.clone(),
                    request_id,
                });
            }
            claimed
        })
    }

    async fn release(
        &self,
        step: &StepRef,
        why: ReleaseReason,
    ) -> Result<ReleaseOutcome, StoreError> {
        let now = now_ms();
        self.with(|s| {
            let Some(task) = s.task(step.task_id.as_str(), now) else {
                return ReleaseOutcome::Stale;
            };
            let priority = task.priority;
            let Some(st) = task.steps.get_mut(step.step as usize) else {
                return ReleaseOutcome::Stale;
            };
            if task.status.is_terminal()
                || st.status != StepStatus::Dispatched
                || st.attempt != step.attempt
            {
                return ReleaseOutcome::Stale;
            }
            if why == ReleaseReason::Failure {
                st.free_failures += 1;
                if st.free_failures > MAX_FREE_DISPATCH_FAILURES {
                    st.free_failures = 0;
                    return ReleaseOutcome::OverLimit;
                }
            }
            st.status = StepStatus::Queued;
            st.tries = st.tries.saturating_sub(1);
            let (cap, worker, queued) = (st.capability.clone(), st.worker.clone(), st.queued);
            s.remove_lease(&cap, step.task_id.as_str(), step.step);
            s.release_load(worker.as_ref());
            s.enqueue(
                &cap,
                priority,
                queued.unwrap_or(now),
                step.task_id.as_str(),
                step.step,
            );
            ReleaseOutcome::Released
        })
    }

    async fn report(
        &self,
        report: &ResultReport,
        retry: RetryPolicy,
        jitter: f64,
        retention: Duration,
    ) -> Result<ReportOutcome, StoreError> {
        let now = now_ms();
        self.with(|s| {
            let id = report.task_id.as_str();
            let idx = report.step as usize;
            let Some(task) = s.task(id, now) else {
                return ReportOutcome::Discarded;
            };
            let Some(st) = task.steps.get(idx) else {
                return ReportOutcome::Discarded;
            };
            let current = st.status == StepStatus::Dispatched
                && st.attempt == report.attempt
                && st.worker.as_ref() == Some(&report.worker_id);
            if task.status.is_terminal() || !current {
                return match &st.recorded {
                    Some((attempt, worker, status, outcome))
                        if *attempt == report.attempt
                            && *worker == report.worker_id
                            && *status == report.status =>
                    {
                        ReportOutcome::Replayed(Box::new(outcome.clone()))
                    }
                    _ => ReportOutcome::Discarded,
                };
            }
            let lost = lost_on_worker(report);
            let priority = task.priority;
            let has_callback = task.callback_url.is_some();
            let total = task.steps.len();
            let st = &mut task.steps[idx];
            let finished = FinishedStep {
                capability: st.capability.clone(),
                dispatched_at_ms: st.dispatched.unwrap_or(0),
            };
            let worker = st.worker.clone();
            let outcome = match report.status {
                ReportStatus::Succeeded => {
                    st.status = StepStatus::Succeeded;
                    st.output = Some(report.output.clone().unwrap_or(Value::Null));
                    st.finished = Some(now);
                    if idx + 1 < total {
                        let next = &mut task.steps[idx + 1];
                        next.status = StepStatus::Queued;
                        next.queued = Some(now);
                        let cap = next.capability.clone();
                        s.enqueue(&cap, priority, now, id, report.step + 1);
                        ReportOutcome::Next {
                            finished: finished.clone(),
                            next: cap,
                        }
                    } else {
                        task.status = TaskStatus::Succeeded;
                        task.finished = Some(now);
                        task.expires_at = Some(now + ms(retention));
                        ReportOutcome::Done {
                            finished: finished.clone(),
                            status: TaskStatus::Succeeded,
                            callback: has_callback,
                        }
                    }
                }
                ReportStatus::Failed => {
                    let error = report.error.clone().unwrap_or_else(|| {
                        StepError::permanent("agent", "the worker reported a failure without error")
                    });
                    let retryable = error.retryable;
                    st.error = Some(error.clone());
                    if retryable && st.tries < st.max_attempts {
                        let delay = retry.delay_with(st.tries.saturating_sub(1), jitter);
                        let due = now + ms(delay);
                        st.status = StepStatus::Queued;
                        st.queued = Some(due);
                        if lost {
                            st.avoid = worker.clone();
                        }
                        s.delayed
                            .entry(finished.capability.to_string())
                            .or_default()
                            .insert((due, id.to_string(), report.step));
                        ReportOutcome::Retry {
                            finished: finished.clone(),
                            delay: Duration::from_millis(ms(delay)),
                        }
                    } else {
                        st.status = StepStatus::Failed;
                        st.finished = Some(now);
                        task.status = TaskStatus::Failed;
                        task.error = Some(error);
                        task.finished = Some(now);
                        task.expires_at = Some(now + ms(retention));
                        s.dead
                            .entry(finished.capability.to_string())
                            .or_default()
                            .insert(id.to_string(), now);
                        ReportOutcome::Done {
                            finished: finished.clone(),
                            status: TaskStatus::Failed,
                            callback: has_callback,
                        }
                    }
                }
            };
            if matches!(outcome, ReportOutcome::Done { callback: true, .. }) {
                s.queue_callback(id, now);
            }
            if !lost && let Some(t) = s.tasks.get_mut(id) {
                t.steps[idx].recorded = Some((
                    report.attempt,
                    report.worker_id.clone(),
                    report.status,
                    outcome.clone(),
                ));
            }
            s.remove_lease(&finished.capability, id, report.step);
            s.release_load(worker.as_ref());
            outcome
        })
    }

    async fn expired_leases(
        &self,
        capability: &Capability,
        limit: usize,
    ) -> Result<Vec<ExpiredLease>, StoreError> {
        let now = now_ms();
        self.with(|s| {
            let mut due: Vec<(u64, String, u32)> = s
                .leases
                .get(capability.as_str())
                .map(|l| {
                    l.iter()
                        .filter(|(_, until)| **until <= now)
                        .map(|((id, step), until)| (*until, id.clone(), *step))
                        .collect()
                })
                .unwrap_or_default();
            due.sort();
            let mut out = Vec::new();
            for (_, id, step) in due.into_iter().take(limit.max(1)) {
                let live = s.task(&id, now).and_then(|t| {
                    let st = t.steps.get(step as usize)?;
                    (!t.status.is_terminal() && st.status == StepStatus::Dispatched).then(|| {
                        ExpiredLease {
                            step: StepRef {
                                task_id: t.id.clone(),
                                step,
                                attempt: st.attempt,
                            },
                            worker: st.worker.clone().unwrap_or_else(|| WorkerId::generate("")),
                            dispatched_at_ms: st.dispatched.unwrap_or(0),
                            timeout_ms: st.timeout_ms,
                        }
                    })
                });
                match live {
                    Some(lease) => out.push(lease),
                    None => {
                        s.remove_lease(capability, &id, step);
                    }
                }
            }
            out
        })
    }

    async fn extend_leases(
        &self,
        capability: &Capability,
        leases: &[(StepRef, u64)],
    ) -> Result<(), StoreError> {
        self.with(|s| {
            if let Some(held) = s.leases.get_mut(capability.as_str()) {
                for (step, until) in leases {
                    if let Some(t) = held.get_mut(&(step.task_id.to_string(), step.step)) {
                        *t = *until;
                    }
                }
            }
        })
    }

    async fn promote_due(&self, capability: &Capability) -> Result<usize, StoreError> {
        let now = now_ms();
        self.with(|s| {
            let mut due = Vec::new();
            if let Some(d) = s.delayed.get_mut(capability.as_str()) {
                while d.first().is_some_and(|(at, _, _)| *at <= now) {
                    if let Some(entry) = d.pop_first() {
                        due.push(entry);
                    }
                }
            }
            let mut moved = 0;
            for (_, id, step) in due {
                let queued = s.task(&id, now).and_then(|t| {
                    let st = t.steps.get(step as usize)?;
                    (!t.status.is_terminal() && st.status == StepStatus::Queued)
                        .then(|| (t.priority, st.queued.unwrap_or(now)))
                });
                if let Some((priority, at)) = queued {
                    s.enqueue(capability, priority, at, &id, step);
                    moved += 1;
                }
            }
            moved
        })
    }

    async fn claim_callbacks(
        &self,
        limit: usize,
        visibility: Duration,
        max_attempts: u32,
    ) -> Result<Vec<CallbackClaim>, StoreError> {
        let now = now_ms();
        self.with(|s| {
            // Same order as ZRANGEBYSCORE: by due time, then by id.
            let mut due: Vec<(u64, String)> = s
                .outbox
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(id, at)| (*at, id.clone()))
                .collect();
            due.sort();
            due.truncate(limit.max(1));
            let mut claimed = Vec::new();
            for (_, id) in due {
                let Some(task) = s.task(&id, now) else {
                    s.outbox.remove(&id);
                    continue;
                };
                let url = task.callback_url.clone();
                let live = task.status.is_terminal();
                let Some(d) = task
                    .delivery
                    .as_mut()
                    .filter(|d| d.status == CallbackStatus::Pending && live && url.is_some())
                else {
                    s.outbox.remove(&id);
                    continue;
                };
                if d.attempts >= max_attempts.max(1) {
                    d.status = CallbackStatus::Failed;
                    d.last_error = Some(CALLBACK_ABANDONED.to_string());
                    s.outbox.remove(&id);
                    continue;
                }
                d.attempts += 1;
                let attempt = d.attempts;
                let record = record(task);
                s.outbox.insert(id, now + ms(visibility).max(1));
                if let Some(url) = url {
                    claimed.push(CallbackClaim {
                        record,
                        url,
                        attempt,
                    });
                }
            }
            claimed
        })
    }

    async fn finish_callback(
        &self,
        id: &TaskId,
        attempt: u32,
        result: &CallbackResult,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        self.with(|s| {
            let Some(d) = s
                .task(id.as_str(), now)
                .and_then(|t| t.delivery.as_mut())
                .filter(|d| d.status == CallbackStatus::Pending && d.attempts == attempt)
            else {
                return false;
            };
            match result {
                CallbackResult::Delivered => {
                    d.status = CallbackStatus::Delivered;
                    s.outbox.remove(id.as_str());
                }
                CallbackResult::Retry { error, delay } => {
                    d.last_error = Some(error.clone());
                    s.outbox.insert(id.to_string(), now + ms(*delay).max(1));
                }
                CallbackResult::Failed { error } => {
                    d.status = CallbackStatus::Failed;
                    d.last_error = Some(error.clone());
                    s.outbox.remove(id.as_str());
                }
            }
            true
        })
    }

    async fn callbacks_pending(&self) -> Result<u64, StoreError> {
        self.with(|s| s.outbox.len() as u64)
    }

    async fn cancel(&self, id: &TaskId, retention: Duration) -> Result<CancelOutcome, StoreError> {
        let now = now_ms();
        self.with(|s| {
            let Some(task) = s.task(id.as_str(), now) else {
                return CancelOutcome::NotFound;
            };
            if task.status.is_terminal() {
                return CancelOutcome::AlreadyFinished(task.status);
            }
            let mut active = Vec::new();
            for (i, st) in task.steps.iter_mut().enumerate() {
                if matches!(st.status, StepStatus::Queued | StepStatus::Dispatched) {
                    active.push((i as u32, st.capability.clone(), st.worker.clone()));
                    st.status = StepStatus::Failed;
                    st.error = Some(StepError::permanent("cancelled", "task cancelled"));
                    st.finished = Some(now);
                }
            }
            task.status = TaskStatus::Cancelled;
            task.finished = Some(now);
            task.expires_at = Some(now + ms(retention));
            if task.callback_url.is_some() {
                s.queue_callback(id.as_str(), now);
            }
            for (step, cap, worker) in active {
                if let Some(q) = s.queues.get_mut(cap.as_str()) {
                    q.retain(|(_, t, st)| !(t == id.as_str() && *st == step));
                }
                if let Some(d) = s.delayed.get_mut(cap.as_str()) {
                    d.retain(|(_, t, st)| !(t == id.as_str() && *st == step));
                }
                if s.remove_lease(&cap, id.as_str(), step) {
                    s.release_load(worker.as_ref());
                }
            }
            CancelOutcome::Cancelled
        })
    }

    async fn redrive(&self, id: &TaskId) -> Result<RedriveOutcome, StoreError> {
        let now = now_ms();
        self.with(|s| {
            let Some(task) = s.task(id.as_str(), now) else {
                return RedriveOutcome::NotFound;
            };
            if task.status != TaskStatus::Failed {
                return RedriveOutcome::NotFailed(task.status);
            }
            let Some(idx) = task
                .steps
                .iter()
                .position(|st| st.status == StepStatus::Failed)
            else {
                return RedriveOutcome::NotFailed(task.status);
            };
            task.status = if task.started.is_some() {
                TaskStatus::Running
            } else {
                TaskStatus::Queued
            };
            task.finished = None;
            task.error = None;
            task.expires_at = None;
            // The failure's callback is superseded by the next finish's (redrive.lua).
            task.delivery = None;
            let priority = task.priority;
            let st = &mut task.steps[idx];
            st.status = StepStatus::Queued;
            st.tries = 0;
            st.queued = Some(now);
            st.finished = None;
            let cap = st.capability.clone();
            if let Some(d) = s.dead.get_mut(cap.as_str()) {
                d.remove(id.as_str());
            }
            s.outbox.remove(id.as_str());
            s.enqueue(&cap, priority, now, id.as_str(), idx as u32);
            RedriveOutcome::Redriven(cap)
        })
    }

    async fn dead_letters(
        &self,
        capability: &Capability,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        self.with(|s| {
            let mut entries: Vec<(u64, String)> = s
                .dead
                .get(capability.as_str())
                .map(|d| d.iter().map(|(id, at)| (*at, id.clone())).collect())
                .unwrap_or_default();
            entries.sort();
            entries
                .into_iter()
                .take(limit.max(1))
                .filter_map(|(_, id)| TaskId::new(id).ok())
                .collect()
        })
    }

    async fn stats(
        &self,
        capabilities: &[Capability],
        retention: Duration,
    ) -> Result<Vec<(Capability, QueueStats)>, StoreError> {
        let now = now_ms();
        self.with(|s| {
            capabilities
                .iter()
                .map(|cap| {
                    let c = cap.as_str();
                    if let Some(d) = s.dead.get_mut(c) {
                        d.retain(|_, at| *at + ms(retention) > now);
                    }
                    let head = s.queues.get(c).and_then(|q| q.first().cloned()).and_then(
                        |(_, id, step)| s.tasks.get(&id)?.steps.get(step as usize)?.queued,
                    );
                    let stats = QueueStats {
                        queued: s.queues.get(c).map_or(0, |q| q.len() as u64),
                        delayed: s.delayed.get(c).map_or(0, |q| q.len() as u64),
                        in_flight: s.leases.get(c).map_or(0, |q| q.len() as u64),
                        dead_lettered: s.dead.get(c).map_or(0, |q| q.len() as u64),
                        head_queued_at_ms: head,
                    };
                    (cap.clone(), stats)
                })
                .collect()
        })
    }

    async fn worker_loads(&self) -> Result<HashMap<String, u32>, StoreError> {
        self.with(|s| {
            s.load
                .iter()
                .map(|(k, v)| (k.clone(), u32::try_from(*v).unwrap_or(0)))
                .collect()
        })
    }

    async fn capabilities(&self) -> Result<Vec<Capability>, StoreError> {
        self.with(|s| {
            s.capabilities
                .iter()
                .filter_map(|c| Capability::new(c.as_str()).ok())
                .collect()
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with(|_| ())
    }
}

fn record(t: &Task) -> TaskRecord {
    let steps: Vec<StepView> = t
        .steps
        .iter()
        .enumerate()
        .map(|(i, st)| StepView {
            index: i as u32,
            capability: st.capability.clone(),
            status: st.status,
            worker_id: st.worker.clone(),
            attempts: st.tries,
            output: st.output.clone(),
            error: st.error.clone(),
            queued_at_ms: st.queued,
            dispatched_at_ms: st.dispatched,
            finished_at_ms: st.finished,
        })
        .collect();
    let result = (t.status == TaskStatus::Succeeded)
        .then(|| steps.last().and_then(|s| s.output.clone()))
        .flatten();
    TaskRecord {
        view: TaskView {
            task_id: t.id.clone(),
            status: t.status,
            pipeline: t.pipeline.clone(),
            priority: t.priority,
            input: t.input.clone(),
            steps,
            result,
            error: t.error.clone(),
            created_at_ms: t.created,
            started_at_ms: t.started,
            finished_at_ms: t.finished,
            callback: t.callback_url.as_ref().map(|url| {
                let d = t.delivery.as_ref();
                CallbackView {
                    url: url.clone(),
                    status: d.map_or(CallbackStatus::Pending, |d| d.status),
                    attempts: d.map_or(0, |d| d.attempts),
                    last_error: d.and_then(|d| d.last_error.clone()),
                }
            }),
        },
        client: t.client.clone(),
        callback_url: t.callback_url.clone(),
        request_id: t.request_id.clone(),
    }
}

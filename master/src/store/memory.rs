//! The in-memory task store: the same transitions as the Redis store, for the all-in-one
//! launcher when no `redis-server` is available, and as the reference the conformance
//! tests hold both stores to. State lives in one mutex; nothing survives a restart. The
//! graph transitions follow `docs/workflows.md` ("The transitions, precisely") rule by
//! rule, in the same order as `lua/graph.lua`, so both stores agree on every cascade.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use common::wire::{
    CallbackStatus, CallbackView, Capability, MapView, OnTimeout, PriorOutput, ReportStatus,
    ResultReport, StepContext, StepError, StepKind, StepRef, StepStatus, StepView, TaskId,
    TaskStatus, TaskView, WaitView, WorkRequest, WorkerId, now_ms,
};
use common::wire::{MAX_EVENT_VALUE_BYTES, MAX_PROGRESS_EVENTS, StepProgress, TaskEvent, kinds};
use serde_json::Value;

use super::events::{EntryId, EventCursor};
use super::schema::index;
use super::search;
use super::{FIREHOSE_EVENTS, MAX_TASK_EVENTS, ProgressOutcome};

use super::{
    Advance, CALLBACK_ABANDONED, CallbackClaim, CallbackResult, CancelOutcome, Claimed,
    ExpiredLease, Finished, FinishedStep, FiredTimer, MAX_FREE_DISPATCH_FAILURES,
    MAX_MAP_OUTPUT_BYTES, MAX_MAP_WIDTH, MapPlan, NewTask, PlannedKind, QueueStats, RateLimit,
    RedriveOutcome, ReleaseOutcome, ReleaseReason, ReportOutcome, RetryPolicy, SignalOutcome,
    StoreError, SubmitOutcome, TaskRecord, TaskStore, derive_waiting, graph_result, lost_on_worker,
    queue_score,
};

/// The in-memory [`TaskStore`].
pub struct MemoryStore {
    state: Mutex<State>,
    /// Bumped after every call that added events: SSE connections wait on it.
    events: tokio::sync::watch::Sender<u64>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            events: tokio::sync::watch::Sender::new(0),
        }
    }
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
        let before = state.last_entry;
        let out = f(&mut state);
        if state.last_entry != before {
            let last = state.last_entry;
            drop(state);
            self.events.send_replace(last.ms ^ last.seq.rotate_left(32));
        }
        Ok(out)
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
    /// Wait and sleep timers: (due, member `task_id:slot`, task id, slot), so they fire in
    /// the order of the Redis sorted set (score, then member).
    timers: BTreeSet<(u64, String, String, u32)>,
    /// The operators' stream of every task's events but progress (`keys::firehose`).
    firehose: std::collections::VecDeque<(EntryId, TaskId, Vec<Value>)>,
    /// The id of the last event entry made, so ids only grow.
    last_entry: EntryId,
    /// Events a transition states itself because no status change shows them (a signal
    /// received), taken by the next [`State::emit`].
    stated: Vec<Value>,
    /// The task search index, with the members the Redis store keeps
    /// (`schema::keys::task_index`), in the same byte order.
    index: BTreeSet<String>,
    /// Where the next sweep of the index starts.
    sweep_from: Option<String>,
}

struct Task {
    id: TaskId,
    client: String,
    /// The budget given at submit, shown in the view (the in-memory store keeps no ledger).
    budget: Option<common::usage::Budget>,
    pipeline: Option<String>,
    priority: i32,
    input: Value,
    status: TaskStatus,
    error: Option<StepError>,
    callback_url: Option<String>,
    request_id: String,
    /// The submit span's `traceparent`, handed to every claim of its steps.
    traceparent: Option<String>,
    created: u64,
    started: Option<u64>,
    finished: Option<u64>,
    expires_at: Option<u64>,
    /// Declared steps first (in the order written), then map instances as their steps
    /// expand: a step's index here is its slot.
    steps: Vec<Step>,
    /// How many of `steps` were declared (the rest are map instances).
    declared: usize,
    /// Declared steps not finished yet: at 0 the task has succeeded (rule 4).
    open: usize,
    /// Declared steps no other step needs: where the result comes from.
    sinks: Vec<u32>,
    /// Signals that arrived before their wait step was reached: name → payload.
    buffered: HashMap<String, Value>,
    /// The callback's delivery since the task last finished; `None` before that (the
    /// Redis hash has no `CALLBACK_STATUS` then).
    delivery: Option<Delivery>,
    /// Its event stream: one entry per transition (`keys::events`).
    events: std::collections::VecDeque<(EntryId, Vec<Value>)>,
    /// `step.progress` events recorded.
    progress_events: u32,
    /// Entries its events ever had (they are numbered from 1).
    event_count: u64,
    /// The step whose failure failed it (`task_field::FAILED_STEP`).
    failed_step: Option<String>,
    /// The dead-letter set it went to when it failed (`task_field::DEAD_CAPABILITY`).
    dead_capability: Option<Capability>,
}

/// What events are made from: the statuses before a transition (see [`State::emit`]).
struct Snapshot {
    status: TaskStatus,
    steps: Vec<StepStatus>,
}

/// Where a finished task's completion callback stands (the `CALLBACK_*` fields of
/// `schema::task_field` in Redis).
struct Delivery {
    status: CallbackStatus,
    /// Attempts claimed, finished or not: the fencing token of `finish_callback`.
    attempts: u32,
    last_error: Option<String>,
}

/// What a slot is; map instances are worker steps.
#[derive(Clone)]
enum Kind {
    Work {
        /// Its output's `next` picks its dependants (declared steps only).
        router: bool,
        /// Its fan-out (declared steps only).
        map: Option<MapPlan>,
    },
    Wait {
        signal: String,
        timeout_ms: u64,
        on_timeout: OnTimeout,
    },
    Sleep {
        ms: u64,
    },
}

/// A map step's instances once it expanded.
#[derive(Clone, Copy)]
struct Fan {
    /// The slot of element 0's instance.
    first: u32,
    /// How many instances (elements).
    total: u32,
    /// The next instance to queue (element index): the ones from here on are pending.
    next: u32,
    /// Instances finished (succeeded, or failed when the map step allows it).
    done: u32,
}

struct Step {
    /// Its id; `<map id>[<i>]` for an instance.
    id: String,
    kind: Kind,
    /// What a worker needs to run it; `None` for wait and sleep steps.
    capability: Option<Capability>,
    /// The slots it needs (an instance: its map step's, for its context).
    needs: Vec<u32>,
    /// The slots that need it, in slot order.
    dependants: Vec<u32>,
    allow_failure: bool,
    /// Needs not finished yet; at 0 the step is resolved (rule 5).
    open_needs: usize,
    /// Needs that finished skipped.
    skipped_needs: usize,
    /// A router it needs did not pick it.
    routed_out: bool,
    /// A map step's instances, once expanded.
    fan: Option<Fan>,
    /// An instance's map step.
    parent: Option<u32>,
    /// An instance's element index and element.
    element: Option<(u32, Value)>,
    /// When a waiting wait or sleep step's timer fires.
    wakes_at: Option<u64>,
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

impl Step {
    fn new(id: String, kind: Kind, capability: Option<Capability>) -> Self {
        Self {
            id,
            kind,
            capability,
            needs: Vec::new(),
            dependants: Vec::new(),
            allow_failure: false,
            open_needs: 0,
            skipped_needs: 0,
            routed_out: false,
            fan: None,
            parent: None,
            element: None,
            wakes_at: None,
            status: StepStatus::Pending,
            attempt: 0,
            tries: 0,
            max_attempts: 1,
            timeout_ms: 0,
            worker: None,
            output: None,
            error: None,
            queued: None,
            dispatched: None,
            finished: None,
            avoid: None,
            free_failures: 0,
            recorded: None,
        }
    }

    fn is_router(&self) -> bool {
        matches!(self.kind, Kind::Work { router: true, .. })
    }

    fn map(&self) -> Option<&MapPlan> {
        match &self.kind {
            Kind::Work { map, .. } => map.as_ref(),
            _ => None,
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn timer_member(id: &str, slot: u32) -> String {
    format!("{id}:{slot}")
}

/// How a slot finished (rule 4).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Skipped,
    /// Failed with its failure allowed.
    Failed,
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

    /// Runs `f` on a live task taken out of the map (so that the rest of the state can be
    /// changed beside it) and puts it back.
    fn transition<T>(
        &mut self,
        id: &str,
        now: u64,
        f: impl FnOnce(&mut State, &mut Task) -> T,
    ) -> Option<T> {
        self.task(id, now)?;
        let before = self.snapshot(id);
        let mut task = self.tasks.remove(id)?;
        let out = f(self, &mut task);
        self.tasks.insert(id.to_string(), task);
        self.emit(id, before, now);
        Some(out)
    }

    /// The statuses events are made from.
    fn snapshot(&self, id: &str) -> Option<Snapshot> {
        self.tasks.get(id).map(|t| Snapshot {
            status: t.status,
            steps: t.steps.iter().map(|s| s.status).collect(),
        })
    }

    /// Adds the events of what changed since `before` (`None`: the task was just
    /// submitted) to the task's stream and the operators', as graph.lua's `g_events` does:
    /// the task's start first, each step whose status changed in slot order, the task's end
    /// last.
    fn emit(&mut self, id: &str, before: Option<Snapshot>, now: u64) {
        let Some(t) = self.tasks.get(id) else { return };
        let mut list = Vec::new();
        match &before {
            None => list.push(serde_json::json!({"type": kinds::TASK_SUBMITTED})),
            Some(b) if b.status == TaskStatus::Failed && !t.status.is_terminal() => {
                list.push(serde_json::json!({"type": kinds::TASK_REDRIVEN}));
            }
            Some(_) => {}
        }
        list.append(&mut self.stated);
        for (i, st) in t.steps.iter().enumerate() {
            let was = before
                .as_ref()
                .and_then(|b| b.steps.get(i).copied())
                .unwrap_or(StepStatus::Pending);
            if st.status == was {
                continue;
            }
            let mut e = serde_json::Map::new();
            let mut kind = match st.status {
                StepStatus::Queued => kinds::STEP_QUEUED,
                StepStatus::Dispatched => kinds::STEP_DISPATCHED,
                StepStatus::Succeeded => kinds::STEP_SUCCEEDED,
                StepStatus::Failed => kinds::STEP_FAILED,
                StepStatus::Waiting => kinds::STEP_WAITING,
                StepStatus::Skipped => kinds::STEP_SKIPPED,
                StepStatus::Cancelled => kinds::STEP_CANCELLED,
                _ => continue,
            };
            e.insert("step".into(), st.id.clone().into());
            e.insert("slot".into(), i.into());
            match st.status {
                StepStatus::Queued if st.queued.is_some_and(|q| q > now) => {
                    kind = kinds::STEP_RETRYING;
                    e.insert("attempt".into(), st.attempt.into());
                    e.insert("due_at_ms".into(), st.queued.unwrap_or(now).into());
                    insert_json(&mut e, "error", st.error.as_ref());
                }
                StepStatus::Queued => {}
                StepStatus::Dispatched => {
                    e.insert("attempt".into(), st.attempt.into());
                    if let Some(w) = &st.worker {
                        e.insert("worker_id".into(), w.as_str().into());
                    }
                }
                StepStatus::Waiting => {
                    e.insert("due_at_ms".into(), st.wakes_at.unwrap_or(now).into());
                }
                other => {
                    if st.attempt > 0 {
                        e.insert("attempt".into(), st.attempt.into());
                    }
                    match other {
                        StepStatus::Succeeded => insert_json(&mut e, "output", st.output.as_ref()),
                        StepStatus::Failed | StepStatus::Cancelled => {
                            insert_json(&mut e, "error", st.error.as_ref());
                        }
                        _ => {}
                    }
                }
            }
            e.insert("type".into(), kind.into());
            list.push(Value::Object(e));
        }
        let ended = t.status.is_terminal() && before.as_ref().is_none_or(|b| b.status != t.status);
        if ended {
            let mut e = serde_json::Map::new();
            let kind = match t.status {
                TaskStatus::Succeeded => {
                    let result = graph_result(&declared_views(t));
                    insert_json(&mut e, "output", Some(&result));
                    kinds::TASK_SUCCEEDED
                }
                TaskStatus::Failed => {
                    insert_json(&mut e, "error", t.error.as_ref());
                    kinds::TASK_FAILED
                }
                _ => kinds::TASK_CANCELLED,
            };
            e.insert("type".into(), kind.into());
            list.push(Value::Object(e));
        }
        self.append(id, list, true, now);
    }

    /// Adds one entry of events to a task's stream (and the operators', `firehose`).
    fn append(&mut self, id: &str, list: Vec<Value>, firehose: bool, now: u64) {
        if list.is_empty() {
            return;
        }
        // The operators' stream numbers entries like a Redis stream (`<ms>-<seq>`); a
        // task numbers its own from 1, like the entries of its hash.
        let global = if now > self.last_entry.ms {
            EntryId { ms: now, seq: 0 }
        } else {
            EntryId {
                ms: self.last_entry.ms,
                seq: self.last_entry.seq + 1,
            }
        };
        self.last_entry = global;
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        if firehose {
            self.firehose
                .push_back((global, t.id.clone(), list.clone()));
            while self.firehose.len() > FIREHOSE_EVENTS as usize {
                self.firehose.pop_front();
            }
        }
        t.event_count += 1;
        let entry = EntryId {
            ms: now,
            seq: t.event_count,
        };
        t.events.push_back((entry, list));
        while t.events.len() > MAX_TASK_EVENTS as usize {
            t.events.pop_front();
        }
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
    fn queue_callback(&mut self, t: &mut Task, now: u64) {
        t.delivery = Some(Delivery {
            status: CallbackStatus::Pending,
            attempts: 0,
            last_error: None,
        });
        self.outbox.insert(t.id.to_string(), now);
    }

    fn remove_lease(&mut self, cap: &Capability, id: &str, step: u32) -> bool {
        self.leases
            .get_mut(cap.as_str())
            .and_then(|l| l.remove(&(id.to_string(), step)))
            .is_some()
    }

    /// A finished task's member of the index's status part (graph.lua's `g_end`).
    fn index_status(&mut self, t: &Task, status: TaskStatus) {
        let ms = index::pad_ms(t.created);
        self.index
            .insert(index::status(status.as_str(), &ms, t.id.as_str()));
    }

    fn remove_timer(&mut self, id: &str, slot: u32, due: Option<u64>) {
        if let Some(due) = due {
            self.timers
                .remove(&(due, timer_member(id, slot), id.to_string(), slot));
        }
    }
}

/// One graph transition on one task (graph.lua's `G`): what it queued, and whether the
/// task failed in it. The cascade rules are methods; `end` settles the task.
struct Tx<'a> {
    s: &'a mut State,
    t: &'a mut Task,
    now: u64,
    /// Capabilities of the steps queued, in the order queued, each once (rule 14).
    queued: Vec<Capability>,
    /// The error the task failed with in this transition.
    failed: Option<StepError>,
}

impl<'a> Tx<'a> {
    fn new(s: &'a mut State, t: &'a mut Task, now: u64) -> Self {
        Self {
            s,
            t,
            now,
            queued: Vec::new(),
            failed: None,
        }
    }

    fn step(&mut self, slot: u32) -> &mut Step {
        &mut self.t.steps[slot as usize]
    }

    /// Puts a worker step (or instance) in its capability's queue.
    fn queue(&mut self, slot: u32) {
        let now = self.now;
        let priority = self.t.priority;
        let st = self.step(slot);
        st.status = StepStatus::Queued;
        st.queued = Some(now);
        let Some(cap) = st.capability.clone() else {
            return;
        };
        let id = self.t.id.to_string();
        self.s.enqueue(&cap, priority, now, &id, slot);
        if !self.queued.contains(&cap) {
            self.queued.push(cap);
        }
    }

    /// A wait or sleep step starts waiting for `wait_ms`; the task is running from now.
    fn timer(&mut self, slot: u32, wait_ms: u64) {
        let due = self.now.saturating_add(wait_ms);
        let st = self.step(slot);
        st.status = StepStatus::Waiting;
        st.wakes_at = Some(due);
        let id = self.t.id.to_string();
        self.s
            .timers
            .insert((due, timer_member(&id, slot), id, slot));
        if self.t.status == TaskStatus::Queued {
            self.t.status = TaskStatus::Running;
            self.t.started.get_or_insert(self.now);
        }
    }

    fn succeed(&mut self, slot: u32, output: Value) {
        let now = self.now;
        let st = self.step(slot);
        st.status = StepStatus::Succeeded;
        st.output = Some(output);
        st.finished = Some(now);
    }

    /// Rule 6: slot `d` has all it needs.
    fn ready(&mut self, d: u32) {
        if self.failed.is_some() {
            return;
        }
        match self.step(d).kind.clone() {
            Kind::Wait {
                signal, timeout_ms, ..
            } => {
                if let Some(payload) = self.t.buffered.remove(&signal) {
                    self.succeed(d, payload);
                    self.finish(d, Outcome::Succeeded);
                } else {
                    self.timer(d, timeout_ms);
                }
            }
            Kind::Sleep { ms } => self.timer(d, ms),
            Kind::Work { map: Some(_), .. } => self.expand(d),
            Kind::Work { map: None, .. } => self.queue(d),
        }
    }

    /// Rule 7: map step `m` runs once per element of its array.
    fn expand(&mut self, m: u32) {
        let Some(plan) = self.step(m).map().cloned() else {
            return self.queue(m);
        };
        let source = match plan.from {
            None => Some(&self.t.input),
            Some(n) => self.t.steps.get(n as usize).and_then(|s| s.output.as_ref()),
        };
        let elements = source
            .and_then(|v| walk(v, &plan.path))
            .and_then(Value::as_array)
            .cloned();
        let Some(elements) = elements else {
            let e = StepError::permanent(
                "map_source",
                format!("`map.over` ({}) does not lead to an array", plan.over),
            );
            return self.fail_for_good(m, e);
        };
        if elements.len() > MAX_MAP_WIDTH {
            let e = StepError::permanent(
                "map_too_wide",
                format!(
                    "`map.over` ({}) has {} elements; a map step runs over at most {MAX_MAP_WIDTH}",
                    plan.over,
                    elements.len()
                ),
            );
            return self.fail_for_good(m, e);
        }
        let first = self.t.steps.len() as u32;
        let total = elements.len() as u32;
        if total == 0 {
            // Nothing to expand: no instances, and the view shows no total (as Redis).
            self.succeed(m, Value::Array(Vec::new()));
            return self.finish(m, Outcome::Succeeded);
        }
        let map_step = &self.t.steps[m as usize];
        let (cap, max_attempts, timeout_ms, needs, id) = (
            map_step.capability.clone(),
            map_step.max_attempts,
            map_step.timeout_ms,
            map_step.needs.clone(),
            map_step.id.clone(),
        );
        for (i, element) in elements.into_iter().enumerate() {
            let mut inst = Step::new(
                format!("{id}[{i}]"),
                Kind::Work {
                    router: false,
                    map: None,
                },
                cap.clone(),
            );
            inst.max_attempts = max_attempts;
            inst.timeout_ms = timeout_ms;
            inst.needs = needs.clone();
            inst.parent = Some(m);
            inst.element = Some((i as u32, element));
            self.t.steps.push(inst);
        }
        let width = total.min(plan.concurrency.max(1));
        let st = self.step(m);
        st.status = StepStatus::Running;
        st.fan = Some(Fan {
            first,
            total,
            next: width,
            done: 0,
        });
        for i in 0..width {
            self.queue(first + i);
        }
    }

    /// Rule 4 for a map instance: its map step counts it, queues the next instance, and
    /// succeeds when every instance has finished.
    fn instance_done(&mut self, p: u32) {
        if self.step(p).status != StepStatus::Running {
            return;
        }
        let Some(mut fan) = self.step(p).fan else {
            return;
        };
        fan.done += 1;
        if fan.next < fan.total && self.failed.is_none() {
            self.queue(fan.first + fan.next);
            fan.next += 1;
        }
        self.step(p).fan = Some(fan);
        if fan.done < fan.total {
            return;
        }
        let outputs: Vec<Value> = (fan.first..fan.first + fan.total)
            .map(|i| {
                let inst = &self.t.steps[i as usize];
                if inst.status == StepStatus::Succeeded {
                    inst.output.clone().unwrap_or(Value::Null)
                } else {
                    let error = inst
                        .error
                        .as_ref()
                        .and_then(|e| serde_json::to_value(e).ok())
                        .unwrap_or(Value::Null);
                    serde_json::json!({ "error": error })
                }
            })
            .collect();
        // Counted as graph.lua does: each element's JSON text and a separator.
        let size: usize = outputs
            .iter()
            .map(|o| serde_json::to_string(o).map_or(0, |t| t.len()) + 1)
            .sum();
        if size > MAX_MAP_OUTPUT_BYTES {
            let e = StepError::permanent(
                "map_output_too_large",
                format!(
                    "the outputs of the {} instances add up to {size} bytes; a map step's output is at most {MAX_MAP_OUTPUT_BYTES}",
                    fan.total
                ),
            );
            return self.fail_for_good(p, e);
        }
        self.succeed(p, Value::Array(outputs));
        self.finish(p, Outcome::Succeeded);
    }

    /// Rule 4: slot `slot` finished; its dependants count it and are resolved (rule 5)
    /// when nothing they need is open.
    fn finish(&mut self, slot: u32, outcome: Outcome) {
        if let Some(p) = self.step(slot).parent {
            return self.instance_done(p);
        }
        self.t.open = self.t.open.saturating_sub(1);
        if self.failed.is_some() {
            return;
        }
        let now = self.now;
        for d in self.step(slot).dependants.clone() {
            let dep = self.step(d);
            if dep.status != StepStatus::Pending {
                continue;
            }
            dep.open_needs = dep.open_needs.saturating_sub(1);
            if outcome == Outcome::Skipped {
                dep.skipped_needs += 1;
            }
            if dep.open_needs > 0 {
                continue;
            }
            if dep.routed_out || dep.skipped_needs >= dep.needs.len() {
                dep.status = StepStatus::Skipped;
                dep.finished = Some(now);
                self.finish(d, Outcome::Skipped);
            } else {
                self.ready(d);
            }
        }
    }

    /// Rule 8: slot `slot` failed for good with `e`.
    fn fail_for_good(&mut self, slot: u32, e: StepError) {
        let now = self.now;
        let st = self.step(slot);
        st.status = StepStatus::Failed;
        st.error = Some(e.clone());
        st.finished = Some(now);
        let (parent, allowed, cap) = (st.parent, st.allow_failure, st.capability.clone());
        let step_id = st.id.clone();
        if let Some(p) = parent {
            if self.step(p).allow_failure {
                return self.instance_done(p);
            }
            let map_step = self.step(p);
            map_step.status = StepStatus::Failed;
            map_step.error = Some(e.clone());
            map_step.finished = Some(now);
            return self.fail_task(cap, e, step_id);
        }
        if allowed {
            return self.finish(slot, Outcome::Failed);
        }
        self.fail_task(cap, e, step_id);
    }

    /// The task fails with `e` because step `step_id` failed (the first failure counts):
    /// dead-lettered under `cap`; the other branches are stopped by `end`.
    fn fail_task(&mut self, cap: Option<Capability>, e: StepError, step_id: String) {
        if self.failed.is_some() {
            return;
        }
        self.failed = Some(e.clone());
        self.t.status = TaskStatus::Failed;
        self.t.error = Some(e);
        self.t.finished = Some(self.now);
        self.t.failed_step = Some(step_id);
        self.t.dead_capability.clone_from(&cap);
        if let Some(cap) = cap {
            self.s
                .dead
                .entry(cap.to_string())
                .or_default()
                .insert(self.t.id.to_string(), self.now);
        }
    }

    /// Rule 2: a router's output picks its dependants; false (the router failed for good)
    /// when it does not.
    fn route(&mut self, slot: u32, output: &Value) -> bool {
        let picks: Vec<String> = match output.get("next") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        let deps = self.step(slot).dependants.clone();
        let ids: Vec<String> = deps
            .iter()
            .map(|d| self.t.steps[*d as usize].id.clone())
            .collect();
        if let Some(unknown) = picks.iter().find(|p| !ids.contains(p)) {
            let e = StepError::permanent(
                "route",
                format!("the router picked `{unknown}`, which is not one of its successors"),
            );
            self.fail_for_good(slot, e);
            return false;
        }
        if picks.is_empty() {
            let e = StepError::permanent(
                "route",
                "a router must answer an output with `next`: a successor id or a list of them",
            );
            self.fail_for_good(slot, e);
            return false;
        }
        for (d, id) in deps.into_iter().zip(ids) {
            if !picks.contains(&id) {
                self.step(d).routed_out = true;
            }
        }
        true
    }

    /// Every slot that is queued, dispatched, waiting or running (but `except`) becomes
    /// `cancelled` with `e`: out of its queue, lease and timer.
    fn stop_all(&mut self, except: Option<u32>, e: &StepError) {
        let id = self.t.id.to_string();
        for i in 0..self.t.steps.len() {
            let slot = i as u32;
            let st = &mut self.t.steps[i];
            if Some(slot) == except
                || !matches!(
                    st.status,
                    StepStatus::Queued
                        | StepStatus::Dispatched
                        | StepStatus::Waiting
                        | StepStatus::Running
                )
            {
                continue;
            }
            if let Some(cap) = &st.capability {
                if let Some(q) = self.s.queues.get_mut(cap.as_str()) {
                    q.retain(|(_, t, s)| !(t == &id && *s == slot));
                }
                if let Some(d) = self.s.delayed.get_mut(cap.as_str()) {
                    d.retain(|(_, t, s)| !(t == &id && *s == slot));
                }
                let cap = cap.clone();
                if self.s.remove_lease(&cap, &id, slot) {
                    let worker = self.t.steps[i].worker.clone();
                    self.s.release_load(worker.as_ref());
                }
            }
            let st = &mut self.t.steps[i];
            if st.status == StepStatus::Waiting {
                let due = st.wakes_at.take();
                self.s.remove_timer(&id, slot, due);
            }
            let st = &mut self.t.steps[i];
            st.status = StepStatus::Cancelled;
            st.error = Some(e.clone());
            st.finished = Some(self.now);
        }
    }

    /// Ends the transition (graph.lua's `g_end`): stops the other branches of a task that
    /// failed, or finishes a task with nothing open; a finished task enters the outbox
    /// and expires after `retention` (never, with `None`). `reported` is the slot the
    /// transition was about: the result is left out when it is the only final step.
    fn end(&mut self, reported: Option<u32>, retention: Option<u64>) -> Option<Finished> {
        let status = if self.failed.is_some() {
            let stopped = StepError::permanent(
                "stopped",
                "stopped: another step of the task failed for good",
            );
            self.stop_all(reported, &stopped);
            TaskStatus::Failed
        } else if self.t.open == 0 && !self.t.status.is_terminal() {
            self.t.status = TaskStatus::Succeeded;
            self.t.finished = Some(self.now);
            TaskStatus::Succeeded
        } else {
            return None;
        };
        let callback = self.t.callback_url.is_some();
        if callback {
            self.s.queue_callback(self.t, self.now);
        }
        self.s.index_status(self.t, status);
        self.t.expires_at = retention.map(|r| self.now.saturating_add(r));
        let result = (status == TaskStatus::Succeeded)
            .then(|| {
                let only = self.t.sinks.len() == 1 && reported == self.t.sinks.first().copied();
                (!only).then(|| graph_result(&declared_views(self.t)))
            })
            .flatten();
        Some(Finished {
            status,
            callback,
            result,
            error: self.failed.clone(),
        })
    }
}

/// The value at `path` (object keys, array indices as text) in `v`.
fn walk<'v>(v: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(v, |at, seg| match at {
        Value::Object(map) => map.get(seg),
        Value::Array(list) => seg.parse::<usize>().ok().and_then(|i| list.get(i)),
        _ => None,
    })
}

/// The steps of a new task, with their graph links.
fn build_steps(task: &NewTask) -> Vec<Step> {
    let mut steps: Vec<Step> = task
        .steps
        .iter()
        .map(|p| {
            let (kind, capability, max_attempts, timeout_ms) = match &p.kind {
                PlannedKind::Work {
                    capability,
                    max_attempts,
                    timeout_ms,
                    map,
                    router,
                } => (
                    Kind::Work {
                        router: *router,
                        map: map.clone(),
                    },
                    Some(capability.clone()),
                    *max_attempts,
                    *timeout_ms,
                ),
                PlannedKind::Wait {
                    signal,
                    timeout_ms,
                    on_timeout,
                } => (
                    Kind::Wait {
                        signal: signal.clone(),
                        timeout_ms: *timeout_ms,
                        on_timeout: *on_timeout,
                    },
                    None,
                    1,
                    0,
                ),
                PlannedKind::Sleep { ms } => (Kind::Sleep { ms: *ms }, None, 1, 0),
            };
            let mut st = Step::new(p.id.clone(), kind, capability);
            st.needs = p.needs.clone();
            st.open_needs = p.needs.len();
            st.allow_failure = p.allow_failure;
            st.max_attempts = max_attempts;
            st.timeout_ms = timeout_ms;
            st
        })
        .collect();
    for d in 0..steps.len() {
        for n in steps[d].needs.clone() {
            if let Some(need) = steps.get_mut(n as usize)
                && !need.dependants.contains(&(d as u32))
            {
                need.dependants.push(d as u32);
            }
        }
    }
    steps
}

/// What a report that finished its step answers (the task went on, or it finished).
fn settle(tx: &mut Tx<'_>, slot: u32, finished: FinishedStep, retention: u64) -> ReportOutcome {
    match tx.end(Some(slot), Some(retention)) {
        Some(done) => ReportOutcome::Done {
            finished,
            status: done.status,
            callback: done.callback,
            result: done.result,
        },
        None => ReportOutcome::Next {
            finished,
            queued: std::mem::take(&mut tx.queued),
        },
    }
}

/// What a transition the master makes by itself set going.
fn advance(tx: &mut Tx<'_>, retention: u64) -> Advance {
    // Unlike a report, nothing else carries the result: it is always given.
    let done = tx.end(None, Some(retention));
    Advance {
        queued: if done.is_some() {
            Vec::new()
        } else {
            std::mem::take(&mut tx.queued)
        },
        done,
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
                for cap in task.steps.iter().filter_map(|p| p.capability()) {
                    s.capabilities.insert(cap.to_string());
                }
            }
            let steps = build_steps(&task);
            let declared = steps.len();
            let needed: BTreeSet<u32> = steps.iter().flat_map(|st| st.needs.clone()).collect();
            let sinks = (0..declared as u32)
                .filter(|i| !needed.contains(i))
                .collect();
            let roots: Vec<u32> = (0..declared as u32)
                .filter(|i| steps[*i as usize].needs.is_empty())
                .collect();
            let mut t = Task {
                id: task.id.clone(),
                client: task.client,
                pipeline: task.pipeline,
                priority: task.priority,
                input,
                status: TaskStatus::Queued,
                error: None,
                callback_url: task.callback_url,
                request_id: task.request_id,
                traceparent: task.traceparent,
                budget: task.budget,
                created: now,
                started: None,
                finished: None,
                expires_at: None,
                steps,
                declared,
                open: declared,
                sinks,
                buffered: HashMap::new(),
                delivery: None,
                events: std::collections::VecDeque::new(),
                progress_events: 0,
                event_count: 0,
                failed_step: None,
                dead_capability: None,
            };
            let at = index::pad_ms(now);
            let (id, client) = (task.id.as_str(), t.client.as_str());
            let pipeline = t.pipeline.as_deref();
            s.index
                .insert(index::all(&at, id, client, pipeline.unwrap_or("")));
            s.index.insert(index::client(client, &at, id));
            if let Some(pipeline) = pipeline {
                s.index.insert(index::pipeline(pipeline, &at, id));
            }
            let mut tx = Tx::new(s, &mut t, now);
            for root in roots {
                tx.ready(root);
            }
            tx.end(None, Some(ms(retention)));
            s.tasks.insert(task.id.to_string(), t);
            s.emit(task.id.as_str(), None, now);
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
                let before = s.snapshot(&id);
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
                let work = work_request(task, step, capability, worker, now);
                let request_id = task.request_id.clone();
                let traceparent = task.traceparent.clone();
                s.leases
                    .entry(capability.to_string())
                    .or_default()
                    .insert((id.clone(), step), now + ms(lease));
                *s.load.entry(worker.to_string()).or_insert(0) += 1;
                claimed.push(Claimed {
                    work,
                    worker: worker.clone(),
                    request_id,
                    traceparent,
                });
                s.emit(&id, before, now);
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
            let before = s.snapshot(step.task_id.as_str());
            let outcome = release(s, step, why, now);
            s.emit(step.task_id.as_str(), before, now);
            outcome
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
            let Some(cap) = st.capability.clone() else {
                return ReportOutcome::Discarded;
            };
            let lost = lost_on_worker(report);
            let finished = FinishedStep {
                capability: cap.clone(),
                dispatched_at_ms: st.dispatched.unwrap_or(0),
            };
            let worker = st.worker.clone();
            let slot = report.step;
            let outcome = s
                .transition(id, now, |s, task| {
                    let mut tx = Tx::new(s, task, now);
                    match report.status {
                        ReportStatus::Succeeded => {
                            let output = report.output.clone().unwrap_or(Value::Null);
                            tx.succeed(slot, output.clone());
                            let router =
                                tx.step(slot).is_router() && tx.step(slot).parent.is_none();
                            if !router || tx.route(slot, &output) {
                                tx.finish(slot, Outcome::Succeeded);
                            }
                            settle(&mut tx, slot, finished.clone(), ms(retention))
                        }
                        ReportStatus::Failed => {
                            let error = report.error.clone().unwrap_or_else(|| {
                                StepError::permanent(
                                    "agent",
                                    "the worker reported a failure without error",
                                )
                            });
                            let st = tx.step(slot);
                            if error.retryable && st.tries < st.max_attempts {
                                let delay = retry.delay_with(st.tries.saturating_sub(1), jitter);
                                let due = now + ms(delay);
                                st.error = Some(error);
                                st.status = StepStatus::Queued;
                                st.queued = Some(due);
                                if lost {
                                    st.avoid = worker.clone();
                                }
                                tx.s.delayed.entry(cap.to_string()).or_default().insert((
                                    due,
                                    id.to_string(),
                                    slot,
                                ));
                                ReportOutcome::Retry {
                                    finished: finished.clone(),
                                    delay: Duration::from_millis(ms(delay)),
                                }
                            } else {
                                tx.fail_for_good(slot, error);
                                settle(&mut tx, slot, finished.clone(), ms(retention))
                            }
                        }
                    }
                })
                .unwrap_or(ReportOutcome::Discarded);
            if !lost && let Some(t) = s.tasks.get_mut(id) {
                // A replay answers without the result (report.lua remembers the reply
                // without it): its caller reads the task when it needs it.
                let remembered = match &outcome {
                    ReportOutcome::Done {
                        finished,
                        status,
                        callback,
                        ..
                    } => ReportOutcome::Done {
                        finished: finished.clone(),
                        status: *status,
                        callback: *callback,
                        result: None,
                    },
                    other => other.clone(),
                };
                t.steps[idx].recorded = Some((
                    report.attempt,
                    report.worker_id.clone(),
                    report.status,
                    remembered,
                ));
            }
            s.remove_lease(&cap, id, report.step);
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
            s.transition(id.as_str(), now, |s, task| {
                if task.status.is_terminal() {
                    return CancelOutcome::AlreadyFinished(task.status);
                }
                let mut tx = Tx::new(s, task, now);
                tx.stop_all(None, &StepError::permanent("cancelled", "task cancelled"));
                task.status = TaskStatus::Cancelled;
                task.finished = Some(now);
                task.expires_at = Some(now + ms(retention));
                s.index_status(task, TaskStatus::Cancelled);
                if task.callback_url.is_some() {
                    s.queue_callback(task, now);
                }
                CancelOutcome::Cancelled
            })
            .unwrap_or(CancelOutcome::NotFound)
        })
    }

    async fn redrive(
        &self,
        id: &TaskId,
        retention: Duration,
    ) -> Result<RedriveOutcome, StoreError> {
        let now = now_ms();
        self.with(|s| {
            s.transition(id.as_str(), now, |s, task| {
                if task.status != TaskStatus::Failed {
                    return RedriveOutcome::NotFailed(task.status);
                }
                // Rule 10: the stopped steps, and the failed ones whose failure was not
                // allowed (an instance's is allowed by its map step).
                let again: Vec<u32> = (0..task.steps.len() as u32)
                    .filter(|&i| {
                        let st = &task.steps[i as usize];
                        let allowed = match st.parent {
                            Some(p) => task.steps[p as usize].allow_failure,
                            None => st.allow_failure,
                        };
                        st.status == StepStatus::Cancelled
                            || (st.status == StepStatus::Failed && !allowed)
                    })
                    .collect();
                if let Some(cap) = &task.dead_capability
                    && !s
                        .dead
                        .get(cap.as_str())
                        .is_some_and(|d| d.contains_key(id.as_str()))
                {
                    return RedriveOutcome::Purged;
                }
                if again.is_empty() {
                    return RedriveOutcome::NotFailed(task.status);
                }
                let at = index::pad_ms(task.created);
                s.index.remove(&index::status(
                    TaskStatus::Failed.as_str(),
                    &at,
                    id.as_str(),
                ));
                task.failed_step = None;
                task.dead_capability = None;
                for i in &again {
                    if let Some(cap) = &task.steps[*i as usize].capability
                        && let Some(d) = s.dead.get_mut(cap.as_str())
                    {
                        d.remove(id.as_str());
                    }
                }
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
                s.outbox.remove(id.as_str());
                let mut tx = Tx::new(s, task, now);
                for i in again {
                    let st = tx.step(i);
                    st.finished = None;
                    st.error = None;
                    st.tries = 0;
                    st.free_failures = 0;
                    let expanded = st.map().is_some() && st.fan.is_some();
                    let graph = st.map().is_some() || !matches!(st.kind, Kind::Work { .. });
                    if expanded {
                        // Its instances run again by this same rule.
                        st.status = StepStatus::Running;
                    } else if graph {
                        tx.ready(i);
                    } else {
                        tx.queue(i);
                    }
                }
                // A redrive can fail again at once (a map step's array is still not one).
                match tx.end(None, Some(ms(retention))) {
                    Some(_) => RedriveOutcome::Redriven(Vec::new()),
                    None => RedriveOutcome::Redriven(std::mem::take(&mut tx.queued)),
                }
            })
            .unwrap_or(RedriveOutcome::NotFound)
        })
    }

    async fn signal(
        &self,
        id: &TaskId,
        name: &str,
        payload: &str,
        retention: Duration,
    ) -> Result<SignalOutcome, StoreError> {
        let payload: Value = serde_json::from_str(payload)
            .map_err(|e| StoreError::Corrupt(format!("signal payload is not JSON: {e}")))?;
        let now = now_ms();
        self.with(|s| {
            s.transition(id.as_str(), now, |s, task| {
                if task.status.is_terminal() {
                    return SignalOutcome::Finished(task.status);
                }
                let Some(slot) = (0..task.declared).find(
                    |&i| matches!(&task.steps[i].kind, Kind::Wait { signal, .. } if signal == name),
                ) else {
                    return SignalOutcome::UnknownSignal;
                };
                let slot = slot as u32;
                match task.steps[slot as usize].status {
                    StepStatus::Pending if task.buffered.contains_key(name) => {
                        SignalOutcome::AlreadyReceived
                    }
                    StepStatus::Pending => {
                        task.buffered.insert(name.to_string(), payload);
                        s.stated.push(signal_event(task, slot, name, true));
                        SignalOutcome::Buffered
                    }
                    StepStatus::Waiting => {
                        s.stated.push(signal_event(task, slot, name, false));
                        let due = task.steps[slot as usize].wakes_at.take();
                        s.remove_timer(id.as_str(), slot, due);
                        let mut tx = Tx::new(s, task, now);
                        tx.succeed(slot, payload);
                        tx.finish(slot, Outcome::Succeeded);
                        SignalOutcome::Delivered(advance(&mut tx, ms(retention)))
                    }
                    _ => SignalOutcome::AlreadyReceived,
                }
            })
            .unwrap_or(SignalOutcome::NotFound)
        })
    }

    async fn fire_timers(
        &self,
        limit: usize,
        retention: Duration,
    ) -> Result<Vec<FiredTimer>, StoreError> {
        let now = now_ms();
        self.with(|s| {
            let mut due = Vec::new();
            while due.len() < limit && s.timers.first().is_some_and(|(at, ..)| *at <= now) {
                if let Some(entry) = s.timers.pop_first() {
                    due.push(entry);
                }
            }
            let mut fired = Vec::new();
            for (_, _, id, slot) in due {
                let advanced = s.transition(&id, now, |s, task| {
                    if task.status.is_terminal()
                        || task.steps.get(slot as usize).map(|st| st.status)
                            != Some(StepStatus::Waiting)
                    {
                        return None;
                    }
                    let kind = task.steps[slot as usize].kind.clone();
                    task.steps[slot as usize].wakes_at = None;
                    let mut tx = Tx::new(s, task, now);
                    match kind {
                        Kind::Sleep { .. } => {
                            tx.succeed(slot, Value::Null);
                            tx.finish(slot, Outcome::Succeeded);
                        }
                        Kind::Wait {
                            on_timeout: OnTimeout::Continue,
                            ..
                        } => {
                            tx.succeed(slot, serde_json::json!({ "timed_out": true }));
                            tx.finish(slot, Outcome::Succeeded);
                        }
                        Kind::Wait {
                            signal, timeout_ms, ..
                        } => {
                            let e = StepError::permanent(
                                "wait_timeout",
                                format!("no signal `{signal}` within {timeout_ms} ms"),
                            );
                            tx.fail_for_good(slot, e);
                        }
                        Kind::Work { .. } => return None,
                    }
                    Some(FiredTimer {
                        task_id: tx.t.id.clone(),
                        step: slot,
                        advance: advance(&mut tx, ms(retention)),
                    })
                });
                fired.extend(advanced.flatten());
            }
            fired
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

    async fn dead_letter_page(
        &self,
        capabilities: &[Capability],
        after: Option<&search::DeadLetterCursor>,
        limit: usize,
    ) -> Result<search::DeadLetterPage, StoreError> {
        search::dead_letters(self, capabilities, after, limit).await
    }

    async fn purge_dead_letters(
        &self,
        capability: &Capability,
        task: Option<&TaskId>,
    ) -> Result<u64, StoreError> {
        self.with(|s| {
            let Some(dead) = s.dead.get_mut(capability.as_str()) else {
                return 0;
            };
            match task {
                Some(id) => u64::from(dead.remove(id.as_str()).is_some()),
                None => {
                    let n = dead.len() as u64;
                    dead.clear();
                    n
                }
            }
        })
    }

    async fn search_tasks(
        &self,
        query: &search::TaskQuery,
    ) -> Result<search::TaskPage, StoreError> {
        search::search(self, query).await
    }

    async fn sweep_task_index(
        &self,
        retention: Duration,
        budget: usize,
    ) -> Result<usize, StoreError> {
        let from = self.with(|s| s.sweep_from.clone())?;
        let cutoff = now_ms().saturating_sub(ms(retention));
        let (removed, next) = search::sweep(self, from.as_deref(), cutoff, budget).await?;
        self.with(|s| s.sweep_from = next)?;
        Ok(removed)
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

    async fn events(
        &self,
        id: &TaskId,
        after: Option<&EventCursor>,
        limit: usize,
    ) -> Result<Vec<TaskEvent>, StoreError> {
        let now = now_ms();
        let entries: Vec<(EntryId, Vec<Value>)> = self.with(|s| {
            s.task(id.as_str(), now).map_or_else(Vec::new, |t| {
                t.events
                    .iter()
                    .filter(|(e, _)| after.is_none_or(|a| e.seq >= a.entry.seq))
                    .take(super::events::range_count(after, limit))
                    .cloned()
                    .collect()
            })
        })?;
        let mut out = Vec::new();
        for (entry, list) in entries {
            out.extend(super::events::expand_values(id, entry, list, after)?);
        }
        Ok(out)
    }

    async fn all_events(
        &self,
        after: Option<&EventCursor>,
        limit: usize,
    ) -> Result<Vec<TaskEvent>, StoreError> {
        let entries: Vec<(EntryId, TaskId, Vec<Value>)> = self.with(|s| {
            s.firehose
                .iter()
                .filter(|(e, _, _)| after.is_none_or(|a| *e >= a.entry))
                .take(super::events::range_count(after, limit))
                .cloned()
                .collect()
        })?;
        let mut out = Vec::new();
        for (entry, id, list) in entries {
            out.extend(super::events::expand_values(&id, entry, list, after)?);
        }
        Ok(out)
    }

    async fn latest_event(&self) -> Result<Option<EventCursor>, StoreError> {
        self.with(|s| {
            s.firehose.back().map(|(entry, _, list)| EventCursor {
                entry: *entry,
                index: u32::try_from(list.len().saturating_sub(1)).unwrap_or(u32::MAX),
            })
        })
    }

    async fn wait_events(
        &self,
        id: Option<&TaskId>,
        after: Option<&EventCursor>,
        timeout: Duration,
    ) {
        // Subscribed before looking, so an entry added after the look still wakes it.
        let mut changed = self.events.subscribe();
        let now = now_ms();
        let newest = self.with(|s| match id {
            Some(id) => s
                .task(id.as_str(), now)
                .and_then(|t| t.events.back().map(|e| e.0)),
            None => s.firehose.back().map(|e| e.0),
        });
        let later = |newest: EntryId, a: &EventCursor| match id {
            Some(_) => newest.seq > a.entry.seq,
            None => newest > a.entry,
        };
        if let Ok(Some(newest)) = newest
            && after.is_none_or(|a| later(newest, a))
        {
            return;
        }
        let _ = tokio::time::timeout(timeout, changed.changed()).await;
    }

    async fn progress(&self, p: &StepProgress) -> Result<ProgressOutcome, StoreError> {
        let messages = serde_json::to_value(&p.messages)
            .map_err(|e| StoreError::Corrupt(format!("progress messages: {e}")))?;
        let now = now_ms();
        self.with(|s| {
            let Some(t) = s.task(p.task_id.as_str(), now) else {
                return ProgressOutcome::Discarded;
            };
            let Some(st) = t.steps.get(p.step as usize) else {
                return ProgressOutcome::Discarded;
            };
            if t.status.is_terminal()
                || st.status != StepStatus::Dispatched
                || st.attempt != p.attempt
                || st.worker.as_ref() != Some(&p.worker_id)
            {
                return ProgressOutcome::Discarded;
            }
            if t.progress_events >= MAX_PROGRESS_EVENTS {
                return ProgressOutcome::Limited;
            }
            t.progress_events += 1;
            let event = serde_json::json!({
                "type": kinds::STEP_PROGRESS,
                "step": st.id,
                "slot": p.step,
                "attempt": p.attempt,
                "worker_id": p.worker_id,
                "messages": messages,
            });
            s.append(p.task_id.as_str(), vec![event], false, now);
            ProgressOutcome::Recorded
        })
    }
}

#[async_trait]
impl search::Lookup for MemoryStore {
    async fn index_range(
        &self,
        lower: &str,
        upper: &str,
        rev: bool,
        count: usize,
    ) -> Result<Vec<String>, StoreError> {
        use std::ops::Bound::{Excluded, Included};
        if lower >= upper {
            return Ok(Vec::new());
        }
        self.with(|s| {
            let range = s.index.range::<str, _>((Included(lower), Excluded(upper)));
            if rev {
                range.rev().take(count).cloned().collect()
            } else {
                range.take(count).cloned().collect()
            }
        })
    }

    async fn indexed(&self, ids: &[TaskId]) -> Result<Vec<Option<search::Indexed>>, StoreError> {
        let now = now_ms();
        self.with(|s| {
            ids.iter()
                .map(|id| {
                    s.task(id.as_str(), now).map(|t| search::Indexed {
                        client: t.client.clone(),
                        status: t.status,
                        pipeline: t.pipeline.clone(),
                        created_at: t.created,
                        finished_at: t.finished,
                        steps: u32::try_from(t.declared).unwrap_or(u32::MAX),
                    })
                })
                .collect()
        })
    }

    async fn unindex(&self, members: &[String]) -> Result<(), StoreError> {
        self.with(|s| {
            for m in members {
                s.index.remove(m);
            }
        })
    }

    async fn dead_range(
        &self,
        capability: &Capability,
        max: u64,
        offset: usize,
        count: usize,
    ) -> Result<Vec<(TaskId, u64)>, StoreError> {
        self.with(|s| {
            let mut entries: Vec<(u64, String)> = s
                .dead
                .get(capability.as_str())
                .map(|d| {
                    d.iter()
                        .filter(|(_, at)| **at <= max)
                        .map(|(id, at)| (*at, id.clone()))
                        .collect()
                })
                .unwrap_or_default();
            // As ZREVRANGEBYSCORE: newest first, equal times by member descending.
            entries.sort_by(|a, b| b.cmp(a));
            entries
                .into_iter()
                .skip(offset)
                .take(count)
                .filter_map(|(at, id)| Some((TaskId::new(id).ok()?, at)))
                .collect()
        })
    }

    async fn failures(&self, ids: &[TaskId]) -> Result<Vec<Option<search::Failure>>, StoreError> {
        let now = now_ms();
        self.with(|s| {
            ids.iter()
                .map(|id| {
                    s.task(id.as_str(), now).map(|t| search::Failure {
                        client: t.client.clone(),
                        step: t.failed_step.clone(),
                        error: t.error.clone(),
                    })
                })
                .collect()
        })
    }
}

/// What a claimed slot is sent (rule 11): its input, and the outcomes of the steps it
/// needs (a map instance: its element, and its map step's needs).
fn work_request(
    t: &Task,
    step: u32,
    capability: &Capability,
    worker: &WorkerId,
    now: u64,
) -> WorkRequest {
    let st = &t.steps[step as usize];
    let previous: Vec<PriorOutput> = st
        .needs
        .iter()
        .filter_map(|&n| {
            let need = t.steps.get(n as usize)?;
            let failed = need.status == StepStatus::Failed;
            Some(PriorOutput {
                step: n,
                id: need.id.clone(),
                capability: need.capability.clone(),
                status: need.status,
                output: if need.status == StepStatus::Succeeded {
                    need.output.clone().unwrap_or(Value::Null)
                } else {
                    Value::Null
                },
                error: if failed { need.error.clone() } else { None },
            })
        })
        .collect();
    let input = match (&st.element, previous.as_slice()) {
        (Some((_, element)), _) => element.clone(),
        (None, []) => t.input.clone(),
        (None, [one]) => one.output.clone(),
        (None, several) => Value::Object(
            several
                .iter()
                .map(|p| (p.id.clone(), p.output.clone()))
                .collect(),
        ),
    };
    WorkRequest {
        task_id: t.id.clone(),
        step,
        attempt: st.attempt,
        capability: capability.clone(),
        input,
        context: StepContext {
            task_input: t.input.clone(),
            previous,
            pipeline: t.pipeline.clone(),
            total_steps: t.declared as u32,
            step_id: Some(st.id.clone()),
            element_index: st.element.as_ref().map(|(i, _)| *i),
        },
        deadline_ms: now + st.timeout_ms,
        worker_id: Some(worker.clone()),
        request_id: None,
    }
}

/// One slot as `GET /task/{id}` shows it (without instances).
fn step_view(t: &Task, slot: u32) -> StepView {
    let st = &t.steps[slot as usize];
    let (kind, router, wait, sleep_ms) = match &st.kind {
        Kind::Work { router, .. } => (StepKind::Work, *router, None, None),
        Kind::Wait {
            signal,
            timeout_ms,
            on_timeout,
        } => (
            StepKind::Wait,
            false,
            Some(WaitView {
                signal: signal.clone(),
                timeout_ms: *timeout_ms,
                on_timeout: *on_timeout,
            }),
            None,
        ),
        Kind::Sleep { ms } => (StepKind::Sleep, false, None, Some(*ms)),
    };
    StepView {
        index: slot,
        id: st.id.clone(),
        kind,
        capability: st.capability.clone(),
        // An instance's needs are its map step's (it gets their outcomes when claimed);
        // the view shows them once, on the map step.
        needs: st
            .needs
            .iter()
            .filter(|_| st.parent.is_none())
            .filter_map(|n| t.steps.get(*n as usize).map(|s| s.id.clone()))
            .collect(),
        router,
        allow_failure: st.allow_failure,
        map: st.map().map(|plan| MapView {
            over: plan.over.clone(),
            concurrency: plan.concurrency,
            total: st.fan.map(|f| f.total),
            finished: st.fan.map_or(0, |f| f.done),
        }),
        instances: Vec::new(),
        element_index: st.element.as_ref().map(|(i, _)| *i),
        wait,
        sleep_ms,
        wakes_at_ms: st.wakes_at.filter(|_| st.status == StepStatus::Waiting),
        status: st.status,
        worker_id: st.worker.clone(),
        attempts: st.tries,
        output: st.output.clone(),
        error: st.error.clone(),
        queued_at_ms: st.queued,
        dispatched_at_ms: st.dispatched,
        finished_at_ms: st.finished,
        usage: None,
    }
}

/// The declared steps, each map step with its instances in element order.
fn declared_views(t: &Task) -> Vec<StepView> {
    (0..t.declared as u32)
        .map(|slot| {
            let mut view = step_view(t, slot);
            if let Some(fan) = t.steps[slot as usize].fan {
                view.instances = (fan.first..fan.first + fan.total)
                    .filter(|i| (*i as usize) < t.steps.len())
                    .map(|i| step_view(t, i))
                    .collect();
            }
            view
        })
        .collect()
}

/// `release` on the state (its events are made around it).
fn release(s: &mut State, step: &StepRef, why: ReleaseReason, now: u64) -> ReleaseOutcome {
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
    let Some(cap) = st.capability.clone() else {
        return ReleaseOutcome::Stale;
    };
    if why == ReleaseReason::Failure {
        st.free_failures += 1;
        if st.free_failures > MAX_FREE_DISPATCH_FAILURES {
            st.free_failures = 0;
            return ReleaseOutcome::OverLimit;
        }
    }
    st.status = StepStatus::Queued;
    st.tries = st.tries.saturating_sub(1);
    let (worker, queued) = (st.worker.clone(), st.queued);
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
}

/// A `signal.received` event (graph.lua: `G.signal`).
fn signal_event(task: &Task, slot: u32, name: &str, buffered: bool) -> Value {
    let mut e = serde_json::json!({
        "type": kinds::SIGNAL_RECEIVED,
        "step": task.steps[slot as usize].id,
        "slot": slot,
        "signal": name,
    });
    if buffered {
        e["buffered"] = true.into();
    }
    e
}

/// Puts `value` in an event as `name`, or `truncated` when its JSON is over
/// [`MAX_EVENT_VALUE_BYTES`] (what `lib.lua`'s `ev_value` does).
fn insert_json<T: serde::Serialize>(
    e: &mut serde_json::Map<String, Value>,
    name: &str,
    value: Option<&T>,
) {
    let Some(value) = value else { return };
    let Ok(v) = serde_json::to_value(value) else {
        return;
    };
    if v.to_string().len() > MAX_EVENT_VALUE_BYTES {
        e.insert("truncated".into(), true.into());
    } else {
        e.insert(name.into(), v);
    }
}

fn record(t: &Task) -> TaskRecord {
    let steps = declared_views(t);
    let result = (t.status == TaskStatus::Succeeded).then(|| graph_result(&steps));
    let mut view = TaskView {
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
        usage: t.budget.clone().map(|budget| common::usage::UsageSummary {
            total: common::usage::Usage::default(),
            budget: Some(budget),
        }),
        callback: t.callback_url.as_ref().map(|url| {
            let d = t.delivery.as_ref();
            CallbackView {
                url: url.clone(),
                status: d.map_or(CallbackStatus::Pending, |d| d.status),
                attempts: d.map_or(0, |d| d.attempts),
                last_error: d.and_then(|d| d.last_error.clone()),
            }
        }),
    };
    derive_waiting(&mut view);
    TaskRecord {
        view,
        client: t.client.clone(),
        callback_url: t.callback_url.clone(),
        request_id: t.request_id.clone(),
    }
}

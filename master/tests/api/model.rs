//! Model-based test of the task store: random operation sequences run in lockstep on the
//! Redis store (a real redis-server), the in-memory store and a reference model of what a
//! store must do. The operations: submit (idempotency keys per client, a rate-limited
//! client), claim (a step lost on a worker goes to another one), reports from the worker
//! holding the lease and from others, fresh or stale, repeated (replayed when recorded),
//! release (capacity, or failed dispatches up to the free limit), lease expiry with the
//! dispatcher's lapse reports, lease extension, retry promotion, cancel, redrive, and the
//! completion-callback outbox (claim, finish). Every answer of both stores is compared
//! field by field with the model's, and after every operation so is every task's view, the
//! queue figures, worker loads, dead letters, pending callbacks and remembered
//! capabilities. The model itself checks that no task is lost (a live task has an active
//! step, a pending step waits for a need, a started one had all it needs) and that an
//! attempt's outcome is recorded once.
//!
//! Tasks are small random graphs (docs/workflows.md): chains, several roots, joins, steps
//! whose failure is allowed, routers, whose successful reports name some of their
//! dependants in `next` (sometimes none, or an unknown id), map steps over the task input
//! or over a need's output, wait steps released by signals or timing out, and sleeps.
//! Signals (delivered, buffered, unknown, repeated) and timer firings are operations like
//! the others. The model follows the spec's rules on its own (`Cascade`): what a
//! transition queues, what is skipped, what a failure stops, what a redrive runs again,
//! and the task's result.
//!
//! `MODEL_TEST_MEMORY_ONLY=1` runs a second memory store in place of the Redis one, for
//! when a change has reached the memory store and the model but not the Lua yet.
//!
//! Time. The stores read real clocks (Redis `TIME`, the process clock), so the test cannot
//! stop time. It keeps instead, for every operation, the window `[start, end]` of its own
//! clock the operation ran in, and the model keeps windows where a store keeps instants:
//! a timestamp a store returns must fall in the window of the operation the model says set
//! it (it is then shown as [`IN_WINDOW`]; outside, the raw value stays and the comparison
//! fails). Whatever depends on comparing two instants (a lease or a backoff running out,
//! the rate limit's next free slot, two steps queued in the same millisecond) is made
//! unambiguous by waiting: every operation starts in a millisecond after the previous one
//! ended, and never within [`MARGIN_MS`] before (or inside) an instant it depends on.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::Mutex;
use std::time::Duration;

use common::redis::RedisPool;
use common::wire::{
    CallbackStatus, CallbackView, Capability, MapView, OnTimeout, PriorOutput, ReportStatus,
    ResultReport, StepContext, StepError, StepKind, StepRef, StepStatus, StepView, TaskId,
    TaskStatus, TaskView, WaitView, WorkRequest, WorkerId, now_ms,
};
use master::store::{
    Advance, CALLBACK_ABANDONED, CallbackClaim, CallbackResult, CancelOutcome, Claimed,
    ExpiredLease, Finished, FinishedStep, FiredTimer, MAX_FREE_DISPATCH_FAILURES, MapPlan,
    MemoryStore, NewTask, PlannedKind, PlannedStep, QueueStats, RateLimit, RedisStore,
    RedriveOutcome, ReleaseOutcome, ReleaseReason, ReportOutcome, RetryPolicy, SignalOutcome,
    SubmitOutcome, TaskRecord, TaskStore, derive_waiting, graph_result, lease_expired_error,
};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};
use testkit::RedisServer;

const CAPS: [&str; 2] = ["plan", "retrieve"];
/// Clients; the last one submits under [`RATE`], the others without a limit.
const CLIENTS: [&str; 3] = ["alice", "bob", "rated"];
const RATED: usize = 2;
/// One submission per 100 ms, two at once: a third quick submission is limited.
const RATE: RateLimit = RateLimit {
    per_sec: 10.0,
    burst: 2,
};
const RATE_INTERVAL_MS: u64 = 100;
const NO_LIMIT: RateLimit = RateLimit {
    per_sec: 0.0,
    burst: 1,
};
const WORKERS: [&str; 3] = ["w0", "w1", "w2"];
/// A worker that never holds a lease.
const INTRUDER: &str = "intruder";
const PIPELINE: &str = "pipe";
const RETENTION: Duration = Duration::from_secs(3600);
/// Backoffs of 25–50, 50–100, 100–200 and 200–400 ms: long enough that a test sequence
/// sees some run out and some not.
const RETRY: RetryPolicy = RetryPolicy {
    base: Duration::from_millis(50),
    max: Duration::from_millis(400),
};
const LEASE_MS: u64 = 60;
const LEASE: Duration = Duration::from_millis(LEASE_MS);
/// How long an operation may take at most without making a time comparison ambiguous.
const MARGIN_MS: u64 = 20;
/// Stands for a timestamp that was inside the window the model expects it in.
const IN_WINDOW: u64 = u64::MAX;

/// Error kinds that say an attempt was lost on its worker rather than failed by the agent:
/// the retry prefers another worker, and the report is not remembered for replays.
const LOST_KINDS: [&str; 3] = ["lease_expired", "dispatch_refused", "dispatch_failed"];
/// JSON carried in inputs and outputs, chosen to catch lossy storage: the separators the
/// Redis layout uses, extreme numbers, control characters and non-ASCII text, nesting.
const PAYLOADS: [&str; 10] = [
    r#"0"#,
    r#""pipe|colon:comma,brace{}""#,
    r#"18446744073709551615"#,
    r#"-9223372036854775808"#,
    r#"0.1"#,
    r#"1e-300"#,
    r#"[null, true, {"nested": ["a", {"b": []}]}]"#,
    r#""nul \u0000, tab \t, é ✓ 𝄞""#,
    r#"null"#,
    r#"{}"#,
];

#[derive(Debug, Clone, Copy)]
enum Verdict {
    /// Succeeds with an output carrying `PAYLOADS[payload]`; a router's output also has
    /// a `next` naming the dependants whose bits are set in `route` (none: no `next`), and
    /// with bit 7 an id that is not one of them.
    Succeed {
        payload: usize,
        route: u8,
    },
    Fail {
        retryable: bool,
    },
    /// A failure without an error (the store records a permanent one).
    Bare,
    /// A retryable failure of a kind in [`LOST_KINDS`].
    Lost {
        kind: usize,
    },
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        client: usize,
        /// An idempotency key (`k0`, `k1`), per client.
        key: Option<usize>,
        steps: Vec<usize>,
        /// Per step: which earlier steps it needs ([`CHAIN`]: the one before it; a bit
        /// mask otherwise, 0 a root; the first step is a root), whether its failure is
        /// allowed, whether it is a router (when something needs it), and its map: 0-2
        /// none, 3 and 4 over the input's `items` with a concurrency of 1 and 2, 5 over
        /// its first need's `payload` (not always an array); or not a worker step: 6 a
        /// wait for the signal `s<i>` for an hour, 7 for [`SHORT_WAIT_MS`] (timing out,
        /// failing or continuing as `allow` says), 8 a sleep of [`SHORT_WAIT_MS`].
        links: Vec<(u8, bool, bool, u8)>,
        priority: i32,
        max_attempts: u32,
        timeout_s: u64,
        callback: bool,
        pipeline: bool,
    },
    Claim {
        cap: usize,
        n: usize,
        first_worker: usize,
    },
    /// A report for a leased attempt (`stale`: for any attempt ever handed out), from the
    /// worker it was handed to (`holder`) or from [`INTRUDER`].
    Report {
        pick: usize,
        stale: bool,
        holder: bool,
        verdict: Verdict,
        jitter: f64,
    },
    /// Sends a report sent before again, as a worker retrying its delivery does.
    Repeat {
        pick: usize,
    },
    /// Gives a leased attempt (`stale`: any attempt ever handed out) back, for a worker
    /// that refused it (`failure`: the dispatch failed; else it was full).
    Release {
        pick: usize,
        stale: bool,
        failure: bool,
    },
    /// Claims the head of a capability's queue and gives it back, `times` over, as the
    /// dispatcher does with a worker that keeps refusing; past the free failures it spends
    /// the attempt with a `dispatch_failed` report.
    Bounce {
        cap: usize,
        times: usize,
        failure: bool,
        jitter: f64,
    },
    /// Lists lapsed leases; with `lapse`, records them as failed, as the dispatcher does.
    ExpireLeases {
        cap: usize,
        limit: usize,
        lapse: bool,
        jitter: f64,
        /// First wait for the next lease to run out.
        wait: bool,
    },
    /// Extends leases (picked among all leased steps, so some are of the other capability).
    Extend {
        cap: usize,
        picks: Vec<usize>,
        /// As from a heartbeat so old that the new expiry is already past.
        old: bool,
    },
    Cancel {
        pick: usize,
    },
    Redrive {
        pick: usize,
    },
    /// Promotes due retries of every capability (`wait`: first wait for the next backoff
    /// to end).
    Promote {
        wait: bool,
    },
    /// The rate-limited client submits `n` one-step tasks back to back.
    Burst {
        n: usize,
    },
    /// Claims due completion callbacks, as the callback sender does.
    ClaimCallbacks {
        limit: usize,
        visibility_ms: u64,
        max_attempts: u32,
    },
    /// Ends a claimed callback delivery attempt (`result`: delivered, retry, failed).
    FinishCallback {
        pick: usize,
        result: usize,
        delay_ms: u64,
    },
    /// A signal to a task (mostly one with a wait step): `name` picks one of its wait
    /// steps' signals, or one nothing listens for.
    Signal {
        pick: usize,
        name: usize,
        payload: usize,
    },
    /// Fires due wait and sleep timers (`wait`: first wait for the next one).
    FireTimers {
        limit: usize,
        wait: bool,
    },
    Wait {
        ms: u64,
    },
}

fn verdict() -> impl Strategy<Value = Verdict> {
    prop_oneof![
        4 => (
            0..PAYLOADS.len(),
            prop_oneof![2 => Just(0x7fu8), 3 => 1..4u8, 1 => any::<u8>()]
        )
            .prop_map(|(payload, route)| Verdict::Succeed { payload, route }),
        2 => any::<bool>().prop_map(|retryable| Verdict::Fail { retryable }),
        2 => (0..LOST_KINDS.len()).prop_map(|kind| Verdict::Lost { kind }),
        1 => Just(Verdict::Bare),
    ]
}

/// A backoff jitter in [0, 1): any, or a round fraction (where the Rust and the Lua
/// arithmetic are most likely to round differently).
fn jitter() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => 0.0..1.0f64,
        1 => (0..40u32).prop_map(|k| f64::from(k) / 40.0),
    ]
}

/// The `cap` of a wait or sleep step (it has none).
const NO_CAP: usize = usize::MAX;

/// How long the short waits and sleeps last.
const SHORT_WAIT_MS: u64 = 40;

/// Needs mask meaning "the step before" (a chain link).
const CHAIN: u8 = u8::MAX;

/// How a step links to the earlier ones (see [`Op::Submit`]): mostly a chain.
fn link() -> impl Strategy<Value = (u8, bool, bool, u8)> {
    (
        prop_oneof![2 => Just(CHAIN), 1 => Just(1u8), 2 => 0..16u8],
        prop::bool::weighted(0.4),
        prop::bool::weighted(0.4),
        prop_oneof![6 => 0..6u8, 1 => 6..9u8],
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (
            (0..3usize, prop::option::weighted(0.4, 0..2usize)),
            (
                prop::collection::vec(0..2usize, 1..5),
                prop::collection::vec(link(), 4),
            ),
            -2..3i32,
            1..4u32,
            1..60u64,
            any::<bool>(),
            prop::bool::weighted(0.2),
        )
            .prop_map(
                |(
                    (client, key),
                    (steps, links),
                    priority,
                    max_attempts,
                    timeout_s,
                    callback,
                    pipeline,
                )| {
                    let links = links[..steps.len()].to_vec();
                    Op::Submit {
                        client,
                        key,
                        steps,
                        links,
                        priority,
                        max_attempts,
                        timeout_s,
                        callback,
                        pipeline,
                    }
                }
            ),
        5 => (0..2usize, 1..4usize, 0..3usize)
            .prop_map(|(cap, n, first_worker)| Op::Claim { cap, n, first_worker }),
        9 => (
            any::<usize>(),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.85),
            verdict(),
            jitter(),
        )
            .prop_map(|(pick, stale, holder, verdict, jitter)| Op::Report {
                pick,
                stale,
                holder,
                verdict,
                jitter,
            }),
        1 => any::<usize>().prop_map(|pick| Op::Repeat { pick }),
        1 => (any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(pick, stale, failure)| Op::Release { pick, stale, failure }),
        1 => (0..2usize, 1..7usize, prop::bool::weighted(0.8), jitter())
            .prop_map(|(cap, times, failure, jitter)| Op::Bounce { cap, times, failure, jitter }),
        3 => (
            0..2usize,
            prop_oneof![Just(1usize), Just(2), Just(500)],
            prop::bool::weighted(0.7),
            jitter(),
            prop::bool::weighted(0.4),
        )
            .prop_map(|(cap, limit, lapse, jitter, wait)| Op::ExpireLeases {
                cap,
                limit,
                lapse,
                jitter,
                wait,
            }),
        1 => (0..2usize, prop::collection::vec(any::<usize>(), 1..3), prop::bool::weighted(0.3))
            .prop_map(|(cap, picks, old)| Op::Extend { cap, picks, old }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Redrive { pick }),
        3 => prop::bool::weighted(0.4).prop_map(|wait| Op::Promote { wait }),
        1 => (2..5usize).prop_map(|n| Op::Burst { n }),
        2 => (prop_oneof![Just(1usize), Just(500)], 20..100u64, 1..4u32).prop_map(
            |(limit, visibility_ms, max_attempts)| Op::ClaimCallbacks {
                limit,
                visibility_ms,
                max_attempts,
            }
        ),
        2 => (any::<usize>(), 0..3usize, 10..80u64).prop_map(|(pick, result, delay_ms)| {
            Op::FinishCallback {
                pick,
                result,
                delay_ms,
            }
        }),
        2 => (any::<usize>(), 0..5usize, 0..PAYLOADS.len())
            .prop_map(|(pick, name, payload)| Op::Signal { pick, name, payload }),
        2 => (prop_oneof![Just(1usize), Just(100)], prop::bool::weighted(0.5))
            .prop_map(|(limit, wait)| Op::FireTimers { limit, wait }),
        3 => (10..150u64).prop_map(|ms| Op::Wait { ms }),
    ]
}

fn payload_json(i: usize) -> Value {
    serde_json::from_str(PAYLOADS[i % PAYLOADS.len()]).unwrap()
}

fn cap(i: usize) -> Capability {
    Capability::new(CAPS[i]).unwrap()
}

fn worker(name: &str) -> WorkerId {
    WorkerId::new(name).unwrap()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap()
}

/// A span of the test's clock (ms since the epoch, both ends included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    start: u64,
    end: u64,
}

impl Window {
    fn later(self, ms: u64) -> Self {
        Self {
            start: self.start + ms,
            end: self.end + ms,
        }
    }

    fn earlier(self, ms: u64) -> Self {
        Self {
            start: self.start.saturating_sub(ms),
            end: self.end.saturating_sub(ms),
        }
    }

    fn contains(self, t: u64) -> bool {
        self.start <= t && t <= self.end
    }

    /// Whether all of `self` is before all of `other`.
    fn before(self, other: Window) -> bool {
        self.end < other.start
    }
}

/// A timestamp a store returned, checked against the window the model expects it in.
fn stamp(got: u64, want: Option<Window>) -> u64 {
    match want {
        Some(w) if w.contains(got) => IN_WINDOW,
        _ => got,
    }
}

fn opt_stamp(got: Option<u64>, want: Option<Window>) -> Option<u64> {
    got.map(|g| stamp(g, want))
}

/// The test's clock: every operation runs in a millisecond of its own, away from the
/// instants it depends on.
#[derive(Default)]
struct Clock {
    last_end: u64,
}

impl Clock {
    /// Waits until an operation that depends on the instants in `avoid` may start.
    async fn begin(&mut self, avoid: &[Window]) -> u64 {
        loop {
            let now = now_ms();
            if now <= self.last_end {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            if let Some(w) = avoid
                .iter()
                .find(|w| now + MARGIN_MS >= w.start && now <= w.end)
            {
                tokio::time::sleep(Duration::from_millis(w.end + 1 - now)).await;
                continue;
            }
            return now;
        }
    }

    /// The window the operation ran in; it must not have run into an instant it avoided.
    fn end(&mut self, start: u64, avoid: &[Window], op: &dyn Debug) -> Window {
        let end = now_ms();
        for w in avoid {
            assert!(
                end < w.start || start > w.end,
                "{op:?} ran {start}..={end}, across {w:?}: it took longer than the test's \
                 margin of {MARGIN_MS} ms, so the stores may legitimately disagree"
            );
        }
        self.last_end = end;
        Window { start, end }
    }
}

#[derive(Debug, Clone)]
struct ModelStep {
    id: String,
    cap: usize,
    /// The steps it needs, and the ones that need it (slot order).
    needs: Vec<usize>,
    dependants: Vec<usize>,
    allow_failure: bool,
    router: bool,
    /// Needs not finished yet, and how many finished skipped.
    open_needs: usize,
    skipped_needs: usize,
    /// A router it needs did not pick it.
    routed_out: bool,
    /// A map step's fan-out as planned, and once expanded its instances: first slot,
    /// how many, the next to queue, how many finished.
    map: Option<MapPlan>,
    fan: Option<(usize, usize, usize, usize)>,
    /// A wait step's signal, timeout and what a timeout does; a sleep's length.
    wait: Option<(String, u64, OnTimeout)>,
    sleep_ms: Option<u64>,
    /// When a waiting wait or sleep step's timer fires.
    wakes: Option<Window>,
    /// An instance's map step, and its element index and element.
    parent: Option<usize>,
    element: Option<(u32, Value)>,
    status: StepStatus,
    /// The last attempt handed out (the fencing token).
    attempt: u32,
    /// Attempts spent (a released attempt is given back; a redrive starts again).
    tries: u32,
    max_attempts: u32,
    timeout_ms: u64,
    worker: Option<WorkerId>,
    output: Option<Value>,
    error: Option<StepError>,
    /// When it was last queued; for a retry, when its backoff ends.
    queued: Option<Window>,
    dispatched: Option<Window>,
    finished: Option<Window>,
    /// Queued but waiting out a retry backoff (until `queued`), not yet promoted.
    backoff: bool,
    /// When its lease runs out, while leased.
    lease: Option<Window>,
    /// The worker its last attempt was lost on: the next claim prefers another.
    avoid: Option<WorkerId>,
    /// Failed dispatches given back free since the last time the limit was hit.
    free_failures: u32,
    /// The last report recorded from its worker (not for lost attempts), for replays.
    last_record: Option<Recorded>,
}

/// A recorded report: who reported what, and the answer (with the window of its dispatch
/// stamp).
#[derive(Debug, Clone)]
struct Recorded {
    attempt: u32,
    worker: WorkerId,
    status: ReportStatus,
    answer: (ReportOutcome, Option<Window>),
}

#[derive(Debug, Clone)]
struct ModelTask {
    id: TaskId,
    client: usize,
    pipeline: bool,
    priority: i32,
    input: Value,
    callback: bool,
    request_id: String,
    status: TaskStatus,
    error: Option<StepError>,
    created: Window,
    started: Option<Window>,
    finished: Option<Window>,
    /// When it was dead-lettered and under which capability, while it is.
    dead: Option<(Window, usize)>,
    steps: Vec<ModelStep>,
    /// Steps not finished yet: at 0 the task has succeeded.
    open: usize,
    /// The steps nothing needs: the result comes from them.
    sinks: Vec<usize>,
    /// Declared steps (map instances come after them).
    declared: usize,
    /// Signals that came before their wait step was reached.
    buffered: HashMap<String, Value>,
    /// The completion callback's delivery since the task last finished.
    delivery: Option<Delivery>,
    /// When its callback is due in the outbox, while it is there.
    outbox: Option<Window>,
}

/// Where a finished task's completion callback stands.
#[derive(Debug, Clone)]
struct Delivery {
    status: CallbackStatus,
    /// Delivery attempts claimed: the fencing token of `finish_callback`.
    attempts: u32,
    last_error: Option<String>,
}

impl ModelTask {
    /// The task finished: its callback (if it has one) is due now.
    fn queue_callback(&mut self, w: Window) {
        if self.callback {
            self.delivery = Some(Delivery {
                status: CallbackStatus::Pending,
                attempts: 0,
                last_error: None,
            });
            self.outbox = Some(w);
        }
    }
}

/// One transition of a model task: the graph rules of docs/workflows.md for worker steps
/// (needs, routers, allowed failures), written from the spec, not from a store.
struct Cascade<'a> {
    t: &'a mut ModelTask,
    w: Window,
    /// Capabilities queued, in order, each once.
    queued: Vec<Capability>,
    /// The task failed in this transition.
    failed: bool,
}

impl Cascade<'_> {
    fn queue(&mut self, i: usize) {
        let s = &mut self.t.steps[i];
        s.status = StepStatus::Queued;
        s.queued = Some(self.w);
        s.backoff = false;
        let c = cap(s.cap);
        if !self.queued.contains(&c) {
            self.queued.push(c);
        }
    }

    /// A step whose needs all finished: skipped, or queued.
    fn resolve(&mut self, d: usize) {
        let s = &self.t.steps[d];
        if s.routed_out || s.skipped_needs >= s.needs.len() {
            let s = &mut self.t.steps[d];
            s.status = StepStatus::Skipped;
            s.finished = Some(self.w);
            self.finish(d, true);
        } else {
            self.ready(d);
        }
    }

    /// A worker step is queued; a map step expands.
    fn ready(&mut self, d: usize) {
        if self.failed {
            return;
        }
        let s = &self.t.steps[d];
        if let Some((signal, timeout_ms, _)) = s.wait.clone() {
            match self.t.buffered.remove(&signal) {
                Some(payload) => self.succeed(d, payload),
                None => self.timer(d, timeout_ms),
            }
        } else if let Some(ms) = s.sleep_ms {
            self.timer(d, ms);
        } else if let Some(plan) = s.map.clone() {
            self.expand(d, &plan);
        } else {
            self.queue(d);
        }
    }

    /// A wait or sleep step starts waiting; the task is running from now.
    fn timer(&mut self, d: usize, ms: u64) {
        let s = &mut self.t.steps[d];
        s.status = StepStatus::Waiting;
        s.wakes = Some(self.w.later(ms));
        if self.t.status == TaskStatus::Queued {
            self.t.status = TaskStatus::Running;
            self.t.started.get_or_insert(self.w);
        }
    }

    /// One instance per element of the map step's array; the first `concurrency` queued.
    fn expand(&mut self, m: usize, plan: &MapPlan) {
        let source = match plan.from {
            None => Some(&self.t.input),
            Some(n) => self.t.steps[n as usize].output.as_ref(),
        };
        let elements = source
            .and_then(|v| plan.path.iter().try_fold(v, |at, key| at.get(key)))
            .and_then(Value::as_array)
            .cloned();
        let Some(elements) = elements else {
            let message = format!("`map.over` ({}) does not lead to an array", plan.over);
            return self.fail_for_good(m, StepError::permanent("map_source", message));
        };
        let first = self.t.steps.len();
        if elements.is_empty() {
            let s = &mut self.t.steps[m];
            s.status = StepStatus::Succeeded;
            s.output = Some(json!([]));
            s.finished = Some(self.w);
            return self.finish(m, false);
        }
        let total = elements.len();
        let width = total.min(plan.concurrency as usize);
        for (k, element) in elements.into_iter().enumerate() {
            let map_step = &self.t.steps[m];
            let instance = ModelStep {
                id: format!("{}[{k}]", map_step.id),
                dependants: Vec::new(),
                allow_failure: false,
                router: false,
                open_needs: 0,
                skipped_needs: 0,
                map: None,
                fan: None,
                parent: Some(m),
                element: Some((k as u32, element)),
                status: StepStatus::Pending,
                queued: None,
                finished: None,
                ..map_step.clone()
            };
            self.t.steps.push(instance);
        }
        let s = &mut self.t.steps[m];
        s.status = StepStatus::Running;
        s.fan = Some((first, total, width, 0));
        for i in first..first + width {
            self.queue(i);
        }
    }

    /// An instance finished: its map step counts it, queues the next one, and succeeds
    /// with the outputs in element order when all have.
    fn instance_done(&mut self, p: usize) {
        if self.t.steps[p].status != StepStatus::Running {
            return;
        }
        let Some((first, total, mut next, mut done)) = self.t.steps[p].fan else {
            return;
        };
        done += 1;
        if next < total && !self.failed {
            self.queue(first + next);
            next += 1;
        }
        self.t.steps[p].fan = Some((first, total, next, done));
        if done < total {
            return;
        }
        let outputs: Vec<Value> = self.t.steps[first..first + total]
            .iter()
            .map(|s| match s.status {
                StepStatus::Succeeded => s.output.clone().unwrap_or(Value::Null),
                _ => json!({ "error": s.error }),
            })
            .collect();
        let s = &mut self.t.steps[p];
        s.status = StepStatus::Succeeded;
        s.output = Some(Value::Array(outputs));
        s.finished = Some(self.w);
        self.finish(p, false);
    }

    fn finish(&mut self, i: usize, skipped: bool) {
        if let Some(p) = self.t.steps[i].parent {
            return self.instance_done(p);
        }
        self.t.open -= 1;
        if self.failed {
            return;
        }
        for d in self.t.steps[i].dependants.clone() {
            let s = &mut self.t.steps[d];
            if s.status != StepStatus::Pending {
                continue;
            }
            s.open_needs -= 1;
            s.skipped_needs += usize::from(skipped);
            if s.open_needs == 0 {
                self.resolve(d);
            }
        }
    }

    fn succeed(&mut self, i: usize, output: Value) {
        let s = &mut self.t.steps[i];
        s.status = StepStatus::Succeeded;
        s.output = Some(output.clone());
        s.finished = Some(self.w);
        if s.router && !self.route(i, &output) {
            return;
        }
        self.finish(i, false);
    }

    /// A router's `next` must name dependants; the others are routed out.
    fn route(&mut self, i: usize, output: &Value) -> bool {
        let picks: Vec<&str> = match output.get("next") {
            Some(Value::String(one)) => vec![one.as_str()],
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let deps = self.t.steps[i].dependants.clone();
        let ids: Vec<String> = deps.iter().map(|d| self.t.steps[*d].id.clone()).collect();
        let bad = if let Some(p) = picks.iter().find(|p| !ids.iter().any(|id| id == *p)) {
            Some(format!(
                "the router picked `{p}`, which is not one of its successors"
            ))
        } else if picks.is_empty() {
            Some(
                "a router must answer an output with `next`: a successor id or a list of them"
                    .to_string(),
            )
        } else {
            None
        };
        if let Some(message) = bad {
            self.fail_for_good(i, StepError::permanent("route", message));
            return false;
        }
        for (d, id) in deps.into_iter().zip(ids) {
            if !picks.contains(&id.as_str()) {
                self.t.steps[d].routed_out = true;
            }
        }
        true
    }

    fn fail_for_good(&mut self, i: usize, e: StepError) {
        let s = &mut self.t.steps[i];
        s.status = StepStatus::Failed;
        s.error = Some(e.clone());
        s.finished = Some(self.w);
        let (parent, c) = (s.parent, s.cap);
        if let Some(p) = parent {
            let map_step = &mut self.t.steps[p];
            if map_step.allow_failure {
                return self.instance_done(p);
            }
            map_step.status = StepStatus::Failed;
            map_step.error = Some(e.clone());
            map_step.finished = Some(self.w);
        } else if s.allow_failure {
            return self.finish(i, false);
        }
        if self.failed {
            return;
        }
        self.failed = true;
        self.t.status = TaskStatus::Failed;
        self.t.error = Some(e);
        self.t.finished = Some(self.w);
        if c != NO_CAP {
            self.t.dead = Some((self.w, c));
        }
    }

    /// Every queued or dispatched step (and running map step) becomes `cancelled`.
    fn stop_all(&mut self, e: &StepError) {
        for s in &mut self.t.steps {
            if matches!(
                s.status,
                StepStatus::Queued
                    | StepStatus::Dispatched
                    | StepStatus::Running
                    | StepStatus::Waiting
            ) {
                s.wakes = None;
                s.status = StepStatus::Cancelled;
                s.error = Some(e.clone());
                s.finished = Some(self.w);
                s.lease = None;
                s.backoff = false;
            }
        }
    }

    /// Settles the task: stops the other branches of a failed one, finishes one with
    /// nothing open. The final status and the result (left out when the reported step is
    /// the only final one).
    fn end(&mut self, reported: Option<usize>) -> Option<(TaskStatus, Option<Value>)> {
        let done = if self.failed {
            self.stop_all(&StepError::permanent(
                "stopped",
                "stopped: another step of the task failed for good",
            ));
            (TaskStatus::Failed, None)
        } else if self.t.open == 0 {
            self.t.status = TaskStatus::Succeeded;
            self.t.finished = Some(self.w);
            let only = self.t.sinks.len() == 1 && reported == Some(self.t.sinks[0]);
            (TaskStatus::Succeeded, (!only).then(|| result_of(self.t)))
        } else {
            return None;
        };
        self.t.queue_callback(self.w);
        Some(done)
    }
}

/// The model's task view of its steps (timestamps as [`IN_WINDOW`]).
fn step_views(t: &ModelTask) -> Vec<StepView> {
    (0..t.declared).map(|i| step_view(t, i)).collect()
}

/// Slot `i` as the view shows it (a map step with its instances).
fn step_view(t: &ModelTask, i: usize) -> StepView {
    let in_window = |w: Option<Window>| w.map(|_| IN_WINDOW);
    let s = &t.steps[i];
    StepView {
        index: i as u32,
        id: s.id.clone(),
        kind: match (&s.wait, s.sleep_ms) {
            (Some(_), _) => StepKind::Wait,
            (_, Some(_)) => StepKind::Sleep,
            _ => StepKind::Work,
        },
        capability: (s.cap != NO_CAP).then(|| cap(s.cap)),
        needs: match s.parent {
            // Shown once, on the map step.
            Some(_) => Vec::new(),
            None => s.needs.iter().map(|n| t.steps[*n].id.clone()).collect(),
        },
        router: s.router,
        allow_failure: s.allow_failure,
        map: s.map.as_ref().map(|plan| MapView {
            over: plan.over.clone(),
            concurrency: plan.concurrency,
            total: s.fan.map(|f| f.1 as u32),
            finished: s.fan.map_or(0, |f| f.3 as u32),
        }),
        instances: s
            .fan
            .map(|(first, total, _, _)| (first..first + total).map(|k| step_view(t, k)).collect())
            .unwrap_or_default(),
        element_index: s.element.as_ref().map(|e| e.0),
        wait: s
            .wait
            .as_ref()
            .map(|(signal, timeout_ms, on_timeout)| WaitView {
                signal: signal.clone(),
                timeout_ms: *timeout_ms,
                on_timeout: *on_timeout,
            }),
        sleep_ms: s.sleep_ms,
        wakes_at_ms: in_window(s.wakes),
        status: s.status,
        worker_id: s.worker.clone(),
        attempts: s.tries,
        output: s.output.clone(),
        error: s.error.clone(),
        queued_at_ms: in_window(s.queued),
        dispatched_at_ms: in_window(s.dispatched),
        finished_at_ms: in_window(s.finished),
        usage: None,
    }
}

/// What a transition the master makes by itself (a signal, a timer) set going: the
/// result is always given (no reported output carries it).
fn advance(mut tx: Cascade<'_>) -> Advance {
    let done = tx.end(None);
    let t = &*tx.t;
    Advance {
        queued: if done.is_some() {
            Vec::new()
        } else {
            tx.queued
        },
        done: done.map(|(status, result)| Finished {
            status,
            callback: t.callback,
            result,
            error: t.error.clone(),
        }),
    }
}

/// A succeeded task's result, from the model's own view of its steps.
fn result_of(t: &ModelTask) -> Value {
    graph_result(&step_views(t))
}

/// What a report should do, known before it is sent.
enum Judgement {
    Discard,
    /// This report was recorded before: answered with the first outcome again.
    Replay((ReportOutcome, Option<Window>)),
    Record {
        task: usize,
        step: usize,
    },
}

/// What the stores must do.
#[derive(Default)]
struct Model {
    tasks: Vec<ModelTask>,
    /// Ids submitted but never stored (rate-limited): `get` finds nothing.
    absent: Vec<TaskId>,
    /// (client, key) → the task the key was first used for.
    idempotency: HashMap<(usize, usize), TaskId>,
    /// The rated client's GCRA "theoretical arrival time".
    tat: Option<Window>,
    /// Capabilities of tasks submitted with inline steps.
    caps_seen: BTreeSet<usize>,
    /// Every attempt handed out, with its worker.
    handed_out: Vec<(StepRef, WorkerId)>,
    /// Every report sent, with its jitter.
    sent: Vec<(ResultReport, f64)>,
    /// Attempts whose outcome was recorded.
    recorded: HashSet<StepRef>,
    /// Claims that gave a step lost on a worker to another one than next in line.
    swaps: u64,
    /// Every callback delivery attempt claimed.
    callback_claims: Vec<(TaskId, u32)>,
}

impl Model {
    fn find(&self, id: &TaskId) -> Option<usize> {
        self.tasks.iter().position(|t| &t.id == id)
    }

    /// Backoffs still running: the instants they end.
    fn backoffs(&self) -> Vec<Window> {
        self.tasks
            .iter()
            .flat_map(|t| &t.steps)
            .filter(|s| s.backoff)
            .filter_map(|s| s.queued)
            .collect()
    }

    /// Leases held: the instants they run out.
    fn leases(&self) -> Vec<Window> {
        self.tasks
            .iter()
            .flat_map(|t| &t.steps)
            .filter_map(|s| s.lease)
            .collect()
    }

    /// The instant from which the rated client may submit again.
    fn rate_edge(&self) -> Option<Window> {
        let burst = u64::from(RATE.burst);
        self.tat
            .map(|tat| tat.earlier(RATE_INTERVAL_MS * (burst - 1)))
    }

    /// Leased attempts, in task order, with the worker holding each.
    fn live(&self) -> Vec<(StepRef, WorkerId)> {
        let mut out = Vec::new();
        for t in &self.tasks {
            for (i, s) in t.steps.iter().enumerate() {
                if s.status == StepStatus::Dispatched {
                    out.push((
                        StepRef {
                            task_id: t.id.clone(),
                            step: i as u32,
                            attempt: s.attempt,
                        },
                        s.worker.clone().unwrap(),
                    ));
                }
            }
        }
        out
    }

    /// A capability's ready queue, in claim order: higher priority first, then first
    /// queued first (ties, within one operation, by task id).
    fn ready(&self, cap: usize) -> Vec<(usize, usize)> {
        let mut entries: Vec<(i64, u64, TaskId, usize, usize)> = Vec::new();
        for (ti, t) in self.tasks.iter().enumerate() {
            if t.status.is_terminal() {
                continue;
            }
            for (si, s) in t.steps.iter().enumerate() {
                if s.cap == cap && s.status == StepStatus::Queued && !s.backoff {
                    let queued = s.queued.unwrap().start;
                    entries.push((-i64::from(t.priority), queued, t.id.clone(), si, ti));
                }
            }
        }
        entries.sort();
        entries
            .into_iter()
            .map(|(_, _, _, si, ti)| (ti, si))
            .collect()
    }

    /// A router's `next` for its report (`route`: see [`Verdict::Succeed`]): an id, or a
    /// list of them; `None` for a step that is not a router, or when nothing is picked.
    fn next_for(&self, step: &StepRef, route: u8) -> Option<Value> {
        let t = &self.tasks[self.find(&step.task_id)?];
        let s = t.steps.get(step.step as usize).filter(|s| s.router)?;
        let mut picks: Vec<String> = s
            .dependants
            .iter()
            .enumerate()
            .filter(|(k, _)| route & (1 << k) != 0)
            .map(|(_, d)| t.steps[*d].id.clone())
            .collect();
        if route & 0x80 != 0 {
            picks.push("elsewhere".into());
        }
        match picks.as_slice() {
            [] => None,
            [one] => Some(json!(one)),
            several => Some(json!(several)),
        }
    }

    /// Answers a submission; for a rate-limited one, also the range its retry-after must
    /// be in.
    fn submit(
        &mut self,
        task: &NewTask,
        client: usize,
        key: Option<usize>,
        w: Window,
    ) -> (SubmitOutcome, Option<Window>) {
        if let Some(k) = key
            && let Some(first) = self.idempotency.get(&(client, k))
        {
            return (SubmitOutcome::Existing(first.clone()), None);
        }
        if client == RATED {
            if let Some(edge) = self.rate_edge()
                && !edge.before(w)
            {
                assert!(w.before(edge), "the clock kept away from the rate edge");
                self.absent.push(task.id.clone());
                let wait = Window {
                    start: edge.start - w.end,
                    end: edge.end - w.start,
                };
                return (
                    SubmitOutcome::RateLimited(Duration::from_millis(IN_WINDOW)),
                    Some(wait),
                );
            }
            let tat = self.tat.unwrap_or(Window { start: 0, end: 0 });
            self.tat = Some(Window {
                start: tat.start.max(w.start) + RATE_INTERVAL_MS,
                end: tat.end.max(w.end) + RATE_INTERVAL_MS,
            });
        }
        if let Some(k) = key {
            self.idempotency.insert((client, k), task.id.clone());
        }
        let caps: Vec<usize> = task
            .steps
            .iter()
            .map(|p| match p.capability() {
                Some(c) => CAPS.iter().position(|x| *x == c.as_str()).unwrap(),
                None => NO_CAP,
            })
            .collect();
        if task.pipeline.is_none() {
            self.caps_seen
                .extend(caps.iter().copied().filter(|c| *c != NO_CAP));
        }
        let mut steps: Vec<ModelStep> = task
            .steps
            .iter()
            .zip(&caps)
            .map(|(p, c)| {
                let (max_attempts, timeout_ms, router, map, wait, sleep_ms) = match &p.kind {
                    PlannedKind::Work {
                        max_attempts,
                        timeout_ms,
                        router,
                        map,
                        ..
                    } => (max_attempts, timeout_ms, router, map, None, None),
                    PlannedKind::Wait {
                        signal,
                        timeout_ms,
                        on_timeout,
                    } => (
                        &1,
                        &0,
                        &false,
                        &None,
                        Some((signal.clone(), *timeout_ms, *on_timeout)),
                        None,
                    ),
                    PlannedKind::Sleep { ms } => (&1, &0, &false, &None, None, Some(*ms)),
                };
                ModelStep {
                    id: p.id.clone(),
                    cap: *c,
                    needs: p.needs.iter().map(|n| *n as usize).collect(),
                    dependants: Vec::new(),
                    allow_failure: p.allow_failure,
                    router: *router,
                    open_needs: p.needs.len(),
                    skipped_needs: 0,
                    routed_out: false,
                    map: map.clone(),
                    fan: None,
                    wait,
                    sleep_ms,
                    wakes: None,
                    parent: None,
                    element: None,
                    status: StepStatus::Pending,
                    attempt: 0,
                    tries: 0,
                    max_attempts: *max_attempts,
                    timeout_ms: *timeout_ms,
                    worker: None,
                    output: None,
                    error: None,
                    queued: None,
                    dispatched: None,
                    finished: None,
                    backoff: false,
                    lease: None,
                    avoid: None,
                    free_failures: 0,
                    last_record: None,
                }
            })
            .collect();
        for d in 0..steps.len() {
            for n in steps[d].needs.clone() {
                steps[n].dependants.push(d);
            }
        }
        let sinks = (0..steps.len())
            .filter(|i| steps[*i].dependants.is_empty())
            .collect();
        let open = steps.len();
        let mut t = ModelTask {
            id: task.id.clone(),
            client,
            pipeline: task.pipeline.is_some(),
            priority: task.priority,
            input: serde_json::from_str(&task.input).unwrap(),
            callback: task.callback_url.is_some(),
            request_id: task.request_id.clone(),
            status: TaskStatus::Queued,
            error: None,
            created: w,
            started: None,
            finished: None,
            dead: None,
            steps,
            open,
            sinks,
            declared: open,
            buffered: HashMap::new(),
            delivery: None,
            outbox: None,
        };
        let mut tx = Cascade {
            t: &mut t,
            w,
            queued: Vec::new(),
            failed: false,
        };
        for i in 0..tx.t.steps.len() {
            if tx.t.steps[i].needs.is_empty() {
                tx.ready(i);
            }
        }
        tx.end(None);
        self.tasks.push(t);
        (SubmitOutcome::Created, None)
    }

    /// Claims for `workers`, in queue order and worker order, except that a step whose
    /// last attempt was lost on a worker swaps in the next other worker of the batch; each
    /// claim with the window its deadline must be in.
    fn claim(&mut self, c: usize, workers: &[WorkerId], w: Window) -> Vec<(ClaimView, Window)> {
        let mut pool = workers.to_vec();
        let mut out = Vec::new();
        for (ti, si) in self.ready(c) {
            let next = out.len();
            if next == pool.len() {
                break;
            }
            let t = &mut self.tasks[ti];
            if let Some(avoid) = &t.steps[si].avoid
                && let Some(j) = (next..pool.len()).find(|&j| &pool[j] != avoid)
            {
                self.swaps += u64::from(j != next);
                pool.swap(next, j);
            }
            let worker = pool[next].clone();
            if t.status == TaskStatus::Queued {
                t.started = Some(w);
            }
            t.status = TaskStatus::Running;
            let s = &mut t.steps[si];
            s.attempt += 1;
            s.tries += 1;
            s.status = StepStatus::Dispatched;
            s.worker = Some(worker.clone());
            s.dispatched = Some(w);
            s.lease = Some(w.later(LEASE_MS));
            let (attempt, timeout_ms) = (s.attempt, s.timeout_ms);
            // The outcomes of the steps it needs, not the whole history.
            let previous: Vec<PriorOutput> = t.steps[si]
                .needs
                .iter()
                .map(|&i| {
                    let n = &t.steps[i];
                    PriorOutput {
                        step: i as u32,
                        id: n.id.clone(),
                        capability: (n.cap != NO_CAP).then(|| cap(n.cap)),
                        status: n.status,
                        output: match n.status {
                            StepStatus::Succeeded => n.output.clone().unwrap_or(Value::Null),
                            _ => Value::Null,
                        },
                        error: (n.status == StepStatus::Failed)
                            .then(|| n.error.clone())
                            .flatten(),
                    }
                })
                .collect();
            let element = t.steps[si].element.clone();
            let input = match previous.as_slice() {
                _ if element.is_some() => element.as_ref().unwrap().1.clone(),
                [] => t.input.clone(),
                [one] => one.output.clone(),
                several => Value::Object(
                    several
                        .iter()
                        .map(|p| (p.id.clone(), p.output.clone()))
                        .collect(),
                ),
            };
            let work = WorkRequest {
                task_id: t.id.clone(),
                step: si as u32,
                attempt,
                capability: cap(c),
                input,
                context: StepContext {
                    task_input: t.input.clone(),
                    previous,
                    pipeline: t.pipeline.then(|| PIPELINE.to_string()),
                    total_steps: t.declared as u32,
                    step_id: Some(t.steps[si].id.clone()),
                    element_index: element.map(|e| e.0),
                },
                deadline_ms: IN_WINDOW,
                // The lease holder, so another worker at the same address refuses it.
                worker_id: Some(worker.clone()),
                request_id: None,
            };
            let step = work.step_ref();
            self.handed_out.push((step, worker.clone()));
            let view = ClaimView {
                work,
                worker,
                request_id: t.request_id.clone(),
                // The model submits untraced tasks.
                traceparent: None,
            };
            out.push((view, w.later(timeout_ms)));
        }
        out
    }

    /// A report counts when its attempt is current and it comes from the worker holding
    /// the lease; otherwise it is a replay when it repeats the step's last recorded report
    /// (same attempt, worker and status), else it is discarded.
    fn judge(&self, r: &ResultReport) -> Judgement {
        let Some(ti) = self.find(&r.task_id) else {
            return Judgement::Discard;
        };
        let t = &self.tasks[ti];
        let si = r.step as usize;
        let Some(s) = t.steps.get(si) else {
            return Judgement::Discard;
        };
        let current = !t.status.is_terminal()
            && s.status == StepStatus::Dispatched
            && s.attempt == r.attempt
            && s.worker.as_ref() == Some(&r.worker_id);
        if current {
            return Judgement::Record { task: ti, step: si };
        }
        match &s.last_record {
            Some(rec)
                if rec.attempt == r.attempt
                    && rec.worker == r.worker_id
                    && rec.status == r.status =>
            {
                Judgement::Replay(rec.answer.clone())
            }
            _ => Judgement::Discard,
        }
    }

    /// The backoff a report will start, if it records a retry.
    fn predicted_backoff(&self, r: &ResultReport, jitter: f64) -> Option<u64> {
        let Judgement::Record { task, step } = self.judge(r) else {
            return None;
        };
        let s = &self.tasks[task].steps[step];
        let retryable = r.error.as_ref().is_some_and(|e| e.retryable);
        (r.status == ReportStatus::Failed && retryable && s.tries < s.max_attempts)
            .then(|| backoff_ms(s.tries, jitter))
    }

    /// Answers a report; with the window the outcome's dispatch stamp must be in.
    fn report(
        &mut self,
        r: &ResultReport,
        jitter: f64,
        w: Window,
    ) -> (ReportOutcome, Option<Window>) {
        let (ti, si) = match self.judge(r) {
            Judgement::Discard => return (ReportOutcome::Discarded, None),
            Judgement::Replay((first, dispatched)) => {
                return (ReportOutcome::Replayed(Box::new(first)), dispatched);
            }
            Judgement::Record { task, step } => (task, step),
        };
        let lost = r
            .error
            .as_ref()
            .and_then(|e| e.kind.as_deref())
            .is_some_and(|k| LOST_KINDS.contains(&k));
        let t = &mut self.tasks[ti];
        let s = &mut t.steps[si];
        let dispatched = s.dispatched;
        let finished = FinishedStep {
            capability: cap(s.cap),
            dispatched_at_ms: IN_WINDOW,
        };
        s.lease = None;
        let error = r.error.clone().unwrap_or_else(|| {
            StepError::permanent("agent", "the worker reported a failure without error")
        });
        let outcome =
            if r.status == ReportStatus::Failed && error.retryable && s.tries < s.max_attempts {
                let delay = backoff_ms(s.tries, jitter);
                s.error = Some(error);
                s.status = StepStatus::Queued;
                s.backoff = true;
                s.queued = Some(w.later(delay));
                if lost {
                    s.avoid = Some(r.worker_id.clone());
                }
                ReportOutcome::Retry {
                    finished,
                    delay: Duration::from_millis(delay),
                }
            } else {
                let mut tx = Cascade {
                    t: &mut *t,
                    w,
                    queued: Vec::new(),
                    failed: false,
                };
                match r.status {
                    ReportStatus::Succeeded => {
                        tx.succeed(si, r.output.clone().unwrap_or(Value::Null));
                    }
                    ReportStatus::Failed => tx.fail_for_good(si, error),
                }
                match tx.end(Some(si)) {
                    Some((status, result)) => ReportOutcome::Done {
                        finished,
                        status,
                        callback: t.callback,
                        result,
                    },
                    None => ReportOutcome::Next {
                        finished,
                        queued: tx.queued,
                    },
                }
            };
        // A replay answers without the result.
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
        if !lost {
            t.steps[si].last_record = Some(Recorded {
                attempt: r.attempt,
                worker: r.worker_id.clone(),
                status: r.status,
                answer: (remembered, dispatched),
            });
        }
        let answer = (outcome, dispatched);
        let attempt = StepRef {
            task_id: r.task_id.clone(),
            step: r.step,
            attempt: r.attempt,
        };
        assert!(
            self.recorded.insert(attempt),
            "the model recorded an attempt twice: {r:?}"
        );
        answer
    }

    /// Gives a leased attempt back: free for capacity refusals, free at most
    /// [`MAX_FREE_DISPATCH_FAILURES`] times in a row for failed dispatches.
    fn release(&mut self, step: &StepRef, why: ReleaseReason) -> ReleaseOutcome {
        let Some(ti) = self.find(&step.task_id) else {
            return ReleaseOutcome::Stale;
        };
        let t = &mut self.tasks[ti];
        if t.status.is_terminal() {
            return ReleaseOutcome::Stale;
        }
        match t.steps.get_mut(step.step as usize) {
            Some(s) if s.status == StepStatus::Dispatched && s.attempt == step.attempt => {
                if why == ReleaseReason::Failure {
                    s.free_failures += 1;
                    if s.free_failures > MAX_FREE_DISPATCH_FAILURES {
                        s.free_failures = 0;
                        return ReleaseOutcome::OverLimit;
                    }
                }
                s.status = StepStatus::Queued;
                s.tries = s.tries.saturating_sub(1);
                s.lease = None;
                ReleaseOutcome::Released
            }
            _ => ReleaseOutcome::Stale,
        }
    }

    /// Lapsed leases of a capability, oldest first; with the windows of their dispatch.
    fn expired(&self, c: usize, limit: usize, w: Window) -> Vec<(ExpiredLease, Window)> {
        let mut due = Vec::new();
        for t in &self.tasks {
            for (si, s) in t.steps.iter().enumerate() {
                let Some(lease) = s.lease.filter(|_| s.cap == c) else {
                    continue;
                };
                assert!(lease.before(w) || w.before(lease), "lease edge avoided");
                if lease.before(w) {
                    let entry = ExpiredLease {
                        step: StepRef {
                            task_id: t.id.clone(),
                            step: si as u32,
                            attempt: s.attempt,
                        },
                        worker: s.worker.clone().unwrap(),
                        dispatched_at_ms: IN_WINDOW,
                        timeout_ms: s.timeout_ms,
                    };
                    due.push((lease.start, t.id.clone(), si, entry, s.dispatched.unwrap()));
                }
            }
        }
        due.sort_by(|a, b| (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)));
        due.into_iter()
            .take(limit.max(1))
            .map(|(_, _, _, entry, dispatched)| (entry, dispatched))
            .collect()
    }

    /// Extends the leases of the named steps that are leased under `c`; how many.
    fn extend(&mut self, c: usize, leases: &[(StepRef, u64)]) -> usize {
        let mut extended = 0;
        for (step, until) in leases {
            let Some(ti) = self.find(&step.task_id) else {
                continue;
            };
            if let Some(s) = self.tasks[ti].steps.get_mut(step.step as usize)
                && s.cap == c
                && s.lease.is_some()
            {
                s.lease = Some(Window {
                    start: *until,
                    end: *until,
                });
                extended += 1;
            }
        }
        extended
    }

    fn promote(&mut self, c: usize, w: Window) -> usize {
        let mut moved = 0;
        for s in self.tasks.iter_mut().flat_map(|t| &mut t.steps) {
            if s.cap != c || !s.backoff {
                continue;
            }
            let due = s.queued.unwrap();
            assert!(due.before(w) || w.before(due), "backoff edge avoided");
            if due.before(w) {
                s.backoff = false;
                moved += 1;
            }
        }
        moved
    }

    fn cancel(&mut self, id: &TaskId, w: Window) -> CancelOutcome {
        let Some(ti) = self.find(id) else {
            return CancelOutcome::NotFound;
        };
        let t = &mut self.tasks[ti];
        if t.status.is_terminal() {
            return CancelOutcome::AlreadyFinished(t.status);
        }
        let mut tx = Cascade {
            t: &mut *t,
            w,
            queued: Vec::new(),
            failed: false,
        };
        tx.stop_all(&StepError::permanent("cancelled", "task cancelled"));
        t.status = TaskStatus::Cancelled;
        t.finished = Some(w);
        t.queue_callback(w);
        CancelOutcome::Cancelled
    }

    /// Runs the failed (not allowed) and stopped steps again, in slot order.
    fn redrive(&mut self, id: &TaskId, w: Window) -> RedriveOutcome {
        let Some(ti) = self.find(id) else {
            return RedriveOutcome::NotFound;
        };
        let t = &mut self.tasks[ti];
        if t.status != TaskStatus::Failed {
            return RedriveOutcome::NotFailed(t.status);
        }
        t.status = if t.started.is_some() {
            TaskStatus::Running
        } else {
            TaskStatus::Queued
        };
        t.finished = None;
        t.error = None;
        t.dead = None;
        // The failure's callback is superseded by the next finish's.
        t.delivery = None;
        t.outbox = None;
        let mut tx = Cascade {
            t,
            w,
            queued: Vec::new(),
            failed: false,
        };
        for i in 0..tx.t.steps.len() {
            let allowed = match tx.t.steps[i].parent {
                Some(p) => tx.t.steps[p].allow_failure,
                None => tx.t.steps[i].allow_failure,
            };
            let s = &mut tx.t.steps[i];
            if s.status == StepStatus::Cancelled || (s.status == StepStatus::Failed && !allowed) {
                s.tries = 0;
                s.free_failures = 0;
                s.finished = None;
                s.error = None;
                if s.map.is_some() && s.fan.is_some() {
                    // Its instances run again by this same rule.
                    s.status = StepStatus::Running;
                } else if s.map.is_some() || s.wait.is_some() || s.sleep_ms.is_some() {
                    // Expands again (and may fail again at once), or waits again with a
                    // fresh timer.
                    tx.ready(i);
                } else {
                    // Queued even when an earlier one failed again: then stopped.
                    tx.queue(i);
                }
            }
        }
        match tx.end(None) {
            Some(_) => RedriveOutcome::Redriven(Vec::new()),
            None => RedriveOutcome::Redriven(tx.queued),
        }
    }

    /// Timers running: the instants they fire.
    fn timers(&self) -> Vec<Window> {
        self.tasks
            .iter()
            .filter(|t| !t.status.is_terminal())
            .flat_map(|t| &t.steps)
            .filter(|s| s.status == StepStatus::Waiting)
            .filter_map(|s| s.wakes)
            .collect()
    }

    /// Rule 12: a signal to a task's wait step.
    fn signal(&mut self, id: &TaskId, name: &str, payload: &str, w: Window) -> SignalOutcome {
        let Some(ti) = self.find(id) else {
            return SignalOutcome::NotFound;
        };
        let t = &mut self.tasks[ti];
        if t.status.is_terminal() {
            return SignalOutcome::Finished(t.status);
        }
        let Some(slot) =
            (0..t.declared).find(|i| t.steps[*i].wait.as_ref().is_some_and(|(n, _, _)| n == name))
        else {
            return SignalOutcome::UnknownSignal;
        };
        let payload: Value = serde_json::from_str(payload).unwrap();
        match t.steps[slot].status {
            StepStatus::Pending if t.buffered.contains_key(name) => SignalOutcome::AlreadyReceived,
            StepStatus::Pending => {
                t.buffered.insert(name.to_string(), payload);
                SignalOutcome::Buffered
            }
            StepStatus::Waiting => {
                t.steps[slot].wakes = None;
                let mut tx = Cascade {
                    t,
                    w,
                    queued: Vec::new(),
                    failed: false,
                };
                tx.succeed(slot, payload);
                SignalOutcome::Delivered(advance(tx))
            }
            _ => SignalOutcome::AlreadyReceived,
        }
    }

    /// Rule 13: due timers, oldest first (then by `task:slot`), at most `limit`.
    fn fire(&mut self, limit: usize, w: Window) -> Vec<FiredTimer> {
        let mut due: Vec<(u64, String, usize, usize)> = Vec::new();
        for (ti, t) in self.tasks.iter().enumerate() {
            if t.status.is_terminal() {
                continue;
            }
            for (si, s) in t.steps.iter().enumerate() {
                let Some(wakes) = s.wakes.filter(|_| s.status == StepStatus::Waiting) else {
                    continue;
                };
                assert!(wakes.before(w) || w.before(wakes), "timer edge avoided");
                if wakes.before(w) {
                    due.push((wakes.start, format!("{}:{si}", t.id), ti, si));
                }
            }
        }
        due.sort();
        due.truncate(limit);
        let mut fired = Vec::new();
        for (_, _, ti, si) in due {
            let t = &mut self.tasks[ti];
            // An earlier timer of this call may have ended the task (a wait that failed it
            // stops its other waits): a timer of a step that no longer waits does not fire.
            if t.status.is_terminal() || t.steps[si].status != StepStatus::Waiting {
                continue;
            }
            t.steps[si].wakes = None;
            let task_id = t.id.clone();
            let (wait, sleep) = (t.steps[si].wait.clone(), t.steps[si].sleep_ms);
            let mut tx = Cascade {
                t,
                w,
                queued: Vec::new(),
                failed: false,
            };
            match (wait, sleep) {
                (Some((_, _, OnTimeout::Continue)), _) => {
                    tx.succeed(si, json!({ "timed_out": true }));
                }
                (Some((signal, timeout_ms, OnTimeout::Fail)), _) => tx.fail_for_good(
                    si,
                    StepError::permanent(
                        "wait_timeout",
                        format!("no signal `{signal}` within {timeout_ms} ms"),
                    ),
                ),
                (None, Some(_)) => tx.succeed(si, Value::Null),
                (None, None) => unreachable!("only waits and sleeps have timers"),
            }
            fired.push(FiredTimer {
                task_id,
                step: si as u32,
                advance: advance(tx),
            });
        }
        fired
    }

    /// Callbacks due in the outbox: the instants they come due.
    fn outbox(&self) -> Vec<Window> {
        self.tasks.iter().filter_map(|t| t.outbox).collect()
    }

    /// Claims due callbacks (by due time, then id): each starts a delivery attempt and
    /// comes due again after `visibility`; one whose attempts ran out fails abandoned.
    fn claim_callbacks(
        &mut self,
        limit: usize,
        visibility: u64,
        max_attempts: u32,
        w: Window,
    ) -> Vec<(RecordView, String, u32)> {
        let mut due: Vec<(u64, TaskId, usize)> = Vec::new();
        for (ti, t) in self.tasks.iter().enumerate() {
            if let Some(o) = t.outbox {
                assert!(o.before(w) || w.before(o), "outbox edge avoided");
                if o.before(w) {
                    due.push((o.start, t.id.clone(), ti));
                }
            }
        }
        due.sort();
        due.truncate(limit.max(1));
        let mut out = Vec::new();
        for (_, _, ti) in due {
            let t = &mut self.tasks[ti];
            let finished = t.status.is_terminal();
            let Some(d) = t
                .delivery
                .as_mut()
                .filter(|d| d.status == CallbackStatus::Pending && finished)
            else {
                t.outbox = None;
                continue;
            };
            if d.attempts >= max_attempts.max(1) {
                d.status = CallbackStatus::Failed;
                d.last_error = Some(CALLBACK_ABANDONED.to_string());
                t.outbox = None;
                continue;
            }
            d.attempts += 1;
            let attempt = d.attempts;
            t.outbox = Some(w.later(visibility));
            self.callback_claims.push((t.id.clone(), attempt));
            let t = &self.tasks[ti];
            out.push((self.record(t), callback_url(&t.id), attempt));
        }
        out
    }

    /// Records a delivery attempt's end, if it is the latest attempt claimed.
    fn finish_callback(
        &mut self,
        id: &TaskId,
        attempt: u32,
        result: &CallbackResult,
        w: Window,
    ) -> bool {
        let Some(ti) = self.find(id) else {
            return false;
        };
        let t = &mut self.tasks[ti];
        let Some(d) = t
            .delivery
            .as_mut()
            .filter(|d| d.status == CallbackStatus::Pending && d.attempts == attempt)
        else {
            return false;
        };
        match result {
            CallbackResult::Delivered => {
                d.status = CallbackStatus::Delivered;
                t.outbox = None;
            }
            CallbackResult::Retry { error, delay } => {
                d.last_error = Some(error.clone());
                t.outbox = Some(w.later(millis(*delay)));
            }
            CallbackResult::Failed { error } => {
                d.status = CallbackStatus::Failed;
                d.last_error = Some(error.clone());
                t.outbox = None;
            }
        }
        true
    }

    fn record(&self, t: &ModelTask) -> RecordView {
        let in_window = |w: Option<Window>| w.map(|_| IN_WINDOW);
        let steps = step_views(t);
        let result = (t.status == TaskStatus::Succeeded).then(|| graph_result(&steps));
        let mut shown = TaskView {
            task_id: t.id.clone(),
            status: t.status,
            pipeline: None,
            priority: 0,
            input: Value::Null,
            steps: steps.clone(),
            result: None,
            error: None,
            created_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            callback: None,
            usage: None,
        };
        derive_waiting(&mut shown);
        RecordView {
            view: TaskView {
                task_id: t.id.clone(),
                status: shown.status,
                pipeline: t.pipeline.then(|| PIPELINE.to_string()),
                priority: t.priority,
                input: t.input.clone(),
                steps,
                result,
                error: t.error.clone(),
                created_at_ms: IN_WINDOW,
                started_at_ms: in_window(t.started),
                finished_at_ms: in_window(t.finished),
                callback: t.callback.then(|| {
                    let d = t.delivery.as_ref();
                    CallbackView {
                        url: callback_url(&t.id),
                        status: d.map_or(CallbackStatus::Pending, |d| d.status),
                        attempts: d.map_or(0, |d| d.attempts),
                        last_error: d.and_then(|d| d.last_error.clone()),
                    }
                }),
                usage: None,
            },
            client: CLIENTS[t.client].to_string(),
            callback_url: t.callback.then(|| callback_url(&t.id)),
            request_id: t.request_id.clone(),
        }
    }

    /// A capability's queue figures, and the window its head was queued in.
    fn stats(&self, c: usize) -> (QueueStats, Option<Window>) {
        let steps = || {
            self.tasks
                .iter()
                .flat_map(|t| &t.steps)
                .filter(move |s| s.cap == c)
        };
        let ready = self.ready(c);
        let head = ready
            .first()
            .map(|(ti, si)| self.tasks[*ti].steps[*si].queued.unwrap());
        let stats = QueueStats {
            queued: ready.len() as u64,
            delayed: steps().filter(|s| s.backoff).count() as u64,
            in_flight: steps().filter(|s| s.lease.is_some()).count() as u64,
            dead_lettered: self.dead_letters(c).len() as u64,
            head_queued_at_ms: head.map(|_| IN_WINDOW),
        };
        (stats, head)
    }

    fn dead_letters(&self, c: usize) -> Vec<TaskId> {
        let mut dead: Vec<(u64, TaskId)> = self
            .tasks
            .iter()
            .filter_map(|t| match t.dead {
                Some((w, dc)) if dc == c => Some((w.start, t.id.clone())),
                _ => None,
            })
            .collect();
        dead.sort();
        dead.into_iter().map(|(_, id)| id).collect()
    }

    fn loads(&self) -> HashMap<String, u32> {
        let mut loads = HashMap::new();
        for (_, w) in self.live() {
            *loads.entry(w.to_string()).or_insert(0) += 1;
        }
        loads
    }

    /// No task is lost: a live task has exactly one active step, the steps before it
    /// succeeded and the ones after it wait; a finished one has none active.
    fn check_invariants(&self) {
        for t in &self.tasks {
            let active: Vec<usize> = (0..t.steps.len())
                .filter(|i| {
                    matches!(
                        t.steps[*i].status,
                        StepStatus::Queued | StepStatus::Dispatched
                    )
                })
                .collect();
            if t.status.is_terminal() {
                assert!(
                    active.is_empty(),
                    "a finished task has nothing active: {t:?}"
                );
                assert!(t.finished.is_some());
            } else {
                let waiting = t.steps.iter().any(|s| s.status == StepStatus::Waiting);
                assert!(
                    !active.is_empty() || waiting,
                    "a live task has an active or waiting step: {t:?}"
                );
                let finished = |n: &usize| {
                    let s = &t.steps[*n];
                    matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped)
                        || (s.status == StepStatus::Failed && s.allow_failure)
                };
                for (i, s) in t.steps.iter().enumerate() {
                    let open = s.needs.iter().filter(|n| !finished(n)).count();
                    if s.status == StepStatus::Pending && s.parent.is_none() {
                        assert!(open > 0, "a pending step waits for a need: {i} of {t:?}");
                    } else {
                        assert_eq!(open, 0, "a started step had all it needs: {i} of {t:?}");
                    }
                }
            }
            for s in &t.steps {
                assert!(
                    s.tries <= s.max_attempts,
                    "tries within max_attempts: {t:?}"
                );
                assert_eq!(s.lease.is_some(), s.status == StepStatus::Dispatched);
            }
        }
    }
}

fn reason(failure: bool) -> ReleaseReason {
    if failure {
        ReleaseReason::Failure
    } else {
        ReleaseReason::Capacity
    }
}

fn backoff_ms(tries: u32, jitter: f64) -> u64 {
    millis(RETRY.delay_with(tries.saturating_sub(1), jitter))
}

fn callback_url(id: &TaskId) -> String {
    format!("http://callback.test/{id}")
}

/// A [`TaskRecord`] in a comparable form.
#[derive(Debug, PartialEq)]
struct RecordView {
    view: TaskView,
    client: String,
    callback_url: Option<String>,
    request_id: String,
}

/// A [`Claimed`] in a comparable form.
#[derive(Debug, PartialEq)]
struct ClaimView {
    work: WorkRequest,
    worker: WorkerId,
    request_id: String,
    traceparent: Option<String>,
}

/// A step view (and its instances) with timestamps checked against the model's windows.
fn norm_step(s: StepView, t: &ModelTask) -> StepView {
    // Every field named, so a new timestamp is not compared raw by mistake.
    let StepView {
        index,
        id,
        kind,
        capability,
        needs,
        router,
        allow_failure,
        map,
        instances,
        element_index,
        wait,
        sleep_ms,
        wakes_at_ms,
        status,
        worker_id,
        attempts,
        output,
        error,
        queued_at_ms,
        dispatched_at_ms,
        finished_at_ms,
        usage,
    } = s;
    let want = t.steps.get(index as usize);
    StepView {
        index,
        id,
        kind,
        capability,
        needs,
        router,
        allow_failure,
        map,
        instances: instances.into_iter().map(|i| norm_step(i, t)).collect(),
        element_index,
        wait,
        sleep_ms,
        wakes_at_ms: opt_stamp(wakes_at_ms, want.and_then(|m| m.wakes)),
        status,
        worker_id,
        attempts,
        output,
        error,
        queued_at_ms: opt_stamp(queued_at_ms, want.and_then(|m| m.queued)),
        dispatched_at_ms: opt_stamp(dispatched_at_ms, want.and_then(|m| m.dispatched)),
        finished_at_ms: opt_stamp(finished_at_ms, want.and_then(|m| m.finished)),
        usage,
    }
}

fn norm_record(record: TaskRecord, t: &ModelTask) -> RecordView {
    let TaskRecord {
        view,
        client,
        callback_url,
        request_id,
    } = record;
    let TaskView {
        task_id,
        status,
        pipeline,
        priority,
        input,
        steps,
        result,
        error,
        created_at_ms,
        started_at_ms,
        finished_at_ms,
        callback,
        usage,
    } = view;
    let steps = steps.into_iter().map(|s| norm_step(s, t)).collect();
    RecordView {
        view: TaskView {
            task_id,
            status,
            pipeline,
            priority,
            input,
            steps,
            result,
            error,
            created_at_ms: stamp(created_at_ms, Some(t.created)),
            started_at_ms: opt_stamp(started_at_ms, t.started),
            finished_at_ms: opt_stamp(finished_at_ms, t.finished),
            callback,
            usage,
        },
        client,
        callback_url,
        request_id,
    }
}

fn norm_submit(outcome: SubmitOutcome, wait: Option<Window>) -> SubmitOutcome {
    match outcome {
        SubmitOutcome::RateLimited(d) => {
            SubmitOutcome::RateLimited(Duration::from_millis(stamp(millis(d), wait)))
        }
        other => other,
    }
}

fn norm_claims(claims: Vec<Claimed>, deadlines: &[Window]) -> Vec<ClaimView> {
    claims
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let Claimed {
                mut work,
                worker,
                request_id,
                traceparent,
            } = c;
            work.deadline_ms = stamp(work.deadline_ms, deadlines.get(i).copied());
            ClaimView {
                work,
                worker,
                request_id,
                traceparent,
            }
        })
        .collect()
}

fn norm_report(outcome: ReportOutcome, dispatched: Option<Window>) -> ReportOutcome {
    let fix = |f: FinishedStep| {
        let FinishedStep {
            capability,
            dispatched_at_ms,
        } = f;
        FinishedStep {
            capability,
            dispatched_at_ms: stamp(dispatched_at_ms, dispatched),
        }
    };
    match outcome {
        ReportOutcome::Discarded => ReportOutcome::Discarded,
        ReportOutcome::Replayed(first) => {
            ReportOutcome::Replayed(Box::new(norm_report(*first, dispatched)))
        }
        ReportOutcome::Next { finished, queued } => ReportOutcome::Next {
            finished: fix(finished),
            queued,
        },
        ReportOutcome::Retry { finished, delay } => ReportOutcome::Retry {
            finished: fix(finished),
            delay,
        },
        ReportOutcome::Done {
            finished,
            status,
            callback,
            result,
        } => ReportOutcome::Done {
            finished: fix(finished),
            status,
            callback,
            result,
        },
    }
}

fn norm_expired(leases: Vec<ExpiredLease>, want: &[(ExpiredLease, Window)]) -> Vec<ExpiredLease> {
    leases
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let ExpiredLease {
                step,
                worker,
                dispatched_at_ms,
                timeout_ms,
            } = l;
            ExpiredLease {
                step,
                worker,
                dispatched_at_ms: stamp(dispatched_at_ms, want.get(i).map(|w| w.1)),
                timeout_ms,
            }
        })
        .collect()
}

fn norm_stats(stats: QueueStats, head: Option<Window>) -> QueueStats {
    let QueueStats {
        queued,
        delayed,
        in_flight,
        dead_lettered,
        head_queued_at_ms,
    } = stats;
    QueueStats {
        queued,
        delayed,
        in_flight,
        dead_lettered,
        head_queued_at_ms: opt_stamp(head_queued_at_ms, head),
    }
}

/// How often each kind of outcome happened over the whole run, to show the model is not
/// vacuous.
type Tally = BTreeMap<&'static str, u64>;

/// Sleeps past the earliest of `instants` (at most 200 ms).
async fn wait_past(instants: &[Window]) {
    if let Some(end) = instants.iter().map(|w| w.end).min() {
        let wait = (end + 1).saturating_sub(now_ms()).min(200);
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

/// One sequence on both stores and the model.
struct Run<'a> {
    mem: MemoryStore,
    /// The Redis store; another memory store with `MODEL_TEST_MEMORY_ONLY=1` (while the
    /// Redis side of a change is not there yet).
    red: Box<dyn TaskStore>,
    model: Model,
    clock: Clock,
    caps: Vec<Capability>,
    submitted: usize,
    tally: &'a Mutex<Tally>,
    /// The operation under way, for failure messages.
    context: String,
}

impl Run<'_> {
    fn count(&self, what: &'static str) {
        *self.tally.lock().unwrap().entry(what).or_default() += 1;
    }

    /// Both stores answered what the model expects.
    fn same<T: PartialEq + Debug>(&self, what: &str, want: &T, mem: &T, red: &T) {
        assert_eq!(mem, want, "memory store, {what}, at {}", self.context);
        assert_eq!(red, want, "Redis store, {what}, at {}", self.context);
    }

    async fn apply(&mut self, op: &Op) {
        match op {
            Op::Submit { .. } => self.submit(op).await,
            Op::Burst { n } => {
                for _ in 0..*n {
                    let one = Op::Submit {
                        client: RATED,
                        key: None,
                        steps: vec![0],
                        links: vec![(CHAIN, false, false, 0)],
                        priority: 0,
                        max_attempts: 1,
                        timeout_s: 1,
                        callback: false,
                        pipeline: false,
                    };
                    self.submit(&one).await;
                }
            }
            Op::Claim {
                cap: c,
                n,
                first_worker,
            } => {
                let workers: Vec<WorkerId> = (0..*n)
                    .map(|i| worker(WORKERS[(first_worker + i) % WORKERS.len()]))
                    .collect();
                self.claim(*c, &workers, op).await;
            }
            Op::Report {
                pick,
                stale,
                holder,
                verdict,
                jitter,
            } => {
                let pool = if *stale {
                    self.model.handed_out.clone()
                } else {
                    self.model.live()
                };
                if pool.is_empty() {
                    return;
                }
                let (step, held_by) = pool[pick % pool.len()].clone();
                let from = if *holder { held_by } else { worker(INTRUDER) };
                let (status, output, error) = match verdict {
                    Verdict::Succeed { payload, route } => {
                        let mut out = json!({
                            "step": step.step,
                            "attempt": step.attempt,
                            "by": from,
                            "payload": payload_json(*payload),
                        });
                        if let Some(next) = self.model.next_for(&step, *route) {
                            out["next"] = next;
                        }
                        (ReportStatus::Succeeded, Some(out), None)
                    }
                    Verdict::Fail { retryable } => (
                        ReportStatus::Failed,
                        None,
                        Some(StepError {
                            message: format!("attempt {} failed", step.attempt),
                            retryable: *retryable,
                            kind: Some("test".into()),
                        }),
                    ),
                    Verdict::Bare => (ReportStatus::Failed, None, None),
                    Verdict::Lost { kind } => (
                        ReportStatus::Failed,
                        None,
                        Some(StepError::retryable(
                            LOST_KINDS[*kind],
                            "lost on its worker",
                        )),
                    ),
                };
                if !*holder {
                    self.count("report: from a worker not holding the lease");
                }
                let report = ResultReport {
                    task_id: step.task_id.clone(),
                    step: step.step,
                    attempt: step.attempt,
                    worker_id: from,
                    status,
                    output,
                    error,
                    duration_ms: Some(3),
                };
                self.report(report, *jitter).await;
            }
            Op::Repeat { pick } => {
                if self.model.sent.is_empty() {
                    return;
                }
                let (report, jitter) = self.model.sent[pick % self.model.sent.len()].clone();
                self.count("report: repeated");
                self.report(report, jitter).await;
            }
            Op::Release {
                pick,
                stale,
                failure,
            } => {
                let pool = if *stale {
                    self.model.handed_out.clone()
                } else {
                    self.model.live()
                };
                if pool.is_empty() {
                    return;
                }
                let step = pool[pick % pool.len()].0.clone();
                self.release(&step, reason(*failure), op).await;
            }
            Op::Bounce {
                cap: c,
                times,
                failure,
                jitter,
            } => {
                for i in 0..*times {
                    let workers = [worker(WORKERS[i % WORKERS.len()])];
                    let Some(claimed) = self.claim(*c, &workers, op).await.pop() else {
                        return;
                    };
                    let step = claimed.work.step_ref();
                    if self.release(&step, reason(*failure), op).await == ReleaseOutcome::OverLimit
                    {
                        // What the dispatcher does then: spend the attempt.
                        let report = ResultReport {
                            task_id: step.task_id.clone(),
                            step: step.step,
                            attempt: step.attempt,
                            worker_id: claimed.worker.clone(),
                            status: ReportStatus::Failed,
                            output: None,
                            error: Some(StepError::retryable(
                                "dispatch_failed",
                                "dispatching failed too often",
                            )),
                            duration_ms: None,
                        };
                        self.report(report, *jitter).await;
                    }
                }
            }
            Op::ExpireLeases {
                cap: c,
                limit,
                lapse,
                jitter,
                wait,
            } => {
                if *wait {
                    wait_past(&self.model.leases()).await;
                }
                let avoid = self.model.leases();
                let s = self.clock.begin(&avoid).await;
                let a = self.mem.expired_leases(&cap(*c), *limit).await.unwrap();
                let b = self.red.expired_leases(&cap(*c), *limit).await.unwrap();
                let w = self.clock.end(s, &avoid, op);
                let want = self.model.expired(*c, *limit, w);
                let expected: Vec<ExpiredLease> = want.iter().map(|(l, _)| l.clone()).collect();
                let (a, b) = (norm_expired(a, &want), norm_expired(b, &want));
                self.same("expired leases", &expected, &a, &b);
                for lease in expected {
                    self.count("expire: lease listed as lapsed");
                    if !*lapse {
                        continue;
                    }
                    // What the dispatcher does with a lapsed lease.
                    let report = ResultReport {
                        task_id: lease.step.task_id.clone(),
                        step: lease.step.step,
                        attempt: lease.step.attempt,
                        worker_id: lease.worker.clone(),
                        status: ReportStatus::Failed,
                        output: None,
                        error: Some(lease_expired_error(&lease.worker)),
                        duration_ms: None,
                    };
                    self.report(report, *jitter).await;
                }
            }
            Op::Extend { cap: c, picks, old } => {
                let live = self.model.live();
                if live.is_empty() {
                    return;
                }
                let s = self.clock.begin(&[]).await;
                // As from a heartbeat sent now: one lease from now, after every lease taken
                // or extended by an earlier operation. From an old one: already past, and
                // apart from every other lease's end, so the order they lapse in is clear.
                let mut until = s + LEASE_MS;
                if *old {
                    let held = self.model.leases();
                    until = s - LEASE_MS / 2;
                    while held
                        .iter()
                        .any(|w| w.start <= until + 1 && until <= w.end + 1)
                    {
                        until -= 3;
                    }
                }
                let leases: Vec<(StepRef, u64)> = picks
                    .iter()
                    .map(|p| (live[p % live.len()].0.clone(), until))
                    .collect();
                self.mem.extend_leases(&cap(*c), &leases).await.unwrap();
                self.red.extend_leases(&cap(*c), &leases).await.unwrap();
                self.clock.end(s, &[], op);
                if self.model.extend(*c, &leases) > 0 {
                    self.count("extend: lease extended");
                }
            }
            Op::Cancel { pick } | Op::Redrive { pick } => {
                // Mostly a task that can be redriven (cancelled) when there is one.
                let wanted = |t: &&ModelTask| {
                    (t.status == TaskStatus::Failed) == matches!(op, Op::Redrive { .. })
                        && !(t.status.is_terminal() && matches!(op, Op::Cancel { .. }))
                };
                let mut ids: Vec<TaskId> = self
                    .model
                    .tasks
                    .iter()
                    .filter(wanted)
                    .map(|t| t.id.clone())
                    .collect();
                if ids.is_empty() || pick % 4 == 0 {
                    ids = self.model.tasks.iter().map(|t| t.id.clone()).collect();
                    ids.extend(self.model.absent.iter().cloned());
                    ids.push(TaskId::generate());
                }
                let id = ids[pick / 4 % ids.len()].clone();
                if matches!(op, Op::Cancel { .. }) {
                    // Queues a callback now: away from callbacks coming due.
                    let avoid = self.model.outbox();
                    let s = self.clock.begin(&avoid).await;
                    let a = self.mem.cancel(&id, RETENTION).await.unwrap();
                    let b = self.red.cancel(&id, RETENTION).await.unwrap();
                    let w = self.clock.end(s, &avoid, op);
                    let want = self.model.cancel(&id, w);
                    self.same("cancel", &want, &a, &b);
                    self.count(match want {
                        CancelOutcome::Cancelled => "cancel: cancelled",
                        CancelOutcome::AlreadyFinished(_) => "cancel: already finished",
                        CancelOutcome::NotFound => "cancel: not found",
                    });
                } else {
                    // Queues the step now: away from backoffs ending, for a clear order.
                    let avoid = self.model.backoffs();
                    let s = self.clock.begin(&avoid).await;
                    let a = self.mem.redrive(&id, RETENTION).await.unwrap();
                    let b = self.red.redrive(&id, RETENTION).await.unwrap();
                    let w = self.clock.end(s, &avoid, op);
                    let want = self.model.redrive(&id, w);
                    self.same("redrive", &want, &a, &b);
                    self.count(match want {
                        RedriveOutcome::Redriven(_) => "redrive: redriven",
                        RedriveOutcome::NotFailed(_) => "redrive: not failed",
                        // The model never purges dead letters.
                        RedriveOutcome::Purged => "redrive: purged",
                        RedriveOutcome::NotFound => "redrive: not found",
                    });
                }
            }
            Op::Promote { wait } => {
                if *wait {
                    wait_past(&self.model.backoffs()).await;
                }
                let avoid = self.model.backoffs();
                let s = self.clock.begin(&avoid).await;
                let mut got = Vec::new();
                for c in &self.caps {
                    let a = self.mem.promote_due(c).await.unwrap();
                    let b = self.red.promote_due(c).await.unwrap();
                    got.push((a, b));
                }
                let w = self.clock.end(s, &avoid, op);
                for (c, (a, b)) in got.into_iter().enumerate() {
                    let want = self.model.promote(c, w);
                    self.same("promoted", &want, &a, &b);
                    for _ in 0..want {
                        self.count("promote: step promoted");
                    }
                }
            }
            Op::ClaimCallbacks {
                limit,
                visibility_ms,
                max_attempts,
            } => {
                // Due or not is clear for every entry, and the new due times are apart
                // from the others.
                let mut avoid = self.model.outbox();
                let shifted: Vec<Window> =
                    avoid.iter().map(|w| w.earlier(*visibility_ms)).collect();
                avoid.extend(shifted);
                let visibility = Duration::from_millis(*visibility_ms);
                let s = self.clock.begin(&avoid).await;
                let a = self
                    .mem
                    .claim_callbacks(*limit, visibility, *max_attempts)
                    .await
                    .unwrap();
                let b = self
                    .red
                    .claim_callbacks(*limit, visibility, *max_attempts)
                    .await
                    .unwrap();
                let w = self.clock.end(s, &avoid, op);
                let want = self
                    .model
                    .claim_callbacks(*limit, *visibility_ms, *max_attempts, w);
                let (a, b) = (self.norm_callbacks(a), self.norm_callbacks(b));
                self.same("claimed callbacks", &want, &a, &b);
                for _ in &want {
                    self.count("callback: delivery attempt claimed");
                }
            }
            Op::FinishCallback {
                pick,
                result,
                delay_ms,
            } => {
                if self.model.callback_claims.is_empty() {
                    return;
                }
                let claims = &self.model.callback_claims;
                let (id, attempt) = claims[pick % claims.len()].clone();
                let result = match result {
                    0 => CallbackResult::Delivered,
                    1 => CallbackResult::Retry {
                        error: format!("attempt {attempt}: 503"),
                        delay: Duration::from_millis(*delay_ms),
                    },
                    _ => CallbackResult::Failed {
                        error: format!("attempt {attempt}: 410"),
                    },
                };
                let avoid: Vec<Window> = match &result {
                    CallbackResult::Retry { .. } => self
                        .model
                        .outbox()
                        .iter()
                        .map(|w| w.earlier(*delay_ms))
                        .collect(),
                    _ => Vec::new(),
                };
                let s = self.clock.begin(&avoid).await;
                let a = self
                    .mem
                    .finish_callback(&id, attempt, &result)
                    .await
                    .unwrap();
                let b = self
                    .red
                    .finish_callback(&id, attempt, &result)
                    .await
                    .unwrap();
                let w = self.clock.end(s, &avoid, op);
                let want = self.model.finish_callback(&id, attempt, &result, w);
                self.same("callback finished", &want, &a, &b);
                self.count(match (want, &result) {
                    (false, _) => "callback: finish of a superseded attempt",
                    (true, CallbackResult::Delivered) => "callback: delivered",
                    (true, CallbackResult::Retry { .. }) => "callback: retry",
                    (true, CallbackResult::Failed { .. }) => "callback: failed",
                });
            }
            Op::Signal {
                pick,
                name,
                payload,
            } => {
                let waits = |t: &&ModelTask| t.steps.iter().any(|s| s.wait.is_some());
                let mut ids: Vec<TaskId> = self
                    .model
                    .tasks
                    .iter()
                    .filter(waits)
                    .map(|t| t.id.clone())
                    .collect();
                if ids.is_empty() || pick % 5 == 0 {
                    ids = self.model.tasks.iter().map(|t| t.id.clone()).collect();
                    ids.push(TaskId::generate());
                }
                let id = ids[pick / 5 % ids.len()].clone();
                let signal = format!("s{name}");
                let payload = PAYLOADS[*payload];
                // Queues steps and starts timers now: away from backoffs and timers.
                let mut avoid = self.model.backoffs();
                avoid.extend(self.model.timers());
                avoid.extend(self.model.outbox());
                let s = self.clock.begin(&avoid).await;
                let a = self
                    .mem
                    .signal(&id, &signal, payload, RETENTION)
                    .await
                    .unwrap();
                let b = self
                    .red
                    .signal(&id, &signal, payload, RETENTION)
                    .await
                    .unwrap();
                let w = self.clock.end(s, &avoid, op);
                let want = self.model.signal(&id, &signal, payload, w);
                self.same("signal", &want, &a, &b);
                self.count(match want {
                    SignalOutcome::Delivered(_) => "signal: delivered",
                    SignalOutcome::Buffered => "signal: buffered",
                    SignalOutcome::UnknownSignal => "signal: unknown",
                    SignalOutcome::AlreadyReceived => "signal: already received",
                    SignalOutcome::Finished(_) => "signal: task finished",
                    SignalOutcome::NotFound => "signal: not found",
                });
            }
            Op::FireTimers { limit, wait } => {
                if *wait {
                    wait_past(&self.model.timers()).await;
                }
                let mut avoid = self.model.timers();
                avoid.extend(self.model.backoffs());
                avoid.extend(self.model.outbox());
                let s = self.clock.begin(&avoid).await;
                let a = self.mem.fire_timers(*limit, RETENTION).await.unwrap();
                let b = self.red.fire_timers(*limit, RETENTION).await.unwrap();
                let w = self.clock.end(s, &avoid, op);
                let want = self.model.fire(*limit, w);
                self.same("fired timers", &want, &a, &b);
                for f in &want {
                    self.count(match &f.advance.done {
                        Some(d) if d.status == TaskStatus::Failed => "timer: fired, task failed",
                        Some(_) => "timer: fired, task succeeded",
                        None => "timer: fired, task goes on",
                    });
                }
            }
            Op::Wait { ms } => tokio::time::sleep(Duration::from_millis(*ms)).await,
        }
    }

    fn norm_callbacks(&self, claims: Vec<CallbackClaim>) -> Vec<(RecordView, String, u32)> {
        claims
            .into_iter()
            .map(|c| {
                let CallbackClaim {
                    record,
                    url,
                    attempt,
                } = c;
                let task = self
                    .model
                    .find(&record.view.task_id)
                    .map(|i| &self.model.tasks[i]);
                let record = match task {
                    Some(t) => norm_record(record, t),
                    None => panic!("a callback claimed for an unknown task: {record:?}"),
                };
                (record, url, attempt)
            })
            .collect()
    }

    async fn claim(&mut self, c: usize, workers: &[WorkerId], op: &Op) -> Vec<ClaimView> {
        let s = self.clock.begin(&[]).await;
        let a = self.mem.claim(&cap(c), workers, LEASE).await.unwrap();
        let b = self.red.claim(&cap(c), workers, LEASE).await.unwrap();
        let w = self.clock.end(s, &[], op);
        let (want, deadlines): (Vec<ClaimView>, Vec<Window>) =
            self.model.claim(c, workers, w).into_iter().unzip();
        let (a, b) = (norm_claims(a, &deadlines), norm_claims(b, &deadlines));
        self.same("claims", &want, &a, &b);
        for _ in &want {
            self.count("claim: step leased");
        }
        want
    }

    async fn release(&mut self, step: &StepRef, why: ReleaseReason, op: &Op) -> ReleaseOutcome {
        let s = self.clock.begin(&[]).await;
        let a = self.mem.release(step, why).await.unwrap();
        let b = self.red.release(step, why).await.unwrap();
        self.clock.end(s, &[], op);
        let want = self.model.release(step, why);
        self.same("release", &want, &a, &b);
        self.count(match want {
            ReleaseOutcome::Released => "release: released",
            ReleaseOutcome::Stale => "release: not current",
            ReleaseOutcome::OverLimit => "release: over the free failures",
        });
        want
    }

    async fn submit(&mut self, op: &Op) {
        let Op::Submit {
            client,
            key,
            steps,
            links,
            priority,
            max_attempts,
            timeout_s,
            callback,
            pipeline,
        } = op
        else {
            unreachable!()
        };
        let needs: Vec<Vec<u32>> = (0..steps.len() as u32)
            .map(|i| match links[i as usize].0 {
                _ if i == 0 => Vec::new(),
                CHAIN => vec![i - 1],
                mask => (0..i).filter(|j| mask & (1 << j) != 0).collect(),
            })
            .collect();
        self.submitted += 1;
        let id = TaskId::generate();
        let task = NewTask {
            id: id.clone(),
            client: CLIENTS[*client].into(),
            pipeline: pipeline.then(|| PIPELINE.to_string()),
            steps: steps
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut step = PlannedStep::chain_link(
                        i as u32,
                        format!("s{i}"),
                        cap(*c),
                        *max_attempts,
                        timeout_s * 1000,
                    );
                    step.needs = needs[i].clone();
                    let (_, allow, router, mapped) = links[i];
                    step.allow_failure = allow;
                    let needed = needs.iter().any(|n| n.contains(&(i as u32)));
                    let first_need = needs[i].first().copied();
                    let plan = match mapped {
                        3 | 4 => Some(MapPlan {
                            over: "input.items".into(),
                            from: None,
                            path: vec!["items".into()],
                            concurrency: u32::from(mapped) - 2,
                        }),
                        5 => first_need.map(|n| MapPlan {
                            over: format!("s{n}.payload"),
                            from: Some(n),
                            path: vec!["payload".into()],
                            concurrency: 2,
                        }),
                        _ => None,
                    };
                    if let PlannedKind::Work {
                        router: r, map: m, ..
                    } = &mut step.kind
                    {
                        *r = router && needed && plan.is_none();
                        *m = plan;
                    }
                    step.kind = match mapped {
                        6 | 7 => PlannedKind::Wait {
                            signal: format!("s{i}"),
                            timeout_ms: if mapped == 6 {
                                3_600_000
                            } else {
                                SHORT_WAIT_MS
                            },
                            on_timeout: if allow {
                                OnTimeout::Continue
                            } else {
                                OnTimeout::Fail
                            },
                        },
                        8 => PlannedKind::Sleep { ms: SHORT_WAIT_MS },
                        _ => step.kind,
                    };
                    step
                })
                .collect(),
            input: json!({
                "n": self.submitted,
                "payload": payload_json(self.submitted),
                "items": (0..self.submitted % 4).map(payload_json).collect::<Vec<_>>(),
            })
            .to_string(),
            priority: *priority,
            idempotency_key: key.map(|k| format!("k{k}")),
            callback_url: callback.then(|| callback_url(&id)),
            request_id: format!("req-{}", self.submitted),
            budget: None,
            traceparent: None,
        };
        let limit = if *client == RATED { RATE } else { NO_LIMIT };
        // Queues a step now: away from backoffs ending; and from the rate limit's edge.
        let mut avoid = self.model.backoffs();
        if *client == RATED {
            avoid.extend(self.model.rate_edge());
        }
        let s = self.clock.begin(&avoid).await;
        let a = self
            .mem
            .submit(task.clone(), limit, RETENTION)
            .await
            .unwrap();
        let b = self
            .red
            .submit(task.clone(), limit, RETENTION)
            .await
            .unwrap();
        let w = self.clock.end(s, &avoid, op);
        let (want, wait) = self.model.submit(&task, *client, *key, w);
        self.same(
            "submit",
            &want,
            &norm_submit(a, wait),
            &norm_submit(b, wait),
        );
        self.count(match want {
            SubmitOutcome::Created => "submit: created",
            SubmitOutcome::Existing(_) => "submit: existing (idempotency key)",
            SubmitOutcome::RateLimited(_) => "submit: rate limited",
        });
    }

    async fn report(&mut self, report: ResultReport, jitter: f64) {
        // Queues a step now (next step), or at the end of a backoff: away from backoffs
        // ending, and so that its own backoff ends apart from theirs.
        let mut avoid = self.model.backoffs();
        avoid.extend(self.model.outbox());
        if let Some(delay) = self.model.predicted_backoff(&report, jitter) {
            let shifted: Vec<Window> = avoid.iter().map(|w| w.earlier(delay)).collect();
            avoid.extend(shifted);
        }
        let s = self.clock.begin(&avoid).await;
        let a = self
            .mem
            .report(&report, RETRY, jitter, RETENTION)
            .await
            .unwrap();
        let b = self
            .red
            .report(&report, RETRY, jitter, RETENTION)
            .await
            .unwrap();
        let w = self.clock.end(s, &avoid, &report);
        let (want, dispatched) = self.model.report(&report, jitter, w);
        let context = format!("{} (report {report:?}, jitter {jitter})", self.context);
        assert_eq!(
            norm_report(a, dispatched),
            want,
            "memory store, report, at {context}"
        );
        assert_eq!(
            norm_report(b, dispatched),
            want,
            "Redis store, report, at {context}"
        );
        self.count(match want {
            ReportOutcome::Discarded => "report: discarded",
            ReportOutcome::Replayed(_) => "report: replayed",
            ReportOutcome::Next { ref queued, .. } if queued.is_empty() => {
                "report: went on, nothing queued"
            }
            ReportOutcome::Next { .. } => "report: went on, steps queued",
            ReportOutcome::Done {
                status: TaskStatus::Succeeded,
                result: Some(_),
                ..
            } => "report: done, succeeded, result given",
            ReportOutcome::Retry { .. } => "report: retry after backoff",
            ReportOutcome::Done {
                status: TaskStatus::Succeeded,
                ..
            } => "report: done, succeeded",
            ReportOutcome::Done { .. } => "report: done, failed",
        });
        self.model.sent.push((report, jitter));
    }

    /// Everything both stores can be asked about the state agrees with the model.
    async fn check(&self) {
        self.model.check_invariants();
        for t in &self.model.tasks {
            let a = self
                .mem
                .get(&t.id)
                .await
                .unwrap()
                .expect("memory: task kept");
            let b = self
                .red
                .get(&t.id)
                .await
                .unwrap()
                .expect("Redis: task kept");
            let want = self.model.record(t);
            self.same("task view", &want, &norm_record(a, t), &norm_record(b, t));
        }
        for id in &self.model.absent {
            assert!(self.mem.get(id).await.unwrap().is_none(), "memory: {id}");
            assert!(self.red.get(id).await.unwrap().is_none(), "Redis: {id}");
        }
        let a = self.mem.stats(&self.caps, RETENTION).await.unwrap();
        let b = self.red.stats(&self.caps, RETENTION).await.unwrap();
        for (c, ((ca, a), (cb, b))) in a.into_iter().zip(b).enumerate() {
            assert_eq!((&ca, &cb), (&cap(c), &cap(c)));
            let (want, head) = self.model.stats(c);
            let what = format!("queue figures of {ca}");
            self.same(&what, &want, &norm_stats(a, head), &norm_stats(b, head));
        }
        let want = self.model.loads();
        let a = self.mem.worker_loads().await.unwrap();
        let b = self.red.worker_loads().await.unwrap();
        self.same("worker loads", &want, &a, &b);
        for (c, capability) in self.caps.iter().enumerate() {
            let want = self.model.dead_letters(c);
            let a = self.mem.dead_letters(capability, 100).await.unwrap();
            let b = self.red.dead_letters(capability, 100).await.unwrap();
            self.same("dead letters", &want, &a, &b);
        }
        let want = self.model.outbox().len() as u64;
        let a = self.mem.callbacks_pending().await.unwrap();
        let b = self.red.callbacks_pending().await.unwrap();
        self.same("callbacks pending", &want, &a, &b);
        let want: Vec<Capability> = self.model.caps_seen.iter().map(|c| cap(*c)).collect();
        let mut a = self.mem.capabilities().await.unwrap();
        let mut b = self.red.capabilities().await.unwrap();
        a.sort();
        b.sort();
        self.same("capabilities", &want, &a, &b);
    }
}

/// Runs one sequence on both stores and the model, checking after every operation.
async fn run(ops: Vec<Op>, redis: &RedisServer, tally: &Mutex<Tally>) {
    let mut run = Run {
        mem: MemoryStore::new(),
        red: if std::env::var("MODEL_TEST_MEMORY_ONLY").is_ok_and(|v| v == "1") {
            Box::new(MemoryStore::new())
        } else {
            Box::new(RedisStore::new(RedisPool::new(&redis.settings()).unwrap()))
        },
        model: Model::default(),
        clock: Clock::default(),
        caps: (0..CAPS.len()).map(cap).collect(),
        submitted: 0,
        tally,
        context: String::new(),
    };
    for (i, op) in ops.iter().enumerate() {
        run.context = format!("operation {i}: {op:?}");
        run.apply(op).await;
        run.check().await;
    }
    let mut tally = tally.lock().unwrap();
    *tally
        .entry("claim: lost step given to another worker")
        .or_default() += run.model.swaps;
    for t in &run.model.tasks {
        for s in &t.steps {
            let what = match s.status {
                StepStatus::Skipped if s.routed_out => "step at the end: skipped (routed out)",
                StepStatus::Skipped => "step at the end: skipped (its needs were)",
                StepStatus::Failed if s.allow_failure => "step at the end: failed, allowed",
                StepStatus::Cancelled => "step at the end: cancelled or stopped",
                _ => continue,
            };
            *tally.entry(what).or_default() += 1;
        }
        for s in t.steps.iter().filter(|s| s.map.is_some()) {
            let what = match (s.status, s.error.as_ref().and_then(|e| e.kind.as_deref())) {
                (StepStatus::Succeeded, _) => "map step at the end: succeeded",
                (StepStatus::Failed, Some("map_source")) => "map step at the end: map_source",
                (StepStatus::Failed, _) => "map step at the end: an instance failed it",
                _ => "map step at the end: other",
            };
            *tally.entry(what).or_default() += 1;
        }
        for s in t.steps.iter().filter(|s| s.router) {
            let what = match (s.status, s.error.as_ref().and_then(|e| e.kind.as_deref())) {
                (StepStatus::Succeeded, _) => "router at the end: succeeded",
                (StepStatus::Failed, Some("route")) => "router at the end: failed to route",
                _ => "router at the end: other",
            };
            *tally.entry(what).or_default() += 1;
        }
        if t.steps.iter().filter(|s| s.needs.is_empty()).count() > 1 {
            *tally.entry("task: several roots").or_default() += 1;
        }
    }
}

#[test]
fn stores_agree_with_each_other_and_the_model() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tally = Mutex::new(Tally::new());
    let mut runner = TestRunner::new(ProptestConfig {
        // PROPTEST_CASES runs a longer search.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(64),
        failure_persistence: None,
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    });
    let started = std::time::Instant::now();
    let result = runner.run(&prop::collection::vec(op(), 1..60), |ops| {
        rt.block_on(run(ops, &redis, &tally));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let tally = tally.into_inner().unwrap();
    eprintln!("model test: {:?}, outcomes: {tally:#?}", started.elapsed());
}

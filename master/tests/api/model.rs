//! Model-based test of the task store: random sequences of submit / claim / complete /
//! fail / lease expiry / release / cancel / redrive run on the Redis store and the
//! in-memory store in lockstep. After every operation both must answer the same, and the
//! state must satisfy the model's invariants (attempts never go back, a finished task has
//! nothing queued or leased, a claim never hands out a step that is not queued, queue
//! figures match the steps' states, a succeeded task's result is its last output).

use std::collections::HashMap;
use std::time::Duration;

use common::redis::RedisPool;
use common::testing::RedisServer;
use common::wire::{
    Capability, ReportStatus, ResultReport, StepError, StepRef, StepStatus, TaskId, TaskStatus,
    WorkerId,
};
use master::store::{
    MemoryStore, NewTask, PlannedStep, RateLimit, RedisStore, RetryPolicy, TaskStore,
    lease_expired_error,
};
use proptest::prelude::*;
use serde_json::json;

const CAPS: [&str; 2] = ["plan", "retrieve"];
const RETENTION: Duration = Duration::from_secs(3600);
const RETRY: RetryPolicy = RetryPolicy {
    base: Duration::from_millis(1),
    max: Duration::from_millis(1),
};

#[derive(Debug, Clone)]
enum Op {
    Submit {
        steps: Vec<usize>,
        priority: i32,
        max_attempts: u32,
    },
    Claim {
        cap: usize,
        n: usize,
    },
    Complete {
        pick: usize,
    },
    Fail {
        pick: usize,
        retryable: bool,
    },
    Expire {
        pick: usize,
    },
    Release {
        pick: usize,
    },
    Cancel {
        pick: usize,
    },
    Redrive {
        pick: usize,
    },
    Promote,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (prop::collection::vec(0..2usize, 1..4), -2..3i32, 1..4u32)
            .prop_map(|(steps, priority, max_attempts)| Op::Submit { steps, priority, max_attempts }),
        3 => (0..2usize, 1..4usize).prop_map(|(cap, n)| Op::Claim { cap, n }),
        3 => any::<usize>().prop_map(|pick| Op::Complete { pick }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, retryable)| Op::Fail { pick, retryable }),
        1 => any::<usize>().prop_map(|pick| Op::Expire { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Redrive { pick }),
        1 => Just(Op::Promote),
    ]
}

fn report(step: &StepRef, status: ReportStatus, error: Option<StepError>) -> ResultReport {
    ResultReport {
        task_id: step.task_id.clone(),
        step: step.step,
        attempt: step.attempt,
        worker_id: WorkerId::new("w").unwrap(),
        status,
        output: (status == ReportStatus::Succeeded)
            .then(|| json!({"step": step.step, "attempt": step.attempt})),
        error,
        duration_ms: None,
    }
}

/// Runs one sequence on both stores and checks them after every step.
async fn run(ops: Vec<Op>, redis: &RedisServer) {
    let mem = MemoryStore::new();
    let red = RedisStore::new(RedisPool::new(&redis.settings()).unwrap());
    let stores: [&dyn TaskStore; 2] = [&mem, &red];
    let caps: Vec<Capability> = CAPS.iter().map(|c| Capability::new(*c).unwrap()).collect();
    let mut tasks: Vec<TaskId> = Vec::new();
    // Attempts handed out and not yet known to be finished.
    let mut claimed: Vec<StepRef> = Vec::new();
    let mut highest_attempt: HashMap<(String, u32), u32> = HashMap::new();
    for op in ops {
        match op {
            Op::Submit {
                steps,
                priority,
                max_attempts,
            } => {
                let id = TaskId::generate();
                let task = NewTask {
                    id: id.clone(),
                    client: "c".into(),
                    pipeline: None,
                    steps: steps
                        .iter()
                        .map(|i| PlannedStep {
                            capability: caps[*i].clone(),
                            max_attempts,
                            timeout_ms: 60_000,
                        })
                        .collect(),
                    input: "{}".into(),
                    priority,
                    idempotency_key: None,
                    callback_url: None,
                    request_id: "r".into(),
                };
                let limit = RateLimit {
                    per_sec: 0.0,
                    burst: 1,
                };
                let a = mem.submit(task.clone(), limit, RETENTION).await.unwrap();
                let b = red.submit(task, limit, RETENTION).await.unwrap();
                assert_eq!(a, b);
                tasks.push(id);
            }
            Op::Claim { cap, n } => {
                let workers: Vec<WorkerId> = (0..n)
                    .map(|i| WorkerId::new(format!("w{i}")).unwrap())
                    .collect();
                let a = mem
                    .claim(&caps[cap], &workers, Duration::from_secs(60))
                    .await
                    .unwrap();
                let b = red
                    .claim(&caps[cap], &workers, Duration::from_secs(60))
                    .await
                    .unwrap();
                let key = |c: &master::store::Claimed| {
                    (c.work.step_ref(), c.worker.clone(), c.work.input.clone())
                };
                assert_eq!(
                    a.iter().map(key).collect::<Vec<_>>(),
                    b.iter().map(key).collect::<Vec<_>>(),
                    "both stores claim the same steps in the same order"
                );
                for c in a {
                    let r = c.work.step_ref();
                    let slot = highest_attempt
                        .entry((r.task_id.to_string(), r.step))
                        .or_default();
                    assert!(r.attempt > *slot, "attempts only go up");
                    *slot = r.attempt;
                    claimed.push(r);
                }
            }
            Op::Complete { pick }
            | Op::Fail { pick, .. }
            | Op::Expire { pick }
            | Op::Release { pick } => {
                if claimed.is_empty() {
                    continue;
                }
                let step = claimed.remove(pick % claimed.len());
                let (a, b) = match op {
                    Op::Release { .. } => {
                        let a = mem.release(&step).await.unwrap();
                        let b = red.release(&step).await.unwrap();
                        (format!("{a}"), format!("{b}"))
                    }
                    _ => {
                        let r = match op {
                            Op::Complete { .. } => report(&step, ReportStatus::Succeeded, None),
                            Op::Fail { retryable, .. } => report(
                                &step,
                                ReportStatus::Failed,
                                Some(StepError {
                                    message: "x".into(),
                                    retryable,
                                    kind: None,
                                }),
                            ),
                            _ => report(
                                &step,
                                ReportStatus::Failed,
                                Some(lease_expired_error(&WorkerId::new("w").unwrap())),
                            ),
                        };
                        let a = mem.report(&r, RETRY, 0.5, RETENTION).await.unwrap();
                        let b = red.report(&r, RETRY, 0.5, RETENTION).await.unwrap();
                        // Delays are computed from the same policy and jitter.
                        (format!("{a:?}"), format!("{b:?}"))
                    }
                };
                // Outcomes agree (dispatch timestamps may differ by a millisecond: compare
                // the kind of outcome and what follows from it).
                let norm = |s: &str| s.split("dispatched_at_ms").next().unwrap_or("").to_string();
                assert_eq!(norm(&a), norm(&b), "{a} vs {b}");
            }
            Op::Cancel { pick } | Op::Redrive { pick } => {
                if tasks.is_empty() {
                    continue;
                }
                let id = &tasks[pick % tasks.len()];
                if matches!(op, Op::Cancel { .. }) {
                    let a = mem.cancel(id, RETENTION).await.unwrap();
                    let b = red.cancel(id, RETENTION).await.unwrap();
                    assert_eq!(a, b);
                } else {
                    let a = mem.redrive(id).await.unwrap();
                    let b = red.redrive(id).await.unwrap();
                    assert_eq!(a, b);
                }
            }
            Op::Promote => {
                tokio::time::sleep(Duration::from_millis(3)).await;
                for cap in &caps {
                    let a = mem.promote_due(cap).await.unwrap();
                    let b = red.promote_due(cap).await.unwrap();
                    assert_eq!(a, b, "promoted");
                }
            }
        }
        check_invariants(&stores, &tasks, &caps).await;
    }
}

async fn check_invariants(stores: &[&dyn TaskStore; 2], tasks: &[TaskId], caps: &[Capability]) {
    let mut views = Vec::new();
    for store in stores {
        let mut per_store = Vec::new();
        let mut queued: HashMap<String, u64> = HashMap::new();
        let mut leased: HashMap<String, u64> = HashMap::new();
        for id in tasks {
            let view = store
                .get(id)
                .await
                .unwrap()
                .expect("tasks do not vanish within retention")
                .view;
            for s in &view.steps {
                match s.status {
                    StepStatus::Queued => *queued.entry(s.capability.to_string()).or_default() += 1,
                    StepStatus::Dispatched => {
                        *leased.entry(s.capability.to_string()).or_default() += 1
                    }
                    _ => {}
                }
                assert!(s.attempts <= 3, "tries never exceed max_attempts");
            }
            let active = view
                .steps
                .iter()
                .filter(|s| matches!(s.status, StepStatus::Queued | StepStatus::Dispatched))
                .count();
            if view.status.is_terminal() {
                assert_eq!(
                    active, 0,
                    "a finished task has nothing queued or leased: {view:?}"
                );
                assert!(view.finished_at_ms.is_some());
            } else {
                assert_eq!(
                    active, 1,
                    "a live task has exactly one active step: {view:?}"
                );
            }
            if view.status == TaskStatus::Succeeded {
                assert_eq!(view.result, view.steps.last().unwrap().output);
            }
            let ordered = view
                .steps
                .iter()
                .skip_while(|s| s.status == StepStatus::Succeeded)
                .skip(1)
                .all(|s| s.status == StepStatus::Pending || view.status.is_terminal());
            assert!(ordered, "steps after the active one are pending: {view:?}");
            per_store.push((
                view.status,
                view.steps
                    .iter()
                    .map(|s| (s.status, s.attempts, s.output.clone()))
                    .collect::<Vec<_>>(),
            ));
        }
        let stats = store.stats(caps, RETENTION).await.unwrap();
        for (cap, s) in stats {
            assert_eq!(
                s.queued + s.delayed,
                queued.get(cap.as_str()).copied().unwrap_or(0),
                "queue figures for {cap}"
            );
            assert_eq!(
                s.in_flight,
                leased.get(cap.as_str()).copied().unwrap_or(0),
                "lease figures for {cap}"
            );
        }
        views.push(per_store);
    }
    assert_eq!(views[0], views[1], "memory and Redis stores agree");
}

#[test]
fn stores_agree_with_each_other_and_the_model() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in prop::collection::vec(op(), 1..40))| {
        rt.block_on(run(ops, &redis));
    });
}

//! The store conformance suite: the same scenarios against the Redis store (real
//! redis-server) and the in-memory store.

use std::sync::Arc;
use std::time::Duration;

use common::redis::RedisPool;
use common::wire::{
    CallbackStatus, CallbackView, Capability, ReportStatus, ResultReport, StepError, StepStatus,
    TaskId, TaskStatus, WorkerId,
};
use master::store::{
    CALLBACK_ABANDONED, CallbackResult, CancelOutcome, NewTask, PlannedStep, RateLimit, RedisStore,
    RedriveOutcome, ReleaseOutcome, ReleaseReason, ReportOutcome, RetryPolicy, SubmitOutcome,
    TaskStore,
};
use serde_json::json;
use testkit::RedisServer;

const RETENTION: Duration = Duration::from_secs(3600);
const NO_LIMIT: RateLimit = RateLimit {
    per_sec: 0.0,
    burst: 1,
};
const RETRY: RetryPolicy = RetryPolicy {
    base: Duration::from_millis(20),
    max: Duration::from_millis(40),
};

fn cap(c: &str) -> Capability {
    Capability::new(c).unwrap()
}

fn worker(w: &str) -> WorkerId {
    WorkerId::new(w).unwrap()
}

fn task(caps: &[&str], priority: i32, max_attempts: u32) -> NewTask {
    NewTask {
        id: TaskId::generate(),
        client: "alice".into(),
        pipeline: None,
        steps: caps
            .iter()
            .map(|c| PlannedStep {
                capability: cap(c),
                max_attempts,
                timeout_ms: 60_000,
            })
            .collect(),
        input: json!({"question": "q"}).to_string(),
        priority,
        idempotency_key: None,
        callback_url: None,
        request_id: "req-1".into(),
    }
}

fn ok(id: &TaskId, step: u32, attempt: u32, out: serde_json::Value) -> ResultReport {
    ResultReport {
        task_id: id.clone(),
        step,
        attempt,
        worker_id: worker("w1"),
        status: ReportStatus::Succeeded,
        output: Some(out),
        error: None,
        duration_ms: None,
    }
}

fn failed(id: &TaskId, step: u32, attempt: u32, retryable: bool) -> ResultReport {
    ResultReport {
        status: ReportStatus::Failed,
        output: None,
        error: Some(StepError {
            message: "boom".into(),
            retryable,
            kind: None,
        }),
        ..ok(id, step, attempt, json!(null))
    }
}

async fn submit(store: &dyn TaskStore, t: NewTask) -> TaskId {
    let id = t.id.clone();
    assert_eq!(
        store.submit(t, NO_LIMIT, RETENTION).await.unwrap(),
        SubmitOutcome::Created
    );
    id
}

/// The same report, from another worker.
fn by(mut r: ResultReport, w: &str) -> ResultReport {
    r.worker_id = worker(w);
    r
}

async fn report(store: &dyn TaskStore, r: ResultReport) -> ReportOutcome {
    store.report(&r, RETRY, 0.5, RETENTION).await.unwrap()
}

macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(std::sync::Arc::new(master::store::MemoryStore::new())).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let server = testkit::RedisServer::start();
                    super::$name(super::redis_store(&server)).await;
                }
            )*
        }
    };
}

fn redis_store(server: &RedisServer) -> Arc<dyn TaskStore> {
    Arc::new(RedisStore::new(RedisPool::new(&server.settings()).unwrap()))
}

both_stores!(
    pipeline_passes_outputs_and_context,
    stale_attempts_are_discarded,
    retries_then_dead_letter_then_redrive,
    release_spends_no_attempt,
    priority_then_fifo,
    cancel_removes_queued_and_dispatched_steps,
    idempotency_returns_the_first_task,
    rate_limit_per_client,
    expired_leases_are_listed_extended_and_lapsed,
    stats_and_worker_loads,
    failed_dispatches_are_free_only_a_few_times_in_a_row,
    a_lost_attempt_goes_to_another_worker,
    a_step_carries_the_step_before_not_the_whole_history,
    the_masters_own_report_of_a_lost_attempt_is_not_replayed,
    finished_tasks_with_a_callback_enter_the_outbox,
    a_callback_claim_never_finished_is_claimed_again_after_its_visibility,
    a_redriven_task_leaves_the_outbox,
);

async fn failed_dispatches_are_free_only_a_few_times_in_a_row(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let plan = cap("plan");
    let id = submit(s, task(&["plan"], 0, 3)).await;
    let mut attempt = 0;
    for _ in 0..master::store::MAX_FREE_DISPATCH_FAILURES {
        let c = s
            .claim(&plan, &[worker("w1")], Duration::from_secs(10))
            .await
            .unwrap();
        attempt = c[0].work.attempt;
        assert_eq!(
            s.release(&c[0].work.step_ref(), ReleaseReason::Failure)
                .await
                .unwrap(),
            ReleaseOutcome::Released
        );
    }
    // Capacity refusals never count.
    let c = s
        .claim(&plan, &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        s.release(&c[0].work.step_ref(), ReleaseReason::Capacity)
            .await
            .unwrap(),
        ReleaseOutcome::Released
    );
    let c = s
        .claim(&plan, &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(c[0].work.attempt > attempt);
    assert_eq!(
        s.release(&c[0].work.step_ref(), ReleaseReason::Failure)
            .await
            .unwrap(),
        ReleaseOutcome::OverLimit,
        "one failed dispatch too many: the caller must spend the attempt"
    );
    let view = s.get(&id).await.unwrap().unwrap().view;
    assert_eq!(view.steps[0].status, StepStatus::Dispatched, "still leased");
    let mut r = failed(&id, 0, c[0].work.attempt, true);
    r.error.as_mut().unwrap().kind = Some("dispatch_failed".into());
    assert!(matches!(report(s, r).await, ReportOutcome::Retry { .. }));
    let view = s.get(&id).await.unwrap().unwrap().view;
    assert_eq!(view.steps[0].attempts, 1, "the attempt was spent");
}

async fn a_lost_attempt_goes_to_another_worker(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let plan = cap("plan");
    let id = submit(s, task(&["plan"], 0, 3)).await;
    s.claim(&plan, &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    let mut lapse = failed(&id, 0, 1, true);
    lapse.error = Some(master::store::lease_expired_error(&worker("w1")));
    assert!(matches!(
        report(s, lapse).await,
        ReportOutcome::Retry { .. }
    ));
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(s.promote_due(&plan).await.unwrap(), 1);
    // w1 comes first in the batch, but the step was lost on it: w2 gets it.
    let c = s
        .claim(
            &plan,
            &[worker("w1"), worker("w2")],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].worker, worker("w2"));
    // With no other worker in the batch, w1 still gets it (better late than never).
    let mut lapse = by(failed(&id, 0, 2, true), "w2");
    lapse.error = Some(master::store::lease_expired_error(&worker("w2")));
    assert!(matches!(
        report(s, lapse).await,
        ReportOutcome::Retry { .. }
    ));
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(s.promote_due(&plan).await.unwrap(), 1);
    let c = s
        .claim(&plan, &[worker("w2")], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(c[0].worker, worker("w2"));
}

async fn a_step_carries_the_step_before_not_the_whole_history(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let id = submit(s, task(&["plan", "retrieve", "evaluate"], 0, 3)).await;
    for (step, capability) in ["plan", "retrieve"].into_iter().enumerate() {
        let c = s
            .claim(&cap(capability), &[worker("w1")], Duration::from_secs(10))
            .await
            .unwrap();
        let big = json!({"from": capability, "blob": "x".repeat(1000)});
        report(s, ok(&id, step as u32, c[0].work.attempt, big)).await;
    }
    let c = s
        .claim(&cap("evaluate"), &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    let w = &c[0].work;
    assert_eq!(w.input["from"], "retrieve");
    assert_eq!(w.context.task_input, json!({"question": "q"}));
    assert_eq!(w.context.previous.len(), 1, "only the step before");
    assert_eq!(w.context.previous[0].step, 1);
    assert_eq!(w.context.previous[0].capability, cap("retrieve"));
}

async fn the_masters_own_report_of_a_lost_attempt_is_not_replayed(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let id = submit(s, task(&["plan"], 0, 3)).await;
    s.claim(&cap("plan"), &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    let mut lapse = failed(&id, 0, 1, true);
    lapse.error = Some(master::store::lease_expired_error(&worker("w1")));
    assert!(matches!(
        report(s, lapse.clone()).await,
        ReportOutcome::Retry { .. }
    ));
    // The worker's own late failure of that attempt was not what got recorded.
    assert_eq!(
        report(s, failed(&id, 0, 1, true)).await,
        ReportOutcome::Discarded
    );
}

async fn pipeline_passes_outputs_and_context(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let id = submit(s, task(&["plan", "retrieve"], 0, 3)).await;
    let view = s.get(&id).await.unwrap().unwrap().view;
    assert_eq!(view.status, TaskStatus::Queued);
    assert_eq!(view.steps[0].status, StepStatus::Queued);
    assert_eq!(view.steps[1].status, StepStatus::Pending);

    assert!(
        s.claim(&cap("retrieve"), &[worker("w1")], Duration::from_secs(10))
            .await
            .unwrap()
            .is_empty()
    );
    let c = s
        .claim(
            &cap("plan"),
            &[worker("w1"), worker("w2")],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(c.len(), 1, "one step queued");
    let w = &c[0].work;
    assert_eq!((w.step, w.attempt), (0, 1));
    assert_eq!(w.input, json!({"question": "q"}));
    assert_eq!(w.context.task_input, json!({"question": "q"}));
    assert!(w.context.previous.is_empty());
    assert_eq!(w.context.total_steps, 2);
    assert_eq!(c[0].worker, worker("w1"));
    assert_eq!(c[0].request_id, "req-1");
    let view = s.get(&id).await.unwrap().unwrap().view;
    assert_eq!(view.status, TaskStatus::Running);
    assert_eq!(view.steps[0].status, StepStatus::Dispatched);
    assert_eq!(view.steps[0].attempts, 1);
    assert_eq!(s.worker_loads().await.unwrap().get("w1"), Some(&1));

    let out = report(s, ok(&id, 0, 1, json!({"plan": ["a"]}))).await;
    assert!(
        matches!(out, ReportOutcome::Next { ref next, .. } if next == &cap("retrieve")),
        "{out:?}"
    );
    assert_eq!(
        s.worker_loads()
            .await
            .unwrap()
            .get("w1")
            .copied()
            .unwrap_or(0),
        0
    );

    let c = s
        .claim(&cap("retrieve"), &[worker("w2")], Duration::from_secs(10))
        .await
        .unwrap();
    let w = &c[0].work;
    assert_eq!(w.step, 1);
    assert_eq!(
        w.input,
        json!({"plan": ["a"]}),
        "step 1's input is step 0's output"
    );
    assert_eq!(w.context.previous.len(), 1);
    assert_eq!(w.context.previous[0].capability, cap("plan"));
    assert_eq!(w.context.previous[0].output, json!({"plan": ["a"]}));

    // Only the worker holding the lease can complete the step.
    assert_eq!(
        report(s, ok(&id, 1, 1, json!("not w1's"))).await,
        ReportOutcome::Discarded
    );
    let out = report(s, by(ok(&id, 1, 1, json!("final")), "w2")).await;
    assert!(
        matches!(
            out,
            ReportOutcome::Done {
                status: TaskStatus::Succeeded,
                ..
            }
        ),
        "{out:?}"
    );
    let view = s.get(&id).await.unwrap().unwrap().view;
    assert_eq!(view.status, TaskStatus::Succeeded);
    assert_eq!(view.result, Some(json!("final")));
    assert!(view.finished_at_ms.is_some());
    assert_eq!(view.steps[1].worker_id, Some(worker("w2")));
}

async fn stale_attempts_are_discarded(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let id = submit(s, task(&["plan"], 0, 3)).await;
    s.claim(&cap("plan"), &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    // The attempt lapses (as the reaper does) and is dispatched again.
    let lapsed = report(s, failed(&id, 0, 1, true)).await;
    assert!(matches!(lapsed, ReportOutcome::Retry { .. }));
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(s.promote_due(&cap("plan")).await.unwrap(), 1);
    let c = s
        .claim(&cap("plan"), &[worker("w2")], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(c[0].work.attempt, 2);
    // The first worker reports late: discarded; the second's report counts.
    assert_eq!(
        report(s, ok(&id, 0, 1, json!("late"))).await,
        ReportOutcome::Discarded
    );
    let done = report(s, by(ok(&id, 0, 2, json!("on time")), "w2")).await;
    assert!(matches!(done, ReportOutcome::Done { .. }));
    // The same report again (its first answer was lost): the first outcome, replayed;
    // nothing changes.
    assert_eq!(
        report(s, by(ok(&id, 0, 2, json!("twice")), "w2")).await,
        ReportOutcome::Replayed(Box::new(done))
    );
    let view = s.get(&id).await.unwrap().unwrap().view;
    assert_eq!(view.result, Some(json!("on time")));
    // Unknown task and out-of-range step: discarded, not an error.
    assert_eq!(
        report(s, ok(&TaskId::generate(), 0, 1, json!(1))).await,
        ReportOutcome::Discarded
    );
    assert_eq!(
        report(s, ok(&id, 7, 1, json!(1))).await,
        ReportOutcome::Discarded
    );
}

async fn retries_then_dead_letter_then_redrive(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let plan = cap("plan");
    let id = submit(s, task(&["plan"], 0, 2)).await;
    s.claim(&plan, &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    let out = report(s, failed(&id, 0, 1, true)).await;
    let ReportOutcome::Retry { delay, .. } = out else {
        panic!("{out:?}")
    };
    assert!(
        delay >= Duration::from_millis(10) && delay <= Duration::from_millis(20),
        "{delay:?}"
    );
    assert!(
        s.claim(&plan, &[worker("w1")], Duration::from_secs(10))
            .await
            .unwrap()
            .is_empty(),
        "a retry waits out its backoff"
    );
    let stats = s
        .stats(std::slice::from_ref(&plan), RETENTION)
        .await
        .unwrap();
    assert_eq!((stats[0].1.queued, stats[0].1.delayed), (0, 1));
    tokio::time::sleep(Duration::from_millis(40)).await;
    s.promote_due(&plan).await.unwrap();
    let c = s
        .claim(&plan, &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(c[0].work.attempt, 2);
    let out = report(s, failed(&id, 0, 2, true)).await;
    assert!(
        matches!(
            out,
            ReportOutcome::Done {
                status: TaskStatus::Failed,
                ..
            }
        ),
        "max attempts reached: {out:?}"
    );
    let view = s.get(&id).await.unwrap().unwrap().view;
    assert_eq!(view.status, TaskStatus::Failed);
    assert_eq!(view.error.as_ref().unwrap().message, "boom");
    assert_eq!(s.dead_letters(&plan, 10).await.unwrap(), vec![id.clone()]);

    assert_eq!(
        s.redrive(&id).await.unwrap(),
        RedriveOutcome::Redriven(plan.clone())
    );
    assert!(s.dead_letters(&plan, 10).await.unwrap().is_empty());
    assert!(matches!(
        s.redrive(&id).await.unwrap(),
        RedriveOutcome::NotFailed(_)
    ));
    let c = s
        .claim(&plan, &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(
        s.get(&id).await.unwrap().unwrap().view.steps[0].attempts,
        1,
        "attempts reset"
    );
    assert!(matches!(
        report(s, ok(&id, 0, c[0].work.attempt, json!(1))).await,
        ReportOutcome::Done {
            status: TaskStatus::Succeeded,
            ..
        }
    ));

    // A permanent failure dead-letters at once.
    let id2 = submit(s, task(&["plan"], 0, 5)).await;
    s.claim(&plan, &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(matches!(
        report(s, failed(&id2, 0, 1, false)).await,
        ReportOutcome::Done {
            status: TaskStatus::Failed,
            ..
        }
    ));
    assert_eq!(
        s.redrive(&TaskId::generate()).await.unwrap(),
        RedriveOutcome::NotFound
    );
}

async fn release_spends_no_attempt(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let plan = cap("plan");
    let first = submit(s, task(&["plan"], 0, 1)).await;
    let second = submit(s, task(&["plan"], 0, 1)).await;
    let c = s
        .claim(&plan, &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(c[0].work.task_id, first);
    assert_eq!(
        s.release(&c[0].work.step_ref(), ReleaseReason::Capacity)
            .await
            .unwrap(),
        ReleaseOutcome::Released
    );
    assert_eq!(
        s.release(&c[0].work.step_ref(), ReleaseReason::Capacity)
            .await
            .unwrap(),
        ReleaseOutcome::Stale,
        "released once"
    );
    let view = s.get(&first).await.unwrap().unwrap().view;
    assert_eq!(
        (view.steps[0].status, view.steps[0].attempts),
        (StepStatus::Queued, 0)
    );
    assert_eq!(
        s.worker_loads()
            .await
            .unwrap()
            .get("w1")
            .copied()
            .unwrap_or(0),
        0
    );
    // It keeps its place in the queue, and its next attempt has a new fencing number.
    let c = s
        .claim(&plan, &[worker("w2")], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(c[0].work.task_id, first);
    assert_eq!(c[0].work.attempt, 2);
    assert_eq!(
        report(s, ok(&first, 0, 1, json!(1))).await,
        ReportOutcome::Discarded
    );
    assert!(matches!(
        report(s, by(ok(&first, 0, 2, json!(1)), "w2")).await,
        ReportOutcome::Done { .. }
    ));
    let c = s
        .claim(&plan, &[worker("w2")], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(c[0].work.task_id, second);
}

async fn priority_then_fifo(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let low = submit(s, task(&["plan"], -5, 1)).await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    let a = submit(s, task(&["plan"], 0, 1)).await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    let b = submit(s, task(&["plan"], 0, 1)).await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    let high = submit(s, task(&["plan"], 10, 1)).await;
    let ws: Vec<WorkerId> = (0..4).map(|i| worker(&format!("w{i}"))).collect();
    let order: Vec<TaskId> = s
        .claim(&cap("plan"), &ws, Duration::from_secs(10))
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.work.task_id)
        .collect();
    assert_eq!(order, vec![high, a, b, low]);
}

async fn cancel_removes_queued_and_dispatched_steps(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let plan = cap("plan");
    let queued = submit(s, task(&["plan"], 0, 1)).await;
    assert_eq!(
        s.cancel(&queued, RETENTION).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert!(
        s.claim(&plan, &[worker("w1")], Duration::from_secs(10))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.get(&queued).await.unwrap().unwrap().view.status,
        TaskStatus::Cancelled
    );

    let running = submit(s, task(&["plan"], 0, 1)).await;
    s.claim(&plan, &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        s.cancel(&running, RETENTION).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        s.worker_loads()
            .await
            .unwrap()
            .get("w1")
            .copied()
            .unwrap_or(0),
        0
    );
    assert_eq!(
        report(s, ok(&running, 0, 1, json!(1))).await,
        ReportOutcome::Discarded
    );
    assert_eq!(
        s.cancel(&running, RETENTION).await.unwrap(),
        CancelOutcome::AlreadyFinished(TaskStatus::Cancelled)
    );
    assert_eq!(
        s.cancel(&TaskId::generate(), RETENTION).await.unwrap(),
        CancelOutcome::NotFound
    );
    let stats = s.stats(&[plan], RETENTION).await.unwrap();
    assert_eq!((stats[0].1.queued, stats[0].1.in_flight), (0, 0));
}

async fn idempotency_returns_the_first_task(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let mut t = task(&["plan"], 0, 1);
    t.idempotency_key = Some("order-42".into());
    let first = submit(s, t.clone()).await;
    let mut again = t.clone();
    again.id = TaskId::generate();
    assert_eq!(
        s.submit(again, NO_LIMIT, RETENTION).await.unwrap(),
        SubmitOutcome::Existing(first.clone())
    );
    let mut other_client = t.clone();
    other_client.id = TaskId::generate();
    other_client.client = "bob".into();
    assert_eq!(
        s.submit(other_client, NO_LIMIT, RETENTION).await.unwrap(),
        SubmitOutcome::Created,
        "keys are per client"
    );
    let c = s
        .claim(
            &cap("plan"),
            &[worker("a"), worker("b"), worker("c")],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(c.len(), 2, "the repeat queued nothing");
}

async fn rate_limit_per_client(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let limit = RateLimit {
        per_sec: 1.0,
        burst: 3,
    };
    for _ in 0..3 {
        assert_eq!(
            s.submit(task(&["plan"], 0, 1), limit, RETENTION)
                .await
                .unwrap(),
            SubmitOutcome::Created
        );
    }
    match s
        .submit(task(&["plan"], 0, 1), limit, RETENTION)
        .await
        .unwrap()
    {
        SubmitOutcome::RateLimited(wait) => assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        ),
        other => panic!("expected a rate limit, got {other:?}"),
    }
    let mut bob = task(&["plan"], 0, 1);
    bob.client = "bob".into();
    assert_eq!(
        s.submit(bob, limit, RETENTION).await.unwrap(),
        SubmitOutcome::Created,
        "limits are per client"
    );
}

async fn expired_leases_are_listed_extended_and_lapsed(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let plan = cap("plan");
    let id = submit(s, task(&["plan"], 0, 3)).await;
    s.claim(&plan, &[worker("w1")], Duration::from_millis(30))
        .await
        .unwrap();
    assert!(s.expired_leases(&plan, 10).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let expired = s.expired_leases(&plan, 10).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].worker, worker("w1"));
    assert_eq!((expired[0].step.step, expired[0].step.attempt), (0, 1));
    s.extend_leases(
        &plan,
        &[(expired[0].step.clone(), common::wire::now_ms() + 10_000)],
    )
    .await
    .unwrap();
    assert!(
        s.expired_leases(&plan, 10).await.unwrap().is_empty(),
        "extended"
    );
    // A finished step's lease entry is dropped, never listed.
    report(s, ok(&id, 0, 1, json!(1))).await;
    assert!(s.expired_leases(&plan, 10).await.unwrap().is_empty());
}

async fn stats_and_worker_loads(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let plan = cap("plan");
    for _ in 0..3 {
        submit(s, task(&["plan"], 0, 1)).await;
    }
    s.claim(&plan, &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    let stats = s
        .stats(&[plan.clone(), cap("retrieve")], RETENTION)
        .await
        .unwrap();
    assert_eq!(stats[0].0, plan);
    assert_eq!(
        (
            stats[0].1.queued,
            stats[0].1.in_flight,
            stats[0].1.dead_lettered
        ),
        (2, 1, 0)
    );
    assert!(stats[0].1.head_queued_at_ms.is_some());
    assert_eq!(stats[1].1, master::store::QueueStats::default());
    assert_eq!(s.worker_loads().await.unwrap().get("w1"), Some(&1));
    assert!(
        s.capabilities().await.unwrap().contains(&plan),
        "inline capabilities are remembered"
    );
    s.ping().await.unwrap();
}

/// A one-step task with a callback URL.
fn with_callback(url: &str, max_attempts: u32) -> NewTask {
    NewTask {
        callback_url: Some(url.into()),
        ..task(&["plan"], 0, max_attempts)
    }
}

/// Claims step 0 of `id` for w1 and reports it.
async fn finish(s: &dyn TaskStore, succeed: bool) {
    let claimed = s
        .claim(&cap("plan"), &[worker("w1")], Duration::from_secs(60))
        .await
        .unwrap();
    let work = &claimed[0].work;
    let r = if succeed {
        ok(&work.task_id, 0, work.attempt, json!("done"))
    } else {
        failed(&work.task_id, 0, work.attempt, false)
    };
    assert!(matches!(report(s, r).await, ReportOutcome::Done { .. }));
}

async fn callback_of(s: &dyn TaskStore, id: &TaskId) -> Option<CallbackView> {
    s.get(id).await.unwrap().unwrap().view.callback
}

fn delivery(url: &str, status: CallbackStatus, attempts: u32, err: Option<&str>) -> CallbackView {
    CallbackView {
        url: url.into(),
        status,
        attempts,
        last_error: err.map(String::from),
    }
}

const HOUR: Duration = Duration::from_secs(3600);

async fn finished_tasks_with_a_callback_enter_the_outbox(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let (a, b, c) = (
        "https://a.example/",
        "https://b.example/",
        "https://c.example/",
    );
    let succeeded = submit(s, with_callback(a, 1)).await;
    assert_eq!(
        callback_of(s, &succeeded).await,
        Some(delivery(a, CallbackStatus::Pending, 0, None)),
        "a running task's callback is pending with no attempt"
    );
    finish(s, true).await;
    let failed_task = submit(s, with_callback(b, 1)).await;
    finish(s, false).await;
    let plain = submit(s, task(&["plan"], 0, 1)).await;
    finish(s, true).await;
    assert_eq!(callback_of(s, &plain).await, None);
    let cancelled = submit(s, with_callback(c, 1)).await;
    assert_eq!(
        s.cancel(&cancelled, RETENTION).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(s.callbacks_pending().await.unwrap(), 3);

    let claims = s.claim_callbacks(10, HOUR, 8).await.unwrap();
    let mut got: Vec<(String, String, u32, &str)> = claims
        .iter()
        .map(|c| {
            (
                c.record.view.task_id.to_string(),
                c.url.clone(),
                c.attempt,
                c.record.view.status.as_str(),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        (succeeded.to_string(), a.to_string(), 1, "succeeded"),
        (failed_task.to_string(), b.to_string(), 1, "failed"),
        (cancelled.to_string(), c.to_string(), 1, "cancelled"),
    ];
    want.sort();
    assert_eq!(got, want);
    assert!(
        s.claim_callbacks(10, HOUR, 8).await.unwrap().is_empty(),
        "claimed entries are hidden for the visibility timeout"
    );
    assert_eq!(s.callbacks_pending().await.unwrap(), 3);

    // Delivered: out of the outbox, recorded once.
    let delivered = CallbackResult::Delivered;
    assert!(s.finish_callback(&succeeded, 1, &delivered).await.unwrap());
    assert!(!s.finish_callback(&succeeded, 1, &delivered).await.unwrap());
    assert_eq!(
        callback_of(s, &succeeded).await,
        Some(delivery(a, CallbackStatus::Delivered, 1, None))
    );

    // Retried after a backoff, then failed for good.
    let retry = CallbackResult::Retry {
        error: "the receiver answered 500".into(),
        delay: Duration::from_millis(30),
    };
    assert!(s.finish_callback(&failed_task, 1, &retry).await.unwrap());
    assert_eq!(
        callback_of(s, &failed_task).await,
        Some(delivery(
            b,
            CallbackStatus::Pending,
            1,
            Some("the receiver answered 500")
        ))
    );
    let again = testkit::eventually(Duration::from_secs(5), || async {
        let claims = s.claim_callbacks(10, HOUR, 8).await.unwrap();
        (!claims.is_empty()).then_some(claims)
    })
    .await
    .expect("the retry comes due");
    assert_eq!(again.len(), 1);
    assert_eq!(
        (&again[0].record.view.task_id, again[0].attempt),
        (&failed_task, 2)
    );
    assert!(
        !s.finish_callback(&failed_task, 1, &delivered)
            .await
            .unwrap(),
        "an older attempt records nothing"
    );
    let gave_up = CallbackResult::Failed {
        error: "the receiver answered 404".into(),
    };
    assert!(s.finish_callback(&failed_task, 2, &gave_up).await.unwrap());
    assert_eq!(
        callback_of(s, &failed_task).await,
        Some(delivery(
            b,
            CallbackStatus::Failed,
            2,
            Some("the receiver answered 404")
        ))
    );
    // Only the cancelled task's claim is still out.
    assert_eq!(s.callbacks_pending().await.unwrap(), 1);
    assert!(
        !s.finish_callback(&TaskId::generate(), 1, &delivered)
            .await
            .unwrap()
    );
}

async fn a_callback_claim_never_finished_is_claimed_again_after_its_visibility(
    store: Arc<dyn TaskStore>,
) {
    let s = store.as_ref();
    let url = "https://hooks.example/done";
    let id = submit(s, with_callback(url, 1)).await;
    finish(s, true).await;
    let visibility = Duration::from_millis(100);
    let first = s.claim_callbacks(10, visibility, 3).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, 1);
    drop(first); // the claiming replica dies here
    assert!(
        s.claim_callbacks(10, visibility, 3)
            .await
            .unwrap()
            .is_empty()
    );
    let second = testkit::eventually(Duration::from_secs(5), || async {
        let claims = s.claim_callbacks(10, visibility, 3).await.unwrap();
        (!claims.is_empty()).then_some(claims)
    })
    .await
    .expect("the dead replica's claim is claimed again");
    assert_eq!(
        (&second[0].record.view.task_id, second[0].attempt),
        (&id, 2)
    );
    assert!(
        !s.finish_callback(&id, 1, &CallbackResult::Delivered)
            .await
            .unwrap(),
        "the first claim was taken over: its late outcome is not recorded"
    );
    // The third claim is the last allowed; when it too is never finished, the callback fails.
    let third = testkit::eventually(Duration::from_secs(5), || async {
        let claims = s.claim_callbacks(10, visibility, 3).await.unwrap();
        (!claims.is_empty()).then_some(claims)
    })
    .await
    .expect("claimed a third time");
    assert_eq!(third[0].attempt, 3);
    testkit::eventually(Duration::from_secs(5), || async {
        s.claim_callbacks(10, visibility, 3).await.unwrap();
        (s.callbacks_pending().await.unwrap() == 0).then_some(())
    })
    .await
    .expect("the abandoned callback leaves the outbox");
    assert_eq!(
        callback_of(s, &id).await,
        Some(delivery(
            url,
            CallbackStatus::Failed,
            3,
            Some(CALLBACK_ABANDONED)
        ))
    );
}

async fn a_redriven_task_leaves_the_outbox(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let url = "https://hooks.example/done";
    let id = submit(s, with_callback(url, 1)).await;
    finish(s, false).await;
    assert_eq!(s.callbacks_pending().await.unwrap(), 1);
    assert!(matches!(
        s.redrive(&id).await.unwrap(),
        RedriveOutcome::Redriven(_)
    ));
    assert_eq!(s.callbacks_pending().await.unwrap(), 0);
    assert_eq!(
        callback_of(s, &id).await,
        Some(delivery(url, CallbackStatus::Pending, 0, None))
    );
    assert!(s.claim_callbacks(10, HOUR, 8).await.unwrap().is_empty());
    finish(s, true).await;
    let claims = s.claim_callbacks(10, HOUR, 8).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(
        (claims[0].attempt, claims[0].record.view.status),
        (1, TaskStatus::Succeeded)
    );
}

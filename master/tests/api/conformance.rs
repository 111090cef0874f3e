//! The store conformance suite: the same scenarios against the Redis store (real
//! redis-server) and the in-memory store.

use std::sync::Arc;
use std::time::Duration;

use common::redis::RedisPool;
use common::wire::{
    CallbackStatus, CallbackView, Capability, OnTimeout, ReportStatus, ResultReport, StepError,
    StepStatus, TaskId, TaskStatus, TaskView, WorkRequest, WorkerId,
};
use master::store::search::{TaskCursor, TaskPage, TaskQuery, TaskSummary};
use master::store::{
    Advance, CALLBACK_ABANDONED, CallbackResult, CancelOutcome, FiredTimer, MapPlan, NewTask,
    PlannedKind, PlannedStep, RateLimit, RedisStore, RedriveOutcome, ReleaseOutcome, ReleaseReason,
    ReportOutcome, RetryPolicy, SignalOutcome, SubmitOutcome, TaskStore,
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
            .enumerate()
            .map(|(i, c)| {
                let unique = caps.iter().filter(|x| *x == c).count() == 1;
                let id = if unique {
                    c.to_string()
                } else {
                    format!("{c}-{i}")
                };
                PlannedStep::chain_link(i as u32, id, cap(c), max_attempts, 60_000)
            })
            .collect(),
        input: json!({"question": "q"}).to_string(),
        priority,
        idempotency_key: None,
        callback_url: None,
        request_id: "req-1".into(),
        budget: None,
        traceparent: None,
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
    ($group:ident { $($name:ident),* $(,)? }) => {
        mod $group {
            use super::*;
            both_stores!($($name),*);
        }
    };
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
    every_claim_of_a_traced_task_carries_its_traceparent,
    a_batch_of_reports_is_recorded_as_each_report_alone_would_be,
    a_batch_of_submits_is_stored_as_each_submit_alone_would_be,
);

/// `submit_many` (one pipeline in Redis) answers and stores each task as `submit` would,
/// in order: new tasks are created and queued by priority, a key used earlier in the batch
/// names the first task, the rate limit counts each task, another client has its own.
async fn a_batch_of_submits_is_stored_as_each_submit_alone_would_be(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let limit = RateLimit {
        per_sec: 0.01,
        burst: 4,
    };
    let keyed = |key: &str| {
        let mut t = task(&["plan"], 0, 1);
        t.idempotency_key = Some(key.into());
        t
    };
    let mut bob = task(&["plan"], 0, 1);
    bob.client = "bob".into();
    let batch = vec![
        task(&["plan"], 0, 1),
        keyed("k-1"),
        keyed("k-1"),
        task(&["plan", "retrieve"], 5, 1),
        task(&["plan"], 0, 1),
        task(&["plan"], 0, 1),
        bob,
    ];
    let ids: Vec<TaskId> = batch.iter().map(|t| t.id.clone()).collect();
    let outcomes: Vec<SubmitOutcome> = s
        .submit_many(batch, limit, RETENTION)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(outcomes[0], SubmitOutcome::Created);
    assert_eq!(outcomes[1], SubmitOutcome::Created);
    assert_eq!(outcomes[2], SubmitOutcome::Existing(ids[1].clone()));
    assert_eq!(outcomes[3], SubmitOutcome::Created);
    // The fourth token of alice's burst went to the last task created: the one after is
    // over it (a repeat of a key takes no token, as in `submit`).
    assert_eq!(outcomes[4], SubmitOutcome::Created);
    assert!(
        matches!(outcomes[5], SubmitOutcome::RateLimited(_)),
        "{:?}",
        outcomes[5]
    );
    assert_eq!(outcomes[6], SubmitOutcome::Created, "limits are per client");
    for i in [0, 1, 3, 4, 6] {
        let record = s
            .get(&ids[i])
            .await
            .unwrap()
            .expect("a created task is stored");
        assert_eq!(record.view.status, TaskStatus::Queued);
    }
    for i in [2, 5] {
        assert!(
            s.get(&ids[i]).await.unwrap().is_none(),
            "task {i} was stored"
        );
    }
    // Queued as five single submits would queue them: the higher priority first.
    let claimed = s
        .claim(&cap("plan"), &vec![worker("w"); 8], Duration::from_secs(10))
        .await
        .unwrap();
    let mut order: Vec<&TaskId> = claimed.iter().map(|c| &c.work.task_id).collect();
    assert_eq!(
        order.len(),
        5,
        "each created task queued its first step once"
    );
    assert_eq!(order.remove(0), &ids[3]);
    order.sort();
    let mut rest = vec![&ids[0], &ids[1], &ids[4], &ids[6]];
    rest.sort();
    assert_eq!(order, rest);
    assert!(
        s.submit_many(Vec::new(), limit, RETENTION)
            .await
            .unwrap()
            .is_empty()
    );
}

/// `report_many` (one script call in Redis) answers and records each report as `report`
/// would, in order: a chain goes on, a repeat is a replay, a stale attempt is discarded,
/// a retryable failure is retried and a permanent one fails its task.
async fn a_batch_of_reports_is_recorded_as_each_report_alone_would_be(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let a = submit(s, task(&["plan", "retrieve"], 0, 3)).await;
    let b = submit(s, task(&["plan"], 0, 3)).await;
    let c = submit(s, task(&["plan"], 0, 1)).await;
    let claimed = s
        .claim(
            &cap("plan"),
            &[worker("w1"), worker("w1"), worker("w1")],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    let outcomes = s
        .report_many(
            &[
                ok(&a, 0, 1, json!({"x": 1})),
                ok(&a, 0, 1, json!({"x": 1})),
                ok(&b, 0, 9, json!("stale")),
                failed(&b, 0, 1, true),
                failed(&c, 0, 1, false),
            ],
            RETRY,
            RETENTION,
        )
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 5);
    assert!(
        matches!(&outcomes[0], ReportOutcome::Next { queued, .. } if queued == &vec![cap("retrieve")]),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes[1],
        ReportOutcome::Replayed(Box::new(outcomes[0].clone()))
    );
    assert_eq!(outcomes[2], ReportOutcome::Discarded);
    assert!(
        matches!(outcomes[3], ReportOutcome::Retry { .. }),
        "{outcomes:?}"
    );
    assert!(
        matches!(
            outcomes[4],
            ReportOutcome::Done {
                status: TaskStatus::Failed,
                ..
            }
        ),
        "{outcomes:?}"
    );
    // What they recorded: a's next step has the output as its input, c failed.
    let next = s
        .claim(&cap("retrieve"), &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].work.task_id, a);
    assert_eq!(next[0].work.input, json!({"x": 1}));
    let view = s.get(&c).await.unwrap().unwrap().view;
    assert_eq!(view.status, TaskStatus::Failed);
    assert_eq!(view.steps[0].status, StepStatus::Failed);
    // An empty batch records nothing and answers nothing.
    assert!(
        s.report_many(&[], RETRY, RETENTION)
            .await
            .unwrap()
            .is_empty()
    );
}

/// The submit's `traceparent` comes back with each claim of the task's steps, so each
/// attempt's span joins the client's trace; an untraced task's claims carry none.
async fn every_claim_of_a_traced_task_carries_its_traceparent(store: Arc<dyn TaskStore>) {
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let s = store.as_ref();
    let traced = submit(
        s,
        NewTask {
            traceparent: Some(TRACEPARENT.into()),
            ..task(&["plan", "retrieve"], 1, 3)
        },
    )
    .await;
    let untraced = submit(s, task(&["plan"], 0, 3)).await;
    let claimed = s
        .claim(
            &cap("plan"),
            &[worker("w1"), worker("w1")],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let of = |id: &TaskId| {
        claimed
            .iter()
            .find(|c| c.work.task_id == *id)
            .unwrap_or_else(|| panic!("{id} claimed"))
    };
    assert_eq!(of(&traced).traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(of(&untraced).traceparent, None);
    let attempt = of(&traced).work.attempt;
    report(s, failed(&traced, 0, attempt, true)).await;
    // The retry, once its backoff is over, and the next step carry it too.
    let again = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            s.promote_due(&cap("plan")).await.unwrap();
            let c = s
                .claim(&cap("plan"), &[worker("w1")], Duration::from_secs(10))
                .await
                .unwrap();
            if let Some(c) = c.into_iter().next() {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the retry is claimable after its backoff");
    assert_eq!(again.work.attempt, 2);
    assert_eq!(again.traceparent.as_deref(), Some(TRACEPARENT));
    report(s, ok(&traced, 0, 2, json!("planned"))).await;
    let next = s
        .claim(&cap("retrieve"), &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(
        next[0].work.input,
        json!("planned"),
        "the step before, read with it"
    );
}

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
    assert_eq!(w.context.previous[0].capability, Some(cap("retrieve")));
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
        matches!(out, ReportOutcome::Next { ref queued, .. } if queued == &[cap("retrieve")]),
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
    assert_eq!(w.context.previous[0].capability, Some(cap("plan")));
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
        s.redrive(&id, RETENTION).await.unwrap(),
        RedriveOutcome::Redriven(vec![plan.clone()])
    );
    assert!(s.dead_letters(&plan, 10).await.unwrap().is_empty());
    assert!(matches!(
        s.redrive(&id, RETENTION).await.unwrap(),
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
        s.redrive(&TaskId::generate(), RETENTION).await.unwrap(),
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
        s.redrive(&id, RETENTION).await.unwrap(),
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

// The workflow graph (docs/workflows.md, "The transitions, precisely"): the same cases
// against both stores.

both_stores!(graph {
    a_diamond_runs_both_branches_then_the_join,
    a_map_over_the_task_input_runs_at_most_its_concurrency_and_joins_in_order,
    a_map_over_a_needed_steps_output,
    an_empty_map_succeeds_at_once,
    a_map_source_that_is_not_an_array_or_too_wide_fails_the_step,
    a_router_picks_successors_and_what_depends_only_on_skipped_steps_is_skipped,
    a_router_that_names_no_successor_fails,
    an_allowed_failure_passes_its_error_on,
    signals_are_delivered_buffered_or_refused,
    a_wait_times_out_failing_or_continuing,
    a_sleep_succeeds_with_null,
    cancel_stops_every_branch,
    redrive_reruns_only_the_failed_and_stopped_branches,
    a_redriven_map_reruns_only_its_failed_and_stopped_instances,
    several_final_steps_make_an_object_result,
    a_map_whose_outputs_are_too_large_together_fails,
});

/// A worker step of a graph.
fn work(id: &str, capability: &str, needs: &[u32]) -> PlannedStep {
    PlannedStep {
        id: id.into(),
        needs: needs.to_vec(),
        allow_failure: false,
        kind: PlannedKind::Work {
            capability: cap(capability),
            max_attempts: 1,
            timeout_ms: 60_000,
            map: None,
            router: false,
        },
    }
}

/// A map step over `over` (`from`: the step whose output holds it).
fn map_step(
    id: &str,
    capability: &str,
    needs: &[u32],
    over: &str,
    from: Option<u32>,
    concurrency: u32,
) -> PlannedStep {
    let mut step = work(id, capability, needs);
    let mut segments = over.split('.').map(String::from);
    segments.next();
    if let PlannedKind::Work { map, .. } = &mut step.kind {
        *map = Some(MapPlan {
            over: over.into(),
            from,
            path: segments.collect(),
            concurrency,
        });
    }
    step
}

fn router(mut step: PlannedStep) -> PlannedStep {
    if let PlannedKind::Work { router, .. } = &mut step.kind {
        *router = true;
    }
    step
}

fn allowed(mut step: PlannedStep) -> PlannedStep {
    step.allow_failure = true;
    step
}

fn wait_step(id: &str, signal: &str, timeout_ms: u64, on: OnTimeout, needs: &[u32]) -> PlannedStep {
    PlannedStep {
        id: id.into(),
        needs: needs.to_vec(),
        allow_failure: false,
        kind: PlannedKind::Wait {
            signal: signal.into(),
            timeout_ms,
            on_timeout: on,
        },
    }
}

fn sleep_step(id: &str, ms: u64, needs: &[u32]) -> PlannedStep {
    PlannedStep {
        id: id.into(),
        needs: needs.to_vec(),
        allow_failure: false,
        kind: PlannedKind::Sleep { ms },
    }
}

fn graph(steps: Vec<PlannedStep>, input: serde_json::Value) -> NewTask {
    NewTask {
        steps,
        input: input.to_string(),
        ..task(&["plan"], 0, 1)
    }
}

/// Claims one step of `capability` for w1 (it must be queued).
async fn claim_one(s: &dyn TaskStore, capability: &str) -> WorkRequest {
    let mut c = s
        .claim(&cap(capability), &[worker("w1")], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(c.len(), 1, "one {capability} step queued");
    c.remove(0).work
}

/// Claims every queued step of `capability`.
async fn claim_all(s: &dyn TaskStore, capability: &str) -> Vec<WorkRequest> {
    let ws: Vec<WorkerId> = (0..50).map(|i| worker(&format!("w{i}"))).collect();
    s.claim(&cap(capability), &ws, Duration::from_secs(60))
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.work)
        .collect()
}

/// The report of a claimed step's success, from the worker it was claimed for.
fn done(w: &WorkRequest, out: serde_json::Value) -> ResultReport {
    by(
        ok(&w.task_id, w.step, w.attempt, out),
        w.worker_id.as_ref().unwrap().as_str(),
    )
}

/// The report of a claimed step's permanent failure.
fn broke(w: &WorkRequest) -> ResultReport {
    by(
        failed(&w.task_id, w.step, w.attempt, false),
        w.worker_id.as_ref().unwrap().as_str(),
    )
}

fn queued(caps: &[&str]) -> Vec<Capability> {
    caps.iter().map(|c| cap(c)).collect()
}

/// The capabilities a report queued, when the task went on.
fn next_of(out: &ReportOutcome) -> Vec<Capability> {
    match out {
        ReportOutcome::Next { queued, .. } => queued.clone(),
        other => panic!("expected Next, got {other:?}"),
    }
}

async fn view(s: &dyn TaskStore, id: &TaskId) -> TaskView {
    s.get(id).await.unwrap().unwrap().view
}

fn statuses(v: &TaskView) -> Vec<(String, StepStatus)> {
    v.steps.iter().map(|s| (s.id.clone(), s.status)).collect()
}

fn st(pairs: &[(&str, StepStatus)]) -> Vec<(String, StepStatus)> {
    pairs.iter().map(|(i, s)| (i.to_string(), *s)).collect()
}

async fn a_diamond_runs_both_branches_then_the_join(store: Arc<dyn TaskStore>) {
    use StepStatus::*;
    let s = store.as_ref();
    let id = submit(
        s,
        graph(
            vec![
                work("a", "plan", &[]),
                work("b", "retrieve", &[0]),
                work("c", "evaluate", &[0]),
                work("d", "finalize", &[1, 2]),
            ],
            json!({"q": 1}),
        ),
    )
    .await;
    let v = view(s, &id).await;
    assert_eq!(v.status, TaskStatus::Queued);
    assert_eq!(
        statuses(&v),
        st(&[
            ("a", Queued),
            ("b", Pending),
            ("c", Pending),
            ("d", Pending)
        ])
    );
    assert_eq!(v.steps[3].needs, vec!["b".to_string(), "c".to_string()]);
    let a = claim_one(s, "plan").await;
    assert_eq!(a.input, json!({"q": 1}), "a root gets the task input");
    assert_eq!(a.context.total_steps, 4);
    assert_eq!(a.context.step_id.as_deref(), Some("a"));
    let out = report(s, done(&a, json!("A"))).await;
    assert_eq!(
        next_of(&out),
        queued(&["retrieve", "evaluate"]),
        "both branches, in slot order"
    );
    let b = claim_one(s, "retrieve").await;
    let c = claim_one(s, "evaluate").await;
    for w in [&b, &c] {
        assert_eq!(w.input, json!("A"), "one need: its output");
        assert_eq!(w.context.previous.len(), 1);
        assert_eq!(w.context.previous[0].id, "a");
        assert_eq!(w.context.previous[0].step, 0);
        assert_eq!(w.context.previous[0].status, Succeeded);
    }
    assert_eq!(
        statuses(&view(s, &id).await),
        st(&[
            ("a", Succeeded),
            ("b", Dispatched),
            ("c", Dispatched),
            ("d", Pending)
        ])
    );
    assert_eq!(next_of(&report(s, done(&c, json!("C"))).await), vec![]);
    assert_eq!(
        view(s, &id).await.steps[3].status,
        Pending,
        "d still needs b"
    );
    assert_eq!(
        next_of(&report(s, done(&b, json!("B"))).await),
        queued(&["finalize"])
    );
    let d = claim_one(s, "finalize").await;
    assert_eq!(d.input, json!({"b": "B", "c": "C"}), "several needs: by id");
    let prev: Vec<(&str, u32, serde_json::Value)> = d
        .context
        .previous
        .iter()
        .map(|p| (p.id.as_str(), p.step, p.output.clone()))
        .collect();
    assert_eq!(prev, vec![("b", 1, json!("B")), ("c", 2, json!("C"))]);
    assert_eq!(d.context.previous[0].capability, Some(cap("retrieve")));
    let out = report(s, done(&d, json!("D"))).await;
    assert!(
        matches!(
            out,
            ReportOutcome::Done {
                status: TaskStatus::Succeeded,
                result: None,
                ..
            }
        ),
        "the reported step is the only final one: {out:?}"
    );
    let v = view(s, &id).await;
    assert_eq!(v.result, Some(json!("D")));
}

/// Claims and reports instances of `capability` until nothing is queued, checking that no
/// more than `bound` are ever queued or dispatched; reports the later-claimed first.
async fn run_instances(
    s: &dyn TaskStore,
    capability: &str,
    bound: u64,
    out: impl Fn(&WorkRequest) -> serde_json::Value,
) -> Vec<ReportOutcome> {
    let mut outcomes = Vec::new();
    loop {
        let stats = s.stats(&[cap(capability)], RETENTION).await.unwrap();
        assert!(
            stats[0].1.queued + stats[0].1.in_flight <= bound,
            "at most {bound} instances at once: {:?}",
            stats[0].1
        );
        let mut claimed = claim_all(s, capability).await;
        if claimed.is_empty() {
            return outcomes;
        }
        claimed.reverse();
        for w in claimed {
            outcomes.push(report(s, done(&w, out(&w))).await);
        }
    }
}

async fn a_map_over_the_task_input_runs_at_most_its_concurrency_and_joins_in_order(
    store: Arc<dyn TaskStore>,
) {
    let s = store.as_ref();
    // Elements whose text must survive as written: a big integer, a float, nesting.
    let input = r#"{"qs": [18446744073709551615, 0.1, {"k": [1, "two"]}, "four", null]}"#;
    let mut t = graph(
        vec![
            map_step("m", "retrieve", &[], "input.qs", None, 2),
            work("j", "finalize", &[0]),
        ],
        json!(null),
    );
    t.input = input.into();
    let id = submit(s, t).await;
    let v = view(s, &id).await;
    assert_eq!(v.status, TaskStatus::Queued);
    assert_eq!(v.steps[0].status, StepStatus::Running);
    let map = v.steps[0].map.clone().unwrap();
    assert_eq!((map.total, map.finished, map.concurrency), (Some(5), 0, 2));
    let ids: Vec<(&str, Option<u32>, StepStatus)> = v.steps[0]
        .instances
        .iter()
        .map(|i| (i.id.as_str(), i.element_index, i.status))
        .collect();
    assert_eq!(
        ids,
        vec![
            ("m[0]", Some(0), StepStatus::Queued),
            ("m[1]", Some(1), StepStatus::Queued),
            ("m[2]", Some(2), StepStatus::Pending),
            ("m[3]", Some(3), StepStatus::Pending),
            ("m[4]", Some(4), StepStatus::Pending),
        ]
    );
    let first = claim_all(s, "retrieve").await;
    assert_eq!(first.len(), 2, "concurrency 2");
    let elements: serde_json::Value = serde_json::from_str(input).unwrap();
    for w in &first {
        let i = w.context.element_index.unwrap();
        assert_eq!(w.input, elements["qs"][i as usize], "its element");
        assert_eq!(w.context.step_id, Some(format!("m[{i}]")));
        assert_eq!(w.context.total_steps, 2);
    }
    // The second finishes first: the next instance (element 2) is queued.
    let out = report(s, done(&first[1], json!({"i": 1}))).await;
    assert_eq!(next_of(&out), queued(&["retrieve"]));
    report(s, done(&first[0], json!({"i": 0}))).await;
    let outcomes = run_instances(
        s,
        "retrieve",
        2,
        |w| json!({"i": w.context.element_index.unwrap()}),
    )
    .await;
    assert_eq!(
        next_of(outcomes.last().unwrap()),
        queued(&["finalize"]),
        "the last instance finishes the map step: the join is queued"
    );
    let v = view(s, &id).await;
    assert_eq!(v.steps[0].status, StepStatus::Succeeded);
    assert_eq!(v.steps[0].map.as_ref().unwrap().finished, 5);
    let j = claim_one(s, "finalize").await;
    let want: Vec<serde_json::Value> = (0..5).map(|i| json!({"i": i})).collect();
    assert_eq!(j.input, json!(want), "outputs in element order");
    assert_eq!(j.context.previous[0].id, "m");
}

async fn a_map_over_a_needed_steps_output(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let id = submit(
        s,
        graph(
            vec![
                work("p", "plan", &[]),
                map_step("m", "retrieve", &[0], "p.items.0.subs", Some(0), 16),
            ],
            json!({}),
        ),
    )
    .await;
    let p = claim_one(s, "plan").await;
    let out = report(s, done(&p, json!({"items": [{"subs": ["x", "y"]}]}))).await;
    assert_eq!(next_of(&out), queued(&["retrieve"]));
    let mut inst = claim_all(s, "retrieve").await;
    assert_eq!(inst.len(), 2);
    inst.sort_by_key(|w| w.context.element_index);
    assert_eq!((&inst[0].input, &inst[1].input), (&json!("x"), &json!("y")));
    assert_eq!(inst[0].context.previous[0].id, "p", "its map step's needs");
    report(s, done(&inst[1], json!("Y"))).await;
    let out = report(s, done(&inst[0], json!("X"))).await;
    match out {
        ReportOutcome::Done {
            status: TaskStatus::Succeeded,
            result,
            ..
        } => assert_eq!(
            result,
            Some(json!(["X", "Y"])),
            "an instance is not the final step: the result is given"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(view(s, &id).await.result, Some(json!(["X", "Y"])));
}

async fn an_empty_map_succeeds_at_once(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let id = submit(
        s,
        graph(
            vec![
                map_step("m", "retrieve", &[], "input.qs", None, 4),
                work("j", "finalize", &[0]),
            ],
            json!({"qs": []}),
        ),
    )
    .await;
    let v = view(s, &id).await;
    assert_eq!(v.steps[0].status, StepStatus::Succeeded);
    assert_eq!(v.steps[0].output, Some(json!([])));
    assert!(v.steps[0].instances.is_empty());
    assert!(claim_all(s, "retrieve").await.is_empty());
    let j = claim_one(s, "finalize").await;
    assert_eq!(j.input, json!([]));
    // A task that is only an empty map has succeeded at submit.
    let only = submit(
        s,
        graph(
            vec![map_step("m", "retrieve", &[], "input", None, 4)],
            json!([]),
        ),
    )
    .await;
    let v = view(s, &only).await;
    assert_eq!(v.status, TaskStatus::Succeeded);
    assert_eq!(v.result, Some(json!([])));
}

async fn a_map_source_that_is_not_an_array_or_too_wide_fails_the_step(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let missing = submit(
        s,
        graph(
            vec![map_step("m", "retrieve", &[], "input.nope", None, 4)],
            json!({"qs": [1]}),
        ),
    )
    .await;
    let v = view(s, &missing).await;
    assert_eq!(v.status, TaskStatus::Failed);
    assert_eq!(v.steps[0].status, StepStatus::Failed);
    let e = v.error.unwrap();
    assert_eq!(
        (e.kind.as_deref(), e.retryable),
        (Some("map_source"), false)
    );
    assert_eq!(
        s.dead_letters(&cap("retrieve"), 10).await.unwrap(),
        vec![missing.clone()]
    );
    let wide: Vec<u32> = (0..=master::store::MAX_MAP_WIDTH as u32).collect();
    let too_wide = submit(
        s,
        graph(
            vec![map_step("m", "retrieve", &[], "input", None, 4)],
            json!(wide),
        ),
    )
    .await;
    let v = view(s, &too_wide).await;
    assert_eq!(v.status, TaskStatus::Failed);
    assert_eq!(v.error.unwrap().kind.as_deref(), Some("map_too_wide"));
    assert!(
        claim_all(s, "retrieve").await.is_empty(),
        "no instance made"
    );
    // A map step allowed to fail: its dependant runs and gets the error.
    let id = submit(
        s,
        graph(
            vec![
                work("p", "plan", &[]),
                allowed(map_step("m", "retrieve", &[0], "p.list", Some(0), 4)),
                work("j", "finalize", &[1]),
            ],
            json!({}),
        ),
    )
    .await;
    let p = claim_one(s, "plan").await;
    let out = report(s, done(&p, json!({"list": "not an array"}))).await;
    assert_eq!(next_of(&out), queued(&["finalize"]));
    let j = claim_one(s, "finalize").await;
    let prev = &j.context.previous[0];
    assert_eq!((prev.id.as_str(), prev.status), ("m", StepStatus::Failed));
    assert_eq!(prev.output, json!(null));
    assert_eq!(
        prev.error.as_ref().unwrap().kind.as_deref(),
        Some("map_source")
    );
    assert_eq!(view(s, &id).await.status, TaskStatus::Running);
}

async fn a_router_picks_successors_and_what_depends_only_on_skipped_steps_is_skipped(
    store: Arc<dyn TaskStore>,
) {
    use StepStatus::*;
    let s = store.as_ref();
    let id = submit(
        s,
        graph(
            vec![
                router(work("r", "plan", &[])),
                work("x", "retrieve", &[0]),
                work("y", "evaluate", &[0]),
                work("z", "evaluate", &[2]),
                work("j", "finalize", &[1, 3]),
            ],
            json!({}),
        ),
    )
    .await;
    let r = claim_one(s, "plan").await;
    let out = report(s, done(&r, json!({"next": "x", "why": "because"}))).await;
    assert_eq!(next_of(&out), queued(&["retrieve"]));
    assert_eq!(
        statuses(&view(s, &id).await),
        st(&[
            ("r", Succeeded),
            ("x", Queued),
            ("y", Skipped),
            ("z", Skipped),
            ("j", Pending),
        ])
    );
    assert!(claim_all(s, "evaluate").await.is_empty());
    let x = claim_one(s, "retrieve").await;
    assert_eq!(x.input, json!({"next": "x", "why": "because"}));
    let out = report(s, done(&x, json!("X"))).await;
    assert_eq!(
        next_of(&out),
        queued(&["finalize"]),
        "a join with one need that ran still runs"
    );
    let j = claim_one(s, "finalize").await;
    let prev: Vec<(&str, StepStatus, serde_json::Value)> = j
        .context
        .previous
        .iter()
        .map(|p| (p.id.as_str(), p.status, p.output.clone()))
        .collect();
    assert_eq!(
        prev,
        vec![("x", Succeeded, json!("X")), ("z", Skipped, json!(null))]
    );
    assert!(matches!(
        report(s, done(&j, json!("J"))).await,
        ReportOutcome::Done {
            status: TaskStatus::Succeeded,
            ..
        }
    ));
    // A list picks several.
    let id = submit(
        s,
        graph(
            vec![
                router(work("r", "plan", &[])),
                work("x", "retrieve", &[0]),
                work("y", "evaluate", &[0]),
            ],
            json!({}),
        ),
    )
    .await;
    let r = claim_one(s, "plan").await;
    let out = report(s, done(&r, json!({"next": ["y", "x"]}))).await;
    assert_eq!(next_of(&out), queued(&["retrieve", "evaluate"]));
    assert_eq!(view(s, &id).await.status, TaskStatus::Running);
}

async fn a_router_that_names_no_successor_fails(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    for bad in [
        json!({"next": "elsewhere"}),
        json!({"no": "next"}),
        json!("x"),
    ] {
        let id = submit(
            s,
            graph(
                vec![router(work("r", "plan", &[])), work("x", "retrieve", &[0])],
                json!({}),
            ),
        )
        .await;
        let r = claim_one(s, "plan").await;
        let out = report(s, done(&r, bad.clone())).await;
        assert!(
            matches!(
                out,
                ReportOutcome::Done {
                    status: TaskStatus::Failed,
                    ..
                }
            ),
            "{bad}: {out:?}"
        );
        let v = view(s, &id).await;
        assert_eq!(v.steps[0].status, StepStatus::Failed);
        assert_eq!(v.error.unwrap().kind.as_deref(), Some("route"), "{bad}");
        assert_eq!(v.steps[1].status, StepStatus::Pending);
    }
}

async fn an_allowed_failure_passes_its_error_on(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let id = submit(
        s,
        graph(
            vec![allowed(work("a", "plan", &[])), work("b", "retrieve", &[0])],
            json!({"q": 1}),
        ),
    )
    .await;
    let a = claim_one(s, "plan").await;
    let out = report(s, broke(&a)).await;
    assert_eq!(next_of(&out), queued(&["retrieve"]));
    let b = claim_one(s, "retrieve").await;
    let prev = &b.context.previous[0];
    assert_eq!(prev.status, StepStatus::Failed);
    assert_eq!(prev.output, json!(null));
    assert_eq!(prev.error.as_ref().unwrap().message, "boom");
    assert_eq!(b.context.task_input, json!({"q": 1}));
    assert!(matches!(
        report(s, done(&b, json!("B"))).await,
        ReportOutcome::Done {
            status: TaskStatus::Succeeded,
            ..
        }
    ));
    assert!(
        s.dead_letters(&cap("plan"), 10).await.unwrap().is_empty(),
        "an allowed failure is not dead-lettered"
    );
    assert_eq!(view(s, &id).await.result, Some(json!("B")));
}

async fn signals_are_delivered_buffered_or_refused(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let hour = 3_600_000;
    // Buffered: the signal comes before its wait step is reached.
    let early = submit(
        s,
        graph(
            vec![
                work("a", "plan", &[]),
                wait_step("w", "approve", hour, OnTimeout::Fail, &[0]),
                work("b", "retrieve", &[1]),
            ],
            json!({}),
        ),
    )
    .await;
    let sig = |id: TaskId, name: &'static str, payload: &'static str| async move {
        s.signal(&id, name, payload, RETENTION).await.unwrap()
    };
    assert_eq!(
        sig(early.clone(), "approve", r#"{"ok": true}"#).await,
        SignalOutcome::Buffered
    );
    assert_eq!(
        sig(early.clone(), "approve", "1").await,
        SignalOutcome::AlreadyReceived
    );
    assert_eq!(
        sig(early.clone(), "nope", "1").await,
        SignalOutcome::UnknownSignal
    );
    assert_eq!(
        sig(TaskId::generate(), "approve", "1").await,
        SignalOutcome::NotFound
    );
    let a = claim_one(s, "plan").await;
    let out = report(s, done(&a, json!("A"))).await;
    assert_eq!(
        next_of(&out),
        queued(&["retrieve"]),
        "the wait step took the kept signal at once"
    );
    let b = claim_one(s, "retrieve").await;
    assert_eq!(
        b.input,
        json!({"ok": true}),
        "the payload is the wait's output"
    );
    assert_eq!(b.context.previous[0].capability, None);

    // Delivered: the task waits at a root wait step.
    let id = submit(
        s,
        graph(
            vec![
                wait_step("w", "go", hour, OnTimeout::Fail, &[]),
                work("b", "retrieve", &[0]),
            ],
            json!({}),
        ),
    )
    .await;
    let v = view(s, &id).await;
    assert_eq!(v.status, TaskStatus::Waiting);
    assert_eq!(v.steps[0].status, StepStatus::Waiting);
    assert_eq!(v.steps[0].capability, None);
    assert!(v.steps[0].wakes_at_ms.is_some());
    assert!(v.started_at_ms.is_some());
    let got = sig(id.clone(), "go", r#""payload""#).await;
    assert_eq!(
        got,
        SignalOutcome::Delivered(Advance {
            queued: queued(&["retrieve"]),
            done: None,
        })
    );
    let v = view(s, &id).await;
    assert_eq!(v.status, TaskStatus::Running);
    assert_eq!(v.steps[0].output, Some(json!("payload")));
    assert_eq!(v.steps[0].wakes_at_ms, None);
    assert_eq!(
        sig(id.clone(), "go", "2").await,
        SignalOutcome::AlreadyReceived
    );
    let b = claim_one(s, "retrieve").await;
    report(s, done(&b, json!("B"))).await;
    assert_eq!(
        sig(id.clone(), "go", "3").await,
        SignalOutcome::Finished(TaskStatus::Succeeded)
    );
    // A signal that finishes the task.
    let last = submit(
        s,
        graph(
            vec![wait_step("w", "go", hour, OnTimeout::Fail, &[])],
            json!({}),
        ),
    )
    .await;
    match sig(last.clone(), "go", "7").await {
        SignalOutcome::Delivered(Advance {
            queued,
            done: Some(done),
        }) => {
            assert!(queued.is_empty());
            assert_eq!(done.status, TaskStatus::Succeeded);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(view(s, &last).await.result, Some(json!(7)));
    assert!(s.fire_timers(10, RETENTION).await.unwrap().is_empty());
}

/// Fires timers until one fires (they are due within milliseconds).
async fn fire(s: &dyn TaskStore) -> Vec<FiredTimer> {
    testkit::eventually(Duration::from_secs(5), || async {
        let fired = s.fire_timers(10, RETENTION).await.unwrap();
        (!fired.is_empty()).then_some(fired)
    })
    .await
    .expect("a timer fires")
}

async fn a_wait_times_out_failing_or_continuing(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let failing = submit(
        s,
        graph(
            vec![
                wait_step("w", "go", 20, OnTimeout::Fail, &[]),
                work("b", "retrieve", &[]),
            ],
            json!({}),
        ),
    )
    .await;
    let b = claim_one(s, "retrieve").await;
    let fired = fire(s).await;
    assert_eq!(fired.len(), 1);
    assert_eq!((&fired[0].task_id, fired[0].step), (&failing, 0));
    let done = fired[0].advance.done.clone().unwrap();
    assert_eq!(done.status, TaskStatus::Failed);
    assert_eq!(
        done.error.as_ref().unwrap().kind.as_deref(),
        Some("wait_timeout")
    );
    let v = view(s, &failing).await;
    assert_eq!(v.status, TaskStatus::Failed);
    assert_eq!(
        (v.steps[0].status, v.steps[1].status),
        (StepStatus::Failed, StepStatus::Cancelled),
        "the other branch is stopped"
    );
    assert_eq!(report(s, done_of(&b)).await, ReportOutcome::Discarded);
    assert!(
        s.dead_letters(&cap("retrieve"), 10)
            .await
            .unwrap()
            .is_empty(),
        "a wait that timed out has no capability to be dead-lettered under"
    );
    assert_eq!(
        s.signal(&failing, "go", "1", RETENTION).await.unwrap(),
        SignalOutcome::Finished(TaskStatus::Failed)
    );

    let continuing = submit(
        s,
        graph(
            vec![
                wait_step("w", "go", 20, OnTimeout::Continue, &[]),
                work("b", "retrieve", &[0]),
            ],
            json!({}),
        ),
    )
    .await;
    let fired = fire(s).await;
    assert_eq!(
        fired,
        vec![FiredTimer {
            task_id: continuing.clone(),
            step: 0,
            advance: Advance {
                queued: queued(&["retrieve"]),
                done: None,
            },
        }]
    );
    let b = claim_one(s, "retrieve").await;
    assert_eq!(b.input, json!({"timed_out": true}));
}

fn done_of(w: &WorkRequest) -> ResultReport {
    done(w, json!("late"))
}

async fn a_sleep_succeeds_with_null(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let id = submit(
        s,
        graph(
            vec![sleep_step("nap", 20, &[]), work("b", "retrieve", &[0])],
            json!({}),
        ),
    )
    .await;
    let v = view(s, &id).await;
    assert_eq!(v.status, TaskStatus::Waiting);
    assert_eq!(v.steps[0].sleep_ms, Some(20));
    assert_eq!(v.steps[0].kind, common::wire::StepKind::Sleep);
    let fired = fire(s).await;
    assert_eq!(fired[0].advance.queued, queued(&["retrieve"]));
    let b = claim_one(s, "retrieve").await;
    assert_eq!(b.input, json!(null));
    assert_eq!(b.context.previous[0].id, "nap");
}

async fn cancel_stops_every_branch(store: Arc<dyn TaskStore>) {
    use StepStatus::*;
    let s = store.as_ref();
    let id = submit(
        s,
        graph(
            vec![
                work("a", "plan", &[]),
                wait_step("w", "go", 3_600_000, OnTimeout::Fail, &[0]),
                work("c", "retrieve", &[0]),
                map_step("m", "evaluate", &[0], "a.items", Some(0), 1),
                work("j", "finalize", &[1, 2, 3]),
            ],
            json!({}),
        ),
    )
    .await;
    let a = claim_one(s, "plan").await;
    let out = report(s, done(&a, json!({"items": [1, 2]}))).await;
    assert_eq!(next_of(&out), queued(&["retrieve", "evaluate"]));
    let c = claim_one(s, "retrieve").await;
    assert_eq!(view(s, &id).await.status, TaskStatus::Running);
    assert_eq!(
        s.cancel(&id, RETENTION).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let v = view(s, &id).await;
    assert_eq!(v.status, TaskStatus::Cancelled);
    assert_eq!(
        statuses(&v),
        st(&[
            ("a", Succeeded),
            ("w", Cancelled),
            ("c", Cancelled),
            ("m", Cancelled),
            ("j", Pending),
        ])
    );
    let inst: Vec<StepStatus> = v.steps[3].instances.iter().map(|i| i.status).collect();
    assert_eq!(inst, vec![Cancelled, Pending]);
    assert_eq!(
        v.steps[2].error.as_ref().unwrap().kind.as_deref(),
        Some("cancelled")
    );
    assert_eq!(report(s, done_of(&c)).await, ReportOutcome::Discarded);
    assert!(claim_all(s, "evaluate").await.is_empty());
    assert_eq!(
        s.worker_loads()
            .await
            .unwrap()
            .values()
            .copied()
            .sum::<u32>(),
        0
    );
    let stats = s
        .stats(&queued(&["retrieve", "evaluate"]), RETENTION)
        .await
        .unwrap();
    for (_, q) in stats {
        assert_eq!((q.queued, q.in_flight), (0, 0));
    }
    assert_eq!(
        s.signal(&id, "go", "1", RETENTION).await.unwrap(),
        SignalOutcome::Finished(TaskStatus::Cancelled)
    );
}

async fn redrive_reruns_only_the_failed_and_stopped_branches(store: Arc<dyn TaskStore>) {
    use StepStatus::*;
    let s = store.as_ref();
    let id = submit(
        s,
        graph(
            vec![
                work("a", "plan", &[]),
                work("b", "retrieve", &[0]),
                work("c", "evaluate", &[0]),
                work("e", "finalize", &[0]),
                work("d", "plan", &[1, 2, 3]),
            ],
            json!({}),
        ),
    )
    .await;
    let a = claim_one(s, "plan").await;
    report(s, done(&a, json!("A"))).await;
    let b = claim_one(s, "retrieve").await;
    report(s, done(&b, json!("B"))).await;
    let e = claim_one(s, "finalize").await;
    let c = claim_one(s, "evaluate").await;
    let out = report(s, broke(&c)).await;
    assert!(
        matches!(
            out,
            ReportOutcome::Done {
                status: TaskStatus::Failed,
                result: None,
                ..
            }
        ),
        "{out:?}"
    );
    let v = view(s, &id).await;
    assert_eq!(
        statuses(&v),
        st(&[
            ("a", Succeeded),
            ("b", Succeeded),
            ("c", Failed),
            ("e", Cancelled),
            ("d", Pending),
        ])
    );
    assert_eq!(
        v.steps[3].error.as_ref().unwrap().kind.as_deref(),
        Some("stopped")
    );
    assert_eq!(
        s.dead_letters(&cap("evaluate"), 10).await.unwrap(),
        vec![id.clone()]
    );
    assert_eq!(
        report(s, done(&e, json!("late"))).await,
        ReportOutcome::Discarded
    );
    assert_eq!(
        s.redrive(&id, RETENTION).await.unwrap(),
        RedriveOutcome::Redriven(queued(&["evaluate", "finalize"]))
    );
    let v = view(s, &id).await;
    assert_eq!(v.status, TaskStatus::Running);
    assert_eq!(
        statuses(&v),
        st(&[
            ("a", Succeeded),
            ("b", Succeeded),
            ("c", Queued),
            ("e", Queued),
            ("d", Pending),
        ])
    );
    assert_eq!(v.steps[1].output, Some(json!("B")), "kept");
    assert_eq!(v.steps[2].attempts, 0, "attempts reset");
    assert!(
        s.dead_letters(&cap("evaluate"), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        claim_all(s, "retrieve").await.is_empty(),
        "b is not run again"
    );
    let c = claim_one(s, "evaluate").await;
    assert_eq!(c.attempt, 2, "a new fencing number");
    report(s, done(&c, json!("C"))).await;
    let e = claim_one(s, "finalize").await;
    assert_eq!(
        next_of(&report(s, done(&e, json!("E"))).await),
        queued(&["plan"])
    );
    let d = claim_one(s, "plan").await;
    assert_eq!(d.input, json!({"b": "B", "c": "C", "e": "E"}));
    report(s, done(&d, json!("D"))).await;
    assert_eq!(view(s, &id).await.status, TaskStatus::Succeeded);
}

async fn a_redriven_map_reruns_only_its_failed_and_stopped_instances(store: Arc<dyn TaskStore>) {
    use StepStatus::*;
    let s = store.as_ref();
    let id = submit(
        s,
        graph(
            vec![map_step("m", "retrieve", &[], "input", None, 3)],
            json!(["x", "y", "z"]),
        ),
    )
    .await;
    let mut inst = claim_all(s, "retrieve").await;
    inst.sort_by_key(|w| w.context.element_index);
    report(s, done(&inst[0], json!("X"))).await;
    report(s, broke(&inst[1])).await;
    let v = view(s, &id).await;
    assert_eq!(v.status, TaskStatus::Failed);
    assert_eq!(v.steps[0].status, Failed, "an instance failed the map step");
    let got: Vec<StepStatus> = v.steps[0].instances.iter().map(|i| i.status).collect();
    assert_eq!(got, vec![Succeeded, Failed, Cancelled]);
    assert_eq!(
        s.redrive(&id, RETENTION).await.unwrap(),
        RedriveOutcome::Redriven(queued(&["retrieve"]))
    );
    let v = view(s, &id).await;
    assert_eq!(v.steps[0].status, Running);
    let got: Vec<StepStatus> = v.steps[0].instances.iter().map(|i| i.status).collect();
    assert_eq!(got, vec![Succeeded, Queued, Queued]);
    let again = claim_all(s, "retrieve").await;
    assert_eq!(again.len(), 2, "the succeeded instance is not run again");
    for w in &again {
        let i = w.context.element_index.unwrap();
        report(s, done(w, json!(format!("again {i}")))).await;
    }
    let v = view(s, &id).await;
    assert_eq!(v.status, TaskStatus::Succeeded);
    assert_eq!(v.result, Some(json!(["X", "again 1", "again 2"])));
}

async fn several_final_steps_make_an_object_result(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let id = submit(
        s,
        graph(
            vec![
                router(work("r", "plan", &[])),
                work("x", "retrieve", &[0]),
                work("y", "evaluate", &[0]),
                work("z", "finalize", &[0]),
            ],
            json!({}),
        ),
    )
    .await;
    let r = claim_one(s, "plan").await;
    report(s, done(&r, json!({"next": ["x", "z"]}))).await;
    let x = claim_one(s, "retrieve").await;
    let z = claim_one(s, "finalize").await;
    assert_eq!(next_of(&report(s, done(&z, json!("Z"))).await), vec![]);
    let out = report(s, done(&x, json!("X"))).await;
    let want = json!({"x": "X", "z": "Z"});
    match out {
        ReportOutcome::Done {
            status: TaskStatus::Succeeded,
            result,
            ..
        } => assert_eq!(result, Some(want.clone()), "skipped y is left out"),
        other => panic!("{other:?}"),
    }
    assert_eq!(view(s, &id).await.result, Some(want));
}

async fn a_map_whose_outputs_are_too_large_together_fails(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let id = submit(
        s,
        graph(
            vec![map_step("m", "retrieve", &[], "input", None, 2)],
            json!([1, 2]),
        ),
    )
    .await;
    // Each output is under the limit; the two together are over it.
    let half = "x".repeat(master::store::MAX_MAP_OUTPUT_BYTES / 2 + 16);
    let inst = claim_all(s, "retrieve").await;
    assert_eq!(
        next_of(&report(s, done(&inst[0], json!(half))).await),
        vec![]
    );
    let out = report(s, done(&inst[1], json!(half))).await;
    assert!(
        matches!(
            out,
            ReportOutcome::Done {
                status: TaskStatus::Failed,
                ..
            }
        ),
        "{out:?}"
    );
    let v = view(s, &id).await;
    assert_eq!(v.steps[0].status, StepStatus::Failed);
    assert_eq!(
        v.error.unwrap().kind.as_deref(),
        Some("map_output_too_large")
    );
    assert_eq!(v.steps[0].output, None);
}

both_stores!(events {
    a_chains_events_tell_its_whole_story_in_order,
    resuming_after_any_event_gives_exactly_the_rest,
    retries_failures_redrives_and_cancels_are_events,
    progress_is_fenced_by_attempt_and_worker_and_bounded,
    outputs_over_the_bound_are_left_out_of_events,
    waits_and_signals_are_events,
});

/// Every event of a task, read in pages of one transition to show that paging loses none.
async fn all_events(s: &dyn TaskStore, id: &TaskId) -> Vec<common::wire::TaskEvent> {
    paged_events(s, id, 1).await
}

/// Every event of a task, read in pages of `page` transitions.
async fn paged_events(s: &dyn TaskStore, id: &TaskId, page: usize) -> Vec<common::wire::TaskEvent> {
    let mut out: Vec<common::wire::TaskEvent> = Vec::new();
    loop {
        let after = out.last().map(|e| e.id.parse().unwrap());
        let page = s.events(id, after.as_ref(), page).await.unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

fn kinds(events: &[common::wire::TaskEvent]) -> Vec<(String, Option<String>)> {
    events
        .iter()
        .map(|e| (e.kind.clone(), e.step.clone()))
        .collect()
}

fn k(list: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
    list.iter()
        .map(|(kind, step)| (kind.to_string(), step.map(str::to_string)))
        .collect()
}

async fn a_chains_events_tell_its_whole_story_in_order(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    // An operator follows every task's events: the operators' stream records from now on.
    assert_eq!(s.latest_event().await.unwrap(), None);
    let id = submit(s, task(&["plan", "finalize"], 0, 1)).await;
    let w = claim_one(s, "plan").await;
    report(s, done(&w, json!({"plan": 1}))).await;
    let w = claim_one(s, "finalize").await;
    report(s, done(&w, json!({"answer": 42}))).await;
    let events = all_events(s, &id).await;
    assert_eq!(
        kinds(&events),
        k(&[
            ("task.submitted", None),
            ("step.queued", Some("plan")),
            ("step.dispatched", Some("plan")),
            ("step.succeeded", Some("plan")),
            ("step.queued", Some("finalize")),
            ("step.dispatched", Some("finalize")),
            ("step.succeeded", Some("finalize")),
            ("task.succeeded", None),
        ])
    );
    let cursors: Vec<master::store::events::EventCursor> =
        events.iter().map(|e| e.id.parse().unwrap()).collect();
    assert!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "ids grow: {cursors:?}"
    );
    assert!(events.iter().all(|e| e.task_id == id && e.at_ms > 0));
    assert_eq!(events[2].attempt, Some(1));
    assert_eq!(events[2].worker_id.as_ref().map(|w| w.as_str()), Some("w1"));
    assert_eq!(events[2].slot, Some(0));
    assert_eq!(events[3].output, Some(json!({"plan": 1})));
    assert_eq!(events[6].slot, Some(1));
    assert_eq!(events[7].output, Some(json!({"answer": 42})));
    assert!(events[7].is_final());
    // The operators' stream has the same events, progress aside, in the same order, with
    // ids of its own (its cursor is a place in that stream).
    let everyone = s.all_events(None, 1_000).await.unwrap();
    let blank = |list: &[common::wire::TaskEvent]| -> Vec<common::wire::TaskEvent> {
        list.iter()
            .map(|e| common::wire::TaskEvent {
                id: String::new(),
                at_ms: 0,
                ..e.clone()
            })
            .collect()
    };
    assert_eq!(blank(&everyone), blank(&events));
    let latest = s.latest_event().await.unwrap().unwrap();
    assert_eq!(latest.to_string(), everyone.last().unwrap().id);
    assert!(s.all_events(Some(&latest), 10).await.unwrap().is_empty());
    let middle = everyone[3].id.parse().unwrap();
    assert_eq!(
        s.all_events(Some(&middle), 10).await.unwrap(),
        everyone[4..]
    );
}

async fn resuming_after_any_event_gives_exactly_the_rest(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let id = submit(s, task(&["plan", "retrieve", "finalize"], 0, 1)).await;
    for capability in ["plan", "retrieve", "finalize"] {
        let w = claim_one(s, capability).await;
        report(s, done(&w, json!({"by": capability}))).await;
    }
    let all = s.events(&id, None, 1_000).await.unwrap();
    assert_eq!(
        all,
        all_events(s, &id).await,
        "pages of one transition lose nothing"
    );
    assert_eq!(all.len(), 11);
    for (i, e) in all.iter().enumerate() {
        let after = e.id.parse().unwrap();
        assert_eq!(
            s.events(&id, Some(&after), 1_000).await.unwrap(),
            all[i + 1..],
            "after event {i} ({})",
            e.kind
        );
    }
    // Another task's stream is its own.
    let other = submit(s, task(&["plan"], 0, 1)).await;
    assert_eq!(
        kinds(&s.events(&other, None, 1_000).await.unwrap()),
        k(&[("task.submitted", None), ("step.queued", Some("plan"))])
    );
    assert!(
        s.events(&TaskId::generate(), None, 10)
            .await
            .unwrap()
            .is_empty(),
        "an unknown task has no events"
    );
}

async fn retries_failures_redrives_and_cancels_are_events(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let plan = cap("plan");
    let id = submit(s, task(&["plan"], 0, 2)).await;
    let w = claim_one(s, "plan").await;
    report(s, failed(&id, 0, w.attempt, true)).await;
    let events = s.events(&id, None, 100).await.unwrap();
    let retry = events.last().unwrap();
    assert_eq!(retry.kind, "step.retrying");
    assert_eq!(retry.attempt, Some(1));
    assert_eq!(retry.error.as_ref().unwrap().message, "boom");
    assert!(retry.due_at_ms.unwrap() > retry.at_ms, "{retry:?}");
    tokio::time::sleep(Duration::from_millis(60)).await;
    s.promote_due(&plan).await.unwrap();
    let w = claim_one(s, "plan").await;
    assert_eq!(w.attempt, 2);
    report(s, failed(&id, 0, 2, true)).await;
    s.redrive(&id, RETENTION).await.unwrap();
    let w = claim_one(s, "plan").await;
    s.cancel(&id, RETENTION).await.unwrap();
    let events = all_events(s, &id).await;
    assert_eq!(
        kinds(&events),
        k(&[
            ("task.submitted", None),
            ("step.queued", Some("plan")),
            ("step.dispatched", Some("plan")),
            ("step.retrying", Some("plan")),
            ("step.dispatched", Some("plan")),
            ("step.failed", Some("plan")),
            ("task.failed", None),
            ("task.redriven", None),
            ("step.queued", Some("plan")),
            ("step.dispatched", Some("plan")),
            ("step.cancelled", Some("plan")),
            ("task.cancelled", None),
        ])
    );
    assert_eq!(events[5].attempt, Some(2));
    assert_eq!(events[6].error.as_ref().unwrap().message, "boom");
    assert_eq!(events[9].attempt, Some(w.attempt));
    assert!(events[10].error.is_some());
    assert!(events[6].is_final() && events[11].is_final());
}

fn progress_of(
    w: &WorkRequest,
    worker_id: &str,
    attempt: u32,
    text: &str,
) -> common::wire::StepProgress {
    common::wire::StepProgress {
        task_id: w.task_id.clone(),
        step: w.step,
        attempt,
        worker_id: worker(worker_id),
        messages: vec![json!({"delta": text})],
    }
}

async fn progress_is_fenced_by_attempt_and_worker_and_bounded(store: Arc<dyn TaskStore>) {
    use master::store::ProgressOutcome::{Discarded, Limited, Recorded};
    let s = store.as_ref();
    let id = submit(s, task(&["plan"], 0, 2)).await;
    let w = claim_one(s, "plan").await;
    assert_eq!(
        s.progress(&progress_of(&w, "w1", 1, "Hel")).await.unwrap(),
        Recorded
    );
    assert_eq!(
        s.progress(&progress_of(&w, "w2", 1, "x")).await.unwrap(),
        Discarded
    );
    assert_eq!(
        s.progress(&progress_of(&w, "w1", 2, "x")).await.unwrap(),
        Discarded
    );
    assert_eq!(
        s.progress(&progress_of(&w, "w1", 1, "lo")).await.unwrap(),
        Recorded
    );
    let events = s.events(&id, None, 100).await.unwrap();
    let progress: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "step.progress")
        .collect();
    assert_eq!(progress.len(), 2);
    assert_eq!(progress[0].messages, vec![json!({"delta": "Hel"})]);
    assert_eq!(progress[1].messages, vec![json!({"delta": "lo"})]);
    assert_eq!((progress[0].attempt, progress[0].slot), (Some(1), Some(0)));
    assert_eq!(progress[0].step.as_deref(), Some("plan"));
    assert!(
        !s.all_events(None, 10_000)
            .await
            .unwrap()
            .iter()
            .any(|e| e.kind == "step.progress"),
        "partial output stays out of the operators' stream"
    );
    // The attempt's stale once retried: its progress is dropped.
    report(s, failed(&id, 0, 1, true)).await;
    assert_eq!(
        s.progress(&progress_of(&w, "w1", 1, "late")).await.unwrap(),
        Discarded
    );
    // A task's progress is bounded.
    tokio::time::sleep(Duration::from_millis(60)).await;
    s.promote_due(&cap("plan")).await.unwrap();
    let w = claim_one(s, "plan").await;
    let left = common::wire::MAX_PROGRESS_EVENTS - 2;
    for i in 0..left {
        assert_eq!(
            s.progress(&progress_of(&w, "w1", w.attempt, "t"))
                .await
                .unwrap(),
            Recorded,
            "progress {i}"
        );
    }
    assert_eq!(
        s.progress(&progress_of(&w, "w1", w.attempt, "t"))
            .await
            .unwrap(),
        Limited
    );
    // Orchestration events still go in, and the task finishes.
    report(s, done(&w, json!("fine"))).await;
    // A read returns at most MAX_PAGE transitions, however many are asked for.
    let first = s.events(&id, None, usize::MAX).await.unwrap();
    assert_eq!(
        first.len(),
        master::store::events::MAX_PAGE + 1,
        "the submit's two events and 999 more"
    );
    let last = paged_events(s, &id, usize::MAX).await;
    assert_eq!(last.last().unwrap().kind, "task.succeeded");
    assert_eq!(
        s.progress(&progress_of(&w, "w1", w.attempt, "t"))
            .await
            .unwrap(),
        Discarded
    );
}

async fn outputs_over_the_bound_are_left_out_of_events(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let id = submit(s, task(&["plan"], 0, 1)).await;
    let w = claim_one(s, "plan").await;
    let big = "x".repeat(common::wire::MAX_EVENT_VALUE_BYTES);
    report(s, done(&w, json!(big))).await;
    let events = s.events(&id, None, 100).await.unwrap();
    let succeeded: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "step.succeeded" || e.kind == "task.succeeded")
        .collect();
    assert_eq!(succeeded.len(), 2);
    for e in succeeded {
        assert!(e.truncated && e.output.is_none(), "{e:?}");
    }
    // The task view still has it whole.
    assert_eq!(view(s, &id).await.result, Some(json!(big)));
}

async fn waits_and_signals_are_events(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let id = submit(
        s,
        graph(
            vec![
                wait_step("approval", "approve", 60_000, OnTimeout::Fail, &[]),
                work("ship", "finalize", &[0]),
            ],
            json!({}),
        ),
    )
    .await;
    let events = s.events(&id, None, 100).await.unwrap();
    assert_eq!(
        kinds(&events),
        k(&[("task.submitted", None), ("step.waiting", Some("approval"))])
    );
    assert!(events[1].due_at_ms.unwrap() >= events[1].at_ms + 59_000);
    s.signal(&id, "approve", r#"{"ok":true}"#, RETENTION)
        .await
        .unwrap();
    let after: master::store::events::EventCursor = events[1].id.parse().unwrap();
    let events = s.events(&id, Some(&after), 100).await.unwrap();
    assert_eq!(
        kinds(&events),
        k(&[
            ("signal.received", Some("approval")),
            ("step.succeeded", Some("approval")),
            ("step.queued", Some("ship")),
        ])
    );
    assert_eq!(events[0].signal.as_deref(), Some("approve"));
    assert!(!events[0].buffered);
    assert_eq!(events[1].output, Some(json!({"ok": true})));

    // A signal that comes before its wait step is reached is an event when it comes, and
    // the step's success carries its payload when the step is reached.
    let id = submit(
        s,
        graph(
            vec![
                work("draft", "plan", &[]),
                wait_step("review", "reviewed", 60_000, OnTimeout::Fail, &[0]),
            ],
            json!({}),
        ),
    )
    .await;
    let start = s.events(&id, None, 100).await.unwrap();
    let outcome = s
        .signal(&id, "reviewed", r#"{"by":"ana"}"#, RETENTION)
        .await
        .unwrap();
    assert!(matches!(outcome, SignalOutcome::Buffered), "{outcome:?}");
    let after: master::store::events::EventCursor = start.last().unwrap().id.parse().unwrap();
    let events = s.events(&id, Some(&after), 100).await.unwrap();
    assert_eq!(kinds(&events), k(&[("signal.received", Some("review"))]));
    assert_eq!(events[0].signal.as_deref(), Some("reviewed"));
    assert!(events[0].buffered);
    let w = claim_one(s, "plan").await;
    report(s, done(&w, json!("text"))).await;
    let after: master::store::events::EventCursor = events[0].id.parse().unwrap();
    let events = s.events(&id, Some(&after), 100).await.unwrap();
    let review = events
        .iter()
        .find(|e| e.kind == "step.succeeded" && e.step.as_deref() == Some("review"))
        .unwrap_or_else(|| panic!("{:?}", kinds(&events)));
    assert_eq!(review.output, Some(json!({"by": "ana"})));
    assert!(events.last().unwrap().is_final());
}

/// A reader waiting on a task's events is woken by the task's next transition, well before
/// its wait or the fallback poll would end it: in memory by the store itself, on Redis by
/// the transition's announcement (once the first wait marked the task followed).
async fn a_waiting_reader_is_woken_by_the_next_transition(store: Arc<dyn TaskStore>) {
    let s = store.clone();
    let id = submit(s.as_ref(), task(&["plan"], 0, 1)).await;
    let events = s.events(&id, None, 100).await.unwrap();
    let cursor: master::store::events::EventCursor = events.last().unwrap().id.parse().unwrap();
    // The first wait may only mark the task followed and return, and the next one may be
    // woken by the wake-up subscription starting (it wakes every reader when it connects,
    // in case it missed something); from then on, waits last until something happens.
    for _ in 0..2 {
        s.wait_events(Some(&id), Some(&cursor), Duration::from_millis(300))
            .await;
    }
    let waiter = {
        let (s, id) = (s.clone(), id.clone());
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            s.wait_events(Some(&id), Some(&cursor), Duration::from_secs(30))
                .await;
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "nothing happened yet: the reader still waits"
    );
    claim_one(s.as_ref(), "plan").await;
    let waited = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the reader was woken")
        .unwrap();
    assert!(
        waited < Duration::from_millis(300 + 1_500),
        "woken by the transition, not a poll: {waited:?}"
    );
}

#[tokio::test]
async fn a_waiting_reader_is_woken_by_the_next_transition_in_memory() {
    a_waiting_reader_is_woken_by_the_next_transition(Arc::new(master::store::MemoryStore::new()))
        .await;
}

#[tokio::test]
async fn a_waiting_reader_is_woken_by_the_next_transition_on_redis() {
    let server = RedisServer::start();
    let settings = server.settings();
    let store = RedisStore::new(RedisPool::new(&settings).unwrap()).with_event_tail(settings);
    a_waiting_reader_is_woken_by_the_next_transition(Arc::new(store)).await;
}

// The operators' lists (`GET /tasks`, `GET /deadletters`): the same pages from both stores.
both_stores!(lists {
    the_search_pages_newest_first_through_every_filter,
    the_search_and_the_sweep_forget_expired_tasks,
    dead_letters_show_their_step_and_error_and_a_purge_stops_their_redrive,
});

/// A one-step task of `client` on its own capability, so a test claims exactly it.
fn owned_by(client: &str, pipeline: Option<&str>, capability: &str) -> NewTask {
    NewTask {
        client: client.into(),
        pipeline: pipeline.map(Into::into),
        ..task(&[capability], 0, 1)
    }
}

/// Claims the one step of `capability` and reports it succeeded, or failed for good.
async fn run_one(s: &dyn TaskStore, id: &TaskId, capability: &str, succeed: bool) {
    let c = s
        .claim(&cap(capability), &[worker("w1")], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(c[0].work.task_id, *id);
    let r = if succeed {
        ok(id, 0, c[0].work.attempt, json!(1))
    } else {
        failed(id, 0, c[0].work.attempt, false)
    };
    assert!(matches!(report(s, r).await, ReportOutcome::Done { .. }));
}

fn page_ids(page: &TaskPage) -> Vec<TaskId> {
    page.tasks.iter().map(|t| t.id.clone()).collect()
}

/// Submits one task per millisecond at least, so submit times differ.
async fn submit_apart(s: &dyn TaskStore, t: NewTask) -> TaskId {
    tokio::time::sleep(Duration::from_millis(3)).await;
    submit(s, t).await
}

async fn the_search_pages_newest_first_through_every_filter(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let a = submit_apart(s, owned_by("alice", Some("p1"), "s0")).await;
    let b = submit_apart(s, owned_by("bob", None, "s1")).await;
    let c = submit_apart(s, owned_by("alice", None, "s2")).await;
    let d = submit_apart(s, owned_by("bob", Some("p1"), "s3")).await;
    let e = submit_apart(s, owned_by("alice", Some("p1"), "s4")).await;
    run_one(s, &a, "s0", true).await;
    run_one(s, &b, "s1", false).await;
    assert_eq!(
        s.cancel(&c, RETENTION).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let created = |id: &TaskId| {
        let id = id.clone();
        async move { s.get(&id).await.unwrap().unwrap().view.created_at_ms }
    };
    let (cb, cc, cd) = (created(&b).await, created(&c).await, created(&d).await);

    let q = |f: &dyn Fn(&mut TaskQuery)| {
        let mut q = TaskQuery::all(50);
        f(&mut q);
        q
    };
    let cases: Vec<(&str, TaskQuery, Vec<&TaskId>)> = vec![
        ("every task", q(&|_| {}), vec![&e, &d, &c, &b, &a]),
        (
            "alice",
            q(&|q| q.client = Some("alice".into())),
            vec![&e, &c, &a],
        ),
        ("bob", q(&|q| q.client = Some("bob".into())), vec![&d, &b]),
        ("nobody", q(&|q| q.client = Some("carol".into())), vec![]),
        (
            "p1",
            q(&|q| q.pipeline = Some("p1".into())),
            vec![&e, &d, &a],
        ),
        (
            "succeeded",
            q(&|q| q.status = Some(TaskStatus::Succeeded)),
            vec![&a],
        ),
        (
            "failed",
            q(&|q| q.status = Some(TaskStatus::Failed)),
            vec![&b],
        ),
        (
            "cancelled",
            q(&|q| q.status = Some(TaskStatus::Cancelled)),
            vec![&c],
        ),
        (
            "queued",
            q(&|q| q.status = Some(TaskStatus::Queued)),
            vec![&e, &d],
        ),
        (
            "running",
            q(&|q| q.status = Some(TaskStatus::Running)),
            vec![],
        ),
        (
            "alice's failed",
            q(&|q| {
                q.client = Some("alice".into());
                q.status = Some(TaskStatus::Failed);
            }),
            vec![],
        ),
        (
            "alice's p1",
            q(&|q| {
                q.client = Some("alice".into());
                q.pipeline = Some("p1".into());
            }),
            vec![&e, &a],
        ),
        ("since c", q(&|q| q.since = cc), vec![&e, &d, &c]),
        ("until c", q(&|q| q.until = Some(cc)), vec![&b, &a]),
        (
            "b to d",
            q(&|q| {
                q.since = cb;
                q.until = Some(cd);
            }),
            vec![&c, &b],
        ),
        (
            "since after until",
            q(&|q| {
                q.since = cd;
                q.until = Some(cb);
            }),
            vec![],
        ),
        ("since the end of time", q(&|q| q.since = u64::MAX), vec![]),
        (
            "until the end of time",
            q(&|q| q.until = Some(u64::MAX)),
            vec![&e, &d, &c, &b, &a],
        ),
    ];
    for (name, query, want) in cases {
        let page = s.search_tasks(&query).await.unwrap();
        let want: Vec<TaskId> = want.into_iter().cloned().collect();
        assert_eq!(page_ids(&page), want, "{name}");
        assert_eq!(page.next, None, "{name}: one page holds it all");
    }

    // What a row shows.
    let page = s.search_tasks(&TaskQuery::all(50)).await.unwrap();
    let row = page.tasks.iter().find(|t| t.id == a).unwrap();
    let view = s.get(&a).await.unwrap().unwrap().view;
    assert_eq!(
        *row,
        TaskSummary {
            id: a.clone(),
            client: "alice".into(),
            status: TaskStatus::Succeeded,
            pipeline: Some("p1".into()),
            created_at: view.created_at_ms,
            finished_at: view.finished_at_ms,
            steps: 1,
        }
    );
    assert!(row.finished_at.is_some());
    let queued = page.tasks.iter().find(|t| t.id == e).unwrap();
    assert_eq!(
        (queued.finished_at, queued.pipeline.as_deref()),
        (None, Some("p1"))
    );

    // Pages of two, each from the cursor before it, give every task once, in order.
    let mut seen = Vec::new();
    let mut query = TaskQuery::all(2);
    for round in 0.. {
        assert!(round < 5, "the pages end");
        let page = s.search_tasks(&query).await.unwrap();
        assert!(page.tasks.len() <= 2);
        seen.extend(page_ids(&page));
        match page.next {
            Some(next) => query.after = Some(next),
            None => break,
        }
    }
    assert_eq!(
        seen,
        vec![e.clone(), d.clone(), c.clone(), b.clone(), a.clone()]
    );

    // A budget of one task a request: a page may hold fewer than asked, even none, and
    // still go on; the pages together are the answer.
    let mut query = q(&|q| {
        q.client = Some("alice".into());
        q.status = Some(TaskStatus::Queued);
        q.budget = 1;
    });
    let mut pages = Vec::new();
    loop {
        let page = s.search_tasks(&query).await.unwrap();
        pages.push(page_ids(&page));
        match page.next {
            Some(next) => query.after = Some(next),
            None => break,
        }
        assert!(pages.len() < 10, "the pages end");
    }
    assert_eq!(pages.concat(), vec![e.clone()]);
    assert!(pages.len() >= 3, "one task looked at per page: {pages:?}");

    // A cursor for a task that never existed is a place like any other.
    let forged = TaskCursor {
        ms: cc,
        id: TaskId::new("zzzz").unwrap(),
    };
    let page = s
        .search_tasks(&TaskQuery {
            after: Some(forged),
            ..TaskQuery::all(50)
        })
        .await
        .unwrap();
    assert_eq!(page_ids(&page), vec![c.clone(), b.clone(), a.clone()]);

    // A redriven task leaves its final status's part of the index.
    assert!(matches!(
        s.redrive(&b, RETENTION).await.unwrap(),
        RedriveOutcome::Redriven(_)
    ));
    for (status, want) in [
        (TaskStatus::Failed, vec![]),
        (TaskStatus::Running, vec![b.clone()]),
    ] {
        let page = s
            .search_tasks(&q(&|q| q.status = Some(status)))
            .await
            .unwrap();
        assert_eq!(page_ids(&page), want, "{status:?}");
    }
}

async fn the_search_and_the_sweep_forget_expired_tasks(store: Arc<dyn TaskStore>) {
    let s = store.as_ref();
    let short = Duration::from_millis(1);
    let x = submit_apart(s, owned_by("alice", Some("p1"), "x0")).await;
    let y = submit_apart(s, owned_by("alice", None, "x1")).await;
    let z = submit_apart(s, owned_by("bob", None, "x2")).await;
    for id in [&x, &y] {
        assert_eq!(s.cancel(id, short).await.unwrap(), CancelOutcome::Cancelled);
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(s.get(&x).await.unwrap().is_none(), "expired");

    // The sweep looks at one task a round, oldest first: x and y go, z (alive) stays,
    // and the next round starts from the oldest again.
    let mut removed = Vec::new();
    for _ in 0..4 {
        removed.push(s.sweep_task_index(Duration::ZERO, 1).await.unwrap());
    }
    assert_eq!(removed, [1, 1, 0, 0]);
    assert_eq!(s.sweep_task_index(Duration::ZERO, 100).await.unwrap(), 0);
    // A sweep only looks at tasks older than the retention.
    let w = submit_apart(s, owned_by("bob", None, "x3")).await;
    assert_eq!(s.cancel(&w, short).await.unwrap(), CancelOutcome::Cancelled);
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(s.sweep_task_index(RETENTION, 100).await.unwrap(), 0);

    // A search meets w's members and drops them; nothing expired is listed.
    for query in [
        TaskQuery::all(50),
        TaskQuery {
            status: Some(TaskStatus::Cancelled),
            ..TaskQuery::all(50)
        },
        TaskQuery {
            client: Some("alice".into()),
            ..TaskQuery::all(50)
        },
        TaskQuery {
            pipeline: Some("p1".into()),
            ..TaskQuery::all(50)
        },
    ] {
        let page = s.search_tasks(&query).await.unwrap();
        let want = if query.client.is_none() && query.status.is_none() && query.pipeline.is_none() {
            vec![z.clone()]
        } else {
            vec![]
        };
        assert_eq!(page_ids(&page), want, "{query:?}");
    }
    // w's `a:` member went with the search above: the sweep finds nothing left of it.
    assert_eq!(s.sweep_task_index(Duration::ZERO, 100).await.unwrap(), 0);
}

async fn dead_letters_show_their_step_and_error_and_a_purge_stops_their_redrive(
    store: Arc<dyn TaskStore>,
) {
    let s = store.as_ref();
    let t1 = submit(s, owned_by("alice", None, "d1")).await;
    let t2 = submit(s, owned_by("bob", None, "d2")).await;
    let t3 = submit(s, owned_by("alice", None, "d1")).await;
    for (id, capability) in [(&t1, "d1"), (&t2, "d2"), (&t3, "d1")] {
        tokio::time::sleep(Duration::from_millis(3)).await;
        run_one(s, id, capability, false).await;
    }
    let caps = [cap("d1"), cap("d2"), cap("nothing")];
    let page = s.dead_letter_page(&caps, None, 10).await.unwrap();
    assert_eq!(page.next, None);
    let listed: Vec<(&TaskId, &str, &str)> = page
        .dead_letters
        .iter()
        .map(|d| (&d.task_id, d.capability.as_str(), d.client.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            (&t3, "d1", "alice"),
            (&t2, "d2", "bob"),
            (&t1, "d1", "alice")
        ]
    );
    let first = &page.dead_letters[0];
    let view = s.get(&t3).await.unwrap().unwrap().view;
    assert_eq!(first.step.as_deref(), Some(view.steps[0].id.as_str()));
    assert_eq!(first.step.as_deref(), Some("d1"));
    assert_eq!(first.error.as_deref(), Some("boom"));
    assert_eq!(Some(first.failed_at), view.finished_at_ms);

    // One at a time, each page from the last one's cursor.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s.dead_letter_page(&caps, after.as_ref(), 1).await.unwrap();
        seen.extend(page.dead_letters.iter().map(|d| d.task_id.clone()));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
        assert!(seen.len() <= 3, "the pages end");
    }
    assert_eq!(seen, [t3.clone(), t2.clone(), t1.clone()]);
    let d1 = s.dead_letter_page(&[cap("d1")], None, 10).await.unwrap();
    assert_eq!(d1.dead_letters.len(), 2);

    // Purging one: out of the list, still failed, no longer redriven.
    assert_eq!(
        s.purge_dead_letters(&cap("d1"), Some(&t1)).await.unwrap(),
        1
    );
    assert_eq!(
        s.purge_dead_letters(&cap("d1"), Some(&t1)).await.unwrap(),
        0
    );
    assert_eq!(
        s.purge_dead_letters(&cap("d2"), Some(&t3)).await.unwrap(),
        0
    );
    let d1 = s.dead_letter_page(&[cap("d1")], None, 10).await.unwrap();
    assert_eq!(
        d1.dead_letters
            .iter()
            .map(|d| &d.task_id)
            .collect::<Vec<_>>(),
        [&t3]
    );
    assert_eq!(
        s.redrive(&t1, RETENTION).await.unwrap(),
        RedriveOutcome::Purged
    );
    assert_eq!(
        s.get(&t1).await.unwrap().unwrap().view.status,
        TaskStatus::Failed
    );
    // Purging a capability: its count goes to 0; the other's stays and still redrives.
    assert_eq!(s.purge_dead_letters(&cap("d1"), None).await.unwrap(), 1);
    assert_eq!(
        s.purge_dead_letters(&cap("nothing"), None).await.unwrap(),
        0
    );
    let stats = s.stats(&[cap("d1"), cap("d2")], RETENTION).await.unwrap();
    assert_eq!((stats[0].1.dead_lettered, stats[1].1.dead_lettered), (0, 1));
    assert_eq!(
        s.redrive(&t3, RETENTION).await.unwrap(),
        RedriveOutcome::Purged
    );
    assert!(matches!(
        s.redrive(&t2, RETENTION).await.unwrap(),
        RedriveOutcome::Redriven(_)
    ));
    let left = s.dead_letter_page(&caps, None, 10).await.unwrap();
    assert!(left.dead_letters.is_empty(), "{left:?}");
}

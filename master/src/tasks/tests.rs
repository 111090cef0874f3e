//! The service layer on its own: no HTTP, no Redis, the in-memory store (and, where a store
//! must fail part-way, a wrapper around it that fails on cue).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::wire::{
    Capability, ReportStatus, ResultReport, SignalRequest, SignalStatus, StepError, StepRef,
    StepStatus, SubmitTask, TaskId, TaskStatus, WorkerId, WorkerRecord,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Tasks;
use crate::auth::Caller;
use crate::config::Config;
use crate::dispatch::{Dispatcher, WorkerSource};
use crate::error::ServiceError;
use crate::hub::Hub;
use crate::store::{
    CallbackClaim, CallbackResult, CancelOutcome, Claimed, ExpiredLease, FiredTimer, MemoryStore,
    NewTask, PlannedStep, QueueStats, RateLimit, RedriveOutcome, ReleaseOutcome, ReleaseReason,
    ReportOutcome, RetryPolicy, SignalOutcome, StoreError, SubmitOutcome, TaskRecord, TaskStore,
};

/// No worker is alive: nothing is dispatched, so tasks stay where the test puts them.
struct NoWorkers;

#[async_trait]
impl WorkerSource for NoWorkers {
    async fn live(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        Ok(Vec::new())
    }
}

/// One live worker, serving `draft`, that the (never started) dispatcher has not seen: only
/// a fresh look at the registry finds it.
struct JustRegistered;

#[async_trait]
impl WorkerSource for JustRegistered {
    async fn live(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        let draft = Capability::new("draft").expect("a valid capability");
        Ok(vec![WorkerRecord::starting(
            WorkerId::generate("w"),
            "http://127.0.0.1:1".into(),
            vec![draft],
            1,
        )])
    }
}

/// The service over `store`, with a dispatcher that is never started.
fn service(config: Config, store: Arc<dyn TaskStore>) -> Tasks {
    service_with(config, store, Arc::new(NoWorkers))
}

/// [`service`] with the service's own view of the live workers.
fn service_with(
    config: Config,
    store: Arc<dyn TaskStore>,
    workers: Arc<dyn WorkerSource>,
) -> Tasks {
    let config = Arc::new(config);
    let hub = Arc::new(Hub::default());
    let shutdown = CancellationToken::new();
    let dispatcher = Dispatcher::new(
        config.clone(),
        store.clone(),
        Arc::new(NoWorkers),
        hub.clone(),
        TaskTracker::new(),
        shutdown.clone(),
    );
    Tasks::new(config, store, workers, dispatcher, hub, shutdown)
}

/// One attempt per step, so one failure report dead-letters a task.
fn one_attempt() -> Config {
    Config {
        max_attempts: 1,
        ..Config::default()
    }
}

fn body(value: serde_json::Value) -> SubmitTask {
    serde_json::from_value(value).expect("a valid submission body")
}

async fn submit(tasks: &Tasks, client: &str) -> TaskId {
    let body = body(json!({"steps": ["plan"], "input": {"q": 1}}));
    tasks
        .submit(client, body, None, String::new())
        .await
        .expect("the submission is accepted")
        .task_id
}

/// Claims the queued `plan` step of a task and reports it failed: the task is dead-lettered.
async fn fail(tasks: &Tasks, store: &dyn TaskStore) {
    let worker = WorkerId::generate("w");
    let plan = Capability::new("plan").expect("a valid capability");
    let claimed = store
        .claim(
            &plan,
            std::slice::from_ref(&worker),
            Duration::from_secs(60),
        )
        .await
        .expect("the claim succeeds");
    let step = claimed[0].work.step_ref();
    let report = ResultReport {
        task_id: step.task_id,
        step: step.step,
        attempt: step.attempt,
        worker_id: worker,
        status: ReportStatus::Failed,
        output: None,
        error: Some(StepError::permanent("agent", "it broke")),
        duration_ms: None,
    };
    assert!(tasks.record_report(report).await.expect("recorded"));
}

async fn status(store: &dyn TaskStore, id: &TaskId) -> TaskStatus {
    store
        .get(id)
        .await
        .expect("the store answers")
        .expect("the task exists")
        .view
        .status
}

#[tokio::test]
async fn invalid_submissions_are_refused_naming_the_field() {
    let tasks = service(Config::default(), Arc::new(MemoryStore::new()));
    let cases = [
        (json!({"input": 1, "priority": 101}), None, "`priority`"),
        (
            json!({"input": 1, "pipeline": "default", "steps": ["plan"]}),
            None,
            "either `pipeline` or `steps`",
        ),
        (json!({"input": 1, "pipeline": "nope"}), None, "`pipeline`"),
        (json!({"input": 1, "steps": []}), None, "`steps`"),
        (
            json!({"input": 1, "steps": ["unheard-of"]}),
            None,
            "unknown capability",
        ),
        (
            json!({"input": 1, "idempotency_key": "a"}),
            Some("b"),
            "`idempotency_key`",
        ),
        (
            json!({"input": 1, "callback_url": "https://example.com/hook"}),
            None,
            "CALLBACK_SECRET",
        ),
    ];
    for (value, header_key, field) in cases {
        let got = tasks
            .submit(
                "alice",
                body(value.clone()),
                header_key.map(String::from),
                String::new(),
            )
            .await;
        match got {
            Err(ServiceError::Invalid(message)) => {
                assert!(message.contains(field), "{value}: {message}");
            }
            other => panic!(
                "{value}: expected Invalid naming {field}, got {:?}",
                other.map(|s| s.task_id)
            ),
        }
    }
}

#[tokio::test]
async fn a_client_over_its_rate_is_told_when_to_retry() {
    let config = Config {
        rate_limit_per_sec: 0.5,
        rate_limit_burst: 1,
        ..Config::default()
    };
    let tasks = service(config, Arc::new(MemoryStore::new()));
    submit(&tasks, "alice").await;
    let body = body(json!({"input": 2}));
    match tasks.submit("alice", body, None, String::new()).await {
        Err(ServiceError::RateLimited { retry_after }) => {
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(2));
        }
        other => panic!("expected RateLimited, got {:?}", other.map(|s| s.task_id)),
    }
}

#[tokio::test]
async fn an_idempotent_repeat_names_the_first_task() {
    let tasks = service(Config::default(), Arc::new(MemoryStore::new()));
    let submit = |key: &str| {
        tasks.submit(
            "alice",
            body(json!({"input": 1})),
            Some(key.to_string()),
            String::new(),
        )
    };
    let first = submit("k1").await.expect("accepted");
    let again = submit("k1").await.expect("accepted");
    assert!(first.created && !again.created);
    assert_eq!(first.task_id, again.task_id);
    assert_eq!(again.task_status, TaskStatus::Queued);
}

#[tokio::test]
async fn another_clients_task_looks_absent_but_an_operator_may_cancel_it() {
    let store = Arc::new(MemoryStore::new());
    let tasks = service(Config::default(), store.clone());
    let id = submit(&tasks, "alice").await;
    let bob = Caller::Client("bob".into());
    assert!(matches!(
        tasks.owned("bob", id.as_str()).await,
        Err(ServiceError::NotFound(_))
    ));
    assert!(matches!(
        tasks.cancel(&bob, id.as_str()).await,
        Err(ServiceError::NotFound(_))
    ));
    assert_eq!(status(store.as_ref(), &id).await, TaskStatus::Queued);

    let view = tasks
        .cancel(&Caller::Operator, id.as_str())
        .await
        .expect("cancelled");
    assert_eq!(view.status, TaskStatus::Cancelled);
    let alice = Caller::Client("alice".into());
    match tasks.cancel(&alice, id.as_str()).await {
        Err(ServiceError::Conflict(message)) => assert!(message.contains("cancelled"), "{message}"),
        other => panic!("expected Conflict, got {:?}", other.map(|v| v.status)),
    }
    let malformed = tasks.owned("alice", "not a task id").await;
    assert!(matches!(malformed, Err(ServiceError::NotFound(_))));
}

#[tokio::test]
async fn only_a_failed_task_is_redriven() {
    let store = Arc::new(MemoryStore::new());
    let tasks = service(one_attempt(), store.clone());
    assert!(matches!(
        tasks.redrive_task("not a task id").await,
        Err(ServiceError::Invalid(_))
    ));
    let unknown = TaskId::generate();
    assert!(matches!(
        tasks.redrive_task(unknown.as_str()).await,
        Err(ServiceError::NotFound(_))
    ));
    let id = submit(&tasks, "alice").await;
    match tasks.redrive_task(id.as_str()).await {
        Err(ServiceError::Conflict(message)) => {
            assert!(message.contains("not failed"), "{message}")
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    fail(&tasks, store.as_ref()).await;
    assert_eq!(status(store.as_ref(), &id).await, TaskStatus::Failed);
    assert_eq!(tasks.redrive_task(id.as_str()).await.expect("redriven"), id);
    // Running again from its failed step, which is queued.
    assert_eq!(status(store.as_ref(), &id).await, TaskStatus::Running);
}

#[tokio::test]
async fn a_store_error_part_way_through_a_redrive_is_the_answer_and_a_repeat_finishes_it() {
    let store = Arc::new(FailingRedrive::after(1));
    let tasks = service(one_attempt(), store.clone());
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit(&tasks, "alice").await);
        fail(&tasks, store.as_ref()).await;
    }
    let plan = Capability::new("plan").expect("a valid capability");
    let stopped = tasks.redrive_dead_letters(&plan, None).await;
    assert!(
        matches!(stopped, Err(ServiceError::Unavailable)),
        "{stopped:?}"
    );
    let mut redriven = 0;
    for id in &ids {
        match status(store.as_ref(), id).await {
            TaskStatus::Running => redriven += 1,
            TaskStatus::Failed => {}
            other => panic!("task {id} is {other:?}"),
        }
    }
    assert_eq!(redriven, 1, "the one redrive before the failure stands");

    store.recover();
    let rest = tasks
        .redrive_dead_letters(&plan, None)
        .await
        .expect("redriven");
    assert_eq!(rest.len(), 2);
    for id in &ids {
        assert_eq!(status(store.as_ref(), id).await, TaskStatus::Running);
    }
}

/// Submits `steps` for alice and answers the planner's refusal message.
async fn refusal(tasks: &Tasks, steps: serde_json::Value) -> String {
    let shown = steps.to_string();
    match tasks
        .submit("alice", body(json!({"steps": steps})), None, String::new())
        .await
    {
        Err(ServiceError::Invalid(message)) => message,
        other => panic!(
            "{shown}: expected Invalid, got {:?}",
            other.map(|s| s.task_id)
        ),
    }
}

#[tokio::test]
async fn a_graph_that_cannot_run_is_refused_naming_the_step_and_the_limit() {
    let tasks = service(Config::default(), Arc::new(MemoryStore::new()));
    let many: Vec<serde_json::Value> = (0..65).map(|_| json!("plan")).collect();
    let cases = [
        (
            json!([
                {"id": "a", "capability": "plan", "needs": ["b"]},
                {"id": "b", "capability": "retrieve", "needs": ["a"]},
            ]),
            vec!["`steps`", "cycle", "a → b → a"],
        ),
        (
            json!(["plan", {"id": "x", "capability": "retrieve", "needs": ["nope"]}]),
            vec!["`steps`", "step 1 (`x`)", "`nope`"],
        ),
        (
            json!(["plan", {"id": "plan", "capability": "retrieve"}]),
            vec!["`steps`", "step 1", "`plan`", "unique"],
        ),
        (
            json!([{"id": "m", "capability": "retrieve", "map": {"over": "input", "concurrency": 0}}]),
            vec!["step 0 (`m`)", "`map.concurrency`", "1 to 1000"],
        ),
        (
            json!([{"id": "m", "capability": "retrieve", "map": {"over": "input", "concurrency": 1001}}]),
            vec!["step 0 (`m`)", "`map.concurrency`", "1001"],
        ),
        (
            json!(["plan", {"id": "ok", "wait": {"signal": "ok"}}]),
            vec!["step 1 (`ok`)", "`wait.timeout_ms` is required"],
        ),
        (
            serde_json::Value::Array(many),
            vec!["65 steps", "at most 64"],
        ),
        (json!([]), vec!["`steps`", "at least one step"]),
        // The unknown-capability check covers every worker step, not only the first.
        (
            json!(["plan", {"capability": "teleport", "needs": []}]),
            vec!["unknown capability `teleport`"],
        ),
    ];
    for (steps, fragments) in cases {
        let shown = steps.to_string();
        let message = refusal(&tasks, steps).await;
        for f in fragments {
            assert!(message.contains(f), "{shown}: {message} lacks {f:?}");
        }
    }
}

#[tokio::test]
async fn a_capability_of_a_worker_registered_since_the_last_refresh_is_accepted() {
    let steps = json!(["plan", {"capability": "draft", "needs": []}]);
    let fresh = service_with(
        Config::default(),
        Arc::new(MemoryStore::new()),
        Arc::new(JustRegistered),
    );
    let submitted = fresh
        .submit("alice", body(json!({"steps": steps})), None, String::new())
        .await;
    assert!(submitted.is_ok(), "{:?}", submitted.map(|s| s.task_id));
    let nobody = service(Config::default(), Arc::new(MemoryStore::new()));
    let message = refusal(&nobody, steps).await;
    assert!(message.contains("unknown capability `draft`"), "{message}");
}

#[tokio::test]
async fn a_graph_is_stored_with_its_ids_and_needs() {
    let store = Arc::new(MemoryStore::new());
    let tasks = service(Config::default(), store.clone());
    let steps = json!([
        "plan",
        {"id": "search", "capability": "retrieve", "map": {"over": "plan.queries", "concurrency": 2}},
        {"id": "approve", "needs": [], "wait": {"timeout_ms": 60_000}},
        {"capability": "finalize", "needs": ["search", "approve"]},
    ]);
    let id = tasks
        .submit("alice", body(json!({"steps": steps})), None, String::new())
        .await
        .expect("accepted")
        .task_id;
    let view = store.get(&id).await.expect("read").expect("stored").view;
    let ids: Vec<&str> = view.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["plan", "search", "approve", "finalize"]);
    assert_eq!(view.steps[3].needs, ["search", "approve"]);
}

#[test]
fn submit_wakes_the_roots_and_gives_every_capability_a_loop() {
    let cap = |c: &str| Capability::new(c).expect("a valid capability");
    let mut steps = vec![
        PlannedStep::chain_link(0, "a", cap("plan"), 1, 1),
        PlannedStep::chain_link(0, "b", cap("retrieve"), 1, 1),
        PlannedStep::chain_link(1, "c", cap("evaluate"), 1, 1),
        PlannedStep::chain_link(0, "d", cap("plan"), 1, 1),
    ];
    steps[2].needs = vec![0, 1];
    let (every, roots) = super::capabilities_to_wake(&steps);
    assert_eq!(every, [cap("evaluate"), cap("plan"), cap("retrieve")]);
    assert_eq!(roots, [cap("plan"), cap("retrieve")]);
}

fn signal(name: &str, payload: serde_json::Value) -> SignalRequest {
    SignalRequest {
        name: name.into(),
        payload,
    }
}

/// A task of alice's whose first step waits for `approve`, then `plan` runs.
async fn waiting_task(tasks: &Tasks) -> TaskId {
    let steps = json!([{"id": "approve", "wait": {"timeout_ms": 3_600_000}}, "plan"]);
    tasks
        .submit("alice", body(json!({"steps": steps})), None, String::new())
        .await
        .expect("accepted")
        .task_id
}

#[tokio::test]
async fn a_signal_reaches_the_owners_waiting_step_once() {
    let store = Arc::new(MemoryStore::new());
    let tasks = service(Config::default(), store.clone());
    let id = waiting_task(&tasks).await;
    let alice = Caller::Client("alice".into());
    let bob = Caller::Client("bob".into());

    let someone_elses = tasks
        .signal(&bob, id.as_str(), signal("approve", json!(1)))
        .await;
    assert!(
        matches!(someone_elses, Err(ServiceError::NotFound(_))),
        "{someone_elses:?}"
    );
    let unknown = tasks
        .signal(
            &alice,
            TaskId::generate().as_str(),
            signal("approve", json!(1)),
        )
        .await;
    assert!(
        matches!(unknown, Err(ServiceError::NotFound(_))),
        "{unknown:?}"
    );
    match tasks
        .signal(&alice, id.as_str(), signal("nobody-listens", json!(1)))
        .await
    {
        Err(ServiceError::Invalid(m)) => assert!(m.contains("`nobody-listens`"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }

    let answer = tasks
        .signal(&alice, id.as_str(), signal("approve", json!({"ok": true})))
        .await
        .expect("delivered");
    assert_eq!(answer.status, SignalStatus::Delivered);
    let view = store.get(&id).await.expect("read").expect("stored").view;
    assert_eq!(view.steps[0].status, StepStatus::Succeeded);
    assert_eq!(view.steps[0].output, Some(json!({"ok": true})));
    assert_eq!(
        view.steps[1].status,
        StepStatus::Queued,
        "the step after it runs"
    );

    match tasks
        .signal(&alice, id.as_str(), signal("approve", json!(2)))
        .await
    {
        Err(ServiceError::Conflict(m)) => assert!(m.contains("`approve`"), "{m}"),
        other => panic!("expected Conflict, got {other:?}"),
    }
}

#[tokio::test]
async fn a_signal_before_its_step_is_buffered_and_an_operator_may_send_one() {
    let store = Arc::new(MemoryStore::new());
    let tasks = service(Config::default(), store.clone());
    let steps = json!(["plan", {"id": "approve", "wait": {"timeout_ms": 3_600_000}}]);
    let id = tasks
        .submit("alice", body(json!({"steps": steps})), None, String::new())
        .await
        .expect("accepted")
        .task_id;
    let answer = tasks
        .signal(
            &Caller::Operator,
            id.as_str(),
            signal("approve", json!("yes")),
        )
        .await
        .expect("buffered");
    assert_eq!(answer.status, SignalStatus::Buffered);
    let view = store.get(&id).await.expect("read").expect("stored").view;
    assert_eq!(view.steps[1].status, StepStatus::Pending, "not reached yet");
    let again = tasks
        .signal(
            &Caller::Operator,
            id.as_str(),
            signal("approve", json!("no")),
        )
        .await;
    assert!(matches!(again, Err(ServiceError::Conflict(_))), "{again:?}");
}

#[tokio::test]
async fn a_signal_to_a_finished_task_conflicts_and_a_bad_signal_is_refused() {
    let store = Arc::new(MemoryStore::new());
    let tasks = service(Config::default(), store.clone());
    let alice = Caller::Client("alice".into());
    let id = waiting_task(&tasks).await;

    let mut deep = json!(1);
    for _ in 0..100 {
        deep = json!([deep]);
    }
    for (request, field) in [
        (signal("", json!(1)), "`name`"),
        (signal(&"n".repeat(65), json!(1)), "`name`"),
        (signal("Not A Name", json!(1)), "`name`"),
        (signal("approve", deep), "`payload`"),
    ] {
        match tasks.signal(&alice, id.as_str(), request).await {
            Err(ServiceError::Invalid(m)) => assert!(m.contains(field), "{m}"),
            other => panic!("expected Invalid naming {field}, got {other:?}"),
        }
    }
    assert_eq!(status(store.as_ref(), &id).await, TaskStatus::Waiting);

    tasks.cancel(&alice, id.as_str()).await.expect("cancelled");
    match tasks
        .signal(&alice, id.as_str(), signal("approve", json!(1)))
        .await
    {
        Err(ServiceError::Conflict(m)) => assert!(m.contains("cancelled"), "{m}"),
        other => panic!("expected Conflict, got {other:?}"),
    }
}

/// The in-memory store, except that `redrive` fails as if Redis went away after the first
/// few calls, until [`FailingRedrive::recover`].
struct FailingRedrive {
    inner: MemoryStore,
    /// Redrives that still succeed.
    left: AtomicUsize,
}

impl FailingRedrive {
    fn after(successes: usize) -> Self {
        Self {
            inner: MemoryStore::new(),
            left: AtomicUsize::new(successes),
        }
    }

    fn recover(&self) {
        self.left.store(usize::MAX, Ordering::SeqCst);
    }
}

#[async_trait]
impl TaskStore for FailingRedrive {
    async fn redrive(
        &self,
        id: &TaskId,
        retention: Duration,
    ) -> Result<RedriveOutcome, StoreError> {
        let spent = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if spent.is_err() {
            return Err(StoreError::Unavailable("connection refused".into()));
        }
        self.inner.redrive(id, retention).await
    }

    async fn signal(
        &self,
        id: &TaskId,
        name: &str,
        payload: &str,
        retention: Duration,
    ) -> Result<SignalOutcome, StoreError> {
        self.inner.signal(id, name, payload, retention).await
    }

    async fn fire_timers(
        &self,
        limit: usize,
        retention: Duration,
    ) -> Result<Vec<FiredTimer>, StoreError> {
        self.inner.fire_timers(limit, retention).await
    }

    async fn submit(
        &self,
        task: NewTask,
        limit: RateLimit,
        retention: Duration,
    ) -> Result<SubmitOutcome, StoreError> {
        self.inner.submit(task, limit, retention).await
    }

    async fn get(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        self.inner.get(id).await
    }

    async fn claim(
        &self,
        capability: &Capability,
        workers: &[WorkerId],
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        self.inner.claim(capability, workers, lease).await
    }

    async fn release(
        &self,
        step: &StepRef,
        why: ReleaseReason,
    ) -> Result<ReleaseOutcome, StoreError> {
        self.inner.release(step, why).await
    }

    async fn report(
        &self,
        report: &ResultReport,
        retry: RetryPolicy,
        jitter: f64,
        retention: Duration,
    ) -> Result<ReportOutcome, StoreError> {
        self.inner.report(report, retry, jitter, retention).await
    }

    async fn expired_leases(
        &self,
        capability: &Capability,
        limit: usize,
    ) -> Result<Vec<ExpiredLease>, StoreError> {
        self.inner.expired_leases(capability, limit).await
    }

    async fn extend_leases(
        &self,
        capability: &Capability,
        leases: &[(StepRef, u64)],
    ) -> Result<(), StoreError> {
        self.inner.extend_leases(capability, leases).await
    }

    async fn promote_due(&self, capability: &Capability) -> Result<usize, StoreError> {
        self.inner.promote_due(capability).await
    }

    async fn claim_callbacks(
        &self,
        limit: usize,
        visibility: Duration,
        max_attempts: u32,
    ) -> Result<Vec<CallbackClaim>, StoreError> {
        self.inner
            .claim_callbacks(limit, visibility, max_attempts)
            .await
    }

    async fn finish_callback(
        &self,
        id: &TaskId,
        attempt: u32,
        result: &CallbackResult,
    ) -> Result<bool, StoreError> {
        self.inner.finish_callback(id, attempt, result).await
    }

    async fn callbacks_pending(&self) -> Result<u64, StoreError> {
        self.inner.callbacks_pending().await
    }

    async fn cancel(&self, id: &TaskId, retention: Duration) -> Result<CancelOutcome, StoreError> {
        self.inner.cancel(id, retention).await
    }

    async fn dead_letter_page(
        &self,
        capabilities: &[Capability],
        after: Option<&crate::store::search::DeadLetterCursor>,
        limit: usize,
    ) -> Result<crate::store::search::DeadLetterPage, StoreError> {
        self.inner
            .dead_letter_page(capabilities, after, limit)
            .await
    }

    async fn purge_dead_letters(
        &self,
        capability: &Capability,
        task: Option<&TaskId>,
    ) -> Result<u64, StoreError> {
        self.inner.purge_dead_letters(capability, task).await
    }

    async fn search_tasks(
        &self,
        query: &crate::store::search::TaskQuery,
    ) -> Result<crate::store::search::TaskPage, StoreError> {
        self.inner.search_tasks(query).await
    }

    async fn sweep_task_index(
        &self,
        retention: Duration,
        budget: usize,
    ) -> Result<usize, StoreError> {
        self.inner.sweep_task_index(retention, budget).await
    }

    async fn events(
        &self,
        id: &TaskId,
        after: Option<&crate::store::events::EventCursor>,
        limit: usize,
    ) -> Result<Vec<common::wire::TaskEvent>, StoreError> {
        self.inner.events(id, after, limit).await
    }

    async fn all_events(
        &self,
        after: Option<&crate::store::events::EventCursor>,
        limit: usize,
    ) -> Result<Vec<common::wire::TaskEvent>, StoreError> {
        self.inner.all_events(after, limit).await
    }

    async fn latest_event(&self) -> Result<Option<crate::store::events::EventCursor>, StoreError> {
        self.inner.latest_event().await
    }

    async fn wait_events(
        &self,
        id: Option<&TaskId>,
        after: Option<&crate::store::events::EventCursor>,
        timeout: Duration,
    ) {
        self.inner.wait_events(id, after, timeout).await;
    }

    async fn progress(
        &self,
        progress: &common::wire::StepProgress,
    ) -> Result<crate::store::ProgressOutcome, StoreError> {
        self.inner.progress(progress).await
    }

    async fn dead_letters(
        &self,
        capability: &Capability,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        self.inner.dead_letters(capability, limit).await
    }

    async fn stats(
        &self,
        capabilities: &[Capability],
        retention: Duration,
    ) -> Result<Vec<(Capability, QueueStats)>, StoreError> {
        self.inner.stats(capabilities, retention).await
    }

    async fn worker_loads(&self) -> Result<HashMap<String, u32>, StoreError> {
        self.inner.worker_loads().await
    }

    async fn capabilities(&self) -> Result<Vec<Capability>, StoreError> {
        self.inner.capabilities().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

/// Counts its registry reads; no worker is alive.
#[derive(Default)]
struct CountingReads(std::sync::atomic::AtomicUsize);

#[async_trait]
impl WorkerSource for CountingReads {
    async fn live(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn repeated_submissions_naming_unknown_capabilities_share_one_registry_read() {
    let workers = Arc::new(CountingReads::default());
    let tasks = service_with(
        Config::default(),
        Arc::new(MemoryStore::new()),
        workers.clone(),
    );
    for i in 0..50 {
        let body = body(json!({"steps": [format!("nobody-serves-{i}")]}));
        let Err(error) = tasks.submit("alice", body, None, String::new()).await else {
            panic!("no worker serves nobody-serves-{i}");
        };
        assert!(error.to_string().contains("unknown capability"), "{error}");
    }
    assert_eq!(
        workers.0.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "50 refusals within the window read the registry once"
    );
    // After the window a new capability is looked up again (a worker may have come).
    tokio::time::sleep(super::REGISTRY_READ_EVERY + std::time::Duration::from_millis(20)).await;
    let body = body(json!({"steps": ["nobody-serves-late"]}));
    assert!(
        tasks
            .submit("alice", body, None, String::new())
            .await
            .is_err()
    );
    assert_eq!(workers.0.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_budget_is_refused_on_the_in_memory_store_which_no_gateway_can_share() {
    let store: Arc<dyn TaskStore> = Arc::new(MemoryStore::new());
    let tasks = service(Config::default(), store.clone());
    let submission = body(json!({"steps": ["plan"], "budget": {"max_cost_usd": 0.5}}));
    let Err(err) = tasks.submit("alice", submission, None, String::new()).await else {
        panic!("a budget nothing can enforce is refused");
    };
    assert!(err.to_string().contains("needs the Redis store"), "{err}");
    let plan = Capability::new("plan").expect("a valid capability");
    let stats = store.stats(&[plan], Duration::from_secs(60)).await.unwrap();
    assert_eq!(stats[0].1.queued, 0, "nothing was queued");
}

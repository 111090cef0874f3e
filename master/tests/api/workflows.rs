//! DAG workflows end to end (`docs/workflows.md`): a real master on a real redis-server,
//! and scripted workers that speak the worker protocol and answer what a graph needs (a
//! plan with `queries`, a router's `next`), counting what they ran and how much of it at
//! once. Fan-out and fan-in, routing, waits released by signals (buffered, delivered,
//! across a master restart, timed out), cancel and redrive of a graph, and the signal
//! endpoint under misuse.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::redis::RedisSettings;
use common::wire::{StepError, StepKind, StepStatus, StepView, TaskStatus, TaskView};
use serde_json::{Value, json};
use testkit::RedisServer;
use testkit::fakes::worker::{Answer, FakeWorker, Gate};

use crate::helpers::*;

// ---------------------------------------------------------------------------------------
// Answers of the scripted worker (`testkit::fakes::worker::FakeWorker`, `Behavior::Answer`)

/// How many steps a worker here runs at once: more than any test has running together.
const SLOTS: u32 = 16;

/// Echoes the step's input.
fn echo() -> Behavior {
    Answer::new(|step| Ok(step.input.clone())).into()
}

/// Answers the step's input and what it was told about its needs.
fn seen() -> Behavior {
    Answer::new(|step| {
        Ok(json!({
            "capability": step.capability,
            "input": step.input,
            "previous": step.context.previous.iter().map(|p| json!({
                "id": p.id, "status": p.status, "output": p.output,
            })).collect::<Vec<_>>(),
        }))
    })
    .into()
}

// ---------------------------------------------------------------------------------------
// Reading tasks

/// The declared step `id` of a view.
fn step<'a>(view: &'a TaskView, id: &str) -> &'a StepView {
    view.steps
        .iter()
        .find(|s| s.id == id)
        .unwrap_or_else(|| panic!("no step {id} in {view:#?}"))
}

/// Waits (bounded) until the view of `id` satisfies `ready`; returns that view.
async fn until(
    master: &TestMaster,
    id: &str,
    what: &str,
    ready: impl Fn(&TaskView) -> bool,
) -> TaskView {
    let found = testkit::eventually(Duration::from_secs(15), || async {
        let view = master.view(id).await;
        ready(&view).then_some(view)
    })
    .await;
    match found {
        Some(view) => view,
        None => panic!(
            "task {id} never came to {what}: {:#?}",
            master.view(id).await
        ),
    }
}

/// The task is `waiting` with its step `wait_id` waiting.
fn waiting_on(wait_id: &'static str) -> impl Fn(&TaskView) -> bool {
    move |v| v.status == TaskStatus::Waiting && step(v, wait_id).status == StepStatus::Waiting
}

/// `POST /task/{id}/signal` as `key`: the status and the body.
async fn signal(master: &TestMaster, key: &str, id: &str, body: &Value) -> (u16, Value) {
    let r = master
        .post(&format!("/task/{id}/signal"), key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

// ---------------------------------------------------------------------------------------
// Fan-out and fan-in

#[tokio::test]
async fn plan_fans_out_over_its_queries_two_at_a_time_and_the_join_gets_them_in_order() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let queries: Vec<String> = (0..7).map(|i| format!("query {i}")).collect();
    let planned = queries.clone();
    let worker = FakeWorker::start_mixed(
        "w-graph",
        &[
            (
                "plan",
                Answer::new(move |_| Ok(json!({"queries": planned}))).into(),
            ),
            (
                "retrieve",
                Answer::new(|s| Ok(json!({"doc": s.input, "element": s.context.element_index})))
                    // Long enough that instances the store let run together are seen
                    // together.
                    .after(Duration::from_millis(150))
                    .into(),
            ),
            ("evaluate", seen()),
        ],
        SLOTS,
        &settings,
        &master.url,
    )
    .await;

    let id = master
        .submit(json!({
            "steps": [
                {"id": "plan", "capability": "plan", "needs": []},
                {"id": "retrieve", "capability": "retrieve", "needs": ["plan"],
                 "map": {"over": "plan.queries", "concurrency": 2}},
                {"id": "evaluate", "capability": "evaluate", "needs": ["retrieve"]},
            ],
            "input": {"question": "why is the sky blue?"},
        }))
        .await;
    let view = master.wait(&id, Duration::from_secs(30)).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:#?}");

    // Every instance ran once, on its own element, with the task input alongside.
    assert_eq!(worker.requests(&id, "plan").len(), 1);
    let mut instances = worker.requests(&id, "retrieve");
    assert_eq!(instances.len(), queries.len(), "one run per element");
    instances.sort_by_key(|s| s.context.element_index);
    for (i, s) in instances.iter().enumerate() {
        assert_eq!(s.context.element_index, Some(i as u32), "{s:?}");
        assert_eq!(
            s.input,
            json!(queries[i]),
            "instance {i}'s input is its element"
        );
        assert_eq!(s.attempt, 1);
        assert_eq!(s.context.task_input, view.input);
    }
    assert!(
        worker.peak("retrieve") <= 2,
        "{} instances ran at once with concurrency 2",
        worker.peak("retrieve")
    );

    // The join ran once and received the instances' outputs in element order.
    let expected: Vec<Value> = (0..queries.len())
        .map(|i| json!({"doc": queries[i], "element": i}))
        .collect();
    let joins = worker.requests(&id, "evaluate");
    assert_eq!(joins.len(), 1, "the join ran once");
    assert_eq!(joins[0].input, json!(expected), "outputs in element order");
    let previous = &joins[0].context.previous;
    assert_eq!(previous.len(), 1, "one entry per need");
    assert_eq!(previous[0].id, "retrieve");
    assert_eq!(previous[0].status, StepStatus::Succeeded);
    assert_eq!(previous[0].output, json!(expected));

    // The view says the same.
    let retrieve = step(&view, "retrieve");
    assert_eq!(retrieve.status, StepStatus::Succeeded);
    assert_eq!(retrieve.output, Some(json!(expected)));
    let map = retrieve.map.as_ref().expect("a map view");
    assert_eq!(map.concurrency, 2);
    assert_eq!(map.total, Some(queries.len() as u32));
    assert_eq!(map.finished, queries.len() as u32);
    assert_eq!(retrieve.instances.len(), queries.len());
    for (i, instance) in retrieve.instances.iter().enumerate() {
        assert_eq!(instance.element_index, Some(i as u32));
        assert_eq!(instance.status, StepStatus::Succeeded);
        assert_eq!(instance.attempts, 1);
        assert_eq!(instance.output.as_ref(), Some(&expected[i]));
    }
    assert_eq!(view.result, step(&view, "evaluate").output);
    master.stop().await;
}

/// Runs a graph whose `fan` step maps `echo` over [`master::store::MAX_MAP_WIDTH`]
/// numbers (from the task input, or from `plan`'s output when `after_plan`), then joins:
/// every element runs once and the join gets them all, in order.
async fn widest_map(after_plan: bool) {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let width = master::store::MAX_MAP_WIDTH;
    let items: Vec<usize> = (0..width).collect();
    let planned = items.clone();
    let worker = FakeWorker::start_mixed(
        "w-wide",
        &[
            (
                "plan",
                Answer::new(move |_| Ok(json!({"items": planned}))).into(),
            ),
            ("echo", echo()),
        ],
        SLOTS,
        &settings,
        &master.url,
    )
    .await;
    let (steps, input) = match after_plan {
        false => (
            json!([
                {"id": "fan", "capability": "echo", "needs": [],
                 "map": {"over": "input.items", "concurrency": width}},
                {"id": "join", "capability": "echo", "needs": ["fan"]},
            ]),
            json!({"items": items}),
        ),
        true => (
            json!([
                {"id": "plan", "capability": "plan", "needs": []},
                {"id": "fan", "capability": "echo", "needs": ["plan"],
                 "map": {"over": "plan.items", "concurrency": width}},
                {"id": "join", "capability": "echo", "needs": ["fan"]},
            ]),
            json!({}),
        ),
    };
    let id = master.submit(json!({"steps": steps, "input": input})).await;
    let view = master.wait(&id, Duration::from_secs(30)).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{:?}", view.error);
    assert_eq!(view.result, Some(json!(items)), "every element, in order");
    assert_eq!(step(&view, "fan").instances.len(), width);
    assert_eq!(worker.requests(&id, "echo").len(), width + 1, "each once");
    master.stop().await;
}

#[tokio::test]
async fn a_root_map_as_wide_as_allowed_expands_at_submit_and_runs_every_element() {
    widest_map(false).await;
}

#[tokio::test]
async fn a_map_as_wide_as_allowed_expands_when_its_need_reports_and_runs_every_element() {
    widest_map(true).await;
}

// ---------------------------------------------------------------------------------------
// Routing

#[tokio::test]
async fn a_router_runs_one_specialist_skips_the_other_and_the_join_runs() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let worker = FakeWorker::start_mixed(
        "w-route",
        &[
            (
                "triage",
                Answer::new(|s| Ok(json!({"next": s.input["route"], "ticket": s.input["ticket"]})))
                    .into(),
            ),
            ("billing", seen()),
            ("tech", seen()),
            ("reply", seen()),
        ],
        SLOTS,
        &settings,
        &master.url,
    )
    .await;
    let graph = |route: &str| {
        json!({
            "steps": [
                {"id": "triage", "capability": "triage", "needs": [], "router": true},
                {"id": "billing", "capability": "billing", "needs": ["triage"]},
                {"id": "tech", "capability": "tech", "needs": ["triage"]},
                {"id": "reply", "capability": "reply", "needs": ["billing", "tech"]},
            ],
            "input": {"route": route, "ticket": 42},
        })
    };

    for (chosen, other) in [("billing", "tech"), ("tech", "billing")] {
        let id = master.submit(graph(chosen)).await;
        let view = master.wait(&id, Duration::from_secs(20)).await;
        assert_eq!(view.status, TaskStatus::Succeeded, "{view:#?}");
        assert_eq!(step(&view, chosen).status, StepStatus::Succeeded);
        assert_eq!(step(&view, other).status, StepStatus::Skipped);
        assert!(
            worker.requests(&id, other).is_empty(),
            "the step the router did not pick never reached a worker"
        );
        assert_eq!(worker.requests(&id, chosen).len(), 1);
        let reply = worker.requests(&id, "reply");
        assert_eq!(reply.len(), 1, "the join after both ran once");
        let previous = &reply[0].context.previous;
        assert_eq!(previous.len(), 2, "{previous:?}");
        assert_eq!(previous[0].id, "billing", "in needs order");
        assert_eq!(previous[1].id, "tech");
        let of = |id: &str| previous.iter().find(|p| p.id == id).unwrap();
        assert_eq!(of(chosen).status, StepStatus::Succeeded);
        assert_eq!(
            Some(&of(chosen).output),
            step(&view, chosen).output.as_ref()
        );
        assert_eq!(of(other).status, StepStatus::Skipped);
        assert_eq!(
            of(other).output,
            Value::Null,
            "a skipped need has no output"
        );
        assert_eq!(view.result, step(&view, "reply").output);
    }

    // A `next` that names a step that is not one of the router's successors fails it for
    // good, without a retry, and nothing after it runs.
    let id = master.submit(graph("reply")).await;
    let view = master.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Failed, "{view:#?}");
    let triage = step(&view, "triage");
    assert_eq!(triage.status, StepStatus::Failed);
    assert_eq!(triage.attempts, 1, "a bad route is not retried");
    assert_eq!(
        view.error.as_ref().and_then(|e| e.kind.as_deref()),
        Some("route")
    );
    for id_ in ["billing", "tech", "reply"] {
        assert!(worker.requests(&id, id_).is_empty(), "{id_} ran");
    }
    master.stop().await;
}

// ---------------------------------------------------------------------------------------
// Waits and signals

/// `draft` (a worker) → `approve` (a wait for signal `approval`) → `publish`.
fn approval_graph(hold_draft: bool, timeout_ms: u64) -> Value {
    json!({
        "steps": [
            {"id": "draft", "capability": "draft", "needs": []},
            {"id": "approve", "needs": ["draft"],
             "wait": {"signal": "approval", "timeout_ms": timeout_ms}},
            {"id": "publish", "capability": "publish", "needs": ["approve"]},
        ],
        "input": {"hold": hold_draft},
    })
}

/// A worker for [`approval_graph`]: `draft` steps whose input says `hold` wait for a
/// permit of `gate`.
async fn approval_worker(settings: &RedisSettings, master: &TestMaster, gate: &Gate) -> FakeWorker {
    let draft =
        Answer::new(|_| Ok(json!({"draft": "text"}))).held(gate, |s| s.input["hold"] == true);
    FakeWorker::start_mixed(
        "w-approval",
        &[("draft", draft.into()), ("publish", echo())],
        SLOTS,
        settings,
        &master.url,
    )
    .await
}

#[tokio::test]
async fn a_signal_before_the_wait_is_buffered_and_one_after_is_delivered() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let gate = Gate::new();
    let worker = approval_worker(&settings, &master, &gate).await;

    // Before: the signal arrives while `draft` still runs, so `approve` is pending.
    let early = master.submit(approval_graph(true, 60_000)).await;
    testkit::eventually(Duration::from_secs(10), || async {
        (!worker.requests(&early, "draft").is_empty()).then_some(())
    })
    .await
    .expect("draft reached the worker");
    let payload = json!({"by": "alice", "ok": true});
    let (status, body) = signal(
        &master,
        ALICE,
        &early,
        &json!({"name": "approval", "payload": payload}),
    )
    .await;
    assert_eq!((status, &body), (202, &json!({"status": "buffered"})));
    assert_eq!(
        step(&master.view(&early).await, "approve").status,
        StepStatus::Pending,
        "buffered, the wait is not reached yet"
    );
    let (status, _) = signal(
        &master,
        ALICE,
        &early,
        &json!({"name": "approval", "payload": "again"}),
    )
    .await;
    assert_eq!(status, 409, "a second signal before the step is reached");
    gate.release(1);
    let view = master.wait(&early, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:#?}");
    let approve = step(&view, "approve");
    assert_eq!(approve.kind, StepKind::Wait);
    assert_eq!(approve.output, Some(payload.clone()), "the first payload");
    let publish = worker.requests(&early, "publish");
    assert_eq!(publish.len(), 1);
    assert_eq!(publish[0].input, payload);
    assert_eq!(view.result, Some(payload));

    // After: the task shows `waiting`, the signal is delivered and releases it.
    let late = master.submit(approval_graph(false, 60_000)).await;
    let view = until(&master, &late, "waiting", waiting_on("approve")).await;
    let approve = step(&view, "approve");
    let wait = approve.wait.as_ref().expect("a wait view");
    assert_eq!(wait.signal, "approval");
    assert_eq!(wait.timeout_ms, 60_000);
    assert!(
        approve.wakes_at_ms.is_some(),
        "a waiting wait shows its timer"
    );
    assert!(worker.requests(&late, "publish").is_empty());
    let (status, body) = signal(
        &master,
        ALICE,
        &late,
        &json!({"name": "approval", "payload": {"by": "bob"}}),
    )
    .await;
    assert_eq!((status, &body), (202, &json!({"status": "delivered"})));
    let view = master.wait(&late, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:#?}");
    assert_eq!(view.result, Some(json!({"by": "bob"})));
    let (status, _) = signal(
        &master,
        ALICE,
        &late,
        &json!({"name": "approval", "payload": 1}),
    )
    .await;
    assert_eq!(status, 409, "the task has finished");
    master.stop().await;
}

#[tokio::test]
async fn a_wait_survives_a_master_restart_and_the_new_master_takes_the_signal() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let first = TestMaster::start(test_config(&settings)).await;
    let gate = Gate::new();
    let worker = approval_worker(&settings, &first, &gate).await;
    let id = first.submit(approval_graph(false, 120_000)).await;
    until(&first, &id, "waiting", waiting_on("approve")).await;
    first.stop().await;

    // A new master on the same Redis: the wait, and its timer, are in Redis.
    let second = TestMaster::start(test_config(&settings)).await;
    worker.set_master(&second.url);
    let view = second.view(&id).await;
    assert_eq!(view.status, TaskStatus::Waiting, "{view:#?}");
    assert_eq!(step(&view, "approve").status, StepStatus::Waiting);
    let (status, body) = signal(
        &second,
        ALICE,
        &id,
        &json!({"name": "approval", "payload": "go"}),
    )
    .await;
    assert_eq!((status, &body), (202, &json!({"status": "delivered"})));
    let view = second.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:#?}");
    assert_eq!(view.result, Some(json!("go")));
    assert_eq!(
        worker.requests(&id, "draft").len(),
        1,
        "draft did not run again"
    );
    assert_eq!(worker.requests(&id, "publish").len(), 1);
    second.stop().await;
}

#[tokio::test]
async fn a_wait_that_times_out_fails_the_task_or_continues_and_a_sleep_wakes() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let worker = FakeWorker::start_mixed(
        "w-timeout",
        &[("publish", echo())],
        SLOTS,
        &settings,
        &master.url,
    )
    .await;
    let graph = |on_timeout: &str| {
        json!({
            "steps": [
                {"id": "gate", "needs": [],
                 "wait": {"timeout_ms": 200, "on_timeout": on_timeout}},
                {"id": "after", "capability": "publish", "needs": ["gate"]},
            ],
            "input": 1,
        })
    };

    let failing = master.submit(graph("fail")).await;
    let view = master.wait(&failing, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Failed, "{view:#?}");
    assert_eq!(
        view.error.as_ref().and_then(|e| e.kind.as_deref()),
        Some("wait_timeout")
    );
    let gate = step(&view, "gate");
    assert_eq!(gate.status, StepStatus::Failed);
    assert_eq!(
        gate.wait.as_ref().unwrap().signal,
        "gate",
        "defaults to the id"
    );
    assert_eq!(step(&view, "after").status, StepStatus::Pending);
    assert!(worker.requests(&failing, "publish").is_empty());
    let (status, _) = signal(&master, ALICE, &failing, &json!({"name": "gate"})).await;
    assert_eq!(status, 409, "too late: the task has failed");

    let continuing = master.submit(graph("continue")).await;
    let view = master.wait(&continuing, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:#?}");
    assert_eq!(step(&view, "gate").output, Some(json!({"timed_out": true})));
    let after = worker.requests(&continuing, "publish");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].input, json!({"timed_out": true}));
    // A sleep is a timer too: it succeeds with `null`, which its dependant receives.
    let slept = master
        .submit(json!({
            "steps": [
                {"id": "nap", "needs": [], "sleep_ms": 100},
                {"id": "after", "capability": "publish", "needs": ["nap"]},
            ],
            "input": 1,
        }))
        .await;
    let view = master.wait(&slept, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:#?}");
    let nap = step(&view, "nap");
    assert_eq!(
        (nap.kind, nap.status),
        (StepKind::Sleep, StepStatus::Succeeded)
    );
    let after = worker.requests(&slept, "publish");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].input, Value::Null);
    // (Read once `publish` has a queue row, which it has once a step was queued.)
    assert_eq!(
        master.queue("publish").await["dead_lettered"],
        0,
        "a timed-out wait has no capability to be dead-lettered under"
    );
    master.stop().await;
}

// ---------------------------------------------------------------------------------------
// Cancel and redrive

#[tokio::test]
async fn cancel_mid_graph_stops_every_branch_and_fences_late_reports() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let gate = Gate::new();
    let slow = Answer::new(|s| Ok(s.input.clone())).held(&gate, |_| true);
    let worker = FakeWorker::start_mixed(
        "w-cancel",
        &[("slow", slow.into()), ("publish", echo())],
        SLOTS,
        &settings,
        &master.url,
    )
    .await;
    let id = master
        .submit(json!({
            "steps": [
                {"id": "slow", "capability": "slow", "needs": []},
                {"id": "hold", "needs": [], "wait": {"timeout_ms": 600_000}},
                {"id": "later", "capability": "publish", "needs": ["slow", "hold"]},
            ],
            "input": {"x": 1},
        }))
        .await;
    until(&master, &id, "running with its wait waiting", |v| {
        v.status == TaskStatus::Running
            && step(v, "slow").status == StepStatus::Dispatched
            && step(v, "hold").status == StepStatus::Waiting
    })
    .await;

    let r = master
        .http
        .delete(format!("{}/task/{id}", master.url))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let view = master.view(&id).await;
    assert_eq!(view.status, TaskStatus::Cancelled, "{view:#?}");
    assert_eq!(step(&view, "slow").status, StepStatus::Cancelled);
    assert_eq!(step(&view, "hold").status, StepStatus::Cancelled);
    assert_eq!(step(&view, "later").status, StepStatus::Pending);
    assert!(step(&view, "hold").wakes_at_ms.is_none(), "{view:#?}");

    // The timer is gone from Redis.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let timers: Vec<String> = redis::cmd("ZRANGE")
        .arg(master::store::schema::keys::timers(&settings.key_prefix))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !timers.iter().any(|t| t.starts_with(&id)),
        "the cancelled wait's timer is still set: {timers:?}"
    );
    let (status, _) = signal(&master, ALICE, &id, &json!({"name": "hold"})).await;
    assert_eq!(status, 409, "a cancelled task takes no signal");

    // The running step finishes now: its report is fenced off.
    gate.release(1);
    let acks = testkit::eventually(Duration::from_secs(10), || async {
        let acks: Vec<String> = (worker.journal().acks.iter())
            .filter(|((task, _), _)| *task == id)
            .flat_map(|(_, acks)| acks.clone())
            .collect();
        (!acks.is_empty()).then_some(acks)
    })
    .await
    .expect("the held step reported");
    assert_eq!(acks[0], "discarded", "{acks:?}");
    let view = master.view(&id).await;
    assert_eq!(view.status, TaskStatus::Cancelled);
    assert_eq!(step(&view, "slow").output, None);
    assert!(worker.requests(&id, "publish").is_empty());
    master.stop().await;
}

#[tokio::test]
async fn redrive_reruns_only_the_failed_branch_and_keeps_what_succeeded() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let broken = Arc::new(AtomicBool::new(true));
    let gate = Gate::new();
    let flag = broken.clone();
    let right = Answer::new(move |s| {
        if flag.load(Ordering::SeqCst) {
            Err(StepError::permanent("test", "right is broken"))
        } else {
            Ok(json!({"right": s.attempt}))
        }
    })
    // The first run of `right` waits until `left` has succeeded, so what fails the task
    // is only `right`.
    .held(&gate, |_| true);
    let worker = FakeWorker::start_mixed(
        "w-redrive",
        &[
            ("root", Answer::new(|_| Ok(json!({"root": 1}))).into()),
            ("left", Answer::new(|_| Ok(json!({"left": "done"}))).into()),
            ("right", right.into()),
            ("join", seen()),
        ],
        SLOTS,
        &settings,
        &master.url,
    )
    .await;
    let id = master
        .submit(json!({
            "steps": [
                {"id": "root", "capability": "root", "needs": []},
                {"id": "left", "capability": "left", "needs": ["root"]},
                {"id": "right", "capability": "right", "needs": ["root"]},
                {"id": "join", "capability": "join", "needs": ["left", "right"]},
            ],
            "input": {},
        }))
        .await;
    until(&master, &id, "left succeeded", |v| {
        step(v, "left").status == StepStatus::Succeeded
    })
    .await;
    gate.release(1);
    let view = master.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Failed, "{view:#?}");
    assert_eq!(step(&view, "right").status, StepStatus::Failed);
    assert_eq!(step(&view, "left").status, StepStatus::Succeeded);
    assert_eq!(step(&view, "join").status, StepStatus::Pending);
    assert_eq!(master.queue("right").await["dead_lettered"], 1);

    broken.store(false, Ordering::SeqCst);
    gate.release(1);
    let r = master
        .post("/dispatch", OPERATOR)
        .json(&json!({"task_id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let view = master.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:#?}");
    assert_eq!(master.queue("right").await["dead_lettered"], 0);
    assert_eq!(
        worker.requests(&id, "root").len(),
        1,
        "root kept its output"
    );
    assert_eq!(
        worker.requests(&id, "left").len(),
        1,
        "left kept its output"
    );
    assert_eq!(worker.requests(&id, "right").len(), 2, "right ran again");
    let join = worker.requests(&id, "join");
    assert_eq!(join.len(), 1, "the join ran once, after the redrive");
    assert_eq!(
        join[0].input,
        json!({"left": {"left": "done"}, "right": step(&view, "right").output}),
        "a step with several needs receives an object by need id"
    );
    master.stop().await;
}

#[tokio::test]
async fn redrive_of_a_map_reruns_only_its_failed_instance() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let broken = Arc::new(AtomicBool::new(true));
    let gate = Gate::new();
    let flag = broken.clone();
    let part = Answer::new(move |s| {
        if s.input == "bad" && flag.load(Ordering::SeqCst) {
            Err(StepError::permanent("test", "bad element"))
        } else {
            Ok(json!({"part": s.input}))
        }
    })
    // The bad element runs once the others have succeeded, so only it fails.
    .held(&gate, |s| s.input == "bad");
    let worker = FakeWorker::start_mixed(
        "w-map-redrive",
        &[("part", part.into()), ("join", echo())],
        SLOTS,
        &settings,
        &master.url,
    )
    .await;
    let id = master
        .submit(json!({
            "steps": [
                {"id": "parts", "capability": "part", "needs": [],
                 "map": {"over": "input.items", "concurrency": 4}},
                {"id": "join", "capability": "join", "needs": ["parts"]},
            ],
            "input": {"items": ["a", "b", "bad", "c"]},
        }))
        .await;
    until(&master, &id, "three instances succeeded", |v| {
        step(v, "parts")
            .instances
            .iter()
            .filter(|i| i.status == StepStatus::Succeeded)
            .count()
            == 3
    })
    .await;
    gate.release(1);
    let view = master.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Failed, "{view:#?}");
    let parts = step(&view, "parts");
    assert_eq!(
        parts.status,
        StepStatus::Failed,
        "an instance failed the map"
    );
    assert_eq!(parts.instances[2].status, StepStatus::Failed);
    assert_eq!(step(&view, "join").status, StepStatus::Pending);

    broken.store(false, Ordering::SeqCst);
    gate.release(1);
    let r = master
        .post("/dispatch", OPERATOR)
        .json(&json!({"task_id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let view = master.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:#?}");
    let runs = |element: &str| {
        worker
            .requests(&id, "part")
            .iter()
            .filter(|s| s.input == element)
            .count()
    };
    for good in ["a", "b", "c"] {
        assert_eq!(runs(good), 1, "{good} kept its output");
    }
    assert_eq!(runs("bad"), 2, "the failed instance ran again");
    let join = worker.requests(&id, "join");
    assert_eq!(join.len(), 1);
    assert_eq!(
        join[0].input,
        json!([{"part": "a"}, {"part": "b"}, {"part": "bad"}, {"part": "c"}])
    );
    master.stop().await;
}

// ---------------------------------------------------------------------------------------
// The signal endpoint under misuse

#[tokio::test]
async fn signals_to_others_tasks_too_large_or_unknown_are_refused() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(master::Config {
        body_limit_bytes: 4_096,
        ..test_config(&settings)
    })
    .await;
    let gate = Gate::new();
    let _worker = approval_worker(&settings, &master, &gate).await;
    let id = master.submit(approval_graph(false, 60_000)).await;
    until(&master, &id, "waiting", waiting_on("approve")).await;
    let good = json!({"name": "approval", "payload": "yes"});

    let (status, _) = signal(&master, BOB, &id, &good).await;
    assert_eq!(status, 404, "bob may not signal alice's task");
    let unknown_task = common::wire::TaskId::generate().to_string();
    let (status, _) = signal(&master, ALICE, &unknown_task, &good).await;
    assert_eq!(status, 404, "no such task");
    let r = master
        .post(&format!("/task/{id}/signal"), "not-a-key-at-all")
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no valid key");

    // The payload may be as large as a request body may be, and no larger.
    let (status, body) = signal(
        &master,
        ALICE,
        &id,
        &json!({"name": "approval", "payload": "x".repeat(10_000)}),
    )
    .await;
    assert_eq!(status, 413, "a payload over the body limit: {body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");

    let (status, body) = signal(
        &master,
        ALICE,
        &id,
        &json!({"name": "nobody-listens", "payload": 1}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = signal(&master, ALICE, &id, &json!({"name": "", "payload": 1})).await;
    assert_eq!(status, 422, "an empty signal name: {body}");
    let (status, body) = signal(
        &master,
        ALICE,
        &id,
        &json!({"name": "n".repeat(65), "payload": 1}),
    )
    .await;
    assert_eq!(status, 422, "a signal name over 64 characters: {body}");

    // None of that touched the task: it still waits, and the right signal releases it.
    let view = master.view(&id).await;
    assert_eq!(view.status, TaskStatus::Waiting, "{view:#?}");
    let (status, body) = signal(&master, ALICE, &id, &good).await;
    assert_eq!((status, &body), (202, &json!({"status": "delivered"})));
    let view = master.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:#?}");
    assert_eq!(view.result, Some(json!("yes")));
    master.stop().await;
}

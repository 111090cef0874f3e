//! End to end through HTTP: pipelines across workers, context passing, worker death,
//! fencing, retries, dead letters and redrive, idempotency, cancel, two masters.

use std::time::Duration;

use common::wire::{StepStatus, TaskStatus};
use serde_json::{Value, json};
use testkit::RedisServer;

use crate::helpers::*;

#[tokio::test]
async fn a_chain_runs_through_four_workers_with_context() {
    let redis = RedisServer::start();
    let (master, _workers) = spawn_app(&redis).await;

    // A plain list of capabilities is a chain (the default pipeline is a graph now:
    // workflows.rs runs it).
    let id = master
        .submit(json!({
            "steps": ["plan", "retrieve", "evaluate", "finalize"],
            "input": {"question": "why?"}
        }))
        .await;
    let view = master.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:?}");
    assert_eq!(view.pipeline, None);
    let caps: Vec<&str> = view
        .steps
        .iter()
        .map(|s| s.capability.as_ref().map_or("", |c| c.as_str()))
        .collect();
    assert_eq!(caps, ["plan", "retrieve", "evaluate", "finalize"]);
    for (i, step) in view.steps.iter().enumerate() {
        assert_eq!(step.status, StepStatus::Succeeded);
        assert_eq!(step.attempts, 1);
        let out = step.output.as_ref().unwrap();
        assert_eq!(
            out["previous"],
            json!(i.min(1)),
            "step {i} sees the output of the step before it, not the whole history"
        );
        assert_eq!(out["task_input"], json!({"question": "why?"}));
        assert_eq!(
            step.worker_id.as_ref().unwrap().as_str(),
            format!("w-{}", step.capability.as_ref().unwrap())
        );
        if i > 0 {
            assert_eq!(
                &out["input"],
                view.steps[i - 1].output.as_ref().unwrap(),
                "step {i}'s input is step {}'s output",
                i - 1
            );
        }
    }
    assert_eq!(view.result, view.steps[3].output);

    let r = master
        .get(&format!("/result/{id}"), ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "succeeded");
    assert_eq!(body["result"], *view.result.as_ref().unwrap());
    master.stop().await;
}

#[tokio::test]
async fn killed_worker_step_is_redispatched_to_another() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let mut doomed = TestWorker::start(
        "doomed",
        &["plan"],
        4,
        Behavior::Hang,
        &settings,
        &master.url,
    )
    .await;
    let id = master.submit(json!({"steps": ["plan"], "input": 1})).await;
    // Wait until the doomed worker holds the step, then kill it.
    let held = testkit::eventually(Duration::from_secs(5), || async {
        (!doomed.received().is_empty()).then_some(())
    })
    .await;
    assert!(held.is_some(), "the step never reached the first worker");
    doomed.kill();
    let healthy = TestWorker::start(
        "healthy",
        &["plan"],
        4,
        Behavior::Succeed {
            delay: Duration::ZERO,
        },
        &settings,
        &master.url,
    )
    .await;
    let view = master.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:?}");
    assert_eq!(
        view.steps[0].attempts, 2,
        "the lapsed lease counted as an attempt"
    );
    assert_eq!(
        view.steps[0].worker_id.as_ref().unwrap().as_str(),
        "healthy"
    );
    assert_eq!(healthy.received()[0].attempt, 2);
    master.stop().await;
}

#[tokio::test]
async fn busy_worker_costs_no_attempt() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let busy =
        TestWorker::start("busy", &["plan"], 8, Behavior::Busy, &settings, &master.url).await;
    let id = master.submit(json!({"steps": ["plan"]})).await;
    testkit::eventually(Duration::from_secs(5), || async {
        (busy.received().len() >= 2).then_some(())
    })
    .await
    .expect("the busy worker was offered the step, and again after its 429");
    let _ok = TestWorker::start(
        "ok",
        &["plan"],
        8,
        Behavior::Succeed {
            delay: Duration::ZERO,
        },
        &settings,
        &master.url,
    )
    .await;
    let view = master.wait(&id, Duration::from_secs(10)).await;
    assert_eq!(view.status, TaskStatus::Succeeded);
    assert_eq!(view.steps[0].attempts, 1, "429s spent no attempt");
    assert_eq!(view.steps[0].worker_id.as_ref().unwrap().as_str(), "ok");
    master.stop().await;
}

#[tokio::test]
async fn stale_result_from_an_old_attempt_is_discarded() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let slow =
        TestWorker::start("slow", &["plan"], 4, Behavior::Hang, &settings, &master.url).await;
    let id = master
        .submit(json!({"steps": ["plan"], "input": "x"}))
        .await;
    testkit::eventually(Duration::from_secs(5), || async {
        (!slow.received().is_empty()).then_some(())
    })
    .await
    .unwrap();
    // The slow worker goes silent (no heartbeat listing the step): the lease lapses and
    // attempt 2 goes to another worker. Then the slow one comes back and reports.
    let mut slow = slow;
    slow.kill();
    let fast =
        TestWorker::start("fast", &["plan"], 4, Behavior::Hang, &settings, &master.url).await;
    testkit::eventually(Duration::from_secs(10), || async {
        fast.received().iter().any(|s| s.attempt == 2).then_some(())
    })
    .await
    .expect("attempt 2 dispatched after the lease lapsed");
    let late = json!({"task_id": id, "step": 0, "attempt": 1, "worker_id": "slow",
        "status": "succeeded", "output": "late"});
    let r = master
        .post("/result", WORKER_TOKEN)
        .json(&late)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "discarded");
    let current = json!({"task_id": id, "step": 0, "attempt": 2, "worker_id": "fast",
        "status": "succeeded", "output": "current"});
    let r = master
        .post("/result", WORKER_TOKEN)
        .json(&current)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "recorded");
    let r = master
        .post("/result", WORKER_TOKEN)
        .json(&current)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["status"],
        "recorded",
        "the same report again (its answer was lost) is acknowledged as recorded, once"
    );
    let view = master.wait(&id, Duration::from_secs(5)).await;
    assert_eq!(view.result, Some(json!("current")));
    master.stop().await;
}

#[tokio::test]
async fn retries_then_dead_letter_then_redrive_succeeds() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let mut failing = TestWorker::start(
        "failing",
        &["evaluate"],
        4,
        Behavior::Fail { retryable: true },
        &settings,
        &master.url,
    )
    .await;
    let id = master
        .submit(json!({"steps": ["evaluate"], "input": 1}))
        .await;
    let view = master.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Failed);
    assert_eq!(view.steps[0].attempts, 3, "MAX_ATTEMPTS defaults to 3");
    assert_eq!(failing.received().len(), 3);
    assert_eq!(master.queue("evaluate").await["dead_lettered"], 1);

    failing.kill();
    let _good = TestWorker::start(
        "good",
        &["evaluate"],
        4,
        Behavior::Succeed {
            delay: Duration::ZERO,
        },
        &settings,
        &master.url,
    )
    .await;
    let r = master
        .post("/dispatch", OPERATOR)
        .json(&json!({"capability": "evaluate"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["redriven"], json!([id]));
    let view = master.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:?}");

    // A single task redrive of a task that is not failed is a conflict.
    let r = master
        .post("/dispatch", OPERATOR)
        .json(&json!({"task_id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    master.stop().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_first_task() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let body = json!({"steps": ["plan"], "input": 1, "idempotency_key": "k-1"});
    let first = master
        .post("/task", ALICE)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let again = master
        .post("/task", ALICE)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(
        again.json::<Value>().await.unwrap()["task_id"],
        first["task_id"]
    );
    let header = master
        .post("/task", ALICE)
        .header("Idempotency-Key", "k-1")
        .json(&json!({"steps": ["plan"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(header.status(), 200);
    assert_eq!(
        header.json::<Value>().await.unwrap()["task_id"],
        first["task_id"]
    );
    let bob = master.post("/task", BOB).json(&body).send().await.unwrap();
    assert_eq!(bob.status(), 202, "another client's key space");
    let clash = master
        .post("/task", ALICE)
        .header("Idempotency-Key", "k-2")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(clash.status(), 422);
    master.stop().await;
}

#[tokio::test]
async fn cancel_stops_a_task() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let hanging =
        TestWorker::start("h", &["plan"], 4, Behavior::Hang, &settings, &master.url).await;
    let id = master.submit(json!({"steps": ["plan", "finalize"]})).await;
    testkit::eventually(Duration::from_secs(5), || async {
        (!hanging.received().is_empty()).then_some(())
    })
    .await
    .unwrap();
    let r = master
        .http
        .delete(format!("{}/task/{id}", master.url))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "not bob's task");
    let r = master
        .http
        .delete(format!("{}/task/{id}", master.url))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let view: Value = r.json().await.unwrap();
    assert_eq!(view["status"], "cancelled");
    let r = master
        .get(&format!("/result/{id}"), ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "cancelled");
    let r = master
        .http
        .delete(format!("{}/task/{id}", master.url))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let step = hanging.received()[0].clone();
    let late = json!({"task_id": id, "step": 0, "attempt": step.attempt, "worker_id": "h",
        "status": "succeeded", "output": 1});
    let r = master
        .post("/result", WORKER_TOKEN)
        .json(&late)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "discarded");
    master.stop().await;
}

#[tokio::test]
async fn two_masters_never_dispatch_an_attempt_twice() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let a = TestMaster::start(test_config(&settings)).await;
    let b = TestMaster::start(test_config(&settings)).await;
    let mut workers = Vec::new();
    for i in 0..4 {
        // Half the workers report to each master, as behind a load balancer.
        let url = if i % 2 == 0 { &a.url } else { &b.url };
        workers.push(
            TestWorker::start(
                &format!("w{i}"),
                &["plan"],
                16,
                Behavior::Succeed {
                    delay: Duration::ZERO,
                },
                &settings,
                url,
            )
            .await,
        );
    }
    let total = 2000;
    let mut ids = Vec::with_capacity(total);
    let mut submits = futures::stream::iter(0..total)
        .map(|i| {
            let m = if i % 2 == 0 { &a } else { &b };
            m.submit(json!({"steps": ["plan"], "input": i}))
        })
        .buffer_unordered(32);
    while let Some(id) = futures::StreamExt::next(&mut submits).await {
        ids.push(id);
    }
    drop(submits);
    for id in &ids {
        let v = a.wait(id, Duration::from_secs(60)).await;
        assert_eq!(v.status, TaskStatus::Succeeded);
    }
    let received: Vec<_> = workers.iter().flat_map(|w| w.received()).collect();
    assert_eq!(duplicates(&received), 0, "an attempt was dispatched twice");
    let distinct: std::collections::HashSet<_> =
        received.iter().map(|s| s.task_id.clone()).collect();
    assert_eq!(distinct.len(), total);
    a.stop().await;
    b.stop().await;
}

use futures::StreamExt;

#[tokio::test]
async fn long_poll_answers_when_the_task_finishes_with_the_stored_result() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let _slow = TestWorker::start(
        "slow",
        &["plan"],
        4,
        Behavior::Succeed {
            delay: Duration::from_millis(300),
        },
        &settings,
        &master.url,
    )
    .await;
    let _failing = TestWorker::start(
        "bad",
        &["evaluate"],
        4,
        Behavior::Fail { retryable: false },
        &settings,
        &master.url,
    )
    .await;
    for (steps, status) in [
        (json!(["plan"]), "succeeded"),
        (json!(["evaluate"]), "failed"),
    ] {
        let id = master
            .submit(json!({"steps": steps, "input": {"n": 1}}))
            .await;
        let started = std::time::Instant::now();
        let r = master
            .get(&format!("/result/{id}?wait=10"), ALICE)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "answered when the task finished, not at the deadline"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let polled: Value = r.json().await.unwrap();
        assert_eq!(polled["status"], status);
        // What the long poll said is what the store holds.
        let stored: Value = master
            .get(&format!("/result/{id}"), ALICE)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(polled, stored);
    }
    master.stop().await;
}

#[tokio::test]
async fn callback_url_receives_the_final_view() {
    use std::sync::{Arc, Mutex};
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(v);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let redis = RedisServer::start();
    let settings = redis.settings();
    // The hook listens on loopback, which callbacks may reach only when allowed.
    let master = TestMaster::start(master::Config {
        callback_secret: common::config::Secret::new("hook-secret"),
        callback_allow_private: true,
        callback_poll_ms: 20,
        ..test_config(&settings)
    })
    .await;
    let _w = TestWorker::start(
        "w",
        &["plan"],
        4,
        Behavior::Succeed {
            delay: Duration::ZERO,
        },
        &settings,
        &master.url,
    )
    .await;
    let with_hook = master
        .submit(json!({"steps": ["plan"], "input": 7, "callback_url": hook}))
        .await;
    let without = master.submit(json!({"steps": ["plan"], "input": 8})).await;
    master.wait(&without, Duration::from_secs(10)).await;
    let view = master.wait(&with_hook, Duration::from_secs(10)).await;
    let called = testkit::eventually(Duration::from_secs(5), || async {
        let v = got.lock().unwrap().clone();
        (!v.is_empty()).then_some(v)
    })
    .await
    .expect("the callback was called");
    assert_eq!(
        called.len(),
        1,
        "only the task with a callback_url calls back"
    );
    assert_eq!(called[0]["task_id"], json!(with_hook));
    assert_eq!(called[0]["status"], "succeeded");
    assert_eq!(
        called[0]["result"],
        serde_json::to_value(&view.result).unwrap()
    );
    master.stop().await;
}

//! Regression tests of faults found by attacking Ensemble on purpose: a poison task that
//! stalled a capability, a long poll that leaked another client's result, reports from a
//! worker without the lease, repeated reports, numeric extremes, unbounded nesting.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::wire::{StepStatus, TaskStatus};
use serde_json::{Value, json};
use testkit::{DoneEvents, RedisServer};

use crate::helpers::*;

fn nested(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!([v]);
    }
    v
}

#[tokio::test]
async fn a_poison_task_at_top_priority_does_not_stall_other_clients_and_is_dead_lettered() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let _worker = TestWorker::start(
        "picky",
        &["plan"],
        4,
        Behavior::RefusePoison {
            delay: Duration::from_millis(5),
        },
        &settings,
        &master.url,
    )
    .await;
    let poison = master
        .submit(json!({"steps": ["plan"], "priority": 100, "input": {"poison": true}}))
        .await;
    let started = Instant::now();
    let mut others = Vec::new();
    for i in 0..20 {
        let r = master
            .post("/task", BOB)
            .json(&json!({"steps": ["plan"], "input": {"i": i}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        others.push(
            r.json::<Value>().await.unwrap()["task_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    for id in &others {
        loop {
            let r = master
                .get(&format!("/result/{id}?wait=2"), BOB)
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                assert_eq!(r.json::<Value>().await.unwrap()["status"], "succeeded");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "bob's tasks are stalled behind the poison task"
            );
        }
    }
    // Well under the 10 s a refused worker used to be shunned for.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bob's 20 one-step tasks took {:?}",
        started.elapsed()
    );
    let view = master.wait(&poison, Duration::from_secs(10)).await;
    assert_eq!(view.status, TaskStatus::Failed);
    assert_eq!(view.steps[0].attempts, 3, "every refusal spent an attempt");
    let error = view.error.expect("an error");
    assert_eq!(error.kind.as_deref(), Some("dispatch_refused"));
    assert!(
        error.message.contains("400"),
        "the error names the worker's answer: {}",
        error.message
    );
    assert_eq!(master.queue("plan").await["dead_lettered"], 1);
    master.stop().await;
}

#[tokio::test]
async fn nesting_and_the_size_of_a_step_are_bounded() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let mut config = test_config(&settings);
    config.work_body_limit_bytes = 4096;
    let master = TestMaster::start(config).await;
    let _worker = TestWorker::start(
        "w",
        &["plan"],
        4,
        Behavior::Succeed {
            delay: Duration::from_millis(1),
        },
        &settings,
        &master.url,
    )
    .await;
    // The documented limit is accepted; one level more is refused, naming the field.
    let ok = master
        .post("/task", ALICE)
        .json(&json!({"steps": ["plan"], "input": nested(common::wire::MAX_JSON_DEPTH)}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 202);
    let r = master
        .post("/task", ALICE)
        .json(&json!({"steps": ["plan"], "input": nested(common::wire::MAX_JSON_DEPTH + 1)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`input`") && message.contains("64"),
        "{message}"
    );
    // A worker's output that deep would become the next step's input: refused as well.
    let r = master
        .post("/result", WORKER_TOKEN)
        .json(
            &json!({"task_id": "0190a0a0-0000-7000-8000-000000000000", "step": 0,
            "attempt": 1, "worker_id": "w", "status": "succeeded",
            "output": nested(common::wire::MAX_JSON_DEPTH + 1)}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    // A step whose request would pass WORK_BODY_LIMIT_BYTES fails at once, not in a loop.
    let big = master
        .submit(json!({"steps": ["plan"], "input": {"text": "x".repeat(5000)}}))
        .await;
    let view = master.wait(&big, Duration::from_secs(5)).await;
    assert_eq!(view.status, TaskStatus::Failed);
    let error = view.error.unwrap();
    assert_eq!(error.kind.as_deref(), Some("step_too_large"));
    assert!(
        error.message.contains("WORK_BODY_LIMIT_BYTES"),
        "{}",
        error.message
    );
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_clients_long_polls_never_get_the_result() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = Arc::new(TestMaster::start(test_config(&settings)).await);
    let _worker = TestWorker::start(
        "slow",
        &["plan"],
        8,
        Behavior::Succeed {
            delay: Duration::from_millis(200),
        },
        &settings,
        &master.url,
    )
    .await;
    // The long-poll waiter is shared per task id and holds the result this replica
    // recorded while anyone waits on it. Around each finish, alice's pollers hold it while
    // bob's pollers hammer the same id: bob must get 404 every time, never alice's result.
    let leaked = Arc::new(AtomicUsize::new(0));
    let polls = Arc::new(AtomicUsize::new(0));
    for round in 0..6 {
        let id = master
            .submit(json!({"steps": ["plan"], "input": {"secret": round}}))
            .await;
        let until = Instant::now() + Duration::from_millis(600);
        let mut pollers = Vec::new();
        for i in 0..40 {
            let (master, id) = (master.clone(), id.clone());
            let (leaked, polls) = (leaked.clone(), polls.clone());
            // Four of alice's pollers for every six of bob's.
            let key = if i % 10 < 4 { ALICE } else { BOB };
            pollers.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let r = master
                        .get(&format!("/result/{id}?wait=1"), key)
                        .send()
                        .await
                        .unwrap();
                    if key == BOB {
                        polls.fetch_add(1, Ordering::Relaxed);
                        if r.status() != 404 {
                            leaked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for p in pollers {
            p.await.unwrap();
        }
        assert_eq!(master.view(&id).await.status, TaskStatus::Succeeded);
    }
    assert!(polls.load(Ordering::Relaxed) > 500, "bob's pollers ran");
    assert_eq!(
        leaked.load(Ordering::Relaxed),
        0,
        "bob got something other than 404 for alice's task"
    );
}

#[tokio::test]
async fn only_the_worker_holding_the_lease_completes_a_step_and_a_repeat_is_recorded() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let holder = TestWorker::start(
        "holder",
        &["plan"],
        4,
        Behavior::Hang,
        &settings,
        &master.url,
    )
    .await;
    let id = master.submit(json!({"steps": ["plan"]})).await;
    let step = loop {
        if let Some(s) = holder.received().first().cloned() {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let report = |worker: &str, output: Value| {
        json!({"task_id": id, "step": 0, "attempt": step.attempt, "worker_id": worker,
            "status": "succeeded", "output": output})
    };
    let send = |body: Value| {
        let request = master.post("/result", WORKER_TOKEN).json(&body);
        async move {
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["status"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    // Any holder of the worker token used to be able to complete any current attempt.
    assert_eq!(send(report("intruder", json!("forged"))).await, "discarded");
    let view = master.view(&id).await;
    assert_eq!(view.steps[0].status, StepStatus::Dispatched);
    let done = DoneEvents::subscribe(&redis.url(), &settings.key_prefix).await;
    assert_eq!(send(report("holder", json!("real"))).await, "recorded");
    // The worker did not get the answer and sends the same report again: still recorded,
    // and nothing happens twice.
    assert_eq!(send(report("holder", json!("real"))).await, "recorded");
    let view = master.view(&id).await;
    assert_eq!(view.status, TaskStatus::Succeeded);
    assert_eq!(view.result, Some(json!("real")));
    // The store announces a finished task in the script that finishes it: once, not once
    // per report. (A metric would not do: it is shared by every test in this binary.)
    testkit::eventually(Duration::from_secs(5), || async {
        (done.count(&id) > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(done.count(&id), 1, "the task finished once");
    master.stop().await;
}

#[tokio::test]
async fn an_operator_can_cancel_any_task_and_clients_only_their_own() {
    let redis = RedisServer::start();
    let master = TestMaster::start(test_config(&redis.settings())).await;
    let id = master.submit(json!({"steps": ["plan"]})).await;
    let delete = |key: &'static str| {
        master
            .http
            .delete(format!("{}/task/{id}", master.url))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(delete(BOB).await.unwrap().status(), 404, "not bob's task");
    let r = delete(OPERATOR).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "cancelled");
    assert_eq!(
        delete(ALICE).await.unwrap().status(),
        409,
        "already cancelled"
    );
    master.stop().await;
}

#[tokio::test]
async fn credentials_are_checked_before_the_body_is_read() {
    let redis = RedisServer::start();
    let master = TestMaster::start(test_config(&redis.settings())).await;
    for path in ["/task", "/result", "/dispatch"] {
        let r = master
            .http
            .post(format!("{}{path}", master.url))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            401,
            "{path}: a stranger learns nothing about the body"
        );
    }
    // A client key on the worker and operator routes: refused before the body as well.
    let r = master
        .post("/result", ALICE)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = master
        .post("/dispatch", ALICE)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    master.stop().await;
}

#[tokio::test]
async fn a_malformed_worker_record_is_shown_to_operators_and_gets_no_work() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let pool = common::redis::RedisPool::new(&settings).unwrap();
    let key = common::registry::keys::worker(pool.prefix(), "w-bad");
    // max_concurrency as a float: a typical slip of a worker written in another language.
    let record = json!({"id": "w-bad", "url": "http://127.0.0.1:9", "capabilities": ["plan"],
        "max_concurrency": 2.5, "version": "x", "started_at_ms": 1});
    let mut conn = pool.get().await.unwrap();
    redis::pipe()
        .cmd("SET")
        .arg(&key)
        .arg(record.to_string())
        .cmd("ZADD")
        .arg(common::registry::keys::workers(pool.prefix()))
        .arg(common::wire::now_ms() + 60_000)
        .arg("w-bad")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let id = master.submit(json!({"steps": ["plan"]})).await;
    let workers: Value = master
        .get("/workers", OPERATOR)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bad = &workers["malformed"][0];
    assert_eq!(bad["id"], "w-bad", "{workers}");
    assert_eq!(bad["key"], key);
    assert!(
        bad["reason"].as_str().unwrap().contains("2.5"),
        "the reason says what is wrong: {bad}"
    );
    assert!(workers["workers"].as_array().unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        master.view(&id).await.status,
        TaskStatus::Queued,
        "no work for it"
    );
    master.stop().await;
}

#[test]
fn a_lease_shorter_than_two_heartbeats_is_refused_at_start_naming_both() {
    use common::config::Settings;
    let config = master::Config {
        lease_ms: 3_000,
        worker_heartbeat_ms: 2_000,
        ..test_config(&common::redis::RedisSettings::default())
    };
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("LEASE_MS") && error.contains("WORKER_HEARTBEAT_MS"),
        "{error}"
    );
    // Numeric extremes: refused with the same error, not an overflow.
    let config = master::Config {
        lease_ms: 10_000,
        worker_heartbeat_ms: u64::MAX,
        ..test_config(&common::redis::RedisSettings::default())
    };
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("WORKER_HEARTBEAT_MS"), "{error}");
    let config = master::Config {
        lease_ms: 4_000,
        worker_heartbeat_ms: 2_000,
        ..test_config(&common::redis::RedisSettings::default())
    };
    config.validate().unwrap();
}

#[tokio::test]
async fn a_registry_key_of_the_wrong_type_is_a_500_not_an_outage() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let pool = common::redis::RedisPool::new(&settings).unwrap();
    let mut conn = pool.get().await.unwrap();
    redis::cmd("SET")
        .arg(common::registry::keys::workers(pool.prefix()))
        .arg("not a sorted set")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let r = master.get("/workers", OPERATOR).send().await.unwrap();
    assert_eq!(
        r.status(),
        500,
        "WRONGTYPE is a bug or tampering, not `retry shortly`"
    );
    assert!(r.headers().get("retry-after").is_none());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "internal");
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("WRONGTYPE"),
        "internals stay in the log: {body}"
    );
    master.stop().await;
}

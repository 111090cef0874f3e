//! Batches between master and workers: steps claimed for a worker that takes batches go in
//! one `POST /work`, each settled as if sent alone; `POST /results` records several
//! reports with one store call, each answered as `POST /result` would have answered it.

use std::time::Duration;

use common::wire::{StepStatus, TaskStatus};
use serde_json::{Value, json};
use testkit::RedisServer;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn a_worker_that_takes_batches_gets_its_steps_together_and_each_is_settled_alone() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    // Queued before any worker is there, so the first claim finds them all.
    let mut good = Vec::new();
    let mut poison = Vec::new();
    for i in 0..8 {
        if i % 4 == 3 {
            poison.push(
                master
                    .submit(json!({"steps": [{"capability": "plan", "max_attempts": 2}], "input": {"poison": true, "i": i}}))
                    .await,
            );
        } else {
            good.push(
                master
                    .submit(json!({"steps": ["plan"], "input": {"i": i}}))
                    .await,
            );
        }
    }
    let worker = TestWorker::start_batching(
        "batcher",
        &["plan"],
        8,
        8,
        Behavior::RefusePoison {
            delay: Duration::from_millis(5),
        },
        &settings,
        &master.url,
    )
    .await;

    for id in &good {
        let view = master.wait(id, WAIT).await;
        assert_eq!(view.status, TaskStatus::Succeeded, "{view:?}");
        assert_eq!(view.steps[0].attempts, 1, "{view:?}");
        assert_eq!(view.result.as_ref().unwrap()["input"], view.input);
    }
    // A step the worker refused inside a batch spent its attempt, as a refusal of a single
    // request does; the steps beside it did not.
    for id in &poison {
        let view = master.wait(id, WAIT).await;
        assert_eq!(view.status, TaskStatus::Failed, "{view:?}");
        let error = view.steps[0].error.as_ref().unwrap();
        assert_eq!(error.kind.as_deref(), Some("dispatch_refused"), "{error:?}");
        assert_eq!(view.steps[0].attempts, 2);
    }
    let journal = worker.journal();
    assert!(
        journal.batches.iter().any(|&n| n > 1),
        "no request carried more than one step: {:?}",
        journal.batches
    );
    assert!(journal.batches.iter().all(|&n| n <= 8));
    // Every attempt came once: the batch's answers were read per step.
    assert_eq!(duplicates(&journal.received), 0, "{:?}", journal.received);
    assert_eq!(journal.received.len(), 6 + 2 * 2);
}

#[tokio::test]
async fn steps_a_full_worker_refuses_inside_a_batch_go_back_at_no_cost() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            master
                .submit(json!({"steps": [{"capability": "plan", "max_attempts": 1}], "input": {"i": i}}))
                .await,
        );
    }
    let full = TestWorker::start_batching(
        "full",
        &["plan"],
        8,
        8,
        Behavior::Busy,
        &settings,
        &master.url,
    )
    .await;
    // Until the full worker answered a batch with 429s, the steps have nowhere else to go.
    testkit::eventually(WAIT, || async {
        full.journal().batches.iter().any(|&n| n > 1).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("no batch reached the full worker: {:?}", full.received()));
    let _free = TestWorker::start(
        "free",
        &["plan"],
        8,
        Behavior::Succeed {
            delay: Duration::ZERO,
        },
        &settings,
        &master.url,
    )
    .await;
    for id in &ids {
        // One attempt allowed: a 429 that spent it would have failed the task.
        let view = master.wait(id, WAIT).await;
        assert_eq!(view.status, TaskStatus::Succeeded, "{view:?}");
        assert_eq!(view.steps[0].attempts, 1);
        assert_eq!(view.steps[0].worker_id.as_ref().unwrap().as_str(), "free");
    }
}

/// A master, and a worker `holder` that takes `plan` steps and never reports.
async fn master_and_holder(redis: &RedisServer) -> (TestMaster, TestWorker) {
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let holder = TestWorker::start(
        "holder",
        &["plan"],
        8,
        Behavior::Hang,
        &settings,
        &master.url,
    )
    .await;
    (master, holder)
}

/// A task whose step the hanging worker `holder` holds: (task id, its report's fields).
async fn held_task(master: &TestMaster, holder: &TestWorker, i: u32) -> (String, Value) {
    let id = master
        .submit(json!({"steps": [{"capability": "plan", "max_attempts": 1}], "input": {"i": i}}))
        .await;
    testkit::eventually(WAIT, || async {
        holder
            .received()
            .iter()
            .any(|s| s.task_id.as_str() == id)
            .then_some(())
    })
    .await
    .expect("the step reached the worker");
    let report = json!({"task_id": id, "step": 0, "attempt": 1, "worker_id": "holder",
        "status": "succeeded", "output": {"answer": i}});
    (id, report)
}

async fn post_results(master: &TestMaster, token: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = master.http.post(format!("{}/results", master.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.json(body).send().await.unwrap()
}

#[tokio::test]
async fn each_report_of_a_batch_is_answered_as_if_it_came_alone() {
    let redis = RedisServer::start();
    let (master, holder) = master_and_holder(&redis).await;
    let (a, report_a) = held_task(&master, &holder, 1).await;
    let (b, report_b) = held_task(&master, &holder, 2).await;
    let (c, report_c) = held_task(&master, &holder, 3).await;
    let (d, _) = held_task(&master, &holder, 4).await;

    let mut stale = report_b.clone();
    stale["attempt"] = json!(7);
    let mut forged = report_c.clone();
    forged["worker_id"] = json!("intruder");
    let failed = json!({"task_id": d, "step": 0, "attempt": 1, "worker_id": "holder",
        "status": "failed", "error": {"message": "no", "retryable": false}});
    // Deeper than a task input may be, within what JSON parsing allows.
    let mut deep = json!(1);
    for _ in 0..100 {
        deep = json!([deep]);
    }
    let mut too_deep = report_b.clone();
    too_deep["output"] = deep;
    // Numeric extremes: a step and attempt no task has are discarded; past u32 they are
    // not numbers a report may carry.
    let mut far = report_c.clone();
    far["step"] = json!(u32::MAX);
    far["attempt"] = json!(u32::MAX);
    let mut beyond = report_c.clone();
    beyond["attempt"] = json!(u64::MAX);
    let body = json!([
        report_a,
        report_a,
        stale,
        forged,
        {"task_id": "x"},
        too_deep,
        failed,
        report_b,
        42,
        far,
        beyond,
    ]);
    let r = post_results(&master, Some(WORKER_TOKEN), &body).await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    let results = answer["results"].as_array().unwrap();
    let statuses: Vec<(u64, Value)> = results
        .iter()
        .map(|r| (r["status"].as_u64().unwrap(), r["ack"].clone()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (200, json!("recorded")),
            // A repeat of a recorded report: answered as recorded again, recorded once.
            (200, json!("recorded")),
            (200, json!("discarded")),
            (200, json!("discarded")),
            (422, Value::Null),
            (422, Value::Null),
            (200, json!("recorded")),
            (200, json!("recorded")),
            (422, Value::Null),
            (200, json!("discarded")),
            (422, Value::Null),
        ],
        "{answer}"
    );
    assert_eq!(results[4]["error"]["code"], "invalid");
    assert!(
        results[4]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("report 4 of the batch"),
        "{answer}"
    );
    assert!(
        results[5]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("levels deep"),
        "{answer}"
    );

    let view = master.wait(&a, WAIT).await;
    assert_eq!(view.status, TaskStatus::Succeeded);
    assert_eq!(view.result, Some(json!({"answer": 1})));
    let view = master.wait(&b, WAIT).await;
    assert_eq!(view.result, Some(json!({"answer": 2})));
    let view = master.wait(&d, WAIT).await;
    assert_eq!(view.status, TaskStatus::Failed);
    assert_eq!(view.error.unwrap().message, "no");
    // The forged report changed nothing: the step is still the holder's.
    let view = master.view(&c).await;
    assert_eq!(view.steps[0].status, StepStatus::Dispatched, "{view:?}");
    assert_eq!(view.steps[0].worker_id.as_ref().unwrap().as_str(), "holder");
}

#[tokio::test]
async fn a_batch_of_reports_that_is_not_one_is_refused_whole_and_settles_nothing() {
    let redis = RedisServer::start();
    let (master, holder) = master_and_holder(&redis).await;
    let (id, report) = held_task(&master, &holder, 1).await;

    for token in [None, Some("wrong"), Some(ALICE), Some(OPERATOR)] {
        let r = post_results(&master, token, &json!([report])).await;
        assert_eq!(r.status(), 401, "token {token:?}");
    }
    let too_many: Vec<Value> = (0..65).map(|_| report.clone()).collect();
    for (body, status, says) in [
        (json!([]), 422, "no report"),
        (json!(too_many), 422, "at most 64"),
        (report.clone(), 422, "an array"),
        (json!("text"), 422, "an array"),
    ] {
        let r = post_results(&master, Some(WORKER_TOKEN), &body).await;
        assert_eq!(r.status(), status, "{body}");
        let error: Value = r.json().await.unwrap();
        assert!(
            error["error"]["message"].as_str().unwrap().contains(says),
            "{error}"
        );
    }
    let r = master
        .http
        .post(format!("{}/results", master.url))
        .bearer_auth(WORKER_TOKEN)
        .header("content-type", "application/json")
        .body("[{\"task_id\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = master
        .http
        .post(format!("{}/results", master.url))
        .bearer_auth(WORKER_TOKEN)
        .header("content-type", "application/json")
        .body(format!("[{}]", " ".repeat(3 * 1024 * 1024)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // None of it settled the step: it is still running, and its report is still taken.
    let view = master.view(&id).await;
    assert_eq!(view.steps[0].status, StepStatus::Dispatched, "{view:?}");
    let r = post_results(&master, Some(WORKER_TOKEN), &json!([report])).await;
    assert_eq!(r.status(), 200);
    assert_eq!(master.wait(&id, WAIT).await.status, TaskStatus::Succeeded);
}

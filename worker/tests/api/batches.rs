//! Batches: `POST /work` with an array of steps, each answered as if it came alone; and
//! reports that finish close together delivered in one `POST /results`, with a fallback to
//! one report per request for a master that has no `/results`.

use std::collections::HashSet;
use std::time::Duration;

use common::wire::{ReportStatus, ResultReport, WorkRequest, WorkerId};
use reqwest::StatusCode;
use serde_json::{Value, json};
use worker::Agents;

use crate::helpers::*;

async fn post_batch(worker: &TestWorker, token: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = worker.client.post(format!("{}/work", worker.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.json(body).send().await.unwrap()
}

/// An echo worker with `slots` slots, reporting to `master`, that was sent as many echo
/// steps in one batch and took them all; the steps.
async fn echo_batch(
    redis: &TestRedis,
    master: &FakeMaster,
    slots: u32,
) -> (TestWorker, Vec<WorkRequest>) {
    let mut config = test_config(redis, master);
    config.max_concurrency = slots;
    let worker = spawn_worker(redis, config, Agents::new()).await;
    let steps: Vec<_> = (0..slots)
        .map(|i| work_request("echo", json!({"i": i})))
        .collect();
    let r = post_batch(&worker, Some(TOKEN), &json!(steps)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await.unwrap();
    assert!(
        answer["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == 202),
        "{answer}"
    );
    (worker, steps)
}

/// The distinct tasks the reports are about.
fn tasks_of(reports: &[testkit::fakes::Received<ResultReport>]) -> HashSet<String> {
    reports.iter().map(|r| r.body.task_id.to_string()).collect()
}

#[tokio::test]
async fn the_record_offers_batches_as_large_as_the_slots() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let mut config = test_config(&redis, &master);
    config.max_concurrency = 5;
    let worker = spawn_worker(&redis, config, Agents::new()).await;
    let record = redis.record(&worker.id).await.unwrap();
    assert_eq!(record.max_batch, 5);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn each_step_of_a_batch_is_answered_as_if_it_came_alone() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    // Results wait at the master, so the slots stay taken while the batch is answered.
    master.answer_after(Duration::from_millis(800));
    let mut config = test_config(&redis, &master);
    config.max_concurrency = 3;
    let worker = spawn_worker(&redis, config, Agents::new()).await;

    let a = work_request("echo", json!({"a": 1}));
    let mut elsewhere = work_request("echo", json!({"b": 1}));
    elsewhere.worker_id = Some(WorkerId::new("someone-else").unwrap());
    let c = work_request("echo", json!({"c": 1}));
    let mut d = work_request("echo", json!({"d": 1}));
    d.request_id = Some("req-d".into());
    let e = work_request("echo", json!({"e": 1}));
    let body = json!([
        a,
        a,
        work_request("nope", json!(1)),
        {"task_id": "t"},
        elsewhere,
        c,
        d,
        e,
        "text",
    ]);
    let r = post_batch(&worker, Some(TOKEN), &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await.unwrap();
    let steps = answer["steps"].as_array().unwrap();
    let got: Vec<(u64, Value, Value)> = steps
        .iter()
        .map(|s| {
            (
                s["status"].as_u64().unwrap(),
                s["duplicate"].clone(),
                s["error"]["code"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (202, Value::Null, Value::Null),
            (202, json!(true), Value::Null),
            (422, Value::Null, json!("capability_not_served")),
            (422, Value::Null, json!("invalid")),
            (421, Value::Null, json!("misdirected")),
            (202, Value::Null, Value::Null),
            (202, Value::Null, Value::Null),
            // Three slots, three steps taken: the fourth finds the worker full.
            (429, Value::Null, json!("at_capacity")),
            (422, Value::Null, json!("invalid")),
        ],
        "{answer}"
    );
    assert!(
        steps[3]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("step 3 of the batch"),
        "{answer}"
    );

    // The three taken steps report once each, with their own request ids.
    let reports = master.wait_for_reports(3).await;
    let tasks = tasks_of(&reports);
    let expected: HashSet<String> = [&a, &c, &d].iter().map(|s| s.task_id.to_string()).collect();
    assert_eq!(tasks, expected);
    let of_d = reports
        .iter()
        .find(|r| r.body.task_id == d.task_id)
        .unwrap();
    assert_eq!(of_d.request_id.as_deref(), Some("req-d"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(master.reports().len(), 3);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_batch_that_is_not_one_is_refused_whole_and_takes_nothing() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let worker = spawn_worker(&redis, test_config(&redis, &master), Agents::new()).await;
    let step = work_request("echo", json!(1));

    for token in [None, Some("wrong-token")] {
        let r = post_batch(&worker, token, &json!([step])).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let too_many: Vec<Value> = (0..65)
        .map(|i| json!(work_request("echo", json!(i))))
        .collect();
    for (body, says) in [
        (json!([]), "no step"),
        (json!(too_many), "at most 64"),
        (json!(7), "a step (an object) or a batch"),
    ] {
        let r = post_batch(&worker, Some(TOKEN), &body).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let error: Value = r.json().await.unwrap();
        assert!(
            error["error"]["message"].as_str().unwrap().contains(says),
            "{error}"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(master.attempts(), 0, "a refused batch ran a step");
    // And the worker still takes work.
    let r = post_batch(&worker, Some(TOKEN), &json!([step])).await;
    assert_eq!(r.status(), StatusCode::OK);
    master.wait_for_reports(1).await;
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn reports_that_finish_together_share_a_request_and_each_is_settled_once() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    master.take_batches();
    // A slow master: while the first reports are in flight, the others finish and wait.
    master.answer_after(Duration::from_millis(300));
    let (worker, steps) = echo_batch(&redis, &master, 16).await;

    let reports = master.wait_for_reports(16).await;
    let tasks = tasks_of(&reports);
    assert_eq!(tasks.len(), 16, "a step reported twice or not at all");
    for report in &reports {
        assert_eq!(report.body.status, ReportStatus::Succeeded);
        let step = steps
            .iter()
            .find(|s| s.task_id == report.body.task_id)
            .unwrap();
        assert_eq!(report.body.output.as_ref(), Some(&step.input));
    }
    let batches = master.batches();
    assert!(
        batches.iter().any(|&n| n > 1),
        "no request carried more than one report: {batches:?}"
    );
    // At most two requests in flight: the first two reports went alone, at once.
    assert!(
        batches.len() + (16 - batches.iter().sum::<usize>()) <= 6,
        "{batches:?}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(master.attempts(), 16);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_master_without_batches_gets_every_report_alone() {
    let redis = TestRedis::start();
    // Like an older master: `POST /results` is 404.
    let master = FakeMaster::start().await;
    master.answer_after(Duration::from_millis(100));
    let (worker, _) = echo_batch(&redis, &master, 8).await;
    let reports = master.wait_for_reports(8).await;
    let tasks = tasks_of(&reports);
    assert_eq!(tasks.len(), 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(master.attempts(), 8, "a report was delivered twice");
    assert!(master.batches().is_empty());
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_report_the_batch_did_not_settle_is_delivered_alone_until_it_is() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    master.take_batches();
    master.answer_after(Duration::from_millis(200));
    // The first six reports the master sees are answered 503 (Redis down).
    master.script((0..6).map(|_| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": {"code": "unavailable", "message": "storage is unavailable"}}),
        )
    }));
    let (worker, _) = echo_batch(&redis, &master, 8).await;
    let reports = master.wait_for_reports(8).await;
    let tasks = tasks_of(&reports);
    assert_eq!(tasks.len(), 8, "each report recorded once");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(master.reports().len(), 8);
    assert_eq!(master.attempts(), 8 + 6);
    worker.stop().await.unwrap();
}

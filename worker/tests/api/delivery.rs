//! Result delivery: retried through a master outage and retryable answers, ended by any
//! `2xx` or a permanent refusal, given up after `RESULT_DELIVERY_TIMEOUT_MS`.

use std::time::Duration;

use common::wire::ReportStatus;
use reqwest::StatusCode;
use serde_json::json;
use worker::Agents;

use crate::helpers::*;

#[tokio::test]
async fn a_result_survives_the_master_being_down_for_a_few_seconds() {
    let redis = TestRedis::start();
    let mut master = FakeMaster::start().await;
    let worker = spawn_worker(&redis, test_config(&redis, &master), Agents::new()).await;

    master.stop().await;
    let step = work_request("echo", json!("kept"));
    assert_eq!(worker.post_work(&step).await.status(), StatusCode::ACCEPTED);
    // The master is down: the step stays held (and its lease extended) while delivery
    // retries.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let record = redis.record(&worker.id).await.unwrap();
    assert_eq!(
        record.in_flight.len(),
        1,
        "the step must stay held until delivered"
    );

    master.restart().await;
    let reports = master.wait_for_reports(1).await;
    assert_eq!(reports[0].body.task_id, step.task_id);
    assert_eq!(reports[0].body.output, Some(json!("kept")));
    redis
        .wait_for_record(&worker.id, |r| r.in_flight.is_empty())
        .await;
    worker.stop().await.unwrap();
    assert_eq!(master.reports().len(), 1);
}

#[tokio::test]
async fn retryable_answers_are_retried_until_acknowledged() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    master.script([
        (StatusCode::INTERNAL_SERVER_ERROR, json!({})),
        (StatusCode::TOO_MANY_REQUESTS, json!({})),
        (StatusCode::BAD_GATEWAY, json!({})),
    ]);
    let worker = spawn_worker(&redis, test_config(&redis, &master), Agents::new()).await;
    worker.post_work(&work_request("echo", json!(1))).await;
    master.wait_for_reports(1).await;
    assert_eq!(master.attempts(), 4);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_discarded_ack_or_a_permanent_refusal_ends_delivery_at_once() {
    for answer in [
        (StatusCode::OK, json!({"status": "discarded"})),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": {"code": "invalid", "message": "x"}}),
        ),
        (
            StatusCode::NOT_FOUND,
            json!({"error": {"code": "not_found", "message": "x"}}),
        ),
        (
            StatusCode::UNAUTHORIZED,
            json!({"error": {"code": "unauthorized", "message": "x"}}),
        ),
    ] {
        let redis = TestRedis::start();
        let master = FakeMaster::start().await;
        master.script([answer.clone()]);
        let worker = spawn_held(&redis, test_config(&redis, &master)).await;
        // Delivery is over once the step leaves the record.
        redis
            .wait_for_record(&worker.id, |r| r.in_flight.is_empty())
            .await;
        // A refused output (422) is followed by one failure report (see below).
        let expected = if answer.0 == StatusCode::UNPROCESSABLE_ENTITY {
            2
        } else {
            1
        };
        assert_eq!(
            master.attempts(),
            expected,
            "answer {answer:?} must not be retried"
        );
        worker.stop().await.unwrap();
    }
}

#[tokio::test]
async fn an_output_the_master_refuses_for_good_becomes_a_permanent_failure_of_the_step() {
    for refusal in [
        StatusCode::UNPROCESSABLE_ENTITY,
        StatusCode::PAYLOAD_TOO_LARGE,
    ] {
        let redis = TestRedis::start();
        let master = FakeMaster::start().await;
        master.script([(
            refusal,
            json!({"error": {"code": "invalid", "message": "output nests too deep"}}),
        )]);
        let worker = spawn_worker(&redis, test_config(&redis, &master), Agents::new()).await;
        worker
            .post_work(&work_request("echo", json!([[[1]]])))
            .await;
        // The fake master keeps what it accepted: the refused success is not among them.
        let reports = master.wait_for_reports(1).await;
        let second = &reports[0].body;
        assert_eq!(
            master.attempts(),
            2,
            "the refused success, then the failure"
        );
        assert_eq!(second.status, ReportStatus::Failed, "{refusal}");
        assert_eq!((second.step, second.attempt), (0, 1), "the same attempt");
        assert_eq!(second.output, None);
        let error = second.error.as_ref().unwrap();
        assert_eq!(error.kind.as_deref(), Some("output_refused"));
        assert!(!error.retryable);
        assert!(error.message.contains(refusal.as_str()), "{error:?}");
        redis
            .wait_for_record(&worker.id, |r| r.in_flight.is_empty())
            .await;
        assert_eq!(
            master.attempts(),
            2,
            "nothing more after the failure report"
        );
        worker.stop().await.unwrap();
    }
}

#[tokio::test]
async fn delivery_gives_up_after_the_delivery_timeout() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    master.script((0..1000).map(|_| (StatusCode::BAD_GATEWAY, json!({}))));
    let mut config = test_config(&redis, &master);
    config.result_delivery_timeout_ms = 800;
    let worker = spawn_held(&redis, config).await;
    redis
        .wait_for_record(&worker.id, |r| r.in_flight.is_empty())
        .await;
    let attempts = master.attempts();
    assert!(attempts >= 2, "retried only {attempts} times");
    assert!(master.reports().is_empty());
    worker.stop().await.unwrap();
}

/// Starts a worker, runs one step that is held until the record lists it (so a test can
/// then tell "delivery over" from "not started yet"), and releases it.
async fn spawn_held(redis: &TestRedis, config: worker::Config) -> TestWorker {
    let (worker, gate) = spawn_gated(redis, config).await;
    let response = worker.post_work(&work_request("slow", json!(1))).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    redis
        .wait_for_record(&worker.id, |r| r.in_flight.len() == 1)
        .await;
    gate.release(1);
    worker
}

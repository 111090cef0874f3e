//! A worker whose results cannot reach the master marks itself degraded: its record says
//! why (at once, not one heartbeat later), `/ready` and `/work` answer `503`, and it comes
//! back by itself once a delivery or a probe of `{MASTER_URL}/health` gets through.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use testkit::eventually;
use worker::Agents;

use crate::helpers::*;

/// Waits until the worker's record says it is degraded; returns the reason.
async fn wait_degraded(redis: &TestRedis, worker: &TestWorker) -> String {
    redis
        .wait_for_record(&worker.id, |r| r.degraded.is_some())
        .await
        .degraded
        .unwrap()
}

/// Waits until the worker is healthy again: record, `/ready` and `/work` all agree.
async fn wait_recovered(redis: &TestRedis, worker: &TestWorker) {
    redis
        .wait_for_record(&worker.id, |r| r.degraded.is_none())
        .await;
    assert_eq!(ready(worker).await.0, StatusCode::OK);
    let r = worker
        .post_work(&work_request("echo", json!("after")))
        .await;
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "a recovered worker takes work"
    );
}

#[tokio::test]
async fn an_unreachable_master_makes_the_worker_degraded_and_refuse_work() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let mut config = test_config(&redis, &master);
    // A closed loopback port: every delivery is refused.
    let master_url = format!("http://127.0.0.1:{}", testkit::free_port());
    config.master_url = master_url.clone();
    config.shutdown_grace_ms = 300;
    let worker = spawn_worker(&redis, config, Agents::new()).await;
    assert_eq!(ready(&worker).await.0, StatusCode::OK);

    let held = work_request("echo", json!("swallowed?"));
    assert_eq!(worker.post_work(&held).await.status(), StatusCode::ACCEPTED);
    let reason = wait_degraded(&redis, &worker).await;
    assert!(
        reason.starts_with(&format!("cannot deliver results to {master_url}/result: ")),
        "{reason}"
    );
    assert!(
        reason.to_lowercase().contains("connection refused"),
        "the reason names the cause: {reason}"
    );
    let record = redis.record(&worker.id).await.unwrap();
    assert_eq!(
        record.in_flight,
        vec![held.step_ref()],
        "still held, not lost"
    );

    assert_takes_no_new_work(&worker, "echo", "degraded", &reason).await;
    let duplicate = worker.post_work(&held).await;
    assert_eq!(
        duplicate.status(),
        StatusCode::ACCEPTED,
        "a step it already holds is still acknowledged"
    );

    let metrics = worker
        .client
        .get(format!("{}/metrics", worker.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ensemble_worker_degraded{") && l.contains(&worker.id)),
        "the degraded gauge is exported"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_delivery_that_gets_through_again_clears_degraded() {
    let redis = TestRedis::start();
    let mut master = FakeMaster::start().await;
    let worker = spawn_worker(&redis, test_config(&redis, &master), Agents::new()).await;
    master.stop().await;
    let step = work_request("echo", json!("late"));
    assert_eq!(worker.post_work(&step).await.status(), StatusCode::ACCEPTED);
    wait_degraded(&redis, &worker).await;
    assert_eq!(ready(&worker).await.0, StatusCode::SERVICE_UNAVAILABLE);

    master.restart().await;
    let reports = master.wait_for_reports(1).await;
    assert_eq!(reports[0].body.task_id, step.task_id);
    wait_recovered(&redis, &worker).await;
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_degraded_worker_with_nothing_to_deliver_recovers_by_probing_the_master() {
    let redis = TestRedis::start();
    let mut master = FakeMaster::start().await;
    let mut config = test_config(&redis, &master);
    config.result_delivery_timeout_ms = 300;
    let worker = spawn_worker(&redis, config, Agents::new()).await;
    master.stop().await;
    worker.post_work(&work_request("echo", json!(1))).await;
    wait_degraded(&redis, &worker).await;
    // Delivery gives up; the worker holds nothing, and stays degraded while the master is
    // still away.
    redis
        .wait_for_record(&worker.id, |r| r.in_flight.is_empty())
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        redis.record(&worker.id).await.unwrap().degraded.is_some(),
        "failed probes keep it degraded"
    );

    master.restart().await;
    wait_recovered(&redis, &worker).await;
    // The probe brought it back: no result was delivered before it recovered (the only
    // one since is the step `wait_recovered` sent).
    let reports = master.wait_for_reports(1).await;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].body.output, Some(json!("after")));
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_5xx_degrades_and_a_4xx_answer_does_not() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    // 503 (with Retry-After: 1) twice, then a permanent refusal.
    master.script([
        (StatusCode::SERVICE_UNAVAILABLE, json!({})),
        (StatusCode::SERVICE_UNAVAILABLE, json!({})),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": {"code": "invalid", "message": "x"}}),
        ),
    ]);
    let worker = spawn_worker(&redis, test_config(&redis, &master), Agents::new()).await;
    worker.post_work(&work_request("echo", json!(1))).await;
    let reason = wait_degraded(&redis, &worker).await;
    assert!(reason.ends_with("master answered 503"), "{reason}");
    // The 422 ends delivery, and an answer means the master is reachable.
    eventually(WAIT, || async { (master.attempts() >= 3).then_some(()) })
        .await
        .expect("the result was retried until the permanent refusal");
    wait_recovered(&redis, &worker).await;
    worker.stop().await.unwrap();
}

//! Graceful drain on SIGTERM: refuse new work, finish and deliver held steps, deregister,
//! exit 0; abandon what outlives the grace period.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use testkit::service::Exit;

use crate::helpers::*;

#[tokio::test]
async fn sigterm_during_a_slow_step_finishes_it_delivers_and_exits_zero() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let gateway = FakeGateway::start().await;
    gateway.set_delay(Duration::from_millis(1500));
    let id = unique_id("drain");
    let mut env = binary_env(&redis, &id, &master);
    env.push(("CAPABILITIES", "plan".into()));
    env.push(("LLM_GATEWAY_URL", gateway.url()));
    env.push(("SHUTDOWN_GRACE_MS", "10000".into()));
    let mut worker = BinaryWorker::spawn(&env);
    let record = eventually_record(&redis, &id, &worker).await;

    let client = reqwest::Client::new();
    let step = work_request("plan", json!("Plan a trip"));
    let response = client
        .post(format!("{}/work", record.url))
        .bearer_auth(TOKEN)
        .header("x-request-id", "req-drain")
        .json(&step)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    // The step is running once the gateway has the call.
    gateway.wait_for_calls(1).await;

    worker.signal("TERM");
    // Draining: the record says so (and still lists the step, keeping its lease), and new
    // work is refused.
    let draining = redis.wait_for_record(&id, |r| r.draining).await;
    assert_eq!(draining.in_flight.len(), 1);
    let refused = client
        .post(format!("{}/work", record.url))
        .bearer_auth(TOKEN)
        .json(&work_request("plan", json!("too late")))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        refused.json::<Value>().await.unwrap()["error"]["code"],
        "draining"
    );

    let status = worker.wait_exit().await;
    assert_eq!(status, Exit::Clean, "log:\n{}", worker.log());
    let reports = master.reports();
    assert_eq!(reports.len(), 1, "log:\n{}", worker.log());
    assert_eq!(reports[0].body.task_id, step.task_id);
    assert_eq!(
        reports[0].body.output.as_ref().unwrap()["text"],
        "mock answer"
    );
    assert_eq!(reports[0].request_id.as_deref(), Some("req-drain"));
    assert!(
        redis.record(&id).await.is_none(),
        "still registered after exit"
    );
    assert_eq!(gateway.calls().len(), 1);
}

async fn eventually_record(
    redis: &TestRedis,
    id: &str,
    worker: &BinaryWorker,
) -> common::wire::WorkerRecord {
    testkit::eventually(WAIT, || redis.record(id))
        .await
        .unwrap_or_else(|| panic!("never registered; log:\n{}", worker.log()))
}

#[tokio::test]
async fn an_idle_worker_deregisters_and_stops_at_once() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let id = unique_id("idle");
    let mut env = binary_env(&redis, &id, &master);
    env.push(("AGENT_KIND", "echo".into()));
    let mut worker = BinaryWorker::spawn(&env);
    eventually_record(&redis, &id, &worker).await;
    worker.signal("TERM");
    let status = worker.wait_exit().await;
    assert_eq!(status, Exit::Clean, "log:\n{}", worker.log());
    assert!(redis.record(&id).await.is_none());
}

#[tokio::test]
async fn steps_that_outlive_the_grace_are_left_to_lease_expiry() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let mut config = test_config(&redis, &master);
    config.shutdown_grace_ms = 300;
    let (worker, gate) = spawn_gated(&redis, config).await;

    worker.post_work(&work_request("slow", json!(1))).await;
    testkit::eventually(WAIT, || async { (gate.started() == 1).then_some(()) })
        .await
        .unwrap();
    let id = worker.id.clone();
    worker.stop().await.unwrap();
    assert!(redis.record(&id).await.is_none(), "still registered");
    assert_eq!(master.attempts(), 0, "an abandoned step must not report");
}

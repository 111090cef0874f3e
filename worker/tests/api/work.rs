//! `POST /work`: auth, validation, capacity, duplicates, deadlines and agent errors.

use common::wire::{ReportStatus, StepError, StepRef, WorkerId, now_ms};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use worker::Agents;

use crate::helpers::*;

#[tokio::test]
async fn an_echo_step_runs_and_its_result_reaches_the_master() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let worker = spawn_worker(&redis, test_config(&redis, &master), Agents::new()).await;

    let step = work_request("echo", json!({"question": "why?"}));
    let response = worker.post_work_as(Some(TOKEN), &step, "req-echo-1").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"accepted": true})
    );

    let received = master.wait_for_reports(1).await;
    let got = &received[0];
    assert_eq!(got.body.task_id, step.task_id);
    assert_eq!(got.body.step, 0);
    assert_eq!(got.body.attempt, 1);
    assert_eq!(got.body.worker_id.as_str(), worker.id);
    assert_eq!(got.body.status, ReportStatus::Succeeded);
    assert_eq!(got.body.output, Some(json!({"question": "why?"})));
    assert!(got.body.error.is_none());
    assert!(got.body.duration_ms.is_some());
    assert_eq!(
        got.authorization.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(got.request_id.as_deref(), Some("req-echo-1"));
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_401_before_the_body_is_read() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let worker = spawn_worker(&redis, test_config(&redis, &master), Agents::new()).await;
    let step = work_request("echo", json!(1));

    for token in [None, Some("wrong-token"), Some("")] {
        let response = worker.post_work_as(token, &step, "r").await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "token {token:?}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let response = worker
        .client
        .post(format!("{}/work", worker.url))
        .bearer_auth("wrong-token")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(master.attempts(), 0);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn auth_disabled_accepts_any_caller() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let mut config = test_config(&redis, &master);
    config.worker_token = common::config::Secret::default();
    config.auth_disabled = true;
    let worker = spawn_worker(&redis, config, Agents::new()).await;
    let response = worker
        .post_work_as(None, &work_request("echo", json!(1)), "r")
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let received = master.wait_for_reports(1).await;
    assert_eq!(received[0].authorization, None);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_steps_and_unserved_capabilities_are_refused() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let worker = spawn_worker(&redis, test_config(&redis, &master), Agents::new()).await;
    let post_raw = |body: String| {
        worker
            .client
            .post(format!("{}/work", worker.url))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let response = post_raw("{not json".into()).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let response = post_raw(json!({"task_id": "t1"}).to_string())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let mut bad = serde_json::to_value(work_request("echo", json!(1))).unwrap();
    bad["capability"] = json!("Not Valid");
    let response = post_raw(bad.to_string()).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("capability"),
        "{body}"
    );

    let mut step = work_request("echo", json!(1));
    step.attempt = 0;
    let response = worker.post_work(&step).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("attempt"),
        "{body}"
    );

    let response = worker.post_work(&work_request("summarize", json!(1))).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "capability_not_served");

    assert_eq!(master.attempts(), 0);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn the_concurrency_limit_answers_429_until_a_slot_frees() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let mut config = test_config(&redis, &master);
    config.max_concurrency = 2;
    let (worker, gate) = spawn_gated(&redis, config).await;

    for _ in 0..2 {
        let response = worker.post_work(&work_request("slow", json!(1))).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let response = worker.post_work(&work_request("slow", json!(1))).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "at_capacity");

    // The record advertises the two held steps, so the master sees no free slot either.
    let record = redis
        .wait_for_record(&worker.id, |r| r.in_flight.len() == 2)
        .await;
    assert_eq!(record.free_slots(), 0);

    gate.release(1);
    master.wait_for_reports(1).await;
    let free = testkit::eventually(WAIT, || async {
        let response = worker.post_work(&work_request("slow", json!(2))).await;
        (response.status() == StatusCode::ACCEPTED).then_some(())
    })
    .await;
    assert!(free.is_some(), "a slot never freed up");
    gate.release(2);
    master.wait_for_reports(3).await;
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_duplicate_attempt_is_accepted_but_runs_once() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let (worker, gate) = spawn_gated(&redis, test_config(&redis, &master)).await;

    let step = work_request("slow", json!("once"));
    assert_eq!(worker.post_work(&step).await.status(), StatusCode::ACCEPTED);
    let again = worker.post_work(&step).await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.json::<Value>().await.unwrap()["duplicate"], true);
    // A new attempt of the same step is a different lease: it runs.
    let mut retry = step.clone();
    retry.attempt = 2;
    assert_eq!(
        worker.post_work(&retry).await.status(),
        StatusCode::ACCEPTED
    );

    gate.release(2);
    let reports = master.wait_for_reports(2).await;
    let mut attempts: Vec<u32> = reports.iter().map(|r| r.body.attempt).collect();
    attempts.sort_unstable();
    assert_eq!(attempts, [1, 2]);
    assert_eq!(gate.started(), 2);
    worker.stop().await.unwrap();
    assert_eq!(master.reports().len(), 2);
}

#[tokio::test]
async fn held_steps_are_listed_in_the_heartbeat_until_their_result_is_delivered() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let (worker, gate) = spawn_gated(&redis, test_config(&redis, &master)).await;

    let step = work_request("slow", json!(1));
    worker.post_work(&step).await;
    let expected = StepRef {
        task_id: step.task_id.clone(),
        step: 0,
        attempt: 1,
    };
    redis
        .wait_for_record(&worker.id, |r| r.in_flight == [expected.clone()])
        .await;
    gate.release(1);
    master.wait_for_reports(1).await;
    redis
        .wait_for_record(&worker.id, |r| r.in_flight.is_empty())
        .await;
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_step_past_its_deadline_fails_as_a_retryable_timeout() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    // The gate is never opened: the step can only end by its deadline.
    let (worker, _gate) = spawn_gated(&redis, test_config(&redis, &master)).await;

    let mut step = work_request("slow", json!(1));
    step.deadline_ms = now_ms() + 300;
    worker.post_work(&step).await;
    let report = master.wait_for_reports(1).await.remove(0).body;
    assert_eq!(report.status, ReportStatus::Failed);
    let error = report.error.unwrap();
    assert!(error.retryable);
    assert_eq!(error.kind.as_deref(), Some("timeout"));
    assert!(report.output.is_none());
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn agent_errors_are_reported_with_their_retryable_flag() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let agents = Agents::new()
        .with(
            cap("bad-input"),
            Arc::new(FailAgent(StepError::permanent(
                "agent",
                "input has no question",
            ))),
        )
        .with(
            cap("flaky"),
            Arc::new(FailAgent(StepError::retryable("upstream", "try later"))),
        )
        .with(cap("panics"), Arc::new(PanicAgent));
    let worker = spawn_worker(&redis, test_config(&redis, &master), agents).await;

    for capability in ["bad-input", "flaky", "panics"] {
        let response = worker.post_work(&work_request(capability, json!(1))).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let reports = master.wait_for_reports(3).await;
    let mut by_message: Vec<(String, bool, Option<String>)> = reports
        .iter()
        .map(|r| {
            assert_eq!(r.body.status, ReportStatus::Failed);
            let e = r.body.error.clone().unwrap();
            (e.message, e.retryable, e.kind)
        })
        .collect();
    by_message.sort();
    assert_eq!(
        by_message,
        [
            (
                "input has no question".to_string(),
                false,
                Some("agent".into())
            ),
            (
                "the agent panicked".to_string(),
                false,
                Some("panic".into())
            ),
            ("try later".to_string(), true, Some("upstream".into())),
        ]
    );
    // The worker survived the panic.
    let response = worker.post_work(&work_request("echo", json!(1))).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_count_steps_per_capability() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let mut config = test_config(&redis, &master);
    config.capabilities = vec!["metered".into()];
    let worker = spawn_worker(&redis, config, Agents::new()).await;
    worker.post_work(&work_request("metered", json!(1))).await;
    master.wait_for_reports(1).await;
    let series = [
        "ensemble_worker_steps_received_total{capability=\"metered\"} 1",
        "ensemble_worker_steps_succeeded_total{capability=\"metered\"} 1",
        "ensemble_worker_step_duration_seconds_count{capability=\"metered\"} 1",
        "ensemble_worker_in_flight{",
        "ensemble_worker_result_deliveries_total{",
    ];
    let metrics = || async {
        let response = worker
            .client
            .get(format!("{}/metrics", worker.url))
            .send()
            .await;
        response.ok()?.text().await.ok()
    };
    // The delivery counter moves just after the master has answered.
    let found = testkit::eventually(WAIT, || async {
        let text = metrics().await?;
        series.iter().all(|s| text.contains(s)).then_some(())
    })
    .await;
    let text = metrics().await.unwrap_or_default();
    assert!(found.is_some(), "missing series in\n{text}");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_step_leased_to_another_worker_is_refused_421_and_not_run() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let worker = spawn_worker(&redis, test_config(&redis, &master), Agents::new()).await;

    // Two workers behind one address: the master leased this step to the other one.
    let mut elsewhere = work_request("echo", json!("not mine"));
    elsewhere.worker_id = Some(WorkerId::new("someone-else").unwrap());
    let response = worker.post_work_as(Some(TOKEN), &elsewhere, "r-1").await;
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "misdirected");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("someone-else") && message.contains(&worker.id),
        "{message}"
    );

    // Its own lease (and a step from a master that names no worker) runs as usual.
    let mut mine = work_request("echo", json!("mine"));
    mine.worker_id = Some(WorkerId::new(worker.id.clone()).unwrap());
    let unnamed = work_request("echo", json!("unnamed"));
    for step in [&mine, &unnamed] {
        let response = worker.post_work_as(Some(TOKEN), step, "r-2").await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let reports = master.wait_for_reports(2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let outputs: Vec<_> = master
        .reports()
        .into_iter()
        .map(|r| r.body.output)
        .collect();
    assert_eq!(reports.len(), 2);
    assert_eq!(outputs.len(), 2, "the refused step ran: {outputs:?}");
    assert!(!outputs.contains(&Some(json!("not mine"))), "{outputs:?}");
}

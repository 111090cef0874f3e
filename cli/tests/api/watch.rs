//! `ensemble watch` and `ensemble submit --follow` on a task's event stream: the steps as
//! they change and an agent's partial output as it arrives, from a real master on a real
//! redis-server (the step is held by the kit's fake worker while the test publishes partial
//! output as that worker would).

use std::time::Duration;

use serde_json::{Value, json};
use testkit::RedisServer;
use testkit::fakes::worker::{Behavior, FakeWorker, WORKER_TOKEN};
use testkit::service::Service;

use crate::helpers::*;

const KEY: &str = "alice-key-123456";
const LIMIT: Duration = Duration::from_secs(60);

async fn master(redis: &common::redis::RedisSettings) -> Service {
    let config = master::Config {
        host: "127.0.0.1".into(),
        port: 0,
        redis: redis.clone(),
        api_keys: common::config::Secret::new(format!("alice:{KEY}")),
        worker_token: common::config::Secret::new(WORKER_TOKEN),
        worker_heartbeat_ms: testkit::fakes::worker::HEARTBEAT.as_millis() as u64,
        lease_ms: 1_500,
        rate_limit_per_sec: 0.0,
        ..master::Config::default()
    };
    Service::start_local("master", |listener, stop| {
        master::serve(config, listener, stop)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn watch_shows_the_steps_and_the_agents_tokens_as_they_come() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = master(&settings).await;
    let url = master.url().to_string();
    let _worker = FakeWorker::start("w-think", &["plan"], 2, Behavior::Hang, &settings, &url).await;
    let http = reqwest::Client::new();
    let submitted: Value = http
        .post(format!("{url}/task"))
        .bearer_auth(KEY)
        .json(&json!({"steps": [{"id": "think", "capability": "plan"}], "input": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = submitted["task_id"].as_str().unwrap().to_string();
    // `ensemble watch ID`, running while the step is held.
    let mut command = ensemble(&["watch", &id]);
    command
        .env("ENSEMBLE_URL", &url)
        .env("ENSEMBLE_API_KEY", KEY);
    // On a thread of its own: the master runs on this test's runtime, which must keep going.
    let watching = tokio::task::spawn_blocking(move || run(command, LIMIT));
    // The step is dispatched: its worker publishes two pieces of output.
    let attempt = loop {
        let view: Value = http
            .get(format!("{url}/task/{id}"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if view["steps"][0]["status"] == "dispatched" {
            break view["steps"][0]["attempts"].as_u64().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Give the watcher time to connect before the output arrives (it shows either way:
    // a stream opened later reads the task's events from the start).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for piece in [
        json!([{"delta": "Hello, "}]),
        json!([{"delta": "wor"}, {"delta": "ld"}]),
    ] {
        let r = http
            .post(format!("{url}/progress"))
            .bearer_auth(WORKER_TOKEN)
            .json(&json!({"task_id": id, "step": 0, "attempt": attempt,
                          "worker_id": "w-think", "messages": piece}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = http
        .delete(format!("{url}/task/{id}"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let output = watching.await.unwrap();
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(3),
        "a cancelled task exits 3:\n{stdout}"
    );
    assert!(stdout.contains("think ▸ Hello, "), "{stdout}");
    assert!(stdout.contains("think ▸ world"), "{stdout}");
    let dispatched = stdout.find("think").unwrap();
    let tokens = stdout.find("▸ Hello").unwrap();
    assert!(
        dispatched < tokens,
        "the step shows before its output:\n{stdout}"
    );
    assert!(stdout.contains("task cancelled"), "{stdout}");
}

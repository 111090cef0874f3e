//! Registration and heartbeat: the record's contents, its expiry after a kill, ids, and
//! surviving a Redis outage.

use std::time::Duration;

use serde_json::json;
use testkit::eventually;
use worker::Agents;

use crate::helpers::*;

#[tokio::test]
async fn the_heartbeat_record_appears_and_expires_after_the_worker_is_killed() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let id = unique_id("killed");
    let mut env = binary_env(&redis, &id, &master);
    env.push(("CAPABILITIES", r#"["retrieve","evaluate"]"#.into()));
    env.push(("MAX_CONCURRENCY", "3".into()));
    env.push(("AGENT_KIND", "echo".into()));
    let mut worker = BinaryWorker::spawn(&env);

    let record = eventually(WAIT, || redis.record(&id)).await;
    let record = record.unwrap_or_else(|| panic!("never registered; log:\n{}", worker.log()));
    let caps: Vec<&str> = record.capabilities.iter().map(|c| c.as_str()).collect();
    assert_eq!(caps, ["evaluate", "retrieve"]);
    assert_eq!(record.max_concurrency, 3);
    assert_eq!(record.version, common::VERSION);
    assert!(!record.draining);
    assert!(record.in_flight.is_empty());
    assert!(
        record.url.starts_with("http://127.0.0.1:"),
        "{}",
        record.url
    );
    // The advertised URL is the bound one: the worker answers there.
    let health = reqwest::get(format!("{}/health", record.url))
        .await
        .unwrap();
    assert!(health.status().is_success());
    assert!(worker.log().contains("worker listening"));

    // The record is refreshed: it is still there after several TTLs (3 × 200 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        redis.record(&id).await.is_some(),
        "the record lapsed while alive"
    );

    worker.signal("KILL");
    worker.wait_exit().await;
    // No deregistration on a kill: the record lapses with its TTL.
    redis.wait_gone(&id).await;
}

#[tokio::test]
async fn workers_without_an_agent_id_get_distinct_generated_ones() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let env: Vec<(&str, String)> = binary_env(&redis, "unused", &master)
        .into_iter()
        .filter(|(k, _)| *k != "AGENT_ID")
        .chain([
            ("AGENT_KIND", "echo".to_string()),
            ("CAPABILITIES", "plan".into()),
        ])
        .collect();
    let _a = BinaryWorker::spawn(&env);
    let _b = BinaryWorker::spawn(&env);
    let records = eventually(WAIT, || async {
        let live = redis.registry.live().await.ok()?;
        (live.len() == 2).then_some(live)
    })
    .await
    .expect("two workers should register");
    assert_ne!(records[0].id, records[1].id);
    assert_ne!(records[0].url, records[1].url);
    for r in &records {
        assert!(r.id.as_str().starts_with("worker-"), "{:?}", r.id);
    }
}

#[tokio::test]
async fn the_worker_keeps_serving_through_a_redis_outage_and_registers_again() {
    let mut redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let worker = spawn_worker(&redis, test_config(&redis, &master), Agents::new()).await;

    redis.server.kill();
    let response = worker
        .post_work(&work_request("echo", json!("during outage")))
        .await;
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let received = master.wait_for_reports(1).await;
    assert_eq!(received[0].body.output, Some(json!("during outage")));
    let ready = reqwest::get(format!("{}/ready", worker.url)).await.unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);

    redis.server.restart();
    // Without AOF the restarted Redis is empty; the next beat writes the record again.
    redis.wait_for_record(&worker.id, |_| true).await;
    let id = worker.id.clone();
    worker.stop().await.unwrap();
    redis.wait_gone(&id).await;
}

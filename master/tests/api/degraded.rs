//! A worker that cannot deliver results to the master (a wrong `MASTER_URL`, a security
//! group, a partition) must not swallow work: beside a healthy worker of the same
//! capability, every task still completes within a few leases, and the cut-off worker says
//! it is degraded in its record and on `/ready`.

use std::time::Duration;

use common::config::Secret;
use common::redis::{RedisPool, RedisSettings};
use common::registry::Registry;
use common::wire::{Capability, TaskStatus, WorkerId, WorkerRecord};
use serde_json::json;
use testkit::{Exit, RedisServer, Service, eventually, free_port};
use tokio::time::Instant;

use crate::helpers::*;

/// A real worker (the `worker` crate) running in this process: an echo worker for
/// `plan`, reporting to `master_url`, beating every 300 ms (the test master's
/// `WORKER_HEARTBEAT_MS`).
async fn real_worker(id: &str, redis: &RedisSettings, master_url: String) -> Service {
    let config = worker::Config {
        host: "127.0.0.1".into(),
        port: 0,
        redis: redis.clone(),
        agent_id: Some(id.into()),
        capabilities: vec!["plan".into()],
        master_url,
        worker_token: Secret::new(WORKER_TOKEN),
        agent_kind: worker::AgentKind::Echo,
        max_concurrency: 4,
        heartbeat_interval_ms: 300,
        shutdown_grace_ms: 500,
        ..worker::Config::default()
    };
    Service::start_local(id, |listener, stop| worker::serve(config, listener, stop))
        .await
        .unwrap()
        .with_grace(Duration::from_secs(10))
}

async fn record(registry: &Registry, id: &str) -> Option<WorkerRecord> {
    (registry.live().await.ok()?)
        .into_iter()
        .find(|r| r.id.as_str() == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_cannot_reach_the_master_does_not_swallow_tasks() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let config = test_config(&settings);
    let lease = config.lease();
    let master = TestMaster::start(config).await;
    let registry = Registry::new(RedisPool::new(&settings).unwrap());
    // Nothing listens on this loopback port: every result the bad worker sends is refused.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let mut bad = real_worker("cut-off", &settings, nowhere.clone()).await;
    let mut good = real_worker("healthy", &settings, master.url.clone()).await;
    for id in ["cut-off", "healthy"] {
        eventually(Duration::from_secs(10), || record(&registry, id))
            .await
            .unwrap_or_else(|| panic!("{id} never registered"));
    }

    // The bound: the cut-off worker's steps wait out one lease (not extended, since it is
    // degraded), then run on the healthy worker.
    let bound = lease * 4;
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(master.submit(json!({"steps": ["plan"], "input": i})).await);
    }
    let mut redispatched = 0;
    for id in &ids {
        let left = bound.saturating_sub(started.elapsed());
        let view = master.wait(id, left).await;
        assert_eq!(view.status, TaskStatus::Succeeded, "{view:?}");
        let step = &view.steps[0];
        assert_eq!(step.worker_id.as_ref().unwrap().as_str(), "healthy");
        if step.attempts > 1 {
            redispatched += 1;
        }
    }
    let took = started.elapsed();
    assert!(took <= bound, "12 tasks took {took:?}, more than {bound:?}");
    assert!(
        redispatched > 0,
        "the cut-off worker was given steps (and they lapsed to the healthy one)"
    );

    let degraded = record(&registry, "cut-off").await.unwrap().degraded;
    let reason = degraded.expect("the cut-off worker's record says it is degraded");
    assert!(
        reason.contains(&format!("{nowhere}/result")),
        "the reason names where results cannot go: {reason}"
    );
    assert!(
        record(&registry, "healthy")
            .await
            .unwrap()
            .degraded
            .is_none()
    );
    let ready = master
        .http
        .get(format!("{}/ready", bad.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["reason"], "degraded");

    assert_eq!(bad.stop().await, Exit::Clean);
    assert_eq!(good.stop().await, Exit::Clean);
    master.stop().await;
}

/// Two worker records with one address (a shared `ADVERTISE_URL`, a DNS name over several
/// replicas): a step leased to one must never run on the other. The worker that answers
/// refuses a step leased to someone else (`421`); the master puts it back without spending
/// an attempt and leases it to a worker that answers for itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_is_never_run_by_a_worker_it_was_not_leased_to() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let registry = Registry::new(RedisPool::new(&settings).unwrap());
    let mut real = real_worker("real", &settings, master.url.clone()).await;
    eventually(Duration::from_secs(10), || record(&registry, "real"))
        .await
        .expect("the real worker registered");
    // A second record at the real worker's address, kept alive as a worker would.
    let ghost = WorkerRecord::starting(
        WorkerId::new("ghost").unwrap(),
        real.url().to_string(),
        vec![Capability::new("plan").unwrap()],
        4,
    );
    let beating = tokio::spawn({
        let registry = Registry::new(RedisPool::new(&settings).unwrap());
        async move {
            loop {
                registry
                    .heartbeat(&ghost, Duration::from_secs(2))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    eventually(Duration::from_secs(10), || record(&registry, "ghost"))
        .await
        .expect("the ghost record is listed");

    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(master.submit(json!({"steps": ["plan"], "input": i})).await);
    }
    for id in &ids {
        let view = master.wait(id, Duration::from_secs(20)).await;
        assert_eq!(view.status, TaskStatus::Succeeded, "{view:?}");
        let step = &view.steps[0];
        assert_eq!(
            step.worker_id.as_ref().map(WorkerId::as_str),
            Some("real"),
            "{view:?}"
        );
        // Run once, by the worker it was leased to: a step leased to the ghost was refused
        // at once (free), not run by the real worker and left to lapse.
        assert_eq!(step.attempts, 1, "{view:?}");
    }
    beating.abort();
    assert_eq!(real.stop().await, Exit::Clean);
    master.stop().await;
}

//! The worker registry against real Redis: records expire with their TTL, deregistering
//! removes them at once, new workers are announced.

use std::time::Duration;

use common::redis::RedisPool;
use common::registry::{Registry, keys};
use common::wire::{Capability, StepRef, TaskId, WorkerId, WorkerRecord};
use testkit::{RedisServer, eventually};

fn record(id: &str) -> WorkerRecord {
    WorkerRecord {
        id: WorkerId::new(id).unwrap(),
        url: "http://127.0.0.1:5001".into(),
        capabilities: vec![Capability::new("plan").unwrap()],
        max_concurrency: 4,
        in_flight: vec![StepRef {
            task_id: TaskId::generate(),
            step: 0,
            attempt: 1,
        }],
        version: common::VERSION.into(),
        started_at_ms: common::wire::now_ms(),
        draining: false,
        heartbeat_at_ms: 0,
        degraded: None,
        unavailable: None,
        max_batch: 0,
    }
}

#[tokio::test]
async fn heartbeats_register_and_expire() {
    let server = RedisServer::start();
    let pool = RedisPool::new(&server.settings()).unwrap();
    let registry = Registry::new(pool.clone());

    let rec = record("w-1");
    assert!(
        registry
            .heartbeat(&rec, Duration::from_millis(400))
            .await
            .unwrap()
    );
    assert!(
        !registry
            .heartbeat(&rec, Duration::from_millis(400))
            .await
            .unwrap()
    );
    let before = common::wire::now_ms();
    assert!(
        !registry
            .heartbeat(&rec, Duration::from_millis(400))
            .await
            .unwrap()
    );
    let live = registry.live().await.unwrap();
    // Every beat stamps the record with its time: leases are extended from it.
    assert!(live[0].heartbeat_at_ms >= before, "{:?}", live[0]);
    assert_eq!(
        live,
        vec![WorkerRecord {
            heartbeat_at_ms: live[0].heartbeat_at_ms,
            ..rec.clone()
        }]
    );
    assert_eq!(live[0].free_slots(), 3);

    let gone = eventually(Duration::from_secs(3), || async {
        registry.live().await.unwrap().is_empty().then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "a worker whose heartbeat stopped must expire"
    );

    let mut conn = pool.get().await.unwrap();
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys::workers(pool.prefix()))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        members.is_empty(),
        "expired ids are pruned from the live set"
    );
}

#[tokio::test]
async fn deregister_removes_at_once() {
    let server = RedisServer::start();
    let registry = Registry::new(RedisPool::new(&server.settings()).unwrap());
    registry
        .heartbeat(&record("w-a"), Duration::from_secs(60))
        .await
        .unwrap();
    registry
        .heartbeat(&record("w-b"), Duration::from_secs(60))
        .await
        .unwrap();
    registry
        .deregister(&WorkerId::new("w-a").unwrap())
        .await
        .unwrap();
    let ids: Vec<String> = registry
        .live()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(ids, ["w-b"]);
}

/// Plants a live worker whose record is `json` (as a buggy worker in another language
/// might write it).
pub async fn plant_record(pool: &RedisPool, id: &str, json: &str) {
    let mut conn = pool.get().await.unwrap();
    let prefix = pool.prefix().to_string();
    let expiry = common::wire::now_ms() + 60_000;
    redis::pipe()
        .cmd("SET")
        .arg(keys::worker(&prefix, id))
        .arg(json)
        .cmd("ZADD")
        .arg(keys::workers(&prefix))
        .arg(expiry)
        .arg(id)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn malformed_records_are_named_with_their_key_and_problem_and_skipped() {
    let server = RedisServer::start();
    let pool = RedisPool::new(&server.settings()).unwrap();
    let registry = Registry::new(pool.clone());
    registry
        .heartbeat(&record("w-good"), Duration::from_secs(60))
        .await
        .unwrap();
    let mut float = serde_json::to_value(record("w-float")).unwrap();
    float["max_concurrency"] = serde_json::json!(4.5);
    plant_record(&pool, "w-float", &float.to_string()).await;
    let mut missing = serde_json::to_value(record("w-missing")).unwrap();
    missing.as_object_mut().unwrap().remove("url");
    plant_record(&pool, "w-missing", &missing.to_string()).await;

    let scan = registry.scan().await.unwrap();
    let good: Vec<&str> = scan.records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(good, ["w-good"]);
    let mut bad: Vec<_> = scan.malformed.clone();
    bad.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(bad.len(), 2);
    assert_eq!(bad[0].id, "w-float");
    assert_eq!(bad[0].key, keys::worker(pool.prefix(), "w-float"));
    assert!(bad[0].reason.contains("4.5"), "{}", bad[0].reason);
    assert_eq!(bad[1].id, "w-missing");
    assert!(bad[1].reason.contains("url"), "{}", bad[1].reason);
    assert_eq!(registry.live().await.unwrap().len(), 1);
}

/// `INFO stats`' `total_net_output_bytes`: what the server has sent its clients so far.
async fn bytes_sent(pool: &RedisPool) -> u64 {
    let mut conn = pool.get().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO stats has total_net_output_bytes")
}

/// The ids of what `changed` returns, in order.
async fn changed_ids(registry: &Registry) -> Vec<String> {
    let scan = registry.changed().await.unwrap();
    scan.records.iter().map(|r| r.id.to_string()).collect()
}

#[tokio::test]
async fn the_dispatchers_read_fetches_only_moved_records_and_misses_no_change() {
    let server = RedisServer::start();
    let pool = RedisPool::new(&server.settings()).unwrap();
    let registry = Registry::new(pool.clone());
    // A worker's record with a long URL (about 1 KiB), so records dominate what is sent.
    let big = |id: &str| WorkerRecord {
        url: format!("http://127.0.0.1:5001/{}", "p".repeat(1_000)),
        ..record(id)
    };
    let ids: Vec<String> = (0..200).map(|i| format!("w-{i:03}")).collect();
    for id in &ids {
        registry
            .heartbeat(&big(id), Duration::from_secs(60))
            .await
            .unwrap();
    }
    // The first read is a full one.
    let sent = bytes_sent(&pool).await;
    assert_eq!(changed_ids(&registry).await, ids);
    let full = bytes_sent(&pool).await - sent;
    assert!(
        full > 200_000,
        "a full read of 200 1-KiB records sent {full} bytes"
    );

    // Two workers beat: the next read fetches their records, not the other 198.
    for id in ["w-007", "w-100"] {
        let mut again = big(id);
        again.draining = id == "w-100";
        registry
            .heartbeat(&again, Duration::from_secs(60))
            .await
            .unwrap();
    }
    let sent = bytes_sent(&pool).await;
    let scan = registry.changed().await.unwrap();
    let partial = bytes_sent(&pool).await - sent;
    assert!(
        partial < full / 10,
        "a read after 2 of 200 beats sent {partial} bytes, a full read {full}"
    );
    let draining: Vec<&str> = scan
        .records
        .iter()
        .filter(|r| r.draining)
        .map(|r| r.id.as_str())
        .collect();
    assert_eq!(draining, ["w-100"], "a beat's new record is seen at once");
    assert_eq!(scan.records.len(), 200);

    // Nothing moved: nothing changes, and no record is sent.
    let sent = bytes_sent(&pool).await;
    assert_eq!(changed_ids(&registry).await, ids);
    assert!(bytes_sent(&pool).await - sent < full / 10);

    // Deregistered, new, malformed, and expired workers are all seen by the next read.
    registry
        .deregister(&WorkerId::new("w-050").unwrap())
        .await
        .unwrap();
    registry
        .heartbeat(&record("w-new"), Duration::from_millis(300))
        .await
        .unwrap();
    let mut float = serde_json::to_value(record("w-float")).unwrap();
    float["max_concurrency"] = serde_json::json!(4.5);
    plant_record(&pool, "w-float", &float.to_string()).await;
    let scan = registry.changed().await.unwrap();
    let seen: Vec<&str> = scan.records.iter().map(|r| r.id.as_str()).collect();
    assert!(
        !seen.contains(&"w-050"),
        "a deregistered worker drops out at once"
    );
    assert!(seen.contains(&"w-new"), "a new worker is seen at once");
    assert_eq!(seen.len(), 200);
    let bad: Vec<&str> = scan.malformed.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(bad, ["w-float"]);
    let expired = eventually(Duration::from_secs(3), || async {
        (!changed_ids(&registry).await.contains(&"w-new".to_string())).then_some(())
    })
    .await;
    assert!(
        expired.is_some(),
        "a worker whose beats stopped drops out when its record expires"
    );
}

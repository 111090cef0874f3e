//! What the master answers when Redis refuses a command: a key of the wrong type is a bug
//! or tampering (`500 internal`, details only in the log), not an outage (`503`); a full
//! Redis under `noeviction` is `507 storage_full`, reported by `/ready`, and loses nothing
//! it accepted.

use std::time::Duration;

use common::redis::RedisPool;
use serde_json::{Value, json};
use testkit::{RedisServer, eventually};

use crate::helpers::*;

async fn plant(pool: &RedisPool, args: &[&str]) {
    let mut conn = pool.get().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async::<()>(&mut conn).await.unwrap();
}

#[tokio::test]
async fn a_key_of_the_wrong_type_is_a_500_that_hides_the_details_not_a_503() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let pool = RedisPool::new(&settings).unwrap();
    let prefix = settings.key_prefix.clone();
    let master = TestMaster::start(test_config(&settings)).await;

    // A task whose hash was replaced by a string: reading it is WRONGTYPE.
    let id = master
        .submit(json!({"steps": ["plan"], "input": "x"}))
        .await;
    let task_key = master::store::schema::keys::task(&prefix, &id);
    plant(&pool, &["DEL", &task_key]).await;
    plant(&pool, &["SET", &task_key, "not a hash"]).await;
    // An idempotency key that is a hash: the submit script's first GET is WRONGTYPE.
    let idem_key = master::store::schema::keys::idempotency(&prefix, "alice", "planted");
    plant(&pool, &["HSET", &idem_key, "f", "v"]).await;

    let cases = [
        master.get(&format!("/task/{id}"), ALICE),
        master
            .post("/task", ALICE)
            .header("idempotency-key", "planted")
            .json(&json!({"steps": ["plan"], "input": 1})),
    ];
    for request in cases {
        let r = request.send().await.unwrap();
        let status = r.status();
        assert!(!r.headers().contains_key("retry-after"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 500, "{body}");
        assert_eq!(body["error"]["code"], "internal", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            !message.contains("WRONGTYPE") && !message.contains(&prefix),
            "the body must hide internals: {body}"
        );
    }
    // Redis itself is fine: the master stays ready and serves everything else.
    let ready = master
        .http
        .get(format!("{}/ready", master.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    master
        .submit(json!({"steps": ["plan"], "input": "still fine"}))
        .await;
    master.stop().await;
}

#[tokio::test]
async fn a_full_store_answers_507_storage_full_and_loses_nothing_it_accepted() {
    let redis = RedisServer::with_args(&["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]);
    let settings = redis.settings();
    let pool = RedisPool::new(&settings).unwrap();
    let master = TestMaster::start(test_config(&settings)).await;
    // No worker: every accepted task stays queued, so nothing finishes and frees memory.
    let input = "x".repeat(32 * 1024);
    let mut accepted = Vec::new();
    let mut refusal = None;
    for i in 0..400 {
        let r = master
            .post("/task", ALICE)
            .json(&json!({"steps": ["plan"], "input": {"i": i, "pad": input}}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        match status.as_u16() {
            202 => accepted.push(body["task_id"].as_str().unwrap().to_string()),
            _ => {
                refusal = Some((status, body));
                break;
            }
        }
    }
    let (status, body) = refusal.expect("3 MB never filled up");
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "storage_full", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("full") && message.contains("maxmemory"),
        "{message}"
    );
    assert!(!message.contains("retry shortly"), "{message}");
    assert!(accepted.len() > 10, "only {} accepted", accepted.len());

    let ready = master
        .http
        .get(format!("{}/ready", master.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["reason"], "storage_full", "{ready}");
    let metrics = master
        .http
        .get(format!("{}/metrics", master.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ensemble_storage_full_total")),
        "no storage-full counter in /metrics"
    );

    // Nothing accepted was lost: noeviction refuses writes, it never drops keys.
    for id in &accepted {
        let view = master.view(id).await;
        assert_eq!(view.steps.len(), 1);
    }

    // An operator raises maxmemory: writes and readiness come back by themselves.
    plant(&pool, &["CONFIG", "SET", "maxmemory", "64mb"]).await;
    master
        .submit(json!({"steps": ["plan"], "input": "after"}))
        .await;
    let back = eventually(Duration::from_secs(15), || async {
        let r = master
            .http
            .get(format!("{}/ready", master.url))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "/ready stayed 503 after maxmemory was raised"
    );
    master.stop().await;
}

/// `OBJECT ENCODING` of `key`.
async fn encoding(pool: &RedisPool, key: &str) -> String {
    let mut conn = pool.get().await.unwrap();
    redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// On a Redis set up as deploy/ and compose set it up (`hash-max-listpack-value` 1024, as
/// the test kit's redis-server has it), a queued task with a 100-byte input is a compact
/// hash: about 550 bytes instead of 1,400 (BENCHMARKS.md, "The scale figures"). A task
/// with a value over the limit (a large input) still works, in the other encoding.
#[tokio::test]
async fn a_queued_task_with_a_100_byte_input_keeps_the_compact_encoding() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let pool = RedisPool::new(&settings).unwrap();
    let prefix = settings.key_prefix.clone();
    let master = TestMaster::start(test_config(&settings)).await;

    let input = json!({"n": 1, "text": "x".repeat(90)});
    assert!(input.to_string().len() >= 100);
    let small = master
        .submit(json!({"steps": ["plan"], "input": input}))
        .await;
    let key = master::store::schema::keys::task(&prefix, &small);
    let compact = encoding(&pool, &key).await;
    assert!(
        compact == "listpack" || compact == "ziplist",
        "a queued task's hash is {compact}"
    );

    let big = master
        .submit(json!({"steps": ["plan"], "input": "y".repeat(5_000)}))
        .await;
    let key = master::store::schema::keys::task(&prefix, &big);
    assert_eq!(encoding(&pool, &key).await, "hashtable");
    assert_eq!(master.view(&big).await.input, json!("y".repeat(5_000)));
    master.stop().await;
}

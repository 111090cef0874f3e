//! A task's model usage and budget: the budget given at submit lands where the llm-gateway
//! checks it (the task's usage hash), what the gateway records there shows in
//! `GET /task/{id}` per step and in total, and the hash expires with the task.

use std::time::Duration;

use common::redis::RedisPool;
use common::wire::TaskStatus;
use serde_json::{Value, json};
use testkit::RedisServer;

use crate::helpers::*;

/// The key prefix the master was given (each `RedisServer::settings()` makes a new one):
/// read off its task's key.
async fn prefix_of(pool: &RedisPool, id: &str) -> String {
    let mut conn = pool.get().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*:task:{{{id}}}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let key = keys.first().expect("the task's hash");
    key[..key.len() - format!(":task:{{{id}}}").len()].to_string()
}

/// The task's usage hash.
async fn usage_key(pool: &RedisPool, id: &str) -> String {
    common::usage::task_usage_key(&prefix_of(pool, id).await, id)
}

/// The usage hash's fields, as the gateway leaves them.
async fn usage_hash(pool: &RedisPool, id: &str) -> Vec<(String, String)> {
    let key = usage_key(pool, id).await;
    let mut conn = pool.get().await.unwrap();
    let mut fields: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    fields.sort();
    fields
}

#[tokio::test]
async fn a_budget_goes_where_the_gateway_checks_it_and_expires_with_the_task() {
    let redis = RedisServer::start();
    let (master, _workers) = spawn_app(&redis).await;
    let pool = RedisPool::new(&redis.settings()).unwrap();

    let id = master
        .submit(json!({
            "steps": ["plan"],
            "input": "x",
            "budget": {"max_tokens": 5000, "max_cost_usd": 0.5}
        }))
        .await;
    let fields = usage_hash(&pool, &id).await;
    assert_eq!(
        fields,
        [
            ("budget_cost_nanos".to_string(), "500000000".to_string()),
            ("budget_tokens".to_string(), "5000".to_string()),
        ]
    );
    let view = master.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(view.status, TaskStatus::Succeeded);
    let budget = view.usage.expect("the budget in the view").budget.unwrap();
    assert_eq!(budget.max_tokens, Some(5000));
    assert_eq!(budget.max_cost_usd, Some(0.5));

    // The usage hash goes when the task goes.
    let prefix = prefix_of(&pool, &id).await;
    let mut conn = pool.get().await.unwrap();
    let usage_ttl: i64 = redis::cmd("PTTL")
        .arg(common::usage::task_usage_key(&prefix, &id))
        .query_async(&mut conn)
        .await
        .unwrap();
    let task_ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{prefix}:task:{{{id}}}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(usage_ttl > 0, "the usage hash expires: {usage_ttl}");
    assert!(
        (usage_ttl - task_ttl).abs() < 5_000,
        "{usage_ttl} vs {task_ttl}"
    );

    // A task without a budget writes nothing there (the gateway makes the hash if the
    // task calls a model).
    let plain = master.submit(json!({"steps": ["plan"]})).await;
    master.wait(&plain, Duration::from_secs(20)).await;
    assert!(usage_hash(&pool, &plain).await.is_empty());
    let view = master.view(&plain).await;
    assert_eq!(view.usage, None);
    assert!(view.steps.iter().all(|s| s.usage.is_none()));
}

#[tokio::test]
async fn what_the_gateway_recorded_shows_per_step_and_in_total() {
    let redis = RedisServer::start();
    let (master, _workers) = spawn_app(&redis).await;
    let pool = RedisPool::new(&redis.settings()).unwrap();
    let id = master
        .submit(json!({"steps": ["plan", "retrieve"], "input": "x"}))
        .await;
    let view = master.wait(&id, Duration::from_secs(20)).await;
    let (plan, retrieve) = (view.steps[0].id.clone(), view.steps[1].id.clone());

    // As the gateway records two calls of the first step and one of the second.
    let key = usage_key(&pool, &id).await;
    let mut conn = pool.get().await.unwrap();
    let mut pipe = redis::pipe();
    for (field, n) in [
        ("in".to_string(), 300),
        ("out".to_string(), 60),
        ("cost_nanos".to_string(), 1_250_000),
        ("calls".to_string(), 3),
        (format!("step:{plan}:in"), 200),
        (format!("step:{plan}:out"), 40),
        (format!("step:{plan}:cost_nanos"), 1_000_000),
        (format!("step:{plan}:calls"), 2),
        (format!("step:{retrieve}:in"), 100),
        (format!("step:{retrieve}:out"), 20),
        (format!("step:{retrieve}:cost_nanos"), 250_000),
        (format!("step:{retrieve}:calls"), 1),
    ] {
        pipe.cmd("HINCRBY").arg(&key).arg(field).arg(n);
    }
    pipe.query_async::<()>(&mut conn).await.unwrap();

    let body: Value = master
        .get(&format!("/task/{id}"), ALICE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 300, "completion_tokens": 60, "total_tokens": 360,
               "cost_usd": 0.00125, "calls": 3})
    );
    assert_eq!(
        body["steps"][0]["usage"],
        json!({"prompt_tokens": 200, "completion_tokens": 40, "total_tokens": 240,
               "cost_usd": 0.001, "calls": 2})
    );
    assert_eq!(body["steps"][1]["usage"]["cost_usd"], json!(0.00025));
    // Another client sees nothing of it.
    let r = master
        .get(&format!("/task/{id}"), BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn a_budget_that_names_nothing_or_is_out_of_range_is_a_400_and_creates_nothing() {
    let redis = RedisServer::start();
    let (master, _workers) = spawn_app(&redis).await;
    for (budget, says) in [
        (json!({}), "needs `max_tokens`, `max_cost_usd` or both"),
        (json!({"max_tokens": 0}), "budget.max_tokens"),
        (
            json!({"max_tokens": 1_000_000_000_001_u64}),
            "budget.max_tokens",
        ),
        (json!({"max_tokens": -5}), "max_tokens"),
        (json!({"max_cost_usd": 0}), "budget.max_cost_usd"),
        (json!({"max_cost_usd": -0.5}), "budget.max_cost_usd"),
        (json!({"max_cost_usd": 1e300}), "budget.max_cost_usd"),
        (json!({"max_dollars": 5}), "max_dollars"),
        (json!("lots"), "budget"),
    ] {
        let r = master
            .post("/task", ALICE)
            .json(&json!({"steps": ["plan"], "budget": budget}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status == 400 || status == 422, "{budget}: {status} {text}");
        assert!(text.contains(says), "{budget}: {text}");
    }
    // Nothing was created: no task hash, no usage hash.
    let pool = RedisPool::new(&redis.settings()).unwrap();
    let mut conn = pool.get().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !keys
            .iter()
            .any(|k| k.contains(":task:{") || k.contains(":usage:{")),
        "{keys:?}"
    );
}

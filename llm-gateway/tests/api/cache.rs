//! The exact-match response cache against a real redis-server, per alias, over the fake
//! Gemini (whose request log counts the provider calls).

use common::redis::RedisPool;
use common::redis::client::AsyncCommands;
use llm_gateway::Config;
use llm_gateway::config::ProviderKind;
use serde_json::json;
use testkit::RedisServer;
use testkit::fakes::gemini::{FakeGemini, Reply, reply_json};

use crate::helpers::{TOKEN, ask, ask_stream, spawn_app, with_alias};
use crate::replay::{body, events, gemini_config, post};

/// `cached` (60 s) and `fresh` (not cached), both on the fake's model.
fn cached_config(fake: &FakeGemini, redis: &RedisServer) -> Config {
    let config = gemini_config(fake, redis);
    let mut config = with_alias(
        config,
        "cached",
        &[(ProviderKind::Gemini, "gemini-2.5-flash")],
    );
    config.models.get_mut("cached").unwrap().cache_ttl_s = Some(60);
    with_alias(
        config,
        "fresh",
        &[(ProviderKind::Gemini, "gemini-2.5-flash")],
    )
}

#[tokio::test]
async fn an_identical_request_is_answered_from_the_cache_of_its_alias() {
    let redis = RedisServer::start();
    let fake = FakeGemini::start().await;
    fake.push(Reply::Json(200, reply_json("Paris.", "STOP", 12, 3)));
    let config = cached_config(&fake, &redis);
    let settings = config.redis.clone();
    let app = spawn_app(config).await;
    let mut request = ask("cached", "Capital of France?");
    request["temperature"] = json!(0.9);

    let first = post(&app, TOKEN, None, &request).await;
    assert_eq!(first.headers()["x-ensemble-cache"], "miss");
    let first = body(first).await;
    assert_eq!(first["choices"][0]["message"]["content"], "Paris.");

    // Same request, keys in another order, a `user` and `metadata`: a hit.
    let same = json!({
        "temperature": 0.9,
        "user": "someone",
        "metadata": {"task": "t1"},
        "messages": [{"content": "Capital of France?", "role": "user"}],
        "model": "cached"
    });
    let hit = post(&app, TOKEN, None, &same).await;
    assert_eq!(hit.headers()["x-ensemble-cache"], "hit");
    assert_eq!(hit.headers()["x-ensemble-provider"], "gemini");
    assert_eq!(body(hit).await, first);
    // Streamed, from the same entry.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let hit = post(&app, TOKEN, None, &streamed).await;
    assert_eq!(hit.headers()["x-ensemble-cache"], "hit");
    let chunks = events(hit).await;
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Paris.");
    assert_eq!(chunks.last(), Some(&json!("[DONE]")));
    // Shared by every gateway key.
    let theirs = post(&app, "x-key-token", None, &request).await;
    assert_eq!(theirs.headers()["x-ensemble-cache"], "hit");
    assert_eq!(fake.requests().len(), 1, "a hit called the provider");

    // Another request is a miss.
    let other = post(&app, TOKEN, None, &ask("cached", "Capital of Spain?")).await;
    assert_eq!(other.headers()["x-ensemble-cache"], "miss");
    assert_eq!(fake.requests().len(), 2);

    // Entries expire after the alias's cache_ttl_s.
    let pool = RedisPool::new(&settings).unwrap();
    let mut conn = pool.get().await.unwrap();
    let keys: Vec<String> = conn
        .keys(format!("{}:gw:cache:*", settings.key_prefix))
        .await
        .unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in keys {
        let ttl: i64 = conn.ttl(&key).await.unwrap();
        assert!((1..=60).contains(&ttl), "{key}: {ttl}");
    }

    // The recorder is the process's, shared by every test: the series exist.
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"ensemble_gateway_cache_total{alias="cached",outcome="hit"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ensemble_gateway_cache_total{alias="cached",outcome="miss"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn aliases_without_cache_ttl_are_not_cached() {
    let redis = RedisServer::start();
    let fake = FakeGemini::start().await;
    let app = spawn_app(cached_config(&fake, &redis)).await;
    for _ in 0..2 {
        let response = post(&app, TOKEN, None, &ask("fresh", "hi")).await;
        assert!(response.headers().get("x-ensemble-cache").is_none());
        assert_eq!(response.status(), 200);
    }
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn filtered_answers_are_not_cached() {
    let redis = RedisServer::start();
    let fake = FakeGemini::start().await;
    fake.push(Reply::Json(200, reply_json("", "SAFETY", 1, 0)));
    let app = spawn_app(cached_config(&fake, &redis)).await;
    let first = body(post(&app, TOKEN, None, &ask("cached", "hi")).await).await;
    assert_eq!(first["choices"][0]["finish_reason"], "content_filter");
    let second = post(&app, TOKEN, None, &ask("cached", "hi")).await;
    assert_eq!(second.headers()["x-ensemble-cache"], "miss");
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn a_redis_outage_is_a_miss_not_an_error() {
    let mut redis = RedisServer::with_aof();
    let fake = FakeGemini::start().await;
    let app = spawn_app(cached_config(&fake, &redis)).await;
    let request = ask_stream("cached", "hi");
    assert_eq!(
        events(post(&app, TOKEN, None, &request).await).await.last(),
        Some(&json!("[DONE]"))
    );
    redis.kill();
    for _ in 0..2 {
        let response = post(&app, TOKEN, None, &request).await;
        assert_eq!(response.headers()["x-ensemble-cache"], "miss");
        assert_eq!(events(response).await.last(), Some(&json!("[DONE]")));
    }
    assert_eq!(fake.requests().len(), 3);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"ensemble_gateway_cache_total{alias="cached",outcome="store_error"}"#),
        "{metrics}"
    );

    // Back, the entry made before the outage (AOF kept it) is served again.
    redis.restart();
    let hit = testkit::eventually(std::time::Duration::from_secs(15), || async {
        let response = post(&app, TOKEN, None, &request).await;
        (response.headers()["x-ensemble-cache"] == "hit").then_some(response)
    })
    .await
    .expect("the cache did not recover after Redis came back");
    assert_eq!(events(hit).await.last(), Some(&json!("[DONE]")));
}

#[tokio::test]
async fn cache_ttl_needs_redis_and_a_sane_value() {
    let redis = RedisServer::start();
    let fake = FakeGemini::start().await;
    let mut config = cached_config(&fake, &redis);
    config.use_redis = false;
    let err = common::config::Settings::validate(&config)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("models.cached.cache_ttl_s") && err.contains("USE_REDIS"),
        "{err}"
    );
    for bad in [0, 31 * 86_400] {
        let mut config = cached_config(&fake, &redis);
        config.models.get_mut("cached").unwrap().cache_ttl_s = Some(bad);
        let err = common::config::Settings::validate(&config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("models.cached.cache_ttl_s"), "{err}");
    }
}

//! `Idempotency-Key` replay against a real redis-server, with the real Gemini provider code
//! over the fake Gemini, whose request log counts the provider calls.

use std::time::Duration;

use common::config::Secret;
use llm_gateway::Config;
use llm_gateway::config::{KeyConfig, ProviderKind};
use serde_json::{Value, json};
use testkit::RedisServer;
use testkit::fakes::gemini::{FakeGemini, GEMINI_KEY, Reply, chunk_json, error_json, reply_json};

use crate::helpers::{
    TOKEN, TestApp, ask, ask_stream, openai_error, spawn_app, sse_data, test_config,
};

/// The second key's token, in `[keys.x]`.
const X_TOKEN: &str = "x-key-token";

/// The gateway over `fake` with Redis at `redis`, and a second key `x`.
pub fn gemini_config(fake: &FakeGemini, redis: &RedisServer) -> Config {
    let mut config = test_config();
    config.llm_provider = ProviderKind::Gemini;
    config.llm_model = "gemini-2.5-flash".into();
    config.gemini_api_key = Secret::new(GEMINI_KEY);
    config.gemini_base_url = fake.url.clone();
    config.use_redis = true;
    config.redis = redis.settings();
    config.keys.insert(
        "x".into(),
        KeyConfig {
            token: Secret::new(X_TOKEN),
            ..KeyConfig::default()
        },
    );
    config
}

/// A chat completion with `token` and, when given, an `Idempotency-Key`.
pub async fn post(
    app: &TestApp,
    token: &str,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut request = app
        .http
        .post(format!("{}/v1/chat/completions", app.address))
        .bearer_auth(token)
        .json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.unwrap()
}

/// A streamed answer's `data:` payloads, with the per-answer `id` and `created` blanked so
/// two answers can be compared.
pub async fn events(response: reqwest::Response) -> Vec<Value> {
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    sse_data(&text)
        .iter()
        .map(|data| match serde_json::from_str::<Value>(data) {
            Ok(mut chunk) if chunk.is_object() => {
                chunk["id"] = json!("-");
                chunk["created"] = json!(0);
                chunk
            }
            _ => json!(data),
        })
        .collect()
}

/// A JSON answer with `id` and `created` blanked.
pub async fn body(response: reqwest::Response) -> Value {
    assert_eq!(response.status(), 200);
    let mut body: Value = response.json().await.unwrap();
    body["id"] = json!("-");
    body["created"] = json!(0);
    body
}

/// Posts until the answer is not `409`: a failed request's claim is freed just after its
/// answer went out. Bounded.
async fn post_after_release(app: &TestApp, key: &str, body: &Value) -> reqwest::Response {
    for _ in 0..50 {
        let response = post(app, TOKEN, Some(key), body).await;
        if response.status() != 409 {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the failed request's claim was never released");
}

#[tokio::test]
async fn a_keyed_answer_is_replayed_as_json_without_calling_the_provider() {
    let redis = RedisServer::start();
    let fake = FakeGemini::start().await;
    fake.push(Reply::Json(200, reply_json("Paris.", "STOP", 12, 3)));
    let app = spawn_app(gemini_config(&fake, &redis)).await;
    let request = ask("default", "Capital of France?");

    let first = post(&app, TOKEN, Some("step-1"), &request).await;
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = body(first).await;
    assert_eq!(first["choices"][0]["message"]["content"], "Paris.");

    let second = post(&app, TOKEN, Some("step-1"), &request).await;
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    assert_eq!(second.headers()["x-ensemble-provider"], "gemini");
    assert_eq!(second.headers()["x-ensemble-model"], "gemini-2.5-flash");
    assert_eq!(body(second).await, first);
    assert_eq!(fake.requests().len(), 1, "the replay called the provider");

    // The recorder is the process's, shared by every test: the series exist.
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"ensemble_gateway_replays_total{outcome="replayed"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ensemble_gateway_replays_total{outcome="recorded"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_streamed_answer_is_replayed_as_the_same_stream_and_as_json() {
    let redis = RedisServer::start();
    let fake = FakeGemini::start().await;
    // Text, then a tool call, as Gemini streams them.
    fake.push(Reply::Sse(vec![
        chunk_json("Let me ", None, None),
        json!({
            "candidates": [{"content": {"role": "model", "parts": [
                {"text": "check."},
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}
            ]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 4, "totalTokenCount": 13}
        }),
    ]));
    let app = spawn_app(gemini_config(&fake, &redis)).await;
    let mut request = ask_stream("default", "Weather in Paris?");
    request["tools"] = json!([{"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
    }}]);

    let live = events(post(&app, TOKEN, Some("step-2"), &request).await).await;
    assert_eq!(live.last(), Some(&json!("[DONE]")));
    let replayed = post(&app, TOKEN, Some("step-2"), &request).await;
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(replayed.headers()["content-type"], "text/event-stream");
    let replayed = events(replayed).await;
    // The live stream split the text in two deltas; the replay sends it whole. Everything
    // else (role chunk, tool-call start and arguments, finish with usage, [DONE]) matches.
    let merged = |chunks: &[Value]| -> (String, Vec<Value>) {
        let text = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        let rest = chunks
            .iter()
            .filter(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_none_or(str::is_empty)
            })
            .cloned()
            .collect();
        (text, rest)
    };
    assert_eq!(merged(&replayed), merged(&live));
    assert_eq!(merged(&live).0, "Let me check.");
    let finish = &live[live.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(finish["usage"]["total_tokens"], 13);

    // The same request without `stream` replays the same answer as JSON.
    request["stream"] = json!(false);
    let json_replay = post(&app, TOKEN, Some("step-2"), &request).await;
    assert_eq!(json_replay.headers()["idempotent-replayed"], "true");
    let json_replay = body(json_replay).await;
    let message = &json_replay["choices"][0]["message"];
    assert_eq!(message["content"], "Let me check.");
    assert_eq!(message["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(
        message["tool_calls"][0]["function"]["arguments"],
        r#"{"city":"Paris"}"#
    );
    assert_eq!(
        message["tool_calls"][0]["id"],
        live.iter()
            .find_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["id"].as_str())
            .unwrap()
    );
    assert_eq!(json_replay["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(fake.requests().len(), 1, "a replay called the provider");
}

#[tokio::test]
async fn a_json_answer_is_replayed_as_a_stream() {
    let redis = RedisServer::start();
    let fake = FakeGemini::start().await;
    fake.push(Reply::Json(200, reply_json("Paris.", "STOP", 12, 3)));
    let app = spawn_app(gemini_config(&fake, &redis)).await;
    let first = body(post(&app, TOKEN, Some("k"), &ask("default", "Capital?")).await).await;
    let streamed = post(&app, TOKEN, Some("k"), &ask_stream("default", "Capital?")).await;
    assert_eq!(streamed.headers()["idempotent-replayed"], "true");
    let chunks = events(streamed).await;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Paris.");
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[2]["usage"], first["usage"]);
    assert_eq!(chunks[3], json!("[DONE]"));
    assert_eq!(chunks.len(), 4);
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn the_same_key_with_another_request_is_422() {
    let redis = RedisServer::start();
    let fake = FakeGemini::start().await;
    let app = spawn_app(gemini_config(&fake, &redis)).await;
    assert_eq!(
        post(&app, TOKEN, Some("k"), &ask("default", "one"))
            .await
            .status(),
        200
    );
    let reused = post(&app, TOKEN, Some("k"), &ask("default", "two")).await;
    let error = openai_error(reused, 422).await;
    assert_eq!(error["error"]["code"], "idempotency_key_reused");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("different request"),
        "{error}"
    );
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_second_request_while_the_first_is_answered_is_409() {
    let redis = RedisServer::start();
    let fake = FakeGemini::start().await;
    let mut config = gemini_config(&fake, &redis);
    config.request_timeout_ms = 60_000;
    let app = spawn_app(config).await;
    let request = ask("default", "slow one");
    // The first answer is slow enough for the second request to be answered meanwhile
    // (the fake has the request before it waits: the claim is in place by then).
    fake.set_delay(Duration::from_secs(3));
    let first = {
        let (http, url) = (
            app.http.clone(),
            format!("{}/v1/chat/completions", app.address),
        );
        let request = request.clone();
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(TOKEN)
                .header("Idempotency-Key", "k")
                .json(&request)
                .send()
                .await
                .unwrap()
        })
    };
    testkit::eventually(Duration::from_secs(10), || async {
        (fake.requests().len() == 1).then_some(())
    })
    .await
    .expect("the first request never reached the provider");
    let second = post(&app, TOKEN, Some("k"), &request).await;
    assert_eq!(second.headers()["retry-after"], "1");
    let error = openai_error(second, 409).await;
    assert_eq!(error["error"]["code"], "idempotency_in_progress");
    assert_eq!(fake.requests().len(), 1);

    assert_eq!(first.await.unwrap().status(), 200);
    fake.set_delay(Duration::ZERO);
    let third = post(&app, TOKEN, Some("k"), &request).await;
    assert_eq!(third.headers()["idempotent-replayed"], "true");
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_failed_answer_is_not_recorded() {
    let redis = RedisServer::start();
    let fake = FakeGemini::start().await;
    let app = spawn_app(gemini_config(&fake, &redis)).await;

    // An upstream error (not retried: 400): the retry reaches the provider.
    fake.push(Reply::Json(
        400,
        error_json(400, "INVALID_ARGUMENT", "bad", vec![]),
    ));
    fake.push(Reply::Json(200, reply_json("second try", "STOP", 1, 2)));
    let request = ask("default", "hello");
    assert_eq!(post(&app, TOKEN, Some("k1"), &request).await.status(), 400);
    let retry = post_after_release(&app, "k1", &request).await;
    assert!(retry.headers().get("idempotent-replayed").is_none());
    assert_eq!(
        body(retry).await["choices"][0]["message"]["content"],
        "second try"
    );
    assert_eq!(fake.requests().len(), 2);

    // A stream cut midway: the same.
    fake.push(Reply::SseThenAbort(vec![chunk_json("half", None, None)]));
    let request = ask_stream("default", "hello again");
    let cut = post(&app, TOKEN, Some("k2"), &request).await;
    let cut = sse_data(&cut.text().await.unwrap());
    assert!(!cut.iter().any(|e| e == "[DONE]"), "{cut:?}");
    let retry = post_after_release(&app, "k2", &request).await;
    assert!(retry.headers().get("idempotent-replayed").is_none());
    let retry = events(retry).await;
    assert_eq!(retry.last(), Some(&json!("[DONE]")));
    assert_eq!(fake.requests().len(), 4);
}

#[tokio::test]
async fn the_keys_of_different_callers_do_not_collide() {
    let redis = RedisServer::start();
    let fake = FakeGemini::start().await;
    fake.push(Reply::Json(200, reply_json("for default", "STOP", 1, 1)));
    fake.push(Reply::Json(200, reply_json("for x", "STOP", 1, 1)));
    let app = spawn_app(gemini_config(&fake, &redis)).await;
    let (one, two) = (ask("default", "one"), ask("default", "two"));
    let mine = body(post(&app, TOKEN, Some("shared"), &one).await).await;
    // Another key, same Idempotency-Key, another body: its own record, not a 422.
    let theirs = body(post(&app, X_TOKEN, Some("shared"), &two).await).await;
    assert_eq!(theirs["choices"][0]["message"]["content"], "for x");
    assert_eq!(fake.requests().len(), 2);
    // Each replays its own.
    let again = post(&app, TOKEN, Some("shared"), &one).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(body(again).await, mine);
    let again = post(&app, X_TOKEN, Some("shared"), &two).await;
    assert_eq!(body(again).await, theirs);
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn redis_down_answers_503_for_keyed_requests_and_recovers() {
    let mut redis = RedisServer::with_aof();
    let fake = FakeGemini::start().await;
    let app = spawn_app(gemini_config(&fake, &redis)).await;
    let request = ask("default", "hello");
    redis.kill();

    let down = post(&app, TOKEN, Some("k"), &request).await;
    assert_eq!(down.headers()["retry-after"], "1");
    let error = openai_error(down, 503).await;
    assert_eq!(error["error"]["code"], "store_unavailable");
    assert_eq!(
        fake.requests().len(),
        0,
        "a keyed request reached the provider unchecked"
    );
    // Requests without a key do not need Redis.
    assert_eq!(post(&app, TOKEN, None, &request).await.status(), 200);
    assert_eq!(fake.requests().len(), 1);

    redis.restart();
    let response = testkit::eventually(Duration::from_secs(15), || async {
        let response = post(&app, TOKEN, Some("k"), &request).await;
        (response.status() == 200).then_some(response)
    })
    .await
    .expect("replay did not recover after Redis came back");
    assert!(response.headers().get("idempotent-replayed").is_none());
    let again = post(&app, TOKEN, Some("k"), &request).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
}

#[tokio::test]
async fn a_malformed_key_is_400_naming_the_header() {
    let redis = RedisServer::start();
    let fake = FakeGemini::start().await;
    let app = spawn_app(gemini_config(&fake, &redis)).await;
    let long = "k".repeat(256);
    for bad in ["", long.as_str(), "tab\there"] {
        let response = post(&app, TOKEN, Some(bad), &ask("default", "hi")).await;
        let error = openai_error(response, 400).await;
        assert_eq!(error["error"]["param"], "Idempotency-Key", "for {bad:?}");
    }
    let response = app
        .http
        .post(format!("{}/v1/chat/completions", app.address))
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", "caf\u{e9}".as_bytes())
        .json(&ask("default", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        openai_error(response, 400).await["error"]["param"],
        "Idempotency-Key"
    );
    assert_eq!(
        post(&app, TOKEN, Some(&"k".repeat(255)), &ask("default", "hi"))
            .await
            .status(),
        200
    );
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn without_redis_the_header_is_ignored() {
    let fake = FakeGemini::start().await;
    let redis = RedisServer::start();
    let mut config = gemini_config(&fake, &redis);
    config.use_redis = false;
    let app = spawn_app(config).await;
    for _ in 0..2 {
        let response = post(&app, TOKEN, Some("k"), &ask("default", "hi")).await;
        assert!(response.headers().get("idempotent-replayed").is_none());
        assert_eq!(response.status(), 200);
    }
    // Not even a malformed key is checked: the feature is off.
    assert_eq!(
        post(&app, TOKEN, Some(""), &ask("default", "hi"))
            .await
            .status(),
        200
    );
    assert_eq!(fake.requests().len(), 3);
}

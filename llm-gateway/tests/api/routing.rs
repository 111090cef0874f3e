//! Routing across providers: fallback chains, the concurrency cap, metrics.

use llm_gateway::config::ProviderKind;
use serde_json::Value;
use testkit::fakes::bedrock::{self as fake_bedrock, FakeBedrock};
use testkit::fakes::gemini::{self as fake_gemini, FakeGemini, GEMINI_KEY, error_json};

use crate::helpers::{ask, ask_stream, openai_error, spawn_app, test_config, usage, with_alias};

async fn chain() -> (FakeGemini, FakeBedrock, crate::helpers::TestApp) {
    let gemini = FakeGemini::start().await;
    let bedrock = FakeBedrock::start().await;
    let mut config = with_alias(
        test_config(),
        "resilient",
        &[
            (ProviderKind::Gemini, "gemini-2.5-flash"),
            (
                ProviderKind::Bedrock,
                "anthropic.claude-3-5-haiku-20241022-v1:0",
            ),
            (ProviderKind::Mock, "mock-1"),
        ],
    );
    config.gemini_api_key = common::config::Secret::new(GEMINI_KEY);
    config.gemini_base_url = gemini.url.clone();
    config.bedrock_endpoint_url = Some(bedrock.url.clone());
    config.max_retries = 1;
    let app = spawn_app(config).await;
    (gemini, bedrock, app)
}

#[tokio::test]
async fn repeated_503s_fall_back_from_gemini_to_bedrock_to_mock() {
    let (gemini, bedrock, app) = chain().await;
    gemini.always(fake_gemini::Reply::Json(
        503,
        error_json(503, "UNAVAILABLE", "overloaded", vec![]),
    ));
    bedrock.always(fake_bedrock::Reply::Error(
        503,
        "ServiceUnavailableException",
        "unavailable",
    ));

    let response = app.chat(ask("resilient", "are you there?")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ensemble-provider"], "mock");
    let body: Value = response.json().await.unwrap();
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("are you there?"), "{content}");
    assert_eq!(gemini.requests().len(), 2, "one try and one retry");
    assert_eq!(bedrock.requests().len(), 2, "one try and one retry");

    let metrics = app.metrics().await;
    assert!(
        metrics.contains("ensemble_gateway_fallbacks_total{provider=\"mock\""),
        "{metrics}"
    );
    assert!(metrics.contains("ensemble_gateway_errors_total{provider=\"gemini\""));
}

#[tokio::test]
async fn streams_fall_back_too_before_the_first_byte() {
    let (gemini, bedrock, app) = chain().await;
    gemini.always(fake_gemini::Reply::Json(
        503,
        error_json(503, "UNAVAILABLE", "overloaded", vec![]),
    ));
    bedrock.always(fake_bedrock::Reply::Stream(fake_bedrock::stream_frames(
        &["from ", "bedrock"],
        "end_turn",
        2,
        2,
    )));
    let reply = app.chat_stream(ask_stream("resilient", "hi")).await;
    assert_eq!(reply.headers["x-ensemble-provider"], "bedrock");
    assert_eq!(reply.content(), "from bedrock");
    reply.assert_finished("stop", usage(2, 2));
}

#[tokio::test]
async fn every_target_failing_answers_the_last_failure() {
    let mut config = with_alias(
        test_config(),
        "fragile",
        &[(ProviderKind::Mock, "a"), (ProviderKind::Mock, "b")],
    );
    config.max_retries = 1;
    let app = spawn_app(config).await;
    let response = app.chat(ask("fragile", "[mock:fail=503] hello")).await;
    assert!(response.headers().contains_key("retry-after"));
    let body = openai_error(response, 503).await;
    assert_eq!(body["error"]["code"], "upstream_unavailable");
}

#[tokio::test]
async fn excess_concurrent_requests_wait_then_get_429() {
    let mut config = test_config();
    config.max_concurrency_per_provider = 1;
    config.queue_timeout_ms = 50;
    config.mock_latency_ms = 1_000;
    let app = spawn_app(config).await;

    // Whichever takes the only slot holds it for a second; the other waits 50 ms, then
    // gets 429.
    let (a, b) = tokio::join!(
        app.chat(ask("default", "one")),
        app.chat(ask("default", "two"))
    );
    let (ok, refused) = if a.status() == 200 { (a, b) } else { (b, a) };
    assert_eq!(ok.status(), 200);
    let body = openai_error(refused, 429).await;
    assert_eq!(body["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn metrics_cover_requests_tokens_latency_and_overhead() {
    let app = spawn_app(test_config()).await;
    assert_eq!(
        app.chat(ask("default", "count my tokens")).await.status(),
        200
    );
    app.chat_stream(ask_stream("default", "stream it"))
        .await
        .assert_finished("stop", usage(3, 18));

    let metrics = app.metrics().await;
    for series in [
        "ensemble_gateway_requests_total{provider=\"mock\",model=\"mock-1\",outcome=\"ok\",endpoint=\"chat\"}",
        "ensemble_gateway_tokens_total{provider=\"mock\",model=\"mock-1\",direction=\"in\",endpoint=\"chat\"}",
        "ensemble_gateway_tokens_total{provider=\"mock\",model=\"mock-1\",direction=\"out\",endpoint=\"chat\"}",
        "ensemble_gateway_request_duration_seconds_bucket{provider=\"mock\",model=\"mock-1\"",
        "ensemble_gateway_upstream_duration_seconds_bucket{provider=\"mock\",model=\"mock-1\"",
        "ensemble_gateway_overhead_seconds_bucket{mode=\"unary\"",
        "ensemble_gateway_overhead_seconds_bucket{mode=\"stream\"",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
}

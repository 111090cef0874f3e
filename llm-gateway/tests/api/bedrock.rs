//! The real Bedrock provider, through the AWS SDK, against the fake Bedrock runtime.

use llm_gateway::config::ProviderKind;
use serde_json::{Value, json};
use testkit::fakes::bedrock::{FakeBedrock, Frame, Reply, converse_json, stream_frames};

use crate::helpers::{TestApp, ask, ask_stream, spawn_app, test_config, usage, with_alias};

const MODEL: &str = "anthropic.claude-3-5-haiku-20241022-v1:0";

async fn gateway_over(fake: &FakeBedrock) -> TestApp {
    let mut config = test_config();
    config.llm_provider = ProviderKind::Bedrock;
    config.llm_model = MODEL.into();
    config.bedrock_endpoint_url = Some(fake.url.clone());
    spawn_app(config).await
}

#[tokio::test]
async fn converse_requests_are_signed_and_replies_mapped() {
    let fake = FakeBedrock::start().await;
    fake.push(Reply::Converse(converse_json(
        "Bonjour.", "end_turn", 11, 2,
    )));
    let app = gateway_over(&fake).await;

    let response = app
        .chat(json!({
            "model": "default",
            "messages": [
                {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "Hello"}
            ],
            "temperature": 0.3,
            "max_tokens": 50,
            "stop": "###"
        }))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ensemble-provider"], "bedrock");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Bonjour.");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"], usage(11, 2));

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(
        sent.path,
        "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse"
    );
    assert!(
        sent.authorization
            .contains("/us-east-1/bedrock/aws4_request"),
        "{}",
        sent.authorization
    );
    assert_eq!(sent.body["system"], json!([{"text": "Answer in French."}]));
    assert_eq!(
        sent.body["messages"],
        json!([{"role": "user", "content": [{"text": "Hello"}]}])
    );
    assert_eq!(sent.body["inferenceConfig"]["maxTokens"], 50);
    assert_eq!(
        sent.body["inferenceConfig"]["stopSequences"],
        json!(["###"])
    );
    let temperature = sent.body["inferenceConfig"]["temperature"]
        .as_f64()
        .unwrap();
    assert!((temperature - 0.3).abs() < 1e-6);
}

#[tokio::test]
async fn max_tokens_stop_reason_maps_to_length() {
    let fake = FakeBedrock::start().await;
    fake.push(Reply::Converse(converse_json("Once", "max_tokens", 3, 1)));
    let app = gateway_over(&fake).await;
    let body = app.chat_json(ask("default", "story")).await;
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn converse_stream_event_frames_become_openai_chunks() {
    let fake = FakeBedrock::start().await;
    fake.push(Reply::Stream(stream_frames(
        &["Bon", "jour", " !"],
        "end_turn",
        6,
        3,
    )));
    let app = gateway_over(&fake).await;

    let reply = app.chat_stream(ask_stream("default", "Hello")).await;
    assert_eq!(reply.content(), "Bonjour !");
    reply.assert_finished("stop", usage(6, 3));
    assert!(fake.requests()[0].path.ends_with("/converse-stream"));
}

#[tokio::test]
async fn an_exception_mid_stream_ends_the_stream_with_an_error_event() {
    let fake = FakeBedrock::start().await;
    let mut frames = stream_frames(&["Bon"], "end_turn", 1, 1);
    frames.truncate(2);
    frames.push(Frame::Exception(
        "modelStreamErrorException",
        json!({"message": "the model broke"}),
    ));
    fake.push(Reply::Stream(frames));
    let app = gateway_over(&fake).await;

    let reply = app.chat_stream(ask_stream("default", "Hello")).await;
    assert_eq!(reply.content(), "Bon");
    reply.assert_failed();
}

#[tokio::test]
async fn throttling_is_retried_then_falls_back() {
    let fake = FakeBedrock::start().await;
    fake.always(Reply::Error(
        429,
        "ThrottlingException",
        "Too many requests",
    ));
    let config = with_alias(
        test_config(),
        "smart",
        &[
            (ProviderKind::Bedrock, MODEL),
            (ProviderKind::Mock, "mock-1"),
        ],
    );
    let mut config = config;
    config.bedrock_endpoint_url = Some(fake.url.clone());
    config.max_retries = 2;
    let app = spawn_app(config).await;

    let response = app.chat(ask("smart", "hi")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ensemble-provider"], "mock");
    // One try and two retries; the SDK's own retries are off.
    assert_eq!(fake.requests().len(), 3);
}

#[tokio::test]
async fn throttling_then_success_stays_on_bedrock() {
    let fake = FakeBedrock::start().await;
    fake.push(Reply::Error(429, "ThrottlingException", "slow down"))
        .push(Reply::Error(503, "ServiceUnavailableException", "busy"))
        .push(Reply::Converse(converse_json("ok", "end_turn", 1, 1)));
    let app = gateway_over(&fake).await;
    let response = app.chat(ask("default", "hi")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ensemble-provider"], "bedrock");
    assert_eq!(fake.requests().len(), 3);
}

#[tokio::test]
async fn validation_errors_are_the_clients() {
    let fake = FakeBedrock::start().await;
    fake.always(Reply::Error(
        400,
        "ValidationException",
        "maxTokens too large",
    ));
    let app = gateway_over(&fake).await;
    let response = app.chat(ask("default", "hi")).await;
    let body = crate::helpers::openai_error(response, 400).await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maxTokens"),
        "{body}"
    );
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn requests_signed_with_another_secret_are_refused() {
    let fake = FakeBedrock::start().await;
    let mut config = test_config();
    config.llm_provider = ProviderKind::Bedrock;
    config.llm_model = MODEL.into();
    config.bedrock_endpoint_url = Some(fake.url.clone());
    let app = crate::helpers::spawn_app_with_aws_secret(config, "not-the-secret").await;
    let body = crate::helpers::openai_error(app.chat(ask("default", "hi")).await, 502).await;
    assert_eq!(body["error"]["code"], "upstream_error");
    assert_eq!(
        fake.requests().len(),
        1,
        "a refused signature is not retried"
    );
}

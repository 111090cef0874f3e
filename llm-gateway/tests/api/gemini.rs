//! The real Gemini provider against the fake Gemini server.

use std::time::Duration;

use llm_gateway::config::ProviderKind;
use serde_json::{Value, json};
use testkit::fakes::gemini::{FakeGemini, GEMINI_KEY, Reply, chunk_json, error_json, reply_json};

use crate::helpers::{TestApp, ask, ask_stream, openai_error, spawn_app, test_config, usage};

async fn gateway_over(fake: &FakeGemini) -> TestApp {
    let mut config = test_config();
    config.llm_provider = ProviderKind::Gemini;
    config.llm_model = "gemini-2.5-flash".into();
    config.gemini_api_key = common::config::Secret::new(GEMINI_KEY);
    config.gemini_base_url = fake.url.clone();
    spawn_app(config).await
}

#[tokio::test]
async fn requests_are_sent_as_google_documents_and_replies_mapped() {
    let fake = FakeGemini::start().await;
    fake.push(Reply::Json(200, reply_json("Paris.", "STOP", 12, 3)));
    let app = gateway_over(&fake).await;

    let response = app
        .chat(json!({
            "model": "default",
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Which France?"},
                {"role": "user", "content": [{"type": "text", "text": "The country."}]}
            ],
            "temperature": 0.2,
            "top_p": 0.9,
            "max_tokens": 64,
            "stop": ["END"],
            "response_format": {"type": "json_object"}
        }))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ensemble-provider"], "gemini");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "default");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "Paris.");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"], usage(12, 3));

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(sent.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(sent.query, None, "the key must never be in the URL");
    assert_eq!(sent.api_key.as_deref(), Some(GEMINI_KEY));
    assert_eq!(
        sent.body,
        json!({
            "contents": [
                {"role": "user", "parts": [{"text": "Capital of France?"}]},
                {"role": "model", "parts": [{"text": "Which France?"}]},
                {"role": "user", "parts": [{"text": "The country."}]}
            ],
            "systemInstruction": {"parts": [{"text": "Answer briefly."}]},
            "generationConfig": {
                "temperature": 0.2,
                "topP": 0.9,
                "maxOutputTokens": 64,
                "stopSequences": ["END"],
                "responseMimeType": "application/json"
            }
        })
    );
}

#[tokio::test]
async fn max_tokens_maps_to_length() {
    let fake = FakeGemini::start().await;
    fake.push(Reply::Json(
        200,
        reply_json("Once upon", "MAX_TOKENS", 4, 2),
    ));
    let app = gateway_over(&fake).await;
    let body = app.chat_json(ask("default", "story")).await;
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn streams_are_relayed_as_openai_chunks_with_the_last_usage() {
    let fake = FakeGemini::start().await;
    fake.push(Reply::Sse(vec![
        chunk_json("Hello", None, Some((5, 1))),
        chunk_json(", wor", None, Some((5, 3))),
        chunk_json("ld!", Some("STOP"), Some((5, 4))),
    ]));
    let app = gateway_over(&fake).await;

    let reply = app.chat_stream(ask_stream("default", "greet")).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(reply.content(), "Hello, world!");
    reply.assert_finished("stop", usage(5, 4));

    let sent = &fake.requests()[0];
    assert_eq!(
        sent.path,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    );
    assert_eq!(sent.query.as_deref(), Some("alt=sse"));
    assert_eq!(sent.api_key.as_deref(), Some(GEMINI_KEY));
}

#[tokio::test]
async fn a_429_is_retried_after_google_retry_delay() {
    let fake = FakeGemini::start().await;
    let retry_info = json!({
        "@type": "type.googleapis.com/google.rpc.RetryInfo",
        "retryDelay": "0.300s"
    });
    fake.push(Reply::Json(
        429,
        error_json(
            429,
            "RESOURCE_EXHAUSTED",
            "quota exceeded",
            vec![retry_info],
        ),
    ))
    .push(Reply::Json(200, reply_json("after the wait", "STOP", 1, 3)));
    let app = gateway_over(&fake).await;

    let body = app.chat_json(ask("default", "hi")).await;
    assert_eq!(body["choices"][0]["message"]["content"], "after the wait");
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    // The gateway's own backoff is 5 ms here; only retryDelay explains a longer gap.
    let gap = requests[1].at - requests[0].at;
    assert!(gap >= Duration::from_millis(300), "retried after {gap:?}");
}

#[tokio::test]
async fn a_400_is_the_clients_error_and_is_not_retried() {
    let fake = FakeGemini::start().await;
    fake.always(Reply::Json(
        400,
        error_json(
            400,
            "INVALID_ARGUMENT",
            "The input token count exceeds the maximum",
            vec![],
        ),
    ));
    let app = gateway_over(&fake).await;

    let body = openai_error(app.chat(ask("default", "too long")).await, 400).await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("exceeds the maximum"), "{body}");
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_bad_key_is_an_upstream_error_not_a_client_one() {
    let fake = FakeGemini::start().await;
    let app = {
        let mut config = test_config();
        config.llm_provider = ProviderKind::Gemini;
        config.gemini_api_key = common::config::Secret::new("wrong-key");
        config.gemini_base_url = fake.url.clone();
        spawn_app(config).await
    };
    let body = openai_error(app.chat(ask("default", "hi")).await, 502).await;
    assert!(
        !body.to_string().contains("wrong-key"),
        "the key leaked: {body}"
    );
    assert_eq!(fake.requests().len(), 1, "auth failures are not retried");
}

#[tokio::test]
async fn an_error_mid_stream_ends_the_stream_with_an_error_event() {
    let fake = FakeGemini::start().await;
    fake.push(Reply::Sse(vec![
        chunk_json("Partial", None, None),
        error_json(503, "UNAVAILABLE", "The model is overloaded", vec![]),
    ]));
    let app = gateway_over(&fake).await;

    let reply = app.chat_stream(ask_stream("default", "go")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.content(), "Partial");
    let error = reply.assert_failed();
    assert_eq!(error["error"]["code"], "upstream_unavailable", "{error}");
    assert_eq!(fake.requests().len(), 1, "no fallback once bytes went out");
}

#[tokio::test]
async fn a_broken_connection_mid_stream_ends_the_stream_with_an_error_event() {
    let fake = FakeGemini::start().await;
    fake.push(Reply::SseThenAbort(vec![chunk_json("Half", None, None)]));
    let app = gateway_over(&fake).await;

    let reply = app.chat_stream(ask_stream("default", "go")).await;
    assert_eq!(reply.content(), "Half");
    reply.assert_failed();
}

#[tokio::test]
async fn an_error_before_the_first_chunk_is_retried() {
    let fake = FakeGemini::start().await;
    fake.push(Reply::Sse(vec![error_json(
        503,
        "UNAVAILABLE",
        "overloaded",
        vec![],
    )]))
    .push(Reply::Sse(vec![chunk_json(
        "fine",
        Some("STOP"),
        Some((1, 1)),
    )]));
    let app = gateway_over(&fake).await;

    let reply = app.chat_stream(ask_stream("default", "go")).await;
    assert_eq!(reply.content(), "fine");
    reply.assert_finished("stop", usage(1, 1));
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn a_hanging_upstream_times_out() {
    let fake = FakeGemini::start().await;
    fake.always(Reply::Hang(Duration::from_secs(30)));
    let mut config = test_config();
    config.llm_provider = ProviderKind::Gemini;
    config.gemini_api_key = common::config::Secret::new(GEMINI_KEY);
    config.gemini_base_url = fake.url.clone();
    config.request_timeout_ms = 200;
    config.max_retries = 1;
    let app = spawn_app(config).await;

    openai_error(app.chat(ask("default", "hello?")).await, 504).await;
    assert_eq!(fake.requests().len(), 2, "one try and one retry");
}

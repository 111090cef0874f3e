//! A fake llm-gateway for the worker's tests: `POST /v1/chat/completions` in OpenAI's
//! shape, recorded with its headers, answered from a script (by default [`completion`]),
//! optionally slowly. The real gateway's mock provider cannot fail on cue or show what the
//! worker sent, which these tests need.
//!
//! A request with `"stream": true` is answered as the gateway streams: a `2xx` completion
//! becomes `chat.completion.chunk` events (the role, the text word by word, the finish with
//! `usage`) and `data: [DONE]`; a scripted JSON *array* is sent as the events' data, one
//! element each (a string as it is, anything else as JSON), so a test can send an error
//! event or break a stream off. Other statuses answer JSON, as the gateway does before a
//! stream begins.

use axum::Json;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::time::Duration;

use super::server::{Fake, Received, wait_for};

/// One call the fake gateway received.
pub type GatewayCall = Received<Value>;

/// The running fake gateway.
pub struct FakeGateway(Fake<(StatusCode, Value), GatewayCall>);

/// The completion the fake gateway answers with by default.
pub fn completion(text: &str) -> Value {
    json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "mock-model-1",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    })
}

/// One `chat.completion.chunk` carrying `text`, as the gateway streams a piece of an answer.
pub fn chunk(text: &str) -> Value {
    json!({
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "mock-model-1",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]
    })
}

/// The events' data of a streamed answer: a scripted array as it is, a completion as the
/// gateway would stream it.
fn stream_data(body: &Value) -> Vec<String> {
    if let Value::Array(events) = body {
        return events
            .iter()
            .map(|e| e.as_str().map_or_else(|| e.to_string(), String::from))
            .collect();
    }
    let model = body["model"].clone();
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    let finish = body["choices"][0]["finish_reason"].clone();
    let with = |delta: Value, finish: Value, usage: Option<&Value>| {
        let mut chunk = json!({
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage.clone();
        }
        chunk.to_string()
    };
    let mut data = vec![with(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
        None,
    )];
    data.extend(
        text.split_inclusive(' ')
            .map(|word| with(json!({ "content": word }), Value::Null, None)),
    );
    data.push(with(json!({}), finish, body.get("usage")));
    data.push("[DONE]".into());
    data
}

fn event_stream(status: StatusCode, body: &Value) -> Response {
    let text: String = stream_data(body)
        .iter()
        .map(|data| format!("data: {data}\n\n"))
        .collect();
    (status, [(header::CONTENT_TYPE, "text/event-stream")], text).into_response()
}

impl FakeGateway {
    pub async fn start() -> Self {
        Self(
            Fake::serve(0, "", |script, method, uri, headers, body| async move {
                if method != Method::POST || uri.path() != "/v1/chat/completions" {
                    return StatusCode::NOT_FOUND.into_response();
                }
                let Ok(body) = serde_json::from_slice::<Value>(&body) else {
                    return StatusCode::BAD_REQUEST.into_response();
                };
                let stream = body["stream"] == true;
                script.record(Received::new(&headers, body));
                let (status, body) = script
                    .next()
                    .unwrap_or_else(|| (StatusCode::OK, completion("mock answer")));
                if stream && status.is_success() {
                    return event_stream(status, &body);
                }
                (status, Json(body)).into_response()
            })
            .await
            .expect("bind a free loopback port"),
        )
    }

    pub fn url(&self) -> String {
        self.0.url.clone()
    }

    /// Answers the next calls with these statuses and bodies, then the default completion.
    pub fn script(&self, answers: impl IntoIterator<Item = (StatusCode, Value)>) {
        for answer in answers {
            self.0.push(answer);
        }
    }

    /// Makes every answer take this long.
    pub fn set_delay(&self, delay: Duration) {
        self.0.set_delay(delay);
    }

    pub fn calls(&self) -> Vec<GatewayCall> {
        self.0.requests()
    }

    /// Waits for `n` calls.
    pub async fn wait_for_calls(&self, n: usize) -> Vec<GatewayCall> {
        wait_for(
            n,
            || self.calls(),
            |seen| format!("gateway calls, got {seen:?}"),
        )
        .await
    }
}

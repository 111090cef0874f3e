//! A fake llm-gateway for the worker's tests: `POST /v1/chat/completions` in OpenAI's
//! shape, recorded with its headers, answered from a script (by default [`completion`]),
//! optionally slowly. The real gateway's mock provider cannot fail on cue or show what the
//! worker sent, which these tests need.

use axum::Json;
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
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
                script.record(Received::new(&headers, body));
                let (status, body) = script
                    .next()
                    .unwrap_or_else(|| (StatusCode::OK, completion("mock answer")));
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

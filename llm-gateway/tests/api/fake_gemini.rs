//! A local fake of Google's Generative Language API: it records every request, checks it
//! the way Google documents it (path, `x-goog-api-key` header, no key in the URL), and
//! answers scripted replies in Google's JSON and SSE formats.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::fake::{Fake, Script};

pub const GEMINI_KEY: &str = "fake-gemini-key";

/// One scripted answer.
#[derive(Clone)]
pub enum Reply {
    /// A JSON body with a status.
    Json(u16, Value),
    /// SSE events (`data: {json}\r\n\r\n` each).
    Sse(Vec<Value>),
    /// SSE events, then the connection breaks.
    SseThenAbort(Vec<Value>),
    /// No answer for this long.
    Hang(Duration),
}

/// A request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    pub query: Option<String>,
    pub api_key: Option<String>,
    pub content_type: Option<String>,
    pub body: Value,
    pub at: Instant,
}

/// The running fake; `url` is what `GEMINI_BASE_URL` should be.
pub type FakeGemini = Fake<Reply, Recorded>;

impl FakeGemini {
    pub async fn start() -> Self {
        Fake::serve("/v1beta", |script, method, uri, headers, body| async move {
            handle(&script, method, uri, headers, body).await
        })
        .await
    }
}

async fn handle(
    script: &Script<Reply, Recorded>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let recorded = Recorded {
        path: uri.path().to_string(),
        query: uri.query().map(String::from),
        api_key: header("x-goog-api-key"),
        content_type: header("content-type"),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at: Instant::now(),
    };
    script.record(recorded.clone());

    // What Google requires; anything else is answered as Google would.
    if recorded.api_key.as_deref() != Some(GEMINI_KEY) {
        return google_error(
            403,
            "PERMISSION_DENIED",
            "missing or wrong x-goog-api-key",
            vec![],
        );
    }
    if recorded
        .query
        .as_deref()
        .is_some_and(|q| q.contains("key="))
    {
        return google_error(
            400,
            "INVALID_ARGUMENT",
            "key must not be in the URL",
            vec![],
        );
    }
    let streaming = recorded.path.ends_with(":streamGenerateContent");
    let well_formed = method == Method::POST
        && recorded.path.starts_with("/v1beta/models/")
        && (recorded.path.ends_with(":generateContent") || streaming)
        && (!streaming || recorded.query.as_deref() == Some("alt=sse"))
        && recorded.content_type.as_deref() == Some("application/json")
        && recorded.body["contents"].is_array();
    if !well_formed {
        return google_error(404, "NOT_FOUND", "not a generateContent request", vec![]);
    }

    let reply = script.next().unwrap_or_else(|| match streaming {
        true => Reply::Sse(vec![chunk_json(
            "default reply",
            Some("STOP"),
            Some((1, 2)),
        )]),
        false => Reply::Json(200, reply_json("default reply", "STOP", 1, 2)),
    });
    match reply {
        Reply::Json(status, body) => (
            StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/json; charset=UTF-8")],
            body.to_string(),
        )
            .into_response(),
        Reply::Sse(events) => sse_response(events, false),
        Reply::SseThenAbort(events) => sse_response(events, true),
        Reply::Hang(time) => {
            tokio::time::sleep(time).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
    }
}

fn sse_response(events: Vec<Value>, abort: bool) -> Response {
    let mut items: Vec<Result<Bytes, std::io::Error>> = events
        .into_iter()
        .map(|e| Ok(Bytes::from(format!("data: {e}\r\n\r\n"))))
        .collect();
    if abort {
        items.push(Err(std::io::Error::other("connection reset")));
    }
    // A pause before each item lets what came before reach the client first.
    let body = Body::from_stream(futures::stream::iter(items).then(|item| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        item
    }));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

/// Google's error answer.
pub fn google_error(code: u16, status: &str, message: &str, details: Vec<Value>) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json; charset=UTF-8")],
        error_json(code, status, message, details).to_string(),
    )
        .into_response()
}

/// `{"error": {"code", "message", "status", "details"}}`.
pub fn error_json(code: u16, status: &str, message: &str, details: Vec<Value>) -> Value {
    json!({"error": {"code": code, "message": message, "status": status, "details": details}})
}

/// A `GenerateContentResponse` with one candidate.
pub fn reply_json(text: &str, finish: &str, prompt_tokens: u32, output_tokens: u32) -> Value {
    json!({
        "candidates": [{
            "content": {"parts": [{"text": text}], "role": "model"},
            "finishReason": finish,
            "index": 0
        }],
        "usageMetadata": {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": prompt_tokens + output_tokens
        },
        "modelVersion": "gemini-2.5-flash",
        "responseId": "fake-response"
    })
}

/// A streamed chunk: text, optionally a finish reason and usage (Google sends running
/// usage on chunks; the last one is the total).
pub fn chunk_json(text: &str, finish: Option<&str>, usage: Option<(u32, u32)>) -> Value {
    let mut candidate =
        json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
    if let Some(finish) = finish {
        candidate["finishReason"] = json!(finish);
    }
    let mut chunk = json!({"candidates": [candidate], "modelVersion": "gemini-2.5-flash"});
    if let Some((p, o)) = usage {
        chunk["usageMetadata"] =
            json!({"promptTokenCount": p, "candidatesTokenCount": o, "totalTokenCount": p + o});
    }
    chunk
}

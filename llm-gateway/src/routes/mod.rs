//! Thin HTTP handlers: parse, call the router, shape the answer in OpenAI's format.

pub mod chat;
pub mod embeddings;
pub mod models;
pub mod usage;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tracing::Span;
use tracing::field::Empty;

use crate::error::GatewayError;
use crate::routing::Served;

/// Which provider answered (the body's `model` is the alias the caller asked for).
static PROVIDER_HEADER: HeaderName = HeaderName::from_static("x-ensemble-provider");
/// Which provider model answered.
static MODEL_HEADER: HeaderName = HeaderName::from_static("x-ensemble-model");

/// The span of one model call (`endpoint`: `chat` or `embeddings`), when traces are
/// exported: the provider clients send its `traceparent` upstream. It carries the task and
/// step the caller named (`x-ensemble-task-id`, `x-ensemble-step`, `x-ensemble-step-id`),
/// the alias, and once answered the provider and model; never the prompt or the answer.
fn model_call_span(headers: &HeaderMap, alias: &str, endpoint: &'static str) -> Span {
    if !common::traces::enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "model.call",
        endpoint,
        alias,
        task_id = Empty,
        step = Empty,
        step_id = Empty,
        provider = Empty,
        model = Empty,
        otel.kind = "client",
    );
    for (field, header) in [
        ("task_id", common::usage::TASK_ID_HEADER),
        ("step", common::usage::STEP_HEADER),
        ("step_id", common::usage::STEP_ID_HEADER),
    ] {
        // Bounded: these are ids, and a caller's header is no reason for a large span.
        if let Some(value) = headers.get(header).and_then(|v| v.to_str().ok())
            && value.len() <= 256
        {
            span.record(field, value);
        }
    }
    span
}

/// Records on a [`model_call_span`] who answered.
fn record_served(span: &Span, served: &Served) {
    if !span.is_disabled() {
        span.record("provider", served.provider.as_str());
        span.record("model", &*served.model);
    }
}

/// Parses a JSON body: over the limit is `413`, a syntax error `400 invalid_json`, a wrong
/// field `400` naming it.
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, GatewayError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            GatewayError::PayloadTooLarge
        } else {
            GatewayError::InvalidJson(e.body_text())
        }
    })?;
    // The happy path parses without tracking the path (it costs on every value); only a
    // body that fails is parsed again, with the path, to name the field in the error.
    if let Ok(request) = serde_json::from_slice(&body) {
        return Ok(request);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(&body);
    let request: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            GatewayError::InvalidJson(inner.to_string())
        } else if path == "." {
            GatewayError::InvalidRequest {
                message: format!("invalid request body: {inner}"),
                param: None,
            }
        } else {
            GatewayError::InvalidRequest {
                message: format!("invalid `{path}`: {inner}"),
                param: Some(path),
            }
        }
    })?;
    deserializer
        .end()
        .map_err(|e| GatewayError::InvalidJson(e.to_string()))?;
    Ok(request)
}

/// A handler's answer: its response, or its error in OpenAI's shape. Errors the gateway
/// refused itself are counted as rejected; an upstream's are counted where they happened.
fn respond(result: Result<Response, GatewayError>) -> Response {
    match result {
        Ok(response) => response,
        Err(error) => {
            if !matches!(error, GatewayError::Upstream(_)) {
                crate::metrics::rejected(error.kind_label());
            }
            error.into_response()
        }
    }
}

/// `x-ensemble-provider` and `x-ensemble-model`: who actually answered.
fn served_headers(response: &mut Response, served: &Served) {
    let headers = response.headers_mut();
    headers.insert(
        PROVIDER_HEADER.clone(),
        HeaderValue::from_static(served.provider.as_str()),
    );
    if let Ok(model) = HeaderValue::from_str(&served.model) {
        headers.insert(MODEL_HEADER.clone(), model);
    }
}

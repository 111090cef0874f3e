//! HTTP pieces every service shares: the JSON error body of DESIGN.md §3, a JSON extractor
//! that answers bad input with that body, `/health` + `/ready` + `/metrics`, body limits,
//! serving with graceful shutdown, and outgoing HTTP client defaults.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::redis::{NotReady, RedisPool};

/// The default request body limit (1 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// `{"error": {"code", "message"}}`: every error any service answers.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    /// A stable, machine-readable code. Every service: `invalid_json`, `bad_request`,
    /// `unauthorized`, `forbidden`, `not_found`, `method_not_allowed`, `payload_too_large`,
    /// `unsupported_media_type`, `invalid`, `unavailable`, `internal`. The master also:
    /// `conflict`, `rate_limited`, `too_many_concurrent`, `overloaded`, `storage_full`,
    /// `csrf` (a dashboard change without the session's CSRF token). A
    /// worker's `POST /work` also: `capability_not_served`, `misdirected`, `at_capacity`,
    /// `draining`, `degraded`, `agent_unavailable`. A client should treat an unknown code by its HTTP status.
    pub code: String,
    /// What was wrong, for a person.
    pub message: String,
}

/// An error answer: status, code, message and an optional `Retry-After` in seconds.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
    /// Seconds for `Retry-After`, for `429` and `503`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Adds `Retry-After`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// `400`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// `401`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// `403`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// `404`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// `422`: well-formed but invalid; the message names the field.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }

    /// `503` with `Retry-After`: a dependency is down; the client should retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(1)
    }

    /// `507 storage_full`: Redis is at `maxmemory` and refuses writes. No `Retry-After`:
    /// retrying does not help until an operator frees memory or raises `maxmemory`.
    pub fn storage_full() -> Self {
        Self::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "storage_full",
            crate::redis::STORAGE_FULL_MESSAGE,
        )
    }

    /// `500`: the message goes to the log, the client sees a generic one.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the service log",
        )
    }
}

impl From<crate::redis::Unavailable> for ApiError {
    fn from(e: crate::redis::Unavailable) -> Self {
        tracing::warn!(error = %e.message, during = "request", "{}", crate::redis::UNAVAILABLE_LOG);
        Self::unavailable("storage is unavailable; retry shortly")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

/// A JSON body extractor whose rejections are [`ApiError`]s: `400` for malformed JSON,
/// `422` for wrong types or missing fields (naming the field), `415` for a wrong content
/// type, `413` for a body over the limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// Maps axum's JSON rejection onto the error body.
pub fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => {
            // "Failed to deserialize the JSON body into the target type: steps: invalid type…"
            let detail = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.body_text());
            ApiError::invalid(format!("invalid request body: {detail}"))
        }
        JsonRejection::JsonSyntaxError(e) => {
            let detail = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.body_text());
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("malformed JSON: {detail}"),
            )
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected `Content-Type: application/json`",
        ),
        JsonRejection::BytesRejection(e) => body_error(e),
        other => ApiError::bad_request(other.body_text()),
    }
}

/// Maps a body-read failure (for handlers that take raw bytes) onto the error body.
pub fn body_error(e: axum::extract::rejection::BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body is larger than the limit",
        )
    } else {
        ApiError::bad_request(e.body_text())
    }
}

/// What `/ready` checks: `Err` answers `503` with the reason code and message.
pub type ReadyCheck =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<(), NotReady>> + Send + Sync>;

/// A readiness check that Redis can take writes ([`RedisPool::check_writable`]): reachable,
/// the primary, not full.
pub fn redis_ready(pool: RedisPool) -> ReadyCheck {
    Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move { pool.check_writable().await })
    })
}

/// A readiness check that always passes (a service without dependencies).
pub fn always_ready() -> ReadyCheck {
    Arc::new(|| Box::pin(async { Ok(()) }))
}

/// `GET /health` (liveness), `GET /ready` (readiness) and `GET /metrics` (Prometheus).
pub fn ops_routes<S: Clone + Send + Sync + 'static>(
    service: &'static str,
    ready: ReadyCheck,
) -> Router<S> {
    // Install the recorder now: counters recorded before the first scrape must not be lost.
    crate::telemetry::metrics();
    Router::new()
        .route(
            "/health",
            get(move || async move {
                Json(serde_json::json!({
                    "status": "ok",
                    "service": service,
                    "version": crate::VERSION,
                }))
            }),
        )
        .route(
            "/ready",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready().await {
                        Ok(()) => (
                            StatusCode::OK,
                            Json(serde_json::json!({"status": "ready", "service": service})),
                        )
                            .into_response(),
                        Err(NotReady { reason, message }) => {
                            let mut r = (
                                StatusCode::SERVICE_UNAVAILABLE,
                                Json(serde_json::json!({
                                    "status": "unavailable",
                                    "service": service,
                                    "reason": reason,
                                    "message": message,
                                })),
                            )
                                .into_response();
                            r.headers_mut()
                                .insert(header::RETRY_AFTER, HeaderValue::from(1));
                            r
                        }
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    crate::telemetry::render_metrics(),
                )
            }),
        )
}

/// Wraps a service's router with what every service has: request metrics (per matched
/// route), the request id and its log span, the body limit, and JSON answers for unknown
/// routes and methods.
pub fn finish_router(router: Router, service: &'static str, body_limit: usize) -> Router {
    finish_router_with(router, service, body_limit, ErrorBodies::default())
}

/// How a service answers unknown routes and methods (the gateway speaks OpenAI's error
/// shape instead of ours).
#[derive(Clone, Copy)]
pub struct ErrorBodies {
    /// The answer to a route that does not exist.
    pub not_found: fn() -> Response,
    /// The answer to a method a route does not take.
    pub method_not_allowed: fn() -> Response,
}

impl Default for ErrorBodies {
    fn default() -> Self {
        Self {
            not_found: || ApiError::not_found("no such route").into_response(),
            method_not_allowed: || {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "method not allowed on this route",
                )
                .into_response()
            },
        }
    }
}

/// [`finish_router`] with the service's own error bodies for unknown routes and methods.
pub fn finish_router_with(
    router: Router,
    service: &'static str,
    body_limit: usize,
    errors: ErrorBodies,
) -> Router {
    router
        .route_layer(axum::middleware::from_fn_with_state(
            service,
            crate::telemetry::track_http,
        ))
        .fallback(move || async move { (errors.not_found)() })
        .method_not_allowed_fallback(move || async move { (errors.method_not_allowed)() })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(crate::telemetry::request_context))
}

/// Serves `router` on an already-bound listener until `shutdown` is cancelled, then lets
/// in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds a TCP listener, with the address in the error.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("could not listen on {addr}"))
}

/// An outgoing HTTP client with Ensemble's defaults: bounded connect and request time,
/// keep-alive pooling, no proxy lookups (service-to-service traffic stays in the VPC).
pub fn client(request_timeout: Duration) -> reqwest::Client {
    crate::install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(request_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .no_proxy()
        .user_agent(concat!("ensemble/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// Runs `fut` to completion unless `shutdown` fires first.
pub async fn until_shutdown<F: Future>(shutdown: &CancellationToken, fut: F) -> Option<F::Output> {
    tokio::select! {
        out = fut => Some(out),
        () = shutdown.cancelled() => None,
    }
}

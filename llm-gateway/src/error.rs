//! The gateway's one error type. Every failure answers in OpenAI's error shape
//! (`{"error": {"message", "type", "param", "code"}}`) so OpenAI client libraries raise the
//! right exception; 4xx say what was wrong and which field, 5xx hide internals (logged).

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::openai::{ErrorBody, ErrorDetail};
use crate::providers::{ErrorKind, ProviderError};

/// Everything that can go wrong answering a request.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The body is not JSON.
    #[error("malformed JSON: {0}")]
    InvalidJson(String),
    /// The body is JSON but not a valid request; `param` names the field.
    #[error("{message}")]
    InvalidRequest {
        /// What was wrong.
        message: String,
        /// The field at fault.
        param: Option<String>,
    },
    /// No or wrong bearer token.
    #[error("missing or incorrect bearer token")]
    Unauthorized,
    /// The model alias is not configured.
    #[error("the model `{0}` does not exist; GET /v1/models lists the served models")]
    ModelNotFound(String),
    /// No such route.
    #[error("no such route")]
    RouteNotFound,
    /// The route exists but not with this method.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// The body is over the limit.
    #[error("request body is larger than the limit")]
    PayloadTooLarge,
    /// The `Idempotency-Key` was first used with a different request.
    #[error(
        "the Idempotency-Key was already used with a different request; a new request needs a new key"
    )]
    IdempotencyKeyReused,
    /// The first request with this `Idempotency-Key` is still being answered.
    #[error("a request with this Idempotency-Key is still in progress; retry once it has finished")]
    IdempotencyInProgress,
    /// Every target failed; the last failure decides the status.
    #[error("upstream failure: {0}")]
    Upstream(ProviderError),
    /// A budget that applies to the call is spent (key daily or task); the message says
    /// which and the figures.
    #[error("{message}")]
    BudgetExceeded {
        /// Which budget and its figures.
        message: String,
        /// Until the budget resets (UTC midnight for a key's daily budget); `None` for a
        /// task's budget, which never resets.
        retry_after: Option<Duration>,
    },
    /// A dollar budget applies to the call but a model the alias may be served by has no
    /// price, so the budget could not be enforced.
    #[error(
        "a dollar budget applies to this call, but model alias `{alias}` may be served by \
         `{target}`, which has no price: add [prices.\"{model}\"] to the gateway's configuration"
    )]
    ModelUnpriced {
        /// The alias asked for.
        alias: String,
        /// `<provider>/<model>` of the unpriced target.
        target: String,
        /// The provider model name, as `[prices]` keys it.
        model: String,
    },
    /// The gateway's Redis cannot be read or written where an answer depends on it: a
    /// budget that applies, or whether a keyed request was answered already (the provider
    /// is not called: it could answer twice). Logged; the client is told to retry.
    #[error("the gateway's Redis is unavailable: {0}")]
    StoreUnavailable(String),
    /// `GET /v1/usage` without `USE_REDIS`.
    #[error("the usage ledger is off: USE_REDIS is not set on this gateway")]
    LedgerDisabled,
    /// A fault of the gateway itself (logged; the client sees a generic message).
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    /// An invalid request naming the field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// The status, OpenAI error `type` and `code`.
    fn classify(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::InvalidJson(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
            ),
            Self::InvalidRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
            ),
            Self::ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            Self::RouteNotFound => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
            Self::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
            ),
            Self::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "payload_too_large",
            ),
            Self::IdempotencyKeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "idempotency_key_reused",
            ),
            Self::IdempotencyInProgress => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                "idempotency_in_progress",
            ),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "api_error", "internal"),
            Self::BudgetExceeded { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "budget_exceeded",
            ),
            Self::ModelUnpriced { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "model_unpriced",
            ),
            Self::StoreUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "store_unavailable",
            ),
            Self::LedgerDisabled => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "ledger_disabled",
            ),
            Self::Upstream(e) => match e.kind {
                ErrorKind::InvalidRequest => (
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "upstream_rejected_request",
                ),
                ErrorKind::RateLimited | ErrorKind::Saturated => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "rate_limit_exceeded",
                ),
                ErrorKind::Timeout => {
                    (StatusCode::GATEWAY_TIMEOUT, "api_error", "upstream_timeout")
                }
                ErrorKind::Unavailable | ErrorKind::Connection => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "api_error",
                    "upstream_unavailable",
                ),
                ErrorKind::Auth | ErrorKind::NotFound | ErrorKind::Protocol => {
                    (StatusCode::BAD_GATEWAY, "api_error", "upstream_error")
                }
                ErrorKind::Unsupported => (
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_request",
                ),
                ErrorKind::MalformedOutput => (
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    "upstream_malformed_output",
                ),
            },
        }
    }

    /// The message the client sees: upstream internals are left out of 5xx answers.
    fn public_message(&self) -> String {
        match self {
            Self::Internal(_) => "internal error; see the gateway's log".into(),
            Self::StoreUnavailable(_) => {
                "the gateway's Redis store is unavailable, so this call's budget or its \
                 Idempotency-Key cannot be checked; retry shortly"
                    .into()
            }
            Self::Upstream(e) => match e.kind {
                ErrorKind::InvalidRequest => {
                    format!("{} rejected the request: {}", e.provider, e.message)
                }
                ErrorKind::Saturated => {
                    "too many concurrent requests to the model's providers; retry shortly".into()
                }
                ErrorKind::Unsupported => {
                    format!("{} cannot take this request: {}", e.provider, e.message)
                }
                // The model's own failure, not the gateway's internals: say what it was.
                ErrorKind::MalformedOutput => format!(
                    "the model's output was unusable ({}: {}); retry",
                    e.provider, e.message
                ),
                _ => format!(
                    "the model provider failed ({}: {}); retry later",
                    e.provider,
                    e.kind.as_str()
                ),
            },
            other => other.to_string(),
        }
    }

    /// Seconds for `Retry-After`, for `429` and `503`.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Upstream(e) => match e.kind {
                ErrorKind::RateLimited | ErrorKind::Saturated | ErrorKind::Unavailable => {
                    Some(e.retry_after.unwrap_or(Duration::from_secs(1)))
                }
                _ => None,
            },
            Self::BudgetExceeded { retry_after, .. } => *retry_after,
            Self::IdempotencyInProgress | Self::StoreUnavailable(_) => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The OpenAI error body, for the response and for a mid-stream SSE error event.
    pub fn body_json(&self) -> String {
        let (_, kind, code) = self.classify();
        let message = self.public_message();
        let param = match self {
            Self::InvalidRequest { param, .. } => param.as_deref(),
            Self::Upstream(e) => e.param.as_deref(),
            Self::ModelUnpriced { .. } => Some("model"),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                message: &message,
                kind,
                param,
                code,
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"api_error","param":null,"code":"internal"}}"#.into()
        })
    }

    /// A label for the `errors` metric.
    pub fn kind_label(&self) -> &'static str {
        self.classify().2
    }
}

impl From<ProviderError> for GatewayError {
    fn from(e: ProviderError) -> Self {
        Self::Upstream(e)
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.classify();
        if status.is_server_error() {
            tracing::warn!(error = %self, status = status.as_u16(), "request failed");
        }
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body_json(),
        )
            .into_response();
        if let Some(after) = self.retry_after() {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

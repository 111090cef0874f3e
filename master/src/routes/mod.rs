//! HTTP handlers: parse, call one function, map the result. Client routes (`/task`,
//! `/result`), the worker route (`POST /result`), operator routes (`/dispatch`, `/workers`,
//! `/queues`) and `/openapi.json`.

pub mod client;
pub mod operator;
pub mod worker;

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use common::http::ApiError;

use crate::app::AppState;
use crate::error::ServiceError;

/// The master's API routes.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/task", post(client::submit))
        .route("/task/{id}", get(client::status).delete(client::cancel))
        .route("/result", post(worker::report))
        .route("/result/{id}", get(client::result))
        .route("/dispatch", post(operator::dispatch))
        .route("/workers", get(operator::workers))
        .route("/queues", get(operator::queues))
        .route("/openapi.json", get(openapi))
}

/// The API description (OpenAPI 3.1), kept next to the routes and checked by the tests
/// against them.
async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        include_str!("../../openapi.json"),
    )
}

/// The one place a service-layer error becomes an HTTP answer: `4xx` say what was wrong,
/// `5xx` hide the detail (logged by [`ApiError::internal`]).
impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let message = e.to_string();
        match e {
            ServiceError::NotFound(_) => Self::not_found(message),
            ServiceError::Invalid(_) => Self::invalid(message),
            ServiceError::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", message),
            ServiceError::RateLimited { retry_after } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
                    .retry_after(retry_after.as_secs_f64().ceil() as u64)
            }
            ServiceError::Unavailable => Self::unavailable(message),
            ServiceError::StorageFull => Self::storage_full(),
            ServiceError::Internal(detail) => Self::internal(detail),
        }
    }
}

//! HTTP handlers: parse, call one function, map the result. Client routes (`/task`,
//! `/result`), the worker route (`POST /result`), operator routes (`/dispatch`, `/workers`,
//! `/queues`) and `/openapi.json`.

pub mod client;
pub mod operator;
pub mod worker;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::app::AppState;

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

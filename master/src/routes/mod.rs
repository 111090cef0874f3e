//! HTTP handlers: parse, call one function, map the result. Client routes (`/task`,
//! `POST /tasks`, `/task/{id}/signal`, `/result`), the worker route (`POST /result`),
//! operator routes (`/dispatch`, `/workers`, `/queues`, `GET /tasks`, `/deadletters`), the
//! dashboard (`/ui`) and `/openapi.json`.

mod client;
mod events;
mod operator;
mod ui;
mod worker;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::handler::Handler;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use common::http::ApiError;

use crate::auth::Auth;
use crate::error::ServiceError;
use crate::limits::Concurrency;
use crate::tasks::Tasks;

/// What the handlers share: the service layer, plus what only the web side needs. Each
/// handler and extractor takes the part it uses (`State<Arc<Tasks>>`, `Arc<Auth>`).
#[derive(Clone, FromRef)]
pub(crate) struct AppState {
    /// Where every handler's work is done.
    pub(crate) tasks: Arc<Tasks>,
    /// Checked by the extractors in `auth.rs` before a handler reads the body.
    pub(crate) auth: Arc<Auth>,
    /// Caps on long polls held open at once, per client and in total, so one client cannot
    /// use up the process's connections (file descriptors).
    pub(crate) long_polls: Arc<Concurrency>,
    /// Caps on event streams held open, per client and in total.
    pub(crate) event_streams: Arc<events::EventStreams>,
}

pub(crate) use events::EventStreams;

/// The master's API routes.
pub(crate) fn router(state: AppState) -> Router {
    // A batch submit carries up to 100 bodies of `POST /task`: it gets a larger limit than
    // the service's (this inner layer wins over the one `finish_router` puts outside).
    let batch_limit = DefaultBodyLimit::max(
        state
            .tasks
            .body_limit()
            .saturating_mul(client::SUBMIT_BATCH_BODY_FACTOR),
    );
    Router::new()
        .route("/task", post(client::submit))
        .route("/task/{id}", get(client::status).delete(client::cancel))
        .route("/task/{id}/signal", post(client::signal))
        .route("/task/{id}/events", get(client::events))
        .route("/result", post(worker::report))
        .route("/results", post(worker::reports))
        .route("/progress", post(worker::progress))
        .route("/result/{id}", get(client::result))
        .route("/dispatch", post(operator::dispatch))
        .route("/workers", get(operator::workers))
        .route("/queues", get(operator::queues))
        .route("/events", get(operator::events))
        .route("/ui", get(ui::page))
        .route("/ui/", get(ui::page))
        .route("/ui/app.js", get(ui::script))
        .route("/ui/app.css", get(ui::style))
        .route("/ui/login", post(ui::login))
        .route("/ui/session", get(ui::current))
        .route("/ui/logout", post(ui::logout))
        .route(
            "/tasks",
            get(operator::search).post(client::submit_batch.layer(batch_limit)),
        )
        .route("/deadletters", get(operator::dead_letters))
        .route("/deadletters/{capability}", delete(operator::purge))
        .route("/openapi.json", get(openapi))
        .with_state(state)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn each_service_error_has_its_status_code_and_retry_after() {
        let cases = [
            (ServiceError::NotFound("t".into()), 404, "not_found", None),
            (
                ServiceError::Invalid("`x` bad".into()),
                422,
                "invalid",
                None,
            ),
            (ServiceError::Conflict("done".into()), 409, "conflict", None),
            (
                ServiceError::RateLimited {
                    retry_after: Duration::from_millis(1_200),
                },
                429,
                "rate_limited",
                Some(2),
            ),
            (ServiceError::Unavailable, 503, "unavailable", Some(1)),
            (ServiceError::StorageFull, 507, "storage_full", None),
            (
                ServiceError::Internal("secret".into()),
                500,
                "internal",
                None,
            ),
        ];
        for (error, status, code, retry_after) in cases {
            let shown = error.to_string();
            let answer = ApiError::from(error);
            assert_eq!(answer.status.as_u16(), status, "{shown}");
            assert_eq!(answer.code, code, "{shown}");
            assert_eq!(answer.retry_after, retry_after, "{shown}");
            assert!(!answer.message.contains("secret"), "a 5xx hides its detail");
        }
    }
}

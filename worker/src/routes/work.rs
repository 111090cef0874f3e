//! `POST /work`: the master hands over one step. Checks the worker token, parses the step,
//! and answers at once; the step runs in the background.

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use common::http::JsonBody;
use common::telemetry::RequestId;
use common::wire::{WorkAccepted, WorkRequest};

use crate::app::AppState;
use crate::error::WorkError;
use crate::runner::Accepted;

/// Proof that the caller presented the worker token (or that auth is disabled). Extracted
/// before the body, so an unauthenticated caller learns nothing about what it sent.
pub struct Authorized;

impl FromRequestParts<AppState> for Authorized {
    type Rejection = WorkError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, WorkError> {
        if state.auth_disabled {
            return Ok(Self);
        }
        match common::auth::bearer(&parts.headers) {
            Some(token) if common::auth::matches(&state.worker_token, token) => Ok(Self),
            _ => Err(WorkError::Unauthorized),
        }
    }
}

/// `202 {"accepted": true}` for a started (or already running) step.
pub async fn accept(
    _: Authorized,
    State(state): State<AppState>,
    request_id: Option<axum::Extension<RequestId>>,
    JsonBody(step): JsonBody<WorkRequest>,
) -> Result<Response, WorkError> {
    let request_id = request_id.map(|r| r.0.0).unwrap_or_default();
    let body = WorkAccepted {
        accepted: true,
        duplicate: state.runner.accept(step, request_id)? == Accepted::Duplicate,
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

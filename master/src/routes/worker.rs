//! The worker route: `POST /result`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use common::http::{ApiError, JsonBody};
use common::wire::{AckStatus, ResultAck, ResultReport};

use crate::app::AppState;
use crate::tasks;

/// `POST /result`: always `200` for a well-formed report from a worker; `status` says
/// whether it was recorded or discarded as stale.
pub async fn report(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<JsonBody<ResultReport>, ApiError>,
) -> Result<Json<ResultAck>, ApiError> {
    state.auth.worker(&headers)?;
    let JsonBody(report) = body?;
    let recorded = tasks::record_report(&state, report).await?;
    Ok(Json(ResultAck {
        status: if recorded {
            AckStatus::Recorded
        } else {
            AckStatus::Discarded
        },
    }))
}

//! The worker routes: `POST /result`, and `POST /progress` (in `events.rs`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use common::http::{ApiError, JsonBody};
use common::wire::{AckStatus, ResultAck, ResultReport};

use crate::auth::Worker;
use crate::tasks::Tasks;

/// `POST /progress` (in `events.rs` with the event streams it feeds).
pub(super) use super::events::progress;

/// `POST /result`: always `200` for a well-formed report from a worker; `status` says
/// whether it was recorded or discarded as stale.
pub(super) async fn report(
    State(tasks): State<Arc<Tasks>>,
    // Before the body: a caller without the worker token never gets the body read.
    _: Worker,
    JsonBody(report): JsonBody<ResultReport>,
) -> Result<Json<ResultAck>, ApiError> {
    let recorded = tasks.record_report(report).await?;
    Ok(Json(ResultAck {
        status: if recorded {
            AckStatus::Recorded
        } else {
            AckStatus::Discarded
        },
    }))
}

//! The worker routes: `POST /result`, `POST /results` (a batch of reports), and
//! `POST /progress` (in `events.rs`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use common::http::{ApiError, JsonBody};
use common::wire::{
    AckStatus, RawBatch, ResultAck, ResultBatchAnswer, ResultItemAnswer, ResultReport,
};

use crate::error::ServiceError;

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

/// The body of `POST /results`: an array of reports, each parsed on its own so that one
/// malformed report is refused alone; at most [`common::wire::MAX_BATCH`].
type Reports = RawBatch<{ common::wire::MAX_BATCH }>;

/// `POST /results`: several reports in one request, recorded with one store call. `200`
/// with one answer per report, in order (`ResultBatchAnswer`): what `POST /result` of
/// that report alone would have answered. A failure of the whole request (`401`, `413`,
/// `422` for a body that is not an array of at most 64, `503`) settles none.
pub(super) async fn reports(
    State(tasks): State<Arc<Tasks>>,
    _: Worker,
    JsonBody(RawBatch(raw)): JsonBody<Reports>,
) -> Result<Json<ResultBatchAnswer>, ApiError> {
    if raw.is_empty() {
        return Err(ApiError::invalid("the batch holds no report"));
    }
    let reports = raw
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            serde_json::from_str::<ResultReport>(raw.get())
                .map_err(|e| ServiceError::Invalid(format!("report {i} of the batch: {e}")))
        })
        .collect();
    let answers = tasks.record_reports(reports).await?;
    let results = answers
        .into_iter()
        .map(|answer| match answer {
            Ok(recorded) => ResultItemAnswer {
                status: 200,
                ack: Some(if recorded {
                    AckStatus::Recorded
                } else {
                    AckStatus::Discarded
                }),
                error: None,
            },
            Err(e) => {
                let e = ApiError::from(e);
                ResultItemAnswer {
                    status: e.status.as_u16(),
                    ack: None,
                    error: Some(common::http::ErrorDetail {
                        code: e.code.to_string(),
                        message: e.message,
                    }),
                }
            }
        })
        .collect();
    Ok(Json(ResultBatchAnswer { results }))
}

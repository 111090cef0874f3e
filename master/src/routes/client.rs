//! Client routes: submit (one task, or a batch), status, result (long-poll), cancel,
//! signal.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use common::http::{ApiError, ErrorDetail, JsonBody};
use common::telemetry::RequestId;
use common::wire::{
    RawBatch, SignalRequest, SignalResponse, SubmitResponse, SubmitTask, TaskId, TaskStatus,
    TaskView,
};
use serde::{Deserialize, Serialize};

use crate::auth::{Caller, Client};
use crate::limits::Concurrency;
use crate::tasks::{self, Tasks};

/// `GET /task/{id}/events` (in `events.rs` with the other event streams).
pub(super) use super::events::task_events as events;

/// `POST /task`.
pub(super) async fn submit(
    State(tasks): State<Arc<Tasks>>,
    // Before the body: a caller without credentials never gets the body read.
    Client(client): Client,
    headers: HeaderMap,
    request_id: Option<axum::Extension<RequestId>>,
    JsonBody(body): JsonBody<SubmitTask>,
) -> Result<Response, ApiError> {
    let key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map(String::from)
                .map_err(|_| ApiError::invalid("`Idempotency-Key` must be visible ASCII"))
        })
        .transpose()?;
    let request_id = request_id.map(|r| r.0.0).unwrap_or_default();
    let done = tasks.submit(&client, body, key, request_id).await?;
    let location = format!("/task/{}", done.task_id);
    let status = if done.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        [(header::LOCATION, location)],
        Json(SubmitResponse {
            task_id: done.task_id,
            status: done.task_status,
        }),
    )
        .into_response())
}

/// Most tasks in one `POST /tasks`.
pub(crate) const MAX_SUBMIT_BATCH: usize = 100;

/// A `POST /tasks` body may be this many times `BODY_LIMIT_BYTES` (8 MiB by default), and
/// each of its tasks at most `BODY_LIMIT_BYTES`, as on `POST /task`. Not 100 times: a
/// batch of big inputs is better sent as several requests than held in memory at once.
pub(crate) const SUBMIT_BATCH_BODY_FACTOR: usize = 8;

/// The body of `POST /tasks`: `{"tasks": [...]}`, each element a `POST /task` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SubmitBatch {
    /// Each left unparsed here, so that one malformed task is refused alone.
    tasks: RawBatch<MAX_SUBMIT_BATCH>,
}

/// The answer to `POST /tasks` (`200`): one entry per task, in the order of the request.
#[derive(Serialize)]
pub(super) struct SubmitBatchAnswer {
    tasks: Vec<SubmitItemAnswer>,
}

/// One task's entry: what `POST /task` of that task alone would have answered.
#[derive(Serialize)]
struct SubmitItemAnswer {
    /// That answer's HTTP status: `202` new, `200` idempotent repeat, else the refusal's.
    status: u16,
    /// With `202` and `200`: the task (`task_id` of the `POST /task` body).
    #[serde(skip_serializing_if = "Option::is_none")]
    task_id: Option<TaskId>,
    /// With `202` and `200`: its status now (`status` of the `POST /task` body, renamed
    /// because `status` is taken by the HTTP status here).
    #[serde(skip_serializing_if = "Option::is_none")]
    task_status: Option<TaskStatus>,
    /// With any other status: why, as the error body of `POST /task` would say.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorDetail>,
    /// With `429` and `503`: the `Retry-After` of that answer, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
}

/// `POST /tasks`: 1 to [`MAX_SUBMIT_BATCH`] tasks in one request, each submitted in order
/// as `POST /task` of it alone would be. `200` with one entry per task; one task's refusal
/// does not hold back the others. The whole request is refused, submitting nothing, for
/// `401`, `400` (malformed JSON, or an `Idempotency-Key` header: in a batch each task
/// gives its own `idempotency_key`), `413` (body over [`SUBMIT_BATCH_BODY_FACTOR`] ×
/// `BODY_LIMIT_BYTES`), `422` (not `{"tasks": [...]}` with 1 to 100 tasks), and for a store
/// failure when no task was accepted (`503`/`507`; see [`Tasks::submit_many`]).
pub(super) async fn submit_batch(
    State(tasks): State<Arc<Tasks>>,
    // Before the body: a caller without credentials never gets the body read.
    Client(client): Client,
    headers: HeaderMap,
    request_id: Option<axum::Extension<RequestId>>,
    JsonBody(SubmitBatch {
        tasks: RawBatch(raw),
    }): JsonBody<SubmitBatch>,
) -> Result<Json<SubmitBatchAnswer>, ApiError> {
    if headers.contains_key("idempotency-key") {
        return Err(ApiError::bad_request(
            "the `Idempotency-Key` header is not taken by `POST /tasks`: give each task its own \
             `idempotency_key` field",
        ));
    }
    if raw.is_empty() {
        return Err(ApiError::invalid("`tasks`: the batch holds no task"));
    }
    let limit = tasks.body_limit();
    // Each element read as `POST /task` reads its body, so its refusal is the same one.
    let items = raw
        .iter()
        .map(|raw| {
            if raw.get().len() > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    // Word for word what `POST /task` says of it.
                    "request body is larger than the limit",
                ));
            }
            Json::<SubmitTask>::from_bytes(raw.get().as_bytes())
                .map(|Json(task)| task)
                .map_err(common::http::json_rejection)
        })
        .collect();
    let request_id = request_id.map(|r| r.0.0).unwrap_or_default();
    let answers = tasks.submit_many(&client, items, &request_id).await?;
    let entries = answers
        .into_iter()
        .map(|answer| match answer {
            Ok(done) => SubmitItemAnswer {
                status: if done.created { 202 } else { 200 },
                task_id: Some(done.task_id),
                task_status: Some(done.task_status),
                error: None,
                retry_after: None,
            },
            Err(e) => SubmitItemAnswer {
                status: e.status.as_u16(),
                task_id: None,
                task_status: None,
                error: Some(ErrorDetail {
                    code: e.code.to_string(),
                    message: e.message,
                }),
                retry_after: e.retry_after,
            },
        })
        .collect();
    Ok(Json(SubmitBatchAnswer { tasks: entries }))
}

/// `GET /task/{id}`: by the task's client, or by an operator (any task).
pub(super) async fn status(
    State(tasks): State<Arc<Tasks>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    Ok(Json(tasks.view(&caller, &id).await?))
}

/// `?wait=SECONDS` on `GET /result/{id}`.
#[derive(Debug, Deserialize)]
pub(super) struct WaitQuery {
    wait: Option<String>,
}

/// `GET /result/{id}`: `200` once finished (succeeded, failed or cancelled: `status` says
/// which), `202` with the state while running.
pub(super) async fn result(
    State(tasks): State<Arc<Tasks>>,
    State(long_polls): State<Arc<Concurrency>>,
    Client(client): Client,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let wait = match query.wait.as_deref() {
        None | Some("") => 0.0,
        Some(text) => text
            .parse::<f64>()
            .ok()
            .filter(|w| w.is_finite() && (0.0..=tasks::MAX_WAIT_SECS as f64).contains(w))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "`wait` must be a number of seconds from 0 to {}",
                    tasks::MAX_WAIT_SECS
                ))
            })?,
    };
    // A long poll holds a connection while it waits: it must fit within the caps. The
    // permit lives in this future, so it is given back however the request ends, a client
    // that disconnects mid-wait included. A plain read holds nothing and needs none.
    let _permit = if wait > 0.0 {
        Some(long_polls.acquire(&client)?)
    } else {
        None
    };
    let result = tasks
        .result(&client, &id, Duration::from_secs_f64(wait))
        .await?;
    let status = if result.status.is_terminal() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(result)).into_response())
}

/// `DELETE /task/{id}`: by the task's client, or by an operator (any task).
pub(super) async fn cancel(
    State(tasks): State<Arc<Tasks>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    Ok(Json(tasks.cancel(&caller, &id).await?))
}

/// `POST /task/{id}/signal`: by the task's client, or by an operator (any task). `202`
/// whether the signal was delivered to a waiting step or kept for one not reached yet.
pub(super) async fn signal(
    State(tasks): State<Arc<Tasks>>,
    // Before the body: a caller without credentials never gets the body read.
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<SignalRequest>,
) -> Result<(StatusCode, Json<SignalResponse>), ApiError> {
    let answer = tasks.signal(&caller, &id, body).await?;
    Ok((StatusCode::ACCEPTED, Json(answer)))
}

//! Client routes: submit, status, result (long-poll), cancel, signal.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use common::http::{ApiError, JsonBody};
use common::telemetry::RequestId;
use common::wire::{SignalRequest, SignalResponse, SubmitResponse, SubmitTask, TaskView};
use serde::Deserialize;

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

//! Operator routes: `POST /dispatch` (redrive), `GET /workers`, `GET /queues`, the task
//! search `GET /tasks`, and the dead letters (`GET /deadletters`, `DELETE
//! /deadletters/{capability}`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use common::http::{ApiError, JsonBody};
use common::wire::{Capability, TaskId, TaskStatus};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::Operator;
use crate::store::search::{
    DeadLetter, DeadLetterCursor, MAX_LIMIT, SCAN_BUDGET, TaskCursor, TaskQuery, TaskSummary,
};
use crate::tasks::{Tasks, WorkerList};

/// `GET /events` (in `events.rs` with the other event streams).
pub(super) use super::events::all_events as events;

/// `POST /dispatch`: redrive one failed task, or the dead letters of a capability.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DispatchRequest {
    /// Re-run this failed (dead-lettered) task from its failed step.
    #[serde(default)]
    task_id: Option<String>,
    /// Redrive this capability's dead letters.
    #[serde(default)]
    capability: Option<Capability>,
    /// With `capability`: at most this many (default 1000).
    #[serde(default)]
    limit: Option<usize>,
}

/// What `/dispatch` did.
#[derive(Debug, Serialize)]
pub(super) struct DispatchResponse {
    redriven: Vec<TaskId>,
}

/// `POST /dispatch`. A store failure part-way through a capability's dead letters answers
/// that failure (`503`), not `200` with the tasks redriven so far: those have left the dead
/// letters, so repeating the request redrives the rest.
pub(super) async fn dispatch(
    State(tasks): State<Arc<Tasks>>,
    // Before the body: a caller without an operator key never gets the body read.
    _: Operator,
    JsonBody(req): JsonBody<DispatchRequest>,
) -> Result<Json<DispatchResponse>, ApiError> {
    let redriven = match (req.task_id, req.capability) {
        (Some(id), None) => vec![tasks.redrive_task(&id).await?],
        (None, Some(cap)) => tasks.redrive_dead_letters(&cap, req.limit).await?,
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of `task_id` or `capability`",
            ));
        }
    };
    Ok(Json(DispatchResponse { redriven }))
}

/// `GET /workers`: live workers, grouped by capability.
pub(super) async fn workers(
    State(tasks): State<Arc<Tasks>>,
    _: Operator,
) -> Result<Json<WorkerList>, ApiError> {
    Ok(Json(tasks.workers().await?))
}

/// `GET /queues`: per capability: queued, delayed, in flight, dead-lettered, live
/// workers, backlog per worker, age of the head of the queue.
pub(super) async fn queues(
    State(tasks): State<Arc<Tasks>>,
    _: Operator,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json!({ "queues": tasks.queues().await? })))
}

/// A query string that does not parse (an unknown parameter, a repeated one): `422`.
type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

fn bad_query(e: &axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::invalid(e.body_text())
}

/// Page size of the lists when no `limit` is given.
const DEFAULT_LIMIT: usize = 50;

/// Longest client id or pipeline name a search takes.
const MAX_NAME: usize = 256;

/// `?limit=`: 1 to [`MAX_LIMIT`], else `422` (not clamped: a caller asking for more than a
/// page holds should learn that it gets less).
fn limit(text: Option<&str>) -> Result<usize, ApiError> {
    match text.filter(|t| !t.is_empty()) {
        None => Ok(DEFAULT_LIMIT),
        Some(t) => t
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "`limit` must be a whole number from 1 to {MAX_LIMIT}"
                ))
            }),
    }
}

/// A time parameter: milliseconds since the epoch, `0` to `u64::MAX`.
fn millis(name: &str, text: Option<&str>) -> Result<Option<u64>, ApiError> {
    text.filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u64>().map_err(|_| {
                ApiError::invalid(format!(
                    "`{name}` must be milliseconds since the epoch (a whole number from 0)"
                ))
            })
        })
        .transpose()
}

/// A client or pipeline name to filter on; empty is the same as not given.
fn name(field: &str, text: Option<String>) -> Result<Option<String>, ApiError> {
    match text.filter(|t| !t.is_empty()) {
        Some(t) if t.len() > MAX_NAME => Err(ApiError::invalid(format!(
            "`{field}` is longer than {MAX_NAME} bytes"
        ))),
        other => Ok(other),
    }
}

/// `GET /tasks`'s query string (every parameter optional).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SearchParams {
    status: Option<String>,
    client: Option<String>,
    pipeline: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// The statuses a search can filter on: those stored. `waiting` is shown by `GET
/// /task/{id}` but derived from the steps; such a task is stored, and searched, as
/// `running`.
fn search_status(text: &str) -> Result<TaskStatus, ApiError> {
    let known = "queued, running, succeeded, failed, cancelled";
    match serde_json::from_value::<TaskStatus>(serde_json::Value::String(text.to_string())) {
        Ok(TaskStatus::Waiting) => Err(ApiError::invalid(format!(
            "`status`: `waiting` cannot be searched (a waiting task is listed as `running`); \
             one of {known}"
        ))),
        Ok(status) => Ok(status),
        Err(_) => Err(ApiError::invalid(format!(
            "`status`: unknown status `{}`; one of {known}",
            text.chars().take(64).collect::<String>()
        ))),
    }
}

impl SearchParams {
    fn query(self) -> Result<TaskQuery, ApiError> {
        Ok(TaskQuery {
            status: self
                .status
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(search_status)
                .transpose()?,
            client: name("client", self.client)?,
            pipeline: name("pipeline", self.pipeline)?,
            since: millis("since", self.since.as_deref())?.unwrap_or(0),
            until: millis("until", self.until.as_deref())?,
            limit: limit(self.limit.as_deref())?,
            after: self
                .cursor
                .as_deref()
                .filter(|c| !c.is_empty())
                .map(|c| c.parse::<TaskCursor>())
                .transpose()
                .map_err(|e| ApiError::invalid(e.to_string()))?,
            budget: SCAN_BUDGET,
        })
    }
}

/// What `GET /tasks` answers.
#[derive(Debug, Serialize)]
pub(super) struct SearchResponse {
    tasks: Vec<TaskSummary>,
    /// Give it back as `cursor` for the next page; `null` at the end.
    next: Option<String>,
}

/// `GET /tasks`: every client's tasks, newest submit first, filtered by status, client,
/// pipeline and submit time, a page at a time. A page can hold fewer than `limit` tasks and
/// still have a `next` (the search looks at a bounded number of tasks per request).
pub(super) async fn search(
    State(tasks): State<Arc<Tasks>>,
    _: Operator,
    params: QueryResult<SearchParams>,
) -> Result<Json<SearchResponse>, ApiError> {
    let Query(params) = params.map_err(|e| bad_query(&e))?;
    let page = tasks.search(&params.query()?).await?;
    Ok(Json(SearchResponse {
        tasks: page.tasks,
        next: page.next.map(|c| c.to_string()),
    }))
}

/// `GET /deadletters`'s query string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeadLetterParams {
    capability: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// What `GET /deadletters` answers.
#[derive(Debug, Serialize)]
pub(super) struct DeadLetterResponse {
    dead_letters: Vec<DeadLetter>,
    /// Give it back as `cursor` for the next page; `null` at the end.
    next: Option<String>,
}

fn capability(text: &str) -> Result<Capability, ApiError> {
    Capability::new(text).map_err(|e| ApiError::invalid(format!("`capability`: {e}")))
}

/// `GET /deadletters`: dead-lettered tasks, newest failure first, of one capability or of
/// all, with the failed step and its error.
pub(super) async fn dead_letters(
    State(tasks): State<Arc<Tasks>>,
    _: Operator,
    params: QueryResult<DeadLetterParams>,
) -> Result<Json<DeadLetterResponse>, ApiError> {
    let Query(params) = params.map_err(|e| bad_query(&e))?;
    let cap = params
        .capability
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(capability)
        .transpose()?;
    let after = params
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(|c| c.parse::<DeadLetterCursor>())
        .transpose()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let limit = limit(params.limit.as_deref())?;
    let page = tasks.dead_letters(cap, after.as_ref(), limit).await?;
    Ok(Json(DeadLetterResponse {
        dead_letters: page.dead_letters,
        next: page.next.map(|c| c.to_string()),
    }))
}

/// `DELETE /deadletters/{capability}`'s query string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PurgeParams {
    task_id: Option<String>,
}

/// What a purge removed.
#[derive(Debug, Serialize)]
pub(super) struct PurgeResponse {
    purged: u64,
}

/// `DELETE /deadletters/{capability}`: empties a capability's dead letters (or takes one
/// task out, `?task_id=`). The tasks stay failed until their retention ends; they can no
/// longer be redriven.
pub(super) async fn purge(
    State(tasks): State<Arc<Tasks>>,
    _: Operator,
    Path(cap): Path<String>,
    params: QueryResult<PurgeParams>,
) -> Result<Json<PurgeResponse>, ApiError> {
    let Query(params) = params.map_err(|e| bad_query(&e))?;
    let cap = capability(&cap)?;
    let task = params
        .task_id
        .map(|id| TaskId::new(id).map_err(|e| ApiError::invalid(format!("`task_id`: {e}"))))
        .transpose()?;
    let purged = tasks.purge_dead_letters(&cap, task.as_ref()).await?;
    Ok(Json(PurgeResponse { purged }))
}

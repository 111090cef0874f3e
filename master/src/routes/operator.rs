//! Operator routes: `POST /dispatch` (redrive), `GET /workers`, `GET /queues`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use common::http::{ApiError, JsonBody};
use common::wire::{Capability, TaskId};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::Operator;
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

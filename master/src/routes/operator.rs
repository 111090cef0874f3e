//! Operator routes: `POST /dispatch` (redrive), `GET /workers`, `GET /queues`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use common::http::{ApiError, JsonBody};
use common::wire::{Capability, TaskId, WorkerRecord};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::app::AppState;
use crate::auth::Operator;
use crate::error::ServiceError;
use crate::metrics::publish_queue_gauges;
use crate::tasks;

/// `POST /dispatch`: redrive one failed task, or the dead letters of a capability.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchRequest {
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
pub struct DispatchResponse {
    redriven: Vec<TaskId>,
}

/// `POST /dispatch`.
pub async fn dispatch(
    State(state): State<Arc<AppState>>,
    // Before the body: a caller without an operator key never gets the body read.
    _: Operator,
    JsonBody(req): JsonBody<DispatchRequest>,
) -> Result<Json<DispatchResponse>, ApiError> {
    let redriven = match (req.task_id, req.capability) {
        (Some(id), None) => vec![tasks::redrive_task(&state, &id).await?],
        (None, Some(cap)) => {
            let limit = req.limit.unwrap_or(1000).clamp(1, 100_000);
            let mut done = Vec::new();
            for id in state
                .store
                .dead_letters(&cap, limit)
                .await
                .map_err(ServiceError::from)?
            {
                // A task may have been redriven or expired meanwhile: skip it.
                if let Ok(id) = tasks::redrive_task(&state, id.as_str()).await {
                    done.push(id);
                }
            }
            done
        }
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of `task_id` or `capability`",
            ));
        }
    };
    Ok(Json(DispatchResponse { redriven }))
}

/// A live worker with its load.
#[derive(Debug, Serialize)]
struct WorkerView {
    #[serde(flatten)]
    record: WorkerRecord,
    /// Steps leased to it, by the store's count.
    leased: u32,
}

/// `GET /workers`: live workers, grouped by capability.
pub async fn workers(
    State(state): State<Arc<AppState>>,
    _: Operator,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (records, malformed) = state.workers.scan().await.map_err(ServiceError::from)?;
    let load = state
        .store
        .worker_loads()
        .await
        .map_err(ServiceError::from)?;
    let mut by_capability = std::collections::BTreeMap::<String, Vec<String>>::new();
    for w in &records {
        for c in &w.capabilities {
            by_capability
                .entry(c.to_string())
                .or_default()
                .push(w.id.to_string());
        }
    }
    let workers: Vec<WorkerView> = records
        .into_iter()
        .map(|record| WorkerView {
            leased: load.get(record.id.as_str()).copied().unwrap_or(0),
            record,
        })
        .collect();
    Ok(Json(
        json!({ "workers": workers, "by_capability": by_capability, "malformed": malformed }),
    ))
}

/// `GET /queues`: per capability: queued, delayed, in flight, dead-lettered, live
/// workers, backlog per worker, age of the head of the queue.
pub async fn queues(
    State(state): State<Arc<AppState>>,
    _: Operator,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caps = state.dispatcher.capabilities();
    let stats = state
        .store
        .stats(&caps, state.config.retention())
        .await
        .map_err(ServiceError::from)?;
    let workers = state.workers.live().await.map_err(ServiceError::from)?;
    let rows = publish_queue_gauges(&stats, &workers, common::wire::now_ms());
    let queues: Vec<serde_json::Value> = rows
        .iter()
        .zip(stats.iter())
        .map(|(r, (_, s))| {
            json!({
                "capability": r.capability,
                "queued": s.queued,
                "delayed": s.delayed,
                "in_flight": r.in_flight,
                "dead_lettered": r.dead_lettered,
                "live_workers": r.live_workers,
                "backlog_per_worker": r.backlog_per_worker,
                "oldest_queued_age_seconds": r.oldest_queued_age_seconds,
            })
        })
        .collect();
    Ok(Json(json!({ "queues": queues })))
}

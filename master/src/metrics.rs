//! The master's Prometheus metrics (names prefixed `ensemble_`): task counters, step
//! durations per capability, and per-capability queue gauges — queued, in flight,
//! dead-lettered, live workers, backlog per worker, age of the oldest queued step — that
//! drive autoscaling.

use std::sync::atomic::{AtomicU64, Ordering};

use common::wire::{Capability, TaskStatus, WorkerRecord};

use crate::store::{FinishedStep, QueueStats};

/// Tasks this replica recorded as succeeded / failed (for EMF deltas).
pub(crate) static SUCCEEDED: AtomicU64 = AtomicU64::new(0);
/// See [`SUCCEEDED`].
pub(crate) static FAILED: AtomicU64 = AtomicU64::new(0);

/// A task was accepted.
pub(crate) fn task_submitted() {
    metrics::counter!("ensemble_tasks_submitted_total").increment(1);
}

/// A task finished.
pub(crate) fn task_finished(status: TaskStatus) {
    match status {
        TaskStatus::Succeeded => {
            SUCCEEDED.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("ensemble_tasks_succeeded_total").increment(1);
        }
        TaskStatus::Failed => {
            FAILED.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("ensemble_tasks_failed_total").increment(1);
        }
        TaskStatus::Cancelled => {
            metrics::counter!("ensemble_tasks_cancelled_total").increment(1);
        }
        TaskStatus::Queued | TaskStatus::Running | TaskStatus::Waiting => {}
    }
}

/// A step attempt was handed to a worker.
pub(crate) fn step_dispatched(cap: &Capability) {
    metrics::counter!("ensemble_steps_dispatched_total", "capability" => cap.to_string())
        .increment(1);
}

/// A step attempt finished (dispatch to report).
pub(crate) fn step_finished(step: &FinishedStep, succeeded: bool) {
    let now = common::wire::now_ms();
    let secs = now.saturating_sub(step.dispatched_at_ms) as f64 / 1000.0;
    let outcome = if succeeded { "succeeded" } else { "failed" };
    metrics::histogram!("ensemble_step_duration_seconds",
        "capability" => step.capability.to_string(), "outcome" => outcome)
    .record(secs);
}

/// A failed step will be retried.
pub(crate) fn step_retried(cap: &Capability) {
    metrics::counter!("ensemble_step_retries_total", "capability" => cap.to_string()).increment(1);
}

/// A step's lease lapsed.
pub(crate) fn lease_expired(cap: &Capability) {
    metrics::counter!("ensemble_leases_expired_total", "capability" => cap.to_string())
        .increment(1);
}

/// A completion callback attempt ended: `delivered`, `retried`, `failed` (no attempts
/// left), or `stale` (it outlived its claim and another replica took the callback over).
pub(crate) fn callback_attempt(outcome: &'static str) {
    metrics::counter!("ensemble_callbacks_total", "outcome" => outcome).increment(1);
}

/// The store could not be read for the gauges.
pub(crate) fn redis_error() {
    metrics::counter!("ensemble_store_errors_total").increment(1);
}

/// One capability's queue figures, as published.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueRow {
    /// The gauges' `capability` label.
    pub capability: Capability,
    /// Steps waiting (ready or in retry backoff).
    pub queued: u64,
    /// Steps leased to workers.
    pub in_flight: u64,
    /// Dead-lettered tasks.
    pub dead_lettered: u64,
    /// Live workers serving it.
    pub live_workers: u64,
    /// Queued, delayed and in-flight steps per live worker (their sum when there are none):
    /// what the worker services' autoscaling tracks. In-flight steps count, or saturated
    /// workers with a momentarily empty queue would read 0.
    pub backlog_per_worker: f64,
    /// How long the step at the head of the queue has waited.
    pub oldest_queued_age_seconds: f64,
}

/// Computes the rows and sets the gauges.
pub(crate) fn publish_queue_gauges(
    stats: &[(Capability, QueueStats)],
    workers: &[WorkerRecord],
    now_ms: u64,
) -> Vec<QueueRow> {
    let rows: Vec<QueueRow> = stats
        .iter()
        .map(|(cap, s)| {
            let live = workers
                .iter()
                .filter(|w| !w.draining && w.serves(cap))
                .count() as u64;
            let queued = s.queued + s.delayed;
            let backlog = (queued + s.in_flight) as f64;
            QueueRow {
                capability: cap.clone(),
                queued,
                in_flight: s.in_flight,
                dead_lettered: s.dead_lettered,
                live_workers: live,
                backlog_per_worker: if live == 0 {
                    backlog
                } else {
                    backlog / live as f64
                },
                oldest_queued_age_seconds: s
                    .head_queued_at_ms
                    .map_or(0.0, |at| now_ms.saturating_sub(at) as f64 / 1000.0),
            }
        })
        .collect();
    for r in &rows {
        let cap = r.capability.to_string();
        metrics::gauge!("ensemble_queue_depth", "capability" => cap.clone()).set(r.queued as f64);
        metrics::gauge!("ensemble_in_flight", "capability" => cap.clone()).set(r.in_flight as f64);
        metrics::gauge!("ensemble_dead_letters", "capability" => cap.clone())
            .set(r.dead_lettered as f64);
        metrics::gauge!("ensemble_live_workers", "capability" => cap.clone())
            .set(r.live_workers as f64);
        metrics::gauge!("ensemble_backlog_per_worker", "capability" => cap.clone())
            .set(r.backlog_per_worker);
        metrics::gauge!("ensemble_oldest_queued_age_seconds", "capability" => cap)
            .set(r.oldest_queued_age_seconds);
    }
    rows
}

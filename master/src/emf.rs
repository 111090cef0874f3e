//! CloudWatch Embedded Metric Format: with `METRICS_EMF=true` the master prints one JSON
//! line per capability per interval on stdout (namespace `Ensemble`, dimension
//! `Capability`: `QueueDepth`, `InFlight`, `LiveWorkers`, `OldestQueuedAgeSeconds`,
//! explicit zeros included), and one line without dimensions with the tasks that
//! succeeded and failed since the last interval. The `awslogs` driver turns them into
//! metrics with no SDK call; autoscaling and alarms read them.

use std::sync::atomic::Ordering;

use serde_json::json;

use crate::metrics::{FAILED, QueueRow, SUCCEEDED};

/// Remembers counters between intervals to print deltas.
#[derive(Debug, Default)]
pub struct EmfState {
    /// `metrics::SUCCEEDED` at the last line: EMF takes per-interval counts, the counter is total.
    succeeded: u64,
    /// `metrics::FAILED` at the last line, likewise.
    failed: u64,
}

impl EmfState {
    /// The lines for one interval.
    pub fn lines(&mut self, rows: &[QueueRow], timestamp_ms: u64) -> Vec<String> {
        let mut out: Vec<String> = rows.iter().map(|r| queue_line(r, timestamp_ms)).collect();
        let succeeded = SUCCEEDED.load(Ordering::Relaxed);
        let failed = FAILED.load(Ordering::Relaxed);
        let line = json!({
            "_aws": {
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": "Ensemble",
                    "Dimensions": [[]],
                    "Metrics": [
                        {"Name": "TasksSucceeded", "Unit": "Count"},
                        {"Name": "TasksFailed", "Unit": "Count"},
                    ],
                }],
            },
            "TasksSucceeded": succeeded.saturating_sub(self.succeeded),
            "TasksFailed": failed.saturating_sub(self.failed),
        });
        self.succeeded = succeeded;
        self.failed = failed;
        out.push(line.to_string());
        out
    }
}

/// One capability's EMF line.
pub(crate) fn queue_line(r: &QueueRow, timestamp_ms: u64) -> String {
    json!({
        "_aws": {
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": "Ensemble",
                "Dimensions": [["Capability"]],
                "Metrics": [
                    {"Name": "QueueDepth", "Unit": "Count"},
                    {"Name": "InFlight", "Unit": "Count"},
                    {"Name": "LiveWorkers", "Unit": "Count"},
                    {"Name": "OldestQueuedAgeSeconds", "Unit": "Seconds"},
                ],
            }],
        },
        "Capability": r.capability.as_str(),
        "QueueDepth": r.queued,
        "InFlight": r.in_flight,
        "LiveWorkers": r.live_workers,
        "OldestQueuedAgeSeconds": r.oldest_queued_age_seconds,
    })
    .to_string()
}

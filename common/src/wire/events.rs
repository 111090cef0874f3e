//! Task events: everything that happens to a task, as `GET /task/{id}/events` (and the
//! operator's `GET /events`) send it over Server-Sent Events, and partial output that a
//! worker publishes for a step it holds (`POST /progress`).
//!
//! Each SSE message is `id: <event id>`, `event: <type>`, `data: <TaskEvent as JSON>`. The
//! id is the resume cursor: a client that reconnects with `Last-Event-ID` gets every event
//! after it, from any master replica.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{StepError, TaskId, WorkerId};

/// Largest `output` or `result` carried in an event, as JSON text. A larger one is left
/// out and `truncated` is set: `GET /task/{id}` has it whole.
pub const MAX_EVENT_VALUE_BYTES: usize = 16 * 1024;

/// Largest `messages` of one `POST /progress`, as JSON text (`413` beyond).
pub const MAX_PROGRESS_BYTES: usize = 64 * 1024;

/// Most `step.progress` events one task keeps; later progress is refused (`429`,
/// `progress_limit`) so partial output can never crowd out the orchestration events.
pub const MAX_PROGRESS_EVENTS: u32 = 5_000;

/// One event of a task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskEvent {
    /// Its cursor: a later `Last-Event-ID` resumes after it.
    pub id: String,
    /// What happened: `task.submitted`, `step.queued`, `step.dispatched`, `step.progress`,
    /// `step.retrying`, `step.succeeded`, `step.failed`, `step.waiting`, `step.skipped`,
    /// `step.cancelled`, `signal.received`, `task.succeeded`, `task.failed`,
    /// `task.cancelled`, `task.redriven` (see [`kinds`]).
    #[serde(rename = "type")]
    pub kind: String,
    /// The task.
    pub task_id: TaskId,
    /// When it happened (ms since the epoch).
    pub at_ms: u64,
    /// The step's id in the task (step events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The step's slot, `step` in `/work` (step events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// The attempt (dispatched, progress, retrying, succeeded, failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The worker holding the attempt (dispatched, progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<WorkerId>,
    /// A step's output (`step.succeeded`) or the task's result (`task.succeeded`), unless
    /// larger than [`MAX_EVENT_VALUE_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The output was left out for its size.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Why a step or the task failed, or why a step is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
    /// When a retried step is queued again, or a waiting step's timer fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at_ms: Option<u64>,
    /// Partial output (`step.progress`), in the order the agent produced it. The `llm`
    /// agent's tokens come as `{"delta": "<text>"}`, consecutive ones joined.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Value>,
    /// The signal's name (`signal.received`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// The signal came before its wait step was reached and is kept for it
    /// (`signal.received`); the step's `step.succeeded` carries the payload when it is.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub buffered: bool,
}

impl TaskEvent {
    /// Whether this event ends the task's stream (the task finished).
    pub fn is_final(&self) -> bool {
        matches!(
            self.kind.as_str(),
            kinds::TASK_SUCCEEDED | kinds::TASK_FAILED | kinds::TASK_CANCELLED
        )
    }
}

/// The event types.
pub mod kinds {
    /// The task was accepted.
    pub const TASK_SUBMITTED: &str = "task.submitted";
    /// A step entered its queue.
    pub const STEP_QUEUED: &str = "step.queued";
    /// A step attempt was leased to a worker.
    pub const STEP_DISPATCHED: &str = "step.dispatched";
    /// Partial output of a running attempt.
    pub const STEP_PROGRESS: &str = "step.progress";
    /// An attempt failed and the step runs again at `due_at_ms`.
    pub const STEP_RETRYING: &str = "step.retrying";
    /// A step succeeded.
    pub const STEP_SUCCEEDED: &str = "step.succeeded";
    /// A step failed for good.
    pub const STEP_FAILED: &str = "step.failed";
    /// A wait or sleep step started waiting.
    pub const STEP_WAITING: &str = "step.waiting";
    /// A signal came for a wait step (`POST /task/{id}/signal`): it released the step, or,
    /// with `buffered`, it is kept until the step is reached.
    pub const SIGNAL_RECEIVED: &str = "signal.received";
    /// A step will not run (a router did not pick it).
    pub const STEP_SKIPPED: &str = "step.skipped";
    /// A step was stopped (the task was cancelled, or another step failed it).
    pub const STEP_CANCELLED: &str = "step.cancelled";
    /// The task succeeded; `output` is its result.
    pub const TASK_SUCCEEDED: &str = "task.succeeded";
    /// The task failed.
    pub const TASK_FAILED: &str = "task.failed";
    /// The task was cancelled.
    pub const TASK_CANCELLED: &str = "task.cancelled";
    /// A failed task runs again.
    pub const TASK_REDRIVEN: &str = "task.redriven";
}

/// `POST /progress`: partial output of a step attempt the worker holds, with
/// `Authorization: Bearer <WORKER_TOKEN>`. Fenced like a report: progress of an attempt
/// that is no longer current, or from a worker that does not hold it, is discarded.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepProgress {
    /// The task.
    pub task_id: TaskId,
    /// The step's slot.
    pub step: u32,
    /// The attempt from the `WorkRequest`.
    pub attempt: u32,
    /// The worker holding it.
    pub worker_id: WorkerId,
    /// The partial messages, oldest first (at least one; at most
    /// 64 KiB as JSON text: `MAX_PROGRESS_BYTES`).
    pub messages: Vec<Value>,
}

//! The client API's task types (`POST /task`, `GET /task/{id}`, `GET /result/{id}`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Capability, StepError, TaskId, WorkerId};

/// `POST /task`: either a named `pipeline` or inline `steps`, plus the input.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubmitTask {
    /// A pipeline name from the master's configuration (`default` is built in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// Inline steps: the capabilities to run, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<Capability>>,
    /// The task's input: any JSON. It is step 0's input and every step's context.
    #[serde(default)]
    pub input: Value,
    /// Higher runs first within a capability's queue. Default 0; range -100..=100.
    #[serde(default)]
    pub priority: i32,
    /// A client-chosen key: submitting the same key again returns the first task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// A URL the master POSTs the final task view to when the task finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

/// `202` (new) or `200` (idempotent repeat) answer to `POST /task`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubmitResponse {
    /// The task's id.
    pub task_id: TaskId,
    /// Its status now.
    pub status: TaskStatus,
}

/// A task's state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Accepted; no step has been dispatched yet.
    Queued,
    /// At least one step was dispatched and the task has not finished.
    Running,
    /// Every step succeeded; `result` holds the last step's output.
    Succeeded,
    /// A step failed for good; the task is in the dead-letter set.
    Failed,
    /// Cancelled by its client.
    Cancelled,
}

impl TaskStatus {
    /// Whether the task has finished (it will not change again unless redriven).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A step's state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Waiting for the steps before it.
    Pending,
    /// In its capability's queue (possibly waiting out a retry backoff).
    Queued,
    /// Leased to a worker.
    Dispatched,
    /// Done; `output` holds its output.
    Succeeded,
    /// Failed for good.
    Failed,
}

impl StepStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Queued => "queued",
            Self::Dispatched => "dispatched",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// One step in `GET /task/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepView {
    /// The step's position, from 0.
    pub index: u32,
    /// The capability it needs.
    pub capability: Capability,
    /// Its state.
    pub status: StepStatus,
    /// The worker running or last running it.
    pub worker_id: Option<WorkerId>,
    /// Attempts started so far.
    pub attempts: u32,
    /// Its output, once succeeded.
    pub output: Option<Value>,
    /// The last error, if an attempt failed.
    pub error: Option<StepError>,
    /// When it was last queued (ms since the epoch).
    pub queued_at_ms: Option<u64>,
    /// When its current attempt was dispatched.
    pub dispatched_at_ms: Option<u64>,
    /// When it finished.
    pub finished_at_ms: Option<u64>,
}

/// `GET /task/{id}`: the task's full status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskView {
    /// The task's id.
    pub task_id: TaskId,
    /// Its state.
    pub status: TaskStatus,
    /// The pipeline name, or `null` for inline steps.
    pub pipeline: Option<String>,
    /// Its priority.
    pub priority: i32,
    /// The task's input.
    pub input: Value,
    /// Every step.
    pub steps: Vec<StepView>,
    /// The final output (the last step's), once succeeded.
    pub result: Option<Value>,
    /// Why it failed, once failed.
    pub error: Option<StepError>,
    /// When it was accepted (ms since the epoch).
    pub created_at_ms: u64,
    /// When its first step was dispatched.
    pub started_at_ms: Option<u64>,
    /// When it finished.
    pub finished_at_ms: Option<u64>,
    /// The completion callback's delivery, for a task submitted with a `callback_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<CallbackView>,
}

/// The delivery of a task's completion callback, in `GET /task/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CallbackView {
    /// Where the final view is POSTed.
    pub url: String,
    /// `pending` until delivered or given up on.
    pub status: CallbackStatus,
    /// Delivery attempts started so far (for the task's latest finish).
    pub attempts: u32,
    /// Why the last failed attempt failed.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// Where a completion callback's delivery stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum CallbackStatus {
    /// The task has not finished, or it has and delivery is still being tried.
    Pending,
    /// The receiver answered `2xx`.
    Delivered,
    /// Every attempt failed (`CALLBACK_MAX_ATTEMPTS`); no more are made.
    Failed,
}

impl CallbackStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }
}

/// `GET /result/{id}`: the final output, or the state while running.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskResult {
    /// The task's id.
    pub task_id: TaskId,
    /// Its state.
    pub status: TaskStatus,
    /// The final output once succeeded.
    pub result: Option<Value>,
    /// Why it failed, once failed.
    pub error: Option<StepError>,
}

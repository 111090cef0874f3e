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
    /// Inline steps: capability names (a chain) or step objects (a graph); see
    /// `docs/workflows.md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepSpec>>,
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
    /// A budget for the task's model calls, enforced by the llm-gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::usage::Budget>,
}

/// One step as written in `POST /task` `steps` and in a pipeline's TOML: a capability
/// name (a link of a chain: it needs the step before it), or a [`StepDef`].
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum StepSpec {
    /// Just the capability.
    Name(Capability),
    /// A step with an id, dependencies and options.
    Def(Box<StepDef>),
}

/// By hand rather than `untagged`, so that what is wrong with a step reaches the user
/// ("invalid capability …", "unknown field `capabilty` …") instead of "data did not match
/// any variant".
impl<'de> Deserialize<'de> for StepSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(deserializer)? {
            Value::String(name) => Capability::new(name).map(Self::Name).map_err(Error::custom),
            object @ Value::Object(_) => serde_json::from_value(object)
                .map(|def| Self::Def(Box::new(def)))
                .map_err(Error::custom),
            other => Err(Error::custom(format!(
                "a step is a capability name or a step object, not {other}"
            ))),
        }
    }
}

impl From<Capability> for StepSpec {
    fn from(c: Capability) -> Self {
        Self::Name(c)
    }
}

/// A step of a graph (`docs/workflows.md`). Exactly one of `capability`, `wait` and
/// `sleep_ms`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    /// Unique in the task, `[a-z0-9_-]{1,64}`. Defaults to the capability when that is
    /// unique in the task, else `<capability>-<index>` (`wait-<index>`, `sleep-<index>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The capability a worker must advertise (worker steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<Capability>,
    /// The ids this step waits for. Absent: the step before it in the list; `[]`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs: Option<Vec<String>>,
    /// Run once per element of an array (worker steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapDef>,
    /// The output's `next` picks which successors run (worker steps).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub router: bool,
    /// When the step fails for good the task goes on; dependants receive its error.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_failure: bool,
    /// A durable wait for a signal (no worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<WaitDef>,
    /// A durable delay of this many milliseconds (no worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_ms: Option<u64>,
    /// Attempts before the step fails for good (worker steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// How long one attempt may run, in milliseconds (worker steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// A step's fan-out: `over` names an array (`input.path` or `<step id>.path`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MapDef {
    /// The path to the array.
    pub over: String,
    /// Most instances running at once (default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

/// A wait step's signal and timeout.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WaitDef {
    /// The signal's name (default: the step's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// How long to wait, in milliseconds (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// What a timeout does.
    #[serde(default)]
    pub on_timeout: OnTimeout,
}

/// What happens when a wait times out.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// The step fails for good (`kind: "wait_timeout"`).
    #[default]
    Fail,
    /// The step succeeds with output `{"timed_out": true}`.
    Continue,
}

/// `POST /task/{id}/signal`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// The signal's name: a wait step of the task listens for it.
    pub name: String,
    /// Becomes the wait step's output.
    #[serde(default)]
    pub payload: Value,
}

/// `202` answer to `POST /task/{id}/signal`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SignalResponse {
    /// `delivered` (a step was waiting for it) or `buffered` (kept until the step is
    /// reached).
    pub status: SignalStatus,
}

/// What became of a signal.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SignalStatus {
    /// A wait step was waiting for it; it succeeded with the payload.
    Delivered,
    /// Its wait step has not been reached; it will succeed at once when it is.
    Buffered,
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
    /// Running, but nothing is queued or running: only wait (or sleep) steps hold it.
    Waiting,
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
            Self::Waiting => "waiting",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A step's state.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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
    /// A wait step waiting for its signal, or a sleep step sleeping.
    Waiting,
    /// A map step whose instances are running.
    Running,
    /// Not run: a router did not pick it, or every step it needs was skipped.
    Skipped,
    /// Stopped because the task was cancelled or failed elsewhere.
    Cancelled,
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
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Skipped => "skipped",
            Self::Cancelled => "cancelled",
        }
    }

    /// The status's wire name parsed back.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "queued" => Self::Queued,
            "dispatched" => Self::Dispatched,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "waiting" => Self::Waiting,
            "running" => Self::Running,
            "skipped" => Self::Skipped,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// What kind of step it is.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// Runs on a worker that serves its capability.
    #[default]
    Work,
    /// Waits for a signal.
    Wait,
    /// Sleeps.
    Sleep,
}

/// A map step's fan-out, in `GET /task/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MapView {
    /// The path to the array, as written.
    pub over: String,
    /// Most instances running at once.
    pub concurrency: u32,
    /// How many elements (instances) once the step has expanded.
    pub total: Option<u32>,
    /// Instances finished.
    pub finished: u32,
}

/// A wait step's settings, in `GET /task/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WaitView {
    /// The signal it listens for.
    pub signal: String,
    /// How long it waits.
    pub timeout_ms: u64,
    /// What a timeout does.
    pub on_timeout: OnTimeout,
}

/// One step in `GET /task/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepView {
    /// The step's slot, from 0: declared steps in the order written, then map instances
    /// as their steps expand. `step` in `/work` and `/result`.
    pub index: u32,
    /// Its id in the task (`<map step id>[<element>]` for a map instance).
    #[serde(default)]
    pub id: String,
    /// Worker step, wait or sleep.
    #[serde(default)]
    pub kind: StepKind,
    /// The capability it needs (worker steps).
    #[serde(default)]
    pub capability: Option<Capability>,
    /// The ids of the steps it waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// Its output picks which successors run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub router: bool,
    /// Its failure does not fail the task.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_failure: bool,
    /// Its fan-out, for a map step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapView>,
    /// A map step's instances, in element order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<StepView>,
    /// A map instance's element index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub element_index: Option<u32>,
    /// A wait step's signal and timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<WaitView>,
    /// A sleep step's delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_ms: Option<u64>,
    /// When a waiting wait or sleep step's timer fires (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wakes_at_ms: Option<u64>,
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
    /// Its model calls' tokens and cost, from the llm-gateway's ledger (`GET /task/{id}`
    /// only, when there were any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::Usage>,
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
    /// Every declared step, in the order written (map instances under their step).
    pub steps: Vec<StepView>,
    /// The final output once succeeded: the output of the step nothing needs (the last
    /// step of a chain), or an object of such steps' outputs by id when there are several
    /// (skipped ones left out).
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
    /// Its model calls' tokens and cost in total, and its budget (`GET /task/{id}` only,
    /// when it has either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::UsageSummary>,
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

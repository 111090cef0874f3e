//! The master ↔ worker protocol: `POST {worker}/work` carries a [`WorkRequest`]; the worker
//! answers `202` at once and later `POST {master}/result` with a [`ResultReport`]; workers
//! keep a [`WorkerRecord`] in Redis (see `registry`).
//!
//! Batches: a worker whose record has `max_batch` above 1 takes a JSON array of steps on
//! `POST /work` and answers each ([`WorkBatchAnswer`]); a worker may send several reports
//! in one `POST /results` ([`ResultBatchAnswer`]). Both are optional: single requests keep
//! working, so workers in other languages need neither.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Capability, TaskId, WorkerId};

/// One step, leased to one worker for one attempt. Sent as the body of `POST /work` with
/// `Authorization: Bearer <WORKER_TOKEN>` and `x-request-id`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkRequest {
    /// The task.
    pub task_id: TaskId,
    /// The step's index in the task, from 0.
    pub step: u32,
    /// The attempt number, from 1. The report must carry it back: it is the fencing token.
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub attempt: u32,
    /// The capability the step needs.
    pub capability: Capability,
    /// The step's input: the previous step's output, or the task input for step 0.
    pub input: Value,
    /// What the step may also look at.
    pub context: StepContext,
    /// When the step must be finished (ms since the epoch); the worker's timeout.
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub deadline_ms: u64,
    /// The worker this attempt is leased to. A worker that is someone else refuses the
    /// request (`421 misdirected`): an address shared by several workers (a name that DNS
    /// spreads over replicas) must not let a step run on a worker the master did not lease
    /// it to. Absent from older masters; then any worker takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<WorkerId>,
    /// The step's request id, in a batch (a single request carries it in `x-request-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl WorkRequest {
    /// The step this request is about.
    pub fn step_ref(&self) -> StepRef {
        StepRef {
            task_id: self.task_id.clone(),
            step: self.step,
            attempt: self.attempt,
        }
    }
}

/// Everything a step may look at besides its input.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepContext {
    /// The task's original input.
    pub task_input: Value,
    /// The outputs of the steps this one needs, in order: in a chain, the step before
    /// (the same value as `input`). Never the whole history, so a request does not grow
    /// with the pipeline's length.
    pub previous: Vec<PriorOutput>,
    /// The pipeline's name, when it has one.
    #[serde(default)]
    pub pipeline: Option<String>,
    /// How many steps the task has.
    pub total_steps: u32,
    /// The step's id in the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<String>,
    /// For a map instance: its element's index (its element is `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub element_index: Option<u32>,
}

/// A needed step's outcome, in a `StepContext`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PriorOutput {
    /// The step's index.
    pub step: u32,
    /// Its id.
    #[serde(default)]
    pub id: String,
    /// Its capability (none for a wait or sleep step).
    #[serde(default)]
    pub capability: Option<Capability>,
    /// `succeeded`, `skipped`, or `failed` (a step allowed to fail).
    #[serde(default = "succeeded")]
    pub status: super::StepStatus,
    /// Its output (`null` when skipped or failed).
    pub output: Value,
    /// Its error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
}

fn succeeded() -> super::StepStatus {
    super::StepStatus::Succeeded
}

/// A step's outcome, as a worker reports it.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReportStatus {
    /// The agent returned an output.
    Succeeded,
    /// The agent failed; `error` says why and whether to retry.
    Failed,
}

/// Why a step failed.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepError {
    /// What went wrong.
    pub message: String,
    /// Whether another attempt may succeed (a gateway 429/5xx, a timeout) or not (a 4xx, a
    /// bad template). The master retries only retryable failures.
    #[serde(default)]
    pub retryable: bool,
    /// A short machine-readable kind (`timeout`, `agent`, `upstream`, `lease_expired`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

impl StepError {
    /// A failure another attempt may fix.
    pub fn retryable(kind: &str, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            kind: Some(kind.to_string()),
        }
    }

    /// A failure another attempt would repeat.
    pub fn permanent(kind: &str, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            kind: Some(kind.to_string()),
        }
    }
}

/// `POST /result`: a worker reports one attempt's outcome. `output` goes with `succeeded`
/// (absent means `null`); `error` is required with `failed` and must be absent with
/// `succeeded` (else `422 invalid`).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResultReport {
    /// The task.
    pub task_id: TaskId,
    /// The step's index.
    pub step: u32,
    /// The attempt from the `WorkRequest`, from 1; a report for an attempt that is no longer
    /// current is acknowledged and discarded.
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub attempt: u32,
    /// The reporting worker.
    pub worker_id: WorkerId,
    /// Succeeded or failed.
    pub status: ReportStatus,
    /// The output, when succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The error, when failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
    /// How long the agent ran, in milliseconds: any non-negative JSON number (a fraction is
    /// rounded to the nearest millisecond, as a worker timing with floats would send it).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "milliseconds"
    )]
    #[cfg_attr(feature = "schema", schemars(schema_with = "milliseconds_schema"))]
    pub duration_ms: Option<u64>,
}

/// Reads a duration in milliseconds from any non-negative JSON number, rounding a fraction,
/// so a worker that times steps with floats is not refused for it.
fn milliseconds<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<u64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(de)? else {
        return Ok(None);
    };
    if let Some(ms) = n.as_u64() {
        return Ok(Some(ms));
    }
    match n.as_f64() {
        Some(ms) if ms.is_finite() && ms >= 0.0 => {
            // Saturates at u64::MAX, which no real duration reaches.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Ok(Some(ms.round() as u64))
        }
        _ => Err(serde::de::Error::custom(format!(
            "`duration_ms` must be a non-negative number of milliseconds, got {n}"
        ))),
    }
}

/// What [`milliseconds`] accepts: any non-negative number, or `null` (as if absent).
#[cfg(feature = "schema")]
fn milliseconds_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let serde_json::Value::Object(map) = serde_json::json!({
        "type": ["number", "null"],
        "minimum": 0,
        "description": "How long the agent ran, in milliseconds: any non-negative JSON number \
            (a fraction is rounded to the nearest millisecond).",
    }) else {
        unreachable!("a JSON object literal is an object")
    };
    schemars::Schema::from(map)
}

impl ResultReport {
    /// Checks that the report is consistent (an output with success, an error with failure).
    pub fn validate(&self) -> Result<(), String> {
        match self.status {
            ReportStatus::Succeeded if self.error.is_some() => {
                Err("`error` must be absent when `status` is `succeeded`".into())
            }
            ReportStatus::Failed if self.error.is_none() => {
                Err("`error` is required when `status` is `failed`".into())
            }
            _ if self.attempt == 0 => Err("`attempt` starts at 1".into()),
            _ => Ok(()),
        }
    }
}

/// The master's answer to `POST /result` (always `200` for a well-formed report from a
/// worker with the right token).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResultAck {
    /// Recorded, or discarded because the attempt was not current.
    pub status: AckStatus,
}

/// The worker's answer to `POST /work` when it takes the step (`202`): the step runs in the
/// background and its outcome comes later as a `ResultReport` on `POST /result`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkAccepted {
    /// Always `true`.
    pub accepted: bool,
    /// `true` when the worker already held this attempt (the same task, step and attempt):
    /// it is not run a second time, and one report comes for it. Absent means `false`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// Most steps in one batched `POST /work`, and most reports in one `POST /results`.
pub const MAX_BATCH: usize = 64;

/// Reads a batch body: a JSON array of at most `max` `what`s (for `POST /work` and
/// `POST /results`, [`MAX_BATCH`]), each left unparsed so that one malformed element is
/// refused alone. Reading stops at the first element over `max`.
pub fn batch_elements<'de, A: serde::de::SeqAccess<'de>>(
    mut seq: A,
    what: &str,
    max: usize,
) -> Result<Vec<Box<serde_json::value::RawValue>>, A::Error> {
    let mut elements = Vec::new();
    while let Some(element) = seq.next_element::<Box<serde_json::value::RawValue>>()? {
        if elements.len() == max {
            return Err(serde::de::Error::custom(format!(
                "a batch holds at most {max} {what}"
            )));
        }
        elements.push(element);
    }
    Ok(elements)
}

/// A batch body that is an array and nothing else (`POST /results`, `POST /tasks`): at most
/// `MAX` elements, each left unparsed (see [`batch_elements`]).
#[derive(Debug)]
pub struct RawBatch<const MAX: usize>(pub Vec<Box<serde_json::value::RawValue>>);

impl<'de, const MAX: usize> Deserialize<'de> for RawBatch<MAX> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Elements<const MAX: usize>;
        impl<'de, const MAX: usize> serde::de::Visitor<'de> for Elements<MAX> {
            type Value = RawBatch<MAX>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "an array of at most {MAX} elements")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                Ok(RawBatch(batch_elements(seq, "elements", MAX)?))
            }
        }
        deserializer.deserialize_seq(Elements::<MAX>)
    }
}

/// One step's answer in a batched `POST /work`: what a `POST /work` of this step alone
/// would have answered.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkItemAnswer {
    /// The HTTP status of that answer: `202` taken, else the refusal's (`429` full, `503`
    /// draining or degraded, `421` misdirected, `422` not served or invalid, …).
    pub status: u16,
    /// With `202`: the worker already held this attempt, and runs it once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// With any other status: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::http::ErrorDetail>,
}

/// The worker's answer to a batched `POST /work` (`200`): one answer per step, in the
/// order of the request.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkBatchAnswer {
    /// The answers, one per step.
    pub steps: Vec<WorkItemAnswer>,
}

/// One report's answer in `POST /results`: what a `POST /result` of this report alone
/// would have answered.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResultItemAnswer {
    /// The HTTP status of that answer: `200` settled (see `ack`), `400`/`422` a report
    /// that is not valid (not retried).
    pub status: u16,
    /// With `200`: recorded, or discarded as stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<AckStatus>,
    /// With any other status: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::http::ErrorDetail>,
}

/// The master's answer to `POST /results` (`200`): one answer per report, in the order of
/// the request. A failure of the whole request (`401`, `413`, `503`, …) is an ordinary
/// error body, and settles none of the reports.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResultBatchAnswer {
    /// The answers, one per report.
    pub results: Vec<ResultItemAnswer>,
}

/// What the master did with a report.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    /// The outcome was recorded.
    Recorded,
    /// The attempt was not current (a newer attempt exists, or the task finished or was
    /// cancelled): acknowledged and discarded. The worker must not retry.
    Discarded,
}

/// One step attempt, as a worker lists it in `in_flight`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct StepRef {
    /// The task.
    pub task_id: TaskId,
    /// The step's index.
    pub step: u32,
    /// The attempt.
    pub attempt: u32,
}

/// A worker's record in Redis, refreshed by its heartbeat: the JSON value of
/// `{prefix}:{registry}:worker:{id}`, written with a TTL of three heartbeat intervals.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerRecord {
    /// The worker's id.
    pub id: WorkerId,
    /// The base URL the master calls (`{url}/work`).
    pub url: String,
    /// The capabilities it serves.
    pub capabilities: Vec<Capability>,
    /// How many steps it runs at once.
    pub max_concurrency: u32,
    /// The steps it holds now (running, or delivering their result); the master extends
    /// their leases. Absent means none.
    #[serde(default)]
    pub in_flight: Vec<StepRef>,
    /// Its software version.
    pub version: String,
    /// When it started (ms since the epoch).
    pub started_at_ms: u64,
    /// Whether it is draining (finishing in-flight work, taking none). Absent means `false`.
    #[serde(default)]
    pub draining: bool,
    /// When this record was written (ms since the epoch, the worker's clock; the Rust
    /// worker's `Registry::heartbeat` sets it). A lease is extended only from the heartbeat
    /// that listed its step, so a dead worker's steps lapse `LEASE_MS` after its last beat,
    /// not after its record expires. `0` or absent (a worker that does not send it) means
    /// "now", as the master reads the record.
    #[serde(default)]
    pub heartbeat_at_ms: u64,
    /// Why the worker takes no new steps although it is alive (for example: it cannot
    /// deliver results to the master). Dispatchers skip it and stop extending its leases,
    /// so its steps go to a healthy worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    /// Why the worker takes no new steps for now, although it can still finish and report
    /// the ones it holds (for example: the agent service behind an `http` agent fails its
    /// health check). Dispatchers skip it but keep extending the leases it lists, unlike
    /// `degraded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    /// The most steps it takes in one `POST /work` (a JSON array of [`WorkRequest`]s,
    /// answered with a [`WorkBatchAnswer`]). Absent, `0` or `1`: one step per request.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_batch: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl WorkerRecord {
    /// The record a worker starting now registers: nothing in flight, not draining, not
    /// degraded, this build's version.
    pub fn starting(
        id: WorkerId,
        url: String,
        capabilities: Vec<Capability>,
        max_concurrency: u32,
    ) -> Self {
        Self {
            id,
            url,
            capabilities,
            max_concurrency,
            in_flight: Vec::new(),
            version: crate::VERSION.to_string(),
            started_at_ms: crate::wire::now_ms(),
            draining: false,
            heartbeat_at_ms: 0,
            degraded: None,
            unavailable: None,
            max_batch: 0,
        }
    }

    /// Free slots by its own count.
    pub fn free_slots(&self) -> u32 {
        self.max_concurrency
            .saturating_sub(u32::try_from(self.in_flight.len()).unwrap_or(u32::MAX))
    }

    /// Whether it serves a capability.
    pub fn serves(&self, capability: &Capability) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}

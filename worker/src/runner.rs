//! Where a step is decided and run: admission (capability, capacity, duplicates, drain),
//! the agent under the step's deadline, then result delivery, all tracked so a drain can
//! wait for them.

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::wire::{
    Capability, ReportStatus, ResultReport, StepError, WorkRequest, WorkerId, now_ms,
};
use futures::FutureExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::agent::{Agent, Agents, Progress, with_progress, with_request_id};
use crate::delivery::{Delivery, Outcome};
use crate::error::WorkError;
use crate::inflight::{Admission, InFlight, InFlightGuard};
use crate::metrics;
use crate::progress::{AttemptProgress, ProgressForwarder};

/// What `POST /work` did with an acceptable step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Started.
    New,
    /// The same attempt is already held; not started twice.
    Duplicate,
}

/// Runs steps and delivers their results.
pub struct Runner {
    /// This worker's id, put on every report.
    worker_id: WorkerId,
    /// Capability → agent.
    agents: Agents,
    /// What `agents` serves, for the `422` check without a lookup.
    capabilities: BTreeSet<Capability>,
    /// The steps held.
    in_flight: Arc<InFlight>,
    /// Posts results to the master.
    delivery: Delivery,
    /// Every spawned step, so a drain can wait for them.
    tracker: TaskTracker,
    /// Fired when the drain's grace runs out: running steps and deliveries stop where
    /// they are and are left to lease expiry.
    abort: CancellationToken,
    /// Where each attempt's partial output goes (`POST {MASTER_URL}/progress`); `None` when
    /// `PROGRESS_FLUSH_MS=0`, and partial output is only counted.
    progress: Option<Arc<ProgressForwarder>>,
}

impl Runner {
    /// A runner for these agents.
    pub fn new(
        worker_id: WorkerId,
        agents: Agents,
        in_flight: Arc<InFlight>,
        delivery: Delivery,
    ) -> Self {
        Self {
            worker_id,
            capabilities: agents.capabilities().into_iter().collect(),
            agents,
            in_flight,
            delivery,
            tracker: TaskTracker::new(),
            abort: CancellationToken::new(),
            progress: None,
        }
    }

    /// The runner, forwarding each attempt's partial output with `forwarder`.
    pub fn with_progress(mut self, forwarder: Option<ProgressForwarder>) -> Self {
        self.progress = forwarder.map(Arc::new);
        self
    }

    /// Checks and admits a step, and starts it in the background.
    pub fn accept(&self, step: WorkRequest, request_id: String) -> Result<Accepted, WorkError> {
        if let Some(leased_to) = &step.worker_id
            && *leased_to != self.worker_id
        {
            return Err(WorkError::Misdirected(
                leased_to.clone(),
                self.worker_id.clone(),
            ));
        }
        if step.attempt == 0 {
            return Err(WorkError::Invalid("`attempt` starts at 1".into()));
        }
        if step.deadline_ms == 0 {
            return Err(WorkError::Invalid(
                "`deadline_ms` must be a time in ms since the epoch".into(),
            ));
        }
        let Some(agent) = self.agents.get(&step.capability).cloned() else {
            return Err(WorkError::CapabilityNotServed(step.capability));
        };
        let guard = match self.in_flight.admit(step.step_ref()) {
            Admission::New(guard) => guard,
            Admission::Duplicate => return Ok(Accepted::Duplicate),
            Admission::Full => return Err(WorkError::AtCapacity),
            Admission::Draining => return Err(WorkError::Draining),
            Admission::Degraded(reason) => return Err(WorkError::Degraded(reason)),
            Admission::Unavailable(reason) => return Err(WorkError::AgentUnavailable(reason)),
        };
        ::metrics::counter!(metrics::STEPS_RECEIVED, "capability" => step.capability.to_string())
            .increment(1);
        // A root span: the step outlives the `/work` request that brought it.
        let span = tracing::info_span!(
            parent: None,
            "step",
            task_id = %step.task_id,
            step = step.step,
            attempt = step.attempt,
            capability = %step.capability,
            request_id = %request_id,
        );
        // In the trace, though, it is the child of the `/work` request (whose parent is the
        // master's step attempt), so the agent's calls nest under the dispatch.
        common::traces::follow(&span, &tracing::Span::current());
        let progress = self
            .progress
            .as_ref()
            .map(|forwarder| Arc::new(forwarder.attempt(&step, &request_id)));
        let job = StepJob {
            worker_id: self.worker_id.clone(),
            agent,
            progress,
            step,
            request_id,
            delivery: self.delivery.clone(),
            abort: self.abort.clone(),
            _guard: guard,
        };
        self.tracker.spawn(job.run().instrument(span));
        Ok(Accepted::New)
    }

    /// The capabilities served.
    pub fn capabilities(&self) -> &BTreeSet<Capability> {
        &self.capabilities
    }

    /// Waits for every started step to run and settle its result. Call after admission
    /// has stopped (the in-flight table is draining).
    pub async fn wait_idle(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Stops every running step and delivery where it is.
    pub async fn abandon(&self) {
        self.abort.cancel();
        self.tracker.close();
        // Aborted tasks end at their next await point; this is quick.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
    }
}

/// One step attempt, from agent to acknowledged result.
struct StepJob {
    worker_id: WorkerId,
    agent: Arc<dyn Agent>,
    /// Forwards the agent's partial output, when forwarding is on.
    progress: Option<Arc<AttemptProgress>>,
    step: WorkRequest,
    request_id: String,
    delivery: Delivery,
    abort: CancellationToken,
    /// Keeps the step listed in the heartbeat until the result is settled.
    _guard: InFlightGuard,
}

impl StepJob {
    async fn run(self) {
        let capability = self.step.capability.to_string();
        let started = Instant::now();
        let result = tokio::select! {
            result = execute(&*self.agent, &self.step, &self.request_id, self.progress.clone()) => result,
            () = self.abort.cancelled() => {
                tracing::warn!("step abandoned at the end of the drain; its lease will lapse");
                return;
            }
        };
        let elapsed = started.elapsed();
        ::metrics::histogram!(metrics::STEP_DURATION, "capability" => capability.clone())
            .record(elapsed.as_secs_f64());
        let (status, output, error) = match result {
            Ok(output) => {
                ::metrics::counter!(metrics::STEPS_SUCCEEDED, "capability" => capability)
                    .increment(1);
                tracing::info!(duration_ms = elapsed.as_millis(), "step succeeded");
                (ReportStatus::Succeeded, Some(output), None)
            }
            Err(error) => {
                let kind = error.kind.clone().unwrap_or_else(|| "agent".into());
                ::metrics::counter!(
                    metrics::STEPS_FAILED,
                    "capability" => capability,
                    "kind" => kind,
                )
                .increment(1);
                tracing::warn!(
                    error = %error.message,
                    retryable = error.retryable,
                    kind = ?error.kind,
                    "step failed"
                );
                (ReportStatus::Failed, None, Some(error))
            }
        };
        let report = ResultReport {
            task_id: self.step.task_id.clone(),
            step: self.step.step,
            attempt: self.step.attempt,
            worker_id: self.worker_id.clone(),
            status,
            output,
            error,
            duration_ms: Some(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)),
        };
        // The last partial output goes before the report, so a client sees the final tokens
        // before `step.succeeded`; bounded, so a slow master cannot hold the report back.
        if let Some(progress) = &self.progress {
            progress.finish().await;
        }
        let outcome = self
            .delivery
            .deliver(&report, &self.request_id, &self.abort)
            .await;
        // A success the master refuses for good (an output over its body limit, or nested
        // deeper than it accepts) would otherwise wait out its lease and fail the same way
        // on every attempt: report the step failed for good instead, which the master can
        // record.
        if let Outcome::Rejected(status) = outcome
            && report.status == ReportStatus::Succeeded
            && matches!(
                status,
                reqwest::StatusCode::PAYLOAD_TOO_LARGE | reqwest::StatusCode::UNPROCESSABLE_ENTITY
            )
        {
            let error = StepError::permanent(
                "output_refused",
                format!(
                    "the master refused the step's output ({}): larger than its body limit or \
                     nested deeper than it accepts (see the worker's log)",
                    status.as_u16()
                ),
            );
            tracing::error!(
                status = status.as_u16(),
                "the master refused the step's output; reporting the step failed"
            );
            let refused = ResultReport {
                status: ReportStatus::Failed,
                output: None,
                error: Some(error),
                ..report
            };
            self.delivery
                .deliver(&refused, &self.request_id, &self.abort)
                .await;
        }
    }
}

/// Runs the agent until the step's deadline, with `progress` (when forwarding is on) as its
/// [`crate::current_progress`]; a timeout and a panic become step errors.
async fn execute(
    agent: &dyn Agent,
    step: &WorkRequest,
    request_id: &str,
    progress: Option<Arc<AttemptProgress>>,
) -> Result<Value, StepError> {
    let budget = Duration::from_millis(step.deadline_ms.saturating_sub(now_ms()));
    let handle = with_request_id(request_id.to_string(), agent.handle(step));
    let call = async move {
        match progress {
            Some(progress) => with_progress(progress as Arc<dyn Progress>, handle).await,
            None => handle.await,
        }
    };
    let call = AssertUnwindSafe(call).catch_unwind();
    match tokio::time::timeout(budget, call).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => {
            let detail = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %detail, "the agent panicked");
            Err(StepError::permanent("panic", "the agent panicked"))
        }
        Err(_) => Err(StepError::retryable(
            "timeout",
            format!(
                "the step did not finish by its deadline ({} ms after it was accepted)",
                budget.as_millis()
            ),
        )),
    }
}

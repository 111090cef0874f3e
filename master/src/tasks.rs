//! Task intake and the client-facing operations: turning a `POST /task` body into a stored
//! task, reading, waiting for, cancelling and redriving tasks, recording worker reports.

use std::sync::Arc;
use std::time::Duration;

use common::wire::{
    MAX_JSON_DEPTH, ResultReport, SubmitTask, TaskId, TaskResult, TaskStatus, TaskView, json_depth,
};

use crate::app::AppState;
use crate::auth::Caller;
use crate::config::StepConfig;
use crate::error::ServiceError;
use crate::store::{
    CancelOutcome, MAX_PRIORITY, NewTask, PlannedStep, RateLimit, RedriveOutcome, ReportOutcome,
    SubmitOutcome, TaskRecord,
};

/// Longest `?wait=` on `GET /result/{id}`, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;
/// Longest idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 256;

/// The answer to `POST /task`.
pub struct Submitted {
    /// The task (new, or the one the idempotency key names).
    pub task_id: TaskId,
    /// Whether the task is new (not an idempotent repeat of an earlier submission).
    pub created: bool,
    /// The task's status now.
    pub task_status: TaskStatus,
}

/// Validates and stores a new task, and wakes the dispatcher of its first step.
pub async fn submit(
    state: &AppState,
    client: &str,
    mut body: SubmitTask,
    header_key: Option<String>,
    request_id: String,
) -> Result<Submitted, ServiceError> {
    let key = match (header_key, body.idempotency_key.take()) {
        (Some(h), Some(b)) if h != b => {
            return Err(ServiceError::Invalid(
                "`idempotency_key` and the `Idempotency-Key` header differ".into(),
            ));
        }
        (h, b) => h.or(b),
    };
    if let Some(k) = &key
        && (k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY)
    {
        return Err(ServiceError::Invalid(format!(
            "`idempotency_key` must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
        )));
    }
    // A range check, not `abs()`: `i32::MIN.abs()` overflows.
    if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&body.priority) {
        return Err(ServiceError::Invalid(format!(
            "`priority` must be between -{MAX_PRIORITY} and {MAX_PRIORITY}"
        )));
    }
    if let Some(url) = &body.callback_url {
        crate::callbacks::check_url(url, state.config.callback_allow_private)
            .map_err(|why| ServiceError::Invalid(format!("`callback_url` {why}")))?;
        if state.config.callback_secret.is_empty() {
            return Err(ServiceError::Invalid(
                "`callback_url`: callbacks need CALLBACK_SECRET, which this master does not have \
                 (callbacks are always signed)"
                    .into(),
            ));
        }
    }
    if json_depth(&body.input) > MAX_JSON_DEPTH {
        return Err(ServiceError::Invalid(format!(
            "`input` nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
        )));
    }
    let (pipeline, steps) = plan(state, &body)?;
    let input =
        serde_json::to_string(&body.input).map_err(|e| ServiceError::Internal(e.to_string()))?;
    let id = TaskId::generate();
    let first = steps[0].capability.clone();
    let task = NewTask {
        id: id.clone(),
        client: client.to_string(),
        pipeline,
        steps,
        input,
        priority: body.priority,
        idempotency_key: key,
        callback_url: body.callback_url,
        request_id,
    };
    let limit = RateLimit {
        per_sec: state.config.rate_limit_per_sec,
        burst: state.config.rate_limit_burst,
    };
    match state
        .store
        .submit(task, limit, state.config.retention())
        .await?
    {
        SubmitOutcome::Created => {
            crate::metrics::task_submitted();
            state.dispatcher.ensure_loop(&first);
            state.hub.work_queued(first.as_str());
            tracing::info!(task_id = %id, client, "task accepted");
            Ok(Submitted {
                task_id: id,
                created: true,
                task_status: TaskStatus::Queued,
            })
        }
        SubmitOutcome::Existing(existing) => {
            let status = state
                .store
                .get(&existing)
                .await?
                .map_or(TaskStatus::Queued, |r| r.view.status);
            Ok(Submitted {
                task_id: existing,
                created: false,
                task_status: status,
            })
        }
        SubmitOutcome::RateLimited(retry_after) => Err(ServiceError::RateLimited { retry_after }),
    }
}

/// The pipeline name and steps of a submission.
fn plan(
    state: &AppState,
    body: &SubmitTask,
) -> Result<(Option<String>, Vec<PlannedStep>), ServiceError> {
    let config = &state.config;
    let planned = |s: &StepConfig| match s {
        StepConfig::Name(c) => PlannedStep {
            capability: c.clone(),
            max_attempts: config.max_attempts,
            timeout_ms: config.step_timeout_ms,
        },
        StepConfig::Detailed {
            capability,
            max_attempts,
            timeout_ms,
        } => PlannedStep {
            capability: capability.clone(),
            max_attempts: max_attempts.unwrap_or(config.max_attempts).max(1),
            timeout_ms: timeout_ms.unwrap_or(config.step_timeout_ms).max(1),
        },
    };
    match (&body.pipeline, &body.steps) {
        (Some(_), Some(_)) => Err(ServiceError::Invalid(
            "give either `pipeline` or `steps`, not both".into(),
        )),
        (None, Some(steps)) => {
            if steps.is_empty() {
                return Err(ServiceError::Invalid("`steps` must not be empty".into()));
            }
            if steps.len() > crate::config::MAX_STEPS {
                return Err(ServiceError::Invalid(format!(
                    "`steps` has at most {} entries",
                    crate::config::MAX_STEPS
                )));
            }
            if let Some(unknown) = steps.iter().find(|c| !state.dispatcher.knows(c)) {
                return Err(ServiceError::Invalid(format!(
                    "`steps`: unknown capability `{unknown}` (no pipeline uses it and no live worker serves it)"
                )));
            }
            Ok((
                None,
                steps
                    .iter()
                    .cloned()
                    .map(StepConfig::Name)
                    .map(|s| planned(&s))
                    .collect(),
            ))
        }
        (name, None) => {
            // Neither given: the `default` pipeline, like a queue's default task.
            let name = name.clone().unwrap_or_else(|| "default".to_string());
            let pipeline = state.pipelines.get(&name).ok_or_else(|| {
                ServiceError::Invalid(format!("`pipeline`: unknown pipeline `{name}`"))
            })?;
            Ok((Some(name), pipeline.steps.iter().map(planned).collect()))
        }
    }
}

/// A task the client owns (another client's task is `404`, as if it did not exist).
pub async fn owned(state: &AppState, client: &str, id: &str) -> Result<TaskRecord, ServiceError> {
    visible(state, &Caller::Client(client.to_string()), id).await
}

/// A task the caller may see: its client's, or any for an operator.
async fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<TaskRecord, ServiceError> {
    let not_found = || ServiceError::NotFound(id.to_string());
    let id = TaskId::new(id).map_err(|_| not_found())?;
    let record = state.store.get(&id).await?.ok_or_else(not_found)?;
    match caller {
        Caller::Client(client) if record.client != *client && !state.auth.disabled() => {
            Err(not_found())
        }
        _ => Ok(record),
    }
}

/// The result of a task, waiting up to `wait` for it to finish.
pub async fn result(
    state: &AppState,
    client: &str,
    id: &str,
    wait: Duration,
) -> Result<TaskResult, ServiceError> {
    if wait.is_zero() {
        return Ok(task_result(owned(state, client, id).await?.view));
    }
    let deadline = tokio::time::Instant::now() + wait;
    // Released when this future ends or is dropped (the client went away).
    let waiter = state.hub.task_waiter(id);
    wait_for_end(state, client, id, &waiter, deadline).await
}

/// Reads the task until it has finished or the deadline passed. The wake-up is registered
/// before each read, so a task finishing in between is never missed; a result this replica
/// recorded is taken from the waiter instead of being read back — but only once a read
/// has shown that `client` owns the task: the waiter is shared by everyone polling this
/// id, and what it holds must reach the owner alone (ids are never reused, so one check
/// holds for the whole poll).
async fn wait_for_end(
    state: &AppState,
    client: &str,
    id: &str,
    waiter: &crate::hub::TaskWaiter,
    deadline: tokio::time::Instant,
) -> Result<TaskResult, ServiceError> {
    let mut owner_checked = false;
    loop {
        let notified = waiter.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if owner_checked && let Some(done) = waiter.outcome() {
            return Ok(done);
        }
        let record = owned(state, client, id).await?;
        owner_checked = true;
        let last_round = tokio::time::Instant::now() >= deadline || state.shutdown.is_cancelled();
        if record.view.status.is_terminal() || last_round {
            return Ok(task_result(record.view));
        }
        // Re-read at least every second in case a pub/sub message was missed.
        let next = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep_until(next) => {}
            // Shutting down: answer now (202) rather than hold the drain up.
            () = state.shutdown.cancelled() => {}
        }
    }
}

fn task_result(v: TaskView) -> TaskResult {
    TaskResult {
        task_id: v.task_id,
        status: v.status,
        result: v.result,
        error: v.error,
    }
}

/// Cancels a task: the client's own, or any task for an operator.
pub async fn cancel(state: &AppState, caller: &Caller, id: &str) -> Result<TaskView, ServiceError> {
    let record = visible(state, caller, id).await?;
    let task_id = record.view.task_id.clone();
    match state
        .store
        .cancel(&task_id, state.config.retention())
        .await?
    {
        CancelOutcome::Cancelled => {
            crate::metrics::task_finished(TaskStatus::Cancelled);
            state.hub.task_finished(id);
            tracing::info!(task_id = %task_id, "task cancelled");
        }
        CancelOutcome::AlreadyFinished(status) => {
            return Err(ServiceError::Conflict(format!(
                "task already finished ({})",
                status.as_str()
            )));
        }
        CancelOutcome::NotFound => return Err(ServiceError::NotFound(id.to_string())),
    }
    Ok(visible(state, caller, id).await?.view)
}

/// Records a worker's report.
pub async fn record_report(
    state: &Arc<AppState>,
    report: ResultReport,
) -> Result<bool, ServiceError> {
    report.validate().map_err(ServiceError::Invalid)?;
    if report
        .output
        .as_ref()
        .is_some_and(|o| json_depth(o) > MAX_JSON_DEPTH)
    {
        // It would become the next step's input: refuse it like a task input that deep.
        return Err(ServiceError::Invalid(format!(
            "`output` nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
        )));
    }
    let outcome = state
        .store
        .report(
            &report,
            state.dispatcher.retry_policy(),
            rand::random(),
            state.config.retention(),
        )
        .await?;
    let recorded = outcome != ReportOutcome::Discarded;
    if matches!(
        outcome,
        ReportOutcome::Next { .. } | ReportOutcome::Retry { .. } | ReportOutcome::Done { .. }
    ) {
        state.dispatcher.step_done(&report.worker_id);
    }
    state.dispatcher.after_report(&report, &outcome);
    match &outcome {
        ReportOutcome::Discarded => tracing::info!(task_id = %report.task_id, step = report.step,
            attempt = report.attempt, worker = %report.worker_id,
            "report discarded (attempt not current, or the worker does not hold the lease)"),
        ReportOutcome::Replayed(_) => tracing::info!(task_id = %report.task_id,
            step = report.step, attempt = report.attempt,
            "report repeated after its first answer was lost; answered as recorded again"),
        ReportOutcome::Retry { delay, .. } => tracing::info!(task_id = %report.task_id,
            step = report.step, delay_ms = delay.as_millis() as u64, "step will be retried"),
        // A callback was put in the outbox by the same store step (see callbacks.rs).
        ReportOutcome::Done { status, .. } => {
            tracing::info!(task_id = %report.task_id, status = status.as_str(), "task finished");
        }
        ReportOutcome::Next { .. } => {}
    }
    Ok(recorded)
}

/// Redrives one failed task.
pub async fn redrive_task(state: &AppState, id: &str) -> Result<TaskId, ServiceError> {
    let task_id = TaskId::new(id).map_err(|e| ServiceError::Invalid(format!("`task_id`: {e}")))?;
    match state.store.redrive(&task_id).await? {
        RedriveOutcome::Redriven(cap) => {
            state.dispatcher.ensure_loop(&cap);
            state.hub.work_queued(cap.as_str());
            tracing::info!(task_id = %task_id, capability = %cap, "task redriven");
            Ok(task_id)
        }
        RedriveOutcome::NotFailed(status) => Err(ServiceError::Conflict(format!(
            "task `{id}` is {}, not failed",
            status.as_str()
        ))),
        RedriveOutcome::NotFound => Err(ServiceError::NotFound(id.to_string())),
    }
}

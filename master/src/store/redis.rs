//! The Redis task store: every transition is one Lua script (one round trip), atomic and
//! safe with several master replicas racing. Layout in `keys.rs` and each script's header.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use common::redis::RedisPool;
use common::wire::{
    CallbackStatus, CallbackView, Capability, PriorOutput, ReportStatus, ResultReport, StepContext,
    StepError, StepRef, StepStatus, StepView, TaskId, TaskStatus, TaskView, WorkRequest, WorkerId,
};
use redis::Script;
use serde_json::Value;

use super::{
    CALLBACK_ABANDONED, CallbackClaim, CallbackResult, CancelOutcome, Claimed, ExpiredLease,
    FinishedStep, MAX_FREE_DISPATCH_FAILURES, NewTask, QueueStats, RateLimit, RedriveOutcome,
    ReleaseOutcome, ReleaseReason, ReportOutcome, RetryPolicy, StoreError, SubmitOutcome,
    TaskRecord, TaskStore, keys, lost_on_worker,
};

macro_rules! script {
    ($name:ident, $file:literal) => {
        static $name: LazyLock<Script> = LazyLock::new(|| {
            Script::new(concat!(include_str!("lua/lib.lua"), include_str!($file)))
        });
    };
}

script!(SUBMIT, "lua/submit.lua");
script!(CLAIM, "lua/claim.lua");
script!(RELEASE, "lua/release.lua");
script!(REPORT, "lua/report.lua");
script!(EXPIRED, "lua/expired.lua");
script!(EXTEND, "lua/extend.lua");
script!(PROMOTE, "lua/promote.lua");
script!(CANCEL, "lua/cancel.lua");
script!(REDRIVE, "lua/redrive.lua");
script!(STATS, "lua/stats.lua");
script!(CALLBACK_CLAIM, "lua/callback_claim.lua");
script!(CALLBACK_FINISH, "lua/callback_finish.lua");

/// The Redis-backed [`TaskStore`].
#[derive(Clone, Debug)]
pub struct RedisStore {
    pool: RedisPool,
}

impl RedisStore {
    /// A store on a pool; keys go under the pool's prefix.
    pub fn new(pool: RedisPool) -> Self {
        Self { pool }
    }

    fn prefix(&self) -> &str {
        self.pool.prefix()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn parse_cap(text: &str) -> Result<Capability, StoreError> {
    Capability::new(text).map_err(corrupt)
}

fn parse_num<T: std::str::FromStr>(text: &str) -> Result<T, StoreError> {
    text.parse()
        .map_err(|_| corrupt(format!("not a number: {text:?}")))
}

fn parse_json(text: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(corrupt)
}

fn finished(cap: &str, dispatched: &str) -> Result<FinishedStep, StoreError> {
    Ok(FinishedStep {
        capability: parse_cap(cap)?,
        dispatched_at_ms: dispatched.parse().unwrap_or(0),
    })
}

#[async_trait]
impl TaskStore for RedisStore {
    async fn submit(
        &self,
        task: NewTask,
        limit: RateLimit,
        retention: Duration,
    ) -> Result<SubmitOutcome, StoreError> {
        let p = self.prefix();
        let id = task.id.as_str();
        let first = task
            .steps
            .first()
            .ok_or_else(|| corrupt("a task needs at least one step"))?;
        let caps: Vec<&str> = task.steps.iter().map(|s| s.capability.as_str()).collect();
        let idem = task.idempotency_key.as_deref();
        let mut invocation = SUBMIT.prepare_invoke();
        invocation
            .key(keys::task(p, id))
            .key(keys::idempotency(p, &task.client, idem.unwrap_or("-")))
            .key(keys::rate(p, &task.client))
            .key(keys::queue(p, first.capability.as_str()))
            .key(keys::capabilities(p))
            .arg(p)
            .arg(id)
            .arg(if limit.per_sec > 0.0 {
                limit.per_sec
            } else {
                0.0
            })
            .arg(limit.burst.max(1))
            .arg(ms(retention))
            .arg(if idem.is_some() { "1" } else { "0" })
            .arg(task.priority);
        // Inline steps may name capabilities no pipeline lists; remember them so every
        // replica watches their queues.
        if task.pipeline.is_none() {
            invocation.arg(caps.len());
            for cap in &caps {
                invocation.arg(*cap);
            }
        } else {
            invocation.arg(0);
        }
        invocation
            .arg("cl")
            .arg(&task.client)
            .arg("pr")
            .arg(task.priority)
            .arg("in")
            .arg(&task.input)
            .arg("n")
            .arg(task.steps.len())
            .arg("caps")
            .arg(caps.join(","))
            .arg("rq")
            .arg(&task.request_id);
        if let Some(pipeline) = &task.pipeline {
            invocation.arg("pl").arg(pipeline);
        }
        if let Some(url) = &task.callback_url {
            invocation.arg("cb").arg(url);
        }
        for (i, step) in task.steps.iter().enumerate() {
            invocation
                .arg(format!("{i}:c"))
                .arg(step.capability.as_str())
                .arg(format!("{i}:m"))
                .arg(step.max_attempts)
                .arg(format!("{i}:to"))
                .arg(step.timeout_ms)
                .arg(format!("{i}:a"))
                .arg(0)
                .arg(format!("{i}:t"))
                .arg(0);
            if i > 0 {
                invocation.arg(format!("{i}:s")).arg("pending");
            }
        }
        let mut conn = self.pool.get().await?;
        let reply: Vec<String> = invocation.invoke_async(&mut conn).await?;
        match reply.first().map(String::as_str) {
            Some("created") => Ok(SubmitOutcome::Created),
            Some("exists") => Ok(SubmitOutcome::Existing(
                TaskId::new(reply.get(1).cloned().unwrap_or_default()).map_err(corrupt)?,
            )),
            Some("limited") => Ok(SubmitOutcome::RateLimited(Duration::from_millis(
                reply
                    .get(1)
                    .map(|s| parse_num(s))
                    .transpose()?
                    .unwrap_or(1000),
            ))),
            other => Err(corrupt(format!("submit script answered {other:?}"))),
        }
    }

    async fn get(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let mut conn = self.pool.get().await?;
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys::task(self.prefix(), id.as_str()))
            .query_async(&mut conn)
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        record_from_fields(id, &fields).map(Some)
    }

    async fn claim(
        &self,
        capability: &Capability,
        workers: &[WorkerId],
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        if workers.is_empty() {
            return Ok(Vec::new());
        }
        let p = self.prefix();
        let mut invocation = CLAIM.prepare_invoke();
        invocation
            .key(keys::queue(p, capability.as_str()))
            .key(keys::leases(p, capability.as_str()))
            .key(keys::worker_load(p))
            .arg(p)
            .arg(ms(lease));
        for w in workers {
            invocation.arg(w.as_str());
        }
        let mut conn = self.pool.get().await?;
        let rows: Vec<Vec<String>> = invocation.invoke_async(&mut conn).await?;
        rows.into_iter()
            .map(|row| claimed_from_row(capability, &row))
            .collect()
    }

    async fn release(
        &self,
        step: &StepRef,
        why: ReleaseReason,
    ) -> Result<ReleaseOutcome, StoreError> {
        let p = self.prefix();
        let mut conn = self.pool.get().await?;
        let released: i64 = RELEASE
            .key(keys::task(p, step.task_id.as_str()))
            .arg(p)
            .arg(step.task_id.as_str())
            .arg(step.step)
            .arg(step.attempt)
            .arg(match why {
                ReleaseReason::Capacity => "capacity",
                ReleaseReason::Failure => "failure",
            })
            .arg(MAX_FREE_DISPATCH_FAILURES)
            .invoke_async(&mut conn)
            .await?;
        Ok(match released {
            1 => ReleaseOutcome::Released,
            2 => ReleaseOutcome::OverLimit,
            _ => ReleaseOutcome::Stale,
        })
    }

    async fn report(
        &self,
        report: &ResultReport,
        retry: RetryPolicy,
        jitter: f64,
        retention: Duration,
    ) -> Result<ReportOutcome, StoreError> {
        let p = self.prefix();
        let (status, payload, retryable) = match report.status {
            ReportStatus::Succeeded => (
                "succeeded",
                serde_json::to_string(report.output.as_ref().unwrap_or(&Value::Null)),
                false,
            ),
            ReportStatus::Failed => {
                let error = report.error.clone().unwrap_or_else(|| {
                    StepError::permanent("agent", "the worker reported a failure without error")
                });
                ("failed", serde_json::to_string(&error), error.retryable)
            }
        };
        let payload = payload.map_err(corrupt)?;
        let mut conn = self.pool.get().await?;
        let reply: Vec<String> = REPORT
            .key(keys::task(p, report.task_id.as_str()))
            .arg(p)
            .arg(report.task_id.as_str())
            .arg(report.step)
            .arg(report.attempt)
            .arg(status)
            .arg(payload)
            .arg(if retryable { "1" } else { "0" })
            .arg(ms(retry.base))
            .arg(ms(retry.max))
            .arg(jitter.clamp(0.0, 1.0))
            .arg(ms(retention))
            .arg(report.worker_id.as_str())
            .arg(if lost_on_worker(report) { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await?;
        match reply.split_first() {
            Some((kind, rest)) if kind == "replayed" => {
                Ok(ReportOutcome::Replayed(Box::new(report_outcome(rest)?)))
            }
            _ => report_outcome(&reply),
        }
    }

    async fn expired_leases(
        &self,
        capability: &Capability,
        limit: usize,
    ) -> Result<Vec<ExpiredLease>, StoreError> {
        let p = self.prefix();
        let mut conn = self.pool.get().await?;
        let rows: Vec<Vec<String>> = EXPIRED
            .key(keys::leases(p, capability.as_str()))
            .arg(p)
            .arg(limit.max(1))
            .invoke_async(&mut conn)
            .await?;
        rows.into_iter()
            .map(|row| {
                let get = |i: usize| row.get(i).map(String::as_str).unwrap_or("");
                Ok(ExpiredLease {
                    step: StepRef {
                        task_id: TaskId::new(get(0)).map_err(corrupt)?,
                        step: parse_num(get(1))?,
                        attempt: parse_num(get(2))?,
                    },
                    worker: WorkerId::new(get(3)).map_err(corrupt)?,
                    dispatched_at_ms: get(4).parse().unwrap_or(0),
                    timeout_ms: get(5).parse().unwrap_or(0),
                })
            })
            .collect()
    }

    async fn extend_leases(
        &self,
        capability: &Capability,
        leases: &[(StepRef, u64)],
    ) -> Result<(), StoreError> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut invocation = EXTEND.prepare_invoke();
        invocation.key(keys::leases(self.prefix(), capability.as_str()));
        for (s, until) in leases {
            invocation
                .arg(*until)
                .arg(keys::member(s.task_id.as_str(), s.step));
        }
        let mut conn = self.pool.get().await?;
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn promote_due(&self, capability: &Capability) -> Result<usize, StoreError> {
        let p = self.prefix();
        let mut conn = self.pool.get().await?;
        let moved: usize = PROMOTE
            .key(keys::delayed(p, capability.as_str()))
            .key(keys::queue(p, capability.as_str()))
            .arg(p)
            .arg(1000)
            .invoke_async(&mut conn)
            .await?;
        Ok(moved)
    }

    async fn claim_callbacks(
        &self,
        limit: usize,
        visibility: Duration,
        max_attempts: u32,
    ) -> Result<Vec<CallbackClaim>, StoreError> {
        let p = self.prefix();
        let mut conn = self.pool.get().await?;
        let rows: Vec<Vec<String>> = CALLBACK_CLAIM
            .key(keys::callbacks(p))
            .arg(p)
            .arg(limit.max(1))
            .arg(ms(visibility))
            .arg(max_attempts.max(1))
            .arg(CALLBACK_ABANDONED)
            .invoke_async(&mut conn)
            .await?;
        rows.into_iter()
            .map(|row| {
                let (Some(id), Some(attempt)) = (row.first(), row.get(1)) else {
                    return Err(corrupt("callback claim row too short"));
                };
                let id = TaskId::new(id.as_str()).map_err(corrupt)?;
                let fields: HashMap<String, String> = row[2..]
                    .chunks_exact(2)
                    .map(|kv| (kv[0].clone(), kv[1].clone()))
                    .collect();
                let record = record_from_fields(&id, &fields)?;
                let url = record
                    .callback_url
                    .clone()
                    .ok_or_else(|| corrupt("claimed callback without a URL"))?;
                Ok(CallbackClaim {
                    record,
                    url,
                    attempt: parse_num(attempt)?,
                })
            })
            .collect()
    }

    async fn finish_callback(
        &self,
        id: &TaskId,
        attempt: u32,
        result: &CallbackResult,
    ) -> Result<bool, StoreError> {
        let p = self.prefix();
        let (outcome, error, delay) = match result {
            CallbackResult::Delivered => ("delivered", "", 0),
            CallbackResult::Retry { error, delay } => ("retry", error.as_str(), ms(*delay)),
            CallbackResult::Failed { error } => ("failed", error.as_str(), 0),
        };
        let mut conn = self.pool.get().await?;
        let recorded: i64 = CALLBACK_FINISH
            .key(keys::task(p, id.as_str()))
            .key(keys::callbacks(p))
            .arg(id.as_str())
            .arg(attempt)
            .arg(outcome)
            .arg(error)
            .arg(delay)
            .invoke_async(&mut conn)
            .await?;
        Ok(recorded == 1)
    }

    async fn callbacks_pending(&self) -> Result<u64, StoreError> {
        let mut conn = self.pool.get().await?;
        let n: u64 = redis::cmd("ZCARD")
            .arg(keys::callbacks(self.prefix()))
            .query_async(&mut conn)
            .await?;
        Ok(n)
    }

    async fn cancel(&self, id: &TaskId, retention: Duration) -> Result<CancelOutcome, StoreError> {
        let p = self.prefix();
        let error = serde_json::to_string(&StepError::permanent("cancelled", "task cancelled"))
            .map_err(corrupt)?;
        let mut conn = self.pool.get().await?;
        let reply: Vec<String> = CANCEL
            .key(keys::task(p, id.as_str()))
            .arg(p)
            .arg(id.as_str())
            .arg(ms(retention))
            .arg(error)
            .invoke_async(&mut conn)
            .await?;
        match reply.first().map(String::as_str) {
            Some("cancelled") => Ok(CancelOutcome::Cancelled),
            Some("finished") => Ok(CancelOutcome::AlreadyFinished(task_status(
                reply.get(1).map(String::as_str).unwrap_or(""),
            )?)),
            Some("missing") => Ok(CancelOutcome::NotFound),
            other => Err(corrupt(format!("cancel script answered {other:?}"))),
        }
    }

    async fn redrive(&self, id: &TaskId) -> Result<RedriveOutcome, StoreError> {
        let p = self.prefix();
        let mut conn = self.pool.get().await?;
        let reply: Vec<String> = REDRIVE
            .key(keys::task(p, id.as_str()))
            .arg(p)
            .arg(id.as_str())
            .invoke_async(&mut conn)
            .await?;
        let get = |i: usize| reply.get(i).map(String::as_str).unwrap_or("");
        match get(0) {
            "redriven" => Ok(RedriveOutcome::Redriven(parse_cap(get(1))?)),
            "not_failed" => Ok(RedriveOutcome::NotFailed(task_status(get(1))?)),
            "missing" => Ok(RedriveOutcome::NotFound),
            other => Err(corrupt(format!("redrive script answered {other:?}"))),
        }
    }

    async fn dead_letters(
        &self,
        capability: &Capability,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        let mut conn = self.pool.get().await?;
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys::dead(self.prefix(), capability.as_str()))
            .arg(0)
            .arg(limit.max(1) as i64 - 1)
            .query_async(&mut conn)
            .await?;
        ids.into_iter()
            .map(|id| TaskId::new(id).map_err(corrupt))
            .collect()
    }

    async fn stats(
        &self,
        capabilities: &[Capability],
        retention: Duration,
    ) -> Result<Vec<(Capability, QueueStats)>, StoreError> {
        if capabilities.is_empty() {
            return Ok(Vec::new());
        }
        let p = self.prefix();
        let mut invocation = STATS.prepare_invoke();
        invocation.arg(p).arg(ms(retention));
        for c in capabilities {
            invocation.arg(c.as_str());
        }
        let mut conn = self.pool.get().await?;
        let rows: Vec<(u64, u64, u64, u64, String)> = invocation.invoke_async(&mut conn).await?;
        Ok(capabilities
            .iter()
            .cloned()
            .zip(rows.into_iter().map(|(q, d, l, x, head)| QueueStats {
                queued: q,
                delayed: d,
                in_flight: l,
                dead_lettered: x,
                head_queued_at_ms: head.parse().ok(),
            }))
            .collect())
    }

    async fn worker_loads(&self) -> Result<HashMap<String, u32>, StoreError> {
        let mut conn = self.pool.get().await?;
        let loads: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(keys::worker_load(self.prefix()))
            .query_async(&mut conn)
            .await?;
        Ok(loads
            .into_iter()
            .map(|(k, v)| (k, u32::try_from(v.max(0)).unwrap_or(0)))
            .collect())
    }

    async fn capabilities(&self) -> Result<Vec<Capability>, StoreError> {
        let mut conn = self.pool.get().await?;
        let caps: Vec<String> = redis::cmd("SMEMBERS")
            .arg(keys::capabilities(self.prefix()))
            .query_async(&mut conn)
            .await?;
        Ok(caps
            .into_iter()
            .filter_map(|c| Capability::new(c).ok())
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.pool.ping().await?)
    }
}

/// Decodes `report.lua`'s reply (see its header).
fn report_outcome(reply: &[String]) -> Result<ReportOutcome, StoreError> {
    let get = |i: usize| reply.get(i).map(String::as_str).unwrap_or("");
    match get(0) {
        "discarded" => Ok(ReportOutcome::Discarded),
        "next" => Ok(ReportOutcome::Next {
            finished: finished(get(1), get(2))?,
            next: parse_cap(get(3))?,
        }),
        "retry" => Ok(ReportOutcome::Retry {
            finished: finished(get(1), get(2))?,
            delay: Duration::from_millis(parse_num(get(3))?),
        }),
        "done" => Ok(ReportOutcome::Done {
            finished: finished(get(1), get(2))?,
            status: if get(3) == "succeeded" {
                TaskStatus::Succeeded
            } else {
                TaskStatus::Failed
            },
            callback: get(4) == "1",
        }),
        other => Err(corrupt(format!("report script answered {other:?}"))),
    }
}

fn task_status(text: &str) -> Result<TaskStatus, StoreError> {
    serde_json::from_value(Value::String(text.to_string())).map_err(corrupt)
}

fn step_status(text: &str) -> Result<StepStatus, StoreError> {
    serde_json::from_value(Value::String(text.to_string())).map_err(corrupt)
}

fn claimed_from_row(capability: &Capability, row: &[String]) -> Result<Claimed, StoreError> {
    let get = |i: usize| row.get(i).map(String::as_str).unwrap_or("");
    let task_id = TaskId::new(get(0)).map_err(corrupt)?;
    let step: u32 = parse_num(get(1))?;
    let attempt: u32 = parse_num(get(2))?;
    let worker = WorkerId::new(get(3)).map_err(corrupt)?;
    let timeout_ms: u64 = get(4).parse().unwrap_or(0);
    let pipeline = Some(get(5).to_string()).filter(|s| !s.is_empty());
    let total_steps: u32 = parse_num(get(6))?;
    let caps: Vec<&str> = get(7).split(',').collect();
    let request_id = get(8).to_string();
    let task_input = parse_json(get(9))?;
    let mut previous = Vec::with_capacity(1);
    if let (Some(before), Some(text)) = (step.checked_sub(1), row.get(10)) {
        previous.push(PriorOutput {
            step: before,
            capability: parse_cap(caps.get(before as usize).copied().unwrap_or(""))?,
            output: parse_json(text)?,
        });
    }
    let input = previous
        .last()
        .map(|p| p.output.clone())
        .unwrap_or_else(|| task_input.clone());
    Ok(Claimed {
        work: WorkRequest {
            task_id,
            step,
            attempt,
            capability: capability.clone(),
            input,
            context: StepContext {
                task_input,
                previous,
                pipeline,
                total_steps,
            },
            deadline_ms: common::wire::now_ms() + timeout_ms,
        },
        worker,
        request_id,
    })
}

fn record_from_fields(id: &TaskId, f: &HashMap<String, String>) -> Result<TaskRecord, StoreError> {
    let get = |k: &str| f.get(k).map(String::as_str);
    let num = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok());
    let json = |k: &str| get(k).map(parse_json).transpose();
    let error = |k: &str| -> Result<Option<StepError>, StoreError> {
        get(k)
            .map(|t| serde_json::from_str::<StepError>(t).map_err(corrupt))
            .transpose()
    };
    let n: u32 = parse_num(get("n").unwrap_or("0"))?;
    let mut steps = Vec::with_capacity(n as usize);
    for i in 0..n {
        let k = |suffix: &str| format!("{i}:{suffix}");
        let status = step_status(get(&k("s")).unwrap_or("pending"))?;
        steps.push(StepView {
            index: i,
            capability: parse_cap(get(&k("c")).unwrap_or(""))?,
            status,
            worker_id: get(&k("w")).and_then(|w| WorkerId::new(w).ok()),
            attempts: num(&k("t")).unwrap_or(0) as u32,
            output: json(&k("o"))?,
            error: error(&k("e"))?,
            queued_at_ms: num(&k("q")),
            dispatched_at_ms: num(&k("d")),
            finished_at_ms: num(&k("f")),
        });
    }
    let status = task_status(get("st").unwrap_or("queued"))?;
    let result = if status == TaskStatus::Succeeded {
        steps.last().and_then(|s| s.output.clone())
    } else {
        None
    };
    Ok(TaskRecord {
        view: TaskView {
            task_id: id.clone(),
            status,
            pipeline: get("pl").map(String::from),
            priority: get("pr").and_then(|p| p.parse().ok()).unwrap_or(0),
            input: json("in")?.unwrap_or(Value::Null),
            steps,
            result,
            error: error("er")?,
            created_at_ms: num("ca").unwrap_or(0),
            started_at_ms: num("sa"),
            finished_at_ms: num("fa"),
            callback: get("cb").map(|url| CallbackView {
                url: url.to_string(),
                status: match get("cbs") {
                    Some("delivered") => CallbackStatus::Delivered,
                    Some("failed") => CallbackStatus::Failed,
                    _ => CallbackStatus::Pending,
                },
                attempts: num("cbn").unwrap_or(0) as u32,
                last_error: get("cbe").map(String::from),
            }),
        },
        client: get("cl").unwrap_or("").to_string(),
        callback_url: get("cb").map(String::from),
        request_id: get("rq").unwrap_or("").to_string(),
    })
}

//! What the Redis store reads back, decoded in one place and by name: the scripts' replies
//! (flat `{'name', value, ...}` arrays, one per row for scripts that answer rows) and the
//! task hash (names from `schema`). A missing or malformed value is `Corrupt`, naming the
//! script and the field.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use common::wire::{
    CallbackStatus, CallbackView, Capability, PriorOutput, StepContext, StepError, StepRef,
    StepStatus, StepView, TaskId, TaskStatus, TaskView, WorkRequest, WorkerId,
};
use redis::{FromRedisValue, Value};
use serde::de::DeserializeOwned;

use super::schema::{at_step, step_field, task_field};
use super::{
    CallbackClaim, CancelOutcome, Claimed, ExpiredLease, FinishedStep, QueueStats, RedriveOutcome,
    ReleaseOutcome, ReportOutcome, StoreError, SubmitOutcome, TaskRecord,
};

/// Stored data or a reply that does not have the expected shape.
pub(super) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// One reply (or one row of a reply) of a script: its values by name.
pub(super) struct Reply {
    /// The script, for error messages.
    script: &'static str,
    /// The values by name: decoding reads names, so a script can add or reorder them.
    fields: HashMap<String, Value>,
}

impl Reply {
    /// Decodes a `{'name', value, ...}` array.
    pub(super) fn parse(script: &'static str, value: Value) -> Result<Self, StoreError> {
        let Value::Array(items) = value else {
            return Err(corrupt(format!(
                "{script} answered {value:?}, not an array"
            )));
        };
        if items.len() % 2 != 0 {
            return Err(corrupt(format!("{script} answered an odd-length array")));
        }
        let mut fields = HashMap::with_capacity(items.len() / 2);
        let mut items = items.into_iter();
        while let (Some(name), Some(value)) = (items.next(), items.next()) {
            let name = String::from_redis_value(name)
                .map_err(|e| corrupt(format!("{script} answered a bad name: {e}")))?;
            fields.insert(name, value);
        }
        Ok(Self { script, fields })
    }

    /// Decodes an array of rows, each a `{'name', value, ...}` array.
    pub(super) fn rows(script: &'static str, value: Value) -> Result<Vec<Self>, StoreError> {
        match value {
            Value::Array(rows) => rows.into_iter().map(|r| Self::parse(script, r)).collect(),
            other => Err(corrupt(format!("{script} answered {other:?}, not rows"))),
        }
    }

    fn get<T: FromRedisValue>(&self, name: &str) -> Result<Option<T>, StoreError> {
        self.fields
            .get(name)
            .map(|v| {
                T::from_redis_value_ref(v)
                    .map_err(|e| corrupt(format!("{}: `{name}`: {e}", self.script)))
            })
            .transpose()
    }

    fn text(&self, name: &str) -> Result<String, StoreError> {
        self.get(name)?
            .ok_or_else(|| corrupt(format!("{} answered without `{name}`", self.script)))
    }

    fn parsed<T: FromStr>(&self, name: &str) -> Result<T, StoreError> {
        let text = self.text(name)?;
        text.parse()
            .map_err(|_| corrupt(format!("{}: `{name}` is {text:?}", self.script)))
    }

    /// A figure only shown or measured (a dispatch time, a timeout): 0 when missing or
    /// malformed, so a damaged field cannot hide the outcome of a transition that happened.
    fn figure(&self, name: &str) -> u64 {
        self.get::<String>(name)
            .ok()
            .flatten()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0)
    }

    fn capability(&self, name: &str) -> Result<Capability, StoreError> {
        Capability::new(self.text(name)?).map_err(corrupt)
    }

    fn task_id(&self, name: &str) -> Result<TaskId, StoreError> {
        TaskId::new(self.text(name)?).map_err(corrupt)
    }

    fn worker(&self, name: &str) -> Result<WorkerId, StoreError> {
        WorkerId::new(self.text(name)?).map_err(corrupt)
    }

    fn json(&self, name: &str) -> Result<serde_json::Value, StoreError> {
        serde_json::from_str(&self.text(name)?).map_err(corrupt)
    }

    fn unexpected<T>(&self) -> Result<T, StoreError> {
        Err(corrupt(format!(
            "{} answered outcome {:?}",
            self.script,
            self.text("outcome")
        )))
    }

    pub(super) fn submit(&self) -> Result<SubmitOutcome, StoreError> {
        match self.text("outcome")?.as_str() {
            "created" => Ok(SubmitOutcome::Created),
            "exists" => Ok(SubmitOutcome::Existing(self.task_id("task_id")?)),
            "limited" => Ok(SubmitOutcome::RateLimited(Duration::from_millis(
                self.parsed("retry_after_ms")?,
            ))),
            _ => self.unexpected(),
        }
    }

    pub(super) fn release(&self) -> Result<ReleaseOutcome, StoreError> {
        match self.text("outcome")?.as_str() {
            "released" => Ok(ReleaseOutcome::Released),
            "stale" => Ok(ReleaseOutcome::Stale),
            "over_limit" => Ok(ReleaseOutcome::OverLimit),
            _ => self.unexpected(),
        }
    }

    pub(super) fn report(&self) -> Result<ReportOutcome, StoreError> {
        let finished = || -> Result<FinishedStep, StoreError> {
            Ok(FinishedStep {
                capability: self.capability("capability")?,
                dispatched_at_ms: self.figure("dispatched_at_ms"),
            })
        };
        let outcome = match self.text("outcome")?.as_str() {
            "discarded" => ReportOutcome::Discarded,
            "next" => ReportOutcome::Next {
                finished: finished()?,
                next: self.capability("next_capability")?,
            },
            "retry" => ReportOutcome::Retry {
                finished: finished()?,
                delay: Duration::from_millis(self.parsed("delay_ms")?),
            },
            "done" => ReportOutcome::Done {
                finished: finished()?,
                status: serde_text(&self.text("status")?)?,
                callback: self.text("callback")? == "1",
            },
            _ => return self.unexpected(),
        };
        Ok(if self.fields.contains_key("replayed") {
            ReportOutcome::Replayed(Box::new(outcome))
        } else {
            outcome
        })
    }

    pub(super) fn cancel(&self) -> Result<CancelOutcome, StoreError> {
        match self.text("outcome")?.as_str() {
            "cancelled" => Ok(CancelOutcome::Cancelled),
            "finished" => Ok(CancelOutcome::AlreadyFinished(serde_text(
                &self.text("status")?,
            )?)),
            "missing" => Ok(CancelOutcome::NotFound),
            _ => self.unexpected(),
        }
    }

    pub(super) fn redrive(&self) -> Result<RedriveOutcome, StoreError> {
        match self.text("outcome")?.as_str() {
            "redriven" => Ok(RedriveOutcome::Redriven(self.capability("capability")?)),
            "not_failed" => Ok(RedriveOutcome::NotFailed(serde_text(
                &self.text("status")?,
            )?)),
            "missing" => Ok(RedriveOutcome::NotFound),
            _ => self.unexpected(),
        }
    }

    /// Whether `callback_finish.lua` recorded the attempt.
    pub(super) fn recorded(&self) -> Result<bool, StoreError> {
        match self.text("outcome")?.as_str() {
            "recorded" => Ok(true),
            "stale" => Ok(false),
            _ => self.unexpected(),
        }
    }

    /// A row of `claim.lua`, claimed from `capability`'s queue.
    pub(super) fn claimed(&self, capability: &Capability) -> Result<Claimed, StoreError> {
        let step: u32 = self.parsed("step")?;
        let task_input = self.json("input")?;
        let previous = match step.checked_sub(1) {
            Some(before) => {
                let caps = self.text("capabilities")?;
                let cap = caps.split(',').nth(before as usize).unwrap_or_default();
                vec![PriorOutput {
                    step: before,
                    capability: Capability::new(cap).map_err(corrupt)?,
                    output: self.json("previous_output")?,
                }]
            }
            None => Vec::new(),
        };
        let input = previous
            .last()
            .map_or_else(|| task_input.clone(), |p| p.output.clone());
        let timeout_ms = self.figure("timeout_ms");
        let worker = self.worker("worker")?;
        Ok(Claimed {
            work: WorkRequest {
                task_id: self.task_id("task_id")?,
                step,
                attempt: self.parsed("attempt")?,
                capability: capability.clone(),
                input,
                context: StepContext {
                    task_input,
                    previous,
                    pipeline: self.get("pipeline")?,
                    total_steps: self.parsed("total_steps")?,
                },
                deadline_ms: common::wire::now_ms() + timeout_ms,
                worker_id: Some(worker.clone()),
            },
            worker,
            request_id: self.text("request_id")?,
        })
    }

    /// A row of `expired.lua`.
    pub(super) fn expired(&self) -> Result<ExpiredLease, StoreError> {
        Ok(ExpiredLease {
            step: StepRef {
                task_id: self.task_id("task_id")?,
                step: self.parsed("step")?,
                attempt: self.parsed("attempt")?,
            },
            worker: self.worker("worker")?,
            dispatched_at_ms: self.figure("dispatched_at_ms"),
            timeout_ms: self.figure("timeout_ms"),
        })
    }

    /// A row of `callback_claim.lua`.
    pub(super) fn callback_claim(&self) -> Result<CallbackClaim, StoreError> {
        let id = self.task_id("task_id")?;
        let hash: HashMap<String, String> = self.get("task")?.unwrap_or_default();
        let record = record(&id, &hash)?;
        let url = record
            .callback_url
            .clone()
            .ok_or_else(|| corrupt("claimed callback without a URL"))?;
        Ok(CallbackClaim {
            record,
            url,
            attempt: self.parsed("attempt")?,
        })
    }

    /// A row of `stats.lua`.
    pub(super) fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        Ok(QueueStats {
            queued: self.parsed("queued")?,
            delayed: self.parsed("delayed")?,
            in_flight: self.parsed("in_flight")?,
            dead_lettered: self.parsed("dead_lettered")?,
            head_queued_at_ms: self
                .get::<String>("head_queued_at_ms")?
                .and_then(|t| t.parse().ok()),
        })
    }
}

/// A status stored as its wire name.
fn serde_text<T: DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(corrupt)
}

/// A task from its hash (as `HGETALL` gives it).
pub(super) fn record(id: &TaskId, f: &HashMap<String, String>) -> Result<TaskRecord, StoreError> {
    let get = |k: &str| f.get(k).map(String::as_str);
    let num = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok());
    let json = |k: &str| {
        get(k)
            .map(|t| serde_json::from_str::<serde_json::Value>(t).map_err(corrupt))
            .transpose()
    };
    let error = |k: &str| {
        get(k)
            .map(|t| serde_json::from_str::<StepError>(t).map_err(corrupt))
            .transpose()
    };
    let n: u32 = get(task_field::STEP_COUNT)
        .unwrap_or("0")
        .parse()
        .map_err(|_| corrupt("the step count is not a number"))?;
    let mut steps = Vec::with_capacity(n as usize);
    for i in 0..n {
        let at = |field: &str| at_step(i, field);
        let capability = get(&at(step_field::CAPABILITY)).unwrap_or_default();
        steps.push(StepView {
            index: i,
            capability: Capability::new(capability).map_err(corrupt)?,
            status: serde_text::<StepStatus>(get(&at(step_field::STATUS)).unwrap_or("pending"))?,
            worker_id: get(&at(step_field::WORKER)).and_then(|w| WorkerId::new(w).ok()),
            attempts: num(&at(step_field::TRIES)).unwrap_or(0) as u32,
            output: json(&at(step_field::OUTPUT))?,
            error: error(&at(step_field::ERROR))?,
            queued_at_ms: num(&at(step_field::QUEUED_AT)),
            dispatched_at_ms: num(&at(step_field::DISPATCHED_AT)),
            finished_at_ms: num(&at(step_field::FINISHED_AT)),
        });
    }
    let status: TaskStatus = serde_text(get(task_field::STATUS).unwrap_or("queued"))?;
    let result = if status == TaskStatus::Succeeded {
        steps.last().and_then(|s| s.output.clone())
    } else {
        None
    };
    let callback_url = get(task_field::CALLBACK_URL).map(String::from);
    Ok(TaskRecord {
        view: TaskView {
            task_id: id.clone(),
            status,
            pipeline: get(task_field::PIPELINE).map(String::from),
            priority: get(task_field::PRIORITY)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0),
            input: json(task_field::INPUT)?.unwrap_or(serde_json::Value::Null),
            steps,
            result,
            error: error(task_field::ERROR)?,
            created_at_ms: num(task_field::CREATED_AT).unwrap_or(0),
            started_at_ms: num(task_field::STARTED_AT),
            finished_at_ms: num(task_field::FINISHED_AT),
            callback: callback_url.as_ref().map(|url| CallbackView {
                url: url.clone(),
                status: match get(task_field::CALLBACK_STATUS) {
                    Some("delivered") => CallbackStatus::Delivered,
                    Some("failed") => CallbackStatus::Failed,
                    _ => CallbackStatus::Pending,
                },
                attempts: num(task_field::CALLBACK_ATTEMPTS).unwrap_or(0) as u32,
                last_error: get(task_field::CALLBACK_ERROR).map(String::from),
            }),
        },
        client: get(task_field::CLIENT).unwrap_or_default().to_string(),
        callback_url,
        request_id: get(task_field::REQUEST_ID).unwrap_or_default().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(items: &[&str]) -> Result<Reply, StoreError> {
        let items = items
            .iter()
            .map(|s| Value::BulkString(s.as_bytes().to_vec()))
            .collect();
        Reply::parse("test.lua", Value::Array(items))
    }

    #[test]
    fn values_are_read_by_name_in_any_order() {
        let a = reply(&["delay_ms", "250", "outcome", "retry", "capability", "plan"]);
        let b = reply(&["outcome", "retry", "delay_ms", "250", "capability", "plan"]);
        for r in [a, b] {
            match r.unwrap().report().unwrap() {
                ReportOutcome::Retry { finished, delay } => {
                    assert_eq!(finished.capability.as_str(), "plan");
                    assert_eq!(finished.dispatched_at_ms, 0, "a missing figure reads 0");
                    assert_eq!(delay, Duration::from_millis(250));
                }
                other => panic!("{other:?}"),
            }
        }
        let replayed = reply(&["replayed", "1", "outcome", "discarded"]).unwrap();
        assert_eq!(
            replayed.report().unwrap(),
            ReportOutcome::Replayed(Box::new(ReportOutcome::Discarded))
        );
    }

    #[test]
    fn a_reply_that_does_not_decode_is_corrupt_and_says_where() {
        let cases: [(&[&str], &str); 4] = [
            (&["outcome", "created", "odd"], "odd-length"),
            (&["outcome", "exists"], "without `task_id`"),
            (
                &["outcome", "limited", "retry_after_ms", "soon"],
                "`retry_after_ms` is \"soon\"",
            ),
            (&["outcome", "maybe"], "outcome"),
        ];
        for (items, expected) in cases {
            let error = reply(items).and_then(|r| r.submit()).unwrap_err();
            let StoreError::Corrupt(message) = error else {
                panic!("{items:?}: {error:?}");
            };
            assert!(message.contains("test.lua"), "{message}");
            assert!(message.contains(expected), "{items:?}: {message}");
        }
    }
}

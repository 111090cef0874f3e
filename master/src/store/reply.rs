//! What the Redis store reads back, decoded in one place and by name: the scripts' replies
//! (flat `{'name', value, ...}` arrays, one per row for scripts that answer rows) and the
//! task hash (names from `schema`). A missing or malformed value is `Corrupt`, naming the
//! script and the field.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use common::wire::{
    CallbackStatus, CallbackView, Capability, MapView, OnTimeout, PriorOutput, StepContext,
    StepError, StepKind, StepRef, StepStatus, StepView, TaskId, TaskStatus, TaskView, WaitView,
    WorkRequest, WorkerId,
};
use redis::{FromRedisValue, Value};
use serde::de::DeserializeOwned;

use super::schema::{at_step, step_field, task_field};
use super::{
    Advance, CallbackClaim, CancelOutcome, Claimed, ExpiredLease, Finished, FinishedStep,
    FiredTimer, QueueStats, RedriveOutcome, ReleaseOutcome, ReportOutcome, SignalOutcome,
    StoreError, SubmitOutcome, TaskRecord,
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

    pub(super) fn progress(&self) -> Result<super::ProgressOutcome, StoreError> {
        use super::ProgressOutcome;
        match self.text("outcome")?.as_str() {
            "recorded" => Ok(ProgressOutcome::Recorded),
            "discarded" => Ok(ProgressOutcome::Discarded),
            "limited" => Ok(ProgressOutcome::Limited),
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
                queued: self.queued()?,
            },
            "retry" => ReportOutcome::Retry {
                finished: finished()?,
                delay: Duration::from_millis(self.parsed("delay_ms")?),
            },
            "done" => ReportOutcome::Done {
                finished: finished()?,
                status: serde_text(&self.text("status")?)?,
                callback: self.text("callback")? == "1",
                result: self.optional_json("result")?,
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
            "redriven" => Ok(RedriveOutcome::Redriven(self.queued()?)),
            "not_failed" => Ok(RedriveOutcome::NotFailed(serde_text(
                &self.text("status")?,
            )?)),
            "purged" => Ok(RedriveOutcome::Purged),
            "missing" => Ok(RedriveOutcome::NotFound),
            _ => self.unexpected(),
        }
    }

    /// The capabilities a transition queued steps of (`queued`, comma-separated; absent
    /// when none).
    fn queued(&self) -> Result<Vec<Capability>, StoreError> {
        self.get::<String>("queued")?
            .unwrap_or_default()
            .split(',')
            .filter(|c| !c.is_empty())
            .map(|c| Capability::new(c).map_err(corrupt))
            .collect()
    }

    fn optional_json(&self, name: &str) -> Result<Option<serde_json::Value>, StoreError> {
        self.get::<String>(name)?
            .map(|t| serde_json::from_str(&t).map_err(corrupt))
            .transpose()
    }

    /// What a transition the master made by itself set going (graph.lua's `g_end`).
    fn advance(&self) -> Result<Advance, StoreError> {
        let done = match self.get::<String>("status")? {
            None => None,
            Some(status) => Some(Finished {
                status: serde_text(&status)?,
                callback: self.text("callback")? == "1",
                result: self.optional_json("result")?,
                error: self
                    .get::<String>("error")?
                    .map(|t| serde_json::from_str(&t).map_err(corrupt))
                    .transpose()?,
            }),
        };
        Ok(Advance {
            queued: self.queued()?,
            done,
        })
    }

    pub(super) fn signal(&self) -> Result<SignalOutcome, StoreError> {
        match self.text("outcome")?.as_str() {
            "delivered" => Ok(SignalOutcome::Delivered(self.advance()?)),
            "buffered" => Ok(SignalOutcome::Buffered),
            "unknown" => Ok(SignalOutcome::UnknownSignal),
            "already" => Ok(SignalOutcome::AlreadyReceived),
            "finished" => Ok(SignalOutcome::Finished(serde_text(&self.text("status")?)?)),
            "missing" => Ok(SignalOutcome::NotFound),
            _ => self.unexpected(),
        }
    }

    /// A row of `timers.lua`.
    pub(super) fn fired_timer(&self) -> Result<FiredTimer, StoreError> {
        Ok(FiredTimer {
            task_id: self.task_id("task_id")?,
            step: self.parsed("step")?,
            advance: self.advance()?,
        })
    }

    /// Whether `callback_finish.lua` recorded the attempt.
    pub(super) fn recorded(&self) -> Result<bool, StoreError> {
        match self.text("outcome")?.as_str() {
            "recorded" => Ok(true),
            "stale" => Ok(false),
            _ => self.unexpected(),
        }
    }

    /// A row of `claim.lua`, claimed from `capability`'s queue: the step's input is its
    /// element (a map instance), the output of its one need, an object of its needs'
    /// outputs by id, or the task input (no needs); see docs/workflows.md.
    pub(super) fn claimed(&self, capability: &Capability) -> Result<Claimed, StoreError> {
        let step: u32 = self.parsed("step")?;
        let task_input = self.json("input")?;
        let needs: Vec<Vec<String>> = self.get("needs")?.unwrap_or_default();
        let previous = needs
            .iter()
            .map(|row| prior_output(self.script, row))
            .collect::<Result<Vec<_>, _>>()?;
        let element_index = self
            .get::<String>("element_index")?
            .and_then(|t| t.parse().ok());
        let input = if let Some(element) = self.get::<String>("element")? {
            serde_json::from_str(&element).map_err(corrupt)?
        } else {
            super::step_input(&previous, &task_input)
        };
        let timeout_ms = self.figure("timeout_ms");
        let worker = self.worker("worker")?;
        let step_id = self.get::<String>("step_id")?.filter(|s| !s.is_empty());
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
                    step_id,
                    element_index,
                },
                deadline_ms: common::wire::now_ms() + timeout_ms,
                worker_id: Some(worker.clone()),
                request_id: None,
            },
            worker,
            request_id: self.text("request_id")?,
            traceparent: self.get("traceparent")?,
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

/// One need of a claimed step: `{slot, id, capability or '', status, output or '', error
/// or ''}`.
fn prior_output(script: &str, row: &[String]) -> Result<PriorOutput, StoreError> {
    let [slot, id, capability, status, output, error] = row else {
        return Err(corrupt(format!(
            "{script}: a need has {} values",
            row.len()
        )));
    };
    let parse = |text: &str| -> Result<serde_json::Value, StoreError> {
        if text.is_empty() {
            Ok(serde_json::Value::Null)
        } else {
            serde_json::from_str(text).map_err(corrupt)
        }
    };
    Ok(PriorOutput {
        step: slot
            .parse()
            .map_err(|_| corrupt(format!("{script}: need slot {slot:?}")))?,
        id: id.clone(),
        capability: if capability.is_empty() {
            None
        } else {
            Some(Capability::new(capability.as_str()).map_err(corrupt)?)
        },
        status: StepStatus::parse(status).unwrap_or(StepStatus::Pending),
        output: if status == "succeeded" {
            parse(output)?
        } else {
            serde_json::Value::Null
        },
        error: if error.is_empty() || status != "failed" {
            None
        } else {
            Some(serde_json::from_str(error).map_err(corrupt)?)
        },
    })
}

/// A status stored as its wire name.
pub(super) fn serde_text<T: DeserializeOwned>(text: &str) -> Result<T, StoreError> {
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
    // A task stored before graphs has no `dn`: every slot is declared, a chain.
    let legacy = get(task_field::DECLARED).is_none();
    let declared: u32 = match get(task_field::DECLARED) {
        Some(d) => d
            .parse()
            .map_err(|_| corrupt("the declared step count is not a number"))?,
        None => n,
    };
    let ids: Vec<String> = (0..n)
        .map(|i| get(&at_step(i, step_field::ID)).map_or_else(|| format!("step-{i}"), String::from))
        .collect();
    let mut all = Vec::with_capacity(n as usize);
    for i in 0..n {
        let at = |field: &str| at_step(i, field);
        let kind = match get(&at(step_field::KIND)) {
            Some("wait") => StepKind::Wait,
            Some("sleep") => StepKind::Sleep,
            _ => StepKind::Work,
        };
        let needs: Vec<String> = if get(&at(step_field::PARENT)).is_some() {
            Vec::new()
        } else if legacy {
            i.checked_sub(1)
                .map(|b| ids[b as usize].clone())
                .into_iter()
                .collect()
        } else {
            get(&at(step_field::NEEDS))
                .unwrap_or_default()
                .split(',')
                .filter_map(|s| s.parse::<usize>().ok())
                .filter_map(|s| ids.get(s).cloned())
                .collect()
        };
        let status = StepStatus::parse(get(&at(step_field::STATUS)).unwrap_or("pending"))
            .ok_or_else(|| corrupt(format!("step {i} has an unknown status")))?;
        let wait_ms = num(&at(step_field::WAIT_MS));
        all.push(StepView {
            index: i,
            id: ids[i as usize].clone(),
            kind,
            capability: get(&at(step_field::CAPABILITY))
                .map(|c| Capability::new(c).map_err(corrupt))
                .transpose()?,
            needs,
            router: get(&at(step_field::ROUTER)) == Some("1"),
            allow_failure: get(&at(step_field::ALLOW_FAILURE)) == Some("1"),
            map: get(&at(step_field::MAP_OVER)).map(|over| MapView {
                over: over.to_string(),
                concurrency: num(&at(step_field::MAP_CONCURRENCY)).unwrap_or(0) as u32,
                total: num(&at(step_field::MAP_COUNT)).map(|t| t as u32),
                finished: num(&at(step_field::MAP_DONE)).unwrap_or(0) as u32,
            }),
            instances: Vec::new(),
            element_index: num(&at(step_field::ELEMENT_INDEX)).map(|e| e as u32),
            wait: (kind == StepKind::Wait).then(|| WaitView {
                signal: get(&at(step_field::SIGNAL)).unwrap_or_default().to_string(),
                timeout_ms: wait_ms.unwrap_or(0),
                on_timeout: if get(&at(step_field::ON_TIMEOUT)) == Some("continue") {
                    OnTimeout::Continue
                } else {
                    OnTimeout::Fail
                },
            }),
            sleep_ms: if kind == StepKind::Sleep {
                wait_ms
            } else {
                None
            },
            wakes_at_ms: if status == StepStatus::Waiting {
                num(&at(step_field::WAKES_AT))
            } else {
                None
            },
            status,
            worker_id: get(&at(step_field::WORKER)).and_then(|w| WorkerId::new(w).ok()),
            attempts: num(&at(step_field::TRIES)).unwrap_or(0) as u32,
            output: json(&at(step_field::OUTPUT))?,
            error: error(&at(step_field::ERROR))?,
            queued_at_ms: num(&at(step_field::QUEUED_AT)),
            dispatched_at_ms: num(&at(step_field::DISPATCHED_AT)),
            finished_at_ms: num(&at(step_field::FINISHED_AT)),
            usage: None,
        });
    }
    // Map instances (slots after the declared ones) go under their map step, in element
    // order (the order their slots were added).
    let instances = all.split_off((declared as usize).min(all.len()));
    let mut steps = all;
    for (offset, instance) in instances.into_iter().enumerate() {
        let slot = declared as usize + offset;
        let parent = get(&at_step(slot, step_field::PARENT))
            .and_then(|p| p.parse::<usize>().ok())
            .and_then(|p| steps.get_mut(p))
            .ok_or_else(|| corrupt(format!("map instance {slot} has no map step")))?;
        parent.instances.push(instance);
    }
    let status: TaskStatus = serde_text(get(task_field::STATUS).unwrap_or("queued"))?;
    let result = (status == TaskStatus::Succeeded).then(|| super::graph_result(&steps));
    let callback_url = get(task_field::CALLBACK_URL).map(String::from);
    let mut record = TaskRecord {
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
            usage: budget(
                num(task_field::BUDGET_TOKENS),
                num(task_field::BUDGET_COST_NANOS),
            ),
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
    };
    super::derive_waiting(&mut record.view);
    Ok(record)
}

/// The usage summary of a task with a budget (the figures come later, from the ledger).
fn budget(tokens: Option<u64>, cost_nanos: Option<u64>) -> Option<common::usage::UsageSummary> {
    if tokens.is_none() && cost_nanos.is_none() {
        return None;
    }
    Some(common::usage::UsageSummary {
        total: common::usage::Usage::default(),
        budget: Some(common::usage::Budget {
            max_tokens: tokens,
            max_cost_usd: cost_nanos
                .map(|n| common::usage::nanos_to_usd(i64::try_from(n).unwrap_or(i64::MAX))),
        }),
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

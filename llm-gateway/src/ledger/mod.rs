//! The usage ledger: what every answered call cost, per gateway key, provider model and UTC
//! day, and per Ensemble task and step; the budgets checked against it before a call goes
//! to a provider; and the report `GET /v1/usage` serves. It lives in Redis (`USE_REDIS`),
//! so every replica of the gateway counts into, and checks against, the same figures.
//!
//! Keys (every template is in [`keys`]):
//! - `{prefix}:gw:usage:<YYYY-MM-DD>`: one hash per UTC day, fields `<key>|<provider>/<model>|in`,
//!   `|out`, `|cost_nanos`, `|calls`, and the key's day totals `<key>|in` … (what its daily
//!   budget is checked against). It expires `USAGE_RETENTION_DAYS` after its day ends. Key
//!   names are configured and models come from the configured targets, so a day has a
//!   bounded number of fields.
//! - `{prefix}:usage:{<task id>}`: the task's hash, in the layout of [`common::usage`] that
//!   the master reads and writes the task's budget into.
//!
//! Semantics: the check (one script reading the figures) and the counting (one script
//! adding a call) are each atomic across replicas, but they are two steps: calls already in
//! flight when a budget is reached still finish and are counted, so spend can pass a limit
//! by what those calls cost (as LiteLLM's and OpenAI's budgets do). A call is refused once
//! the spend is at or over the limit.

mod day;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::HeaderMap;
use common::redis::RedisPool;
use common::redis::client as redis;
use common::usage::{self as task_usage, Usage};
use common::wire::TaskId;
use futures::FutureExt;
use serde::Serialize;

pub use day::Day;

use crate::app::{AppState, Caller};
use crate::config::{Config, DEFAULT_KEY, Price};
use crate::error::GatewayError;
use crate::providers::Completion;
use crate::routes::chat::AfterAnswer;
use crate::routing::Served;

/// The most days `GET /v1/usage` reads at once (a quarter), so one request reads a bounded
/// number of hashes.
pub const MAX_REPORT_DAYS: i64 = 92;

/// Every Redis key and hash field the gateway's ledger writes (the task hash's own fields
/// are [`common::usage`]'s).
pub mod keys {
    use super::Day;

    /// The day's hash: `{prefix}:gw:usage:<YYYY-MM-DD>`.
    pub fn daily(prefix: &str, day: Day) -> String {
        format!("{prefix}:gw:usage:{day}")
    }

    /// The prefix of a key's per-model fields in a day's hash: `<key>|<provider>/<model>|`.
    pub fn key_model_prefix(key: &str, model: &str) -> String {
        format!("{key}|{model}|")
    }

    /// The prefix of a key's day totals: `<key>|`.
    pub fn key_prefix(key: &str) -> String {
        format!("{key}|")
    }

    /// How a served model is named in the ledger: `<provider>/<model>`.
    pub fn model(provider: &str, model: &str) -> String {
        format!("{provider}/{model}")
    }

    /// The task's usage hash (shared with the master).
    pub fn task(prefix: &str, task: &str) -> String {
        common::usage::task_usage_key(prefix, task)
    }

    /// A field of a day's hash read back: `(key, Some(model), what)` for a per-model field,
    /// `(key, None, what)` for a key's total. Key names have no `|`; models may.
    pub fn parse_daily_field(field: &str) -> Option<(&str, Option<&str>, &str)> {
        let (key, rest) = field.split_once('|')?;
        match rest.rsplit_once('|') {
            Some((model, what)) => Some((key, Some(model), what)),
            None => Some((key, None, rest)),
        }
    }
}

/// `ensemble_gateway_cost_nanos_total{key,provider,model}`: nano-dollars spent.
pub const COST_METRIC: &str = "ensemble_gateway_cost_nanos_total";
/// `ensemble_gateway_key_tokens_total{key,direction}`: tokens per gateway key.
pub const KEY_TOKENS_METRIC: &str = "ensemble_gateway_key_tokens_total";
/// `ensemble_gateway_budget_refusals_total{scope}`: calls refused by a budget (`key_daily`,
/// `task`).
pub const REFUSALS_METRIC: &str = "ensemble_gateway_budget_refusals_total";
/// `ensemble_gateway_unpriced_calls_total{model}`: calls on a model with no price (cost 0).
pub const UNPRICED_METRIC: &str = "ensemble_gateway_unpriced_calls_total";
/// `ensemble_gateway_ledger_errors_total`: answers the ledger failed to record.
pub const ERRORS_METRIC: &str = "ensemble_gateway_ledger_errors_total";

/// A key's daily limits.
#[derive(Clone, Copy, Debug, Default)]
struct KeyBudget {
    /// Most tokens a day.
    tokens: Option<i64>,
    /// Most nano-dollars a day.
    cost_nanos: Option<i64>,
}

/// The ledger of one gateway process: prices, budgets and the scripts over the shared Redis.
pub struct Ledger {
    /// Where the figures live (shared with the other replicas and the master).
    pool: RedisPool,
    /// By provider model name; a model missing here costs 0.
    prices: HashMap<String, Price>,
    /// By key name; a key missing here has no daily budget.
    budgets: HashMap<String, KeyBudget>,
    /// `USAGE_RETENTION_DAYS`.
    retention_days: u32,
    /// `USAGE_TASK_TTL_S`, as the `EXPIRE` argument.
    task_ttl_s: u64,
    /// `admit.lua`.
    admit: redis::Script,
    /// `record.lua`.
    record: redis::Script,
}

impl Ledger {
    /// The ledger for `config` over `pool`.
    pub fn new(config: &Config, pool: RedisPool) -> Self {
        let budget = |tokens: Option<u64>, cost: Option<f64>| KeyBudget {
            tokens: tokens.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
            cost_nanos: cost.map(task_usage::usd_to_nanos),
        };
        let mut budgets = HashMap::new();
        let mut add = |name: &str, b: KeyBudget| {
            if b.tokens.is_some() || b.cost_nanos.is_some() {
                budgets.insert(name.to_string(), b);
            }
        };
        add(
            DEFAULT_KEY,
            budget(config.daily_max_tokens, config.daily_max_cost_usd),
        );
        for (name, key) in &config.keys {
            add(name, budget(key.daily_max_tokens, key.daily_max_cost_usd));
        }
        Self {
            pool,
            prices: config
                .prices
                .iter()
                .map(|(model, price)| (model.clone(), price.clone()))
                .collect(),
            budgets,
            retention_days: config.usage_retention_days,
            task_ttl_s: config.usage_task_ttl_s,
            admit: redis::Script::new(include_str!("admit.lua")),
            record: redis::Script::new(include_str!("record.lua")),
        }
    }

    /// What `prompt` and `completion` tokens of `model` cost, in nano-dollars; `None` when
    /// the model has no price.
    pub fn cost_nanos(&self, model: &str, prompt: u32, completion: u32) -> Option<i64> {
        let price = self.prices.get(model)?;
        // USD per million tokens is nano-dollars per thousandth of a token: × 1e3 per token.
        let nanos = f64::from(prompt) * price.input_usd_per_mtok * 1e3
            + f64::from(completion) * price.output_usd_per_mtok * 1e3;
        Some(nanos.round().clamp(0.0, i64::MAX as f64) as i64)
    }

    /// Counts one answered call; a failure is logged and counted, never the caller's.
    async fn record(&self, charge: &Charge, served: &Served, prompt: u32, completion: u32) {
        let provider = served.provider.as_str();
        let cost = match self.cost_nanos(&served.model, prompt, completion) {
            Some(cost) => cost,
            None => {
                metrics::counter!(UNPRICED_METRIC, "model" => served.model.to_string())
                    .increment(1);
                0
            }
        };
        let key = charge.key.name();
        metrics::counter!(COST_METRIC, "key" => key.to_string(), "provider" => provider, "model" => served.model.to_string())
            .increment(u64::try_from(cost).unwrap_or(0));
        metrics::counter!(KEY_TOKENS_METRIC, "key" => key.to_string(), "direction" => "in")
            .increment(u64::from(prompt));
        metrics::counter!(KEY_TOKENS_METRIC, "key" => key.to_string(), "direction" => "out")
            .increment(u64::from(completion));

        let day = Day::today();
        let prefix = self.pool.prefix();
        let mut invocation = self.record.prepare_invoke();
        invocation.key(keys::daily(prefix, day));
        let mut step = String::new();
        if let Some(task) = &charge.task {
            invocation.key(keys::task(prefix, task.id.as_str()));
            if let Some(s) = &task.step {
                step = task_usage::step_field(s, "");
            }
        }
        invocation
            .arg(keys::key_model_prefix(
                key,
                &keys::model(provider, &served.model),
            ))
            .arg(keys::key_prefix(key))
            .arg(prompt)
            .arg(completion)
            .arg(cost)
            // The day's hash outlives the end of its day by the retention.
            .arg(day.unix_start_after(self.retention_days.saturating_add(1)))
            .arg(step)
            .arg(self.task_ttl_s);
        let outcome: Result<i64, String> = match self.pool.get().await {
            Ok(mut conn) => invocation
                .invoke_async(&mut conn)
                .await
                .map_err(|e| common::redis::describe(&e)),
            Err(e) => Err(e.message),
        };
        if let Err(error) = outcome {
            metrics::counter!(ERRORS_METRIC).increment(1);
            // The alarm on Redis outages counts exactly this message.
            tracing::warn!(
                %error,
                during = "ledger record",
                effect = "the answer went out but its usage was not recorded",
                key,
                model = %served.model,
                prompt,
                completion,
                "{}",
                common::redis::UNAVAILABLE_LOG
            );
        }
    }

    /// Reads the figures the budgets of `key` (and `task`) are checked against.
    async fn figures(&self, key: &str, task: Option<&Task>) -> Result<Figures, GatewayError> {
        let prefix = self.pool.prefix();
        let mut invocation = self.admit.prepare_invoke();
        invocation.key(keys::daily(prefix, Day::today()));
        if let Some(task) = task {
            invocation.key(keys::task(prefix, task.id.as_str()));
        }
        invocation.arg(keys::key_prefix(key));
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|e| unavailable("budget check", e.message))?;
        let reply: Vec<String> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable("budget check", common::redis::describe(&e)))?;
        let n = |i: usize| reply.get(i).and_then(|v| v.parse::<i64>().ok());
        // A budget field the master wrote that is not a non-negative integer is no budget.
        let budget = |i: usize| n(i).filter(|b| *b >= 0);
        Ok(Figures {
            key_tokens: n(0).unwrap_or(0).saturating_add(n(1).unwrap_or(0)),
            key_cost_nanos: n(2).unwrap_or(0),
            task_tokens: n(3).unwrap_or(0).saturating_add(n(4).unwrap_or(0)),
            task_cost_nanos: n(5).unwrap_or(0),
            task_budget_tokens: budget(6),
            task_budget_cost_nanos: budget(7),
        })
    }

    /// The ledger's days `from..=to`, filtered by key and model (`<provider>/<model>`, or the
    /// bare provider model), as rows sorted by date, key and model, and their total.
    pub async fn report(&self, query: &ReportQuery) -> Result<Report, GatewayError> {
        let mut days = Vec::new();
        let mut day = query.from;
        while day <= query.to {
            days.push(day);
            day = day.next();
        }
        let mut pipe = redis::pipe();
        for day in &days {
            pipe.hgetall(keys::daily(self.pool.prefix(), *day));
        }
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|e| unavailable("usage report", e.message))?;
        let hashes: Vec<HashMap<String, i64>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable("usage report", common::redis::describe(&e)))?;
        let mut rows: BTreeMap<(Day, String, String), (i64, Usage)> = BTreeMap::new();
        for (day, hash) in days.iter().zip(hashes) {
            for (field, value) in hash {
                let Some((key, Some(model), what)) = keys::parse_daily_field(&field) else {
                    continue;
                };
                if query.key.as_deref().is_some_and(|k| k != key) || !query.matches_model(model) {
                    continue;
                }
                let (cost, usage) = rows
                    .entry((*day, key.to_string(), model.to_string()))
                    .or_default();
                let count = u64::try_from(value).unwrap_or(0);
                match what {
                    task_usage::IN => usage.prompt_tokens = count,
                    task_usage::OUT => usage.completion_tokens = count,
                    task_usage::CALLS => usage.calls = count,
                    task_usage::COST_NANOS => *cost = value,
                    _ => {}
                }
            }
        }
        let mut total = Usage::default();
        let mut total_cost = 0i64;
        let data = rows
            .into_iter()
            .map(|((date, key, model), (cost, mut usage))| {
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
                usage.cost_usd = task_usage::nanos_to_usd(cost);
                total.prompt_tokens += usage.prompt_tokens;
                total.completion_tokens += usage.completion_tokens;
                total.total_tokens += usage.total_tokens;
                total.calls += usage.calls;
                total_cost = total_cost.saturating_add(cost);
                ReportRow {
                    date: date.to_string(),
                    key,
                    model,
                    usage,
                }
            })
            .collect();
        total.cost_usd = task_usage::nanos_to_usd(total_cost);
        Ok(Report {
            from: query.from.to_string(),
            to: query.to.to_string(),
            data,
            total,
        })
    }
}

/// Logs a Redis outage with the message the outage alarm counts, and makes it the
/// request's `503`.
fn unavailable(during: &'static str, error: String) -> GatewayError {
    tracing::warn!(%error, during, "{}", common::redis::UNAVAILABLE_LOG);
    GatewayError::StoreUnavailable(error)
}

/// What the budgets are checked against.
#[derive(Debug)]
struct Figures {
    key_tokens: i64,
    key_cost_nanos: i64,
    task_tokens: i64,
    task_cost_nanos: i64,
    task_budget_tokens: Option<i64>,
    task_budget_cost_nanos: Option<i64>,
}

/// The Ensemble task (and step) a call serves, from its headers.
#[derive(Clone, Debug)]
struct Task {
    /// `x-ensemble-task-id`.
    id: TaskId,
    /// `x-ensemble-step-id`, else `x-ensemble-step`.
    step: Option<String>,
}

impl Task {
    /// The task headers, checked: an invalid one is a `400` naming it.
    fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, GatewayError> {
        let text = |name: &str| -> Result<Option<String>, GatewayError> {
            match headers.get(name) {
                None => Ok(None),
                Some(value) => value
                    .to_str()
                    .map(|v| Some(v.trim().to_string()))
                    .map_err(|_| GatewayError::invalid(name, format!("`{name}` is not text"))),
            }
        };
        let Some(id) = text(task_usage::TASK_ID_HEADER)? else {
            return Ok(None);
        };
        let id = TaskId::new(id).map_err(|e| {
            GatewayError::invalid(
                task_usage::TASK_ID_HEADER,
                format!("invalid `{}` header: {e}", task_usage::TASK_ID_HEADER),
            )
        })?;
        let step = match text(task_usage::STEP_ID_HEADER)? {
            Some(step) => Some((task_usage::STEP_ID_HEADER, step)),
            None => text(task_usage::STEP_HEADER)?.map(|s| (task_usage::STEP_HEADER, s)),
        };
        let step = match step {
            Some((header, step)) if !task_usage::valid_step(&step) => {
                return Err(GatewayError::invalid(
                    header,
                    format!(
                        "invalid `{header}` header: a step is 1 to 64 letters, digits, `-`, \
                         `_`, `.`, `[` and `]`"
                    ),
                ));
            }
            other => other.map(|(_, step)| step),
        };
        Ok(Some(Self { id, step }))
    }
}

/// Who an admitted call is charged to: given back by [`admit`], it records the answer.
pub struct Charge {
    ledger: Arc<Ledger>,
    /// The gateway key.
    key: Caller,
    /// The task and step, when the call came with the task headers.
    task: Option<Task>,
}

impl Charge {
    /// Records a chat answer once it is complete (an [`AfterAnswer`] hook).
    pub fn after_answer(self) -> AfterAnswer {
        Box::new(move |completion: Arc<Completion>, served: Served| {
            async move {
                let usage = completion.usage;
                self.ledger
                    .record(&self, &served, usage.prompt_tokens, usage.completion_tokens)
                    .await;
            }
            .boxed()
        })
    }

    /// Records an embeddings answer (prompt tokens only).
    pub async fn embedded(&self, served: &Served, prompt_tokens: u32) {
        self.ledger.record(self, served, prompt_tokens, 0).await;
    }
}

/// Checks the budgets that apply to a call of `alias` by `caller` before any provider is
/// called, and says whom to charge: `None` without the ledger (`USE_REDIS` off, when the task
/// headers are not even read). Refuses with `429 budget_exceeded` when a budget is spent,
/// `400 model_unpriced` when a dollar budget applies but a target of the alias has no
/// price, `503 store_unavailable` when a budget may apply but Redis cannot say. With no
/// key budget and no task header no budget can apply, and Redis is not asked.
pub async fn admit(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    alias: &str,
) -> Result<Option<Charge>, GatewayError> {
    let Some(ledger) = &state.ledger else {
        return Ok(None);
    };
    let task = Task::from_headers(headers)?;
    let charge = Charge {
        ledger: ledger.clone(),
        key: caller.clone(),
        task,
    };
    let key_budget = ledger.budgets.get(caller.name()).copied();
    // An unknown alias is the router's 404; no budget is spent on finding that out.
    let Some(targets) = state.router.targets(alias) else {
        return Ok(Some(charge));
    };
    if key_budget.is_none() && charge.task.is_none() {
        return Ok(Some(charge));
    }
    let key_budget = key_budget.unwrap_or_default();
    let figures = ledger.figures(caller.name(), charge.task.as_ref()).await?;
    let cost_budget = key_budget.cost_nanos.is_some() || figures.task_budget_cost_nanos.is_some();
    if cost_budget
        && let Some((provider, model)) = targets
            .into_iter()
            .find(|(_, model)| !ledger.prices.contains_key(*model))
    {
        return Err(GatewayError::ModelUnpriced {
            alias: alias.to_string(),
            target: keys::model(provider.as_str(), model),
            model: model.to_string(),
        });
    }
    let refuse = |scope: &'static str, message: String, retry_after: Option<Duration>| {
        metrics::counter!(REFUSALS_METRIC, "scope" => scope).increment(1);
        Err(GatewayError::BudgetExceeded {
            message,
            retry_after,
        })
    };
    let midnight = || Some(Day::until_midnight(SystemTime::now()));
    let key = caller.name();
    if let Some(limit) = key_budget.tokens
        && figures.key_tokens >= limit
    {
        return refuse(
            "key_daily",
            format!(
                "the daily token budget of gateway key `{key}` is spent: {} of {limit} tokens \
                 used today (UTC); it resets at midnight UTC",
                figures.key_tokens
            ),
            midnight(),
        );
    }
    if let Some(limit) = key_budget.cost_nanos
        && figures.key_cost_nanos >= limit
    {
        return refuse(
            "key_daily",
            format!(
                "the daily cost budget of gateway key `{key}` is spent: ${:.6} of ${:.6} used \
                 today (UTC); it resets at midnight UTC",
                task_usage::nanos_to_usd(figures.key_cost_nanos),
                task_usage::nanos_to_usd(limit)
            ),
            midnight(),
        );
    }
    if let Some(task) = &charge.task {
        if let Some(limit) = figures.task_budget_tokens
            && figures.task_tokens >= limit
        {
            return refuse(
                "task",
                format!(
                    "the token budget of task `{}` is spent: {} of {limit} tokens used",
                    task.id.as_str(),
                    figures.task_tokens
                ),
                None,
            );
        }
        if let Some(limit) = figures.task_budget_cost_nanos
            && figures.task_cost_nanos >= limit
        {
            return refuse(
                "task",
                format!(
                    "the cost budget of task `{}` is spent: ${:.6} of ${:.6} used",
                    task.id.as_str(),
                    task_usage::nanos_to_usd(figures.task_cost_nanos),
                    task_usage::nanos_to_usd(limit)
                ),
                None,
            );
        }
    }
    Ok(Some(charge))
}

/// What `GET /v1/usage` asks for, checked.
#[derive(Clone, Debug)]
pub struct ReportQuery {
    /// First day, inclusive.
    pub from: Day,
    /// Last day, inclusive.
    pub to: Day,
    /// Only this gateway key.
    pub key: Option<String>,
    /// Only this model: `<provider>/<model>` or the bare provider model.
    pub model: Option<String>,
}

impl ReportQuery {
    fn matches_model(&self, model: &str) -> bool {
        match &self.model {
            None => true,
            Some(wanted) => {
                model == wanted
                    || model
                        .split_once('/')
                        .is_some_and(|(_, bare)| bare == wanted)
            }
        }
    }
}

/// `GET /v1/usage`'s answer.
#[derive(Debug, Serialize)]
pub struct Report {
    /// First day.
    pub from: String,
    /// Last day.
    pub to: String,
    /// One row per day, key and model with any usage.
    pub data: Vec<ReportRow>,
    /// The rows added up.
    pub total: Usage,
}

/// One day's usage of one key on one model.
#[derive(Debug, Serialize)]
pub struct ReportRow {
    /// `YYYY-MM-DD`, UTC.
    pub date: String,
    /// The gateway key.
    pub key: String,
    /// `<provider>/<model>`.
    pub model: String,
    /// Its figures.
    #[serde(flatten)]
    pub usage: Usage,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn daily_fields_read_back_as_key_model_and_what() {
        let field = format!(
            "{}{}",
            keys::key_model_prefix("team-a", &keys::model("bedrock", "x.y:0|odd")),
            "in"
        );
        assert_eq!(
            keys::parse_daily_field(&field),
            Some(("team-a", Some("bedrock/x.y:0|odd"), "in"))
        );
        assert_eq!(
            keys::parse_daily_field("team-a|cost_nanos"),
            Some(("team-a", None, "cost_nanos"))
        );
        assert_eq!(keys::parse_daily_field("junk"), None);
        assert_eq!(
            keys::daily("p", Day::parse("2026-01-02").unwrap()),
            "p:gw:usage:2026-01-02"
        );
    }

    #[test]
    fn cost_is_per_million_tokens_in_nanos() {
        let pool = RedisPool::new(&common::redis::RedisSettings::default()).unwrap();
        let mut config = Config::default();
        config.prices.insert(
            "m".into(),
            Price {
                input_usd_per_mtok: 0.30,
                output_usd_per_mtok: 2.50,
            },
        );
        let ledger = Ledger::new(&config, pool);
        // 1000 in at $0.30/M = $0.0003 = 300_000 nanos; 200 out at $2.50/M = 500_000 nanos.
        assert_eq!(ledger.cost_nanos("m", 1000, 200), Some(800_000));
        assert_eq!(ledger.cost_nanos("m", 1, 0), Some(300));
        assert_eq!(ledger.cost_nanos("other", 1000, 200), None);
    }
}

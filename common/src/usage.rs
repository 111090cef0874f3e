//! The per-task half of the model-usage ledger, shared by the llm-gateway (which writes it)
//! and the master (which writes a task's budget into it at submit and shows it in the task
//! view).
//!
//! One Redis hash per task, `{prefix}:usage:{<task id>}` (the task's hash tag, so it could
//! share the task's cluster slot). Its fields:
//! - `budget_tokens`, `budget_cost_nanos`: the task's budget, set at submit (absent: none);
//! - `in`, `out`, `cost_nanos`, `calls`: the task's totals;
//! - `step:<step>:in`, `step:<step>:out`, `step:<step>:cost_nanos`, `step:<step>:calls`:
//!   the same per step, where `<step>` is the step's id (a chain's steps use their index).
//!
//! Costs are whole nano-dollars (1e-9 USD) so that Redis can add them exactly with
//! `HINCRBY`; an `i64` holds more than nine billion dollars.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The header that names the Ensemble task a model call serves.
pub const TASK_ID_HEADER: &str = "x-ensemble-task-id";
/// The header that names the step (its id; a chain's steps their index).
pub const STEP_ID_HEADER: &str = "x-ensemble-step-id";
/// The header with a chain step's index, used when there is no step id.
pub const STEP_HEADER: &str = "x-ensemble-step";

/// Field: the task's token budget.
pub const BUDGET_TOKENS: &str = "budget_tokens";
/// Field: the task's cost budget in nano-dollars.
pub const BUDGET_COST_NANOS: &str = "budget_cost_nanos";
/// Field: prompt tokens, in total (or after `step:<id>:`).
pub const IN: &str = "in";
/// Field: completion tokens.
pub const OUT: &str = "out";
/// Field: cost in nano-dollars.
pub const COST_NANOS: &str = "cost_nanos";
/// Field: model calls recorded.
pub const CALLS: &str = "calls";

/// Nano-dollars in a dollar.
pub const NANOS_PER_USD: f64 = 1e9;

/// The task's usage hash.
pub fn task_usage_key(prefix: &str, task_id: &str) -> String {
    format!("{prefix}:usage:{{{task_id}}}")
}

/// A per-step field: `step:<step>:<what>`.
pub fn step_field(step: &str, what: &str) -> String {
    format!("step:{step}:{what}")
}

/// Whether `step` may name a step in the ledger: 1 to 64 letters, digits, `-`, `_`, `.`,
/// `[` and `]` (a map instance is `<id>[<element>]`).
pub fn valid_step(step: &str) -> bool {
    !step.is_empty()
        && step.len() <= 64
        && step
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '[' | ']'))
}

/// Dollars to whole nano-dollars (rounded; negative and non-finite amounts are 0).
pub fn usd_to_nanos(usd: f64) -> i64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * NANOS_PER_USD).round().min(i64::MAX as f64) as i64
    } else {
        0
    }
}

/// Nano-dollars to dollars.
pub fn nanos_to_usd(nanos: i64) -> f64 {
    nanos as f64 / NANOS_PER_USD
}

/// Tokens and cost of some model calls.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Both.
    pub total_tokens: u64,
    /// Cost in US dollars, from the gateway's price table.
    pub cost_usd: f64,
    /// Model calls.
    pub calls: u64,
}

/// A task's budget for model calls, given at submit (`"budget"` in `POST /task`). The
/// llm-gateway refuses a call of the task once either is spent (`429 budget_exceeded`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Most tokens (prompt and completion) the task's model calls may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Most dollars they may cost, by the gateway's price table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
}

/// The task's model usage as the ledger has it: totals, per step, and the budget.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskUsage {
    /// Every call of the task.
    pub total: Usage,
    /// Per step id.
    pub steps: BTreeMap<String, Usage>,
    /// The budget given at submit, if any.
    pub budget: Option<Budget>,
}

/// `usage` in `GET /task/{id}`: the task's totals and its budget (each step's figures are
/// in its own `usage`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageSummary {
    /// Every model call the task made.
    #[serde(flatten)]
    pub total: Usage,
    /// The budget given at submit, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

impl TaskUsage {
    /// Reads an `HGETALL` of the usage hash; unknown or malformed fields are skipped.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut usage = TaskUsage::default();
        let mut budget = Budget::default();
        let mut cost = 0i64;
        let mut step_costs: BTreeMap<String, i64> = BTreeMap::new();
        for (field, value) in fields {
            let Ok(n) = value.parse::<i64>() else {
                continue;
            };
            let count = u64::try_from(n).unwrap_or(0);
            match field {
                BUDGET_TOKENS => budget.max_tokens = Some(count),
                BUDGET_COST_NANOS => budget.max_cost_usd = Some(nanos_to_usd(n)),
                COST_NANOS => cost = n,
                other => match other.strip_prefix("step:").and_then(|s| s.rsplit_once(':')) {
                    Some((step, what)) => {
                        let entry = usage.steps.entry(step.to_string()).or_default();
                        if what == COST_NANOS {
                            step_costs.insert(step.to_string(), n);
                        } else {
                            add(entry, what, count);
                        }
                    }
                    None => add(&mut usage.total, other, count),
                },
            }
        }
        usage.total.cost_usd = nanos_to_usd(cost);
        usage.total.total_tokens = usage.total.prompt_tokens + usage.total.completion_tokens;
        for (step, entry) in &mut usage.steps {
            entry.cost_usd = nanos_to_usd(step_costs.get(step).copied().unwrap_or(0));
            entry.total_tokens = entry.prompt_tokens + entry.completion_tokens;
        }
        if budget != Budget::default() {
            usage.budget = Some(budget);
        }
        usage
    }

    /// Whether nothing was recorded and no budget was given.
    pub fn is_empty(&self) -> bool {
        self.total.calls == 0 && self.steps.is_empty() && self.budget.is_none()
    }
}

fn add(usage: &mut Usage, what: &str, n: u64) {
    match what {
        IN => usage.prompt_tokens = n,
        OUT => usage.completion_tokens = n,
        CALLS => usage.calls = n,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usage_hash_reads_back_as_totals_steps_and_budget() {
        let fields = [
            ("in", "30"),
            ("out", "12"),
            ("cost_nanos", "1500"),
            ("calls", "2"),
            ("step:plan:in", "10"),
            ("step:plan:out", "2"),
            ("step:plan:cost_nanos", "500"),
            ("step:plan:calls", "1"),
            ("step:1:in", "20"),
            ("step:1:out", "10"),
            ("step:1:cost_nanos", "1000"),
            ("step:1:calls", "1"),
            ("budget_cost_nanos", "500000000"),
            ("junk", "x"),
        ];
        let usage = TaskUsage::from_fields(fields);
        assert_eq!(usage.total.total_tokens, 42);
        assert_eq!(usage.total.calls, 2);
        assert!((usage.total.cost_usd - 1.5e-6).abs() < 1e-15);
        assert_eq!(usage.steps["plan"].total_tokens, 12);
        assert!((usage.steps["1"].cost_usd - 1e-6).abs() < 1e-15);
        assert_eq!(
            usage.budget,
            Some(Budget {
                max_tokens: None,
                max_cost_usd: Some(0.5)
            })
        );
    }

    #[test]
    fn dollars_round_to_nanos_and_nonsense_is_zero() {
        assert_eq!(usd_to_nanos(0.5), 500_000_000);
        assert_eq!(usd_to_nanos(1.5e-9), 2);
        assert_eq!(usd_to_nanos(-1.0), 0);
        assert_eq!(usd_to_nanos(f64::NAN), 0);
        assert_eq!(usd_to_nanos(f64::INFINITY), 0);
        assert!(valid_step("look-up.2"));
        assert!(valid_step("search[12]"));
        assert!(!valid_step("a:b"));
        assert!(!valid_step(""));
        assert!(!valid_step(&"x".repeat(65)));
    }
}

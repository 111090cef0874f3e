//! Every rule of [`plan_steps`], one case each, plus what valid graphs plan into.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use common::wire::OnTimeout;
use serde_json::{Value, json};

use super::*;

const DEFAULTS: StepDefaults = StepDefaults {
    max_attempts: 3,
    timeout_ms: 300_000,
};

fn specs(value: Value) -> Vec<StepSpec> {
    serde_json::from_value(value).expect("steps that parse")
}

fn plan(value: Value) -> Result<Vec<PlannedStep>, GraphError> {
    plan_steps(&specs(value), DEFAULTS)
}

fn cap(c: &str) -> Capability {
    Capability::new(c).unwrap()
}

/// The error `steps` give, which must break `rule` and mention every fragment.
fn refused(value: Value, rule: Rule, fragments: &[&str]) {
    let shown = value.to_string();
    match plan(value) {
        Err(e) => {
            assert_eq!(e.rule, rule, "{shown}: {e}");
            for f in fragments {
                assert!(e.message.contains(f), "{shown}: {e} lacks {f:?}");
            }
        }
        Ok(p) => panic!("{shown}: planned {p:?}, expected {rule:?}"),
    }
}

fn work(p: &PlannedStep) -> (&Capability, u32, u64, Option<&MapPlan>, bool) {
    match &p.kind {
        PlannedKind::Work {
            capability,
            max_attempts,
            timeout_ms,
            map,
            router,
        } => (
            capability,
            *max_attempts,
            *timeout_ms,
            map.as_ref(),
            *router,
        ),
        other => panic!("not a worker step: {other:?}"),
    }
}

#[test]
fn a_list_of_names_is_a_chain_with_the_capabilities_as_ids() {
    let planned = plan(json!(["plan", "retrieve", "evaluate"])).unwrap();
    assert_eq!(
        planned,
        vec![
            PlannedStep::chain_link(0, "plan", cap("plan"), 3, 300_000),
            PlannedStep::chain_link(1, "retrieve", cap("retrieve"), 3, 300_000),
            PlannedStep::chain_link(2, "evaluate", cap("evaluate"), 3, 300_000),
        ]
    );
}

#[test]
fn a_capability_used_twice_gets_indexed_ids_and_dots_become_underscores() {
    let planned = plan(json!(["echo", "llm.chat", "echo"])).unwrap();
    let ids: Vec<&str> = planned.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["echo-0", "llm_chat", "echo-2"]);
    assert_eq!(planned[1].capability(), Some(&cap("llm.chat")));
}

#[test]
fn waits_and_sleeps_get_indexed_ids_and_a_wait_listens_for_its_id() {
    let planned = plan(json!([
        {"wait": {"timeout_ms": 1000}},
        {"sleep_ms": 5},
        {"id": "approve", "wait": {"timeout_ms": 2000, "on_timeout": "continue"}},
    ]))
    .unwrap();
    assert_eq!(planned[0].id, "wait-0");
    assert_eq!(
        planned[0].kind,
        PlannedKind::Wait {
            signal: "wait-0".into(),
            timeout_ms: 1000,
            on_timeout: OnTimeout::Fail
        }
    );
    assert_eq!(planned[1].id, "sleep-1");
    assert_eq!(planned[1].kind, PlannedKind::Sleep { ms: 5 });
    assert_eq!(planned[1].needs, [0]);
    assert_eq!(
        planned[2].kind,
        PlannedKind::Wait {
            signal: "approve".into(),
            timeout_ms: 2000,
            on_timeout: OnTimeout::Continue
        }
    );
}

#[test]
fn needs_absent_is_the_step_before_and_empty_is_a_root() {
    let planned = plan(json!([
        "plan",
        {"id": "a", "capability": "retrieve"},
        {"id": "b", "capability": "retrieve", "needs": []},
        {"id": "join", "capability": "evaluate", "needs": ["b", "a"]},
        "finalize",
    ]))
    .unwrap();
    let needs: Vec<&[u32]> = planned.iter().map(|p| p.needs.as_slice()).collect();
    assert_eq!(needs, [&[][..], &[0], &[], &[2, 1], &[3]]);
    let first = plan(json!([{"capability": "plan"}])).unwrap();
    assert!(first[0].needs.is_empty(), "step 0 needs nothing");
}

#[test]
fn a_step_may_need_one_written_after_it() {
    let planned = plan(json!([
        {"id": "late", "capability": "b", "needs": ["early"]},
        {"id": "early", "capability": "a", "needs": []},
    ]))
    .unwrap();
    assert_eq!(planned[0].needs, [1]);
}

#[test]
fn attempts_and_timeouts_default_from_the_config_and_are_at_least_one() {
    let planned = plan(json!([
        {"capability": "a"},
        {"capability": "b", "max_attempts": 7, "timeout_ms": 50},
        {"capability": "c", "max_attempts": 0, "timeout_ms": 0},
    ]))
    .unwrap();
    assert_eq!(work(&planned[0]).1, 3);
    assert_eq!(work(&planned[0]).2, 300_000);
    assert_eq!((work(&planned[1]).1, work(&planned[1]).2), (7, 50));
    assert_eq!((work(&planned[2]).1, work(&planned[2]).2), (1, 1));
}

#[test]
fn map_over_parses_into_a_source_and_a_path() {
    let planned = plan(json!([
        "plan",
        {"id": "r", "capability": "retrieve", "map": {"over": "plan.items.0.subs", "concurrency": 8}},
        {"id": "i", "capability": "retrieve", "needs": [], "map": {"over": "input"}},
        {"id": "j", "capability": "retrieve", "needs": ["r"], "map": {"over": "r"}},
    ]))
    .unwrap();
    assert_eq!(
        work(&planned[1]).3,
        Some(&MapPlan {
            over: "plan.items.0.subs".into(),
            from: Some(0),
            path: vec!["items".into(), "0".into(), "subs".into()],
            concurrency: 8,
        })
    );
    assert_eq!(
        work(&planned[2]).3,
        Some(&MapPlan {
            over: "input".into(),
            from: None,
            path: vec![],
            concurrency: DEFAULT_CONCURRENCY,
        })
    );
    assert_eq!(work(&planned[3]).3.unwrap().from, Some(1));
}

#[test]
fn a_router_with_dependants_and_allow_failure_are_kept() {
    let planned = plan(json!([
        {"id": "route", "capability": "classify", "router": true, "allow_failure": true},
        {"id": "x", "capability": "a"},
    ]))
    .unwrap();
    assert!(work(&planned[0]).4);
    assert!(planned[0].allow_failure);
    assert!(!planned[1].allow_failure);
}

#[test]
fn the_limits_themselves_are_allowed() {
    let mut steps: Vec<Value> = vec![json!({"id": "s0", "capability": "a"})];
    for i in 1..MAX_STEPS {
        steps.push(json!({"id": format!("s{i}"), "capability": "a", "needs": []}));
    }
    let all: Vec<String> = (0..MAX_STEPS - 1).map(|i| format!("s{i}")).collect();
    steps[MAX_STEPS - 1] = json!({"id": "last", "capability": "a", "needs": all});
    assert_eq!(plan(Value::Array(steps)).unwrap().len(), MAX_STEPS);
    let long = "x".repeat(MAX_ID_LEN);
    plan(json!([
        {"id": long, "capability": "a", "map": {"over": "input", "concurrency": MAX_CONCURRENCY}},
        {"capability": "b", "map": {"over": "input", "concurrency": 1}},
        {"wait": {"timeout_ms": MAX_DELAY_MS, "signal": "y".repeat(MAX_ID_LEN)}},
        {"wait": {"timeout_ms": 1}},
        {"sleep_ms": MAX_DELAY_MS},
        {"sleep_ms": 1},
    ]))
    .unwrap();
}

#[test]
fn no_steps_and_too_many_steps_are_refused() {
    refused(json!([]), Rule::Empty, &["at least one step"]);
    let many: Vec<Value> = (0..=MAX_STEPS).map(|_| json!("a")).collect();
    refused(Value::Array(many), Rule::TooManySteps, &["65 steps", "64"]);
}

#[test]
fn a_step_is_exactly_one_kind_and_worker_options_need_a_worker() {
    refused(
        json!([{"id": "x"}]),
        Rule::Shape,
        &["step 0 (`x`)", "exactly one"],
    );
    refused(
        json!([{"capability": "a", "sleep_ms": 5}]),
        Rule::Shape,
        &["step 0", "exactly one"],
    );
    refused(
        json!(["a", {"wait": {"timeout_ms": 5}, "sleep_ms": 5}]),
        Rule::Shape,
        &["step 1", "exactly one"],
    );
    for (field, value) in [
        ("map", json!({"over": "input"})),
        ("router", json!(true)),
        ("max_attempts", json!(2)),
        ("timeout_ms", json!(2)),
    ] {
        let mut step = json!({"sleep_ms": 5});
        step[field] = value;
        refused(json!([step]), Rule::Shape, &[field, "worker steps"]);
    }
    refused(
        json!([{"capability": "a", "router": true, "map": {"over": "input"}}, "b"]),
        Rule::Shape,
        &["`a`", "router"],
    );
}

#[test]
fn ids_are_checked_and_unique() {
    for bad in [
        "",
        "Upper",
        "has.dot",
        "sp ace",
        &"x".repeat(MAX_ID_LEN + 1),
    ] {
        refused(
            json!([{"id": bad, "capability": "a"}]),
            Rule::Id,
            &["step 0", "1 to 64"],
        );
    }
    refused(
        json!([{"id": "input", "capability": "a"}]),
        Rule::Id,
        &["`input` is reserved"],
    );
    // A default id too long: the capability has 64 characters and appears twice.
    let c = "c".repeat(64);
    refused(json!([c, c]), Rule::Id, &["give the step an `id`"]);
    refused(
        json!(["plan", {"id": "plan", "capability": "x"}]),
        Rule::DuplicateId,
        &["step 1", "`plan`", "step 0"],
    );
    refused(
        json!([{"id": "a-1", "capability": "b"}, "a", "a"]),
        Rule::DuplicateId,
        &["step 1", "`a-1`", "step 0"],
    );
}

#[test]
fn needs_must_name_other_steps_once_each_and_not_too_many() {
    refused(
        json!(["plan", {"id": "x", "capability": "a", "needs": ["nope"]}]),
        Rule::UnknownNeed,
        &["step 1 (`x`)", "`nope`"],
    );
    refused(
        json!([{"id": "x", "capability": "a", "needs": ["x"]}]),
        Rule::SelfNeed,
        &["step 0 (`x`)", "itself"],
    );
    refused(
        json!(["plan", {"id": "x", "capability": "a", "needs": ["plan", "plan"]}]),
        Rule::DuplicateNeed,
        &["step 1 (`x`)", "`plan` twice"],
    );
    let needs: Vec<String> = (0..=MAX_NEEDS).map(|i| format!("n{i}")).collect();
    refused(
        json!([{"id": "x", "capability": "a", "needs": needs}]),
        Rule::TooManyNeeds,
        &["step 0 (`x`)", "65", "at most 64"],
    );
}

#[test]
fn a_cycle_is_refused_naming_its_steps() {
    refused(
        json!([
            {"id": "start", "capability": "a", "needs": []},
            {"id": "a", "capability": "a", "needs": ["c"]},
            {"id": "b", "capability": "b", "needs": ["a", "start"]},
            {"id": "c", "capability": "c", "needs": ["b"]},
        ]),
        Rule::Cycle,
        &["a → c → b → a"],
    );
    refused(
        json!([
            {"id": "x", "capability": "a", "needs": ["y"]},
            {"id": "y", "capability": "a", "needs": ["x"]},
        ]),
        Rule::Cycle,
        &["x → y → x"],
    );
}

#[test]
fn find_cycle_sees_none_in_a_diamond() {
    assert_eq!(find_cycle(&[vec![], vec![0], vec![0], vec![1, 2]]), None);
    assert_eq!(find_cycle(&[vec![1], vec![0]]), Some(vec![0, 1, 0]));
}

#[test]
fn map_over_must_start_at_input_or_a_needed_step() {
    refused(
        json!(["plan", {"id": "m", "capability": "a", "needs": [], "map": {"over": "plan.queries"}}]),
        Rule::MapOver,
        &["step 1 (`m`)", "`plan`", "needs"],
    );
    refused(
        json!([{"id": "m", "capability": "a", "map": {"over": "nowhere.x"}}]),
        Rule::MapOver,
        &["`nowhere`"],
    );
    for bad in ["", "input.", "input..x", ".x"] {
        refused(
            json!([{"id": "m", "capability": "a", "map": {"over": bad}}]),
            Rule::MapOver,
            &["step 0 (`m`)", "`map.over`"],
        );
    }
}

#[test]
fn map_concurrency_is_1_to_1000() {
    for bad in [0, MAX_CONCURRENCY + 1] {
        refused(
            json!([{"id": "m", "capability": "a", "map": {"over": "input", "concurrency": bad}}]),
            Rule::MapConcurrency,
            &["step 0 (`m`)", "1 to 1000", &bad.to_string()],
        );
    }
}

#[test]
fn a_router_needs_a_dependant() {
    refused(
        json!(["a", {"id": "r", "capability": "b", "router": true}]),
        Rule::Router,
        &["step 1 (`r`)", "router"],
    );
}

#[test]
fn waits_need_a_timeout_in_range_and_sleeps_a_duration_in_range() {
    refused(
        json!([{"id": "w", "wait": {}}]),
        Rule::WaitTimeout,
        &["step 0 (`w`)", "required"],
    );
    for bad in [0, MAX_DELAY_MS + 1] {
        refused(
            json!([{"id": "w", "wait": {"timeout_ms": bad}}]),
            Rule::WaitTimeout,
            &["step 0 (`w`)", "30 days"],
        );
        refused(
            json!([{"id": "s", "sleep_ms": bad}]),
            Rule::SleepMs,
            &["step 0 (`s`)", "30 days"],
        );
    }
}

#[test]
fn signal_names_are_checked_and_unique_among_waits() {
    for bad in ["", "Big", "a.b", &"s".repeat(MAX_ID_LEN + 1)] {
        refused(
            json!([{"id": "w", "wait": {"timeout_ms": 5, "signal": bad}}]),
            Rule::Signal,
            &["step 0 (`w`)", "`wait.signal`"],
        );
    }
    refused(
        json!([
            {"id": "go", "wait": {"timeout_ms": 5}},
            {"id": "w", "wait": {"timeout_ms": 5, "signal": "go"}},
        ]),
        Rule::DuplicateSignal,
        &["step 1 (`w`)", "step 0 (`go`)", "`go`"],
    );
}

#[test]
fn a_long_value_is_cut_short_in_the_message() {
    let long = "Z".repeat(10_000);
    match plan(json!([{"id": long, "capability": "a"}])) {
        Err(e) => assert!(e.message.len() < 400, "{}", e.message.len()),
        Ok(_) => panic!("accepted"),
    }
}

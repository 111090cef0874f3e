#![allow(clippy::unwrap_used, clippy::expect_used)]

use common::wire::{
    Capability, MapView, OnTimeout, StepError, StepKind, StepStatus, StepView, TaskId, TaskStatus,
    TaskView, WaitView, WorkerId,
};
use serde_json::json;

use super::*;

const NOW: u64 = 1_000_000;

fn step(index: u32, id: &str, capability: &str, needs: &[&str], status: StepStatus) -> StepView {
    StepView {
        index,
        id: id.into(),
        kind: StepKind::Work,
        capability: Some(Capability::new(capability).unwrap()),
        needs: needs.iter().map(|n| n.to_string()).collect(),
        router: false,
        allow_failure: false,
        map: None,
        instances: Vec::new(),
        element_index: None,
        wait: None,
        sleep_ms: None,
        wakes_at_ms: None,
        status,
        worker_id: None,
        attempts: 0,
        output: None,
        error: None,
        queued_at_ms: None,
        dispatched_at_ms: None,
        finished_at_ms: None,
        usage: None,
    }
}

/// A step that ran on `worker` from `start` (to `end`, when it has finished).
fn ran(mut s: StepView, worker: &str, start: u64, end: Option<u64>) -> StepView {
    s.worker_id = Some(WorkerId::new(worker).unwrap());
    s.attempts = 1;
    s.queued_at_ms = Some(start);
    s.dispatched_at_ms = Some(start);
    s.finished_at_ms = end;
    s
}

fn task(status: TaskStatus, steps: Vec<StepView>) -> TaskView {
    TaskView {
        task_id: TaskId::new("t-1").unwrap(),
        status,
        pipeline: Some("default".into()),
        priority: 0,
        input: json!({"question": "why?"}),
        steps,
        result: None,
        error: None,
        created_at_ms: NOW - 5_000,
        started_at_ms: Some(NOW - 4_900),
        finished_at_ms: None,
        callback: None,
        usage: None,
    }
}

/// The default pipeline half way: plan done, retrieve fanned out over three queries (one
/// done, one running, one queued), evaluate and finalize not reached.
fn fan_out() -> TaskView {
    let plan = ran(
        step(0, "plan", "plan", &[], StepStatus::Succeeded),
        "worker-plan",
        NOW - 4_900,
        Some(NOW - 3_700),
    );
    let mut retrieve = step(1, "retrieve", "retrieve", &["plan"], StepStatus::Running);
    retrieve.queued_at_ms = Some(NOW - 3_700);
    retrieve.map = Some(MapView {
        over: "plan.queries".into(),
        concurrency: 16,
        total: Some(3),
        finished: 1,
    });
    let instance = |i: u32, status| {
        let mut s = step(4 + i, &format!("retrieve[{i}]"), "retrieve", &[], status);
        s.element_index = Some(i);
        s
    };
    retrieve.instances = vec![
        ran(
            instance(0, StepStatus::Succeeded),
            "worker-retrieve",
            NOW - 3_600,
            Some(NOW - 3_588),
        ),
        ran(
            instance(1, StepStatus::Dispatched),
            "worker-retrieve",
            NOW - 1_500,
            None,
        ),
        instance(2, StepStatus::Queued),
    ];
    task(
        TaskStatus::Running,
        vec![
            plan,
            retrieve,
            step(
                2,
                "evaluate",
                "evaluate",
                &["retrieve"],
                StepStatus::Pending,
            ),
            step(
                3,
                "finalize",
                "finalize",
                &["evaluate"],
                StepStatus::Pending,
            ),
        ],
    )
}

#[test]
fn a_fan_out_draws_its_instances_under_the_map_step_before_its_dependants() {
    let text = render(&fan_out(), NOW, Style::Plain);
    let expected = "\
task t-1  running  pipeline `default`  5.0 s
✓ plan               plan      succeeded    attempt 1  worker-plan      1.2 s
└─ ◐ retrieve        retrieve  running 1/3                              3.7 s  map over plan.queries
   ├─ ✓ retrieve[0]  retrieve  succeeded    attempt 1  worker-retrieve  12 ms
   ├─ ● retrieve[1]  retrieve  dispatched   attempt 1  worker-retrieve  1.5 s
   ├─ ○ retrieve[2]  retrieve  queued
   └─ · evaluate     evaluate  pending
      └─ · finalize  finalize  pending";
    assert_eq!(text, expected, "\n{text}");
    assert_eq!(
        chain(&fan_out()).as_deref(),
        Some("plan -> retrieve -> evaluate -> finalize")
    );
}

#[test]
fn a_step_with_several_needs_appears_once_under_the_first() {
    // a and b are roots; join needs both; after needs join.
    let view = task(
        TaskStatus::Running,
        vec![
            step(0, "a", "retrieve", &[], StepStatus::Succeeded),
            step(1, "b", "retrieve", &[], StepStatus::Succeeded),
            step(2, "join", "evaluate", &["b", "a"], StepStatus::Queued),
            step(3, "after", "finalize", &["join"], StepStatus::Pending),
        ],
    );
    let rows = rows(&view, NOW);
    let drawn: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.prefix.as_str(), r.id.as_str()))
        .collect();
    assert_eq!(
        drawn,
        [("", "a"), ("", "b"), ("└─ ", "join"), ("   └─ ", "after")]
    );
    assert_eq!(rows[2].notes, ["needs: b, a"]);
    assert!(rows[3].notes.is_empty());
    assert_eq!(chain(&view), None);
}

#[test]
fn skipped_steps_are_marked_and_dimmed_and_a_router_shows_its_pick() {
    let mut triage = step(0, "triage", "classify", &[], StepStatus::Succeeded);
    triage.router = true;
    triage.output = Some(json!({"next": "billing"}));
    let view = task(
        TaskStatus::Succeeded,
        vec![
            triage,
            step(1, "billing", "billing", &["triage"], StepStatus::Succeeded),
            step(2, "tech", "tech", &["triage"], StepStatus::Skipped),
            step(
                3,
                "reply",
                "finalize",
                &["billing", "tech"],
                StepStatus::Succeeded,
            ),
        ],
    );
    let rows = rows(&view, NOW);
    assert_eq!(rows[0].notes, ["router → billing"]);
    let tech = rows.iter().find(|r| r.id == "tech").unwrap();
    assert_eq!(
        (tech.symbol, tech.state.as_str(), tech.dim),
        ("⊘", "skipped", true)
    );
    let plain = lines(&rows, Style::Plain);
    assert!(plain.iter().all(|l| !l.contains('\x1b')), "{plain:?}");
    let colored = lines(&rows, Style::Color);
    let tech_line = colored.iter().find(|l| l.contains("⊘ tech")).unwrap();
    assert!(
        tech_line.starts_with("\x1b[2m") && tech_line.ends_with("\x1b[0m"),
        "{tech_line:?}"
    );
    let billing_line = colored.iter().find(|l| l.contains(" billing ")).unwrap();
    assert!(
        billing_line.contains("\x1b[32m✓\x1b[0m"),
        "{billing_line:?}"
    );
    // billing is under triage, reply under billing (its first need), tech under triage.
    let drawn: Vec<&str> = rows.iter().map(|r| r.prefix.as_str()).collect();
    assert_eq!(drawn, ["", "├─ ", "│  └─ ", "└─ "]);
    assert_eq!(rows[2].id, "reply");
}

#[test]
fn a_waiting_wait_step_says_when_it_times_out_and_how_to_signal_it() {
    let draft = ran(
        step(0, "draft", "write", &[], StepStatus::Succeeded),
        "w1",
        NOW - 9_000,
        Some(NOW - 8_000),
    );
    let mut approval = step(1, "approval", "write", &["draft"], StepStatus::Waiting);
    approval.kind = StepKind::Wait;
    approval.capability = None;
    approval.wait = Some(WaitView {
        signal: "approve".into(),
        timeout_ms: 3_600_000,
        on_timeout: OnTimeout::Fail,
    });
    approval.queued_at_ms = Some(NOW - 8_000);
    approval.wakes_at_ms = Some(NOW + 3_592_000);
    let mut publish = step(2, "publish", "publish", &["approval"], StepStatus::Pending);
    publish.allow_failure = true;
    let view = task(TaskStatus::Waiting, vec![draft, approval, publish]);
    let text = render(&view, NOW, Style::Plain);
    let expected = "\
task t-1  waiting  pipeline `default`  5.0 s
✓ draft          write           succeeded  attempt 1  w1  1.0 s
└─ ◷ approval    wait \"approve\"  waiting                   8.0 s  times out in 59m 52s, then fails
     ↳ ensemble signal t-1 approve '<json payload>'
   └─ · publish  publish         pending                          may fail";
    assert_eq!(text, expected, "\n{text}");
    // Before it is reached, its timeout; after a timeout that continues, that it did.
    let mut pending = view.steps[1].clone();
    pending.status = StepStatus::Pending;
    let row = &rows(&task(TaskStatus::Running, vec![pending.clone()]), NOW)[0];
    assert_eq!(row.notes, ["timeout 1h 00m, then fails"]);
    assert_eq!(row.hint, None);
    pending.status = StepStatus::Succeeded;
    pending.output = Some(json!({"timed_out": true}));
    let row = &rows(&task(TaskStatus::Running, vec![pending]), NOW)[0];
    assert_eq!(row.notes, ["timed out, went on"]);
}

#[test]
fn a_sleep_says_when_it_wakes_and_failures_say_why() {
    let mut nap = step(0, "nap", "x", &[], StepStatus::Waiting);
    nap.kind = StepKind::Sleep;
    nap.capability = None;
    nap.sleep_ms = Some(5_000);
    nap.wakes_at_ms = Some(NOW + 2_500);
    let mut broke = step(1, "broke", "x", &["nap"], StepStatus::Failed);
    broke.attempts = 3;
    broke.error = Some(StepError::permanent("agent", "bad things\nand more"));
    let mut retry = step(2, "retry", "x", &["nap"], StepStatus::Queued);
    retry.attempts = 1;
    retry.error = Some(StepError::retryable("upstream", "gateway 503"));
    let rows = rows(&task(TaskStatus::Running, vec![nap, broke, retry]), NOW);
    assert_eq!(
        (rows[0].what.as_str(), rows[0].notes.clone()),
        ("sleep 5.0 s", vec!["wakes in 2.5 s".to_string()])
    );
    assert_eq!(rows[1].notes, ["bad things"]);
    assert_eq!(rows[1].attempt, "attempt 3");
    assert_eq!(rows[2].notes, ["retrying after: gateway 503"]);
}

#[test]
fn a_wide_map_draws_its_active_and_failed_instances_and_sums_up_the_rest() {
    let mut map = step(0, "fan", "retrieve", &[], StepStatus::Running);
    map.map = Some(MapView {
        over: "input.items".into(),
        concurrency: 2,
        total: Some(30),
        finished: 26,
    });
    map.instances = (0..30)
        .map(|i| {
            let status = match i {
                3 => StepStatus::Failed,
                20 | 21 => StepStatus::Dispatched,
                27..=29 => StepStatus::Pending,
                _ => StepStatus::Succeeded,
            };
            step(1 + i, &format!("fan[{i}]"), "retrieve", &[], status)
        })
        .collect();
    let mut view = task(TaskStatus::Running, vec![map]);
    view.steps[0].allow_failure = true;
    let rows = rows(&view, NOW);
    assert_eq!(rows.len(), 1 + MAX_INSTANCES);
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    // The failed one, the two running, then the first others in element order.
    assert_eq!(
        ids,
        [
            "fan", "fan[0]", "fan[1]", "fan[2]", "fan[3]", "fan[4]", "fan[5]", "fan[6]", "fan[20]",
            "fan[21]", ""
        ]
    );
    let summary = rows.last().unwrap();
    assert_eq!(summary.prefix, "└─ ");
    assert_eq!(summary.what, "21 more");
    assert_eq!(summary.notes, ["18 succeeded, 3 pending"]);
    assert_eq!(rows[0].state, "running 26/30");
    assert_eq!(all_rows(&view, NOW).len(), 31);
}

#[test]
fn changes_are_the_rows_whose_status_worker_or_attempt_changed() {
    let before = fan_out();
    let first = changes(&[], &all_rows(&before, NOW));
    assert_eq!(first.len(), 7, "every row the first time: {first:#?}");
    // Time passing alone is no change.
    assert!(changes(&all_rows(&before, NOW), &all_rows(&before, NOW + 700)).is_empty());
    let mut after = before.clone();
    after.steps[1].instances[1].status = StepStatus::Succeeded;
    after.steps[1].instances[1].finished_at_ms = Some(NOW + 100);
    after.steps[1].map.as_mut().unwrap().finished = 2;
    let lines = changes(&all_rows(&before, NOW), &all_rows(&after, NOW + 200));
    assert_eq!(
        lines,
        [
            "  ◐ retrieve     retrieve  running 2/3                              3.9 s  map over plan.queries",
            "  ✓ retrieve[1]  retrieve  succeeded    attempt 1  worker-retrieve  1.6 s",
        ]
    );
}

#[test]
fn durations_read_naturally() {
    assert_eq!(duration(12), "12 ms");
    assert_eq!(duration(1_250), "1.2 s");
    assert_eq!(duration(184_000), "3m 04s");
    assert_eq!(duration(7_500_000), "2h 05m");
    assert_eq!(duration(30 * 86_400_000), "30d 00h");
}

#[test]
fn views_without_ids_are_drawn_flat() {
    // An older master's view: no ids, no needs.
    let view = task(
        TaskStatus::Queued,
        vec![
            step(0, "", "plan", &[], StepStatus::Queued),
            step(1, "", "finalize", &[], StepStatus::Pending),
        ],
    );
    let rows = rows(&view, NOW);
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.prefix.is_empty()));
}

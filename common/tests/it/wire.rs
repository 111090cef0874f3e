//! Wire types survive a JSON round trip and reject what they should.

use common::wire::*;
use serde_json::json;

fn round_trip<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let text = serde_json::to_string(value).unwrap();
    let back: T = serde_json::from_str(&text).unwrap();
    assert_eq!(&back, value, "{text}");
}

#[test]
fn protocol_types_round_trip() {
    let task_id = TaskId::generate();
    let plan = Capability::new("plan").unwrap();
    round_trip(&WorkRequest {
        task_id: task_id.clone(),
        step: 1,
        attempt: 2,
        capability: Capability::new("retrieve").unwrap(),
        input: json!({"plan": ["a", "b"]}),
        context: StepContext {
            task_input: json!({"question": "why?"}),
            previous: vec![PriorOutput {
                step: 0,
                id: "plan".into(),
                capability: Some(plan.clone()),
                status: StepStatus::Succeeded,
                output: json!({"plan": ["a", "b"]}),
                error: None,
            }],
            pipeline: Some("default".into()),
            total_steps: 4,
            step_id: Some("retrieve[1]".into()),
            element_index: Some(1),
        },
        deadline_ms: 1_700_000_000_000,
        worker_id: Some(WorkerId::new("worker-1").unwrap()),
        request_id: None,
    });
    round_trip(&ResultReport {
        task_id: task_id.clone(),
        step: 1,
        attempt: 2,
        worker_id: WorkerId::new("worker-b").unwrap(),
        status: ReportStatus::Failed,
        output: None,
        error: Some(StepError::retryable("upstream", "gateway answered 503")),
        duration_ms: Some(12),
    });
    round_trip(&ResultAck {
        status: AckStatus::Discarded,
    });
    round_trip(&SubmitTask {
        pipeline: Some("default".into()),
        steps: None,
        input: json!({"q": 1}),
        priority: 5,
        idempotency_key: Some("k-1".into()),
        callback_url: None,
        budget: Some(common::usage::Budget {
            max_tokens: Some(10_000),
            max_cost_usd: Some(0.5),
        }),
    });
    round_trip(&TaskView {
        task_id: task_id.clone(),
        status: TaskStatus::Running,
        pipeline: None,
        priority: 0,
        input: json!(null),
        steps: vec![
            StepView {
                index: 0,
                id: "plan".into(),
                kind: StepKind::Work,
                capability: Some(plan.clone()),
                needs: vec![],
                router: false,
                allow_failure: false,
                map: Some(MapView {
                    over: "input.queries".into(),
                    concurrency: 2,
                    total: Some(1),
                    finished: 0,
                }),
                instances: vec![StepView {
                    index: 2,
                    id: "plan[0]".into(),
                    kind: StepKind::Work,
                    capability: Some(plan),
                    needs: vec![],
                    router: false,
                    allow_failure: false,
                    map: None,
                    instances: vec![],
                    element_index: Some(0),
                    wait: None,
                    sleep_ms: None,
                    wakes_at_ms: None,
                    status: StepStatus::Dispatched,
                    worker_id: Some(WorkerId::new("w").unwrap()),
                    attempts: 1,
                    output: None,
                    error: None,
                    queued_at_ms: Some(1),
                    dispatched_at_ms: Some(2),
                    finished_at_ms: None,
                    usage: Some(common::usage::Usage {
                        prompt_tokens: 10,
                        completion_tokens: 2,
                        total_tokens: 12,
                        cost_usd: 0.0001,
                        calls: 1,
                    }),
                }],
                element_index: None,
                wait: None,
                sleep_ms: None,
                wakes_at_ms: None,
                status: StepStatus::Running,
                worker_id: None,
                attempts: 0,
                output: None,
                error: None,
                queued_at_ms: Some(1),
                dispatched_at_ms: None,
                finished_at_ms: None,
                usage: None,
            },
            StepView {
                index: 1,
                id: "approve".into(),
                kind: StepKind::Wait,
                capability: None,
                needs: vec!["plan".into()],
                router: false,
                allow_failure: true,
                map: None,
                instances: vec![],
                element_index: None,
                wait: Some(WaitView {
                    signal: "approve".into(),
                    timeout_ms: 60_000,
                    on_timeout: OnTimeout::Continue,
                }),
                sleep_ms: None,
                wakes_at_ms: Some(61_000),
                status: StepStatus::Waiting,
                worker_id: None,
                attempts: 0,
                output: None,
                error: None,
                queued_at_ms: None,
                dispatched_at_ms: None,
                finished_at_ms: None,
                usage: None,
            },
        ],
        result: None,
        error: None,
        created_at_ms: 1,
        started_at_ms: Some(2),
        finished_at_ms: None,
        callback: Some(CallbackView {
            url: "https://hooks.example.com/done".into(),
            status: CallbackStatus::Pending,
            attempts: 0,
            last_error: None,
        }),
        usage: Some(common::usage::UsageSummary {
            total: common::usage::Usage {
                prompt_tokens: 10,
                completion_tokens: 2,
                total_tokens: 12,
                cost_usd: 0.0001,
                calls: 1,
            },
            budget: Some(common::usage::Budget {
                max_tokens: None,
                max_cost_usd: Some(1.0),
            }),
        }),
    });
}

#[test]
fn steps_are_capability_names_or_step_objects_in_one_list() {
    let submit: SubmitTask = serde_json::from_value(json!({
        "steps": [
            "plan",
            {"id": "fetch", "capability": "retrieve", "needs": ["plan"],
             "map": {"over": "plan.queries", "concurrency": 4}},
            {"id": "ok", "wait": {"timeout_ms": 1000, "on_timeout": "continue"}},
            {"sleep_ms": 5, "needs": []}
        ]
    }))
    .unwrap();
    let steps = submit.steps.clone().unwrap();
    assert_eq!(steps[0], StepSpec::Name(Capability::new("plan").unwrap()));
    let StepSpec::Def(fetch) = &steps[1] else {
        panic!("{steps:?}")
    };
    assert_eq!(fetch.map.as_ref().unwrap().concurrency, Some(4));
    let StepSpec::Def(wait) = &steps[2] else {
        panic!("{steps:?}")
    };
    assert_eq!(wait.wait.as_ref().unwrap().on_timeout, OnTimeout::Continue);
    round_trip(&submit);
    // A misspelt field of a step object is refused, not ignored.
    assert!(
        serde_json::from_value::<SubmitTask>(json!({"steps": [{"capabilty": "plan"}]})).is_err()
    );
    round_trip(&SignalRequest {
        name: "approve".into(),
        payload: json!({"ok": true}),
    });
    assert_eq!(
        serde_json::to_value(SignalResponse {
            status: SignalStatus::Buffered
        })
        .unwrap(),
        json!({"status": "buffered"})
    );
}

#[test]
fn wire_names_are_snake_case() {
    assert_eq!(
        serde_json::to_value(TaskStatus::Succeeded).unwrap(),
        json!("succeeded")
    );
    assert_eq!(
        serde_json::to_value(StepStatus::Dispatched).unwrap(),
        json!("dispatched")
    );
    assert_eq!(
        serde_json::to_value(AckStatus::Recorded).unwrap(),
        json!("recorded")
    );
}

#[test]
fn submit_rejects_unknown_fields_and_bad_capabilities() {
    let err = serde_json::from_value::<SubmitTask>(json!({"steps": ["plan"], "inptu": 1}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("inptu"), "{err}");
    let err = serde_json::from_value::<SubmitTask>(json!({"steps": ["Plan Me"]}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid capability"), "{err}");
}

#[test]
fn reports_must_be_consistent() {
    let mut report = ResultReport {
        task_id: TaskId::generate(),
        step: 0,
        attempt: 1,
        worker_id: WorkerId::new("w").unwrap(),
        status: ReportStatus::Failed,
        output: None,
        error: None,
        duration_ms: None,
    };
    assert!(report.validate().is_err());
    report.error = Some(StepError::permanent("agent", "bad template"));
    assert!(report.validate().is_ok());
    report.attempt = 0;
    assert!(report.validate().is_err());
}

#[test]
fn a_report_s_duration_is_any_non_negative_number_of_milliseconds() {
    let report = |duration: serde_json::Value| {
        serde_json::from_value::<ResultReport>(json!({
            "task_id": TaskId::generate(), "step": 0, "attempt": 1, "worker_id": "w",
            "status": "succeeded", "output": 1, "duration_ms": duration,
        }))
    };
    assert_eq!(report(json!(12)).unwrap().duration_ms, Some(12));
    assert_eq!(report(json!(12.6)).unwrap().duration_ms, Some(13));
    assert_eq!(report(json!(0.2)).unwrap().duration_ms, Some(0));
    assert_eq!(report(serde_json::Value::Null).unwrap().duration_ms, None);
    for bad in [json!(-1), json!(-0.5), json!("12")] {
        let err = report(bad.clone()).unwrap_err().to_string();
        assert!(
            err.contains("duration_ms") || err.contains("number"),
            "{bad}: {err}"
        );
    }
}

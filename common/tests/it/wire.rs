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
                capability: plan.clone(),
                output: json!({"plan": ["a", "b"]}),
            }],
            pipeline: Some("default".into()),
            total_steps: 4,
        },
        deadline_ms: 1_700_000_000_000,
        worker_id: Some(WorkerId::new("worker-1").unwrap()),
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
    });
    round_trip(&TaskView {
        task_id: task_id.clone(),
        status: TaskStatus::Running,
        pipeline: None,
        priority: 0,
        input: json!(null),
        steps: vec![StepView {
            index: 0,
            capability: plan,
            status: StepStatus::Dispatched,
            worker_id: Some(WorkerId::new("w").unwrap()),
            attempts: 1,
            output: None,
            error: None,
            queued_at_ms: Some(1),
            dispatched_at_ms: Some(2),
            finished_at_ms: None,
        }],
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
    });
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

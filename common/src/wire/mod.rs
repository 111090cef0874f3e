//! Types every service exchanges: ids that check themselves, the client API's task types,
//! and the master ↔ worker protocol (`POST /work`, `POST /result`, worker records).

mod events;
mod ids;
mod task;
mod work;

pub use events::{
    MAX_EVENT_VALUE_BYTES, MAX_PROGRESS_BYTES, MAX_PROGRESS_EVENTS, StepProgress, TaskEvent, kinds,
};
pub use ids::{Capability, IdError, TaskId, WorkerId};
pub use task::{
    CallbackStatus, CallbackView, MapDef, MapView, OnTimeout, SignalRequest, SignalResponse,
    SignalStatus, StepDef, StepKind, StepSpec, StepStatus, StepView, SubmitResponse, SubmitTask,
    TaskResult, TaskStatus, TaskView, WaitDef, WaitView,
};
pub use work::{
    AckStatus, MAX_BATCH, PriorOutput, RawBatch, ReportStatus, ResultAck, ResultBatchAnswer,
    ResultItemAnswer, ResultReport, StepContext, StepError, StepRef, WorkAccepted, WorkBatchAnswer,
    WorkItemAnswer, WorkRequest, WorkerRecord, batch_elements,
};

/// Milliseconds since the Unix epoch, the unit of every timestamp on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Deepest nesting of arrays and objects accepted in a task's `input` and a step's
/// `output`. A step's request to a worker carries them two levels deeper (`input`,
/// `context.task_input`, `context.previous[i].output`), and serde_json refuses more than
/// 128 levels, so anything the master accepts stays within what a worker can parse.
pub const MAX_JSON_DEPTH: usize = 64;

/// How deeply arrays and objects nest in `value` (a scalar is 0, `[]` is 1, `[[1]]` is 2).
/// Iterative, so no input can overflow the stack here.
pub fn json_depth(value: &serde_json::Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match v {
            serde_json::Value::Array(items) => Box::new(items.iter()),
            serde_json::Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        deepest = deepest.max(depth + 1);
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    deepest
}

#[cfg(test)]
mod depth_tests {
    use super::json_depth;
    use serde_json::json;

    #[test]
    fn depth_counts_containers_not_scalars() {
        assert_eq!(json_depth(&json!(1)), 0);
        assert_eq!(json_depth(&json!([])), 1);
        assert_eq!(json_depth(&json!({"a": [1, {"b": []}]})), 4);
        let mut deep = json!(0);
        for _ in 0..100 {
            deep = json!([deep]);
        }
        assert_eq!(json_depth(&deep), 100);
    }
}

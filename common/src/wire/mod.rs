//! Types every service exchanges: ids that check themselves, the client API's task types,
//! and the master ↔ worker protocol (`POST /work`, `POST /result`, worker records).

mod ids;
mod task;
mod work;

pub use ids::{Capability, IdError, TaskId, WorkerId};
pub use task::{
    StepStatus, StepView, SubmitResponse, SubmitTask, TaskResult, TaskStatus, TaskView,
};
pub use work::{
    AckStatus, PriorOutput, ReportStatus, ResultAck, ResultReport, StepContext, StepError, StepRef,
    WorkRequest, WorkerRecord,
};

/// Milliseconds since the Unix epoch, the unit of every timestamp on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

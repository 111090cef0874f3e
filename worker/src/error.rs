//! The worker's error answers on `POST /work`, in the JSON error body of DESIGN.md §3.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use common::http::ApiError;
use common::wire::{Capability, WorkerId};

/// Why `POST /work` refused a step.
#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    /// No worker token, or the wrong one.
    #[error("missing or wrong worker token (`Authorization: Bearer <WORKER_TOKEN>`)")]
    Unauthorized,
    /// The step is well-formed JSON but not a valid step; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// This worker does not serve the step's capability.
    #[error("capability `{0}` is not served by this worker")]
    CapabilityNotServed(Capability),
    /// `MAX_CONCURRENCY` steps are held.
    #[error("the worker is at capacity; retry later or elsewhere")]
    AtCapacity,
    /// The worker is shutting down.
    #[error("the worker is draining and takes no new work")]
    Draining,
    /// The worker cannot deliver results to the master (the reason), so a step given to it
    /// now would only wait for its lease to lapse.
    #[error("the worker is degraded and takes no new work: {0}")]
    Degraded(String),
    /// An agent service the worker forwards steps to fails its health check (the reason):
    /// a step given to it now would only fail. The master tries another worker.
    #[error("the worker's agent is unavailable, so it takes no new work: {0}")]
    AgentUnavailable(String),
    /// The step is leased to another worker (the id it names): this worker's address also
    /// reaches that one's, and running it here would run it where the master did not lease it.
    #[error(
        "this step is leased to worker `{0}`, not this one (`{1}`): two workers share an address"
    )]
    Misdirected(WorkerId, WorkerId),
}

impl WorkError {
    /// The `reason` label of the rejected-steps counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Invalid(_) => "invalid",
            Self::CapabilityNotServed(_) => "capability_not_served",
            Self::AtCapacity => "at_capacity",
            Self::Draining => "draining",
            Self::Degraded(_) => "degraded",
            Self::AgentUnavailable(_) => "agent_unavailable",
            Self::Misdirected(..) => "misdirected",
        }
    }
}

impl WorkError {
    /// The error body this refusal answers with (also one step's answer in a batch), and
    /// counts it.
    pub fn api_error(self) -> ApiError {
        ::metrics::counter!(crate::metrics::STEPS_REJECTED, "reason" => self.reason()).increment(1);
        let message = self.to_string();
        match self {
            Self::Unauthorized => ApiError::unauthorized(message),
            Self::Invalid(_) => ApiError::invalid(message),
            Self::CapabilityNotServed(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "capability_not_served",
                message,
            ),
            Self::AtCapacity => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "at_capacity", message).retry_after(1)
            }
            Self::Draining => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining", message).retry_after(1)
            }
            // Retry after about one probe of the master: by then it may be reachable again.
            Self::Degraded(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "degraded", message).retry_after(1)
            }
            // Retry after about one health check: by then the agent may be back.
            Self::AgentUnavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "agent_unavailable",
                message,
            )
            .retry_after(1),
            Self::Misdirected(..) => {
                ApiError::new(StatusCode::MISDIRECTED_REQUEST, "misdirected", message)
            }
        }
    }
}

impl IntoResponse for WorkError {
    fn into_response(self) -> Response {
        self.api_error().into_response()
    }
}

//! The service layer's errors: why a task operation failed, in the master's own terms.
//! `tasks.rs` returns them and never speaks HTTP; `routes/` alone turns them into answers
//! (status, error code, message, `Retry-After`).

use std::time::Duration;

use crate::store::StoreError;

/// Why a task operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServiceError {
    /// No such task, or another client's: a client cannot tell the two apart, so it learns
    /// nothing about tasks that are not its own. Holds the id as given.
    #[error("no task `{0}`")]
    NotFound(String),
    /// Well-formed but invalid input; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The task is not in a state that allows the operation (already finished, not failed).
    #[error("{0}")]
    Conflict(String),
    /// The client submits faster than its rate limit; it may try again after the wait.
    #[error("too many tasks submitted; slow down")]
    RateLimited {
        /// Until the client's bucket has room for one more task.
        retry_after: Duration,
    },
    /// The store cannot be reached or cannot take writes now; retrying shortly helps.
    #[error("storage is unavailable; retry shortly")]
    Unavailable,
    /// Redis is at `maxmemory`: retrying does not help until an operator frees memory.
    #[error("{}", common::redis::STORAGE_FULL_MESSAGE)]
    StorageFull,
    /// A fault of the master or its store that retrying will not mend. The detail is for
    /// the log, never for the caller.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A store failure as the caller sees it. Logged here, once per request, so an outage
/// shows in the log with the message the Redis-errors alarm counts
/// ([`common::redis::UNAVAILABLE_LOG`]).
impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(msg) => {
                tracing::warn!(error = %msg, during = "request", "{}", common::redis::UNAVAILABLE_LOG);
                Self::Unavailable
            }
            StoreError::StorageFull(msg) => {
                tracing::error!(error = %msg, "task store full");
                Self::StorageFull
            }
            StoreError::NotReady(n) if n.reason == "storage_full" => Self::StorageFull,
            StoreError::NotReady(n) => {
                tracing::warn!(reason = n.reason, error = %n.message, "task store not ready");
                Self::Unavailable
            }
            StoreError::Backend(msg) | StoreError::Corrupt(msg) => Self::Internal(msg),
        }
    }
}

//! Every Redis key the master writes, in one place. The Lua scripts build the same names
//! from the prefix (see the comments in `lua/`); keep the two in step.
//!
//! A task's hash carries its id as a hash tag (`{id}`), so one task's keys could live in
//! one Redis Cluster slot. Queues, leases and dead letters are per capability. The scripts
//! touch a task and its capability's queues together, which needs cluster mode disabled
//! (what the ElastiCache deployment uses).

/// A task's hash.
pub fn task(prefix: &str, id: &str) -> String {
    format!("{prefix}:task:{{{id}}}")
}

/// A capability's ready queue (sorted set of `task_id:step`, by priority then time).
pub fn queue(prefix: &str, capability: &str) -> String {
    format!("{prefix}:q:{capability}")
}

/// A capability's steps waiting out a retry backoff (sorted set by due time).
pub fn delayed(prefix: &str, capability: &str) -> String {
    format!("{prefix}:delayed:{capability}")
}

/// A capability's leased steps (sorted set by lease expiry).
pub fn leases(prefix: &str, capability: &str) -> String {
    format!("{prefix}:lease:{capability}")
}

/// A capability's dead-lettered tasks (sorted set by failure time).
pub fn dead(prefix: &str, capability: &str) -> String {
    format!("{prefix}:dead:{capability}")
}

/// Steps in flight per worker (hash).
pub fn worker_load(prefix: &str) -> String {
    format!("{prefix}:wload")
}

/// Capabilities seen in inline steps (set).
pub fn capabilities(prefix: &str) -> String {
    format!("{prefix}:caps")
}

/// The completion-callback outbox: task ids by when their delivery is due (sorted set).
/// The delivery state lives in the task's hash: `cb` URL, `cbs` pending|delivered|failed,
/// `cbn` attempts claimed, `cbe` last error.
pub fn callbacks(prefix: &str) -> String {
    format!("{prefix}:callbacks")
}

/// A client's idempotency key.
pub fn idempotency(prefix: &str, client: &str, key: &str) -> String {
    format!("{prefix}:idem:{client}:{key}")
}

/// A client's rate-limit state.
pub fn rate(prefix: &str, client: &str) -> String {
    format!("{prefix}:rate:{client}")
}

/// A queue member: `task_id:step`.
pub fn member(task_id: &str, step: u32) -> String {
    format!("{task_id}:{step}")
}

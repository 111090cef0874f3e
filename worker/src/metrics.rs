//! The worker's metric names (all `ensemble_worker_*`), in one place.

/// Counter: steps accepted by `POST /work`, by `capability`.
pub const STEPS_RECEIVED: &str = "ensemble_worker_steps_received_total";
/// Counter: steps whose agent returned an output, by `capability`.
pub const STEPS_SUCCEEDED: &str = "ensemble_worker_steps_succeeded_total";
/// Counter: steps that failed (agent error or timeout), by `capability` and `kind`.
pub const STEPS_FAILED: &str = "ensemble_worker_steps_failed_total";
/// Counter: `POST /work` refused, by `reason` (`at_capacity`, `draining`, `degraded`,
/// `agent_unavailable`, `capability_not_served`, `unauthorized`, `invalid`, `misdirected`).
pub const STEPS_REJECTED: &str = "ensemble_worker_steps_rejected_total";
/// Histogram: how long agents ran, by `capability`.
pub const STEP_DURATION: &str = "ensemble_worker_step_duration_seconds";
/// Gauge: steps held (running or delivering), by `worker`.
pub const IN_FLIGHT: &str = "ensemble_worker_in_flight";
/// Counter: result POSTs retried after a failed attempt.
pub const DELIVERY_RETRIES: &str = "ensemble_worker_result_delivery_retries_total";
/// Counter: results settled, by `outcome` (`recorded`, `discarded`, `rejected`,
/// `gave_up`, `aborted`).
pub const DELIVERIES: &str = "ensemble_worker_result_deliveries_total";
/// Gauge: 1 while the worker cannot deliver results to the master (and so takes no new
/// steps), else 0; by `worker`.
pub const DEGRADED: &str = "ensemble_worker_degraded";
/// Counter: `GET {MASTER_URL}/health` probes made while degraded, by `outcome` (`ok`,
/// `failed`).
pub const MASTER_PROBES: &str = "ensemble_worker_master_probes_total";
/// Counter: heartbeats that could not be written.
pub const HEARTBEAT_FAILURES: &str = "ensemble_worker_heartbeat_failures_total";
/// Counter: partial messages agents produced before their output (the `http` agent's
/// stream events before the last), by `capability`.
pub const AGENT_PARTIALS: &str = "ensemble_worker_agent_partials_total";
/// Gauge: 1 while the worker takes no new steps because an `http` agent's service fails its
/// health check (or has not passed one yet), else 0; by `worker`.
pub const AGENT_UNAVAILABLE: &str = "ensemble_worker_agent_unavailable";
/// Counter: agent health checks, by `outcome` (`ok`, `failed`).
pub const AGENT_HEALTH_CHECKS: &str = "ensemble_worker_agent_health_checks_total";
/// Counter: `POST {MASTER_URL}/progress` batches of partial output, by `outcome`:
/// `recorded`; `discarded` and `limited` (the master wants no more for that attempt);
/// `too_large` (`413`), `rejected` (another `4xx`) and `failed` (`5xx`, connection error,
/// timeout), whose messages are dropped.
pub const PROGRESS_BATCHES: &str = "ensemble_worker_progress_batches_total";
/// Counter: partial messages dropped before they were sent, by `reason`: `backlog` (more
/// than `MAX_PROGRESS_BYTES` waiting while the master was slow), `too_large` (one message
/// larger than a batch may be), `unsent` (still waiting when the step's report was due).
pub const PROGRESS_DROPPED: &str = "ensemble_worker_progress_messages_dropped_total";

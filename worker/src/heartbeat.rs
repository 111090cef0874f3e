//! Registration and heartbeat: the worker's record in the Redis registry (through
//! `common::registry`), rewritten every `HEARTBEAT_INTERVAL_MS` with a TTL of three intervals
//! and the steps it holds, so the master can dispatch to it and extend their leases.
//!
//! Redis being down does not stop the worker: it keeps serving what it holds and keeps
//! trying, logging once when the outage starts and once when it ends.

use std::sync::Arc;
use std::time::Duration;

use common::registry::Registry;
use common::wire::WorkerRecord;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::inflight::InFlight;
use crate::metrics;

/// Keeps the worker's registry record alive.
#[derive(Clone)]
pub struct Heartbeat {
    registry: Registry,
    /// The record's fixed part (id, URL, capabilities, …); `in_flight`, `draining`,
    /// `degraded` and `unavailable` are filled in on every beat.
    record: WorkerRecord,
    /// The steps to list.
    in_flight: Arc<InFlight>,
    /// Time between beats.
    interval: Duration,
    /// How long a record outlives its last beat.
    ttl: Duration,
    /// Wakes the loop for a beat now (the drain publishes `draining: true` at once, a
    /// failed delivery `degraded`, and the agent health task `unavailable`).
    wake: Arc<Notify>,
}

impl Heartbeat {
    /// A heartbeat for `record`.
    pub fn new(
        registry: Registry,
        record: WorkerRecord,
        in_flight: Arc<InFlight>,
        interval: Duration,
        ttl: Duration,
    ) -> Self {
        Self {
            registry,
            record,
            in_flight,
            interval,
            ttl,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Asks the loop for a beat now.
    pub fn beat_now(&self) {
        self.wake.notify_one();
    }

    /// What [`Self::beat_now`] notifies, for parts that must publish a change at once
    /// without holding the whole heartbeat (result delivery marking the worker degraded).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Beats until `stop` fires. Does not deregister: the caller decides when.
    pub async fn run(self, stop: CancellationToken) {
        // `None` until the first beat, so the first success and the first failure both log.
        let mut healthy: Option<bool> = None;
        loop {
            let record = WorkerRecord {
                in_flight: self.in_flight.snapshot(),
                draining: self.in_flight.is_draining(),
                degraded: self.in_flight.degraded(),
                unavailable: self.in_flight.unavailable(),
                ..self.record.clone()
            };
            match self.registry.heartbeat(&record, self.ttl).await {
                Ok(new) => {
                    if healthy != Some(true) {
                        tracing::info!(
                            worker_id = %record.id,
                            url = %record.url,
                            "registered with the registry"
                        );
                    } else if new {
                        tracing::warn!(
                            worker_id = %record.id,
                            "registry record had expired (a slow beat?); registered again"
                        );
                    }
                    healthy = Some(true);
                }
                Err(e) => {
                    ::metrics::counter!(metrics::HEARTBEAT_FAILURES).increment(1);
                    if healthy != Some(false) {
                        // Held steps are still served; the next beat retries.
                        tracing::warn!(
                            error = %e.message,
                            during = "heartbeat",
                            "{}",
                            common::redis::UNAVAILABLE_LOG
                        );
                    }
                    healthy = Some(false);
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.interval) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// Removes the record now. A failure is logged: the record then lapses with its TTL.
    pub async fn deregister(&self) {
        match self.registry.deregister(&self.record.id).await {
            Ok(()) => tracing::info!(worker_id = %self.record.id, "deregistered"),
            Err(e) => tracing::warn!(
                error = %e.message,
                "could not deregister; the record will expire with its TTL"
            ),
        }
    }
}

//! Caps on long-lived requests: how many one client may hold open at once, and how many
//! this process holds in total.
//!
//! A long-lived request (a `GET /result/{id}?wait=S` long poll today; an SSE event stream
//! later) costs the master a connection, so a file descriptor, for its whole life. Without
//! a cap one client opening 1,500 long polls exhausted a soft `RLIMIT_NOFILE` of 1024: the
//! master's `accept` failed with "Too many open files" and `/health` and `POST /task`
//! timed out for everyone. With [`Concurrency`], a request beyond the client's cap gets
//! `429` and one beyond the process's cap `503`, both with `Retry-After`, answered at once
//! and so holding nothing.
//!
//! A request holds a [`Permit`] for as long as it waits. The permit lives in the handler's
//! future, so it is released however the request ends: answered, failed, or dropped by
//! hyper because the client disconnected mid-wait. The caps are per process: with several
//! master replicas behind a load balancer, each enforces its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::http::StatusCode;
use common::http::ApiError;

/// Gauge: long-lived requests held now, by `kind`.
pub const HELD: &str = "ensemble_master_long_lived_requests";
/// Counter: long-lived requests refused at a cap, by `kind` and `cap` (`client`, `total`).
pub const REFUSED: &str = "ensemble_master_long_lived_refused_total";

/// What a [`Concurrency`] guards, and its caps.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// The kind of request, in messages (`long polls`) and as the metrics' `kind` label
    /// (`long_poll`).
    pub kind: &'static str,
    /// The plural noun for messages: "this client already holds 100 long polls".
    pub noun: &'static str,
    /// The most one client may hold at once (`429` beyond it).
    pub per_client: usize,
    /// The setting that sets `per_client`, named in the refusal so an operator knows what
    /// to raise.
    pub per_client_setting: &'static str,
    /// The most this process holds at once, all clients together (`503` beyond it).
    pub total: usize,
    /// The setting that sets `total`.
    pub total_setting: &'static str,
}

/// Why [`Concurrency::acquire`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The client holds its cap already: `429`.
    Client,
    /// The process holds its cap already: `503`.
    Total,
}

/// Hands out [`Permit`]s for long-lived requests, within a per-client and a total cap.
#[derive(Debug)]
pub struct Concurrency {
    /// What is guarded, and the caps.
    caps: Caps,
    /// Who holds how many. One lock for both counts keeps the two checks and the two
    /// increments atomic; every critical section is a few integer operations.
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    /// All clients together.
    total: usize,
    /// Per client id; a client holding none has no entry, so the map stays as small as
    /// the number of clients waiting now.
    by_client: HashMap<String, usize>,
}

impl Concurrency {
    /// A limiter with these caps.
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Self {
            caps,
            held: Mutex::new(Held::default()),
        })
    }

    /// The caps in force.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        // Every critical section leaves the counts consistent, so a poisoned lock (a panic
        // elsewhere while it was held) is still usable.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A permit for one long-lived request of `client`, or why not. The per-client cap is
    /// checked first: a client at its own cap is told to slow down (`429`) even when the
    /// process is full too, since its own requests are what it can change.
    pub fn try_acquire(self: &Arc<Self>, client: &str) -> Result<Permit, Refused> {
        let total = {
            let mut held = self.lock();
            let mine = held.by_client.get(client).copied().unwrap_or(0);
            if mine >= self.caps.per_client {
                drop(held);
                self.count_refusal(Refused::Client);
                return Err(Refused::Client);
            }
            if held.total >= self.caps.total {
                drop(held);
                self.count_refusal(Refused::Total);
                return Err(Refused::Total);
            }
            held.total += 1;
            *held.by_client.entry(client.to_string()).or_default() += 1;
            held.total
        };
        self.set_gauge(total);
        Ok(Permit {
            limiter: self.clone(),
            client: client.to_string(),
        })
    }

    /// [`Self::try_acquire`], with a refusal as the answer to send.
    pub fn acquire(self: &Arc<Self>, client: &str) -> Result<Permit, ApiError> {
        self.try_acquire(client).map_err(|why| self.refusal(why))
    }

    /// How many permits are held, all clients together.
    pub fn held(&self) -> usize {
        self.lock().total
    }

    /// How many permits `client` holds.
    pub fn held_by(&self, client: &str) -> usize {
        self.lock().by_client.get(client).copied().unwrap_or(0)
    }

    /// The answer to a refused request: `429` (client cap) or `503` (total cap), with
    /// `Retry-After` and a message naming the cap and its setting.
    pub fn refusal(&self, why: Refused) -> ApiError {
        let Caps {
            noun,
            per_client,
            per_client_setting,
            total,
            total_setting,
            ..
        } = self.caps;
        match why {
            // One of the client's own requests may end any moment.
            Refused::Client => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_concurrent",
                format!(
                    "this client already holds {per_client} {noun} at once \
                     ({per_client_setting}); wait for one to end before opening another"
                ),
            )
            .retry_after(1),
            Refused::Total => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "the master already holds as many {noun} as it allows at once \
                     ({total}, {total_setting}); retry shortly"
                ),
            )
            .retry_after(2),
        }
    }

    fn release(&self, client: &str) {
        let total = {
            let mut held = self.lock();
            held.total = held.total.saturating_sub(1);
            if let Some(mine) = held.by_client.get_mut(client) {
                *mine = mine.saturating_sub(1);
                if *mine == 0 {
                    held.by_client.remove(client);
                }
            }
            held.total
        };
        self.set_gauge(total);
    }

    fn set_gauge(&self, total: usize) {
        metrics::gauge!(HELD, "kind" => self.caps.kind).set(total as f64);
    }

    fn count_refusal(&self, why: Refused) {
        let cap = match why {
            Refused::Client => "client",
            Refused::Total => "total",
        };
        metrics::counter!(REFUSED, "kind" => self.caps.kind, "cap" => cap).increment(1);
    }
}

/// One long-lived request's place within the caps; dropping it gives the place back.
#[derive(Debug)]
pub struct Permit {
    /// What the place is given back to.
    limiter: Arc<Concurrency>,
    /// Whose count goes down when it is.
    client: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release(&self.client);
    }
}

/// The limiter for `GET /result/{id}?wait=S` long polls, from `LONG_POLL_MAX_PER_CLIENT`
/// and `LONG_POLL_MAX_TOTAL`.
///
/// Headroom: the total cap is held to at most half of this process's open-file limit (as
/// raised at start by `common::limits::raise_nofile`), so that when it is reached the
/// other half is still there for `/health`, `POST /task`, workers' results and Redis. A
/// larger `LONG_POLL_MAX_TOTAL` is lowered to that, with a warning naming both numbers.
pub fn long_polls(config: &crate::Config) -> Arc<Concurrency> {
    let configured = config.long_poll_max_total;
    let file_limit = common::limits::nofile().map(|l| l.soft);
    let total = headroom(configured, file_limit);
    if total < configured {
        tracing::warn!(
            long_poll_max_total = configured,
            open_file_limit = file_limit,
            effective = total,
            "LONG_POLL_MAX_TOTAL is more than half the open-file limit (RLIMIT_NOFILE); \
             holding at most {total} long polls so /health and POST /task keep connections; \
             raise the limit (ulimit -n, or the ECS task's nofile ulimit) to allow more"
        );
    }
    Concurrency::new(Caps {
        kind: "long_poll",
        noun: "long polls",
        per_client: config.long_poll_max_per_client.min(total),
        per_client_setting: "LONG_POLL_MAX_PER_CLIENT",
        total,
        total_setting: "LONG_POLL_MAX_TOTAL",
    })
}

/// `configured`, lowered to half of `file_limit` (when it is known) and never below 1.
fn headroom(configured: usize, file_limit: Option<u64>) -> usize {
    match file_limit {
        Some(limit) => {
            let half = usize::try_from(limit / 2).unwrap_or(usize::MAX);
            configured.min(half).max(1)
        }
        None => configured,
    }
}

/// The limiter for event streams (`GET /task/{id}/events`, `GET /events`), from
/// `EVENT_STREAMS_MAX_PER_CLIENT` and `EVENT_STREAMS_MAX_TOTAL`, with the same headroom
/// rule as [`long_polls`].
pub fn event_streams(config: &crate::Config) -> Arc<Concurrency> {
    let configured = config.event_streams_max_total;
    let total = headroom(configured, common::limits::nofile().map(|l| l.soft));
    if total < configured {
        tracing::warn!(
            event_streams_max_total = configured,
            effective = total,
            "EVENT_STREAMS_MAX_TOTAL is more than half the open-file limit (RLIMIT_NOFILE); \
             holding at most {total} event streams"
        );
    }
    Concurrency::new(Caps {
        kind: "event_stream",
        noun: "event streams",
        per_client: config.event_streams_max_per_client.min(total),
        per_client_setting: "EVENT_STREAMS_MAX_PER_CLIENT",
        total,
        total_setting: "EVENT_STREAMS_MAX_TOTAL",
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn limiter(per_client: usize, total: usize) -> Arc<Concurrency> {
        Concurrency::new(Caps {
            kind: "test",
            noun: "test requests",
            per_client,
            per_client_setting: "PER_CLIENT",
            total,
            total_setting: "TOTAL",
        })
    }

    #[test]
    fn per_client_cap_then_total_cap() {
        let caps = limiter(2, 3);
        let a1 = caps.try_acquire("a").unwrap();
        let _a2 = caps.try_acquire("a").unwrap();
        assert_eq!(caps.try_acquire("a").unwrap_err(), Refused::Client);
        let _b1 = caps.try_acquire("b").unwrap();
        assert_eq!(caps.try_acquire("b").unwrap_err(), Refused::Total);
        assert_eq!(
            caps.try_acquire("a").unwrap_err(),
            Refused::Client,
            "a client at its own cap hears about its own cap first"
        );
        assert_eq!(
            (caps.held(), caps.held_by("a"), caps.held_by("b")),
            (3, 2, 1)
        );
        drop(a1);
        assert_eq!(caps.held_by("a"), 1);
        let _b2 = caps.try_acquire("b").unwrap();
    }

    #[test]
    fn dropping_permits_releases_everything() {
        let caps = limiter(5, 5);
        let permits: Vec<Permit> = (0..5).map(|_| caps.try_acquire("a").unwrap()).collect();
        assert!(caps.try_acquire("b").is_err());
        drop(permits);
        assert_eq!(caps.held(), 0);
        assert!(caps.lock().by_client.is_empty(), "no entry left behind");
        assert!(caps.try_acquire("b").is_ok());
    }

    #[test]
    fn a_future_dropped_mid_wait_gives_its_permit_back() {
        let caps = limiter(1, 1);
        let permit = caps.try_acquire("a").unwrap();
        // What a handler does: hold the permit across an await that never completes.
        let wait = async move {
            let _permit = permit;
            std::future::pending::<()>().await;
        };
        assert_eq!(caps.held(), 1);
        drop(wait);
        assert_eq!(caps.held(), 0);
    }

    #[test]
    fn the_total_cap_keeps_half_the_file_limit_free() {
        assert_eq!(headroom(2_000, Some(1_024)), 512);
        assert_eq!(headroom(2_000, Some(65_536)), 2_000);
        assert_eq!(headroom(2_000, None), 2_000);
        assert_eq!(headroom(10, Some(1)), 1, "never zero");
    }

    #[test]
    fn refusals_are_429_and_503_with_retry_after() {
        let caps = limiter(1, 1);
        let client = caps.refusal(Refused::Client);
        assert_eq!(client.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(client.retry_after.is_some());
        assert!(client.message.contains("PER_CLIENT"), "{}", client.message);
        let total = caps.refusal(Refused::Total);
        assert_eq!(total.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(total.retry_after.is_some());
        assert!(total.message.contains("TOTAL"), "{}", total.message);
    }
}

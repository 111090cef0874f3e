//! Whether the agent services behind the worker's `http` agents are up. A worker that
//! forwards steps to a service that is down would accept each step only to fail it, so while
//! any service is down the worker is *unavailable*: its record says why (at once, not one
//! heartbeat later), dispatchers pass it by while still extending the leases of the steps it
//! holds, `/work` answers `503 agent_unavailable` and `/ready` answers `503`.
//!
//! Every `AGENT_HEALTH_INTERVAL_MS` each health URL gets a `GET`; a `2xx` is up. The worker
//! starts unavailable and becomes available once every URL has answered `2xx`; it becomes
//! unavailable again when any URL fails twice in a row (one failure may be a blip), and
//! available again when all answer. A step call whose connection is refused wakes the task
//! for a check at once. A worker without `http` agents runs no such task and is never
//! unavailable.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::delivery::describe;
use crate::inflight::InFlight;
use crate::metrics;

/// The longest one health check may take (less when the interval is shorter).
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Failures in a row of one URL that make an available worker unavailable.
const FAILURES_TO_DOWN: u32 = 2;
/// The least time between a check and one a refused step call asks for, so a burst of
/// refused calls does not become a burst of checks.
const RECHECK_GAP: Duration = Duration::from_millis(50);

/// Checks the agent services' health URLs and keeps the worker's availability in step.
pub struct AgentHealth {
    /// The distinct health URLs (one per agent service origin, unless configured).
    urls: Vec<String>,
    /// `AGENT_HEALTH_INTERVAL_MS`.
    interval: Duration,
    /// The `http` agents' client: no redirects, so a health URL that redirects is down.
    client: reqwest::Client,
    /// Holds the unavailable flag beside `draining` and `degraded`, so admission reads it
    /// under the same lock.
    in_flight: Arc<InFlight>,
    /// Wakes the heartbeat, so the registry hears of a change now.
    heartbeat: Arc<Notify>,
    /// Woken by a step call whose connection was refused: check now.
    recheck: Arc<Notify>,
}

impl AgentHealth {
    /// A task for `urls`, and the worker marked unavailable until its first good check.
    /// Call before the heartbeat starts, so the first record already says so.
    pub fn new(
        urls: Vec<String>,
        interval: Duration,
        client: reqwest::Client,
        in_flight: Arc<InFlight>,
        heartbeat: Arc<Notify>,
        recheck: Arc<Notify>,
    ) -> Self {
        if let Some(first) = urls.first() {
            in_flight.set_unavailable(Some(format!(
                "waiting for the agent's first health check to pass at {first}"
            )));
        }
        Self {
            urls,
            interval,
            client,
            in_flight,
            heartbeat,
            recheck,
        }
    }

    /// Checks every interval (or at once when a step call asks) until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        if self.urls.is_empty() {
            return;
        }
        tracing::info!(urls = ?self.urls, "waiting for the agent services to pass a health check");
        let mut failures = vec![0u32; self.urls.len()];
        loop {
            let checks = join_all(self.urls.iter().map(|url| self.check(url)));
            let results = tokio::select! {
                () = stop.cancelled() => return,
                results = checks => results,
            };
            self.judge(&results, &mut failures);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.interval) => {}
                () = async {
                    self.recheck.notified().await;
                    tokio::time::sleep(RECHECK_GAP).await;
                } => {}
            }
        }
    }

    /// Updates the worker's availability from one round of checks (`Err`: why a URL is
    /// down) and each URL's failures in a row.
    fn judge(&self, results: &[Result<(), String>], failures: &mut [u32]) {
        let mut down: Option<String> = None;
        for ((url, result), failed) in self.urls.iter().zip(results).zip(failures.iter_mut()) {
            match result {
                Ok(()) => *failed = 0,
                Err(why) => {
                    *failed += 1;
                    let unavailable_now = self.in_flight.unavailable().is_some();
                    if down.is_none() && (unavailable_now || *failed >= FAILURES_TO_DOWN) {
                        down = Some(format!("the agent's health check at {url} failed: {why}"));
                    }
                }
            }
        }
        let all_up = results.iter().all(Result::is_ok);
        if all_up {
            if self.in_flight.set_unavailable(None) {
                tracing::info!("the agent services pass their health checks; taking new work");
                self.heartbeat.notify_one();
            }
        } else if let Some(reason) = down
            && self.in_flight.set_unavailable(Some(reason.clone()))
        {
            tracing::warn!(
                reason = %reason,
                "agent unavailable: taking no new work until its health check passes"
            );
            self.heartbeat.notify_one();
        }
    }

    /// One `GET`: `Ok` for a `2xx`, else what went wrong.
    async fn check(&self, url: &str) -> Result<(), String> {
        let timeout = self.interval.min(CHECK_TIMEOUT);
        let outcome = match self.client.get(url).timeout(timeout).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("answered {}", response.status().as_u16())),
            Err(e) if e.is_timeout() => Err(format!("no answer within {} ms", timeout.as_millis())),
            Err(e) => Err(describe(&e)),
        };
        let label = if outcome.is_ok() { "ok" } else { "failed" };
        ::metrics::counter!(metrics::AGENT_HEALTH_CHECKS, "outcome" => label).increment(1);
        if let Err(why) = &outcome {
            tracing::debug!(url, error = %why, "agent health check failed");
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn health(urls: &[&str]) -> AgentHealth {
        AgentHealth::new(
            urls.iter().map(|u| u.to_string()).collect(),
            Duration::from_millis(50),
            reqwest::Client::new(),
            InFlight::new(1, "w"),
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
        )
    }

    #[test]
    fn unavailable_until_all_pass_then_only_after_two_failures_in_a_row() {
        let health = health(&["http://a/health", "http://b/health"]);
        let unavailable = || health.in_flight.unavailable();
        assert!(
            unavailable().unwrap().contains("http://a/health"),
            "from the start"
        );
        let mut failures = vec![0, 0];
        let down = || Err("answered 503".to_string());

        health.judge(&[Ok(()), down()], &mut failures);
        assert_eq!(
            unavailable().as_deref(),
            Some("the agent's health check at http://b/health failed: answered 503"),
            "not every URL has passed yet; the reason names the failing one"
        );
        health.judge(&[Ok(()), Ok(())], &mut failures);
        assert_eq!(unavailable(), None, "every URL passed");

        health.judge(&[down(), Ok(())], &mut failures);
        assert_eq!(unavailable(), None, "one failure may be a blip");
        health.judge(&[Ok(()), Ok(())], &mut failures);
        health.judge(&[down(), Ok(())], &mut failures);
        assert_eq!(unavailable(), None, "a success in between resets the count");
        health.judge(&[down(), Ok(())], &mut failures);
        assert!(
            unavailable().unwrap().contains("http://a/health"),
            "two in a row"
        );
        health.judge(&[Ok(()), Ok(())], &mut failures);
        assert_eq!(unavailable(), None, "one round of successes brings it back");
    }

    #[test]
    fn a_worker_without_http_agents_is_never_unavailable() {
        let health = health(&[]);
        assert_eq!(health.in_flight.unavailable(), None);
    }
}

//! Result delivery: `POST {MASTER_URL}/result`, retried with exponential backoff and jitter
//! (honouring `Retry-After`) while the master is unreachable or busy, until it answers
//! `2xx`, refuses the report for good, or `RESULT_DELIVERY_TIMEOUT_MS` passes.
//!
//! Every attempt also tells the [`MasterLink`] whether the master could be reached. A
//! worker whose results cannot reach it (connection error, timeout, `5xx`) is *degraded*:
//! it publishes the reason in its registry record at once, so dispatchers pass it by,
//! answers `/work` with `503 degraded` and `/ready` with `503`, and probes
//! `{MASTER_URL}/health` every [`PROBE_EVERY`] until the master answers again. Without
//! this, a worker with a wrong `MASTER_URL` (or cut off by a security group) would keep
//! heartbeating free slots and swallow every step it was sent until its lease lapsed.

use std::sync::Arc;
use std::time::Duration;

use common::config::Secret;
use common::wire::{AckStatus, ResultAck, ResultReport};
use reqwest::StatusCode;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::inflight::InFlight;
use crate::metrics;

/// The first retry waits about this long; each later one twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a degraded worker asks the master whether it is back, so that it recovers
/// even when it holds no result to deliver.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The longest one probe may take: `/health` answers at once when the master is there.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether results reach the master, as the latest delivery attempt or probe found.
#[derive(Clone, Debug)]
pub struct MasterLink {
    /// Holds the degraded flag, beside `draining`, so that `/work` admission checks it
    /// under the same lock as capacity.
    in_flight: Arc<InFlight>,
    /// Wakes the heartbeat, so the registry hears of a change now rather than one interval
    /// later (every step dispatched to us meanwhile would be lost to its lease).
    heartbeat: Arc<Notify>,
}

impl MasterLink {
    /// A link whose state lives in `in_flight` and whose changes wake `heartbeat`.
    pub fn new(in_flight: Arc<InFlight>, heartbeat: Arc<Notify>) -> Self {
        Self {
            in_flight,
            heartbeat,
        }
    }

    /// The master answered (any `2xx` or `4xx`): not degraded, or no longer.
    pub fn reached(&self) {
        if self.in_flight.set_degraded(None) {
            tracing::info!("the master answers again; taking new work");
            self.heartbeat.notify_one();
        }
    }

    /// The master could not be reached: degraded, for `reason`.
    pub fn unreachable(&self, reason: String) {
        if self.in_flight.set_degraded(Some(reason.clone())) {
            tracing::warn!(
                reason = %reason,
                "degraded: taking no new work until the master answers again"
            );
            self.heartbeat.notify_one();
        }
    }

    /// Why the worker is degraded, if it is.
    pub fn degraded(&self) -> Option<String> {
        self.in_flight.degraded()
    }
}

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The master answered `2xx` (recorded, or discarded as stale: either way, done).
    Acknowledged(Option<AckStatus>),
    /// The master refused the report for good (`4xx` other than `408`/`429`).
    Rejected(StatusCode),
    /// `RESULT_DELIVERY_TIMEOUT_MS` passed without an acknowledgement.
    GaveUp,
    /// The worker stopped trying (the drain's grace period ran out).
    Aborted,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Acknowledged(Some(AckStatus::Recorded)) | Self::Acknowledged(None) => "recorded",
            Self::Acknowledged(Some(AckStatus::Discarded)) => "discarded",
            Self::Rejected(_) => "rejected",
            Self::GaveUp => "gave_up",
            Self::Aborted => "aborted",
        }
    }
}

/// Posts results to the master.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Pooled connections to the master's load balancer.
    client: reqwest::Client,
    /// `{MASTER_URL}/result`.
    url: String,
    /// `{MASTER_URL}/health`, probed while degraded.
    health_url: String,
    /// Told how every attempt went.
    link: MasterLink,
    /// The worker token, sent as a bearer token (none when empty).
    token: Secret,
    /// How long to keep trying one result.
    timeout: Duration,
}

/// What one attempt ended with.
enum Attempt {
    Done(Outcome),
    Retry {
        why: String,
        retry_after: Option<Duration>,
        /// Whether the master answered (`408`, `429`): busy, not unreachable.
        reached: bool,
    },
}

impl Delivery {
    /// Delivery to `{master_url}/result`, reporting reachability to `link`.
    pub fn new(master_url: &str, token: Secret, timeout: Duration, link: MasterLink) -> Self {
        let base = master_url.trim_end_matches('/');
        Self {
            client: common::http::client(ATTEMPT_TIMEOUT),
            url: format!("{base}/result"),
            health_url: format!("{base}/health"),
            link,
            token,
            timeout,
        }
    }

    /// While the worker is degraded, asks `{MASTER_URL}/health` every [`PROBE_EVERY`]
    /// whether the master is back; a `2xx` clears the flag. Runs until `stop` fires.
    pub async fn probe_while_degraded(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(PROBE_EVERY) => {}
            }
            if self.link.degraded().is_none() {
                continue;
            }
            let probe = self
                .client
                .get(&self.health_url)
                .timeout(PROBE_TIMEOUT)
                .send();
            let answer = tokio::select! {
                () = stop.cancelled() => return,
                answer = probe => answer,
            };
            match answer {
                Ok(response) if response.status().is_success() => {
                    ::metrics::counter!(metrics::MASTER_PROBES, "outcome" => "ok").increment(1);
                    self.link.reached();
                }
                Ok(response) => {
                    ::metrics::counter!(metrics::MASTER_PROBES, "outcome" => "failed").increment(1);
                    tracing::debug!(status = response.status().as_u16(), "master probe failed");
                }
                Err(e) => {
                    ::metrics::counter!(metrics::MASTER_PROBES, "outcome" => "failed").increment(1);
                    tracing::debug!(error = %describe(&e), "master probe failed");
                }
            }
        }
    }

    /// Delivers one report, retrying until it is settled or `abort` fires.
    pub async fn deliver(
        &self,
        report: &ResultReport,
        request_id: &str,
        abort: &CancellationToken,
    ) -> Outcome {
        let span = if common::traces::enabled() {
            tracing::info_span!(
                "result.deliver",
                task_id = %report.task_id,
                step = report.step,
                attempt = report.attempt,
                status = ?report.status,
            )
        } else {
            tracing::Span::none()
        };
        self.deliver_attempts(report, request_id, abort)
            .instrument(span)
            .await
    }

    /// [`Self::deliver`]'s retries, inside its span.
    async fn deliver_attempts(
        &self,
        report: &ResultReport,
        request_id: &str,
        abort: &CancellationToken,
    ) -> Outcome {
        let give_up_at = Instant::now() + self.timeout;
        let backoff = common::backoff::Backoff {
            base: FIRST_BACKOFF,
            max: MAX_BACKOFF,
        };
        let mut failures = 0u32;
        let outcome = loop {
            let remaining = give_up_at.saturating_duration_since(Instant::now());
            let attempt = tokio::select! {
                attempt = self.attempt(report, request_id, remaining) => attempt,
                () = abort.cancelled() => break Outcome::Aborted,
            };
            let (why, retry_after) = match attempt {
                Attempt::Done(outcome) => {
                    self.link.reached();
                    break outcome;
                }
                Attempt::Retry {
                    why,
                    retry_after,
                    reached,
                } => {
                    if reached {
                        self.link.reached();
                    } else {
                        self.link
                            .unreachable(format!("cannot deliver results to {}: {why}", self.url));
                    }
                    (why, retry_after)
                }
            };
            failures += 1;
            if failures == 1 {
                tracing::warn!(reason = %why, "could not deliver the result; retrying");
            } else {
                tracing::debug!(reason = %why, failures, "result delivery retry failed");
            }
            let remaining = give_up_at.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                tracing::error!(
                    reason = %why,
                    failures,
                    "giving up on delivering the result; the master will re-run the step when its lease lapses"
                );
                break Outcome::GaveUp;
            }
            let wait = retry_after
                .unwrap_or_else(|| backoff.delay(failures - 1))
                .min(remaining);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = abort.cancelled() => break Outcome::Aborted,
            }
            ::metrics::counter!(metrics::DELIVERY_RETRIES).increment(1);
        };
        ::metrics::counter!(metrics::DELIVERIES, "outcome" => outcome.label()).increment(1);
        outcome
    }

    async fn attempt(
        &self,
        report: &ResultReport,
        request_id: &str,
        remaining: Duration,
    ) -> Attempt {
        let mut request = self
            .client
            .post(&self.url)
            .timeout(remaining.clamp(Duration::from_secs(1), ATTEMPT_TIMEOUT))
            .header(&common::telemetry::REQUEST_ID, request_id)
            .json(report);
        request = common::traces::propagate(request);
        if !self.token.is_empty() {
            request = request.bearer_auth(self.token.expose());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                return Attempt::Retry {
                    why: describe(&e),
                    retry_after: None,
                    reached: false,
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            let ack = response.json::<ResultAck>().await.ok().map(|a| a.status);
            match ack {
                Some(AckStatus::Discarded) => tracing::info!(
                    "the master discarded the result: the attempt is no longer current"
                ),
                _ => tracing::debug!("result delivered"),
            }
            return Attempt::Done(Outcome::Acknowledged(ack));
        }
        if status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            let retry_after = common::backoff::retry_after(response.headers())
                .map(|wait| wait.min(MAX_BACKOFF * 6));
            return Attempt::Retry {
                why: format!("master answered {}", status.as_u16()),
                retry_after,
                reached: !status.is_server_error(),
            };
        }
        let body = response.text().await.unwrap_or_default();
        tracing::error!(
            status = status.as_u16(),
            body = %body.chars().take(300).collect::<String>(),
            "the master refused the result; not retrying"
        );
        Attempt::Done(Outcome::Rejected(status))
    }
}

/// What went wrong with a request, in words a person can act on: reqwest's own message is
/// "error sending request"; the cause at the bottom of the chain says "Connection refused".
pub(crate) fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out".into();
    }
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    match cause.to_string() {
        text if text.is_empty() => error.to_string(),
        text => text,
    }
}

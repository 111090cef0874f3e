//! Result delivery: `POST {MASTER_URL}/result`, retried with exponential backoff and jitter
//! (honouring `Retry-After`) while the master is unreachable or busy, until it answers
//! `2xx`, refuses the report for good, or `RESULT_DELIVERY_TIMEOUT` passes.

use std::time::Duration;

use common::config::Secret;
use common::wire::{AckStatus, ResultAck, ResultReport};
use reqwest::StatusCode;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics;

/// The first retry waits about this long; each later one twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The master answered `2xx` (recorded, or discarded as stale: either way, done).
    Acknowledged(Option<AckStatus>),
    /// The master refused the report for good (`4xx` other than `408`/`429`).
    Rejected(StatusCode),
    /// `RESULT_DELIVERY_TIMEOUT` passed without an acknowledgement.
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
    },
}

impl Delivery {
    /// Delivery to `{master_url}/result`.
    pub fn new(master_url: &str, token: Secret, timeout: Duration) -> Self {
        Self {
            client: common::http::client(ATTEMPT_TIMEOUT),
            url: format!("{}/result", master_url.trim_end_matches('/')),
            token,
            timeout,
        }
    }

    /// Delivers one report, retrying until it is settled or `abort` fires.
    pub async fn deliver(
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
                Attempt::Done(outcome) => break outcome,
                Attempt::Retry { why, retry_after } => (why, retry_after),
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
        if !self.token.is_empty() {
            request = request.bearer_auth(self.token.expose());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                return Attempt::Retry {
                    why: e.without_url().to_string(),
                    retry_after: None,
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

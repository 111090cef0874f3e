//! Result delivery: `POST {MASTER_URL}/result`, retried with exponential backoff and jitter
//! (honouring `Retry-After`) while the master is unreachable or busy, until it answers
//! `2xx`, refuses the report for good, or `RESULT_DELIVERY_TIMEOUT_MS` passes.
//!
//! Reports that finish close together share a request: while [`BATCH_SENDERS`] requests
//! are in flight, new reports wait, and the next request carries all that waited (at most
//! 64, [`BATCH_BYTES`] in all) to `POST {MASTER_URL}/results`. Nothing waits on purpose: a
//! report that finds a sender free goes at once. The batch is only the first attempt: a
//! report the batch did not settle (the request failed, or the master asked to retry it)
//! goes on alone, through the retries above. A master that does not know `/results` (an
//! older one answers `404`) gets reports one by one for [`NO_BATCH_FOR`].
//!
//! Every attempt also tells the [`MasterLink`] whether the master could be reached. A
//! worker whose results cannot reach it (connection error, timeout, `5xx`) is *degraded*:
//! it publishes the reason in its registry record at once, so dispatchers pass it by,
//! answers `/work` with `503 degraded` and `/ready` with `503`, and probes
//! `{MASTER_URL}/health` every [`PROBE_EVERY`] until the master answers again. Without
//! this, a worker with a wrong `MASTER_URL` (or cut off by a security group) would keep
//! heartbeating free slots and swallow every step it was sent until its lease lapsed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::config::Secret;
use common::wire::{
    AckStatus, MAX_BATCH, ResultAck, ResultBatchAnswer, ResultItemAnswer, ResultReport,
};
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
/// Requests of reports in flight at once, the first attempts (retries are not counted).
pub const BATCH_SENDERS: usize = 2;
/// The most bytes of reports one `POST /results` carries; a larger report goes alone.
pub const BATCH_BYTES: usize = 256 * 1024;
/// How long reports go one by one after the master answered `404` to `POST /results`.
pub const NO_BATCH_FOR: Duration = Duration::from_secs(60);

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
    /// `{MASTER_URL}/results`, for reports that finish close together.
    batch_url: String,
    /// The reports waiting for a sender, and the senders.
    batch: Arc<Mutex<Batching>>,
}

/// What the first attempts of the reports share.
#[derive(Debug, Default)]
struct Batching {
    /// Reports waiting for a sender, oldest first.
    waiting: VecDeque<Waiting>,
    /// Senders running (at most [`BATCH_SENDERS`]).
    senders: usize,
    /// Until when reports go one by one (the master has no `/results`).
    off_until: Option<Instant>,
}

/// A report waiting for its first attempt.
#[derive(Debug)]
struct Waiting {
    /// The report, encoded.
    body: Vec<u8>,
    /// Its request id (the request's header carries the first report's).
    request_id: String,
    /// Told how its attempt went, or `None`: not tried (to be delivered alone).
    settled: tokio::sync::oneshot::Sender<Option<Attempt>>,
}

/// What one attempt ended with.
#[derive(Debug, Clone)]
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
            batch_url: format!("{base}/results"),
            batch: Arc::new(Mutex::new(Batching::default())),
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
        // The first attempt, shared with the reports that finish meanwhile; without traces
        // (a delivery's span and `traceparent` belong to one report).
        let mut first = None;
        if !common::traces::enabled() {
            first = tokio::select! {
                first = self.first_attempt(report, request_id) => first,
                () = abort.cancelled() => Some(Attempt::Done(Outcome::Aborted)),
            };
            if let Some(Attempt::Done(outcome)) = first {
                if outcome != Outcome::Aborted {
                    self.link.reached();
                }
                ::metrics::counter!(metrics::DELIVERIES, "outcome" => outcome.label()).increment(1);
                return outcome;
            }
        }
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
        self.deliver_attempts(report, request_id, abort, first)
            .instrument(span)
            .await
    }

    /// [`Self::deliver`]'s retries, inside its span.
    async fn deliver_attempts(
        &self,
        report: &ResultReport,
        request_id: &str,
        abort: &CancellationToken,
        mut first: Option<Attempt>,
    ) -> Outcome {
        let give_up_at = Instant::now() + self.timeout;
        let backoff = common::backoff::Backoff {
            base: FIRST_BACKOFF,
            max: MAX_BACKOFF,
        };
        let mut failures = 0u32;
        let outcome = loop {
            let remaining = give_up_at.saturating_duration_since(Instant::now());
            let attempt = match first.take() {
                // Made in a batch; its failure counts as the first.
                Some(attempt) => attempt,
                None => tokio::select! {
                    attempt = self.attempt(report, request_id, remaining) => attempt,
                    () = abort.cancelled() => break Outcome::Aborted,
                },
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

    /// The report's first attempt, in the next request of reports: how it went, or `None`
    /// when it was not tried (too large to share a request; a master without `/results`).
    async fn first_attempt(&self, report: &ResultReport, request_id: &str) -> Option<Attempt> {
        let body = serde_json::to_vec(report).ok()?;
        if body.len() > BATCH_BYTES {
            return None;
        }
        let (settled, outcome) = tokio::sync::oneshot::channel();
        let start = {
            let mut b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
            if b.off_until.is_some_and(|until| until > Instant::now()) {
                return None;
            }
            b.waiting.push_back(Waiting {
                body,
                request_id: request_id.to_string(),
                settled,
            });
            let start = b.senders < BATCH_SENDERS;
            if start {
                b.senders += 1;
            }
            start
        };
        if start {
            tokio::spawn(self.clone().send_waiting());
        }
        outcome.await.ok().flatten()
    }

    /// A sender: sends what waits, in requests of up to 64 reports, until nothing waits.
    async fn send_waiting(self) {
        loop {
            let batch = {
                let mut b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
                let mut bytes = 0;
                let mut batch = Vec::new();
                while let Some(next) = b.waiting.front() {
                    if batch.len() == MAX_BATCH
                        || (!batch.is_empty() && bytes + next.body.len() > BATCH_BYTES)
                    {
                        break;
                    }
                    bytes += next.body.len() + 1;
                    batch.extend(b.waiting.pop_front());
                }
                if batch.is_empty() {
                    b.senders -= 1;
                    return;
                }
                batch
            };
            let outcomes = if batch.len() == 1 {
                vec![self.send_one(&batch[0]).await]
            } else {
                self.send_many(&batch).await
            };
            for (waiting, outcome) in batch.into_iter().zip(outcomes) {
                let _ = waiting.settled.send(outcome);
            }
        }
    }

    /// `POST /result` of one waiting report.
    async fn send_one(&self, waiting: &Waiting) -> Option<Attempt> {
        let sent = self
            .post(&self.url, waiting.body.clone(), &waiting.request_id)
            .await;
        Some(match sent {
            Ok(response) => self.judge(response).await,
            Err(e) => unreachable(&e),
        })
    }

    /// `POST /results` of several waiting reports: how each one's attempt went.
    async fn send_many(&self, batch: &[Waiting]) -> Vec<Option<Attempt>> {
        let all = |attempt: Option<Attempt>| batch.iter().map(|_| attempt.clone()).collect();
        let mut body =
            Vec::with_capacity(batch.iter().map(|w| w.body.len() + 1).sum::<usize>() + 1);
        body.push(b'[');
        for (i, waiting) in batch.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&waiting.body);
        }
        body.push(b']');
        let response = match self.post(&self.batch_url, body, &batch[0].request_id).await {
            Ok(response) => response,
            Err(e) => return all(Some(unreachable(&e))),
        };
        let status = response.status();
        if matches!(
            status,
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
        ) {
            tracing::info!(
                status = status.as_u16(),
                "the master does not take batches of reports; sending them one by one"
            );
            let mut b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
            b.off_until = Some(Instant::now() + NO_BATCH_FOR);
            return all(None);
        }
        if status != StatusCode::OK {
            // The whole request failed (busy, down, or refused): each report as if it had
            // been answered so alone; a refusal for good is not, since the request as a whole
            // (its size, say) may be what was refused: those go again alone.
            return match self.judge(response).await {
                retry @ Attempt::Retry { .. } => all(Some(retry)),
                Attempt::Done(_) => all(None),
            };
        }
        match response.json::<ResultBatchAnswer>().await {
            Ok(answer) if answer.results.len() == batch.len() => answer
                .results
                .into_iter()
                .map(|a| Some(judged(a)))
                .collect(),
            _ => all(None),
        }
    }

    /// A `POST` of a JSON body to the master, with the token and request id.
    async fn post(
        &self,
        url: &str,
        body: Vec<u8>,
        request_id: &str,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut request = self
            .client
            .post(url)
            .header(&common::telemetry::REQUEST_ID, request_id)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if !self.token.is_empty() {
            request = request.bearer_auth(self.token.expose());
        }
        request.send().await
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
        match request.send().await {
            Ok(response) => self.judge(response).await,
            Err(e) => unreachable(&e),
        }
    }

    /// What the master's answer to a report means.
    async fn judge(&self, response: reqwest::Response) -> Attempt {
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

/// A failed request: the master was not reached.
fn unreachable(error: &reqwest::Error) -> Attempt {
    Attempt::Retry {
        why: describe(error),
        retry_after: None,
        reached: false,
    }
}

/// How a report's attempt went, from its answer in a batch: as [`Delivery::judge`] would
/// have judged that answer to the report alone.
fn judged(answer: ResultItemAnswer) -> Attempt {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if status.is_success() {
        return Attempt::Done(Outcome::Acknowledged(answer.ack));
    }
    if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || !status.is_client_error()
    {
        return Attempt::Retry {
            why: format!("master answered {} (in a batch)", status.as_u16()),
            retry_after: None,
            reached: !status.is_server_error(),
        };
    }
    tracing::error!(
        status = status.as_u16(),
        error = ?answer.error,
        "the master refused the result; not retrying"
    );
    Attempt::Done(Outcome::Rejected(status))
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

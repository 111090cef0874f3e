//! Partial output forwarded to the master while a step runs: `POST {MASTER_URL}/progress`
//! (a [`StepProgress`]), batched per step attempt, best effort.
//!
//! The runner puts an [`AttemptProgress`] in place around each attempt's agent
//! ([`crate::agent::with_progress`]), so whatever an agent hands to
//! [`crate::agent::current_progress`] (the `llm` agent's tokens, the `http` agent's stream
//! events before the last) goes to the master as it comes:
//!
//! - **Batching.** Messages wait until [`PROGRESS_FLUSH_MS`](crate::Config::progress_flush_ms)
//!   has passed since the oldest one not sent, or until they pass [`FLUSH_BYTES`] as JSON,
//!   then go in one POST. Consecutive messages that are exactly `{"delta": "<text>"}` are
//!   joined into one, so a fast model costs the master one write per batch, not per token.
//!   At most one POST per attempt is in flight; what comes meanwhile waits for the next.
//! - **Bounded.** At most [`MAX_PROGRESS_BYTES`] wait per attempt (what one POST may
//!   carry): while a slow master holds that much, *new* messages are dropped (and counted),
//!   so what waits still goes out in order. A single message larger than a POST may carry
//!   is dropped at once.
//! - **Never in the result's way.** Before the attempt's report, [`AttemptProgress::finish`]
//!   sends what waits and gives it at most [`FINAL_FLUSH_WAIT`]; so the last tokens arrive
//!   before the step's `step.succeeded` event when the master is well, and the report is
//!   late by at most that much when it is not.
//! - **Answers.** `200 recorded`: go on. `200 discarded` (the attempt is no longer current)
//!   and `429` (`progress_limit`: the task's progress budget is spent): send nothing more
//!   for the attempt. `413`, another `4xx`, a `5xx`, a timeout or a connection error: drop
//!   that batch, count it, go on. Progress never marks the worker degraded: only results do.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use common::config::Secret;
use common::wire::{
    AckStatus, MAX_PROGRESS_BYTES, ResultAck, StepProgress, TaskId, WorkRequest, WorkerId,
};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::agent::{CountPartials, Progress};
use crate::delivery::describe;
use crate::metrics;

/// Waiting messages are sent at once when they pass this many bytes of JSON, whatever
/// `PROGRESS_FLUSH_MS` says: a big batch is better sent than held.
pub const FLUSH_BYTES: usize = 16 * 1024;

/// The most an attempt's waiting messages may take as JSON: one POST's worth.
pub const PENDING_LIMIT: usize = MAX_PROGRESS_BYTES;

/// The longest the report of an attempt waits for its last progress to be sent.
pub const FINAL_FLUSH_WAIT: Duration = Duration::from_millis(500);

/// The longest one progress POST may take. While it waits, later messages gather (up to
/// [`PENDING_LIMIT`]) for the next one.
const POST_TIMEOUT: Duration = Duration::from_secs(5);

/// Forwards partial output to `{MASTER_URL}/progress`: one per worker, an
/// [`AttemptProgress`] from it per step attempt.
#[derive(Debug)]
pub struct ProgressForwarder {
    /// Pooled connections to the master's load balancer, apart from the results' so a slow
    /// progress POST never holds a connection a report needs.
    client: reqwest::Client,
    /// `{MASTER_URL}/progress`.
    url: String,
    /// The worker token, sent as a bearer token (none when empty).
    token: Secret,
    /// `PROGRESS_FLUSH_MS`: how long the oldest waiting message may wait.
    flush: Duration,
    /// This worker's id, on every POST: the master fences progress by it.
    worker_id: WorkerId,
}

impl ProgressForwarder {
    /// Forwarding to `{master_url}/progress`, batching for `flush`.
    pub fn new(master_url: &str, token: Secret, flush: Duration, worker_id: WorkerId) -> Self {
        Self {
            client: common::http::client(POST_TIMEOUT),
            url: format!("{}/progress", master_url.trim_end_matches('/')),
            token,
            flush,
            worker_id,
        }
    }

    /// The [`Progress`] of one step attempt. It starts nothing until the first message.
    pub fn attempt(self: &Arc<Self>, step: &WorkRequest, request_id: &str) -> AttemptProgress {
        AttemptProgress {
            inner: Arc::new(Inner {
                forwarder: self.clone(),
                task_id: step.task_id.clone(),
                step: step.step,
                attempt: step.attempt,
                request_id: request_id.to_string(),
                state: Mutex::new(State::default()),
                wake: Notify::new(),
            }),
        }
    }
}

/// One attempt's partial output on its way to the master.
pub struct AttemptProgress {
    /// Shared with the task that posts the batches.
    inner: Arc<Inner>,
}

struct Inner {
    forwarder: Arc<ProgressForwarder>,
    /// The attempt's identity, which every POST carries: taken from the `/work` request,
    /// not from the agent's calls, so an agent cannot post for a step it does not hold.
    task_id: TaskId,
    step: u32,
    attempt: u32,
    /// The step's `x-request-id`, so the master's log of a progress POST joins the step's.
    request_id: String,
    state: Mutex<State>,
    /// Wakes the posting task: the first message is waiting, a batch passed
    /// [`FLUSH_BYTES`], or the attempt is finishing.
    wake: Notify,
}

#[derive(Default)]
struct State {
    pending: Pending,
    /// The master said `discarded` or `429`: nothing more for this attempt.
    stopped: bool,
    /// The agent is done: send what waits, then end.
    closing: bool,
    /// A refused batch was logged at warn; later ones go to debug, so one attempt cannot
    /// flood the log.
    warned: bool,
    /// The posting task, started by the first message.
    task: Option<JoinHandle<()>>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here panics while holding the lock; a poisoned lock still holds good data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Posts batches until the master wants no more or the attempt is finished. Each turn
    /// waits for a message, a flush time or the end, so it lasts as long as the attempt.
    async fn run(self: Arc<Self>) {
        while let Some(batch) = self.next_batch().await {
            let posted = self.post(batch).await;
            ::metrics::counter!(metrics::PROGRESS_BATCHES, "outcome" => posted.label())
                .increment(1);
            if posted.stops() {
                let mut state = self.lock();
                state.stopped = true;
                state.pending.take();
                return;
            }
        }
    }

    /// The next batch, once it is due; `None` when there will be none.
    async fn next_batch(&self) -> Option<Vec<Value>> {
        loop {
            let due = {
                let mut state = self.lock();
                if state.stopped {
                    return None;
                }
                match state.pending.since {
                    None if state.closing => return None,
                    None => None,
                    Some(since) => {
                        let due = since + self.forwarder.flush;
                        if state.closing
                            || state.pending.bytes >= FLUSH_BYTES
                            || due <= Instant::now()
                        {
                            return Some(state.pending.take());
                        }
                        Some(due)
                    }
                }
            };
            match due {
                None => self.wake.notified().await,
                Some(due) => tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep_until(due) => {}
                },
            }
        }
    }

    async fn post(&self, messages: Vec<Value>) -> Posted {
        let forwarder = &self.forwarder;
        let body = StepProgress {
            task_id: self.task_id.clone(),
            step: self.step,
            attempt: self.attempt,
            worker_id: forwarder.worker_id.clone(),
            messages,
        };
        let mut request = forwarder
            .client
            .post(&forwarder.url)
            .header(&common::telemetry::REQUEST_ID, &self.request_id)
            .json(&body);
        if !forwarder.token.is_empty() {
            request = request.bearer_auth(forwarder.token.expose());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                tracing::debug!(error = %describe(&e), "could not post the step's progress; dropped that batch");
                return Posted::Failed;
            }
        };
        let status = response.status();
        if status.is_success() {
            return match response.json::<ResultAck>().await.map(|ack| ack.status) {
                Ok(AckStatus::Discarded) => {
                    tracing::info!(
                        "the master discarded the step's progress (the attempt is no longer \
                         current); sending no more for it"
                    );
                    Posted::Discarded
                }
                _ => Posted::Recorded,
            };
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            tracing::info!(
                "the master keeps no more progress for this task (429); sending no more for \
                 this attempt"
            );
            return Posted::Limited;
        }
        if status.is_server_error() {
            tracing::debug!(
                status = status.as_u16(),
                "the master could not take the step's progress; dropped that batch"
            );
            return Posted::Failed;
        }
        let text = response.text().await.unwrap_or_default();
        let body: String = text.chars().take(300).collect();
        if std::mem::replace(&mut self.lock().warned, true) {
            tracing::debug!(status = status.as_u16(), body = %body, "the master refused the step's progress; dropped that batch");
        } else {
            tracing::warn!(status = status.as_u16(), body = %body, "the master refused the step's progress; dropped that batch");
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Posted::TooLarge
        } else {
            Posted::Rejected
        }
    }
}

/// How one POST went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Posted {
    Recorded,
    Discarded,
    Limited,
    TooLarge,
    Rejected,
    Failed,
}

impl Posted {
    fn label(self) -> &'static str {
        match self {
            Self::Recorded => "recorded",
            Self::Discarded => "discarded",
            Self::Limited => "limited",
            Self::TooLarge => "too_large",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
        }
    }

    /// Whether the master wants nothing more for the attempt.
    fn stops(self) -> bool {
        matches!(self, Self::Discarded | Self::Limited)
    }
}

impl AttemptProgress {
    /// Call when the agent is done, before the attempt's report: sends what waits, giving
    /// it at most [`FINAL_FLUSH_WAIT`], then stops forwarding for good. Whatever is still
    /// unsent then is dropped (and counted).
    pub async fn finish(&self) {
        let task = {
            let mut state = self.inner.lock();
            state.closing = true;
            state.task.take()
        };
        let Some(mut task) = task else {
            return;
        };
        self.inner.wake.notify_one();
        if tokio::time::timeout(FINAL_FLUSH_WAIT, &mut task)
            .await
            .is_err()
        {
            task.abort();
            let unsent = self.inner.lock().pending.take().len();
            if unsent > 0 {
                ::metrics::counter!(metrics::PROGRESS_DROPPED, "reason" => "unsent")
                    .increment(unsent as u64);
            }
            tracing::debug!(
                unsent,
                "the step's last progress was not sent in time; reporting without it"
            );
        }
    }
}

impl Progress for AttemptProgress {
    fn partial(&self, step: &WorkRequest, message: &Value) {
        // Counted and logged as without forwarding.
        CountPartials.partial(step, message);
        let mut state = self.inner.lock();
        if state.stopped || state.closing {
            return;
        }
        let was_empty = state.pending.since.is_none();
        if let Err(reason) = state.pending.push(message, Instant::now()) {
            ::metrics::counter!(metrics::PROGRESS_DROPPED, "reason" => reason).increment(1);
            return;
        }
        if state.task.is_none() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => state.task = Some(runtime.spawn(self.inner.clone().run())),
                // Called outside a runtime (an agent's own thread): nowhere to post from.
                Err(_) => {
                    state.stopped = true;
                    state.pending.take();
                    return;
                }
            }
        }
        if was_empty || state.pending.bytes >= FLUSH_BYTES {
            self.inner.wake.notify_one();
        }
    }
}

impl Drop for AttemptProgress {
    /// An attempt abandoned before [`Self::finish`] (the drain's grace ran out) stops
    /// posting at once.
    fn drop(&mut self) {
        if let Some(task) = self.inner.lock().task.take() {
            task.abort();
        }
    }
}

/// Messages not sent yet, oldest first, with consecutive deltas joined.
#[derive(Debug, Default)]
struct Pending {
    messages: Vec<Value>,
    /// `messages` as compact JSON text (`[a,b]`), in bytes, kept exact so that a batch is
    /// known to fit in one POST.
    bytes: usize,
    /// When the oldest message came (`None` while there is none).
    since: Option<Instant>,
}

impl Pending {
    /// Adds `message`, joined to the last one when both are deltas; refuses it, with the
    /// reason for the metric, when it would pass [`PENDING_LIMIT`] (`backlog`) or could
    /// never be sent (`too_large`).
    fn push(&mut self, message: &Value, now: Instant) -> Result<(), &'static str> {
        if let Some(text) = delta(message)
            && let Some(last) = self.messages.last_mut()
            && let Some(joined) = delta_mut(last)
        {
            // JSON escapes character by character: the joined text's length is the sum.
            let added = json_len(text).saturating_sub(2);
            if self.bytes.saturating_add(added) > PENDING_LIMIT {
                return Err("backlog");
            }
            joined.push_str(text);
            self.bytes += added;
            return Ok(());
        }
        let size = json_len(message);
        // `[` and `]` around a batch of one.
        if size.saturating_add(2) > MAX_PROGRESS_BYTES {
            return Err("too_large");
        }
        // The brackets with the first message, a comma with each later one.
        let added = if self.messages.is_empty() {
            size + 2
        } else {
            size + 1
        };
        if self.bytes.saturating_add(added) > PENDING_LIMIT {
            return Err("backlog");
        }
        self.messages.push(message.clone());
        self.bytes += added;
        self.since.get_or_insert(now);
        Ok(())
    }

    /// Everything waiting, oldest first; empties it.
    fn take(&mut self) -> Vec<Value> {
        self.bytes = 0;
        self.since = None;
        std::mem::take(&mut self.messages)
    }
}

/// The text of a message that is exactly `{"delta": "<text>"}`.
fn delta(message: &Value) -> Option<&str> {
    match message {
        Value::Object(fields) if fields.len() == 1 => fields.get("delta")?.as_str(),
        _ => None,
    }
}

fn delta_mut(message: &mut Value) -> Option<&mut String> {
    match message {
        Value::Object(fields) if fields.len() == 1 => match fields.get_mut("delta")? {
            Value::String(text) => Some(text),
            _ => None,
        },
        _ => None,
    }
}

/// The length of `value` as compact JSON, without building the text.
fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        // Only a map with non-string keys fails, which a `Value` cannot hold.
        Err(_) => usize::MAX,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pushed(messages: &[Value]) -> Pending {
        let mut pending = Pending::default();
        for message in messages {
            pending.push(message, Instant::now()).unwrap();
        }
        pending
    }

    #[test]
    fn consecutive_deltas_are_joined_and_anything_else_breaks_the_run() {
        let pending = pushed(&[
            json!({"delta": "Hel"}),
            json!({"delta": "lo, "}),
            json!({"delta": "\"wörld\"\n"}),
            json!({"tool": "search"}),
            json!({"delta": "a"}),
            json!({"delta": "b", "extra": 1}),
            json!({"delta": 5}),
            json!({"delta": "c"}),
            json!("plain"),
        ]);
        assert_eq!(
            pending.messages,
            vec![
                json!({"delta": "Hello, \"wörld\"\n"}),
                json!({"tool": "search"}),
                json!({"delta": "a"}),
                json!({"delta": "b", "extra": 1}),
                json!({"delta": 5}),
                json!({"delta": "c"}),
                json!("plain"),
            ]
        );
    }

    #[test]
    fn the_byte_count_is_the_batch_as_json_whatever_the_escapes() {
        let mut pending = Pending::default();
        for message in [
            json!({"delta": "tab\there"}),
            json!({"delta": "\u{1}ctl and \\ backslash"}),
            json!({"delta": "émoji 🦀"}),
            json!([1, {"a": null}]),
            json!({"delta": "x"}),
        ] {
            pending.push(&message, Instant::now()).unwrap();
            let text = serde_json::to_string(&pending.messages).unwrap();
            assert_eq!(pending.bytes, text.len(), "{text}");
        }
        assert_eq!(pending.take().len(), 3);
        assert_eq!((pending.bytes, pending.since), (0, None));
    }

    #[test]
    fn past_the_limit_new_messages_are_dropped_and_what_waits_is_kept() {
        let mut pending = Pending::default();
        let chunk = "x".repeat(1000);
        let mut accepted = 0;
        for _ in 0..100 {
            match pending.push(&json!({"delta": chunk}), Instant::now()) {
                Ok(()) => accepted += 1,
                Err(reason) => assert_eq!(reason, "backlog"),
            }
        }
        assert_eq!(accepted, 65, "64 KiB of 1000-byte deltas");
        assert!(pending.bytes <= PENDING_LIMIT);
        assert_eq!(
            pending.push(&json!({"other": chunk}), Instant::now()),
            Err("backlog")
        );
        assert_eq!(pending.messages.len(), 1);
        assert_eq!(
            serde_json::to_string(&pending.messages).unwrap().len(),
            pending.bytes
        );

        // One message that no POST could carry is refused at once, even when none waits.
        let huge = json!({"blob": "y".repeat(MAX_PROGRESS_BYTES)});
        assert_eq!(
            Pending::default().push(&huge, Instant::now()),
            Err("too_large")
        );
    }

    fn step() -> WorkRequest {
        serde_json::from_value(json!({
            "task_id": "t1", "step": 0, "attempt": 1, "capability": "plan", "input": null,
            "context": {"task_input": null, "previous": [], "total_steps": 1},
            "deadline_ms": 1
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_master_that_never_answers_holds_the_report_back_at_most_the_final_wait() {
        // Accepts connections (the kernel does) and never reads them.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let forwarder = Arc::new(ProgressForwarder::new(
            &url,
            Secret::new("t"),
            Duration::from_millis(5),
            WorkerId::new("w1").unwrap(),
        ));
        let progress = forwarder.attempt(&step(), "req-1");
        progress.partial(&step(), &json!({"delta": "a"}));
        // The first batch goes out and hangs; the next ones wait behind it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        progress.partial(&step(), &json!({"delta": "b"}));
        let started = std::time::Instant::now();
        progress.finish().await;
        let waited = started.elapsed();
        assert!(
            waited >= FINAL_FLUSH_WAIT && waited < POST_TIMEOUT,
            "waited {waited:?}"
        );
        // Finished: later messages are not forwarded (no task is started again).
        progress.partial(&step(), &json!({"delta": "c"}));
        assert!(progress.inner.lock().task.is_none());
        assert!(progress.inner.lock().pending.messages.is_empty());
    }

    #[tokio::test]
    async fn an_attempt_without_partial_output_starts_nothing_and_finishes_at_once() {
        let forwarder = Arc::new(ProgressForwarder::new(
            "http://127.0.0.1:1",
            Secret::default(),
            Duration::from_millis(50),
            WorkerId::new("w1").unwrap(),
        ));
        let progress = forwarder.attempt(&step(), "req-1");
        let started = std::time::Instant::now();
        progress.finish().await;
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(progress.inner.lock().task.is_none());
    }
}

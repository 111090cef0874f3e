//! The `http` agent: POSTs each step to an agent service of the team's own, in any language
//! (a FastAPI app around AG2 or LangGraph, say), and turns its answer into the step's outcome.
//! The worker keeps doing everything else: registration, heartbeats, leases, fencing, drain
//! and result delivery.
//!
//! The request is one `POST {url}` per step attempt, with an [`AgentRequest`] as its JSON
//! body and the step's coordinates as `x-ensemble-*` headers (see [`HttpAgent::handle`]).
//! The answer:
//!
//! - `2xx` JSON (`application/json`, `*+json`): the body is the output. Other `text/*` (or
//!   no content type): the text, as a JSON string. An empty body or `204`: `null`.
//! - `2xx` `text/event-stream` or `application/x-ndjson`: a stream of messages; the last is
//!   the output and every one before it is partial output, handed to
//!   [`crate::agent::current_progress`]. An SSE event named `error` fails the step.
//! - `3xx`: permanent (redirects are not followed). `408`, `429`, `5xx`, and a connection
//!   that cannot be made, breaks or times out: retryable (`agent_unavailable`). Any other
//!   `4xx`: permanent (`agent_rejected`), with the service's own message.
//!
//! An answer is read a chunk at a time and refused (`agent_output_too_large`) as soon as it
//! passes `BODY_LIMIT_BYTES`, so a runaway agent cannot fill the worker's memory.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::wire::{Capability, StepContext, StepError, TaskId, WorkRequest, now_ms};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, LOCATION};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;

use crate::agent::{Agent, Progress, current_progress, current_request_id};
use crate::config::Config;
use crate::delivery::describe;

/// The body of the `POST` the `http` agent sends for one step attempt. Field names are the
/// contract with agent services (and the JSON schema published for them): add fields, never
/// rename one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentRequest {
    /// The task the step belongs to.
    pub task_id: TaskId,
    /// The step's index in the task, from 0.
    pub step: u32,
    /// The step's id in the pipeline, when the pipeline names its steps; else `null`.
    pub step_id: Option<String>,
    /// The attempt number, from 1. A retry of the same step comes with a higher number and
    /// the same `idempotency-key` header (`{task_id}/{step}`).
    pub attempt: u32,
    /// The capability asked for: the agent a service hosting several should run.
    pub capability: Capability,
    /// The step's input: the previous step's output, or the task's input for the first.
    pub input: Value,
    /// What else the step may look at: the task's input, the outputs it depends on, the
    /// pipeline's name, the number of steps; as the master sent it to the worker.
    pub context: StepContext,
    /// When the step must be finished, in ms since the Unix epoch. The worker stops waiting
    /// then and reports a retryable timeout, so work past it is wasted.
    pub deadline_ms: u64,
    /// The request id the master gave the step (also the `x-request-id` header), for
    /// correlating the service's logs with the runtime's; `null` when there is none.
    pub request_id: Option<String>,
}

impl AgentRequest {
    /// The request for `step`, with the request id it runs under.
    pub fn new(step: &WorkRequest, request_id: Option<String>) -> Self {
        Self {
            task_id: step.task_id.clone(),
            step: step.step,
            step_id: step.context.step_id.clone(),
            attempt: step.attempt,
            capability: step.capability.clone(),
            input: step.input.clone(),
            context: step.context.clone(),
            deadline_ms: step.deadline_ms,
            request_id,
        }
    }
}

/// What the agent service is told it may answer with.
const ACCEPTED: &str = "application/json, text/event-stream, application/x-ndjson";

/// The longest message taken from a service's error answer into a step's error: enough for
/// a validation error, short enough for a task's view.
const MESSAGE_LIMIT: usize = 2_000;

/// Without `AGENT_TIMEOUT_MS`, how far past the step's deadline reqwest's own timeout lies.
/// The runner drops the call at the deadline and reports `timeout`; reqwest's bound is for
/// a call made outside the runner, and closes the connection all the same.
const DEADLINE_SLACK: Duration = Duration::from_millis(250);

/// The client every `http` agent of a worker shares: pooled connections, a bounded connect
/// time, and no redirects (an agent URL that redirects is a wrong URL, and following it
/// would re-send a step's data to wherever the redirect points).
pub(crate) fn client() -> anyhow::Result<reqwest::Client> {
    common::install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .no_proxy()
        .user_agent(concat!("ensemble-worker/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| anyhow::anyhow!("could not build the http agent's HTTP client: {e}"))
}

/// POSTs steps to one agent service URL.
#[derive(Clone, Debug)]
pub struct HttpAgent {
    /// Shared by every `http` capability of the worker, so connections are pooled.
    client: reqwest::Client,
    /// Where steps go (`AGENT_URL` or `[agent_urls]`).
    url: String,
    /// `AGENT_TIMEOUT_MS`: a bound per call shorter than the step's deadline, when set.
    timeout: Option<Duration>,
    /// `BODY_LIMIT_BYTES`: the largest answer read; an output past it could not travel on to
    /// the next step anyway.
    body_limit: usize,
    /// Woken when the service refuses a connection, so the health task checks at once.
    recheck: Option<Arc<Notify>>,
}

impl HttpAgent {
    /// An agent POSTing to `url` with `client` (see the module's doc for the contract).
    pub fn new(
        client: reqwest::Client,
        url: impl Into<String>,
        timeout: Option<Duration>,
        body_limit: usize,
    ) -> Self {
        Self {
            client,
            url: url.into(),
            timeout,
            body_limit,
            recheck: None,
        }
    }

    /// The agent that serves `capability` in a worker's configuration.
    pub fn from_config(
        config: &Config,
        capability: &str,
        client: reqwest::Client,
    ) -> anyhow::Result<Self> {
        let (url, _) = config.agent_url_for(capability).ok_or_else(|| {
            anyhow::anyhow!("capability `{capability}` is served by the http agent but has no URL (set AGENT_URL)")
        })?;
        Ok(Self::new(
            client,
            url,
            config.agent_timeout(),
            config.body_limit_bytes,
        ))
    }

    /// `self`, waking `recheck` whenever the service refuses a connection.
    pub fn with_recheck(mut self, recheck: Arc<Notify>) -> Self {
        self.recheck = Some(recheck);
        self
    }

    /// A step error for a call that got no (complete) answer: retryable, since the service
    /// may be back for the next attempt.
    fn unreachable(&self, error: &reqwest::Error, timeout: Duration) -> StepError {
        if error.is_connect()
            && let Some(recheck) = &self.recheck
        {
            recheck.notify_one();
        }
        let what = if error.is_timeout() {
            format!("did not answer within {} ms", timeout.as_millis())
        } else if error.is_connect() {
            format!("could not be reached: {}", describe(error))
        } else {
            format!("broke off its answer: {}", describe(error))
        };
        StepError::retryable(
            "agent_unavailable",
            format!("the agent at {} {what}", self.url),
        )
    }
}

#[async_trait]
impl Agent for HttpAgent {
    /// POSTs the step with these headers besides `content-type: application/json`:
    /// `accept` (JSON, SSE, NDJSON), `x-request-id`, `x-ensemble-task-id`,
    /// `x-ensemble-step`, `x-ensemble-step-id` (when the step has an id),
    /// `x-ensemble-attempt`, `x-ensemble-capability`, `x-ensemble-deadline-ms` (ms since the
    /// epoch), `x-ensemble-timeout-ms` (ms left when sent), `idempotency-key`
    /// (`{task_id}/{step}`, the same for every attempt of the step), and `traceparent`
    /// when traces are exported (the agent's call joins the task's trace).
    async fn handle(&self, step: &WorkRequest) -> Result<Value, StepError> {
        let request_id = current_request_id().filter(|id| !id.is_empty());
        let left = Duration::from_millis(step.deadline_ms.saturating_sub(now_ms()));
        let timeout = match self.timeout {
            Some(bound) if bound < left => bound,
            _ => left + DEADLINE_SLACK,
        };
        let mut request = self
            .client
            .post(&self.url)
            .timeout(timeout)
            .header(ACCEPT, ACCEPTED)
            .header("x-ensemble-task-id", step.task_id.as_str())
            .header("x-ensemble-step", step.step)
            .header("x-ensemble-attempt", step.attempt)
            .header("x-ensemble-capability", step.capability.as_str())
            .header("x-ensemble-deadline-ms", step.deadline_ms)
            .header(
                "x-ensemble-timeout-ms",
                u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
            )
            .header("idempotency-key", format!("{}/{}", step.task_id, step.step));
        // A step id or request id that cannot be a header value is left out of the headers
        // (it is in the body all the same) rather than failing the step.
        if let Some(id) = step
            .context
            .step_id
            .as_deref()
            .and_then(|id| HeaderValue::from_str(id).ok())
        {
            request = request.header("x-ensemble-step-id", id);
        }
        if let Some(id) = request_id
            .as_deref()
            .and_then(|id| HeaderValue::from_str(id).ok())
        {
            request = request.header(&common::telemetry::REQUEST_ID, id);
        }
        let request = common::traces::propagate(request.json(&AgentRequest::new(step, request_id)));
        let response = request
            .send()
            .await
            .map_err(|e| self.unreachable(&e, timeout))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(redirected(status, &response));
        }
        if !status.is_success() {
            let body = Body::read(response, self.body_limit.min(64 * 1024), Overflow::Truncate)
                .await
                .map(|body| body.0)
                .unwrap_or_default();
            return Err(refused(status, &body));
        }
        if status == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let kind = AnswerKind::of(
            response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
        );
        if let Some(length) = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            && length > self.body_limit as u64
        {
            return Err(too_large(self.body_limit));
        }
        let read = Reading {
            agent: self,
            timeout,
        };
        match kind {
            AnswerKind::Json | AnswerKind::Text => {
                let body = read.body(response).await?;
                whole_answer(kind, &body)
            }
            AnswerKind::EventStream => {
                let mut messages = Messages::new(step, current_progress());
                read.lines(response, &mut EventStream::default(), &mut messages)
                    .await?;
                messages.finish()
            }
            AnswerKind::Ndjson => {
                let mut messages = Messages::new(step, current_progress());
                read.lines(response, &mut Ndjson, &mut messages).await?;
                messages.finish()
            }
            AnswerKind::Other(content_type) => Err(StepError::permanent(
                "agent_bad_output",
                format!(
                    "the agent answered with content type `{content_type}`; the http agent \
                     takes JSON, text, text/event-stream or application/x-ndjson"
                ),
            )),
        }
    }
}

/// How a `2xx` answer is read, from its content type.
#[derive(Debug, PartialEq)]
enum AnswerKind {
    /// `application/json` or `*+json`: the body is the output.
    Json,
    /// `text/*`, or no content type: the text is the output, as a string.
    Text,
    /// `text/event-stream`: server-sent events.
    EventStream,
    /// `application/x-ndjson` (or `application/ndjson`): one JSON value a line.
    Ndjson,
    /// Anything else (named in the error).
    Other(String),
}

impl AnswerKind {
    fn of(content_type: Option<&str>) -> Self {
        let media = content_type
            .and_then(|ct| ct.split(';').next())
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "application/json" => Self::Json,
            "text/event-stream" => Self::EventStream,
            "application/x-ndjson" | "application/ndjson" => Self::Ndjson,
            "" => Self::Text,
            m if m.ends_with("+json") => Self::Json,
            m if m.starts_with("text/") => Self::Text,
            _ => Self::Other(media),
        }
    }
}

/// The output of a whole (not streamed) answer: `null` when empty, else the JSON value or
/// the text.
fn whole_answer(kind: AnswerKind, body: &[u8]) -> Result<Value, StepError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    if kind == AnswerKind::Json {
        return serde_json::from_slice(body).map_err(|e| {
            StepError::permanent(
                "agent_bad_output",
                format!("the agent answered JSON that does not parse: {e}"),
            )
        });
    }
    String::from_utf8(body.to_vec())
        .map(Value::String)
        .map_err(|_| {
            StepError::permanent(
                "agent_bad_output",
                "the agent answered text that is not UTF-8",
            )
        })
}

/// The error for a `3xx`.
fn redirected(status: StatusCode, response: &reqwest::Response) -> StepError {
    let to = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(|location| format!(" to `{location}`"))
        .unwrap_or_default();
    StepError::permanent(
        "agent_rejected",
        format!(
            "agent answered {} (a redirect{to}); redirects are not followed: set the agent URL \
             to where the agent answers",
            status.as_u16()
        ),
    )
}

/// The error for a `4xx` or `5xx`: retryable for `408`, `429` and `5xx`, else permanent;
/// the message is the service's own.
fn refused(status: StatusCode, body: &[u8]) -> StepError {
    let detail = error_detail(body);
    let message = if detail.is_empty() {
        format!("agent answered {}", status.as_u16())
    } else {
        format!("agent answered {}: {detail}", status.as_u16())
    };
    if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        StepError::retryable("agent_unavailable", message)
    } else {
        StepError::permanent("agent_rejected", message)
    }
}

/// The message in an error answer, in the shapes services use: FastAPI's
/// `{"detail": str|any}`, OpenAI's `{"error": {"message"}}`, `{"error": str}`,
/// `{"message"}`; else the text. Cut to [`MESSAGE_LIMIT`] characters.
fn error_detail(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let found = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| message_in(&v));
    cut(found.as_deref().unwrap_or(text))
}

fn message_in(value: &Value) -> Option<String> {
    if let Some(detail) = value.get("detail") {
        return Some(match detail {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
    }
    match value.get("error") {
        Some(Value::String(s)) => return Some(s.clone()),
        Some(error) => {
            if let Some(Value::String(s)) = error.get("message") {
                return Some(s.clone());
            }
        }
        None => {}
    }
    match value.get("message") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    }
}

/// `text`, cut to [`MESSAGE_LIMIT`] characters.
fn cut(text: &str) -> String {
    match text.char_indices().nth(MESSAGE_LIMIT) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

fn too_large(limit: usize) -> StepError {
    StepError::permanent(
        "agent_output_too_large",
        format!(
            "the agent's answer is larger than BODY_LIMIT_BYTES ({limit} bytes); a step's \
             output must fit in the next step's request"
        ),
    )
}

/// What to do when a body passes the limit.
enum Overflow {
    /// Fail (an output).
    Refuse,
    /// Keep what fits (an error answer, read only for its message).
    Truncate,
}

/// A body read up to a limit.
struct Body(Vec<u8>);

/// Why a body could not be read whole.
enum BodyError {
    /// It passed the limit.
    TooLarge,
    /// The connection failed or timed out mid-way.
    Cut(reqwest::Error),
}

impl Body {
    async fn read(
        mut response: reqwest::Response,
        limit: usize,
        overflow: Overflow,
    ) -> Result<Self, BodyError> {
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(BodyError::Cut)? {
            if body.len() + chunk.len() > limit {
                match overflow {
                    Overflow::Refuse => return Err(BodyError::TooLarge),
                    Overflow::Truncate => {
                        body.extend_from_slice(&chunk[..limit - body.len()]);
                        break;
                    }
                }
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Self(body))
    }
}

/// Reads a `2xx` answer for an agent, turning read failures into step errors.
struct Reading<'a> {
    agent: &'a HttpAgent,
    /// The call's timeout, for the message when it passes.
    timeout: Duration,
}

impl Reading<'_> {
    fn error(&self, error: BodyError) -> StepError {
        match error {
            BodyError::TooLarge => too_large(self.agent.body_limit),
            BodyError::Cut(e) => self.agent.unreachable(&e, self.timeout),
        }
    }

    /// The whole body.
    async fn body(&self, response: reqwest::Response) -> Result<Vec<u8>, StepError> {
        Body::read(response, self.agent.body_limit, Overflow::Refuse)
            .await
            .map(|body| body.0)
            .map_err(|e| self.error(e))
    }

    /// Feeds the body's lines (without their `\n` or `\r\n`) to `format` as they arrive,
    /// then tells it the stream ended. A stream broken off mid-way is retryable.
    async fn lines(
        &self,
        mut response: reqwest::Response,
        format: &mut dyn LineFormat,
        messages: &mut Messages<'_>,
    ) -> Result<(), StepError> {
        let limit = self.agent.body_limit;
        let mut total = 0usize;
        let mut line: Vec<u8> = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.error(BodyError::Cut(e)))?
        {
            total += chunk.len();
            if total > limit {
                return Err(too_large(limit));
            }
            for piece in chunk.split_inclusive(|b| *b == b'\n') {
                line.extend_from_slice(piece);
                if line.ends_with(b"\n") {
                    format.line(text_line(&line)?, messages)?;
                    line.clear();
                }
            }
        }
        if !line.is_empty() {
            format.line(text_line(&line)?, messages)?;
        }
        format.end(messages)
    }
}

/// A line of a stream as text, without its line ending.
fn text_line(line: &[u8]) -> Result<&str, StepError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    std::str::from_utf8(line).map_err(|_| {
        StepError::permanent("agent_bad_output", "the agent's stream is not UTF-8 text")
    })
}

/// The messages of a streamed answer: each one, once the next arrives, is partial output;
/// the last is the step's output.
struct Messages<'a> {
    step: &'a WorkRequest,
    /// Told of every partial message.
    progress: Arc<dyn Progress>,
    /// The latest message, which is the output if no other follows.
    last: Option<Value>,
}

impl<'a> Messages<'a> {
    fn new(step: &'a WorkRequest, progress: Arc<dyn Progress>) -> Self {
        Self {
            step,
            progress,
            last: None,
        }
    }

    fn push(&mut self, message: Value) {
        if let Some(before) = self.last.replace(message) {
            self.progress.partial(self.step, &before);
        }
    }

    fn finish(self) -> Result<Value, StepError> {
        self.last.ok_or_else(|| {
            StepError::retryable(
                "agent_empty_stream",
                "the agent's stream ended without a message",
            )
        })
    }
}

/// A line-based stream format.
trait LineFormat: Send {
    /// One line, without its line ending.
    fn line(&mut self, line: &str, messages: &mut Messages<'_>) -> Result<(), StepError>;
    /// The stream ended cleanly.
    fn end(&mut self, messages: &mut Messages<'_>) -> Result<(), StepError>;
}

/// Server-sent events, as sse-starlette and the like write them: `event:` and `data:`
/// fields, a blank line ending each event, `:` comments (keep-alives) ignored.
#[derive(Default)]
struct EventStream {
    /// The `event:` field of the event being read.
    event: Option<String>,
    /// Its `data:` lines.
    data: Vec<String>,
}

impl EventStream {
    fn dispatch(&mut self, messages: &mut Messages<'_>) -> Result<(), StepError> {
        let event = self.event.take();
        if self.data.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.data).join("\n");
        if event.as_deref() == Some("error") {
            return Err(reported_error(&data));
        }
        if data.trim() == "[DONE]" {
            return Ok(());
        }
        messages.push(serde_json::from_str(&data).unwrap_or(Value::String(data)));
        Ok(())
    }
}

impl LineFormat for EventStream {
    fn line(&mut self, line: &str, messages: &mut Messages<'_>) -> Result<(), StepError> {
        if line.is_empty() {
            return self.dispatch(messages);
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => self.data.push(value.to_string()),
            // `id` and `retry` are for reconnecting, which a step's call does not do.
            _ => {}
        }
        Ok(())
    }

    fn end(&mut self, messages: &mut Messages<'_>) -> Result<(), StepError> {
        // An event the stream ended in without its blank line still counts: the stream
        // ended cleanly, so it is whole.
        self.dispatch(messages)
    }
}

/// The failure an SSE `error` event reports: `{"message", "retryable"}`, or plain text
/// (permanent).
fn reported_error(data: &str) -> StepError {
    #[derive(Deserialize)]
    struct Reported {
        message: Option<Value>,
        #[serde(default)]
        retryable: bool,
    }
    let (message, retryable) = match serde_json::from_str::<Reported>(data) {
        Ok(Reported {
            message: Some(Value::String(message)),
            retryable,
        }) => (message, retryable),
        Ok(Reported { retryable, .. }) => (data.to_string(), retryable),
        Err(_) => (data.to_string(), false),
    };
    StepError {
        message: format!("the agent reported an error: {}", cut(&message)),
        retryable,
        kind: Some("agent_error".into()),
    }
}

/// Newline-delimited JSON: a JSON value on each non-blank line.
struct Ndjson;

impl LineFormat for Ndjson {
    fn line(&mut self, line: &str, messages: &mut Messages<'_>) -> Result<(), StepError> {
        if line.trim().is_empty() {
            return Ok(());
        }
        let message = serde_json::from_str(line).map_err(|e| {
            StepError::permanent(
                "agent_bad_output",
                format!("a line of the agent's NDJSON stream does not parse: {e}"),
            )
        })?;
        messages.push(message);
        Ok(())
    }

    fn end(&mut self, _: &mut Messages<'_>) -> Result<(), StepError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Mutex;

    use serde_json::json;

    use super::*;

    #[test]
    fn content_types_choose_how_the_answer_is_read() {
        for (ct, kind) in [
            (Some("application/json"), AnswerKind::Json),
            (Some("Application/JSON; charset=utf-8"), AnswerKind::Json),
            (Some("application/problem+json"), AnswerKind::Json),
            (Some("text/plain; charset=utf-8"), AnswerKind::Text),
            (Some("text/markdown"), AnswerKind::Text),
            (None, AnswerKind::Text),
            (Some("text/event-stream"), AnswerKind::EventStream),
            (Some("application/x-ndjson"), AnswerKind::Ndjson),
            (
                Some("image/png"),
                AnswerKind::Other("image/png".to_string()),
            ),
        ] {
            assert_eq!(AnswerKind::of(ct), kind, "{ct:?}");
        }
    }

    #[test]
    fn error_answers_yield_the_services_own_message() {
        for (body, message) in [
            (r#"{"detail": "field required"}"#, "field required"),
            (
                r#"{"detail": [{"loc": ["body"], "msg": "x"}]}"#,
                r#"[{"loc":["body"],"msg":"x"}]"#,
            ),
            (r#"{"error": {"message": "bad model"}}"#, "bad model"),
            (r#"{"error": "nope"}"#, "nope"),
            (r#"{"message": "try later"}"#, "try later"),
            (r#"{"other": 1}"#, r#"{"other": 1}"#),
            ("  plain words\n", "plain words"),
        ] {
            assert_eq!(error_detail(body.as_bytes()), message, "{body}");
        }
        let long = "é".repeat(5_000);
        let detail = error_detail(long.as_bytes());
        assert_eq!(
            detail.chars().count(),
            MESSAGE_LIMIT + 1,
            "cut, with an ellipsis"
        );
        let e = refused(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"detail": "bad input"}"#,
        );
        assert_eq!(e.message, "agent answered 422: bad input");
        assert!(!e.retryable);
        assert_eq!(e.kind.as_deref(), Some("agent_rejected"));
        for status in [408, 429, 500, 503] {
            let e = refused(StatusCode::from_u16(status).unwrap(), b"");
            assert!(e.retryable, "{status}");
            assert_eq!(e.kind.as_deref(), Some("agent_unavailable"));
            assert_eq!(e.message, format!("agent answered {status}"));
        }
    }

    /// Records the partial messages it is given.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<Value>>);

    impl Progress for Recorded {
        fn partial(&self, _: &WorkRequest, message: &Value) {
            self.0.lock().unwrap().push(message.clone());
        }
    }

    fn step() -> WorkRequest {
        WorkRequest {
            task_id: TaskId::generate(),
            step: 0,
            attempt: 1,
            capability: Capability::new("c").unwrap(),
            input: Value::Null,
            context: StepContext::default(),
            deadline_ms: u64::MAX,
            worker_id: None,
            request_id: None,
        }
    }

    /// Feeds `lines` to a format; the outcome and the partial messages.
    fn feed(format: &mut dyn LineFormat, lines: &[&str]) -> (Result<Value, StepError>, Vec<Value>) {
        let step = step();
        let recorded = Arc::new(Recorded::default());
        let mut messages = Messages::new(&step, recorded.clone());
        let outcome = lines
            .iter()
            .try_for_each(|line| format.line(line, &mut messages))
            .and_then(|()| format.end(&mut messages))
            .and_then(|()| messages.finish());
        let partials = recorded.0.lock().unwrap().clone();
        (outcome, partials)
    }

    #[test]
    fn server_sent_events_end_with_the_last_message() {
        let (out, partials) = feed(
            &mut EventStream::default(),
            &[
                ": keep-alive",
                "data: {\"token\": \"a\"}",
                "",
                "event: message",
                "id: 2",
                "data:plain",
                "data: text",
                "",
                "data: {\"answer\": 42}",
                "",
                "data: [DONE]",
                "",
            ],
        );
        assert_eq!(out.unwrap(), json!({"answer": 42}));
        assert_eq!(partials, vec![json!({"token": "a"}), json!("plain\ntext")]);
        let (out, _) = feed(&mut EventStream::default(), &["data: 1", "data: 2"]);
        assert_eq!(
            out.unwrap(),
            json!("1\n2"),
            "an event the stream ends in counts"
        );
        let (out, _) = feed(
            &mut EventStream::default(),
            &[": nothing", "", "data: [DONE]", ""],
        );
        let e = out.unwrap_err();
        assert_eq!(e.kind.as_deref(), Some("agent_empty_stream"));
        assert!(e.retryable);
    }

    #[test]
    fn an_sse_error_event_fails_the_step_as_it_says() {
        let (out, _) = feed(
            &mut EventStream::default(),
            &[
                "data: 1",
                "",
                "event: error",
                r#"data: {"message": "rate limited", "retryable": true}"#,
                "",
            ],
        );
        let e = out.unwrap_err();
        assert_eq!(e.message, "the agent reported an error: rate limited");
        assert!(e.retryable);
        assert_eq!(e.kind.as_deref(), Some("agent_error"));
        let (out, _) = feed(
            &mut EventStream::default(),
            &["event: error", "data: it broke", ""],
        );
        let e = out.unwrap_err();
        assert_eq!(e.message, "the agent reported an error: it broke");
        assert!(!e.retryable, "plain text is permanent");
    }

    #[test]
    fn ndjson_lines_are_messages_and_a_bad_line_is_bad_output() {
        let (out, partials) = feed(&mut Ndjson, &["{\"a\": 1}", "", "  ", "\"done\""]);
        assert_eq!(out.unwrap(), json!("done"));
        assert_eq!(partials, vec![json!({"a": 1})]);
        let (out, _) = feed(&mut Ndjson, &["{\"a\": 1}", "not json"]);
        assert_eq!(out.unwrap_err().kind.as_deref(), Some("agent_bad_output"));
        let (out, _) = feed(&mut Ndjson, &[]);
        assert_eq!(out.unwrap_err().kind.as_deref(), Some("agent_empty_stream"));
    }

    #[test]
    fn whole_answers_are_json_text_or_null() {
        assert_eq!(
            whole_answer(AnswerKind::Json, br#"{"x": [1]}"#).unwrap(),
            json!({"x": [1]})
        );
        assert_eq!(whole_answer(AnswerKind::Json, b"").unwrap(), Value::Null);
        assert_eq!(
            whole_answer(AnswerKind::Text, "héllo".as_bytes()).unwrap(),
            json!("héllo")
        );
        let e = whole_answer(AnswerKind::Json, b"{oops").unwrap_err();
        assert_eq!(e.kind.as_deref(), Some("agent_bad_output"));
        assert!(!e.retryable);
    }
}

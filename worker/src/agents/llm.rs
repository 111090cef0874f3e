//! The `llm` agent: renders the capability's prompt template with the step and sends it to
//! the llm-gateway's OpenAI-compatible `POST /v1/chat/completions`, streamed
//! (`chat.completion.chunk` events ending in `data: [DONE]`): each piece of the answer goes
//! on as partial output, `{"delta": "<text>"}`, as it arrives (see `crate::progress`), and
//! the output is built from the whole answer once the stream is done.
//!
//! Errors: an answer other than `2xx` is sorted as [`handle_gateway_error`] says; an error
//! event in the stream (the gateway's upstream failed after the answer began) by its
//! OpenAI `type` and `code` alike; a stream that breaks off before `[DONE]` is retryable.
//!
//! Output: `{"text", "model", "usage"}`, except when the model's answer is a JSON object
//! (after trimming, and without a surrounding Markdown code fence such as a model may add,
//! `` ```json … ``` ``): then the output is that object, as it is, so that later steps can
//! name its fields (`map.over = "plan.queries"`). Any other answer, a JSON array or number
//! too, stays text.
//!
//! With the built-in `plan` template the agent asks for structured output
//! (`response_format` `json_schema`, [`prompt::default_schema`]): an object with the plan
//! as `text` and the research questions as `queries`, which the default pipeline fans out
//! over.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use common::config::Secret;
use common::sse::SseReader;
use common::wire::{StepError, WorkRequest};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::prompt;
use crate::agent::{Agent, Progress, current_progress, current_request_id};
use crate::config::Config;

/// What the `llm` agent needs to know.
#[derive(Clone, Debug)]
pub struct LlmSettings {
    /// The gateway's base URL (`LLM_GATEWAY_URL`).
    pub gateway_url: String,
    /// Its bearer token (`GATEWAY_TOKEN`); empty sends none.
    pub token: Secret,
    /// The model alias to ask for (`LLM_MODEL`).
    pub model: String,
    /// Sampling temperature, when set.
    pub temperature: Option<f64>,
    /// Completion length cap, when set.
    pub max_tokens: Option<u32>,
    /// Capability → template, over the built-in ones.
    pub prompts: BTreeMap<String, String>,
}

/// Calls the llm-gateway with a prompt rendered per capability.
#[derive(Clone, Debug)]
pub struct LlmAgent {
    /// Pooled connections to the gateway, shared by every step.
    client: reqwest::Client,
    /// `{gateway}/v1/chat/completions`, computed once.
    endpoint: String,
    settings: LlmSettings,
}

/// An upper bound per gateway call; the step's deadline normally ends it sooner.
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(600);

/// The largest one event of the gateway's stream may be: a chunk carries one piece of the
/// answer, so this is far above any real one.
const MAX_CHUNK_BYTES: usize = 1024 * 1024;

impl LlmAgent {
    /// An agent with these settings; fails if a configured template does not parse.
    pub fn new(settings: LlmSettings) -> anyhow::Result<Self> {
        for (capability, template) in &settings.prompts {
            prompt::check(template)
                .map_err(|e| anyhow::anyhow!("the prompt template for `{capability}`: {e}"))?;
        }
        Ok(Self {
            client: common::http::client(GATEWAY_TIMEOUT),
            endpoint: format!(
                "{}/v1/chat/completions",
                settings.gateway_url.trim_end_matches('/')
            ),
            settings,
        })
    }

    /// The agent a worker's configuration describes.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        Self::new(LlmSettings {
            gateway_url: config.llm_gateway_url.clone(),
            token: config.gateway_token.clone(),
            model: config.llm_model.clone(),
            temperature: config.llm_temperature,
            max_tokens: config.llm_max_tokens,
            prompts: config.prompts.clone(),
        })
    }

    /// The template for a capability: the configured one, else the built-in one.
    pub fn template(&self, capability: &str) -> &str {
        self.settings
            .prompts
            .get(capability)
            .map_or_else(|| prompt::default_template(capability), String::as_str)
    }

    /// The `response_format` for a capability: the built-in template's schema, when it has
    /// one and no template is configured in its place.
    fn response_format(&self, capability: &str) -> Option<Value> {
        if self.settings.prompts.contains_key(capability) {
            return None;
        }
        prompt::default_schema(capability).map(|(name, schema)| {
            json!({
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema}
            })
        })
    }
}

#[async_trait]
impl Agent for LlmAgent {
    async fn handle(&self, step: &WorkRequest) -> Result<Value, StepError> {
        let content = prompt::render(self.template(step.capability.as_str()), step)
            .map_err(|e| StepError::permanent("template", format!("bad prompt template: {e}")))?;
        let body = ChatRequest {
            model: &self.settings.model,
            messages: vec![Message {
                role: "user",
                content: &content,
            }],
            temperature: self.settings.temperature,
            max_tokens: self.settings.max_tokens,
            response_format: self.response_format(step.capability.as_str()),
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
        };
        let body = serde_json::to_vec(&body)
            .map_err(|e| StepError::permanent("template", format!("unencodable request: {e}")))?;
        let ledger_step = ledger_step(step);
        let mut request = self
            .client
            .post(&self.endpoint)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(common::usage::TASK_ID_HEADER, step.task_id.as_str())
            .header(common::usage::STEP_HEADER, step.step)
            .header(
                "idempotency-key",
                idempotency_key(step.task_id.as_str(), &ledger_step, &body),
            );
        if let Ok(value) = reqwest::header::HeaderValue::from_str(&ledger_step) {
            request = request.header(common::usage::STEP_ID_HEADER, value);
        }
        let mut request = request.body(body);
        if !self.settings.token.is_empty() {
            request = request.bearer_auth(self.settings.token.expose());
        }
        if let Some(id) = current_request_id() {
            request = request.header(&common::telemetry::REQUEST_ID, id);
        }
        let request = common::traces::propagate(request);
        let mut response = request.send().await.map_err(|e| {
            StepError::retryable(
                "upstream",
                format!("llm-gateway unreachable: {}", without_url(e)),
            )
        })?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(handle_gateway_error(status, &text));
        }
        let streamed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !streamed {
            return Err(unreadable("its answer is not an event stream"));
        }
        let mut answer = Answer::new(step, current_progress());
        let mut reader = SseReader::new(MAX_CHUNK_BYTES);
        // One turn per piece of body; the stream ends it (`[DONE]`, an error, or the
        // connection), and the step's deadline bounds it.
        loop {
            let bytes = match response.chunk().await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => return Err(broken_off("it ended before `data: [DONE]`")),
                Err(e) => return Err(broken_off(&without_url(e))),
            };
            let events = reader
                .push(&bytes)
                .map_err(|e| unreadable(&e.to_string()))?;
            for event in events {
                if answer.read(&event.data)? == Read::Done {
                    return Ok(answer.output());
                }
            }
        }
    }
}

/// A streamed answer as it arrives.
struct Answer<'a> {
    step: &'a WorkRequest,
    /// Told of each piece of text.
    progress: std::sync::Arc<dyn Progress>,
    text: String,
    /// The model alias, from the chunks.
    model: String,
    /// The last chunk's `usage`.
    usage: Option<Value>,
}

/// Whether the stream is done.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    More,
    Done,
}

impl<'a> Answer<'a> {
    fn new(step: &'a WorkRequest, progress: std::sync::Arc<dyn Progress>) -> Self {
        Self {
            step,
            progress,
            text: String::new(),
            model: String::new(),
            usage: None,
        }
    }

    /// Takes one event's data: a chunk, an error, or `[DONE]`.
    fn read(&mut self, data: &str) -> Result<Read, StepError> {
        if data.trim() == "[DONE]" {
            return Ok(Read::Done);
        }
        let value: Value = serde_json::from_str(data)
            .map_err(|e| unreadable(&format!("an event is not JSON: {e}")))?;
        if value.get("error").is_some() {
            return Err(match serde_json::from_value::<ErrorBody>(value) {
                Ok(body) => handle_stream_error(body.error),
                Err(e) => unreadable(&format!("an error event is malformed: {e}")),
            });
        }
        let chunk: Chunk = serde_json::from_value(value)
            .map_err(|e| unreadable(&format!("a chunk is malformed: {e}")))?;
        if self.model.is_empty()
            && let Some(model) = chunk.model
        {
            self.model = model;
        }
        if let Some(usage) = chunk.usage.filter(|u| !u.is_null()) {
            self.usage = Some(usage);
        }
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                self.progress.partial(self.step, &json!({ "delta": text }));
                self.text.push_str(&text);
            }
        }
        Ok(Read::More)
    }

    fn output(self) -> Value {
        output_of(self.text, self.model, self.usage)
    }
}

/// The gateway's stream could not be read: retryable, as an unreadable answer was.
fn unreadable(why: &str) -> StepError {
    StepError::retryable(
        "upstream",
        format!("llm-gateway sent an unreadable stream: {why}"),
    )
}

/// The stream stopped before the answer was whole: another attempt may get all of it.
fn broken_off(why: &str) -> StepError {
    StepError::retryable("upstream", format!("llm-gateway's stream broke off: {why}"))
}

/// A step's output from the model's answer: the answer itself when it is a JSON object
/// (see the module's doc), else `{"text", "model", "usage"}`.
fn output_of(text: String, model: String, usage: Option<Value>) -> Value {
    match json_object(&text) {
        Some(object) => object,
        None => json!({
            "text": text,
            "model": model,
            "usage": usage.unwrap_or(Value::Null),
        }),
    }
}

/// The answer as a JSON object, when it is one: trimmed, and out of a Markdown code fence
/// (`` ```json `` or `` ``` ``) that wraps all of it.
fn json_object(text: &str) -> Option<Value> {
    let trimmed = text.trim();
    let body = trimmed
        .strip_prefix("```")
        .and_then(|rest| rest.strip_suffix("```"))
        .map_or(trimmed, |inner| {
            // The fence's info string (`json`) runs to the end of its line.
            inner.split_once('\n').map_or(inner, |(_, code)| code)
        });
    match serde_json::from_str::<Value>(body.trim()) {
        Ok(value @ Value::Object(_)) => Some(value),
        _ => None,
    }
}

/// The step as the gateway's ledger names it: its id (a map instance's is
/// `<id>[<element>]`), else its index.
fn ledger_step(step: &WorkRequest) -> String {
    step.context
        .step_id
        .clone()
        .filter(|id| common::usage::valid_step(id))
        .unwrap_or_else(|| step.step.to_string())
}

/// The `Idempotency-Key` of the step's model call: the task, the step and a digest of the
/// request. Every attempt of the step sends the same request, so a step retried after a
/// worker died (or its report was lost) gets the recorded answer back from the gateway
/// instead of paying for the same completion again. A request that differs (the
/// worker's prompt template changed in between) is a new call, not a refusal.
fn idempotency_key(task_id: &str, step: &str, body: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body);
    let hex: String = digest.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("ensemble/{task_id}/{step}/{hex}")
}

/// Sorts a gateway error into retryable (429, 408, 5xx: the gateway already retried and
/// fell back, but a later attempt may find the provider healthy; 409: the same call is
/// still in progress elsewhere) or permanent (any other 4xx: the same request would fail
/// again, and `budget_exceeded`: the task's or the key's budget is spent).
fn handle_gateway_error(status: StatusCode, body: &str) -> StepError {
    let (detail, code) = match serde_json::from_str::<ErrorBody>(body) {
        Ok(e) => (e.error.message, e.error.code),
        Err(_) => (body.chars().take(300).collect(), None),
    };
    let message = format!("llm-gateway answered {}: {detail}", status.as_u16());
    if code.as_deref() == Some("budget_exceeded") {
        return StepError::permanent("budget_exceeded", message);
    }
    let retryable = status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::CONFLICT
        || status.is_server_error();
    if retryable {
        StepError::retryable("upstream", message)
    } else {
        StepError::permanent("upstream", message)
    }
}

/// Sorts an error event in the stream (the gateway's upstream failed after the answer had
/// begun, so it could no longer fall back) as [`handle_gateway_error`] sorts a status: the
/// event has no status, but its OpenAI `type` says which one it stands for.
fn handle_stream_error(error: ErrorDetail) -> StepError {
    let message = format!("llm-gateway's stream failed: {}", error.message);
    if error.code.as_deref() == Some("budget_exceeded") {
        return StepError::permanent("budget_exceeded", message);
    }
    match error.kind.as_deref() {
        // 400, 401, 403, 404: the same request would fail again.
        Some(
            "invalid_request_error"
            | "authentication_error"
            | "permission_error"
            | "not_found_error",
        ) => StepError::permanent("upstream", message),
        // `rate_limit_error` (429), `api_error` (5xx), anything else.
        _ => StepError::retryable("upstream", message),
    }
}

/// reqwest's errors include the URL; the gateway's URL is configuration, not a secret,
/// but it is noise in a step's error.
fn without_url(e: reqwest::Error) -> String {
    e.without_url().to_string()
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    stream: bool,
    stream_options: StreamOptions,
}

/// OpenAI sends `usage` on a stream's last chunk only when asked; the gateway always does.
#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

/// One `chat.completion.chunk`.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    /// On the last chunk.
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: ChunkDelta,
}

#[derive(Default, Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
}

/// OpenAI's error shape, which the gateway answers with.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    message: String,
    /// `invalid_request_error`, `rate_limit_error`, `api_error`, …
    #[serde(default, rename = "type")]
    kind: Option<String>,
    /// `budget_exceeded`, `idempotency_in_progress`, …
    #[serde(default)]
    code: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_statuses_sort_into_retryable_and_permanent() {
        for status in [429, 408, 409, 500, 502, 503, 504] {
            let e = handle_gateway_error(StatusCode::from_u16(status).unwrap_or_default(), "");
            assert!(e.retryable, "{status} should be retryable");
        }
        for status in [400, 401, 403, 404, 413, 422] {
            let e = handle_gateway_error(StatusCode::from_u16(status).unwrap_or_default(), "");
            assert!(!e.retryable, "{status} should be permanent");
        }
        let e = handle_gateway_error(
            StatusCode::BAD_REQUEST,
            r#"{"error":{"message":"unknown model `x`","type":"invalid_request_error"}}"#,
        );
        assert_eq!(e.message, "llm-gateway answered 400: unknown model `x`");
        assert_eq!(e.kind.as_deref(), Some("upstream"));
    }

    #[test]
    fn a_spent_budget_fails_the_step_for_good() {
        let e = handle_gateway_error(
            StatusCode::TOO_MANY_REQUESTS,
            r#"{"error":{"message":"the task's budget is spent","type":"insufficient_quota","code":"budget_exceeded"}}"#,
        );
        assert!(!e.retryable);
        assert_eq!(e.kind.as_deref(), Some("budget_exceeded"));
        assert!(e.message.contains("budget is spent"), "{}", e.message);
    }

    #[test]
    fn the_idempotency_key_is_the_same_for_every_attempt_of_one_request() {
        let a = idempotency_key("t1", "plan", b"{\"x\":1}");
        assert_eq!(a, idempotency_key("t1", "plan", b"{\"x\":1}"));
        assert!(a.starts_with("ensemble/t1/plan/"), "{a}");
        assert_ne!(a, idempotency_key("t1", "plan", b"{\"x\":2}"));
        assert_ne!(a, idempotency_key("t1", "search[1]", b"{\"x\":1}"));
        assert_ne!(a, idempotency_key("t2", "plan", b"{\"x\":1}"));
    }

    #[test]
    fn a_json_object_answer_is_the_output_and_anything_else_is_text() {
        let usage = || Some(json!({"total_tokens": 5}));
        let object = json!({"text": "1. look", "queries": ["a", "b"]});
        for answer in [
            object.to_string(),
            format!("  {object}\n"),
            format!("```json\n{object}\n```"),
            format!("```\n{object}\n```\n"),
        ] {
            assert_eq!(
                output_of(answer.clone(), "m".into(), usage()),
                object,
                "{answer}"
            );
        }
        for answer in [
            "plain words",
            "[1, 2]",
            "42",
            "{not json",
            "```json\n[1]\n```",
            "",
        ] {
            assert_eq!(
                output_of(answer.into(), "m".into(), usage()),
                json!({"text": answer, "model": "m", "usage": {"total_tokens": 5}}),
                "{answer}"
            );
        }
        assert_eq!(
            output_of("x".into(), "m".into(), None)["usage"],
            Value::Null
        );
    }

    fn agent(prompts: &[(&str, &str)]) -> LlmAgent {
        LlmAgent::new(LlmSettings {
            gateway_url: "http://127.0.0.1:1".into(),
            token: Secret::default(),
            model: "m".into(),
            temperature: None,
            max_tokens: None,
            prompts: prompts
                .iter()
                .map(|(c, t)| (c.to_string(), t.to_string()))
                .collect(),
        })
        .unwrap()
    }

    #[test]
    fn the_built_in_plan_template_asks_for_its_schema_and_a_configured_one_does_not() {
        let format = agent(&[]).response_format("plan").unwrap();
        assert_eq!(format["type"], "json_schema");
        assert_eq!(format["json_schema"]["name"], prompt::PLAN_SCHEMA);
        assert_eq!(
            format["json_schema"]["schema"]["required"],
            json!(["text", "queries"])
        );
        assert!(agent(&[]).response_format("retrieve").is_none());
        assert!(
            agent(&[("plan", "Plan: {{input}}")])
                .response_format("plan")
                .is_none()
        );
    }
}

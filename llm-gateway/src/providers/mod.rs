//! The providers behind the gateway and the neutral request, reply and stream types they
//! share. Each provider lives in its own file with its private wire types; the routing layer
//! only sees the [`Provider`] trait.

pub mod bedrock;
pub mod gemini;
pub mod mock;
pub mod schema;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::config::{Config, ProviderKind};
use crate::error::GatewayError;
use crate::openai::{
    ChatCompletionRequest, EmbeddingInput, EmbeddingsRequest, RequestMessage, ResponseFormat, Role,
    Tool as OpenAiTool, ToolChoice as OpenAiToolChoice, ToolChoiceMode, Usage,
};

/// Most stop sequences accepted (Gemini takes 5, Bedrock's models 4 or more).
const MAX_STOP_SEQUENCES: usize = 5;

/// Most inputs in one embeddings request (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// Most estimated tokens across one embeddings request's inputs (OpenAI's limit).
pub const MAX_EMBEDDING_TOKENS: u32 = 300_000;

/// The longest vector the gateway asks for (`dimensions`); Gemini's longest is 3072.
pub const MAX_EMBEDDING_DIMENSIONS: u32 = 8192;

/// An embeddings request in provider-neutral form: at least one input, none empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EmbeddingRequest {
    /// The texts, in order; the answer has one vector for each.
    pub inputs: Vec<String>,
    /// The vectors' length, when the caller chose one; a target that cannot honour it is
    /// skipped for the next.
    pub dimensions: Option<u32>,
}

/// A provider's vectors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Embeddings {
    /// One per input, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// Input tokens, as the provider counted them (or estimated where it reports none).
    pub prompt_tokens: u32,
}

impl EmbeddingRequest {
    /// Checks and converts an OpenAI request; errors name the field.
    pub fn from_openai(request: &EmbeddingsRequest) -> Result<Self, GatewayError> {
        if let Some((param, message)) = request.refused_field() {
            return Err(GatewayError::invalid(&param, message));
        }
        let inputs = match &request.input {
            EmbeddingInput::One(text) => vec![text.clone()],
            EmbeddingInput::Many(texts) => texts.clone(),
            EmbeddingInput::Tokens(_) => {
                return Err(GatewayError::invalid(
                    "input",
                    "`input` as token ids is not supported; send text (a string or a list of strings)",
                ));
            }
        };
        if inputs.is_empty() {
            return Err(GatewayError::invalid("input", "`input` must not be empty"));
        }
        if inputs.len() > MAX_EMBEDDING_INPUTS {
            return Err(GatewayError::invalid(
                "input",
                format!("`input` takes at most {MAX_EMBEDDING_INPUTS} texts"),
            ));
        }
        if let Some(i) = inputs.iter().position(|t| t.trim().is_empty()) {
            return Err(GatewayError::invalid(
                "input",
                format!("`input[{i}]` is empty; every text must have content"),
            ));
        }
        let tokens = inputs
            .iter()
            .map(|t| estimate_tokens(t))
            .fold(0u32, u32::saturating_add);
        if tokens > MAX_EMBEDDING_TOKENS {
            return Err(GatewayError::invalid(
                "input",
                format!(
                    "`input` holds about {tokens} tokens; at most {MAX_EMBEDDING_TOKENS} per request"
                ),
            ));
        }
        if let Some(d) = request.dimensions
            && !(1..=MAX_EMBEDDING_DIMENSIONS).contains(&d)
        {
            return Err(GatewayError::invalid(
                "dimensions",
                format!("`dimensions` must be between 1 and {MAX_EMBEDDING_DIMENSIONS}"),
            ));
        }
        Ok(Self {
            inputs,
            dimensions: request.dimensions,
        })
    }
}

/// Scales `vector` to unit length. A vector already of unit length (within rounding) is
/// left as the provider sent it, and a zero vector stays as it is.
pub fn normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 && (norm - 1.0).abs() > 1e-5 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
}

/// A chat request in provider-neutral form: system text apart, turns alternating, the
/// first turn the user's, no empty text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatRequest {
    /// Every system message, joined.
    pub system: Option<String>,
    /// The conversation; consecutive messages of one role are merged into one turn.
    pub turns: Vec<Turn>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Most tokens to generate.
    pub max_tokens: Option<u32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Whether the reply must be a JSON object.
    pub json: bool,
    /// With `json`: the schema the object must match (`response_format` `json_schema`).
    pub json_schema: Option<NamedSchema>,
    /// Functions the model may call.
    pub tools: Vec<ToolSpec>,
    /// Whether and which tool must be called.
    pub tool_choice: ToolChoice,
    /// At most one tool call per answer (`parallel_tool_calls: false`).
    pub single_tool_call: bool,
}

/// A schema with the name the caller gave it.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedSchema {
    /// The name (`response_format.json_schema.name`).
    pub name: String,
    /// What the output is for.
    pub description: Option<String>,
    /// The JSON schema (an object schema when the caller gave none).
    pub schema: serde_json::Value,
}

/// A function the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSpec {
    /// Its name.
    pub name: String,
    /// What it does.
    pub description: Option<String>,
    /// The JSON schema of its arguments; `None` when it takes none.
    pub parameters: Option<serde_json::Value>,
}

/// OpenAI's `tool_choice`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides (the default).
    #[default]
    Auto,
    /// No tool call.
    None,
    /// At least one tool call.
    Required,
    /// This function must be called.
    Named(String),
}

/// One turn of the conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    /// Who spoke.
    pub role: TurnRole,
    /// What was said, in order; never empty, never an empty text.
    pub parts: Vec<Part>,
}

/// A piece of a turn.
#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    /// Text (never empty).
    Text(String),
    /// The model called a tool (in an assistant turn).
    ToolCall(ToolCall),
    /// A tool's result (in a user turn).
    ToolResult(ToolResult),
}

/// A tool call, as the model made it and as the history carries it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    /// The id the result answers; providers without ids mint stable ones (and may carry
    /// their own state in it, as Gemini's thought signature).
    pub id: String,
    /// The function's name.
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// A tool's result, sent back to the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolResult {
    /// The call it answers.
    pub id: String,
    /// The function that was called (found by id in the history: Gemini needs it).
    pub name: String,
    /// What the tool returned.
    pub content: String,
}

/// The speakers providers know (system text travels apart; tool results are the user's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnRole {
    /// The caller.
    User,
    /// The model.
    Assistant,
}

/// The user turn put first when a history starts with the model's turn (AG2's two-agent
/// chat sends `[system, assistant, user]`) or has nothing but empty messages: Gemini and
/// Bedrock both require the conversation to open with a user turn.
pub const PLACEHOLDER_USER_TURN: &str = "(conversation start)";

/// The result given to a tool call the caller sent none for: Gemini and Converse refuse a
/// call left unanswered.
pub const MISSING_TOOL_RESULT: &str = "(no result was returned for this call)";

impl ChatRequest {
    /// Checks and converts an OpenAI request; errors name the field.
    pub fn from_openai(request: ChatCompletionRequest) -> Result<Self, GatewayError> {
        if let Some((param, message)) = request.refused_field() {
            return Err(GatewayError::invalid(&param, message));
        }
        if request.messages.is_empty() {
            return Err(GatewayError::invalid(
                "messages",
                "`messages` must not be empty",
            ));
        }
        if let Some(t) = request.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(GatewayError::invalid(
                "temperature",
                "`temperature` must be between 0 and 2",
            ));
        }
        if let Some(p) = request.top_p
            && !(0.0..=1.0).contains(&p)
        {
            return Err(GatewayError::invalid(
                "top_p",
                "`top_p` must be between 0 and 1",
            ));
        }
        if request.max_tokens == Some(0) {
            return Err(GatewayError::invalid(
                "max_tokens",
                "`max_tokens` must be at least 1",
            ));
        }
        let stop = request.stop.map(|s| s.into_vec()).unwrap_or_default();
        if stop.len() > MAX_STOP_SEQUENCES || stop.iter().any(String::is_empty) {
            return Err(GatewayError::invalid(
                "stop",
                format!("`stop` takes 1 to {MAX_STOP_SEQUENCES} non-empty sequences"),
            ));
        }
        let tools = tools_from_openai(request.tools.unwrap_or_default())?;
        let tool_choice = match request.tool_choice {
            None | Some(OpenAiToolChoice::Mode(ToolChoiceMode::Auto)) => ToolChoice::Auto,
            Some(OpenAiToolChoice::Mode(ToolChoiceMode::None)) => ToolChoice::None,
            Some(OpenAiToolChoice::Mode(ToolChoiceMode::Required)) => ToolChoice::Required,
            Some(OpenAiToolChoice::Named(named)) => ToolChoice::Named(named.function.name),
        };
        match &tool_choice {
            ToolChoice::Required if tools.is_empty() => {
                return Err(GatewayError::invalid(
                    "tool_choice",
                    "`tool_choice: required` needs `tools`",
                ));
            }
            ToolChoice::Named(name) if !tools.iter().any(|t| &t.name == name) => {
                return Err(GatewayError::invalid(
                    "tool_choice",
                    format!("`tool_choice` names `{name}`, which is not in `tools`"),
                ));
            }
            _ => {}
        }
        let (json, json_schema) = match request.response_format {
            None | Some(ResponseFormat::Text) => (false, None),
            Some(ResponseFormat::JsonObject) => (true, None),
            Some(ResponseFormat::JsonSchema { json_schema }) => {
                let schema = json_schema
                    .schema
                    .unwrap_or_else(|| serde_json::json!({"type": "object"}));
                if !schema.is_object() {
                    return Err(GatewayError::invalid(
                        "response_format.json_schema.schema",
                        "`response_format.json_schema.schema` must be a JSON schema object",
                    ));
                }
                let named = NamedSchema {
                    name: json_schema.name,
                    description: json_schema.description,
                    schema,
                };
                (true, Some(named))
            }
        };

        let (system, turns) = conversation(request.messages)?;
        Ok(Self {
            system,
            turns,
            temperature: request.temperature,
            max_tokens: request.max_tokens,
            top_p: request.top_p,
            stop,
            json,
            json_schema,
            tools,
            tool_choice,
            single_tool_call: request.parallel_tool_calls == Some(false),
        })
    }

    /// The text of the last user turn.
    pub fn last_user_text(&self) -> &str {
        self.turns
            .iter()
            .rev()
            .find(|t| t.role == TurnRole::User)
            .and_then(|t| {
                t.parts.iter().rev().find_map(|p| match p {
                    Part::Text(text) => Some(text.as_str()),
                    _ => None,
                })
            })
            .unwrap_or("")
    }

    /// The tool results the conversation ends with (the model is to use them now).
    pub fn trailing_tool_results(&self) -> Vec<&ToolResult> {
        match self.turns.last() {
            Some(turn) if turn.role == TurnRole::User => turn
                .parts
                .iter()
                .filter_map(|p| match p {
                    Part::ToolResult(result) => Some(result),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether any turn carries a tool call or result.
    pub fn history_has_tools(&self) -> bool {
        self.turns
            .iter()
            .flat_map(|t| &t.parts)
            .any(|p| !matches!(p, Part::Text(_)))
    }
}

/// Checks `tools`: functions with unique, well-formed names and object schemas.
fn tools_from_openai(tools: Vec<OpenAiTool>) -> Result<Vec<ToolSpec>, GatewayError> {
    let mut specs: Vec<ToolSpec> = Vec::with_capacity(tools.len());
    for (i, OpenAiTool::Function { function }) in tools.into_iter().enumerate() {
        let valid_name = !function.name.is_empty()
            && function.name.len() <= 64
            && function
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid_name {
            return Err(GatewayError::invalid(
                &format!("tools[{i}].function.name"),
                "a function name is 1 to 64 letters, digits, `_` or `-`",
            ));
        }
        if specs.iter().any(|s| s.name == function.name) {
            return Err(GatewayError::invalid(
                &format!("tools[{i}].function.name"),
                format!("the function `{}` is declared twice", function.name),
            ));
        }
        if let Some(parameters) = &function.parameters
            && !parameters.is_object()
        {
            return Err(GatewayError::invalid(
                &format!("tools[{i}].function.parameters"),
                "`parameters` must be a JSON schema object",
            ));
        }
        specs.push(ToolSpec {
            name: function.name,
            description: function.description.filter(|d| !d.is_empty()),
            parameters: function.parameters,
        });
    }
    Ok(specs)
}

/// Turns OpenAI messages into the system text and alternating turns every provider
/// accepts: tool messages become results (named by the call they answer), empty texts are
/// dropped, same-role turns merge, and a placeholder user turn opens a history that would
/// otherwise start with the model or be empty.
fn conversation(
    messages: Vec<RequestMessage>,
) -> Result<(Option<String>, Vec<Turn>), GatewayError> {
    let mut system: Option<String> = None;
    let mut turns: Vec<Turn> = Vec::with_capacity(messages.len());
    // Tool call id -> function name, from the assistant messages so far.
    let mut called: HashMap<String, String> = HashMap::new();
    let mut spoken = false;
    for (i, message) in messages.into_iter().enumerate() {
        let text = message.content.map(|c| c.into_text()).unwrap_or_default();
        let (role, mut parts) = match message.role {
            Role::System => {
                if !text.trim().is_empty() {
                    match &mut system {
                        Some(all) => {
                            all.push_str("\n\n");
                            all.push_str(&text);
                        }
                        None => system = Some(text),
                    }
                }
                continue;
            }
            Role::User => (TurnRole::User, vec![Part::Text(text)]),
            Role::Assistant => {
                let mut parts = vec![Part::Text(text)];
                for (j, call) in message
                    .tool_calls
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                {
                    if call.id.is_empty() {
                        return Err(GatewayError::invalid(
                            &format!("messages[{i}].tool_calls[{j}].id"),
                            "a tool call needs an `id`",
                        ));
                    }
                    called.insert(call.id.clone(), call.function.name.clone());
                    let arguments = match call.function.arguments.trim() {
                        "" => "{}".to_string(),
                        _ => call.function.arguments,
                    };
                    // Gemini and Bedrock take arguments as an object, not as text.
                    if !serde_json::from_str::<serde_json::Value>(&arguments)
                        .is_ok_and(|v| v.is_object())
                    {
                        return Err(GatewayError::invalid(
                            &format!("messages[{i}].tool_calls[{j}].function.arguments"),
                            "tool call arguments must be a JSON object (as text)",
                        ));
                    }
                    parts.push(Part::ToolCall(ToolCall {
                        id: call.id,
                        name: call.function.name,
                        arguments,
                    }));
                }
                (TurnRole::Assistant, parts)
            }
            Role::Tool => {
                let param = format!("messages[{i}].tool_call_id");
                let id = message.tool_call_id.ok_or_else(|| {
                    GatewayError::invalid(&param, "a `tool` message needs `tool_call_id`")
                })?;
                let name = called.get(&id).cloned().ok_or_else(|| {
                    GatewayError::invalid(
                        &param,
                        format!("`{id}` answers no tool call of an earlier assistant message"),
                    )
                })?;
                let result = ToolResult {
                    id,
                    name,
                    content: text,
                };
                (TurnRole::User, vec![Part::ToolResult(result)])
            }
        };
        spoken = true;
        parts.retain(|p| !matches!(p, Part::Text(t) if t.trim().is_empty()));
        if parts.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some(last) if last.role == role => last.parts.append(&mut parts),
            _ => turns.push(Turn { role, parts }),
        }
    }
    if !spoken {
        return Err(GatewayError::invalid(
            "messages",
            "`messages` needs at least one `user` message",
        ));
    }
    if turns.first().is_none_or(|t| t.role != TurnRole::User) {
        turns.insert(
            0,
            Turn {
                role: TurnRole::User,
                parts: vec![Part::Text(PLACEHOLDER_USER_TURN.into())],
            },
        );
    }
    answer_every_call(&mut turns);
    Ok((system, turns))
}

/// Makes each model turn's tool calls answered by the next turn, results first, as Converse
/// (and Claude behind it) requires: a call the caller sent no result for (a framework that
/// dropped it) gets [`MISSING_TOOL_RESULT`]; results move before any text of their turn.
fn answer_every_call(turns: &mut [Turn]) {
    let mut i = 0;
    while i < turns.len() {
        if turns[i].role == TurnRole::Assistant {
            let calls: Vec<(String, String)> = turns[i]
                .parts
                .iter()
                .filter_map(|p| match p {
                    Part::ToolCall(call) => Some((call.id.clone(), call.name.clone())),
                    _ => None,
                })
                .collect();
            // A history ending with the model's calls leaves them to the model.
            if !calls.is_empty() && i + 1 < turns.len() {
                let next = &mut turns[i + 1];
                let answered = |id: &str| {
                    next.parts
                        .iter()
                        .any(|p| matches!(p, Part::ToolResult(r) if r.id == id))
                };
                let missing: Vec<Part> = calls
                    .iter()
                    .filter(|(id, _)| !answered(id))
                    .map(|(id, name)| {
                        Part::ToolResult(ToolResult {
                            id: id.clone(),
                            name: name.clone(),
                            content: MISSING_TOOL_RESULT.into(),
                        })
                    })
                    .collect();
                next.parts.splice(0..0, missing);
            }
        }
        if turns[i].role == TurnRole::User {
            // Stable: results keep their order, texts theirs.
            turns[i]
                .parts
                .sort_by_key(|p| !matches!(p, Part::ToolResult(_)));
        }
        i += 1;
    }
}

/// A complete (non-streamed) reply.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The generated text.
    pub text: String,
    /// The tools the model called, in order.
    pub tool_calls: Vec<ToolCall>,
    /// Why generation stopped.
    pub finish: FinishReason,
    /// Token counts.
    pub usage: Usage,
}

/// Why generation stopped, in OpenAI's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model finished or hit a stop sequence.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// A safety filter stopped it.
    ContentFilter,
    /// The model called tools and waits for their results.
    ToolCalls,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn as_openai(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ContentFilter => "content_filter",
            Self::ToolCalls => "tool_calls",
        }
    }
}

/// One event of a streamed reply.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    /// New text.
    Delta(String),
    /// A tool call begins: its place among the answer's calls, id and name.
    ToolCallStart {
        /// 0 for the first call of the answer, 1 for the next, …
        index: u32,
        /// The call's id.
        id: String,
        /// The function's name.
        name: String,
    },
    /// The next fragment of a started call's arguments (JSON text).
    ToolCallArguments {
        /// Which call.
        index: u32,
        /// The fragment.
        fragment: String,
    },
    /// Why generation stopped (usually near the end).
    Finish(FinishReason),
    /// Token counts so far; the last one seen is the total.
    Usage(Usage),
}

/// A streamed reply: events until the stream ends or fails.
pub type EventStream = BoxStream<'static, Result<StreamEvent, ProviderError>>;

/// A model provider.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Which provider this is.
    fn kind(&self) -> ProviderKind;

    /// Generates a whole reply.
    async fn complete(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<Completion, ProviderError>;

    /// Starts a streamed reply; returns once the upstream has accepted the request.
    async fn stream(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<EventStream, ProviderError>;

    /// One vector per input, in order.
    async fn embed(
        &self,
        model: &str,
        request: &EmbeddingRequest,
    ) -> Result<Embeddings, ProviderError>;
}

/// How a provider call failed, which decides retry, fallback and the client's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// `429` / throttling: retry after the upstream's delay.
    RateLimited,
    /// `5xx`, model not ready, service unavailable: retry.
    Unavailable,
    /// The attempt took longer than `REQUEST_TIMEOUT_MS`: retry.
    Timeout,
    /// Could not connect or the connection broke: retry.
    Connection,
    /// The upstream rejected the request itself (`400`): the client's to fix.
    InvalidRequest,
    /// The gateway's credentials were refused (`401`/`403`): fall back, no retry.
    Auth,
    /// The upstream does not know the model (`404`): fall back, no retry.
    NotFound,
    /// The upstream answered something the gateway could not read: fall back.
    Protocol,
    /// The gateway's own cap on concurrent requests to this provider was full.
    Saturated,
    /// The request holds something this provider cannot express (a JSON-schema keyword
    /// Gemini lacks, tools with JSON output on Bedrock), found before sending: fall back;
    /// at the last target, a `400` naming the field.
    Unsupported,
    /// The model's output was unusable (Gemini's `MALFORMED_FUNCTION_CALL`, Bedrock's
    /// `malformed_tool_use`): a new attempt may succeed, so retry.
    MalformedOutput,
}

impl ErrorKind {
    /// A label for metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::InvalidRequest => "invalid_request",
            Self::Auth => "auth",
            Self::NotFound => "not_found",
            Self::Protocol => "protocol",
            Self::Saturated => "saturated",
            Self::Unsupported => "unsupported",
            Self::MalformedOutput => "malformed_output",
        }
    }

    /// The kind for an upstream HTTP status.
    pub fn from_status(status: u16) -> Self {
        match status {
            429 => Self::RateLimited,
            408 => Self::Timeout,
            401 | 403 => Self::Auth,
            404 => Self::NotFound,
            400..=499 => Self::InvalidRequest,
            _ => Self::Unavailable,
        }
    }
}

/// A failed provider call.
#[derive(Clone, Debug)]
pub struct ProviderError {
    /// Which provider failed.
    pub provider: ProviderKind,
    /// How it failed.
    pub kind: ErrorKind,
    /// The upstream's HTTP status, when there was one.
    pub status: Option<u16>,
    /// The upstream's explanation (logged; shown to the client only for `InvalidRequest`).
    pub message: String,
    /// How long the upstream asked us to wait (`Retry-After`, Gemini's `retryDelay`).
    pub retry_after: Option<Duration>,
    /// The request field at fault, for [`ErrorKind::Unsupported`].
    pub param: Option<String>,
}

impl ProviderError {
    /// An error of a kind.
    pub fn new(provider: ProviderKind, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            provider,
            kind,
            status: None,
            message: message.into(),
            retry_after: None,
            param: None,
        }
    }

    /// A request this provider cannot express; `param` names the field.
    pub fn unsupported(provider: ProviderKind, param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::new(provider, ErrorKind::Unsupported, message)
        }
    }

    /// An error from an upstream HTTP status.
    pub fn from_status(provider: ProviderKind, status: u16, message: impl Into<String>) -> Self {
        Self {
            status: Some(status),
            ..Self::new(provider, ErrorKind::from_status(status), message)
        }
    }

    /// Adds the upstream's requested delay.
    pub fn with_retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }

    /// Whether trying the same target again may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::RateLimited
                | ErrorKind::Unavailable
                | ErrorKind::Timeout
                | ErrorKind::Connection
                | ErrorKind::MalformedOutput
        )
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.provider, self.kind.as_str())?;
        if let Some(status) = self.status {
            write!(f, " (HTTP {status})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ProviderError {}

/// The providers the configured aliases use, one instance each (one HTTP client, one SDK
/// client), shared by every request.
#[derive(Clone, Default)]
pub struct Providers {
    mock: Option<Arc<dyn Provider>>,
    gemini: Option<Arc<dyn Provider>>,
    bedrock: Option<Arc<dyn Provider>>,
}

/// What a test (or an embedding program) may supply instead of the defaults.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Bedrock's AWS settings (credentials, region) instead of the default chain; the
    /// gateway still turns SDK retries off and applies `BEDROCK_ENDPOINT_URL`.
    pub aws_config: Option<aws_config::SdkConfig>,
}

impl Providers {
    /// Builds the providers `config`'s aliases use.
    pub async fn from_config(config: &Config, overrides: Overrides) -> anyhow::Result<Self> {
        let aliases = config.aliases();
        let used = |kind: ProviderKind| {
            aliases
                .values()
                .any(|targets| targets.iter().any(|t| t.provider == kind))
        };
        let mut providers = Self::default();
        if used(ProviderKind::Mock) {
            providers.mock = Some(Arc::new(mock::MockProvider::new(
                Duration::from_millis(config.mock_latency_ms),
                config.mock_fail_rate,
            )));
        }
        if used(ProviderKind::Gemini) {
            providers.gemini = Some(Arc::new(gemini::GeminiProvider::new(
                &config.gemini_base_url,
                config.gemini_api_key.clone(),
            )?));
        }
        if used(ProviderKind::Bedrock) {
            providers.bedrock = Some(Arc::new(
                bedrock::BedrockProvider::new(config, overrides.aws_config).await,
            ));
        }
        Ok(providers)
    }

    /// Puts `provider` in its slot (tests use this for a provider of their own).
    pub fn insert(&mut self, provider: Arc<dyn Provider>) {
        let slot = match provider.kind() {
            ProviderKind::Mock => &mut self.mock,
            ProviderKind::Gemini => &mut self.gemini,
            ProviderKind::Bedrock => &mut self.bedrock,
        };
        *slot = Some(provider);
    }

    /// The provider of a kind, when configured.
    pub fn get(&self, kind: ProviderKind) -> Option<&Arc<dyn Provider>> {
        match kind {
            ProviderKind::Mock => self.mock.as_ref(),
            ProviderKind::Gemini => self.gemini.as_ref(),
            ProviderKind::Bedrock => self.bedrock.as_ref(),
        }
    }
}

/// A rough token count for providers that report none: words or a quarter of the
/// characters, whichever is more.
pub fn estimate_tokens(text: &str) -> u32 {
    let words = text.split_whitespace().count();
    let quarter = text.chars().count().div_ceil(4);
    u32::try_from(words.max(quarter)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(json: &str) -> Result<ChatRequest, GatewayError> {
        ChatRequest::from_openai(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn system_messages_go_apart_and_same_role_turns_merge() {
        let r = parse(
            r#"{"model":"m","messages":[
                {"role":"system","content":"be brief"},
                {"role":"user","content":"a"},
                {"role":"user","content":[{"type":"text","text":"b"},{"type":"text","text":"c"}]},
                {"role":"assistant","content":"d"},
                {"role":"developer","content":"no jokes"},
                {"role":"user","content":"e"}],
              "stop":"END","response_format":{"type":"json_object"}}"#,
        )
        .unwrap();
        assert_eq!(r.system.as_deref(), Some("be brief\n\nno jokes"));
        assert_eq!(r.turns.len(), 3);
        assert_eq!(
            r.turns[0].parts,
            vec![Part::Text("a".into()), Part::Text("b\nc".into())]
        );
        assert_eq!(r.last_user_text(), "e");
        assert_eq!(r.stop, vec!["END".to_string()]);
        assert!(r.json);
    }

    #[test]
    fn agent_histories_are_normalised() {
        let r = parse(
            r#"{"model":"m","messages":[
                {"role":"system","content":"sys"},
                {"role":"assistant","content":"I start."},
                {"role":"user","content":""},
                {"role":"assistant","content":null,"tool_calls":[
                    {"id":"c1","type":"function","function":{"name":"f","arguments":""}}]},
                {"role":"tool","tool_call_id":"c1","content":"42"},
                {"role":"user","content":"thanks"}]}"#,
        )
        .unwrap();
        let roles: Vec<TurnRole> = r.turns.iter().map(|t| t.role).collect();
        use TurnRole::{Assistant, User};
        assert_eq!(roles, [User, Assistant, User]);
        assert_eq!(r.turns[0].parts, [Part::Text(PLACEHOLDER_USER_TURN.into())]);
        assert_eq!(r.turns[1].parts.len(), 2, "the two model turns merge");
        assert_eq!(
            r.turns[2].parts,
            [
                Part::ToolResult(ToolResult {
                    id: "c1".into(),
                    name: "f".into(),
                    content: "42".into()
                }),
                Part::Text("thanks".into())
            ]
        );
        assert!(r.history_has_tools());
    }

    #[test]
    fn every_call_is_answered_results_first() {
        let r = parse(
            r#"{"model":"m","messages":[
                {"role":"user","content":"go"},
                {"role":"assistant","tool_calls":[
                    {"id":"a","type":"function","function":{"name":"f","arguments":"{}"}},
                    {"id":"b","type":"function","function":{"name":"g","arguments":"{}"}}]},
                {"role":"user","content":"and?"},
                {"role":"tool","tool_call_id":"b","content":"B"}]}"#,
        )
        .unwrap();
        let result = |id: &str, name: &str, content: &str| {
            Part::ToolResult(ToolResult {
                id: id.into(),
                name: name.into(),
                content: content.into(),
            })
        };
        assert_eq!(
            r.turns[2].parts,
            [
                result("a", "f", MISSING_TOOL_RESULT),
                result("b", "g", "B"),
                Part::Text("and?".into())
            ]
        );
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let cases = [
            (r#"{"model":"m","messages":[]}"#, "messages"),
            (
                r#"{"model":"m","messages":[{"role":"system","content":"x"}]}"#,
                "messages",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                "temperature",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_p":1.5}"#,
                "top_p",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e","f"]}"#,
                "stop",
            ),
            (
                r#"{"model":"m","messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"[1]"}}]}]}"#,
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"a b"}}]}"#,
                "tools[0].function.name",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"g"}}}"#,
                "tool_choice",
            ),
        ];
        for (json, field) in cases {
            match parse(json) {
                Err(GatewayError::InvalidRequest { param, .. }) => {
                    assert_eq!(param.as_deref(), Some(field), "{json}")
                }
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn statuses_sort_into_kinds() {
        assert_eq!(ErrorKind::from_status(429), ErrorKind::RateLimited);
        assert_eq!(ErrorKind::from_status(503), ErrorKind::Unavailable);
        assert_eq!(ErrorKind::from_status(400), ErrorKind::InvalidRequest);
        assert_eq!(ErrorKind::from_status(403), ErrorKind::Auth);
        let e = ProviderError::from_status(ProviderKind::Gemini, 500, "boom");
        assert!(e.retryable());
        assert!(!ProviderError::from_status(ProviderKind::Gemini, 400, "bad").retryable());
    }

    #[test]
    fn tokens_are_estimated_from_words_or_characters() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("a b c"), 3);
        assert_eq!(estimate_tokens("abcdefghijkl"), 3);
    }
}

//! OpenAI's chat-completions wire types: the request the gateway accepts and the response,
//! stream chunk, model list and error bodies it answers with.

use serde::{Deserialize, Serialize};

/// `POST /v1/chat/completions`. Fields that change what the answer means are either
/// supported here or refused by [`ChatCompletionRequest::refused_field`]; the few that are
/// safe to ignore are listed in [`IGNORED_FIELDS`].
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    /// A model alias from `GET /v1/models`.
    pub model: String,
    /// The conversation.
    pub messages: Vec<RequestMessage>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Most tokens to generate (`max_completion_tokens` is the newer name).
    #[serde(default, alias = "max_completion_tokens")]
    pub max_tokens: Option<u32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Stop sequences: one string or a list.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Answer with Server-Sent Events.
    #[serde(default)]
    pub stream: bool,
    /// `{"type": "json_object"}` or `json_schema` asks for JSON output.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Functions the model may call.
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    /// Whether and which tool the model must call.
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    /// `false` allows at most one tool call per answer.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `n`: only one choice is supported.
    #[serde(default)]
    pub n: Option<u32>,
    /// Every other field, so that meaningful ones are refused rather than dropped.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Fields that do not change what a correct answer is, so ignoring them is safe: tracing
/// and storage hints (`user`, `metadata`, `store`, `service_tier`), sampling hints no
/// provider here honours the same way (`seed`, penalties, `reasoning_effort`,
/// `verbosity`), and `stream_options` (usage is always sent on the last chunk).
pub const IGNORED_FIELDS: &[&str] = &[
    "seed",
    "user",
    "metadata",
    "store",
    "service_tier",
    "stream_options",
    "frequency_penalty",
    "presence_penalty",
    "reasoning_effort",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
];

impl ChatCompletionRequest {
    /// The first field the gateway cannot honour, with why: a `400` names it.
    pub fn refused_field(&self) -> Option<(String, String)> {
        if self.n.is_some_and(|n| n != 1) {
            return Some(("n".into(), "only `n: 1` is supported".into()));
        }
        for (name, value) in &self.other {
            if IGNORED_FIELDS.contains(&name.as_str()) {
                continue;
            }
            let harmless = value.is_null()
                || match name.as_str() {
                    "logprobs" => value == &serde_json::Value::Bool(false),
                    "top_logprobs" => value.as_u64() == Some(0),
                    "logit_bias" => value.as_object().is_some_and(|m| m.is_empty()),
                    "modalities" => value == &serde_json::json!(["text"]),
                    _ => false,
                };
            if harmless {
                continue;
            }
            let why = match name.as_str() {
                "functions" | "function_call" => {
                    "the legacy `functions`/`function_call` are not supported; use `tools` and `tool_choice`"
                }
                "logprobs" | "top_logprobs" => "log probabilities are not supported",
                "logit_bias" => "`logit_bias` is not supported",
                _ => "this field is not supported by the gateway",
            };
            return Some((name.clone(), format!("`{name}`: {why}")));
        }
        None
    }
}

/// One message of the conversation.
#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    /// Who said it.
    pub role: Role,
    /// What was said: a string or a list of parts (null on an assistant's tool call).
    #[serde(default)]
    pub content: Option<Content>,
    /// On an assistant message: the tools it called.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// On a `tool` message: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// The roles the gateway accepts (`developer` is OpenAI's newer name for `system`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions.
    #[serde(alias = "developer")]
    System,
    /// The caller.
    User,
    /// The model.
    Assistant,
    /// A tool's result.
    Tool,
}

/// Message content: plain text or text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// `"content": "hello"`.
    Text(String),
    /// `"content": [{"type": "text", "text": "hello"}]`.
    Parts(Vec<ContentPart>),
}

impl Content {
    /// The text of the content, parts joined by newlines.
    pub fn into_text(self) -> String {
        match self {
            Self::Text(text) => text,
            Self::Parts(parts) => {
                let mut parts = parts.into_iter().map(|ContentPart::Text { text }| text);
                let first = parts.next().unwrap_or_default();
                parts.fold(first, |mut all, part| {
                    all.push('\n');
                    all.push_str(&part);
                    all
                })
            }
        }
    }
}

/// A content part; only text is supported.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// `{"type": "text", "text": "..."}`.
    Text {
        /// The text.
        text: String,
    },
}

/// `stop`: one sequence or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// `"stop": "\n"`.
    One(String),
    /// `"stop": ["\n", "END"]`.
    Many(Vec<String>),
}

impl Stop {
    /// The sequences as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `response_format`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text (the default).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON matching a schema.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchema,
    },
}

/// `response_format.json_schema`.
#[derive(Debug, Deserialize)]
pub struct JsonSchema {
    /// The schema's name (Bedrock's forced tool takes it).
    pub name: String,
    /// What the output is for.
    #[serde(default)]
    pub description: Option<String>,
    /// The JSON schema; absent means any object.
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    /// OpenAI's strict mode; every provider here constrains to the schema either way.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// One entry of `tools`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Tool {
    /// `{"type": "function", "function": {...}}`: the only kind there is.
    Function {
        /// The function.
        function: FunctionDefinition,
    },
}

/// A function the model may call.
#[derive(Debug, Deserialize)]
pub struct FunctionDefinition {
    /// Its name (`^[a-zA-Z0-9_-]{1,64}$`).
    pub name: String,
    /// What it does, for the model.
    #[serde(default)]
    pub description: Option<String>,
    /// A JSON schema of its arguments; absent means none.
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
    /// OpenAI's strict mode; accepted, the schema is what is sent.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `tool_choice`: a mode or a named function.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    /// `"auto"`, `"none"` or `"required"`.
    Mode(ToolChoiceMode),
    /// `{"type": "function", "function": {"name": "..."}}`.
    Named(NamedToolChoice),
}

/// The three modes of `tool_choice`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceMode {
    /// The model decides.
    Auto,
    /// No tool call.
    None,
    /// At least one tool call.
    Required,
}

/// A named function in `tool_choice`.
#[derive(Debug, Deserialize)]
pub struct NamedToolChoice {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: FunctionKind,
    /// Which function.
    pub function: FunctionName,
}

/// The `type` of a tool call or named choice: only `function` exists.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FunctionKind {
    /// `"function"`.
    #[default]
    Function,
}

/// `{"name": "..."}`.
#[derive(Debug, Deserialize)]
pub struct FunctionName {
    /// The function's name.
    pub name: String,
}

/// A tool call in an assistant message of the history.
#[derive(Debug, Deserialize)]
pub struct ToolCall {
    /// The id a `tool` message answers.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default)]
    pub kind: FunctionKind,
    /// Which function, with which arguments.
    pub function: FunctionCall,
}

/// The function part of a [`ToolCall`].
#[derive(Debug, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments as JSON text.
    #[serde(default)]
    pub arguments: String,
}

/// A tool call in an answer.
#[derive(Debug, Serialize)]
pub struct ResponseToolCall<'a> {
    /// The id the caller's `tool` message will answer.
    pub id: &'a str,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: FunctionKind,
    /// Name and arguments.
    pub function: ResponseFunction<'a>,
}

/// The function part of a [`ResponseToolCall`].
#[derive(Debug, Serialize)]
pub struct ResponseFunction<'a> {
    /// The function's name.
    pub name: &'a str,
    /// Its arguments as JSON text.
    pub arguments: &'a str,
}

/// One piece of a streamed tool call: the first carries id, type and name, later ones
/// argument fragments, all under the call's `index`.
#[derive(Debug, Serialize)]
pub struct ToolCallDelta<'a> {
    /// Which call of the answer (0, 1, …).
    pub index: u32,
    /// On the first piece.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    /// `function`, on the first piece.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<FunctionKind>,
    /// Name (first piece) and argument fragment.
    pub function: FunctionDelta<'a>,
}

/// The function part of a [`ToolCallDelta`].
#[derive(Debug, Serialize)]
pub struct FunctionDelta<'a> {
    /// On the first piece.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    /// The next fragment of the arguments' JSON text.
    pub arguments: &'a str,
}

/// A non-streaming answer.
#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    /// `chatcmpl-…`.
    pub id: &'a str,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The alias the caller asked for.
    pub model: &'a str,
    /// Exactly one choice.
    pub choices: [Choice<'a>; 1],
    /// Token counts.
    pub usage: Usage,
}

/// The one choice of a [`ChatCompletion`].
#[derive(Debug, Serialize)]
pub struct Choice<'a> {
    /// Always 0.
    pub index: u32,
    /// The reply.
    pub message: ResponseMessage<'a>,
    /// Why generation stopped.
    pub finish_reason: &'static str,
}

/// The assistant's reply.
#[derive(Debug, Serialize)]
pub struct ResponseMessage<'a> {
    /// Always `assistant`.
    pub role: &'static str,
    /// The text; null when the answer is only tool calls.
    pub content: Option<&'a str>,
    /// The tools the model called.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub tool_calls: Vec<ResponseToolCall<'a>>,
}

/// Token counts, in OpenAI's names.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
}

impl Usage {
    /// Usage from input and output counts.
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// One `chat.completion.chunk` Server-Sent Event.
#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk<'a> {
    /// The same id on every chunk of one answer.
    pub id: &'a str,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The alias the caller asked for.
    pub model: &'a str,
    /// One choice (its delta).
    pub choices: [ChunkChoice<'a>; 1],
    /// Only on the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// The delta of a chunk.
#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    /// Always 0.
    pub index: u32,
    /// What is new.
    pub delta: Delta<'a>,
    /// Set on the last chunk.
    pub finish_reason: Option<&'static str>,
}

/// New text (and, on the first chunk, the role).
#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    /// `assistant` on the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    /// A piece of a tool call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<[ToolCallDelta<'a>; 1]>,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// One entry per alias.
    pub data: Vec<Model>,
}

/// One alias in [`ModelList`].
#[derive(Debug, Serialize)]
pub struct Model {
    /// The alias.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds (when the gateway started).
    pub created: u64,
    /// Who serves it: the first target's provider.
    pub owned_by: String,
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    /// The error.
    pub error: ErrorDetail<'a>,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    /// What went wrong, for a person.
    pub message: &'a str,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error`, `api_error`, …
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<&'a str>,
    /// A stable machine-readable code.
    pub code: &'static str,
}

/// `POST /v1/embeddings`. Fields other than these (and `user`, which is ignored) are
/// refused by [`EmbeddingsRequest::refused_field`], as for chat.
#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    /// A model alias from `GET /v1/models`.
    pub model: String,
    /// One text or a list of texts.
    pub input: EmbeddingInput,
    /// The vectors' length, where the model can shorten them.
    #[serde(default)]
    pub dimensions: Option<u32>,
    /// `float` (the default) or `base64`.
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    /// Every other field, so that meaningful ones are refused rather than dropped.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl EmbeddingsRequest {
    /// The first field the gateway cannot honour: only `user` (a tracing hint) and null
    /// fields are ignored.
    pub fn refused_field(&self) -> Option<(String, String)> {
        self.other
            .iter()
            .find(|(name, value)| name.as_str() != "user" && !value.is_null())
            .map(|(name, _)| {
                (
                    name.clone(),
                    format!("`{name}`: this field is not supported by the gateway"),
                )
            })
    }
}

/// `input`: OpenAI also takes token arrays, which the gateway refuses (its providers take
/// text), so they are recognised here only to say so.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// `"input": "text"`.
    One(String),
    /// `"input": ["a", "b"]`.
    Many(Vec<String>),
    /// `"input": [1, 2, 3]` or `[[1, 2], [3]]`: token ids.
    Tokens(Vec<serde_json::Value>),
}

/// How vectors are encoded in the answer.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// A JSON array of numbers.
    #[default]
    Float,
    /// The little-endian `f32` bytes, base64-encoded (as OpenAI does).
    Base64,
}

/// The answer to `POST /v1/embeddings`.
#[derive(Debug, Serialize)]
pub struct EmbeddingList<'a> {
    /// Always `list`.
    pub object: &'static str,
    /// One entry per input, in input order.
    pub data: Vec<EmbeddingData>,
    /// The alias the caller asked for.
    pub model: &'a str,
    /// Input tokens (embeddings generate none).
    pub usage: EmbeddingUsage,
}

/// One vector of [`EmbeddingList`].
#[derive(Debug, Serialize)]
pub struct EmbeddingData {
    /// Always `embedding`.
    pub object: &'static str,
    /// The input's position.
    pub index: u32,
    /// The vector.
    pub embedding: EmbeddingVector,
}

/// A vector as numbers or as base64 text.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// `encoding_format: float`.
    Float(Vec<f32>),
    /// `encoding_format: base64`.
    Base64(String),
}

/// Token counts of an embeddings answer, in OpenAI's names.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct EmbeddingUsage {
    /// Tokens in the inputs.
    pub prompt_tokens: u32,
    /// The same (nothing is generated).
    pub total_tokens: u32,
}

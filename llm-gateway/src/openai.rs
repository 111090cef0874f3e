//! OpenAI's chat-completions wire types: the request the gateway accepts and the response,
//! stream chunk, model list and error bodies it answers with.

use serde::{Deserialize, Serialize};

/// `POST /v1/chat/completions`. Fields the gateway does not use (`n`, `user`, `seed`, …) are
/// accepted and ignored, as OpenAI-compatible servers usually do.
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
    /// `{"type": "json_object"}` (or `json_schema`) asks for JSON output.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
}

/// One message of the conversation.
#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    /// Who said it.
    pub role: Role,
    /// What was said: a string or a list of parts.
    #[serde(default)]
    pub content: Option<Content>,
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
    /// JSON matching a schema; the gateway asks for JSON and leaves the schema to the prompt.
    JsonSchema {
        /// The schema, accepted but not enforced.
        #[serde(default)]
        json_schema: Option<serde_json::Value>,
    },
}

impl ResponseFormat {
    /// Whether the reply must be JSON.
    pub fn wants_json(&self) -> bool {
        !matches!(self, Self::Text)
    }
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
    /// The text.
    pub content: &'a str,
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

//! The providers behind the gateway and the neutral request, reply and stream types they
//! share. Each provider lives in its own file with its private wire types; the routing layer
//! only sees the [`Provider`] trait.

pub mod bedrock;
pub mod gemini;
pub mod mock;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::config::{Config, ProviderKind};
use crate::error::GatewayError;
use crate::openai::{ChatCompletionRequest, Role, Usage};

/// Most stop sequences accepted (Gemini takes 5, Bedrock's models 4 or more).
const MAX_STOP_SEQUENCES: usize = 5;

/// A chat request in provider-neutral form: system text apart, turns alternating.
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
}

/// One turn of the conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    /// Who spoke.
    pub role: TurnRole,
    /// What was said, one entry per original message.
    pub parts: Vec<String>,
}

/// The speakers providers know (system text travels apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnRole {
    /// The caller.
    User,
    /// The model.
    Assistant,
}

impl ChatRequest {
    /// Checks and converts an OpenAI request; errors name the field.
    pub fn from_openai(request: ChatCompletionRequest) -> Result<Self, GatewayError> {
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

        let mut system: Option<String> = None;
        let mut turns: Vec<Turn> = Vec::with_capacity(request.messages.len());
        for message in request.messages {
            let text = message.content.map(|c| c.into_text()).unwrap_or_default();
            let role = match message.role {
                Role::System => {
                    match &mut system {
                        Some(all) => {
                            all.push_str("\n\n");
                            all.push_str(&text);
                        }
                        None => system = Some(text),
                    }
                    continue;
                }
                Role::User => TurnRole::User,
                Role::Assistant => TurnRole::Assistant,
            };
            match turns.last_mut() {
                Some(last) if last.role == role => last.parts.push(text),
                _ => turns.push(Turn {
                    role,
                    parts: vec![text],
                }),
            }
        }
        if turns.is_empty() {
            return Err(GatewayError::invalid(
                "messages",
                "`messages` needs at least one `user` message",
            ));
        }
        Ok(Self {
            system,
            turns,
            temperature: request.temperature,
            max_tokens: request.max_tokens,
            top_p: request.top_p,
            stop,
            json: request.response_format.is_some_and(|f| f.wants_json()),
        })
    }

    /// The text of the last user turn.
    pub fn last_user_text(&self) -> &str {
        self.turns
            .iter()
            .rev()
            .find(|t| t.role == TurnRole::User)
            .and_then(|t| t.parts.last())
            .map_or("", String::as_str)
    }
}

/// A complete (non-streamed) reply.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The generated text.
    pub text: String,
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
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn as_openai(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ContentFilter => "content_filter",
        }
    }
}

/// One event of a streamed reply.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    /// New text.
    Delta(String),
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
}

/// How a provider call failed, which decides retry, fallback and the client's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// `429` / throttling: retry after the upstream's delay.
    RateLimited,
    /// `5xx`, model not ready, service unavailable: retry.
    Unavailable,
    /// The attempt took longer than `REQUEST_TIMEOUT`: retry.
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
        assert_eq!(r.turns[0].parts, vec!["a".to_string(), "b\nc".to_string()]);
        assert_eq!(r.last_user_text(), "e");
        assert_eq!(r.stop, vec!["END".to_string()]);
        assert!(r.json);
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

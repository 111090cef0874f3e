//! AWS Bedrock through the official SDK: chat over Converse and ConverseStream, embeddings
//! over InvokeModel (Titan Text Embeddings and Cohere Embed bodies). Credentials come
//! from the default chain (the ECS task role in production); the SDK's own retries are off
//! so the gateway's router owns retries and fallback.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_bedrockruntime as bedrock;
use aws_sdk_bedrockruntime::config::retry::RetryConfig;
use aws_sdk_bedrockruntime::config::timeout::TimeoutConfig;
use aws_sdk_bedrockruntime::config::{Region, StalledStreamProtectionConfig};
use aws_sdk_bedrockruntime::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::types::{
    AnyToolChoice, AutoToolChoice, ContentBlock, ContentBlockDelta, ContentBlockStart,
    ConversationRole, ConverseOutput, ConverseStreamOutput, InferenceConfiguration, Message,
    SpecificToolChoice, StopReason, SystemContentBlock, TokenUsage, Tool,
    ToolChoice as BedrockToolChoice, ToolConfiguration, ToolInputSchema, ToolResultBlock,
    ToolResultContentBlock, ToolSpecification, ToolUseBlock,
};
use aws_smithy_types::{Document, Number};
use futures::StreamExt;
use std::collections::HashMap;

use super::{
    ChatRequest, Completion, EmbeddingRequest, Embeddings, ErrorKind, EventStream, FinishReason,
    Part, Provider, ProviderError, StreamEvent, ToolCall, ToolChoice, TurnRole,
};
use crate::config::{Config, ProviderKind};
use crate::openai::Usage;

const PROVIDER: ProviderKind = ProviderKind::Bedrock;

/// Converse has no JSON mode: a JSON `response_format` becomes one tool whose input schema
/// is the caller's schema, forced with `toolChoice`; its input is the answer. This is the
/// tool's name when the caller's schema has none (`json_object`).
const JSON_TOOL: &str = "json_object";

/// `tool_choice: none` has no Converse form, and a history with tool blocks needs the
/// tools declared; the model is told instead.
const NO_TOOLS_INSTRUCTION: &str = "Do not call any tool now; answer in text.";

/// Titan Text Embeddings v2's `dimensions` (1024 is its default).
const TITAN_V2_DIMENSIONS: [u32; 3] = [256, 512, 1024];

/// Most texts in one Cohere Embed call (Bedrock's limit); longer lists are split.
const COHERE_BATCH: usize = 96;

/// InvokeModel calls of one embeddings request in flight at once (Titan takes one text
/// per call).
const EMBED_CONCURRENCY: usize = 4;

/// The embedding model families InvokeModel is spoken to in, told apart by model id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EmbedFamily {
    /// `amazon.titan-embed-text-v2:0`: one text per call, `dimensions` 256/512/1024.
    TitanV2,
    /// `amazon.titan-embed-text-v1`, `amazon.titan-embed-g1-text-02`: one text, no options.
    TitanV1,
    /// `cohere.embed-english-v3`, `cohere.embed-multilingual-v3`: up to 96 texts per call.
    Cohere,
}

impl EmbedFamily {
    /// The family of a model id, an inference profile id (`us.…`) or an ARN.
    fn of(model: &str) -> Option<Self> {
        if model.contains("amazon.titan-embed-text-v2") {
            Some(Self::TitanV2)
        } else if model.contains("amazon.titan-embed-text-v1")
            || model.contains("amazon.titan-embed-g1-text")
        {
            Some(Self::TitanV1)
        } else if model.contains("cohere.embed-") {
            Some(Self::Cohere)
        } else {
            None
        }
    }
}

/// The Bedrock provider: one SDK client (one connection pool, one credentials cache).
#[derive(Debug, Clone)]
pub struct BedrockProvider {
    client: bedrock::Client,
}

impl BedrockProvider {
    /// A provider for `AWS_REGION` with credentials from the default chain, or from
    /// `aws` when given (tests pass static credentials this way).
    pub async fn new(config: &Config, aws: Option<aws_config::SdkConfig>) -> Self {
        let sdk = match aws {
            Some(sdk) => sdk,
            None => {
                let mut loader = aws_config::defaults(BehaviorVersion::latest())
                    .retry_config(RetryConfig::disabled());
                if let Some(region) = &config.aws_region {
                    loader = loader.region(Region::new(region.clone()));
                }
                loader.load().await
            }
        };
        let mut builder = bedrock::config::Builder::from(&sdk)
            .retry_config(RetryConfig::disabled())
            // A model may think longer than the SDK's 5 s stall grace before its first token;
            // the router bounds every wait with REQUEST_TIMEOUT_MS instead.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .build(),
            );
        if let Some(region) = &config.aws_region {
            builder = builder.region(Region::new(region.clone()));
        }
        if let Some(url) = &config.bedrock_endpoint_url {
            builder = builder.endpoint_url(url);
        }
        Self {
            client: bedrock::Client::from_conf(builder.build()),
        }
    }
}

/// Converse and ConverseStream take the same input through two different builder types.
macro_rules! send_converse {
    ($builder:expr, $model:expr, $request:expr) => {
        $builder
            .model_id($model)
            .set_system(system($request))
            .set_messages(Some(messages($request)?))
            .set_tool_config(tool_config($request)?)
            .inference_config(inference_config($request))
            .send()
            .await
            .map_err(sdk_error)?
    };
}

#[async_trait]
impl Provider for BedrockProvider {
    fn kind(&self) -> ProviderKind {
        PROVIDER
    }

    async fn complete(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<Completion, ProviderError> {
        let output = send_converse!(self.client.converse(), model, request);
        let mut text = String::new();
        let mut tool_calls = Vec::new();
        if let Some(ConverseOutput::Message(message)) = output.output() {
            for block in message.content() {
                match block {
                    ContentBlock::Text(piece) => text.push_str(piece),
                    // The forced JSON tool's input is the answer.
                    ContentBlock::ToolUse(call) if request.json => {
                        text = document_to_json(call.input()).to_string();
                    }
                    ContentBlock::ToolUse(call) => tool_calls.push(ToolCall {
                        id: call.tool_use_id().to_string(),
                        name: call.name().to_string(),
                        arguments: document_to_json(call.input()).to_string(),
                    }),
                    _ => {}
                }
            }
        }
        Ok(Completion {
            text,
            tool_calls,
            finish: map_stop_reason(output.stop_reason(), request.json)?,
            usage: output.usage().map(map_usage).unwrap_or_default(),
        })
    }

    async fn stream(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<EventStream, ProviderError> {
        let output = send_converse!(self.client.converse_stream(), model, request);
        let state = StreamState {
            receiver: output.stream,
            json: request.json,
            tool_index: HashMap::new(),
        };
        let events = futures::stream::unfold(Some(state), |state| async move {
            let mut state = state?;
            loop {
                match state.receiver.recv().await {
                    Ok(Some(event)) => match state.map_event(event) {
                        Some(Ok(event)) => return Some((Ok(event), Some(state))),
                        Some(Err(e)) => return Some((Err(e), None)),
                        None => {}
                    },
                    Ok(None) => return None,
                    // An error ends the stream.
                    Err(e) => return Some((Err(sdk_error(e)), None)),
                }
            }
        });
        Ok(events.boxed())
    }

    async fn embed(
        &self,
        model: &str,
        request: &EmbeddingRequest,
    ) -> Result<Embeddings, ProviderError> {
        let family = EmbedFamily::of(model).ok_or_else(|| {
            ProviderError::unsupported(
                PROVIDER,
                "model",
                format!(
                    "`{model}` is not an embedding model the gateway knows (Titan Text Embeddings or Cohere Embed)"
                ),
            )
        })?;
        match (family, request.dimensions) {
            (_, None) => {}
            (EmbedFamily::TitanV2, Some(d)) if TITAN_V2_DIMENSIONS.contains(&d) => {}
            (EmbedFamily::TitanV2, Some(_)) => {
                return Err(ProviderError::unsupported(
                    PROVIDER,
                    "dimensions",
                    format!("`dimensions`: `{model}` takes 256, 512 or 1024"),
                ));
            }
            (_, Some(_)) => {
                return Err(ProviderError::unsupported(
                    PROVIDER,
                    "dimensions",
                    format!("`dimensions`: `{model}` has a fixed length"),
                ));
            }
        }
        let mut embeddings = match family {
            EmbedFamily::TitanV2 | EmbedFamily::TitanV1 => {
                let calls = request.inputs.iter().map(|text| {
                    let mut body = serde_json::json!({ "inputText": text });
                    if family == EmbedFamily::TitanV2 {
                        body["normalize"] = true.into();
                        if let Some(d) = request.dimensions {
                            body["dimensions"] = d.into();
                        }
                    }
                    async move {
                        let reply: TitanEmbedding = self.invoke(model, &body).await?;
                        Ok::<_, ProviderError>(reply)
                    }
                });
                // Collected first: a lazy iterator of futures trips the `Send` check.
                let calls: Vec<_> = calls.collect();
                let mut results = futures::stream::iter(calls).buffered(EMBED_CONCURRENCY);
                let mut embeddings = Embeddings::default();
                while let Some(reply) = results.next().await {
                    let reply = reply?;
                    embeddings.vectors.push(reply.embedding);
                    embeddings.prompt_tokens = embeddings
                        .prompt_tokens
                        .saturating_add(reply.input_text_token_count);
                }
                embeddings
            }
            EmbedFamily::Cohere => {
                let calls = request.inputs.chunks(COHERE_BATCH).map(|texts| {
                    let body = serde_json::json!({
                        "texts": texts,
                        // Stored documents: the common use of an OpenAI embeddings call.
                        "input_type": "search_document",
                        "embedding_types": ["float"],
                    });
                    async move {
                        let reply: CohereEmbeddings = self.invoke(model, &body).await?;
                        let vectors = match reply.embeddings {
                            CohereVectors::ByType { float } => float,
                            CohereVectors::Floats(vectors) => vectors,
                        };
                        if vectors.len() != texts.len() {
                            return Err(ProviderError::new(
                                PROVIDER,
                                ErrorKind::Protocol,
                                format!("{} embeddings for {} texts", vectors.len(), texts.len()),
                            ));
                        }
                        Ok(vectors)
                    }
                });
                // Collected first: a lazy iterator of futures trips the `Send` check.
                let calls: Vec<_> = calls.collect();
                let mut results = futures::stream::iter(calls).buffered(EMBED_CONCURRENCY);
                let mut embeddings = Embeddings::default();
                while let Some(vectors) = results.next().await {
                    embeddings.vectors.extend(vectors?);
                }
                // Cohere's body carries no token count.
                embeddings.prompt_tokens = request
                    .inputs
                    .iter()
                    .map(|t| super::estimate_tokens(t))
                    .fold(0, u32::saturating_add);
                embeddings
            }
        };
        // Titan v2 normalises when asked; the others are scaled here, as OpenAI's are.
        embeddings
            .vectors
            .iter_mut()
            .for_each(|v| super::normalize(v));
        Ok(embeddings)
    }
}

impl BedrockProvider {
    /// InvokeModel with a JSON body, the reply read as `T`.
    async fn invoke<T: serde::de::DeserializeOwned>(
        &self,
        model: &str,
        body: &serde_json::Value,
    ) -> Result<T, ProviderError> {
        let output = self
            .client
            .invoke_model()
            .model_id(model)
            .content_type("application/json")
            .accept("application/json")
            .body(aws_smithy_types::Blob::new(body.to_string()))
            .send()
            .await
            .map_err(sdk_error)?;
        serde_json::from_slice(output.body().as_ref()).map_err(|e| {
            ProviderError::new(
                PROVIDER,
                ErrorKind::Protocol,
                format!("unreadable InvokeModel reply: {e}"),
            )
        })
    }
}

/// Titan Text Embeddings' reply.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct TitanEmbedding {
    embedding: Vec<f32>,
    #[serde(default)]
    input_text_token_count: u32,
}

/// Cohere Embed's reply.
#[derive(serde::Deserialize)]
struct CohereEmbeddings {
    embeddings: CohereVectors,
}

/// `{"float": [[…]]}` when `embedding_types` was sent, a bare list of vectors otherwise.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum CohereVectors {
    ByType { float: Vec<Vec<f32>> },
    Floats(Vec<Vec<f32>>),
}

/// A ConverseStream being relayed.
struct StreamState {
    receiver: aws_sdk_bedrockruntime::primitives::event_stream::EventReceiver<
        ConverseStreamOutput,
        bedrock::types::error::ConverseStreamOutputError,
    >,
    /// The forced JSON tool's input is the answer's text.
    json: bool,
    /// Content block index -> the tool call's index in the answer.
    tool_index: HashMap<i32, u32>,
}

impl StreamState {
    fn map_event(
        &mut self,
        event: ConverseStreamOutput,
    ) -> Option<Result<StreamEvent, ProviderError>> {
        match event {
            ConverseStreamOutput::ContentBlockStart(e) => match e.start {
                Some(ContentBlockStart::ToolUse(start)) if !self.json => {
                    let index = u32::try_from(self.tool_index.len()).unwrap_or(u32::MAX);
                    self.tool_index.insert(e.content_block_index, index);
                    Some(Ok(StreamEvent::ToolCallStart {
                        index,
                        id: start.tool_use_id,
                        name: start.name,
                    }))
                }
                _ => None,
            },
            ConverseStreamOutput::ContentBlockDelta(e) => match e.delta {
                // In JSON mode only the forced tool's input is the answer (as unstreamed).
                Some(ContentBlockDelta::Text(text)) if !text.is_empty() && !self.json => {
                    Some(Ok(StreamEvent::Delta(text)))
                }
                Some(ContentBlockDelta::ToolUse(delta)) if !delta.input.is_empty() => {
                    if self.json {
                        return Some(Ok(StreamEvent::Delta(delta.input)));
                    }
                    let index = *self.tool_index.get(&e.content_block_index)?;
                    Some(Ok(StreamEvent::ToolCallArguments {
                        index,
                        fragment: delta.input,
                    }))
                }
                _ => None,
            },
            ConverseStreamOutput::MessageStop(e) => {
                Some(map_stop_reason(&e.stop_reason, self.json).map(StreamEvent::Finish))
            }
            ConverseStreamOutput::Metadata(e) => e
                .usage
                .as_ref()
                .map(|u| Ok(StreamEvent::Usage(map_usage(u)))),
            _ => None,
        }
    }
}

fn system(request: &ChatRequest) -> Option<Vec<SystemContentBlock>> {
    let mut blocks: Vec<SystemContentBlock> = request
        .system
        .iter()
        .map(|s| SystemContentBlock::Text(s.clone()))
        .collect();
    if request.tool_choice == ToolChoice::None && request.history_has_tools() {
        blocks.push(SystemContentBlock::Text(NO_TOOLS_INSTRUCTION.into()));
    }
    (!blocks.is_empty()).then_some(blocks)
}

fn build_error(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(PROVIDER, ErrorKind::Protocol, e.to_string())
}

fn invalid(message: String) -> ProviderError {
    ProviderError::new(PROVIDER, ErrorKind::InvalidRequest, message)
}

fn messages(request: &ChatRequest) -> Result<Vec<Message>, ProviderError> {
    let mut messages = Vec::with_capacity(request.turns.len());
    for turn in &request.turns {
        let mut blocks = Vec::with_capacity(turn.parts.len());
        for part in &turn.parts {
            blocks.push(match part {
                Part::Text(text) => ContentBlock::Text(text.clone()),
                Part::ToolCall(call) => {
                    let input: serde_json::Value = serde_json::from_str(&call.arguments)
                        .ok()
                        .filter(serde_json::Value::is_object)
                        .ok_or_else(|| {
                            invalid(format!(
                                "the arguments of tool call `{}` are not a JSON object",
                                call.id
                            ))
                        })?;
                    ContentBlock::ToolUse(
                        ToolUseBlock::builder()
                            .tool_use_id(tool_use_id(&call.id))
                            .name(&call.name)
                            .input(json_to_document(&input))
                            .build()
                            .map_err(build_error)?,
                    )
                }
                Part::ToolResult(result) => ContentBlock::ToolResult(
                    ToolResultBlock::builder()
                        .tool_use_id(tool_use_id(&result.id))
                        // Converse refuses empty text blocks, in tool results too.
                        .content(ToolResultContentBlock::Text(if result.content.is_empty() {
                            "(empty)".into()
                        } else {
                            result.content.clone()
                        }))
                        .build()
                        .map_err(build_error)?,
                ),
            });
        }
        messages.push(
            Message::builder()
                .role(match turn.role {
                    TurnRole::User => ConversationRole::User,
                    TurnRole::Assistant => ConversationRole::Assistant,
                })
                .set_content(Some(blocks))
                .build()
                .map_err(build_error)?,
        );
    }
    Ok(messages)
}

/// A tool-call id as Converse takes it (`[a-zA-Z0-9_-]{1,64}`). Ids minted elsewhere (a
/// Gemini id carrying its thought signature, after a fallback) are replaced by a stable
/// hash, the same for the call and its result.
fn tool_use_id(id: &str) -> std::borrow::Cow<'_, str> {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        return id.into();
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("tooluse_{hash:016x}").into()
}

fn tool_spec(
    name: &str,
    description: Option<&str>,
    schema: &serde_json::Value,
) -> Result<Tool, ProviderError> {
    Ok(Tool::ToolSpec(
        ToolSpecification::builder()
            .name(name)
            .set_description(description.map(String::from))
            .input_schema(ToolInputSchema::Json(json_to_document(schema)))
            .build()
            .map_err(build_error)?,
    ))
}

/// `toolConfig`: the caller's tools and choice; a JSON `response_format` as one forced
/// tool; and, since Converse refuses tool blocks in a history without it, the history's
/// functions (with an open schema) when the caller sent no tools.
fn tool_config(request: &ChatRequest) -> Result<Option<ToolConfiguration>, ProviderError> {
    let object = serde_json::json!({"type": "object"});
    let mut builder = ToolConfiguration::builder();
    if request.json {
        if !request.tools.is_empty() {
            return Err(ProviderError::unsupported(
                PROVIDER,
                "response_format",
                "`response_format`: Bedrock's JSON mode is a forced tool, so it cannot be combined with `tools`",
            ));
        }
        let (name, description, schema) = match &request.json_schema {
            Some(named) => (
                named.name.as_str(),
                named.description.as_deref(),
                &named.schema,
            ),
            None => (JSON_TOOL, Some("Answer with a JSON object."), &object),
        };
        builder = builder
            .tools(tool_spec(name, description, schema)?)
            .tool_choice(BedrockToolChoice::Tool(
                SpecificToolChoice::builder()
                    .name(name)
                    .build()
                    .map_err(build_error)?,
            ));
        return builder.build().map(Some).map_err(build_error);
    }
    if request.tools.is_empty() {
        let mut names: Vec<&str> = request
            .turns
            .iter()
            .flat_map(|t| &t.parts)
            .filter_map(|p| match p {
                Part::ToolCall(call) => Some(call.name.as_str()),
                _ => None,
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        if names.is_empty() {
            return Ok(None);
        }
        for name in names {
            builder = builder.tools(tool_spec(name, None, &object)?);
        }
        return builder.build().map(Some).map_err(build_error);
    }
    if request.tool_choice == ToolChoice::None && !request.history_has_tools() {
        return Ok(None);
    }
    for tool in &request.tools {
        let schema = tool.parameters.as_ref().unwrap_or(&object);
        builder = builder.tools(tool_spec(&tool.name, tool.description.as_deref(), schema)?);
    }
    let choice = match &request.tool_choice {
        ToolChoice::Auto | ToolChoice::None => {
            BedrockToolChoice::Auto(AutoToolChoice::builder().build())
        }
        ToolChoice::Required => BedrockToolChoice::Any(AnyToolChoice::builder().build()),
        ToolChoice::Named(name) => BedrockToolChoice::Tool(
            SpecificToolChoice::builder()
                .name(name)
                .build()
                .map_err(build_error)?,
        ),
    };
    builder
        .tool_choice(choice)
        .build()
        .map(Some)
        .map_err(build_error)
}

/// A JSON value as the SDK's `Document`.
fn json_to_document(value: &serde_json::Value) -> Document {
    use serde_json::Value;
    match value {
        Value::Null => Document::Null,
        Value::Bool(b) => Document::Bool(*b),
        Value::Number(n) => Document::Number(if let Some(u) = n.as_u64() {
            Number::PosInt(u)
        } else if let Some(i) = n.as_i64() {
            Number::NegInt(i)
        } else {
            Number::Float(n.as_f64().unwrap_or_default())
        }),
        Value::String(s) => Document::String(s.clone()),
        Value::Array(items) => Document::Array(items.iter().map(json_to_document).collect()),
        Value::Object(map) => Document::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), json_to_document(v)))
                .collect(),
        ),
    }
}

/// The SDK's `Document` as JSON.
fn document_to_json(document: &Document) -> serde_json::Value {
    use serde_json::Value;
    match document {
        Document::Null => Value::Null,
        Document::Bool(b) => Value::Bool(*b),
        Document::Number(Number::PosInt(u)) => Value::from(*u),
        Document::Number(Number::NegInt(i)) => Value::from(*i),
        Document::Number(Number::Float(f)) => Value::from(*f),
        Document::String(s) => Value::String(s.clone()),
        Document::Array(items) => Value::Array(items.iter().map(document_to_json).collect()),
        Document::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), document_to_json(v)))
                .collect(),
        ),
    }
}

fn inference_config(request: &ChatRequest) -> InferenceConfiguration {
    InferenceConfiguration::builder()
        .set_max_tokens(
            request
                .max_tokens
                .map(|m| i32::try_from(m).unwrap_or(i32::MAX)),
        )
        .set_temperature(request.temperature)
        .set_top_p(request.top_p)
        .set_stop_sequences((!request.stop.is_empty()).then(|| request.stop.clone()))
        .build()
}

fn map_usage(usage: &TokenUsage) -> Usage {
    let count = |n: i32| u32::try_from(n).unwrap_or(0);
    Usage::new(count(usage.input_tokens), count(usage.output_tokens))
}

/// Bedrock's `stopReason` in OpenAI's terms (`json`: the forced JSON tool was used, which
/// is a normal end). A malformed tool use is the model's failure: an error, retried.
fn map_stop_reason(reason: &StopReason, json: bool) -> Result<FinishReason, ProviderError> {
    Ok(match reason {
        StopReason::MaxTokens | StopReason::ModelContextWindowExceeded => FinishReason::Length,
        StopReason::ContentFiltered | StopReason::GuardrailIntervened => {
            FinishReason::ContentFilter
        }
        StopReason::ToolUse if json => FinishReason::Stop,
        StopReason::ToolUse => FinishReason::ToolCalls,
        StopReason::MalformedToolUse | StopReason::MalformedModelOutput => {
            return Err(ProviderError::new(
                PROVIDER,
                ErrorKind::MalformedOutput,
                format!("stopReason {}", reason.as_str()),
            ));
        }
        _ => FinishReason::Stop,
    })
}

/// Sorts an SDK failure: throttling, model-not-ready, service-unavailable, internal errors,
/// timeouts and broken connections are retryable; validation is the client's; access and
/// unknown-model errors fall back without retry.
fn sdk_error<E, R>(error: SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HttpStatus,
{
    // A service error's code and message say it all; the SDK's full context would add a
    // debug dump of the raw response to every log line.
    let message = match (error.code(), error.message()) {
        (Some(code), message) => format!("{code}: {}", message.unwrap_or("no message")),
        (None, _) => DisplayErrorContext(&error).to_string(),
    };
    let (kind, status) = match &error {
        SdkError::TimeoutError(_) => (ErrorKind::Timeout, None),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => (ErrorKind::Timeout, None),
        SdkError::DispatchFailure(_) => (ErrorKind::Connection, None),
        SdkError::ResponseError(_) => (ErrorKind::Protocol, None),
        SdkError::ServiceError(service) => {
            let status = service.raw().status();
            // Event-stream exceptions spell codes in camel case (`throttlingException`).
            let code = service.err().code().map(str::to_ascii_lowercase);
            let kind = match code.as_deref() {
                Some("throttlingexception" | "toomanyrequestsexception") => ErrorKind::RateLimited,
                Some(
                    "modelnotreadyexception"
                    | "serviceunavailableexception"
                    | "internalserverexception"
                    | "modelstreamerrorexception",
                ) => ErrorKind::Unavailable,
                Some("modeltimeoutexception") => ErrorKind::Timeout,
                Some("validationexception") => ErrorKind::InvalidRequest,
                Some(
                    "accessdeniedexception"
                    | "unrecognizedclientexception"
                    | "expiredtokenexception"
                    | "invalidsignatureexception",
                ) => ErrorKind::Auth,
                Some("resourcenotfoundexception") => ErrorKind::NotFound,
                _ => status.map_or(ErrorKind::Unavailable, ErrorKind::from_status),
            };
            (kind, status)
        }
        // Construction failures and anything new: the gateway's fault, not retryable.
        _ => (ErrorKind::Protocol, None),
    };
    ProviderError {
        status,
        ..ProviderError::new(PROVIDER, kind, message)
    }
}

/// The HTTP status of the raw response behind an SDK error, where there is one (an
/// event-stream message has none).
trait HttpStatus {
    fn status(&self) -> Option<u16>;
}

impl HttpStatus for aws_smithy_types::event_stream::RawMessage {
    fn status(&self) -> Option<u16> {
        None
    }
}

impl HttpStatus for bedrock::config::http::HttpResponse {
    fn status(&self) -> Option<u16> {
        Some(self.status().as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_reasons_map() {
        let map = |r: StopReason| map_stop_reason(&r, false).unwrap();
        assert_eq!(map(StopReason::EndTurn), FinishReason::Stop);
        assert_eq!(map(StopReason::MaxTokens), FinishReason::Length);
        assert_eq!(
            map(StopReason::GuardrailIntervened),
            FinishReason::ContentFilter
        );
        assert_eq!(
            map(StopReason::ContentFiltered),
            FinishReason::ContentFilter
        );
        assert_eq!(map(StopReason::ToolUse), FinishReason::ToolCalls);
        assert_eq!(
            map_stop_reason(&StopReason::ToolUse, true).unwrap(),
            FinishReason::Stop
        );
        let error = map_stop_reason(&StopReason::MalformedToolUse, false).unwrap_err();
        assert_eq!(error.kind, ErrorKind::MalformedOutput);
    }

    #[test]
    fn json_mode_is_a_forced_tool() {
        let request = ChatRequest {
            json: true,
            ..ChatRequest::default()
        };
        let config = tool_config(&request).unwrap().unwrap();
        assert_eq!(config.tools().len(), 1);
        assert!(
            matches!(config.tool_choice(), Some(BedrockToolChoice::Tool(t)) if t.name() == JSON_TOOL)
        );
        assert!(tool_config(&ChatRequest::default()).unwrap().is_none());
    }

    #[test]
    fn foreign_tool_ids_are_made_valid_and_stable() {
        assert_eq!(tool_use_id("tooluse_Ab-1"), "tooluse_Ab-1");
        let gemini = "call_0123456789abcdef.c2ln+/==";
        assert_eq!(tool_use_id(gemini), tool_use_id(gemini));
        assert!(tool_use_id(gemini).starts_with("tooluse_"));
        assert_ne!(
            tool_use_id(gemini),
            tool_use_id("call_0123456789abcdef.other")
        );
    }

    #[test]
    fn embedding_families_come_from_the_model_id() {
        use EmbedFamily::*;
        assert_eq!(
            EmbedFamily::of("amazon.titan-embed-text-v2:0"),
            Some(TitanV2)
        );
        assert_eq!(EmbedFamily::of("amazon.titan-embed-text-v1"), Some(TitanV1));
        assert_eq!(EmbedFamily::of("cohere.embed-english-v3"), Some(Cohere));
        assert_eq!(
            EmbedFamily::of("us.cohere.embed-multilingual-v3"),
            Some(Cohere)
        );
        assert_eq!(
            EmbedFamily::of("anthropic.claude-3-5-haiku-20241022-v1:0"),
            None
        );
    }

    #[test]
    fn documents_round_trip() {
        let value = serde_json::json!({"a": [1, -2, 2.5, "x", true, null], "b": {}});
        assert_eq!(document_to_json(&json_to_document(&value)), value);
    }
}

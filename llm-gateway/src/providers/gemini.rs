//! Google Gemini over the Generative Language REST API: `models/{model}:generateContent`,
//! `:streamGenerateContent?alt=sse` and `:batchEmbedContents`, the key in the `x-goog-api-key` header (never in
//! the URL). The wire types are private and mirror Google's documentation.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde::{Deserialize, Serialize};

use super::{
    ChatRequest, Completion, EmbeddingRequest, Embeddings, ErrorKind, EventStream, FinishReason,
    Part as TurnPart, Provider, ProviderError, StreamEvent, ToolCall, ToolChoice, TurnRole, schema,
};
use crate::config::ProviderKind;
use crate::openai::Usage;
use common::config::Secret;

const PROVIDER: ProviderKind = ProviderKind::Gemini;

/// Most texts in one `batchEmbedContents` call (Google's limit); longer lists are split.
const EMBED_BATCH: usize = 100;

/// `batchEmbedContents` calls of one request in flight at once.
const EMBED_CONCURRENCY: usize = 4;

/// Request URLs by model, then method.
type Urls = HashMap<String, HashMap<String, reqwest::Url>>;

/// The Gemini provider: one pooled HTTP client for every request.
#[derive(Debug, Clone)]
pub struct GeminiProvider {
    /// Shared keep-alive pool; no overall timeout, the router bounds each attempt.
    client: reqwest::Client,
    /// `GEMINI_BASE_URL` without a trailing slash.
    base_url: String,
    /// The key as a ready header value, marked sensitive so it never shows in debug output.
    api_key: HeaderValue,
    /// Parsed request URLs by model and method, shared by the provider's clones.
    urls: Arc<RwLock<Urls>>,
}

impl GeminiProvider {
    /// A provider for `base_url` (`https://generativelanguage.googleapis.com/v1beta`).
    pub fn new(base_url: &str, api_key: Secret) -> anyhow::Result<Self> {
        common::install_crypto_provider();
        let client = reqwest::Client::builder()
            // The API answers where it is asked and never redirects; the redirect layer
            // cost about 7 % of the gateway's CPU (it keeps every request replayable).
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .user_agent(concat!("ensemble-llm-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut api_key = HeaderValue::from_str(api_key.expose())
            .map_err(|_| anyhow::anyhow!("GEMINI_API_KEY holds characters a header cannot"))?;
        api_key.set_sensitive(true);
        Ok(Self {
            client,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
            urls: Arc::default(),
        })
    }

    /// `{base}/models/{model}:{method}`, parsed once per model and method: parsing it
    /// (host, IDNA, percent-encoding) was about 7 % of a request's instructions. Bounded:
    /// the models are the configured targets', the methods this file's three.
    fn url(&self, model: &str, method: &str) -> Result<reqwest::Url, ProviderError> {
        let find = |urls: &Urls| urls.get(model)?.get(method).cloned();
        if let Some(url) = find(&self.urls.read().unwrap_or_else(PoisonError::into_inner)) {
            return Ok(url);
        }
        let url = reqwest::Url::parse(&format!("{}/models/{model}:{method}", self.base_url))
            .map_err(|e| {
                ProviderError::new(
                    PROVIDER,
                    ErrorKind::Protocol,
                    format!("GEMINI_BASE_URL and model `{model}` make no URL: {e}"),
                )
            })?;
        self.urls
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(model.to_string())
            .or_default()
            .insert(method.to_string(), url.clone());
        Ok(url)
    }

    /// Sends `request` to `models/{model}:{method}` and checks the status.
    async fn send(
        &self,
        model: &str,
        method: &str,
        request: &ChatRequest,
    ) -> Result<reqwest::Response, ProviderError> {
        let model = model.strip_prefix("models/").unwrap_or(model);
        let body = serde_json::to_vec(&GenerateContentRequest::build(request, model)?)
            .map_err(|e| ProviderError::new(PROVIDER, ErrorKind::Protocol, e.to_string()))?;
        self.post(model, method, body).await
    }

    /// Posts `body` to `models/{model}:{method}` and checks the status.
    async fn post(
        &self,
        model: &str,
        method: &str,
        body: Vec<u8>,
    ) -> Result<reqwest::Response, ProviderError> {
        let url = self.url(model, method)?;
        let request = self
            .client
            .post(url)
            .header("x-goog-api-key", self.api_key.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        let response = common::traces::propagate(request)
            .send()
            .await
            .map_err(transport_error)?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(handle_gemini_error(response).await)
        }
    }
}

#[async_trait]
impl Provider for GeminiProvider {
    fn kind(&self) -> ProviderKind {
        PROVIDER
    }

    async fn complete(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<Completion, ProviderError> {
        let response = self.send(model, "generateContent", request).await?;
        let body = response.bytes().await.map_err(transport_error)?;
        let reply: GenerateContentResponse = serde_json::from_slice(&body).map_err(|e| {
            ProviderError::new(
                PROVIDER,
                ErrorKind::Protocol,
                format!("unreadable reply: {e}"),
            )
        })?;
        if let Some(error) = reply.error {
            return Err(error.into_provider_error(None));
        }
        let mut text = String::new();
        let mut tool_calls = Vec::new();
        let mut finish = FinishReason::Stop;
        reply.collect(&mut text, &mut tool_calls, &mut finish)?;
        let usage = reply
            .usage_metadata
            .map(UsageMetadata::into_usage)
            .unwrap_or_default();
        Ok(Completion {
            text,
            tool_calls,
            finish,
            usage,
        })
    }

    async fn stream(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<EventStream, ProviderError> {
        let response = self
            .send(model, "streamGenerateContent?alt=sse", request)
            .await?;
        let state = SseState {
            body: response.bytes_stream().boxed(),
            buffer: BytesMut::new(),
            pending: VecDeque::new(),
            done: false,
            tool_calls: 0,
            nonce: format!("{:016x}", rand::random::<u64>()),
        };
        Ok(futures::stream::unfold(state, SseState::next).boxed())
    }

    async fn embed(
        &self,
        model: &str,
        request: &EmbeddingRequest,
    ) -> Result<Embeddings, ProviderError> {
        let model = model.strip_prefix("models/").unwrap_or(model);
        // Every Gemini embedding model says so in its name (`gemini-embedding-001`,
        // `text-embedding-004`); a chat model would only earn a 404.
        if !model.contains("embed") {
            return Err(ProviderError::unsupported(
                PROVIDER,
                "model",
                format!("`{model}` is not an embedding model"),
            ));
        }
        let resource = format!("models/{model}");
        let batches = request.inputs.chunks(EMBED_BATCH).map(|texts| {
            let body = BatchEmbedContentsRequest {
                requests: texts
                    .iter()
                    .map(|text| EmbedContentRequest {
                        model: &resource,
                        content: EmbedContent {
                            parts: [EmbedPart { text }],
                        },
                        output_dimensionality: request.dimensions,
                    })
                    .collect(),
            };
            async move {
                let body = serde_json::to_vec(&body).map_err(|e| {
                    ProviderError::new(PROVIDER, ErrorKind::Protocol, e.to_string())
                })?;
                let response = self.post(model, "batchEmbedContents", body).await?;
                let bytes = response.bytes().await.map_err(transport_error)?;
                let reply: BatchEmbedContentsResponse =
                    serde_json::from_slice(&bytes).map_err(|e| {
                        ProviderError::new(
                            PROVIDER,
                            ErrorKind::Protocol,
                            format!("unreadable embeddings: {e}"),
                        )
                    })?;
                if reply.embeddings.len() != texts.len() {
                    return Err(ProviderError::new(
                        PROVIDER,
                        ErrorKind::Protocol,
                        format!(
                            "{} embeddings for {} texts",
                            reply.embeddings.len(),
                            texts.len()
                        ),
                    ));
                }
                Ok(reply.embeddings)
            }
        });
        let mut vectors = Vec::with_capacity(request.inputs.len());
        // Collected first: a lazy iterator of futures trips the `Send` check.
        let batches: Vec<_> = batches.collect();
        let mut results = futures::stream::iter(batches).buffered(EMBED_CONCURRENCY);
        while let Some(batch) = results.next().await {
            for embedding in batch? {
                let mut values = embedding.values;
                // Google scales only full-length vectors to unit length and advises
                // normalising shortened ones; OpenAI's are always unit length.
                super::normalize(&mut values);
                vectors.push(values);
            }
        }
        // `batchEmbedContents` reports no token counts.
        let prompt_tokens = request
            .inputs
            .iter()
            .map(|t| super::estimate_tokens(t))
            .fold(0, u32::saturating_add);
        Ok(Embeddings {
            vectors,
            prompt_tokens,
        })
    }
}

// ---- https://ai.google.dev/api/embeddings#method:-models.batchembedcontents ----

#[derive(Serialize)]
struct BatchEmbedContentsRequest<'a> {
    requests: Vec<EmbedContentRequest<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EmbedContentRequest<'a> {
    /// `models/{model}`, the same as the URL's.
    model: &'a str,
    content: EmbedContent<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_dimensionality: Option<u32>,
}

#[derive(Serialize)]
struct EmbedContent<'a> {
    parts: [EmbedPart<'a>; 1],
}

#[derive(Serialize)]
struct EmbedPart<'a> {
    text: &'a str,
}

#[derive(Deserialize)]
struct BatchEmbedContentsResponse {
    #[serde(default)]
    embeddings: Vec<ContentEmbedding>,
}

#[derive(Deserialize)]
struct ContentEmbedding {
    #[serde(default)]
    values: Vec<f32>,
}

/// A streamed reply being decoded: raw body, undecoded bytes, decoded events not yet
/// handed out.
struct SseState {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    buffer: BytesMut,
    pending: VecDeque<Result<StreamEvent, ProviderError>>,
    done: bool,
    /// Tool calls handed out so far: the next one's index.
    tool_calls: u32,
    /// Stands in for a missing `responseId` in the minted call ids, the same for every
    /// chunk of this answer.
    nonce: String,
}

impl SseState {
    async fn next(mut self) -> Option<(Result<StreamEvent, ProviderError>, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                if event.is_err() {
                    // Nothing after an error: the stream ends with it.
                    self.pending.clear();
                    self.done = true;
                }
                return Some((event, self));
            }
            if self.done {
                return None;
            }
            if let Some(data) = take_sse_data(&mut self.buffer) {
                self.decode(&data);
                continue;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(e)) => self.pending.push_back(Err(transport_error(e))),
                None => {
                    // A last event without its blank line still counts.
                    self.buffer.extend_from_slice(b"\n\n");
                    while let Some(data) = take_sse_data(&mut self.buffer) {
                        self.decode(&data);
                    }
                    self.done = true;
                }
            }
        }
    }

    /// Turns one `data:` payload into events.
    fn decode(&mut self, data: &str) {
        let chunk: GenerateContentResponse = match serde_json::from_str(data) {
            Ok(chunk) => chunk,
            Err(e) => {
                self.pending.push_back(Err(ProviderError::new(
                    PROVIDER,
                    ErrorKind::Protocol,
                    format!("unreadable stream event: {e}"),
                )));
                return;
            }
        };
        if let Some(error) = chunk.error {
            self.pending.push_back(Err(error.into_provider_error(None)));
            return;
        }
        let mut text = String::new();
        let mut calls = Vec::new();
        let mut finish = None;
        let response_id = chunk.response_id.as_deref().unwrap_or(&self.nonce);
        for candidate in chunk.candidates.iter().take(1) {
            candidate.append_text(&mut text);
            candidate.append_tool_calls(response_id, self.tool_calls, &mut calls);
            finish = match candidate.finish_reason.as_deref().map(map_finish_reason) {
                Some(Err(error)) => {
                    self.pending.push_back(Err(error));
                    return;
                }
                Some(Ok(reason)) => Some(reason),
                None => None,
            };
        }
        if chunk
            .prompt_feedback
            .as_ref()
            .is_some_and(|f| f.block_reason.is_some())
        {
            finish = Some(FinishReason::ContentFilter);
        }
        if !text.is_empty() {
            self.pending.push_back(Ok(StreamEvent::Delta(text)));
        }
        // Gemini sends each call whole: one start and one argument fragment per call.
        for call in calls {
            let index = self.tool_calls;
            self.tool_calls += 1;
            self.pending.push_back(Ok(StreamEvent::ToolCallStart {
                index,
                id: call.id,
                name: call.name,
            }));
            self.pending.push_back(Ok(StreamEvent::ToolCallArguments {
                index,
                fragment: call.arguments,
            }));
        }
        if let Some(mut finish) = finish {
            if finish == FinishReason::Stop && self.tool_calls > 0 {
                finish = FinishReason::ToolCalls;
            }
            self.pending.push_back(Ok(StreamEvent::Finish(finish)));
        }
        if let Some(usage) = chunk.usage_metadata {
            self.pending
                .push_back(Ok(StreamEvent::Usage(usage.into_usage())));
        }
    }
}

/// Takes the next complete event's `data:` lines (joined by newlines) out of `buffer`.
/// Events end with a blank line (`\n\n` or `\r\n\r\n`); events without data are skipped.
fn take_sse_data(buffer: &mut BytesMut) -> Option<String> {
    loop {
        let (end, gap) = find_event_end(buffer)?;
        let event = buffer.split_to(end);
        buffer.advance(gap);
        let text = String::from_utf8_lossy(&event);
        let mut data: Option<String> = None;
        for line in text.lines() {
            if let Some(value) = line.strip_prefix("data:") {
                let value = value.strip_prefix(' ').unwrap_or(value);
                match &mut data {
                    Some(all) => {
                        all.push('\n');
                        all.push_str(value);
                    }
                    None => data = Some(value.to_string()),
                }
            }
        }
        if data.is_some() {
            return data;
        }
    }
}

/// Where the first event ends and how long its blank-line terminator is.
fn find_event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// A transport failure: timeouts and refused connections are retryable.
fn transport_error(e: reqwest::Error) -> ProviderError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Connection
    };
    ProviderError::new(PROVIDER, kind, e.to_string())
}

/// Sorts a non-2xx answer into client and upstream errors, keeping Google's `RetryInfo`.
async fn handle_gemini_error(response: reqwest::Response) -> ProviderError {
    let status = response.status().as_u16();
    let retry_after = common::backoff::retry_after(response.headers());
    let body = response.bytes().await.unwrap_or_default();
    match serde_json::from_slice::<ErrorEnvelope>(&body) {
        Ok(envelope) => {
            let mut error = envelope.error.into_provider_error(retry_after);
            error.status = Some(status);
            if error.kind != ErrorKind::Auth {
                error.kind = ErrorKind::from_status(status);
            }
            error
        }
        Err(_) => {
            let text = String::from_utf8_lossy(&body);
            let text: String = text.chars().take(300).collect();
            ProviderError::from_status(PROVIDER, status, text).with_retry_after(retry_after)
        }
    }
}

/// Gemini's `finishReason` in OpenAI's terms. A malformed or unexpected function call is
/// the model's failure, not an answer: an error (retried), never a normal stop.
fn map_finish_reason(reason: &str) -> Result<FinishReason, ProviderError> {
    Ok(match reason {
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            FinishReason::ContentFilter
        }
        "MALFORMED_FUNCTION_CALL" | "UNEXPECTED_TOOL_CALL" | "TOO_MANY_TOOL_CALLS" => {
            return Err(ProviderError::new(
                PROVIDER,
                ErrorKind::MalformedOutput,
                format!("finishReason {reason}"),
            ));
        }
        _ => FinishReason::Stop,
    })
}

/// The user turn appended when a history ends with the model's turn (a framework asking
/// the model to go on): Gemini requires the last turn to be the user's.
const CONTINUE_TURN: &str = "Continue.";

/// The thought signature Google documents for function calls Gemini 3 did not make
/// (histories from other models), which carry no signature of their own.
const FOREIGN_CALL_SIGNATURE: &str = "skip_thought_signature_validator";

/// The separator between a minted tool-call id and the thought signature it carries. Not
/// in the base64 alphabet, so the signature is everything after it.
const SIGNATURE_SEPARATOR: char = '.';

/// A stable id for a call Gemini made (Gemini has none): a hash of the response, the
/// call's place in it, its name and arguments, then the call's thought signature, which
/// Gemini requires back on the next request and which the caller carries in the id.
fn mint_call_id(
    response_id: &str,
    index: u32,
    name: &str,
    args: &str,
    signature: Option<&str>,
) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for bytes in [
        response_id.as_bytes(),
        &index.to_le_bytes(),
        name.as_bytes(),
        args.as_bytes(),
    ] {
        for b in bytes.iter().chain(b"\0") {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    match signature {
        Some(signature) => format!("call_{hash:016x}{SIGNATURE_SEPARATOR}{signature}"),
        None => format!("call_{hash:016x}"),
    }
}

/// The thought signature carried in an id minted by [`mint_call_id`].
fn signature_in(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("call_")?;
    let (hash, signature) = rest.split_once(SIGNATURE_SEPARATOR)?;
    (hash.len() == 16 && !signature.is_empty()).then_some(signature)
}

/// A protobuf JSON duration: `"37s"`, `"0.500s"`.
fn parse_proto_duration(text: &str) -> Option<Duration> {
    let secs: f64 = text.trim().strip_suffix('s')?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

// ---- Google's wire format (https://ai.google.dev/api/generate-content) ----

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentRequest<'a> {
    contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<SystemInstruction<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<GeminiTools<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<ToolConfig<'a>>,
    generation_config: GenerationConfig<'a>,
}

#[derive(Serialize)]
struct Content<'a> {
    role: &'static str,
    parts: Vec<Part<'a>>,
}

#[derive(Serialize)]
struct SystemInstruction<'a> {
    parts: [Part<'a>; 1],
}

#[derive(Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Part<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_call: Option<FunctionCallPart<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_response: Option<FunctionResponsePart<'a>>,
    /// Sent back on the call it came with, as newer models require.
    #[serde(skip_serializing_if = "Option::is_none")]
    thought_signature: Option<&'a str>,
}

#[derive(Serialize)]
struct FunctionCallPart<'a> {
    name: &'a str,
    args: serde_json::Value,
}

#[derive(Serialize)]
struct FunctionResponsePart<'a> {
    name: &'a str,
    response: serde_json::Value,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GeminiTools<'a> {
    function_declarations: Vec<FunctionDeclaration<'a>>,
}

#[derive(Serialize)]
struct FunctionDeclaration<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<serde_json::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolConfig<'a> {
    function_calling_config: FunctionCallingConfig<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FunctionCallingConfig<'a> {
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed_function_names: Option<[&'a str; 1]>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_schema: Option<serde_json::Value>,
}

/// The client's fault, reported before anything is sent.
fn invalid(message: String) -> ProviderError {
    ProviderError::new(PROVIDER, ErrorKind::InvalidRequest, message)
}

/// A tool's result as Gemini's `functionResponse.response`, which must be an object: a
/// JSON object result as it is, anything else under `result`.
fn function_response(content: &str) -> serde_json::Value {
    match serde_json::from_str::<serde_json::Value>(content) {
        Ok(value @ serde_json::Value::Object(_)) => value,
        Ok(value) => serde_json::json!({ "result": value }),
        Err(_) => serde_json::json!({ "result": content }),
    }
}

impl<'a> GenerateContentRequest<'a> {
    fn build(request: &'a ChatRequest, model: &str) -> Result<Self, ProviderError> {
        let signatures_required = model.starts_with("gemini-3");
        let mut contents = Vec::with_capacity(request.turns.len());
        for turn in &request.turns {
            let mut parts = Vec::with_capacity(turn.parts.len());
            let mut first_call = true;
            for part in &turn.parts {
                parts.push(match part {
                    TurnPart::Text(text) => Part {
                        text: Some(text),
                        ..Part::default()
                    },
                    TurnPart::ToolCall(call) => {
                        let args: serde_json::Value = serde_json::from_str(&call.arguments)
                            .ok()
                            .filter(serde_json::Value::is_object)
                            .ok_or_else(|| {
                                invalid(format!(
                                    "the arguments of tool call `{}` are not a JSON object",
                                    call.id
                                ))
                            })?;
                        let mut thought_signature = signature_in(&call.id);
                        if thought_signature.is_none() && first_call && signatures_required {
                            // A call Gemini did not make (another provider's, after a
                            // fallback) has no signature; Gemini 3 requires one on a turn's
                            // first call and documents this value for such histories.
                            thought_signature = Some(FOREIGN_CALL_SIGNATURE);
                        }
                        first_call = false;
                        Part {
                            function_call: Some(FunctionCallPart {
                                name: &call.name,
                                args,
                            }),
                            thought_signature,
                            ..Part::default()
                        }
                    }
                    TurnPart::ToolResult(result) => Part {
                        function_response: Some(FunctionResponsePart {
                            name: &result.name,
                            response: function_response(&result.content),
                        }),
                        ..Part::default()
                    },
                });
            }
            contents.push(Content {
                role: match turn.role {
                    TurnRole::User => "user",
                    TurnRole::Assistant => "model",
                },
                parts,
            });
        }
        // Gemini has no prefill: a conversation ending with the model's turn is refused.
        if contents.last().is_some_and(|c| c.role == "model") {
            contents.push(Content {
                role: "user",
                parts: vec![Part {
                    text: Some(CONTINUE_TURN),
                    ..Part::default()
                }],
            });
        }

        let mut declarations = Vec::with_capacity(request.tools.len());
        for (i, tool) in request.tools.iter().enumerate() {
            // A function without arguments has no `parameters` (Gemini refuses an object
            // schema with no properties).
            let parameters = match &tool.parameters {
                Some(schema)
                    if schema
                        .get("properties")
                        .and_then(serde_json::Value::as_object)
                        .is_some_and(|p| !p.is_empty()) =>
                {
                    Some(schema::to_gemini(schema).map_err(|e| {
                        let param = format!("tools[{i}].function.parameters");
                        ProviderError::unsupported(PROVIDER, &param, format!("{param}: {e}"))
                    })?)
                }
                _ => None,
            };
            declarations.push(FunctionDeclaration {
                name: &tool.name,
                description: tool.description.as_deref(),
                parameters,
            });
        }
        let tool_config = (!declarations.is_empty()).then_some(ToolConfig {
            function_calling_config: match &request.tool_choice {
                ToolChoice::Auto => FunctionCallingConfig {
                    mode: "AUTO",
                    allowed_function_names: None,
                },
                ToolChoice::None => FunctionCallingConfig {
                    mode: "NONE",
                    allowed_function_names: None,
                },
                ToolChoice::Required => FunctionCallingConfig {
                    mode: "ANY",
                    allowed_function_names: None,
                },
                ToolChoice::Named(name) => FunctionCallingConfig {
                    mode: "ANY",
                    allowed_function_names: Some([name.as_str()]),
                },
            },
        });
        let response_schema = match &request.json_schema {
            Some(named) => Some(schema::to_gemini(&named.schema).map_err(|e| {
                let param = "response_format.json_schema.schema";
                ProviderError::unsupported(PROVIDER, param, format!("{param}: {e}"))
            })?),
            None => None,
        };

        Ok(Self {
            contents,
            system_instruction: request.system.as_deref().map(|text| SystemInstruction {
                parts: [Part {
                    text: Some(text),
                    ..Part::default()
                }],
            }),
            tools: if declarations.is_empty() {
                Vec::new()
            } else {
                vec![GeminiTools {
                    function_declarations: declarations,
                }]
            },
            tool_config,
            generation_config: GenerationConfig {
                temperature: request.temperature,
                top_p: request.top_p,
                max_output_tokens: request.max_tokens,
                stop_sequences: &request.stop,
                response_mime_type: request.json.then_some("application/json"),
                response_schema,
            },
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentResponse {
    #[serde(default)]
    candidates: Vec<Candidate>,
    usage_metadata: Option<UsageMetadata>,
    prompt_feedback: Option<PromptFeedback>,
    /// Feeds the minted tool-call ids.
    response_id: Option<String>,
    /// A stream may carry an error in place of a chunk.
    error: Option<GoogleError>,
}

impl GenerateContentResponse {
    fn collect(
        &self,
        text: &mut String,
        tool_calls: &mut Vec<ToolCall>,
        finish: &mut FinishReason,
    ) -> Result<(), ProviderError> {
        if let Some(candidate) = self.candidates.first() {
            candidate.append_text(text);
            // Without a response id, a random one keeps ids of equal calls in different
            // answers apart.
            let nonce;
            let response_id = match &self.response_id {
                Some(id) => id.as_str(),
                None => {
                    nonce = format!("{:016x}", rand::random::<u64>());
                    &nonce
                }
            };
            candidate.append_tool_calls(response_id, 0, tool_calls);
            if let Some(reason) = &candidate.finish_reason {
                *finish = map_finish_reason(reason)?;
            }
            if *finish == FinishReason::Stop && !tool_calls.is_empty() {
                *finish = FinishReason::ToolCalls;
            }
        }
        if self
            .prompt_feedback
            .as_ref()
            .is_some_and(|f| f.block_reason.is_some())
        {
            *finish = FinishReason::ContentFilter;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<CandidateContent>,
    finish_reason: Option<String>,
}

impl Candidate {
    /// The function calls of this candidate, numbered from `first` within the answer.
    fn append_tool_calls(&self, response_id: &str, first: u32, out: &mut Vec<ToolCall>) {
        let calls = self
            .content
            .iter()
            .flat_map(|c| &c.parts)
            .filter_map(|p| Some((p.function_call.as_ref()?, p.thought_signature.as_deref())));
        for (index, (call, signature)) in (first..).zip(calls) {
            let arguments = call
                .args
                .as_ref()
                .map_or_else(|| "{}".to_string(), serde_json::Value::to_string);
            let id = mint_call_id(response_id, index, &call.name, &arguments, signature);
            out.push(ToolCall {
                id,
                name: call.name.clone(),
                arguments,
            });
        }
    }

    fn append_text(&self, out: &mut String) {
        let parts = self.content.iter().flat_map(|c| &c.parts);
        for part in parts.filter(|p| !p.thought) {
            if let Some(text) = &part.text {
                out.push_str(text);
            }
        }
    }
}

#[derive(Deserialize)]
struct CandidateContent {
    #[serde(default)]
    parts: Vec<ResponsePart>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResponsePart {
    text: Option<String>,
    /// Thought summaries are not part of the answer.
    #[serde(default)]
    thought: bool,
    function_call: Option<ResponseFunctionCall>,
    /// Opaque; must go back with the call on the next request.
    thought_signature: Option<String>,
}

#[derive(Deserialize)]
struct ResponseFunctionCall {
    name: String,
    #[serde(default)]
    args: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u32,
    #[serde(default)]
    candidates_token_count: u32,
    /// Thinking tokens are billed as output, like OpenAI's reasoning tokens.
    #[serde(default)]
    thoughts_token_count: u32,
}

impl UsageMetadata {
    fn into_usage(self) -> Usage {
        Usage::new(
            self.prompt_token_count,
            self.candidates_token_count
                .saturating_add(self.thoughts_token_count),
        )
    }
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: GoogleError,
}

/// `{"error": {"code", "status", "message", "details"}}`.
#[derive(Deserialize)]
struct GoogleError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    status: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "@type", default)]
    kind: String,
    /// On `google.rpc.RetryInfo`.
    #[serde(rename = "retryDelay")]
    retry_delay: Option<String>,
    /// On `google.rpc.ErrorInfo`.
    reason: Option<String>,
}

impl GoogleError {
    fn into_provider_error(self, retry_after: Option<Duration>) -> ProviderError {
        let retry_delay = self
            .details
            .iter()
            .filter(|d| d.kind.ends_with("google.rpc.RetryInfo"))
            .find_map(|d| d.retry_delay.as_deref().and_then(parse_proto_duration));
        let bad_key = self
            .details
            .iter()
            .any(|d| d.reason.as_deref() == Some("API_KEY_INVALID"));
        let status = if self.code == 0 { 500 } else { self.code };
        let mut error = ProviderError::from_status(
            PROVIDER,
            status,
            format!("{}: {}", self.status, self.message),
        )
        .with_retry_after(retry_delay.or(retry_after));
        if bad_key {
            error.kind = ErrorKind::Auth;
        }
        error
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::providers::Turn;

    #[test]
    fn requests_are_shaped_as_google_documents() {
        let request = ChatRequest {
            system: Some("be brief".into()),
            turns: vec![
                Turn {
                    role: TurnRole::User,
                    parts: vec![TurnPart::Text("hi".into())],
                },
                Turn {
                    role: TurnRole::Assistant,
                    parts: vec![TurnPart::Text("hello".into())],
                },
            ],
            temperature: Some(0.5),
            max_tokens: Some(10),
            top_p: None,
            stop: vec!["END".into()],
            json: true,
            ..ChatRequest::default()
        };
        let json = serde_json::to_value(
            GenerateContentRequest::build(&request, "gemini-2.5-flash").unwrap(),
        )
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "contents": [
                    {"role": "user", "parts": [{"text": "hi"}]},
                    {"role": "model", "parts": [{"text": "hello"}]},
                    {"role": "user", "parts": [{"text": "Continue."}]}
                ],
                "systemInstruction": {"parts": [{"text": "be brief"}]},
                "generationConfig": {
                    "temperature": 0.5,
                    "maxOutputTokens": 10,
                    "stopSequences": ["END"],
                    "responseMimeType": "application/json"
                }
            })
        );
    }

    #[test]
    fn calls_from_elsewhere_get_the_documented_signature_on_gemini_3_only() {
        let call = |id: &str, name: &str| {
            TurnPart::ToolCall(ToolCall {
                id: id.into(),
                name: name.into(),
                arguments: "{}".into(),
            })
        };
        let signed = mint_call_id("r", 0, "f", "{}", Some("c2ln"));
        let request = ChatRequest {
            turns: vec![
                Turn {
                    role: TurnRole::User,
                    parts: vec![TurnPart::Text("hi".into())],
                },
                Turn {
                    role: TurnRole::Assistant,
                    parts: vec![call("tooluse_1", "f"), call("tooluse_2", "g")],
                },
                Turn {
                    role: TurnRole::User,
                    parts: vec![TurnPart::Text("and?".into())],
                },
                Turn {
                    role: TurnRole::Assistant,
                    parts: vec![call(&signed, "f")],
                },
            ],
            ..ChatRequest::default()
        };
        let signatures = |model: &str| {
            let json =
                serde_json::to_value(GenerateContentRequest::build(&request, model).unwrap())
                    .unwrap();
            [(1, 0), (1, 1), (3, 0)].map(|(c, p)| {
                json["contents"][c]["parts"][p]["thoughtSignature"]
                    .as_str()
                    .map(String::from)
            })
        };
        assert_eq!(
            signatures("gemini-3-pro-preview"),
            [
                Some(FOREIGN_CALL_SIGNATURE.into()),
                None,
                Some("c2ln".into())
            ]
        );
        assert_eq!(
            signatures("gemini-2.5-flash"),
            [None, None, Some("c2ln".into())]
        );
    }

    #[test]
    fn sse_events_split_on_blank_lines() {
        let mut buffer = BytesMut::from(
            &b"data: {\"a\":1}\r\n\r\n: comment\n\ndata: x\ndata: y\n\ndata: partial"[..],
        );
        assert_eq!(take_sse_data(&mut buffer).as_deref(), Some("{\"a\":1}"));
        assert_eq!(take_sse_data(&mut buffer).as_deref(), Some("x\ny"));
        assert_eq!(take_sse_data(&mut buffer), None);
        assert_eq!(&buffer[..], b"data: partial");
    }

    #[test]
    fn retry_delays_parse() {
        assert_eq!(parse_proto_duration("37s"), Some(Duration::from_secs(37)));
        assert_eq!(
            parse_proto_duration("0.5s"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_proto_duration("soon"), None);
    }

    #[test]
    fn finish_reasons_map() {
        assert_eq!(map_finish_reason("STOP").unwrap(), FinishReason::Stop);
        assert_eq!(
            map_finish_reason("MAX_TOKENS").unwrap(),
            FinishReason::Length
        );
        assert_eq!(
            map_finish_reason("SAFETY").unwrap(),
            FinishReason::ContentFilter
        );
        let malformed = map_finish_reason("MALFORMED_FUNCTION_CALL").unwrap_err();
        assert_eq!(malformed.kind, ErrorKind::MalformedOutput);
    }

    #[test]
    fn minted_ids_are_stable_and_carry_the_signature() {
        let a = mint_call_id("r1", 0, "f", "{}", Some("c2lnbmF0dXJl+/=="));
        assert_eq!(
            a,
            mint_call_id("r1", 0, "f", "{}", Some("c2lnbmF0dXJl+/=="))
        );
        assert_ne!(
            a,
            mint_call_id("r1", 1, "f", "{}", Some("c2lnbmF0dXJl+/=="))
        );
        assert_eq!(signature_in(&a), Some("c2lnbmF0dXJl+/=="));
        assert_eq!(signature_in(&mint_call_id("r1", 0, "f", "{}", None)), None);
        assert_eq!(signature_in("tooluse_abc.def"), None);
    }
}

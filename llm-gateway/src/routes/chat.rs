//! `POST /v1/chat/completions`: OpenAI's request in, OpenAI's answer out, as one JSON body
//! or as `chat.completion.chunk` Server-Sent Events ending in `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::future::BoxFuture;
use tracing::Instrument;

use crate::app::{AppState, Caller};
use crate::cache;
use crate::error::GatewayError;
use crate::openai::{
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice, Delta,
    FunctionDelta, FunctionKind, ResponseFunction, ResponseMessage, ResponseToolCall,
    ToolCallDelta, Usage,
};
use crate::providers::{ChatRequest, Completion, EventStream, FinishReason, StreamEvent, ToolCall};
use crate::replay::{self, Begin};
use crate::routes::{parse, respond, served_headers};
use crate::routing::Served;

/// Work done once an answer is complete, before its last bytes go out (so a caller that
/// has the whole answer can rely on it): the ledger records it; replay and the cache keep
/// it. A streamed answer that fails midway runs none of them.
pub type AfterAnswer = Box<dyn FnOnce(Arc<Completion>, Served) -> BoxFuture<'static, ()> + Send>;

/// The handler.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    respond(answer(&state, &caller, &headers, body, started).await)
}

async fn answer(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    started: Instant,
) -> Result<Response, GatewayError> {
    // Replay and the cache key on the body as received (cheap: `Bytes` is shared).
    let raw = body.as_ref().map(Bytes::clone).unwrap_or_default();
    let request: ChatCompletionRequest = parse(body)?;
    let alias = request.model.clone();
    let stream = request.stream;
    let chat = ChatRequest::from_openai(request)?;
    // Before admission: a replay calls no provider, so it is neither checked nor counted.
    let claim = match &state.replay {
        Some(replay) => match replay.begin(caller, headers, &raw).await? {
            Begin::Replayed(answer) => {
                let (completion, served) = *answer;
                let header = replay::replayed_header();
                return recorded(completion, &served, alias, stream, header);
            }
            Begin::Claimed(claim) => Some(claim),
            Begin::Unkeyed => None,
        },
        None => None,
    };
    // Budgets are checked before any provider is called (a refusal drops the replay
    // claim, which frees the key); the answer is recorded once whole.
    let charge = crate::ledger::admit(state, caller, headers, &alias).await?;
    let cached = match &state.cache {
        Some(cache) => cache.entry(&alias, &raw)?,
        None => None,
    };
    if let Some(entry) = &cached
        && let Some((completion, served)) = entry.get().await
    {
        if let Some(claim) = claim {
            claim.record(&completion, &served).await;
        }
        return recorded(completion, &served, alias, stream, cache_header("hit"));
    }
    let mut after: Vec<AfterAnswer> = Vec::new();
    after.extend(charge.map(|charge| charge.after_answer()));
    after.extend(claim.map(replay::Claim::hook));
    let cache_miss = cached.is_some().then(|| cache_header("miss"));
    after.extend(cached.map(cache::Entry::hook));
    let span = super::model_call_span(headers, &alias, "chat");
    let mut response = if stream {
        let routed = state
            .router
            .stream(&alias, &chat)
            .instrument(span.clone())
            .await?;
        super::record_served(&span, &routed.served);
        let events = if span.is_disabled() {
            routed.events
        } else {
            // The span lasts as long as the stream: it ends when the relay is dropped.
            routed
                .events
                .map(move |event| {
                    let _call = &span;
                    event
                })
                .boxed()
        };
        let mut response = sse(
            events,
            alias,
            chat.single_tool_call,
            After::new(after, routed.served.clone()),
        )
        .into_response();
        served_headers(&mut response, &routed.served);
        response
    } else {
        let (mut completion, served) = state
            .router
            .complete(&alias, &chat)
            .instrument(span.clone())
            .await?;
        super::record_served(&span, &served);
        if chat.single_tool_call {
            completion.tool_calls.truncate(1);
        }
        let completion = After::new(after, served.clone()).run(completion).await;
        let mut response = unary(&completion, &alias)?;
        served_headers(&mut response, &served);
        crate::metrics::overhead(
            crate::metrics::Mode::Unary,
            started.elapsed(),
            served.outside,
        );
        response
    };
    response.headers_mut().extend(cache_miss);
    Ok(response)
}

/// A recorded answer (a replay or a cache hit) shaped exactly as a live one, JSON or SSE,
/// with `header` saying where it came from.
fn recorded(
    completion: Completion,
    served: &Served,
    alias: String,
    stream: bool,
    header: (HeaderName, HeaderValue),
) -> Result<Response, GatewayError> {
    let mut response = if stream {
        let events = futures::stream::iter(recorded_events(completion).into_iter().map(Ok));
        sse(
            events.boxed(),
            alias,
            false,
            After::new(Vec::new(), served.clone()),
        )
        .into_response()
    } else {
        unary(&completion, &alias)?
    };
    served_headers(&mut response, served);
    response.headers_mut().insert(header.0, header.1);
    Ok(response)
}

/// A complete answer as the events a provider would have streamed: the text, each tool
/// call's start then its arguments, the finish and the usage.
fn recorded_events(completion: Completion) -> Vec<StreamEvent> {
    let mut events = Vec::new();
    if !completion.text.is_empty() {
        events.push(StreamEvent::Delta(completion.text));
    }
    for (index, call) in (0u32..).zip(completion.tool_calls) {
        events.push(StreamEvent::ToolCallStart {
            index,
            id: call.id,
            name: call.name,
        });
        if !call.arguments.is_empty() {
            events.push(StreamEvent::ToolCallArguments {
                index,
                fragment: call.arguments,
            });
        }
    }
    events.push(StreamEvent::Finish(completion.finish));
    events.push(StreamEvent::Usage(completion.usage));
    events
}

/// `x-ensemble-cache: hit` or `miss` (only on aliases with `cache_ttl_s`).
fn cache_header(outcome: &'static str) -> (HeaderName, HeaderValue) {
    (CACHE_HEADER.clone(), HeaderValue::from_static(outcome))
}

/// Whether the answer came from the response cache.
static CACHE_HEADER: HeaderName = HeaderName::from_static("x-ensemble-cache");

/// The JSON answer of `completion`.
fn unary(completion: &Completion, alias: &str) -> Result<Response, GatewayError> {
    let id = completion_id();
    let tool_calls = completion
        .tool_calls
        .iter()
        .map(|call| ResponseToolCall {
            id: &call.id,
            kind: FunctionKind::Function,
            function: ResponseFunction {
                name: &call.name,
                arguments: &call.arguments,
            },
        })
        .collect::<Vec<_>>();
    // OpenAI answers `content: null` when the model only called tools.
    let content =
        (!completion.text.is_empty() || tool_calls.is_empty()).then_some(completion.text.as_str());
    let body = ChatCompletion {
        id: &id,
        object: "chat.completion",
        created: unix_now(),
        model: alias,
        choices: [Choice {
            index: 0,
            message: ResponseMessage {
                role: "assistant",
                content,
                tool_calls,
            },
            finish_reason: completion.finish.as_openai(),
        }],
        usage: completion.usage,
    };
    let json = serde_json::to_vec(&body)
        .map_err(|e| GatewayError::Internal(format!("unencodable reply: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

/// The [`AfterAnswer`] hooks of one answer, and (streaming) the answer they are given,
/// gathered from the events only when there is a hook to give it to.
struct After {
    hooks: Vec<AfterAnswer>,
    served: Served,
    collected: Completion,
}

impl After {
    fn new(hooks: Vec<AfterAnswer>, served: Served) -> Self {
        Self {
            hooks,
            served,
            collected: empty_completion(),
        }
    }

    /// Notes what a streamed event adds to the answer.
    fn collect(&mut self, event: &StreamEvent) {
        if self.hooks.is_empty() {
            return;
        }
        let answer = &mut self.collected;
        match event {
            StreamEvent::Delta(text) => answer.text.push_str(text),
            StreamEvent::ToolCallStart { id, name, .. } => answer.tool_calls.push(ToolCall {
                id: id.clone(),
                name: name.clone(),
                arguments: String::new(),
            }),
            StreamEvent::ToolCallArguments { index, fragment } => {
                if let Some(call) = answer.tool_calls.get_mut(*index as usize) {
                    call.arguments.push_str(fragment);
                }
            }
            StreamEvent::Finish(finish) => answer.finish = *finish,
            StreamEvent::Usage(usage) => answer.usage = *usage,
        }
    }

    /// Runs the hooks on the gathered answer (streaming).
    async fn finish(&mut self) {
        if !self.hooks.is_empty() {
            let collected = std::mem::replace(&mut self.collected, empty_completion());
            self.run(collected).await;
        }
    }

    /// Runs the hooks, one after the other, on `completion`, and gives it back.
    async fn run(&mut self, completion: Completion) -> Arc<Completion> {
        let completion = Arc::new(completion);
        for hook in self.hooks.drain(..) {
            hook(completion.clone(), self.served.clone()).await;
        }
        completion
    }
}

fn empty_completion() -> Completion {
    Completion {
        text: String::new(),
        tool_calls: Vec::new(),
        finish: FinishReason::Stop,
        usage: Usage::default(),
    }
}

/// Where the SSE answer is.
enum Phase {
    /// The role chunk goes first.
    Start,
    /// Relaying upstream events.
    Body,
    /// The final chunk went out; `[DONE]` is next.
    Finishing,
    /// Nothing more.
    Done,
}

/// The state of one SSE answer.
struct Chunks {
    events: EventStream,
    id: String,
    created: u64,
    alias: String,
    phase: Phase,
    finish: FinishReason,
    usage: Option<Usage>,
    /// `parallel_tool_calls: false`: calls after the first are not relayed.
    single_tool_call: bool,
    /// Run when the answer is complete, before its final chunk.
    after: After,
}

impl Chunks {
    fn chunk(&self, delta: Delta<'_>, finish: Option<FinishReason>, usage: Option<Usage>) -> Event {
        let chunk = ChatCompletionChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.alias,
            choices: [ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish.map(FinishReason::as_openai),
            }],
            usage,
        };
        Event::default().data(serde_json::to_string(&chunk).unwrap_or_default())
    }

    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            let event = match self.phase {
                Phase::Start => {
                    self.phase = Phase::Body;
                    let delta = Delta {
                        role: Some("assistant"),
                        content: Some(""),
                        tool_calls: None,
                    };
                    self.chunk(delta, None, None)
                }
                Phase::Body => {
                    let event = match self.events.next().await {
                        Some(Ok(event)) => event,
                        Some(Err(error)) => {
                            // Bytes have gone out: no fallback now, the stream ends with
                            // the error.
                            self.phase = Phase::Done;
                            let body = GatewayError::Upstream(error).body_json();
                            return Some((Ok(Event::default().data(body)), self));
                        }
                        None => {
                            self.phase = Phase::Finishing;
                            self.after.finish().await;
                            let usage = Some(self.usage.unwrap_or_default());
                            let chunk = self.chunk(Delta::default(), Some(self.finish), usage);
                            return Some((Ok(chunk), self));
                        }
                    };
                    if self.single_tool_call
                        && matches!(
                            event,
                            StreamEvent::ToolCallStart { index: 1.., .. }
                                | StreamEvent::ToolCallArguments { index: 1.., .. }
                        )
                    {
                        continue;
                    }
                    self.after.collect(&event);
                    match event {
                        StreamEvent::Delta(text) => {
                            let delta = Delta {
                                content: Some(&text),
                                ..Delta::default()
                            };
                            self.chunk(delta, None, None)
                        }
                        StreamEvent::ToolCallStart { index, id, name } => {
                            let call = ToolCallDelta {
                                index,
                                id: Some(&id),
                                kind: Some(FunctionKind::Function),
                                function: FunctionDelta {
                                    name: Some(&name),
                                    arguments: "",
                                },
                            };
                            let delta = Delta {
                                tool_calls: Some([call]),
                                ..Delta::default()
                            };
                            self.chunk(delta, None, None)
                        }
                        StreamEvent::ToolCallArguments { index, fragment } => {
                            let call = ToolCallDelta {
                                index,
                                id: None,
                                kind: None,
                                function: FunctionDelta {
                                    name: None,
                                    arguments: &fragment,
                                },
                            };
                            let delta = Delta {
                                tool_calls: Some([call]),
                                ..Delta::default()
                            };
                            self.chunk(delta, None, None)
                        }
                        StreamEvent::Finish(finish) => {
                            self.finish = finish;
                            continue;
                        }
                        StreamEvent::Usage(usage) => {
                            self.usage = Some(usage);
                            continue;
                        }
                    }
                }
                Phase::Finishing => {
                    self.phase = Phase::Done;
                    Event::default().data("[DONE]")
                }
                Phase::Done => return None,
            };
            return Some((Ok(event), self));
        }
    }
}

fn sse(
    events: EventStream,
    alias: String,
    single_tool_call: bool,
    after: After,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let chunks = Chunks {
        events,
        id: completion_id(),
        created: unix_now(),
        alias,
        phase: Phase::Start,
        finish: FinishReason::Stop,
        usage: None,
        single_tool_call,
        after,
    };
    // Comments keep idle connections (and load balancers) open while a model thinks.
    Sse::new(futures::stream::unfold(chunks, Chunks::next))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// `chatcmpl-` and 32 random hex digits (thread-local RNG: no lock, no syscall).
fn completion_id() -> String {
    format!("chatcmpl-{:032x}", rand::random::<u128>())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

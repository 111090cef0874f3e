//! Event streams (docs/events.md): `GET /task/{id}/events` for a task's client (or an
//! operator), `GET /events` for operators, both Server-Sent Events resumable with
//! `Last-Event-ID`; and the workers' `POST /progress`.
//!
//! A stream reads a bounded page of events from the store only when the connection has
//! taken the page before it (the body is pulled by hyper as the socket drains), so a slow
//! reader holds one page, never a backlog. It waits on the store's wake-ups between pages,
//! sends a keep-alive comment every 15 s, and ends after the task's final event, at
//! shutdown, or after [`MAX_STREAM_LIFE`] (the client resumes where it was).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use common::http::{ApiError, JsonBody};
use common::wire::{AckStatus, MAX_PROGRESS_BYTES, ResultAck, StepProgress, TaskEvent, TaskId};
use futures::Stream;
use serde::Deserialize;
use tokio::time::Instant;

use crate::auth::{Caller, Operator, Worker};
use crate::error::ServiceError;
use crate::limits::{Concurrency, Permit};
use crate::store::ProgressOutcome;
use crate::store::events::EventCursor;
use crate::tasks::Tasks;

/// Transitions read from the store at a time (one page).
const PAGE: usize = 64;

/// Longest wait for new events before looking again (keep-alives go out meanwhile).
const WAIT: Duration = Duration::from_secs(15);

/// How often a quiet stream sends a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// A stream ends after this long; the client reconnects with `Last-Event-ID` (browsers do
/// so by themselves). A half-open connection cannot hold a place in the caps for longer.
const MAX_STREAM_LIFE: Duration = Duration::from_secs(30 * 60);

/// What a browser waits before reconnecting (the `retry:` field of the first message).
const RECONNECT: Duration = Duration::from_secs(2);

/// `?after=<event id>`: where to resume, for clients that cannot send `Last-Event-ID`.
#[derive(Debug, Deserialize)]
pub(super) struct EventsQuery {
    after: Option<String>,
}

/// The cursor a client gives: `Last-Event-ID` wins over `?after=`.
fn cursor(headers: &HeaderMap, query: &EventsQuery) -> Result<Option<EventCursor>, ApiError> {
    let header = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| bad_cursor("`Last-Event-ID` must be visible ASCII".into()))
        })
        .transpose()?;
    match header.or(query.after.as_deref()) {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(bad_cursor),
    }
}

fn bad_cursor(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_event_id", message)
}

/// `GET /task/{id}/events`: the task's events from the start, or after the client's
/// cursor, live until the task's final event.
pub(super) async fn task_events(
    State(tasks): State<Arc<Tasks>>,
    State(streams): State<Arc<EventStreams>>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| bad_cursor(e.body_text()))?;
    let after = cursor(&headers, &query)?;
    let permit = streams.0.acquire(&holder(&caller))?;
    // The owner check and the first page answer as a status: 404, 503.
    let (id, first) = tasks.events(&caller, &id, after.as_ref(), PAGE).await?;
    let feed = Feed {
        tasks,
        task: Some(id),
        after,
        page: first.into(),
        ended: false,
        deadline: Instant::now() + MAX_STREAM_LIFE,
        _permit: permit,
    };
    Ok(sse(feed))
}

/// `GET /events`: every task's events but partial output, for operators. From now on, or
/// after the client's cursor (within the last `FIREHOSE_EVENTS` transitions kept).
pub(super) async fn all_events(
    State(tasks): State<Arc<Tasks>>,
    State(streams): State<Arc<EventStreams>>,
    _: Operator,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| bad_cursor(e.body_text()))?;
    let after = match cursor(&headers, &query)? {
        Some(c) => Some(c),
        None => tasks.latest_event().await?,
    };
    let permit = streams.0.acquire(&holder(&Caller::Operator))?;
    let first = tasks.all_events(after.as_ref(), PAGE).await?;
    let feed = Feed {
        tasks,
        task: None,
        after,
        page: first.into(),
        ended: false,
        deadline: Instant::now() + MAX_STREAM_LIFE,
        _permit: permit,
    };
    Ok(sse(feed))
}

/// Whose count a stream is held against.
fn holder(caller: &Caller) -> String {
    match caller {
        Caller::Client(client) => client.clone(),
        // Operators share one count, apart from any client's.
        Caller::Operator => "\u{0}operator".to_string(),
    }
}

/// The caps on event streams held open (`EVENT_STREAMS_MAX_PER_CLIENT`, `_TOTAL`).
#[derive(Debug, Clone)]
pub(crate) struct EventStreams(pub(crate) Arc<Concurrency>);

/// One open stream's state, pulled by the response body.
struct Feed {
    tasks: Arc<Tasks>,
    /// The task; `None` for the operators' stream.
    task: Option<TaskId>,
    /// The last event sent (or the client's cursor).
    after: Option<EventCursor>,
    /// Read and not sent yet.
    page: VecDeque<TaskEvent>,
    /// The final event was sent, or the stream must stop.
    ended: bool,
    deadline: Instant,
    /// The stream's place in the caps, given back when the body is dropped (the client
    /// left, or the stream ended).
    _permit: Permit,
}

impl Feed {
    /// The next event to send, waiting for one; `None` ends the stream.
    async fn next(&mut self) -> Option<Result<Event, std::convert::Infallible>> {
        loop {
            if self.ended {
                return None;
            }
            if let Some(event) = self.page.pop_front() {
                if let Ok(cursor) = event.id.parse() {
                    self.after = Some(cursor);
                }
                self.ended = self.task.is_some() && event.is_final();
                return Some(Ok(message(&event)));
            }
            if self.tasks.stopping() || Instant::now() >= self.deadline {
                return None;
            }
            let read = match &self.task {
                Some(id) => self.tasks.more_events(id, self.after.as_ref(), PAGE).await,
                None => self.tasks.all_events(self.after.as_ref(), PAGE).await,
            };
            match read {
                Ok(events) if events.is_empty() => {
                    let wait = WAIT.min(self.deadline.saturating_duration_since(Instant::now()));
                    self.tasks
                        .wait_events(self.task.as_ref(), self.after.as_ref(), wait)
                        .await;
                }
                Ok(events) => self.page = events.into(),
                Err(e) => {
                    // The status line went out long ago: say why in the stream and end
                    // it; the client resumes after the last event it got.
                    self.ended = true;
                    return Some(Ok(stream_error(&e)));
                }
            }
        }
    }
}

/// An event as an SSE message.
fn message(event: &TaskEvent) -> Event {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    Event::default()
        .id(event.id.clone())
        .event(event.kind.clone())
        .data(data)
}

/// The message that ends a stream whose store failed.
fn stream_error(e: &ServiceError) -> Event {
    let message = match e {
        ServiceError::Unavailable => "the task store is unavailable; reconnect with Last-Event-ID",
        _ => "the event stream failed; reconnect with Last-Event-ID",
    };
    if !matches!(e, ServiceError::Unavailable) {
        tracing::error!(error = %e, "event stream read failed");
    }
    Event::default()
        .event("error")
        .data(serde_json::json!({"message": message, "retryable": true}).to_string())
}

/// The SSE response of a feed: a `retry:` hint first, then its events.
fn sse(feed: Feed) -> Response {
    let hint = Event::default().retry(RECONNECT).comment("ensemble events");
    let events = futures::stream::unfold(feed, |mut feed| async move {
        let next = feed.next().await?;
        Some((next, feed))
    });
    let stream: std::pin::Pin<
        Box<dyn Stream<Item = Result<Event, std::convert::Infallible>> + Send>,
    > = Box::pin(futures::StreamExt::chain(
        futures::stream::once(async move { Ok(hint) }),
        events,
    ));
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
        .into_response()
}

/// `POST /progress`: a worker's partial output of a step attempt it holds.
pub(super) async fn progress(
    State(tasks): State<Arc<Tasks>>,
    // Before the body: a caller without the worker token never gets the body read.
    _: Worker,
    JsonBody(progress): JsonBody<StepProgress>,
) -> Result<Response, ApiError> {
    let size = serde_json::to_string(&progress.messages).map_or(usize::MAX, |t| t.len());
    if size > MAX_PROGRESS_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "progress_too_large",
            format!(
                "`messages` is {size} bytes as JSON; one progress request carries at most \
                 {MAX_PROGRESS_BYTES}"
            ),
        ));
    }
    let status = match tasks.progress(&progress).await? {
        ProgressOutcome::Recorded => AckStatus::Recorded,
        ProgressOutcome::Discarded => AckStatus::Discarded,
        ProgressOutcome::Limited => {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "progress_limit",
                format!(
                    "the task has {} progress events, the most it keeps; send no more for \
                     this attempt",
                    common::wire::MAX_PROGRESS_EVENTS
                ),
            ));
        }
    };
    Ok(Json(ResultAck { status }).into_response())
}

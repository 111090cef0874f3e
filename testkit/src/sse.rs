//! A test client of the master's event streams: opens `GET …/events` and hands out the
//! messages one by one, each within a bounded wait.

use std::collections::VecDeque;
use std::time::Duration;

use common::sse::{SseMessage, SseReader};
use futures::StreamExt;

/// An open event stream.
pub struct EventStream {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    reader: SseReader,
    ready: VecDeque<SseMessage>,
    /// The status and headers it was answered with.
    pub status: reqwest::StatusCode,
    pub content_type: String,
    ended: bool,
}

impl EventStream {
    /// Opens the stream `request` asks for (the caller sets the URL, key and any
    /// `Last-Event-ID`). A non-`200` answer is returned as its status and body.
    pub async fn open(request: reqwest::RequestBuilder) -> Result<Self, (u16, String)> {
        let response = request
            .header("accept", "text/event-stream")
            .send()
            .await
            .map_err(|e| (0, e.to_string()))?;
        let status = response.status();
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            return Err((status.as_u16(), body));
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok(Self {
            body: response.bytes_stream().boxed(),
            reader: SseReader::new(1 << 20),
            ready: VecDeque::new(),
            status,
            content_type,
            ended: false,
        })
    }

    /// The next message, or `None` when the server ended the stream. Panics when none
    /// comes `within`.
    pub async fn next(&mut self, within: Duration) -> Option<SseMessage> {
        match tokio::time::timeout(within, self.next_message()).await {
            Ok(m) => m,
            Err(_) => panic!("no event-stream message within {within:?}"),
        }
    }

    /// The next message, if one comes within `within` (`Err` when none did).
    pub async fn try_next(&mut self, within: Duration) -> Result<Option<SseMessage>, ()> {
        tokio::time::timeout(within, self.next_message())
            .await
            .map_err(|_| ())
    }

    async fn next_message(&mut self) -> Option<SseMessage> {
        loop {
            if let Some(m) = self.ready.pop_front() {
                return Some(m);
            }
            if self.ended {
                return None;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => match self.reader.push(&chunk) {
                    Ok(messages) => self.ready.extend(messages),
                    Err(e) => panic!("event stream message too large: {e}"),
                },
                Some(Err(e)) => panic!("event stream broke: {e}"),
                None => self.ended = true,
            }
        }
    }

    /// The events (messages with an id) until the stream ends; panics if it does not end
    /// `within`.
    pub async fn rest(&mut self, within: Duration) -> Vec<SseMessage> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(m) if m.id.is_some() => out.push(m),
                Some(_) => {}
                None => return out,
            }
        }
    }
}

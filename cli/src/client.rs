//! A small client of the master's HTTP API: submit, status, signal, result, workers, queues. An
//! error answer (`{"error":{"code","message"}}`) becomes an [`ApiFailure`] that prints as one
//! line: `422 invalid: pipeline: unknown pipeline x`.

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use common::wire::{SignalRequest, SignalResponse, SubmitResponse, TaskId, TaskResult, TaskView};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::args::Target;

/// Longest single request; `/result?wait=` asks the master for at most 60 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(75);

/// The master answered with an error.
#[derive(Debug)]
pub struct ApiFailure {
    /// The HTTP status.
    pub status: StatusCode,
    /// The error body's `code`, or the status's reason when the body had none.
    pub code: String,
    /// The error body's `message`, or the body's first line.
    pub message: String,
}

impl fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiFailure {}

/// The master's API.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    /// Base URL without a trailing slash.
    base: String,
    api_key: Option<String>,
}

/// `GET /result/{id}`: the answer, and whether the task has finished (`200`) or not
/// (`202`).
#[derive(Debug)]
pub struct ResultAnswer {
    /// The body.
    pub result: TaskResult,
    /// Whether the task has finished.
    pub finished: bool,
}

impl Client {
    /// A client for `target`.
    pub fn new(target: &Target) -> Self {
        Self::with(&target.url, target.api_key.clone())
    }

    /// A client for a base URL and key.
    pub fn with(url: &str, api_key: Option<String>) -> Self {
        Self {
            http: common::http::client(REQUEST_TIMEOUT),
            base: url.trim_end_matches('/').to_string(),
            api_key: api_key.filter(|k| !k.is_empty()),
        }
    }

    /// `POST /task` with a JSON body; the `Idempotency-Key` travels in the body.
    pub async fn submit(&self, body: &Value) -> anyhow::Result<SubmitResponse> {
        self.call(self.request(reqwest::Method::POST, "/task").json(body))
            .await
    }

    /// `GET /task/{id}`.
    pub async fn task(&self, id: &str) -> anyhow::Result<TaskView> {
        self.call(self.request(
            reqwest::Method::GET,
            &format!("/task/{}", path_segment(id)?),
        ))
        .await
    }

    /// `GET /task/{id}/events` (after event `after`, if given): the open stream, or the
    /// master's error answer (`404` from a master without event streams, too).
    pub async fn events(&self, id: &str, after: Option<&str>) -> anyhow::Result<Response> {
        let mut request = self
            .request(
                reqwest::Method::GET,
                &format!("/task/{}/events", path_segment(id)?),
            )
            .header(reqwest::header::ACCEPT, "text/event-stream")
            // A stream lasts as long as the task; its keep-alives show it is alive.
            .timeout(Duration::from_secs(24 * 3600));
        if let Some(after) = after {
            request = request.header("last-event-id", after);
        }
        let response = self.send(request).await?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.bytes().await.unwrap_or_default();
            return Err(failure(status, &body).into());
        }
        Ok(response)
    }

    /// `POST /task/{id}/signal`.
    pub async fn signal(&self, id: &str, signal: &SignalRequest) -> anyhow::Result<SignalResponse> {
        self.call(
            self.request(
                reqwest::Method::POST,
                &format!("/task/{}/signal", path_segment(id)?),
            )
            .json(signal),
        )
        .await
    }

    /// `GET /result/{id}?wait=SECONDS`.
    pub async fn result(&self, id: &str, wait: Duration) -> anyhow::Result<ResultAnswer> {
        let path = format!("/result/{}?wait={}", path_segment(id)?, wait.as_secs());
        let response = self.send(self.request(reqwest::Method::GET, &path)).await?;
        let finished = response.status() == StatusCode::OK;
        Ok(ResultAnswer {
            result: parse(response).await?,
            finished,
        })
    }

    /// `GET {path}` as JSON (`/workers`, `/queues`).
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.request(reqwest::Method::GET, path)).await
    }

    fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    async fn send(&self, request: RequestBuilder) -> anyhow::Result<Response> {
        request.send().await.map_err(|e| {
            let why = if e.is_timeout() {
                "it did not answer in time".to_string()
            } else {
                root_cause(&e)
            };
            anyhow::anyhow!("cannot reach the master at {}: {why}", self.base)
        })
    }

    async fn call<T: DeserializeOwned>(&self, request: RequestBuilder) -> anyhow::Result<T> {
        parse(self.send(request).await?).await
    }
}

/// The body as `T` on success, an [`ApiFailure`] otherwise.
async fn parse<T: DeserializeOwned>(response: Response) -> anyhow::Result<T> {
    let status = response.status();
    let body = response
        .bytes()
        .await
        .context("the master's answer was cut off")?;
    if !status.is_success() {
        return Err(failure(status, &body).into());
    }
    serde_json::from_slice(&body)
        .context("the answer is not what an Ensemble master of this version sends")
}

fn failure(status: StatusCode, body: &[u8]) -> ApiFailure {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let text = |key: &str| {
        error
            .and_then(|e| e.get(key))
            .and_then(Value::as_str)
            .map(String::from)
    };
    let fallback = String::from_utf8_lossy(body)
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect::<String>();
    ApiFailure {
        status,
        code: text("code").unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase()
        }),
        message: text("message").unwrap_or(fallback),
    }
}

/// A task id, checked here so that nothing else ends up in the URL's path.
fn path_segment(id: &str) -> anyhow::Result<TaskId> {
    TaskId::new(id).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The innermost error's text: "Connection refused (os error 111)" rather than reqwest's
/// "error sending request for url (…)".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut current = e;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_body_is_one_line() {
        let body = br#"{"error":{"code":"invalid","message":"`pipeline`: unknown pipeline `x`"}}"#;
        assert_eq!(
            failure(StatusCode::UNPROCESSABLE_ENTITY, body).to_string(),
            "422 invalid: `pipeline`: unknown pipeline `x`"
        );
        let other = failure(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>\nmore");
        assert_eq!(
            other.to_string(),
            "502 bad gateway: <html>bad gateway</html>"
        );
    }
}

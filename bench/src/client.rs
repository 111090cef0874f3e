//! The bench's HTTP client for the master: submit a task, wait for its result, read the
//! queue depth and the live workers.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use serde::Deserialize;

/// A keep-alive HTTP/1.1 client that keeps up to `pool` idle connections per host.
pub fn http_client(pool: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(pool.max(1))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .connect_timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// How a task ended, as `GET /result/{id}` tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `succeeded`.
    Succeeded,
    /// `failed` or `cancelled`.
    Failed,
}

#[derive(Deserialize)]
struct Submitted {
    task_id: String,
}

#[derive(Deserialize)]
struct Finished {
    status: String,
}

/// Talks to one master.
#[derive(Clone)]
pub struct MasterClient {
    http: reqwest::Client,
    base: String,
    pipeline: String,
}

/// Longest long-poll asked for; a task still running after it is polled again.
const WAIT_SECS: u64 = 30;

impl MasterClient {
    /// A client for the master at `base`, submitting `pipeline`, keeping `pool` connections.
    pub fn new(base: &str, pipeline: &str, pool: usize) -> Self {
        Self {
            http: http_client(pool),
            base: base.trim_end_matches('/').to_string(),
            pipeline: pipeline.into(),
        }
    }

    /// The body of task number `n`: about 100 bytes of JSON input.
    pub fn body(&self, n: usize) -> Bytes {
        let input = serde_json::json!({
            "n": n,
            "text": "The quick brown fox jumps over the lazy dog; sphinx of black quartz.",
        });
        Bytes::from(serde_json::json!({ "pipeline": self.pipeline, "input": input }).to_string())
    }

    /// `POST {path}` of a JSON `body`; fails unless it answers `2xx`.
    async fn post_json(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> anyhow::Result<reqwest::Response> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {path} failed"))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!("POST {path} answered {status}: {text}");
        }
        Ok(response)
    }

    /// `POST /task`; the new task's id.
    pub async fn submit(&self, body: Bytes) -> anyhow::Result<String> {
        let response = self.post_json("/task", body).await?;
        Ok(response.json::<Submitted>().await?.task_id)
    }

    /// `POST /tasks` of the bodies of tasks `from .. from + count`; fails unless every one
    /// was accepted (`202`).
    pub async fn submit_batch(&self, from: usize, count: usize) -> anyhow::Result<()> {
        let mut body = Vec::with_capacity(count * 140 + 16);
        body.extend_from_slice(b"{\"tasks\":[");
        for n in from..from + count {
            if n > from {
                body.push(b',');
            }
            body.extend_from_slice(&self.body(n));
        }
        body.extend_from_slice(b"]}");
        let answer: serde_json::Value = self.post_json("/tasks", body).await?.json().await?;
        let entries = answer["tasks"].as_array().map_or(&[][..], Vec::as_slice);
        let accepted = entries.iter().filter(|e| e["status"] == 202).count();
        if accepted != count {
            bail!("POST /tasks accepted {accepted} of {count} tasks: {answer}");
        }
        Ok(())
    }

    /// `GET /result/{id}?wait=…` until the task has finished.
    pub async fn wait(&self, id: &str) -> anyhow::Result<Outcome> {
        let url = format!("{}/result/{id}?wait={WAIT_SECS}", self.base);
        loop {
            let response = self
                .http
                .get(&url)
                .send()
                .await
                .context("GET /result failed")?;
            match response.status().as_u16() {
                200 => {
                    let done: Finished = response.json().await?;
                    return Ok(if done.status == "succeeded" {
                        Outcome::Succeeded
                    } else {
                        Outcome::Failed
                    });
                }
                202 => continue,
                other => {
                    let text = response.text().await.unwrap_or_default();
                    bail!("GET /result/{id} answered {other}: {text}");
                }
            }
        }
    }

    /// `GET /result/{id}` as JSON (the status, and the result or the error).
    pub async fn result(&self, id: &str) -> anyhow::Result<serde_json::Value> {
        self.get_json(&format!("/result/{id}")).await
    }

    /// `GET {path}` as JSON; a non-2xx answer is an error.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// `GET /queues`: steps of `capability` queued and in flight.
    pub async fn queue_depth(&self, capability: &str) -> anyhow::Result<(u64, u64)> {
        #[derive(Deserialize)]
        struct Queues {
            queues: Vec<Row>,
        }
        #[derive(Deserialize)]
        struct Row {
            capability: String,
            queued: u64,
            in_flight: u64,
        }
        let queues: Queues = self.get_json("/queues").await?;
        Ok(queues
            .queues
            .iter()
            .find(|r| r.capability == capability)
            .map_or((0, 0), |r| (r.queued, r.in_flight)))
    }
}

//! `spawn_app()`: the gateway on a free port with a test token, plus request helpers.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_bedrockruntime::config::{Credentials, Region};
use futures::StreamExt;
use llm_gateway::Config;
use llm_gateway::config::{AliasConfig, ProviderKind, Target};
use llm_gateway::providers::Overrides;
use serde_json::{Value, json};
use testkit::fakes::bedrock::{AWS_ACCESS_KEY, AWS_REGION, AWS_SECRET_KEY};
use testkit::service::Service;

pub const TOKEN: &str = "test-gateway-token";

/// A running gateway; stops when dropped.
pub struct TestApp {
    pub address: String,
    pub http: reqwest::Client,
    _service: Service,
}

/// Settings for tests: a token, short backoffs, short timeouts.
pub fn test_config() -> Config {
    Config {
        host: "127.0.0.1".into(),
        port: 0,
        gateway_token: common::config::Secret::new(TOKEN),
        request_timeout_ms: 5_000,
        retry_base_ms: 5,
        retry_max_ms: 2_000,
        max_retries: 2,
        aws_region: Some(AWS_REGION.into()),
        ..Config::default()
    }
}

/// One alias with the given targets.
pub fn with_alias(mut config: Config, alias: &str, targets: &[(ProviderKind, &str)]) -> Config {
    config.models.insert(
        alias.to_string(),
        AliasConfig {
            targets: targets
                .iter()
                .map(|(provider, model)| Target {
                    provider: *provider,
                    model: model.to_string(),
                })
                .collect(),
            cache_ttl_s: None,
        },
    );
    config
}

/// Starts the gateway with `config`; Bedrock gets static test credentials.
pub async fn spawn_app(config: Config) -> TestApp {
    spawn_app_with_aws_secret(config, AWS_SECRET_KEY).await
}

/// Like [`spawn_app`], with Bedrock signing with `aws_secret`.
pub async fn spawn_app_with_aws_secret(config: Config, aws_secret: &str) -> TestApp {
    common::telemetry::init_tracing("llm-gateway");
    let aws = aws_config::defaults(BehaviorVersion::latest())
        .credentials_provider(Credentials::new(
            AWS_ACCESS_KEY,
            aws_secret.to_string(),
            None,
            None,
            "gateway-tests",
        ))
        .region(Region::new(AWS_REGION))
        .load()
        .await;
    let overrides = Overrides {
        aws_config: Some(aws),
    };
    let service = Service::start_local("llm-gateway", |listener, stop| {
        llm_gateway::serve_with(config, overrides, listener, stop)
    })
    .await
    .unwrap();
    TestApp {
        address: service.url().to_string(),
        http: reqwest::Client::new(),
        _service: service,
    }
}

impl TestApp {
    /// `POST /v1/chat/completions` with the right token.
    pub async fn chat(&self, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.address))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// `POST /v1/embeddings` with the right token.
    pub async fn embed(&self, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/embeddings", self.address))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// `POST /v1/embeddings`, expecting `200`, the body parsed.
    pub async fn embed_json(&self, body: Value) -> Value {
        let response = self.embed(body).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// A streamed answer: status, headers and the `data:` payloads in order.
    pub async fn chat_stream(&self, body: Value) -> Streamed {
        let response = self.chat(body).await;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let mut text = String::new();
        let mut body = response.bytes_stream();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("the stream hung")
        {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
        Streamed {
            status,
            headers,
            events: sse_data(&text),
        }
    }

    /// `POST /v1/chat/completions`, expecting `200`, the body parsed.
    pub async fn chat_json(&self, body: Value) -> Value {
        let response = self.chat(body).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// The Prometheus text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.address))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A streamed answer.
pub struct Streamed {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub events: Vec<String>,
}

impl Streamed {
    /// The content deltas joined.
    pub fn content(&self) -> String {
        joined_content(&self.events)
    }

    /// Asserts a complete answer: `[DONE]` last, and before it the chunk with the finish
    /// reason and usage.
    pub fn assert_finished(&self, finish: &str, usage: Value) {
        assert_eq!(self.status, 200);
        assert_eq!(self.events.last().map(String::as_str), Some("[DONE]"));
        let last: Value = serde_json::from_str(&self.events[self.events.len() - 2]).unwrap();
        assert_eq!(last["object"], "chat.completion.chunk");
        assert_eq!(last["choices"][0]["finish_reason"], finish);
        assert_eq!(last["usage"], usage);
    }

    /// Asserts the answer ended with an error event and no `[DONE]`; returns the error.
    pub fn assert_failed(&self) -> Value {
        assert!(
            !self.events.iter().any(|e| e == "[DONE]"),
            "{:?}",
            self.events
        );
        let last: Value = serde_json::from_str(self.events.last().unwrap()).unwrap();
        assert!(last["error"]["message"].is_string(), "{last}");
        last
    }
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|l| l.strip_prefix(' ').unwrap_or(l))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// Token counts in OpenAI's shape.
pub fn usage(prompt: u32, completion: u32) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// A one-message user request asking for a stream.
pub fn ask_stream(model: &str, prompt: &str) -> Value {
    let mut request = ask(model, prompt);
    request["stream"] = json!(true);
    request
}

/// A one-message user request.
pub fn ask(model: &str, prompt: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": prompt}]})
}

/// The content deltas of a chunk list joined, and the last chunk parsed.
pub fn joined_content(chunks: &[String]) -> String {
    chunks
        .iter()
        .filter(|c| c.as_str() != "[DONE]")
        .filter_map(|c| serde_json::from_str::<Value>(c).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// Asserts an OpenAI-shaped error body and returns it.
pub async fn openai_error(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.unwrap();
    let error = &body["error"];
    assert!(error["message"].is_string(), "{body}");
    assert!(error["type"].is_string(), "{body}");
    assert!(error["code"].is_string(), "{body}");
    body
}

//! The `llm` agent against a fake llm-gateway speaking OpenAI's chat-completions shape.

use std::collections::BTreeMap;

use common::config::Secret;
use reqwest::StatusCode;
use serde_json::json;
use worker::{AgentKind, Agents, Config};

use crate::helpers::*;

/// A Redis, a master and a gateway for one test.
struct Fakes {
    redis: TestRedis,
    master: FakeMaster,
    gateway: FakeGateway,
}

impl Fakes {
    async fn start() -> Self {
        Self {
            redis: TestRedis::start(),
            master: FakeMaster::start().await,
            gateway: FakeGateway::start().await,
        }
    }

    fn config(&self) -> Config {
        llm_config(&self.redis, &self.master, &self.gateway)
    }

    async fn worker(&self, config: Config) -> TestWorker {
        spawn_worker(&self.redis, config, Agents::new()).await
    }
}

fn llm_config(redis: &TestRedis, master: &FakeMaster, gateway: &FakeGateway) -> Config {
    Config {
        capabilities: vec!["plan".into(), "summarize".into()],
        agent_kind: AgentKind::Llm,
        llm_gateway_url: gateway.url(),
        gateway_token: Secret::new(GATEWAY_TOKEN),
        llm_model: "fast".into(),
        llm_max_tokens: Some(256),
        prompts: BTreeMap::from([(
            "summarize".to_string(),
            "Summarize for {{pipeline}}: {{input}}".to_string(),
        )]),
        ..test_config(redis, master)
    }
}

#[tokio::test]
async fn the_llm_agent_renders_the_prompt_calls_the_gateway_and_outputs_text_model_usage() {
    let fakes = Fakes::start().await;
    let (master, gateway) = (&fakes.master, &fakes.gateway);
    let worker = fakes.worker(fakes.config()).await;

    let step = work_request("plan", json!("Why is the sky blue?"));
    let response = worker.post_work_as(Some(TOKEN), &step, "req-llm-1").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let report = master.wait_for_reports(1).await.remove(0).body;
    assert_eq!(
        report.output,
        Some(json!({
            "text": "mock answer",
            "model": "mock-model-1",
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
        }))
    );

    let call = gateway.calls().remove(0);
    assert_eq!(
        call.authorization.as_deref(),
        Some(&*format!("Bearer {GATEWAY_TOKEN}"))
    );
    assert_eq!(call.request_id.as_deref(), Some("req-llm-1"));
    assert_eq!(call.body["model"], "fast");
    assert_eq!(call.body["max_tokens"], 256);
    assert_eq!(call.body["stream"], false);
    assert!(call.body.get("temperature").is_none());
    assert_eq!(call.body["messages"][0]["role"], "user");
    let prompt = call.body["messages"][0]["content"].as_str().unwrap();
    assert!(prompt.contains("planning step"), "{prompt}");
    assert!(prompt.contains("Why is the sky blue?"), "{prompt}");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_configured_template_is_used_for_its_capability() {
    let fakes = Fakes::start().await;
    let (master, gateway) = (&fakes.master, &fakes.gateway);
    let worker = fakes.worker(fakes.config()).await;

    let mut step = work_request("summarize", json!({"text": "a long story", "model": "m"}));
    step.context.pipeline = Some("news".into());
    worker.post_work(&step).await;
    master.wait_for_reports(1).await;
    let call = gateway.calls().remove(0);
    assert_eq!(
        call.body["messages"][0]["content"],
        "Summarize for news: a long story"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn gateway_errors_are_retryable_for_429_and_5xx_and_permanent_for_other_4xx() {
    let fakes = Fakes::start().await;
    let (master, gateway) = (&fakes.master, &fakes.gateway);
    let openai_error = |message: &str| json!({"error": {"message": message, "type": "invalid_request_error", "code": null}});
    let cases = [
        (StatusCode::TOO_MANY_REQUESTS, true),
        (StatusCode::SERVICE_UNAVAILABLE, true),
        (StatusCode::INTERNAL_SERVER_ERROR, true),
        (StatusCode::BAD_REQUEST, false),
        (StatusCode::UNAUTHORIZED, false),
    ];
    let worker = fakes.worker(fakes.config()).await;
    for (n, (status, retryable)) in cases.into_iter().enumerate() {
        gateway.script([(status, openai_error(&format!("case {n}")))]);
        worker.post_work(&work_request("plan", json!(n))).await;
        let report = master.wait_for_reports(n + 1).await.remove(n).body;
        let error = report.error.expect("a failed step");
        assert_eq!(error.retryable, retryable, "{status}: {error:?}");
        assert_eq!(error.kind.as_deref(), Some("upstream"));
        assert!(
            error
                .message
                .contains(&format!("{}: case {n}", status.as_u16())),
            "{error:?}"
        );
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_gateway_is_a_retryable_failure() {
    let fakes = Fakes::start().await;
    let mut config = fakes.config();
    config.llm_gateway_url = format!("http://127.0.0.1:{}", testkit::free_port());
    let worker = fakes.worker(config).await;
    let master = &fakes.master;
    worker.post_work(&work_request("plan", json!(1))).await;
    let error = master
        .wait_for_reports(1)
        .await
        .remove(0)
        .body
        .error
        .unwrap();
    assert!(error.retryable, "{error:?}");
    assert!(error.message.contains("unreachable"), "{error:?}");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_template_stops_the_worker_at_start_naming_the_setting() {
    let fakes = Fakes::start().await;
    let mut config = fakes.config();
    config
        .prompts
        .insert("plan".into(), "Plan {{ the_task }}".into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = worker::serve(config, listener, Default::default())
        .await
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("prompts.plan"), "{err}");
    assert!(err.contains("the_task"), "{err}");
}

#[tokio::test]
async fn the_llm_agent_names_the_task_and_step_and_keys_the_call_the_same_on_every_attempt() {
    let fakes = Fakes::start().await;
    let (master, gateway) = (&fakes.master, &fakes.gateway);
    let worker = fakes.worker(fakes.config()).await;

    let mut step = work_request("plan", json!("the same question"));
    step.step = 2;
    step.context.step_id = Some("search[3]".into());
    worker.post_work(&step).await;
    master.wait_for_reports(1).await;
    // The step again, as a later attempt after a lost report.
    step.attempt = 2;
    worker.post_work(&step).await;
    master.wait_for_reports(2).await;
    // Another step of the same task.
    let mut other = step.clone();
    other.step = 3;
    other.context.step_id = Some("judge".into());
    worker.post_work(&other).await;
    master.wait_for_reports(3).await;

    let calls = gateway.calls();
    assert_eq!(calls.len(), 3);
    let first = &calls[0];
    assert_eq!(
        first.header("x-ensemble-task-id"),
        Some(step.task_id.as_str())
    );
    assert_eq!(first.header("x-ensemble-step-id"), Some("search[3]"));
    assert_eq!(first.header("x-ensemble-step"), Some("2"));
    let key = first.header("idempotency-key").expect("an Idempotency-Key");
    assert!(
        key.starts_with(&format!("ensemble/{}/search[3]/", step.task_id)),
        "{key}"
    );
    assert_eq!(calls[1].header("idempotency-key"), Some(key), "the retry");
    assert_eq!(calls[2].header("x-ensemble-step-id"), Some("judge"));
    assert_ne!(calls[2].header("idempotency-key"), Some(key));
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_spent_budget_fails_the_step_for_good_and_a_call_in_progress_is_retried() {
    let fakes = Fakes::start().await;
    let (master, gateway) = (&fakes.master, &fakes.gateway);
    gateway.script([
        (
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": {"message": "the task's budget of 100 tokens is spent",
                "type": "insufficient_quota", "code": "budget_exceeded"}}),
        ),
        (
            StatusCode::CONFLICT,
            json!({"error": {"message": "a call with this Idempotency-Key is in progress",
                "type": "invalid_request_error", "code": "idempotency_in_progress"}}),
        ),
    ]);
    let worker = fakes.worker(fakes.config()).await;
    worker.post_work(&work_request("plan", json!(1))).await;
    let spent = master
        .wait_for_reports(1)
        .await
        .remove(0)
        .body
        .error
        .unwrap();
    assert!(!spent.retryable, "{spent:?}");
    assert_eq!(spent.kind.as_deref(), Some("budget_exceeded"));
    assert!(spent.message.contains("budget of 100 tokens"), "{spent:?}");

    worker.post_work(&work_request("plan", json!(2))).await;
    let busy = master
        .wait_for_reports(2)
        .await
        .remove(1)
        .body
        .error
        .unwrap();
    assert!(busy.retryable, "{busy:?}");
    worker.stop().await.unwrap();
}

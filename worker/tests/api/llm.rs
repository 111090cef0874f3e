//! The `llm` agent against a fake llm-gateway speaking OpenAI's chat-completions shape
//! (streamed, as the agent asks), and against the real gateway with its mock provider: the
//! tokens it streams reach the master's `/progress` while the step runs.

use std::collections::BTreeMap;

use common::config::Secret;
use common::wire::ReportStatus;
use reqwest::StatusCode;
use serde_json::{Value, json};
use testkit::fakes::gateway::chunk;
use testkit::system::{Store, System};
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
    // The streamed words went on to the master, joined, before the report.
    let posts = master.progress();
    let streamed: Vec<Value> = posts
        .iter()
        .flat_map(|p| p.progress.body.messages.clone())
        .collect();
    assert_eq!(streamed, vec![json!({"delta": "mock answer"})]);

    let call = gateway.calls().remove(0);
    assert_eq!(
        call.authorization.as_deref(),
        Some(&*format!("Bearer {GATEWAY_TOKEN}"))
    );
    assert_eq!(call.request_id.as_deref(), Some("req-llm-1"));
    assert_eq!(call.body["model"], "fast");
    assert_eq!(call.body["max_tokens"], 256);
    assert_eq!(call.body["stream"], true);
    assert_eq!(call.body["stream_options"]["include_usage"], true);
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

#[tokio::test]
async fn a_stream_broken_off_is_retryable_and_an_error_event_is_sorted_like_an_error_answer() {
    let fakes = Fakes::start().await;
    let (master, gateway) = (&fakes.master, &fakes.gateway);
    let error = |kind: &str, code: &str, message: &str| json!({"error": {"message": message, "type": kind, "code": code}});
    // (the events' data, retryable, kind, words of the message)
    let cases = [
        (
            json!([chunk("par"), chunk("tial")]),
            true,
            "upstream",
            "broke off: it ended before `data: [DONE]`",
        ),
        (
            json!([
                chunk("a"),
                error("api_error", "upstream_unavailable", "upstream down")
            ]),
            true,
            "upstream",
            "stream failed: upstream down",
        ),
        (
            json!([
                chunk("a"),
                error("rate_limit_error", "rate_limit_exceeded", "slow down")
            ]),
            true,
            "upstream",
            "stream failed: slow down",
        ),
        (
            json!([error(
                "invalid_request_error",
                "upstream_rejected_request",
                "bad tool"
            )]),
            false,
            "upstream",
            "stream failed: bad tool",
        ),
        (
            json!([error(
                "insufficient_quota",
                "budget_exceeded",
                "the task's budget is spent"
            )]),
            false,
            "budget_exceeded",
            "budget is spent",
        ),
        (
            json!(["{not json", "[DONE]"]),
            true,
            "upstream",
            "unreadable stream",
        ),
    ];
    let worker = fakes.worker(fakes.config()).await;
    for (n, (events, retryable, kind, words)) in cases.into_iter().enumerate() {
        gateway.script([(StatusCode::OK, events)]);
        worker.post_work(&work_request("plan", json!(n))).await;
        let report = master.wait_for_reports(n + 1).await.remove(n).body;
        let error = report.error.expect("a failed step");
        assert_eq!(error.retryable, retryable, "case {n}: {error:?}");
        assert_eq!(error.kind.as_deref(), Some(kind), "case {n}: {error:?}");
        assert!(error.message.contains(words), "case {n}: {error:?}");
    }
    // What streamed before the break still went on as partial output.
    let first: Vec<Value> = master
        .progress()
        .into_iter()
        .filter(|p| p.progress.body.task_id == master.reports()[0].body.task_id)
        .flat_map(|p| p.progress.body.messages)
        .collect();
    assert_eq!(first, vec![json!({"delta": "partial"})]);
    worker.stop().await.unwrap();
}

/// A real llm-gateway (mock provider, no Redis) and a worker whose `llm` agent calls it.
struct RealGateway {
    redis: TestRedis,
    master: FakeMaster,
    system: System,
}

impl RealGateway {
    async fn start() -> Self {
        let system = System::builder()
            .store(Store::Memory)
            .masters(0)
            .start()
            .await
            .expect("start an llm-gateway");
        Self {
            redis: TestRedis::start(),
            master: FakeMaster::start().await,
            system,
        }
    }

    fn config(&self) -> Config {
        let gateway = self.system.gateway_config.as_ref().expect("a gateway");
        Config {
            capabilities: vec!["summarize".into()],
            agent_kind: AgentKind::Llm,
            llm_gateway_url: self.system.gateway_url().expect("a gateway").to_string(),
            gateway_token: gateway.gateway_token.clone(),
            // The gateway's default alias; a template of our own, so the answer is text.
            llm_model: "default".into(),
            prompts: BTreeMap::from([(
                "summarize".to_string(),
                "Summarize: {{input}}".to_string(),
            )]),
            ..test_config(&self.redis, &self.master)
        }
    }
}

#[tokio::test]
async fn the_tokens_the_gateway_streams_reach_the_master_batched_and_join_to_the_output() {
    let real = RealGateway::start().await;
    let master = &real.master;
    let worker = spawn_worker(&real.redis, real.config(), Agents::new()).await;

    let mut step = work_request(
        "summarize",
        json!("the quick brown fox jumps over the lazy dog and keeps on running"),
    );
    step.step = 1;
    step.attempt = 2;
    worker.post_work(&step).await;
    let report = master.wait_for_reports(1).await.remove(0).body;
    assert_eq!(report.status, ReportStatus::Succeeded, "{:?}", report.error);
    let output = report.output.expect("an output");
    let text = output["text"].as_str().expect("a text answer");
    assert!(text.starts_with("Mock reply from"), "{output}");
    assert!(
        output["usage"]["total_tokens"].as_u64() > Some(0),
        "{output}"
    );

    // The mock streams the answer word by word, all at once: fewer posts than words.
    let words = text.split_inclusive(' ').count();
    let posts = master.progress();
    assert!(
        !posts.is_empty() && posts.len() < words,
        "{} posts for {words} words",
        posts.len()
    );
    let mut joined = String::new();
    for post in &posts {
        let body = &post.progress.body;
        assert_eq!(body.task_id, step.task_id);
        assert_eq!((body.step, body.attempt), (1, 2));
        assert_eq!(body.worker_id.as_str(), worker.id);
        for message in &body.messages {
            joined.push_str(message["delta"].as_str().expect("a delta"));
        }
    }
    assert_eq!(joined, text);
    worker.stop().await.unwrap();
    real.system.stop().await;
}

#[tokio::test]
async fn a_stream_the_gateway_breaks_off_fails_the_step_retryably_after_its_first_tokens() {
    let real = RealGateway::start().await;
    let master = &real.master;
    let worker = spawn_worker(&real.redis, real.config(), Agents::new()).await;

    worker
        .post_work(&work_request(
            "summarize",
            json!("[mock:fail-mid-stream] a b c"),
        ))
        .await;
    let report = master.wait_for_reports(1).await.remove(0).body;
    let error = report.error.expect("a failed step");
    assert!(error.retryable, "{error:?}");
    assert_eq!(error.kind.as_deref(), Some("upstream"));
    assert!(error.message.contains("stream failed"), "{error:?}");
    let streamed: Vec<Value> = master
        .progress()
        .into_iter()
        .flat_map(|p| p.progress.body.messages)
        .collect();
    assert_eq!(streamed, vec![json!({"delta": "Mock "})]);
    worker.stop().await.unwrap();
    real.system.stop().await;
}

#[tokio::test]
async fn with_progress_flush_ms_zero_the_streamed_answer_posts_no_progress() {
    let real = RealGateway::start().await;
    let master = &real.master;
    let config = Config {
        progress_flush_ms: 0,
        ..real.config()
    };
    let worker = spawn_worker(&real.redis, config, Agents::new()).await;

    worker
        .post_work(&work_request("summarize", json!("one two three four")))
        .await;
    let report = master.wait_for_reports(1).await.remove(0).body;
    assert_eq!(report.status, ReportStatus::Succeeded, "{:?}", report.error);
    assert!(master.progress().is_empty(), "{:?}", master.progress());
    worker.stop().await.unwrap();
    real.system.stop().await;
}

#[tokio::test]
async fn a_master_streams_the_tokens_as_progress_events_before_the_step_succeeds() {
    let system = System::builder()
        .store(Store::OwnRedis(testkit::RedisOptions::default()))
        .workers(1)
        .worker_config(|_, worker| {
            worker.capabilities = vec!["summarize".into()];
            worker
                .prompts
                .insert("summarize".into(), "Summarize: {{input}}".into());
        })
        .start()
        .await
        .expect("start a master, a gateway and a worker");
    let http = reqwest::Client::new();
    let submitted: Value = http
        .post(format!("{}/task", system.master_url()))
        .bearer_auth(&system.api_key)
        .json(&json!({"steps": ["summarize"], "input": "tell me about the sea and the sky"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = submitted["task_id"].as_str().expect("a task id");
    let mut stream = testkit::sse::EventStream::open(
        http.get(format!("{}/task/{id}/events", system.master_url()))
            .bearer_auth(&system.api_key),
    )
    .await
    .expect("the task's events");
    let events: Vec<common::wire::TaskEvent> = stream
        .rest(WAIT)
        .await
        .iter()
        .map(|m| serde_json::from_str(&m.data).expect("a task event"))
        .collect();

    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let succeeded = kinds
        .iter()
        .position(|k| *k == "step.succeeded")
        .unwrap_or_else(|| panic!("{kinds:?}"));
    let progress: Vec<&common::wire::TaskEvent> = events
        .iter()
        .filter(|e| e.kind == "step.progress")
        .collect();
    assert!(!progress.is_empty(), "{kinds:?}");
    assert!(
        kinds[succeeded..].iter().all(|k| *k != "step.progress"),
        "every token before the step's success: {kinds:?}"
    );
    let joined: String = progress
        .iter()
        .flat_map(|e| &e.messages)
        .map(|m| m["delta"].as_str().expect("a delta"))
        .collect();
    let output = events[succeeded]
        .output
        .as_ref()
        .expect("the step's output");
    assert_eq!(output["text"].as_str(), Some(joined.as_str()));
    assert_eq!(progress[0].attempt, Some(1));
    system.stop().await;
}

//! The `http` agent against a fake agent service (axum on a loopback port) that records
//! what it is sent and answers from a script: the request's body and headers, how each kind
//! of answer becomes an output or a failure, and the health checks that make the worker
//! unavailable while the service is down.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::wire::{ReportStatus, ResultReport, StepError, now_ms};
use serde_json::{Value, json};
use testkit::eventually;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use worker::{AgentKind, Agents, Config};

use crate::helpers::*;

/// What the fake agent answers a step with.
#[derive(Clone)]
enum Answer {
    /// This status, content type (`""`: none) and body.
    Raw(StatusCode, &'static str, Vec<u8>),
    /// `200` with this content type, the body sent in these chunks; then, when `cut`, the
    /// connection breaks instead of the body ending.
    Stream(&'static str, Vec<String>, bool),
    /// Answers `{}` only after this long (longer than any step's deadline in these tests).
    Slow(Duration),
    /// Answers `{"held": true}` once the test calls [`FakeAgent::release`].
    Held,
}

fn json_answer(status: u16, body: Value) -> Answer {
    Answer::Raw(
        StatusCode::from_u16(status).unwrap(),
        "application/json",
        body.to_string().into_bytes(),
    )
}

/// A step the fake agent received.
#[derive(Clone, Debug)]
struct Call {
    headers: HeaderMap,
    body: Value,
}

impl Call {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
    }
}

#[derive(Default)]
struct AgentState {
    script: Mutex<VecDeque<Answer>>,
    calls: Mutex<Vec<Call>>,
    /// What `GET /health` answers: `200` when true, else `503`.
    healthy: AtomicBool,
    release: Notify,
}

/// A fake agent service: `POST /step` answers from the script (by default `200
/// {"echo": input}`), `GET /health` answers as set.
struct FakeAgent {
    base: String,
    state: Arc<AgentState>,
    stop: CancellationToken,
}

impl FakeAgent {
    async fn start(healthy: bool) -> Self {
        let state = Arc::new(AgentState::default());
        state.healthy.store(healthy, Ordering::SeqCst);
        let router = Router::new()
            .route("/step", post(step))
            .route("/health", get(health))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let serving =
            axum::serve(listener, router).with_graceful_shutdown(stop.clone().cancelled_owned());
        tokio::spawn(async move {
            let _ = serving.await;
        });
        Self { base, state, stop }
    }

    fn step_url(&self) -> String {
        format!("{}/step", self.base)
    }

    fn answer(&self, answer: Answer) {
        self.state.script.lock().unwrap().push_back(answer);
    }

    fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    fn release(&self) {
        self.state.release.notify_one();
    }

    async fn wait_for_calls(&self, n: usize) -> Vec<Call> {
        eventually(WAIT, || async {
            let calls = self.calls();
            (calls.len() >= n).then_some(calls)
        })
        .await
        .unwrap_or_else(|| panic!("the agent never got {n} calls"))
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn health(State(state): State<Arc<AgentState>>) -> StatusCode {
    if state.healthy.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn step(State(state): State<Arc<AgentState>>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let input = body["input"].clone();
    state.calls.lock().unwrap().push(Call { headers, body });
    let answer = state.script.lock().unwrap().pop_front();
    match answer {
        None => axum::Json(json!({"echo": input})).into_response(),
        Some(Answer::Raw(status, content_type, body)) => {
            let mut response = (status, body).into_response();
            if content_type.is_empty() {
                response.headers_mut().remove("content-type");
            } else {
                response
                    .headers_mut()
                    .insert("content-type", content_type.parse().unwrap());
            }
            if status.is_redirection() {
                response
                    .headers_mut()
                    .insert("location", "/elsewhere".parse().unwrap());
            }
            response
        }
        Some(Answer::Stream(content_type, chunks, cut)) => {
            let mut items: Vec<Result<Bytes, std::io::Error>> =
                chunks.into_iter().map(|c| Ok(Bytes::from(c))).collect();
            if cut {
                items.push(Err(std::io::Error::other("the agent crashed")));
            }
            let body = Body::from_stream(futures::stream::iter(items));
            ([("content-type", content_type)], body).into_response()
        }
        Some(Answer::Slow(wait)) => {
            tokio::time::sleep(wait).await;
            axum::Json(json!({})).into_response()
        }
        Some(Answer::Held) => {
            state.release.notified().await;
            axum::Json(json!({"held": true})).into_response()
        }
    }
}

/// A worker config whose every capability is served by the http agent at `agent`.
fn http_config(redis: &TestRedis, master: &FakeMaster, agent: &FakeAgent, caps: &[&str]) -> Config {
    Config {
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        agent_kind: AgentKind::Http,
        agent_url: Some(agent.step_url()),
        agent_health_interval_ms: 50,
        ..test_config(redis, master)
    }
}

/// Waits until the worker's record says it takes work.
async fn wait_available(redis: &TestRedis, worker: &TestWorker) {
    redis
        .wait_for_record(&worker.id, |r| r.unavailable.is_none())
        .await;
}

/// The `n`th report (from 1) the master accepted.
async fn report(master: &FakeMaster, n: usize) -> ResultReport {
    master.wait_for_reports(n).await.remove(n - 1).body
}

#[tokio::test]
async fn a_step_is_posted_with_its_coordinates_and_a_retry_keeps_the_idempotency_key() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let agent = FakeAgent::start(true).await;
    let worker = spawn_worker(
        &redis,
        http_config(&redis, &master, &agent, &["research"]),
        Agents::new(),
    )
    .await;
    wait_available(&redis, &worker).await;

    let mut step = work_request("research", json!({"question": "why is the sky blue?"}));
    step.step = 2;
    step.context.step_id = Some("look-up".into());
    step.context.pipeline = Some("science".into());
    agent.answer(json_answer(503, json!({"detail": "warming up"})));
    let r = worker.post_work_as(Some(TOKEN), &step, "req-http-1").await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let failed = report(&master, 1).await;
    assert_eq!(failed.status, ReportStatus::Failed);
    let error = failed.error.unwrap();
    assert!(error.retryable, "{error:?}");
    assert_eq!(error.kind.as_deref(), Some("agent_unavailable"));
    assert_eq!(error.message, "agent answered 503: warming up");

    let mut retry = step.clone();
    retry.attempt = 2;
    worker.post_work_as(Some(TOKEN), &retry, "req-http-2").await;
    let done = report(&master, 2).await;
    assert_eq!(done.status, ReportStatus::Succeeded);
    assert_eq!(done.attempt, 2);
    assert_eq!(
        done.output,
        Some(json!({"echo": {"question": "why is the sky blue?"}}))
    );

    let calls = agent.calls();
    assert_eq!(calls.len(), 2);
    for (call, attempt, request_id) in [(&calls[0], 1, "req-http-1"), (&calls[1], 2, "req-http-2")]
    {
        assert_eq!(call.header("content-type"), "application/json");
        for accepted in [
            "application/json",
            "text/event-stream",
            "application/x-ndjson",
        ] {
            assert!(
                call.header("accept").contains(accepted),
                "{}",
                call.header("accept")
            );
        }
        assert_eq!(call.header("x-request-id"), request_id);
        assert_eq!(call.header("x-ensemble-task-id"), step.task_id.as_str());
        assert_eq!(call.header("x-ensemble-step"), "2");
        assert_eq!(call.header("x-ensemble-step-id"), "look-up");
        assert_eq!(call.header("x-ensemble-attempt"), attempt.to_string());
        assert_eq!(call.header("x-ensemble-capability"), "research");
        assert_eq!(
            call.header("x-ensemble-deadline-ms"),
            step.deadline_ms.to_string()
        );
        let left: u64 = call.header("x-ensemble-timeout-ms").parse().unwrap();
        assert!(left > 0 && left <= 30_000, "{left}");
        assert_eq!(
            call.header("idempotency-key"),
            format!("{}/2", step.task_id),
            "the same for every attempt of the step"
        );
        assert_eq!(
            call.body,
            json!({
                "task_id": step.task_id,
                "step": 2,
                "step_id": "look-up",
                "attempt": attempt,
                "capability": "research",
                "input": step.input,
                "context": step.context,
                "deadline_ms": step.deadline_ms,
                "request_id": request_id,
            })
        );
    }
    worker.stop().await.unwrap();
}

/// What a case expects in the report.
enum Expect {
    Output(Value),
    /// Retryable, kind, and a part of the message.
    Failure(bool, &'static str, &'static str),
}

#[tokio::test]
async fn each_kind_of_answer_becomes_an_output_or_the_right_failure() {
    let sse = "text/event-stream";
    let ndjson = "application/x-ndjson";
    let chunks = |cs: &[&str]| cs.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    // The worker's BODY_LIMIT_BYTES is 4096 here.
    let big = json!("x".repeat(10_000)).to_string().into_bytes();
    let big_stream: Vec<String> = (0..10)
        .map(|i| format!("{{\"line\": {i}, \"pad\": \"{}\"}}\n", "y".repeat(900)))
        .collect();
    let cases: Vec<(&str, Answer, Expect)> = vec![
        (
            "ht-json",
            json_answer(200, json!({"a": [1, 2]})),
            Expect::Output(json!({"a": [1, 2]})),
        ),
        (
            "ht-problem-json",
            Answer::Raw(StatusCode::OK, "application/vnd.x+json", b"[true]".to_vec()),
            Expect::Output(json!([true])),
        ),
        (
            "ht-text",
            Answer::Raw(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                b"plain answer".to_vec(),
            ),
            Expect::Output(json!("plain answer")),
        ),
        (
            "ht-no-content",
            Answer::Raw(StatusCode::NO_CONTENT, "", Vec::new()),
            Expect::Output(Value::Null),
        ),
        (
            "ht-empty-json",
            Answer::Raw(StatusCode::OK, "application/json", Vec::new()),
            Expect::Output(Value::Null),
        ),
        (
            "ht-fastapi-422",
            json_answer(422, json!({"detail": "input must name a city"})),
            Expect::Failure(
                false,
                "agent_rejected",
                "agent answered 422: input must name a city",
            ),
        ),
        (
            "ht-429",
            json_answer(429, json!({"error": {"message": "slow down"}})),
            Expect::Failure(true, "agent_unavailable", "agent answered 429: slow down"),
        ),
        (
            "ht-bad-json",
            Answer::Raw(StatusCode::OK, "application/json", b"{not json".to_vec()),
            Expect::Failure(false, "agent_bad_output", "does not parse"),
        ),
        (
            "ht-too-large",
            Answer::Raw(StatusCode::OK, "application/json", big),
            Expect::Failure(
                false,
                "agent_output_too_large",
                "BODY_LIMIT_BYTES (4096 bytes)",
            ),
        ),
        (
            "ht-too-large-stream",
            Answer::Stream(ndjson, big_stream, false),
            Expect::Failure(false, "agent_output_too_large", "BODY_LIMIT_BYTES"),
        ),
        (
            "ht-redirect",
            Answer::Raw(StatusCode::FOUND, "", Vec::new()),
            Expect::Failure(
                false,
                "agent_rejected",
                "agent answered 302 (a redirect to `/elsewhere`)",
            ),
        ),
        (
            "ht-sse",
            Answer::Stream(
                sse,
                chunks(&[
                    ": keep-alive\n\n",
                    "data: {\"token\": \"Par\"}\n\n",
                    "event: message\ndata: {\"tok",
                    "en\": \"is\"}\n\n",
                    "data: {\"answer\": \"Paris\"}\r\n\r\n",
                    "data: [DONE]\n\n",
                ]),
                false,
            ),
            Expect::Output(json!({"answer": "Paris"})),
        ),
        (
            "ht-sse-error",
            Answer::Stream(
                sse,
                chunks(&[
                    "data: 1\n\n",
                    "event: error\ndata: {\"message\": \"quota exhausted\", \"retryable\": true}\n\n",
                ]),
                false,
            ),
            Expect::Failure(
                true,
                "agent_error",
                "the agent reported an error: quota exhausted",
            ),
        ),
        (
            "ht-ndjson",
            Answer::Stream(
                ndjson,
                chunks(&[
                    "{\"step\": 1}\n{\"st",
                    "ep\": 2}\n\n",
                    "{\"final\": true}\n",
                ]),
                false,
            ),
            Expect::Output(json!({"final": true})),
        ),
        (
            "ht-cut-off",
            Answer::Stream(sse, chunks(&["data: {\"token\": \"a\"}\n\n"]), true),
            Expect::Failure(true, "agent_unavailable", "broke off its answer"),
        ),
        (
            "ht-empty-stream",
            Answer::Stream(
                sse,
                chunks(&[": keep-alive\n\n", "data: [DONE]\n\n"]),
                false,
            ),
            Expect::Failure(true, "agent_empty_stream", "without a message"),
        ),
    ];

    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let agent = FakeAgent::start(true).await;
    let caps: Vec<&str> = cases.iter().map(|(cap, ..)| *cap).collect();
    let mut config = http_config(&redis, &master, &agent, &caps);
    config.body_limit_bytes = 4096;
    let worker = spawn_worker(&redis, config, Agents::new()).await;
    wait_available(&redis, &worker).await;

    for (n, (cap, answer, expect)) in cases.into_iter().enumerate() {
        agent.answer(answer);
        let step = work_request(cap, json!(n));
        let r = worker.post_work(&step).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED, "{cap}");
        let report = report(&master, n + 1).await;
        assert_eq!(report.task_id, step.task_id, "{cap}");
        match expect {
            Expect::Output(output) => {
                assert_eq!(
                    report.status,
                    ReportStatus::Succeeded,
                    "{cap}: {:?}",
                    report.error
                );
                // A `null` output travels as an absent one.
                assert_eq!(report.output.unwrap_or(Value::Null), output, "{cap}");
            }
            Expect::Failure(retryable, kind, message) => {
                let error: StepError = report.error.unwrap_or_else(|| panic!("{cap} should fail"));
                assert_eq!(error.retryable, retryable, "{cap}: {error:?}");
                assert_eq!(error.kind.as_deref(), Some(kind), "{cap}: {error:?}");
                assert!(error.message.contains(message), "{cap}: {error:?}");
            }
        }
    }

    // Every message before the last is partial output, counted by the default hook.
    let metrics = worker
        .client
        .get(format!("{}/metrics", worker.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let partials = |cap: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "ensemble_worker_agent_partials_total{{capability=\"{cap}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(String::from)
    };
    assert_eq!(partials("ht-sse").as_deref(), Some("2"), "{metrics}");
    assert_eq!(partials("ht-ndjson").as_deref(), Some("2"), "{metrics}");
    assert_eq!(partials("ht-json"), None, "a whole answer has no partials");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_refused_connection_and_a_slow_agent_are_retryable_failures() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let agent = FakeAgent::start(true).await;
    let mut config = http_config(&redis, &master, &agent, &["gone", "slow"]);
    // `gone` is served at a closed port, whose health is checked at the fake's; `slow` at
    // the fake, from `[agent_urls]`.
    config.agent_url = Some(format!("http://127.0.0.1:{}/step", testkit::free_port()));
    config.agent_health_url = Some(format!("{}/health", agent.base));
    config.agent_urls = BTreeMap::from([("slow".to_string(), agent.step_url())]);
    let worker = spawn_worker(&redis, config, Agents::new()).await;
    wait_available(&redis, &worker).await;

    worker.post_work(&work_request("gone", json!(1))).await;
    let error = report(&master, 1).await.error.unwrap();
    assert!(error.retryable, "{error:?}");
    assert_eq!(error.kind.as_deref(), Some("agent_unavailable"));
    assert!(error.message.contains("could not be reached"), "{error:?}");
    assert!(
        error.message.to_lowercase().contains("refused"),
        "{error:?}"
    );

    agent.answer(Answer::Slow(WAIT));
    let mut step = work_request("slow", json!(2));
    step.deadline_ms = now_ms() + 500;
    worker.post_work(&step).await;
    let error = report(&master, 2).await.error.unwrap();
    assert!(error.retryable, "{error:?}");
    assert_eq!(error.kind.as_deref(), Some("timeout"), "{error:?}");
    assert_eq!(agent.calls().len(), 1, "the slow agent was called");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn the_worker_takes_no_new_steps_while_its_agent_fails_health_checks() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    // Down from the start: the worker registers as unavailable.
    let agent = FakeAgent::start(false).await;
    let health_url = format!("{}/health", agent.base);
    let worker = spawn_worker(
        &redis,
        http_config(&redis, &master, &agent, &["answer"]),
        Agents::new(),
    )
    .await;
    let record = redis.record(&worker.id).await.unwrap();
    let reason = record
        .unavailable
        .expect("unavailable until a check passes");
    assert!(reason.contains(&health_url), "{reason}");
    let refused = worker.post_work(&work_request("answer", json!(0))).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);

    agent.set_healthy(true);
    wait_available(&redis, &worker).await;
    assert_eq!(ready(&worker).await.0, StatusCode::OK);

    // A step held while the agent goes down is finished and reported all the same.
    agent.answer(Answer::Held);
    let held = work_request("answer", json!("held"));
    assert_eq!(worker.post_work(&held).await.status(), StatusCode::ACCEPTED);
    agent.wait_for_calls(1).await;
    agent.set_healthy(false);
    let record = redis
        .wait_for_record(&worker.id, |r| r.unavailable.is_some())
        .await;
    let reason = record.unavailable.unwrap();
    assert_eq!(
        reason,
        format!("the agent's health check at {health_url} failed: answered 503")
    );
    assert_eq!(
        record.in_flight,
        vec![held.step_ref()],
        "its lease is still listed"
    );
    assert_takes_no_new_work(&worker, "answer", "agent_unavailable", &reason).await;
    assert_eq!(
        worker.post_work(&held).await.status(),
        StatusCode::ACCEPTED,
        "a step it holds is still acknowledged"
    );
    agent.release();
    let done = report(&master, 1).await;
    assert_eq!(done.task_id, held.task_id);
    assert_eq!(done.output, Some(json!({"held": true})));

    agent.set_healthy(true);
    wait_available(&redis, &worker).await;
    assert_eq!(ready(&worker).await.0, StatusCode::OK);
    let step = work_request("answer", json!("back"));
    assert_eq!(worker.post_work(&step).await.status(), StatusCode::ACCEPTED);
    assert_eq!(
        report(&master, 2).await.output,
        Some(json!({"echo": "back"}))
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn an_http_capability_without_a_url_stops_the_worker_at_start_naming_agent_url() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let mut config = test_config(&redis, &master);
    config.capabilities = vec!["plan".into(), "search".into()];
    config.agents = BTreeMap::from([("search".to_string(), AgentKind::Http)]);
    config.agent_kind = AgentKind::Llm;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = worker::serve(config, listener, Default::default())
        .await
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("AGENT_URL"), "{err}");
    assert!(err.contains("search"), "{err}");
}

//! Traces across services: gateway (in front of a fake Gemini), master and an `llm` worker
//! run as processes exporting OTLP/HTTP JSON to a receiver inside this test. One task,
//! submitted with a client `traceparent`, must come back as one trace whose spans nest
//! client → master submit → step attempt → worker `/work` → agent → gateway request →
//! model call (→ the Gemini request), with the result's delivery under the attempt, every
//! span carrying its coordinates and none the task's contents.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::config::Secret;
use llm_gateway::config::ProviderKind;
use serde_json::{Value, json};
use testkit::fakes::gemini::{FakeGemini, GEMINI_KEY};
use testkit::system::{Binaries, Store, System};

use crate::helpers::*;

const API_KEY: &str = "traces-client-key-0123456789";
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// In the task's input; no exported byte may contain it.
const SECRET_INPUT: &str = "the-secret-input-7d1f0c";
/// The fake model's answer, the step's output; no exported byte may contain it either.
const MODEL_ANSWER: &str = "the-model-answer-51be3a";

/// One exported span, from the OTLP JSON encoding.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

impl Exported {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// What the receiver got: every body as received, and the spans in them.
#[derive(Default)]
struct Received {
    bodies: Vec<String>,
    spans: Vec<Exported>,
}

/// `POST /v1/traces`: keeps the body and its spans.
async fn receive(State(received): State<Arc<Mutex<Received>>>, body: Bytes) -> &'static str {
    let text = String::from_utf8_lossy(&body).into_owned();
    let spans = parse_spans(&text);
    let mut received = received.lock().unwrap();
    received.bodies.push(text);
    received.spans.extend(spans);
    "{}"
}

/// An OTLP `AnyValue` as text (strings as they are, numbers and booleans as JSON).
fn any_value(value: &Value) -> String {
    let Some((_, inner)) = value.as_object().and_then(|o| o.iter().next()) else {
        return String::new();
    };
    match inner {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn parse_spans(body: &str) -> Vec<Exported> {
    let request: Value = serde_json::from_str(body).expect("an OTLP JSON export request");
    let mut spans = Vec::new();
    for resource in request["resourceSpans"].as_array().into_iter().flatten() {
        let service = resource["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .map(|a| any_value(&a["value"]))
            .unwrap_or_default();
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                let text = |key: &str| span[key].as_str().unwrap_or_default().to_lowercase();
                spans.push(Exported {
                    service: service.clone(),
                    name: span["name"].as_str().unwrap_or_default().to_string(),
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent: text("parentSpanId"),
                    attributes: span["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            let key = a["key"].as_str().unwrap_or_default().to_string();
                            (key, any_value(&a["value"]))
                        })
                        .collect(),
                });
            }
        }
    }
    spans
}

/// Starts the receiver on a free loopback port; returns its URL (the OTLP endpoint).
async fn start_receiver(received: Arc<Mutex<Received>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(received);
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// The one span of `service` named `name` in the client's trace.
fn one<'a>(spans: &'a [Exported], service: &str, name: &str) -> &'a Exported {
    let found: Vec<&Exported> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name && s.trace_id == CLIENT_TRACE)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {service} span named {name:?} in the client's trace; all spans: {spans:#?}"
    );
    found[0]
}

/// Asserts `child`'s parent is `parent`.
fn nests(child: &Exported, parent: &Exported) {
    assert_eq!(
        child.parent, parent.span_id,
        "{} ({}) is a child of {} ({})",
        child.name, child.service, parent.name, parent.service
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_task_is_one_trace_across_master_worker_gateway_and_provider() {
    let bins = tokio::task::spawn_blocking(service_binaries).await.unwrap();
    let received = Arc::new(Mutex::new(Received::default()));
    let endpoint = start_receiver(received.clone()).await;
    let gemini = FakeGemini::start().await;
    gemini.always(testkit::fakes::gemini::Reply::Sse(vec![
        testkit::fakes::gemini::chunk_json(MODEL_ANSWER, Some("STOP"), Some((3, 4))),
    ]));
    let gemini_url = gemini.url.clone();
    let system = System::builder()
        .store(Store::OwnRedis(Default::default()))
        .processes(Binaries::in_dir(bins))
        .masters(1)
        .workers(1)
        .api_key(API_KEY)
        .child_env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        // Export within a fraction of a second rather than the default 5 s.
        .child_env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .gateway_config(move |gateway| {
            gateway.llm_provider = ProviderKind::Gemini;
            gateway.gemini_api_key = Secret::new(GEMINI_KEY.to_string());
            gateway.gemini_base_url = gemini_url;
        })
        .worker_config(|_, worker| {
            worker.capabilities = vec!["evaluate".into()];
        })
        .start()
        .await
        .unwrap();
    let master = system.master_url().to_string();
    let http = reqwest::Client::new();

    let client_traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let submit = || async {
        let response = http
            .post(format!("{master}/task"))
            .bearer_auth(API_KEY)
            .header("traceparent", &client_traceparent)
            .json(&json!({"steps": ["evaluate"], "input": {"question": SECRET_INPUT}}))
            .send()
            .await
            .ok()?;
        // `404`/`422` until the worker has registered its capability.
        response.status().is_success().then_some(())?;
        response.json::<Value>().await.ok()
    };
    let submitted = testkit::eventually(Duration::from_secs(30), submit)
        .await
        .expect("the task is accepted once the worker is up");
    let task_id = submitted["task_id"]
        .as_str()
        .expect("a task id")
        .to_string();
    let result_url = format!("{master}/result/{task_id}?wait=5");
    let finished: Value = testkit::eventually(Duration::from_secs(60), || async {
        get_json::<Value>(&http, &result_url, API_KEY).await
    })
    .await
    .expect("the task finishes");
    assert_eq!(finished["status"], "succeeded", "{finished}");

    // Every span of the chain arrives (the exporters batch every 100 ms).
    let wanted = [
        ("master", "POST /task"),
        ("master", "task.submit"),
        ("master", "step.attempt"),
        ("worker", "POST /work"),
        ("worker", "step"),
        ("llm-gateway", "POST /v1/chat/completions"),
        ("llm-gateway", "model.call"),
        ("worker", "result.deliver"),
        ("master", "POST /result"),
    ];
    let spans = testkit::eventually(Duration::from_secs(30), || async {
        let spans = received.lock().unwrap().spans.clone();
        wanted
            .iter()
            .all(|(service, name)| {
                spans
                    .iter()
                    .any(|s| s.service == *service && s.name == *name && s.trace_id == CLIENT_TRACE)
            })
            .then_some(spans)
    })
    .await
    .unwrap_or_else(|| {
        let spans = received.lock().unwrap().spans.clone();
        panic!("not every span arrived; got {spans:#?}")
    });
    system.stop().await;

    // One trace: every span about the task is in the client's.
    for span in spans.iter().filter(|s| s.attr("task_id") == Some(&task_id)) {
        assert_eq!(span.trace_id, CLIENT_TRACE, "{span:?}");
    }

    // The chain, parent by parent.
    let submit_request = one(&spans, "master", "POST /task");
    assert_eq!(
        submit_request.parent, CLIENT_SPAN,
        "the client's span is the root"
    );
    let submit = one(&spans, "master", "task.submit");
    nests(submit, submit_request);
    let attempt = one(&spans, "master", "step.attempt");
    nests(attempt, submit);
    let work = one(&spans, "worker", "POST /work");
    nests(work, attempt);
    let agent = one(&spans, "worker", "step");
    nests(agent, work);
    let gateway = one(&spans, "llm-gateway", "POST /v1/chat/completions");
    nests(gateway, agent);
    let model = one(&spans, "llm-gateway", "model.call");
    nests(model, gateway);
    let deliver = one(&spans, "worker", "result.deliver");
    nests(deliver, agent);
    let result = one(&spans, "master", "POST /result");
    nests(result, deliver);

    // The provider call went out with the model call's context.
    let upstream = gemini.requests();
    assert_eq!(upstream.len(), 1, "one Gemini call");
    assert_eq!(
        upstream[0].traceparent.as_deref(),
        Some(format!("00-{CLIENT_TRACE}-{}-01", model.span_id).as_str()),
        "the Gemini request carries the model call's traceparent"
    );

    // Coordinates on every span that has them.
    assert_eq!(submit.attr("task_id"), Some(task_id.as_str()));
    for span in [attempt, agent, deliver] {
        assert_eq!(span.attr("task_id"), Some(task_id.as_str()), "{span:?}");
        assert_eq!(span.attr("step"), Some("0"), "{span:?}");
        assert_eq!(span.attr("attempt"), Some("1"), "{span:?}");
    }
    for span in [attempt, agent] {
        assert_eq!(span.attr("capability"), Some("evaluate"), "{span:?}");
    }
    assert_eq!(model.attr("task_id"), Some(task_id.as_str()), "{model:?}");
    assert_eq!(model.attr("step"), Some("0"), "{model:?}");
    assert_eq!(model.attr("provider"), Some("gemini"), "{model:?}");

    // Never the contents: not the input, not the model's answer, anywhere in any export.
    let bodies = received.lock().unwrap().bodies.clone();
    assert!(!bodies.is_empty());
    for body in &bodies {
        assert!(
            !body.contains(SECRET_INPUT),
            "the input was exported:\n{body}"
        );
        assert!(
            !body.contains(MODEL_ANSWER),
            "the output was exported:\n{body}"
        );
    }
    // The step did see both, so their absence above means something.
    assert!(
        upstream[0].body.to_string().contains(SECRET_INPUT),
        "the prompt carried the input"
    );
    assert!(finished.to_string().contains(MODEL_ANSWER), "{finished}");
}

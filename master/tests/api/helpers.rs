//! Test helpers: start a master on a free port, and test workers that speak the worker
//! protocol (registry heartbeat, `POST /work`, `POST {master}/result`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use common::redis::{RedisPool, RedisSettings};
use common::registry::Registry;
use common::wire::{
    Capability, ReportStatus, ResultReport, StepError, StepRef, TaskView, WorkRequest, WorkerId,
    WorkerRecord,
};
use master::Config;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const WORKER_TOKEN: &str = "worker-token-123";
pub const ALICE: &str = "alice-key-123456";
pub const BOB: &str = "bob-key-1234567";
pub const OPERATOR: &str = "ops-key-12345678";

/// Settings for tests: short leases and backoffs, real credentials.
pub fn test_config(redis: &RedisSettings) -> Config {
    Config {
        host: "127.0.0.1".into(),
        port: 0,
        redis: redis.clone(),
        api_keys: common::config::Secret::new(format!("alice:{ALICE},bob:{BOB}")),
        operator_api_keys: common::config::Secret::new(format!("ops:{OPERATOR}")),
        worker_token: common::config::Secret::new(WORKER_TOKEN),
        lease_ms: 1_500,
        // The test workers below beat every 300 ms.
        worker_heartbeat_ms: 300,
        retry_base_ms: 50,
        retry_max_ms: 200,
        dispatch_poll_ms: 20,
        metrics_interval_ms: 200,
        dispatch_timeout_ms: 2_000,
        rate_limit_per_sec: 0.0,
        ..Config::default()
    }
}

/// A master running in this process.
pub struct TestMaster {
    pub url: String,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub http: reqwest::Client,
}

impl TestMaster {
    pub async fn start(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(master::serve(config, listener, shutdown.clone()));
        let master = Self {
            url: format!("http://{addr}"),
            shutdown,
            handle,
            http: reqwest::Client::new(),
        };
        master.wait_healthy().await;
        master
    }

    async fn wait_healthy(&self) {
        for _ in 0..200 {
            if let Ok(r) = self.http.get(format!("{}/health", self.url)).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("master did not come up");
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.handle).await;
    }

    pub fn post(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
    }

    pub fn get(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(key)
    }

    /// Submits a task as alice and returns its id.
    pub async fn submit(&self, body: Value) -> String {
        let r = self.post("/task", ALICE).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        v["task_id"].as_str().unwrap().to_string()
    }

    /// Waits (long-poll) until the task finishes; returns its full view.
    pub async fn wait(&self, id: &str, within: Duration) -> TaskView {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let r = self
                .get(&format!("/result/{id}?wait=2"), ALICE)
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {id} not finished in {within:?}: {:?}",
                self.view(id).await
            );
        }
        self.view(id).await
    }

    /// `GET /queues` (operator): the row of one capability.
    pub async fn queue(&self, capability: &str) -> Value {
        let queues: Value = self
            .get("/queues", OPERATOR)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        queues["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["capability"] == capability)
            .unwrap_or_else(|| panic!("no queue row for {capability}: {queues}"))
            .clone()
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn view(&self, id: &str) -> TaskView {
        let r = self
            .get(&format!("/task/{id}"), ALICE)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }
}

/// What a test worker does with a step.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Reports `{"capability", "input", "previous": n, "worker"}` after `delay`.
    Succeed { delay: Duration },
    /// Reports a failure.
    Fail { retryable: bool },
    /// Accepts and never reports.
    Hang,
    /// Answers 429 to everything.
    Busy,
    /// Answers `400` to a step whose input has `"poison": true` (as a worker answers a step
    /// it cannot parse); succeeds with the others like `Succeed` after `delay`.
    RefusePoison { delay: Duration },
}

/// Steps a worker received: (task, step, attempt).
pub type Received = Arc<Mutex<Vec<StepRef>>>;

struct WorkerState {
    id: WorkerId,
    behavior: Behavior,
    master_url: String,
    received: Received,
    in_flight: Arc<Mutex<Vec<StepRef>>>,
    http: reqwest::Client,
}

/// A protocol-following worker for tests.
pub struct TestWorker {
    pub received: Received,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TestWorker {
    /// Starts a worker serving `caps`, registered in `redis`, reporting to `master_url`.
    pub async fn start(
        name: &str,
        caps: &[&str],
        max: u32,
        behavior: Behavior,
        redis: &RedisSettings,
        master_url: &str,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let id = WorkerId::new(name).unwrap();
        let received: Received = Arc::default();
        let in_flight: Arc<Mutex<Vec<StepRef>>> = Arc::default();
        let state = Arc::new(WorkerState {
            id: id.clone(),
            behavior,
            master_url: master_url.to_string(),
            received: received.clone(),
            in_flight: in_flight.clone(),
            http: reqwest::Client::new(),
        });
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/work", post(work))
            .with_state(state.clone());
        let server_stop = stop.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(server_stop.cancelled_owned())
                .await;
        });
        let registry = Registry::new(RedisPool::new(redis).unwrap());
        let record = WorkerRecord {
            id: id.clone(),
            url: format!("http://{addr}"),
            capabilities: caps.iter().map(|c| Capability::new(*c).unwrap()).collect(),
            max_concurrency: max,
            in_flight: vec![],
            version: "test".into(),
            started_at_ms: common::wire::now_ms(),
            draining: false,
            heartbeat_at_ms: 0,
            degraded: None,
        };
        registry
            .heartbeat(&record, Duration::from_millis(900))
            .await
            .unwrap();
        let beat_stop = stop.clone();
        let heartbeat = tokio::spawn(async move {
            let mut record = record;
            loop {
                record.in_flight = in_flight.lock().unwrap().clone();
                let _ = registry
                    .heartbeat(&record, Duration::from_millis(900))
                    .await;
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(300)) => {}
                    () = beat_stop.cancelled() => return,
                }
            }
        });
        Self {
            received,
            stop,
            tasks: vec![server, heartbeat],
        }
    }

    /// Dies at once: no more heartbeats, no reports, connections refused.
    pub fn kill(&mut self) {
        self.stop.cancel();
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    pub fn received(&self) -> Vec<StepRef> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn work(
    State(state): State<Arc<WorkerState>>,
    headers: HeaderMap,
    Json(step): Json<WorkRequest>,
) -> StatusCode {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if token != format!("Bearer {WORKER_TOKEN}") {
        return StatusCode::UNAUTHORIZED;
    }
    state.received.lock().unwrap().push(step.step_ref());
    if matches!(state.behavior, Behavior::Busy) {
        return StatusCode::TOO_MANY_REQUESTS;
    }
    if matches!(state.behavior, Behavior::RefusePoison { .. }) && step.input["poison"] == true {
        return StatusCode::BAD_REQUEST;
    }
    state.in_flight.lock().unwrap().push(step.step_ref());
    let st = state.clone();
    tokio::spawn(async move {
        let report = match &st.behavior {
            Behavior::Succeed { delay } | Behavior::RefusePoison { delay } => {
                tokio::time::sleep(*delay).await;
                Some(report(
                    &st.id,
                    &step,
                    Ok(json!({
                        "capability": step.capability,
                        "input": step.input,
                        "previous": step.context.previous.len(),
                        "task_input": step.context.task_input,
                        "worker": st.id,
                    })),
                ))
            }
            Behavior::Fail { retryable } => Some(report(
                &st.id,
                &step,
                Err(StepError {
                    message: "test failure".into(),
                    retryable: *retryable,
                    kind: Some("test".into()),
                }),
            )),
            Behavior::Hang | Behavior::Busy => None,
        };
        if let Some(report) = report {
            deliver(&st, &report).await;
            st.in_flight
                .lock()
                .unwrap()
                .retain(|s| *s != step.step_ref());
        }
    });
    StatusCode::ACCEPTED
}

pub fn report(
    worker: &WorkerId,
    step: &WorkRequest,
    out: Result<Value, StepError>,
) -> ResultReport {
    let (status, output, error) = match out {
        Ok(v) => (ReportStatus::Succeeded, Some(v), None),
        Err(e) => (ReportStatus::Failed, None, Some(e)),
    };
    ResultReport {
        task_id: step.task_id.clone(),
        step: step.step,
        attempt: step.attempt,
        worker_id: worker.clone(),
        status,
        output,
        error,
        duration_ms: Some(1),
    }
}

async fn deliver(st: &WorkerState, report: &ResultReport) {
    for _ in 0..200 {
        let sent = st
            .http
            .post(format!("{}/result", st.master_url))
            .bearer_auth(WORKER_TOKEN)
            .json(report)
            .send()
            .await;
        if let Ok(r) = sent
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Four workers for the default pipeline.
pub async fn default_workers(redis: &RedisSettings, master_url: &str) -> Vec<TestWorker> {
    let mut out = Vec::new();
    for cap in ["plan", "retrieve", "evaluate", "finalize"] {
        out.push(
            TestWorker::start(
                &format!("w-{cap}"),
                &[cap],
                4,
                Behavior::Succeed {
                    delay: Duration::from_millis(5),
                },
                redis,
                master_url,
            )
            .await,
        );
    }
    out
}

/// Counts duplicates in a list of received steps.
pub fn duplicates(steps: &[StepRef]) -> usize {
    let mut seen: HashMap<&StepRef, usize> = HashMap::new();
    for s in steps {
        *seen.entry(s).or_default() += 1;
    }
    seen.values().filter(|n| **n > 1).count()
}

//! Test harness: a worker started in-process on port 0 (or the real binary), a fake master
//! that records `POST /result` and can be stopped and restarted on its port, a fake
//! llm-gateway speaking OpenAI's chat-completions shape, and agents whose timing the test
//! controls.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::config::Secret;
use common::redis::{RedisPool, RedisSettings};
use common::registry::Registry;
use testkit::{RedisServer, eventually};
use common::wire::{
    Capability, ResultReport, StepContext, StepError, TaskId, WorkRequest, WorkerRecord, now_ms,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use worker::{Agent, AgentKind, Agents, Config};

/// The worker token every test worker uses.
pub const TOKEN: &str = "test-worker-token";
/// The gateway token the `llm` tests configure.
pub const GATEWAY_TOKEN: &str = "test-gateway-token";
/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(15);

/// A Redis for one test, with its own key prefix.
pub struct TestRedis {
    pub server: RedisServer,
    pub settings: RedisSettings,
    pub registry: Registry,
}

impl TestRedis {
    pub fn start() -> Self {
        let server = RedisServer::start();
        let settings = server.settings();
        let registry = Registry::new(RedisPool::new(&settings).expect("pool"));
        Self {
            server,
            settings,
            registry,
        }
    }

    /// A worker's live record, if any.
    pub async fn record(&self, id: &str) -> Option<WorkerRecord> {
        self.registry
            .live()
            .await
            .ok()?
            .into_iter()
            .find(|r| r.id.as_str() == id)
    }

    /// Waits for a record that satisfies `check`.
    pub async fn wait_for_record(
        &self,
        id: &str,
        check: impl Fn(&WorkerRecord) -> bool,
    ) -> WorkerRecord {
        eventually(WAIT, || async {
            self.record(id).await.filter(|r| check(r))
        })
        .await
        .unwrap_or_else(|| panic!("worker {id} never had the expected record"))
    }

    /// Waits for a worker's record to disappear.
    pub async fn wait_gone(&self, id: &str) {
        eventually(WAIT, || async {
            (self.registry.live().await.ok()?)
                .iter()
                .all(|r| r.id.as_str() != id)
                .then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("worker {id} is still registered"));
    }
}

/// A unique worker id.
pub fn unique_id(prefix: &str) -> String {
    // The last 12 hex digits of a UUIDv7 are random.
    let uuid = TaskId::generate();
    format!("{prefix}-{}", &uuid.as_str()[24..])
}

/// A worker config for tests: loopback, port 0, echo for `echo`, a short heartbeat.
pub fn test_config(redis: &TestRedis, master: &FakeMaster) -> Config {
    Config {
        host: "127.0.0.1".into(),
        port: 0,
        redis: redis.settings.clone(),
        agent_id: Some(unique_id("w")),
        capabilities: vec!["echo".into()],
        master_url: master.url(),
        worker_token: Secret::new(TOKEN),
        agent_kind: AgentKind::Echo,
        heartbeat_interval_ms: 100,
        shutdown_grace_ms: 10_000,
        result_delivery_timeout_ms: 30_000,
        ..Config::default()
    }
}

/// A worker started in-process.
pub struct TestWorker {
    /// Its bound address, `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its id.
    pub id: String,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Starts a worker and waits for its first heartbeat.
pub async fn spawn_worker(redis: &TestRedis, config: Config, agents: Agents) -> TestWorker {
    let id = config.agent_id.clone().expect("tests set AGENT_ID");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker::serve_with_agents(
        config,
        listener,
        shutdown.clone(),
        agents,
    ));
    redis.wait_for_record(&id, |_| true).await;
    TestWorker {
        url,
        id,
        client: reqwest::Client::new(),
        shutdown,
        task,
    }
}

impl TestWorker {
    /// `POST /work` with the right token and a request id.
    pub async fn post_work(&self, step: &WorkRequest) -> reqwest::Response {
        self.post_work_as(Some(TOKEN), step, "req-test").await
    }

    /// `POST /work` with a chosen token and request id.
    pub async fn post_work_as(
        &self,
        token: Option<&str>,
        step: &WorkRequest,
        request_id: &str,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}/work", self.url))
            .header("x-request-id", request_id)
            .json(step);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("POST /work")
    }

    /// Cancels it and waits for the drain to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the worker did not stop in time")
            .expect("the worker task panicked")
    }
}

/// A step for `capability`, due in 30 s.
pub fn work_request(capability: &str, input: Value) -> WorkRequest {
    WorkRequest {
        task_id: TaskId::generate(),
        step: 0,
        attempt: 1,
        capability: Capability::new(capability).expect("capability"),
        input: input.clone(),
        context: StepContext {
            task_input: input,
            previous: Vec::new(),
            pipeline: None,
            total_steps: 1,
        },
        deadline_ms: now_ms() + 30_000,
    }
}

/// One request a fake received: its JSON body and the headers the worker must send.
#[derive(Clone, Debug)]
pub struct Received<T> {
    pub body: T,
    pub authorization: Option<String>,
    pub request_id: Option<String>,
}

impl<T> Received<T> {
    fn new(headers: &HeaderMap, body: T) -> Self {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        Self {
            body,
            authorization: header("authorization"),
            request_id: header("x-request-id"),
        }
    }
}

/// Answers a fake gives before its default one: status and body, in order.
#[derive(Default)]
struct Script(Mutex<VecDeque<(StatusCode, Value)>>);

impl Script {
    fn extend(&self, answers: impl IntoIterator<Item = (StatusCode, Value)>) {
        self.0.lock().unwrap().extend(answers);
    }

    fn next_or(&self, default: impl FnOnce() -> (StatusCode, Value)) -> (StatusCode, Value) {
        self.0.lock().unwrap().pop_front().unwrap_or_else(default)
    }
}

#[derive(Default)]
struct MasterState {
    /// Accepted reports.
    reports: Mutex<Vec<Received<ResultReport>>>,
    /// Every POST, answered or not.
    attempts: AtomicUsize,
    /// Answers to give before the default `200 recorded`.
    script: Script,
}

/// A fake master: records `POST /result` and answers `GET /health`; can answer results
/// from a script; can be stopped and restarted on the same port.
pub struct FakeMaster {
    addr: SocketAddr,
    state: Arc<MasterState>,
    running: Option<(CancellationToken, JoinHandle<()>)>,
}

impl FakeMaster {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut master = Self {
            addr: listener.local_addr().expect("addr"),
            state: Arc::default(),
            running: None,
        };
        master.serve(listener);
        master
    }

    fn serve(&mut self, listener: TcpListener) {
        async fn result(
            State(state): State<Arc<MasterState>>,
            headers: HeaderMap,
            Json(report): Json<ResultReport>,
        ) -> Response {
            state.attempts.fetch_add(1, Ordering::SeqCst);
            let (status, body) = state
                .script
                .next_or(|| (StatusCode::OK, json!({"status": "recorded"})));
            if status.is_success() {
                let received = Received::new(&headers, report);
                state.reports.lock().unwrap().push(received);
            }
            let mut response = (status, Json(body)).into_response();
            if status == StatusCode::SERVICE_UNAVAILABLE {
                response
                    .headers_mut()
                    .insert("retry-after", "1".parse().unwrap());
            }
            response
        }
        // `/health` is what a degraded worker probes to learn that the master is back.
        let app = Router::new()
            .route("/result", post(result))
            .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
            .with_state(self.state.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
            }
        });
        self.running = Some((stop, task));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening and closes every connection.
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            stop.cancel();
            tokio::time::timeout(WAIT, task)
                .await
                .expect("fake master did not stop")
                .expect("fake master panicked");
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = eventually(WAIT, || async { TcpListener::bind(self.addr).await.ok() })
            .await
            .expect("could not bind the fake master's port again");
        self.serve(listener);
    }

    /// Answers the next POSTs with these statuses and bodies, then `200 recorded`.
    pub fn script(&self, answers: impl IntoIterator<Item = (StatusCode, Value)>) {
        self.state.script.extend(answers);
    }

    /// Every POST so far.
    pub fn attempts(&self) -> usize {
        self.state.attempts.load(Ordering::SeqCst)
    }

    /// The accepted reports so far.
    pub fn reports(&self) -> Vec<Received<ResultReport>> {
        self.state.reports.lock().unwrap().clone()
    }

    /// Waits for `n` accepted reports.
    pub async fn wait_for_reports(&self, n: usize) -> Vec<Received<ResultReport>> {
        eventually(WAIT, || async {
            let reports = self.reports();
            (reports.len() >= n).then_some(reports)
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "expected {n} reports, got {:?} after {} attempts",
                self.reports(),
                self.attempts()
            )
        })
    }
}

/// One call the fake gateway received.
pub type GatewayCall = Received<Value>;

#[derive(Default)]
struct GatewayState {
    calls: Mutex<Vec<GatewayCall>>,
    script: Script,
    delay: Mutex<Duration>,
}

/// A fake llm-gateway: `POST /v1/chat/completions` in OpenAI's shape.
pub struct FakeGateway {
    addr: SocketAddr,
    state: Arc<GatewayState>,
    _task: JoinHandle<()>,
}

/// The completion the fake gateway answers with by default.
pub fn completion(text: &str) -> Value {
    json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "mock-model-1",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    })
}

impl FakeGateway {
    pub async fn start() -> Self {
        async fn chat(
            State(state): State<Arc<GatewayState>>,
            headers: HeaderMap,
            Json(body): Json<Value>,
        ) -> Response {
            let call = Received::new(&headers, body);
            state.calls.lock().unwrap().push(call);
            let delay = *state.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            let (status, body) = state
                .script
                .next_or(|| (StatusCode::OK, completion("mock answer")));
            (status, Json(body)).into_response()
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(GatewayState::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            state,
            _task: task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next calls with these statuses and bodies, then the default completion.
    pub fn script(&self, answers: impl IntoIterator<Item = (StatusCode, Value)>) {
        self.state.script.extend(answers);
    }

    /// Makes every answer take this long.
    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    pub fn calls(&self) -> Vec<GatewayCall> {
        self.state.calls.lock().unwrap().clone()
    }

    /// Waits for `n` calls.
    pub async fn wait_for_calls(&self, n: usize) -> Vec<GatewayCall> {
        eventually(WAIT, || async {
            let calls = self.calls();
            (calls.len() >= n).then_some(calls)
        })
        .await
        .unwrap_or_else(|| panic!("expected {n} gateway calls, got {:?}", self.calls()))
    }
}

/// An agent that holds each step until the test releases it.
pub struct GateAgent {
    permits: Semaphore,
    pub started: AtomicUsize,
}

impl GateAgent {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            permits: Semaphore::new(0),
            started: AtomicUsize::new(0),
        })
    }

    /// Lets `n` held steps finish.
    pub fn release(&self, n: usize) {
        self.permits.add_permits(n);
    }

    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }
}

#[worker::async_trait]
impl Agent for GateAgent {
    async fn handle(&self, step: &WorkRequest) -> Result<Value, StepError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.permits
            .acquire()
            .await
            .map_err(|_| StepError::permanent("test", "closed"))?
            .forget();
        Ok(json!({"done": step.input}))
    }
}

/// Starts a worker whose `slow` capability is served by a [`GateAgent`].
pub async fn spawn_gated(redis: &TestRedis, config: Config) -> (TestWorker, Arc<GateAgent>) {
    let gate = GateAgent::new();
    let agents = Agents::new().with(cap("slow"), gate.clone());
    (spawn_worker(redis, config, agents).await, gate)
}

/// An agent that always fails with a given error.
pub struct FailAgent(pub StepError);

#[worker::async_trait]
impl Agent for FailAgent {
    async fn handle(&self, _: &WorkRequest) -> Result<Value, StepError> {
        Err(self.0.clone())
    }
}

/// An agent that panics.
pub struct PanicAgent;

#[worker::async_trait]
impl Agent for PanicAgent {
    async fn handle(&self, _: &WorkRequest) -> Result<Value, StepError> {
        panic!("this agent always panics")
    }
}

/// A capability, for building `Agents` in tests.
pub fn cap(name: &str) -> Capability {
    Capability::new(name).expect("capability")
}

/// The real `worker` binary, run with a clean environment.
pub struct BinaryWorker {
    pub child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl BinaryWorker {
    pub fn spawn(env: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("worker.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_worker"))
            .env_clear()
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start the worker binary");
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal by name (`TERM`, `KILL`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for it to exit.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let child = &mut self.child;
        let status = eventually(WAIT, || {
            let status = child.try_wait().expect("try_wait");
            async move { status }
        })
        .await;
        status.unwrap_or_else(|| panic!("the worker did not exit; log:\n{}", self.log()))
    }
}

impl Drop for BinaryWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment for the binary: the test Redis, a master and a gateway.
pub fn binary_env(redis: &TestRedis, id: &str, master: &FakeMaster) -> Vec<(&'static str, String)> {
    let url = redis
        .settings
        .url
        .as_ref()
        .expect("url")
        .expose()
        .to_string();
    vec![
        ("REDIS_URL", url),
        ("REDIS_KEY_PREFIX", redis.settings.key_prefix.clone()),
        ("AGENT_ID", id.to_string()),
        ("HOST", "127.0.0.1".into()),
        ("PORT", "0".into()),
        ("MASTER_URL", master.url()),
        ("WORKER_TOKEN", TOKEN.into()),
        ("HEARTBEAT_INTERVAL_MS", "200".into()),
    ]
}

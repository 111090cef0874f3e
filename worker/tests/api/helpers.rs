//! Test harness: a worker started in-process on port 0 (or the real binary), the kit's fake
//! master and fake llm-gateway (`testkit::fakes`), and agents whose timing the test
//! controls.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::config::Secret;
use common::redis::{RedisPool, RedisSettings};
use common::registry::Registry;
use common::wire::{Capability, StepContext, StepError, TaskId, WorkRequest, WorkerRecord, now_ms};
use serde_json::{Value, json};
pub use testkit::fakes::{FakeGateway, FakeMaster};
use testkit::service::{Exit, Service};
use testkit::{RedisServer, eventually};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
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
    service: Service,
}

/// Starts a worker and waits for its first heartbeat.
pub async fn spawn_worker(redis: &TestRedis, config: Config, agents: Agents) -> TestWorker {
    let id = config.agent_id.clone().expect("tests set AGENT_ID");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let service = Service::in_process("worker", listener, |listener, stop| {
        worker::serve_with_agents(config, listener, stop, agents)
    })
    .expect("start the worker")
    .with_grace(WAIT);
    redis.wait_for_record(&id, |_| true).await;
    TestWorker {
        url: service.url().to_string(),
        id,
        client: reqwest::Client::new(),
        service,
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

    /// Cancels it and waits for the drain to finish; an error says how it ended otherwise.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        match self.service.stop().await {
            Exit::Clean => Ok(()),
            other => Err(anyhow::anyhow!("the worker ended {other:?}")),
        }
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
            step_id: None,
            element_index: None,
        },
        deadline_ms: now_ms() + 30_000,
        worker_id: None,
        request_id: None,
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
pub struct BinaryWorker(Service);

impl BinaryWorker {
    pub fn spawn(env: &[(&str, String)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
        command
            .env_clear()
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        // On port 0: where it listens is in its registry record.
        let service = Service::child("worker", "http://127.0.0.1:0", command, None)
            .expect("start the worker binary");
        Self(service)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self.0.log()
    }

    /// Sends a signal by name (`TERM`, `KILL`).
    pub fn signal(&self, name: &str) {
        self.0.signal(name).expect("send the signal");
    }

    /// Waits for it to exit.
    pub async fn wait_exit(&mut self) -> Exit {
        let exit = self.0.wait_exit(WAIT).await;
        exit.unwrap_or_else(|| panic!("the worker did not exit; log:\n{}", self.log()))
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

/// `GET /ready`: its status and body.
pub async fn ready(worker: &TestWorker) -> (reqwest::StatusCode, Value) {
    let r = worker
        .client
        .get(format!("{}/ready", worker.url))
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

/// Asserts that the worker is alive but takes no new step, for `reason` under `code`
/// (`degraded`, `agent_unavailable`): `/ready` answers `503` with that reason and message,
/// and a new step of `capability` gets `503`, `Retry-After: 1`, the code and the reason.
pub async fn assert_takes_no_new_work(
    worker: &TestWorker,
    capability: &str,
    code: &str,
    reason: &str,
) {
    let (status, body) = ready(worker).await;
    assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["reason"], code);
    assert_eq!(body["message"], json!(reason));
    let refused = worker
        .post_work(&work_request(capability, json!("new")))
        .await;
    assert_eq!(refused.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: common::http::ErrorBody = refused.json().await.unwrap();
    assert_eq!(body.error.code, code);
    assert!(
        body.error.message.contains(reason),
        "{}",
        body.error.message
    );
}

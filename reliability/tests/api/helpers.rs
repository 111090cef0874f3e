//! The harness: real `ensemble-node` master and worker processes around a real
//! `redis-server` (AOF on), a load balancer in front of the masters, a client that submits
//! and reads tasks the way a real one would (idempotency keys, retries), and the tally that
//! every scenario prints and asserts. The processes are the test kit's
//! (`testkit::System` with `ensemble-node` as the binaries): what is the scenarios' own is
//! here, what starts, signals and stops a service is the kit's.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::config::Secret;
use common::redis::RedisSettings;
use common::wire::{Capability, StepSpec, StepStatus, TaskStatus, TaskView};
use futures::StreamExt;
use master::config::PipelineConfig;
use serde_json::{Value, json};
use testkit::service::tail;
use testkit::{Binaries, DoneEvents, RedisServer, Service, Store, System, free_port};

use crate::proxy::Proxy;

pub use testkit::fakes::worker::WORKER_TOKEN;
pub const API_KEY: &str = "chaos-client-key-123456";
pub const OPERATOR_KEY: &str = "chaos-operator-key-123456";
/// Every master's lease: short, so a dead worker's steps come back within seconds.
pub const LEASE_MS: u64 = 1_500;
/// The masters' and workers' Redis timeouts (connect and per command), in ms.
pub const REDIS_TIMEOUT_MS: u64 = 1_000;

/// The scenarios share a 2-core machine: they run one at a time so that one scenario's
/// load cannot starve another's heartbeats. (A tokio mutex, because the guard is held
/// across awaits; each test has its own runtime, which a tokio mutex does not mind.)
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes the scenario lock (see [`SERIAL`]).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// `ENSEMBLE_SOAK=1`: longer, heavier variants.
pub fn soak() -> bool {
    std::env::var("ENSEMBLE_SOAK").is_ok_and(|v| v == "1")
}

/// Scales a count for soak runs.
pub fn scaled(n: usize) -> usize {
    if soak() { n * 5 } else { n }
}

// ---------------------------------------------------------------------------------------
// The cluster

/// How a scenario's cluster is built.
#[derive(Clone, Debug)]
pub struct Options {
    pub masters: usize,
    pub workers: usize,
    /// `MAX_CONCURRENCY` of each worker.
    pub worker_slots: u32,
    /// Who reaches Redis through a [`Proxy`] the test can black-hole.
    pub redis_via_proxy: Via,
    /// Workers' `SHUTDOWN_GRACE_MS`.
    pub shutdown_grace_ms: u64,
    /// The masters' `LEASE_MS`.
    pub lease_ms: u64,
    /// The workers' `HEARTBEAT_INTERVAL_MS` (and the masters' `WORKER_HEARTBEAT_MS`), in ms.
    pub heartbeat_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            masters: 2,
            workers: 3,
            worker_slots: 16,
            redis_via_proxy: Via::Nobody,
            shutdown_grace_ms: 15_000,
            lease_ms: LEASE_MS,
            heartbeat_ms: 300,
        }
    }
}

/// Which services reach Redis through the test's proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Nobody,
    Everyone,
    /// Only the workers: black-holing it partitions the workers from Redis while the
    /// masters still see it.
    Workers,
}

/// Pipelines every master knows: `chaos` runs two echo steps, the others one step each on
/// a misbehaving fake worker's capability (`testkit::fakes::worker`).
const PIPELINES: [(&str, &[&str]); 5] = [
    ("chaos", &["echo", "echo"]),
    ("silent", &["silent"]),
    ("garbage", &["garbage"]),
    ("twice", &["twice"]),
    ("late", &["late"]),
];

/// What the scenarios set on every master and worker, on top of the kit's wiring; kept to
/// configure replacement workers the same way.
#[derive(Clone, Debug)]
struct Settings {
    options: Options,
    /// What the masters and the workers reach Redis with (a proxy's URL, say).
    master_redis: RedisSettings,
    worker_redis: RedisSettings,
    /// The masters' load balancer, the workers' `MASTER_URL`.
    lb_url: String,
}

impl Settings {
    fn master(&self, config: &mut master::Config) {
        config.redis = self.master_redis.clone();
        config.api_keys = Secret::new(format!("chaos:{API_KEY}"));
        config.operator_api_keys = Secret::new(format!("ops:{OPERATOR_KEY}"));
        config.worker_token = Secret::new(WORKER_TOKEN.to_string());
        config.lease_ms = self.options.lease_ms;
        config.worker_heartbeat_ms = self.options.heartbeat_ms;
        config.retry_base_ms = 50;
        config.retry_max_ms = 500;
        // Under chaos a step may lose several attempts in a row to kills; the scenarios are
        // about losing nothing, not about the retry budget.
        config.max_attempts = 10;
        config.rate_limit_per_sec = 0.0;
        config.dispatch_poll_ms = 20;
        config.dispatch_timeout_ms = 2_000;
        config.metrics_interval_ms = 500;
        config.pipelines = PIPELINES
            .iter()
            .map(|(name, steps)| {
                let steps = steps
                    .iter()
                    .map(|s| StepSpec::Name(Capability::new(*s).expect("a capability")))
                    .collect();
                (name.to_string(), PipelineConfig { steps })
            })
            .collect();
    }

    /// Worker `i` (over the cluster's life) is `worker-{i}`: a fresh id, as a replacement
    /// ECS task gets.
    fn worker(&self, i: usize, config: &mut worker::Config) {
        config.redis = self.worker_redis.clone();
        config.agent_id = Some(format!("worker-{i}"));
        config.capabilities = vec!["echo".into()];
        config.agent_kind = worker::AgentKind::Echo;
        config.master_url = self.lb_url.clone();
        config.heartbeat_interval_ms = self.options.heartbeat_ms;
        config.max_concurrency = self.options.worker_slots;
        config.shutdown_grace_ms = self.options.shutdown_grace_ms;
        config.result_delivery_timeout_ms = 60_000;
    }
}

/// Redis, masters, workers (`ensemble-node` child processes of the kit's system), and the
/// load balancer in front of the masters.
pub struct Cluster {
    /// The masters and the workers. Declared first, so that they stop (SIGTERM, drain)
    /// while Redis and the proxies are still there.
    pub system: System,
    pub redis: RedisServer,
    /// Between the services and Redis, when [`Options::redis_via_proxy`].
    pub redis_proxy: Option<Proxy>,
    pub prefix: String,
    /// The masters' load balancer: what workers (`MASTER_URL`) and clients call.
    pub lb: Proxy,
    pub http: reqwest::Client,
    settings: Settings,
}

impl Cluster {
    pub async fn start(options: Options) -> Self {
        let redis = RedisServer::with_aof();
        let prefix = redis.settings().key_prefix;
        let redis_proxy = if options.redis_via_proxy != Via::Nobody {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], redis.port()));
            Some(Proxy::start(vec![addr]).await)
        } else {
            None
        };
        let master_ports: Vec<u16> = (0..options.masters).map(|_| free_port()).collect();
        let lb = Proxy::start(
            master_ports
                .iter()
                .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect(),
        )
        .await;
        // The URL a service uses for Redis (the proxy's, when it goes through one).
        let redis_of = |proxied: bool| {
            let url = match &redis_proxy {
                Some(p) if proxied => format!("redis://{}", p.addr()),
                _ => redis.url(),
            };
            RedisSettings {
                key_prefix: prefix.clone(),
                connect_timeout_ms: REDIS_TIMEOUT_MS,
                command_timeout_ms: REDIS_TIMEOUT_MS,
                ..RedisSettings::from_url(url)
            }
        };
        let settings = Settings {
            master_redis: redis_of(options.redis_via_proxy == Via::Everyone),
            worker_redis: redis_of(options.redis_via_proxy != Via::Nobody),
            lb_url: lb.url(),
            options: options.clone(),
        };
        // A port picked free can be taken by another test's process before a child binds
        // it ("Address already in use"): the cluster then starts again on other ports (the
        // workers'; the masters' stay, behind the balancer), a few times at most.
        let mut attempts = 0;
        let system = loop {
            attempts += 1;
            let (for_masters, for_workers) = (settings.clone(), settings.clone());
            let started = System::builder()
                .processes(Binaries::from_fn(|role| {
                    let mut node = std::process::Command::new(env!("CARGO_BIN_EXE_ensemble-node"));
                    node.arg(role.binary());
                    node
                }))
                .store(Store::Url(redis.url()))
                .gateway(false)
                .masters(options.masters)
                .master_ports(master_ports.clone())
                .workers(options.workers)
                .master_config(move |_, config| for_masters.master(config))
                .worker_config(move |i, config| for_workers.worker(i, config))
                .child_env("RUST_LOG", "info")
                .start()
                .await;
            match started {
                Ok(system) => break system,
                Err(e) if attempts < 3 && format!("{e:#}").contains("Address already in use") => {
                    eprintln!("the cluster did not start ({e:#}); starting it again");
                }
                Err(e) => panic!("the cluster starts: {e:?}"),
            }
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client");
        Self {
            system,
            redis,
            redis_proxy,
            prefix,
            lb,
            http,
            settings,
        }
    }

    /// Replaces `workers[i]` with a fresh worker (a new id) after `kill -9`.
    pub async fn kill_and_replace_worker(&mut self, i: usize) {
        let system = &mut self.system;
        system.workers[i].kill().await;
        system.workers.remove(i);
        system.worker_configs.remove(i);
        let settings = &self.settings;
        system
            .add_workers(1, |n, config| settings.worker(n, config))
            .await
            .expect("a replacement worker starts");
        let (fresh, config) = (system.workers.pop(), system.worker_configs.pop());
        system.workers.insert(i, fresh.expect("the new worker"));
        system
            .worker_configs
            .insert(i, config.expect("its configuration"));
    }

    /// The worker records in the registry now.
    pub async fn live_workers(&self) -> Vec<common::wire::WorkerRecord> {
        let mut settings = self.redis.settings();
        settings.key_prefix = self.prefix.clone();
        let pool = common::redis::RedisPool::new(&settings).expect("pool");
        common::registry::Registry::new(pool)
            .live()
            .await
            .unwrap_or_default()
    }

    /// A subscriber to this cluster's `done` events (straight to Redis, not via a proxy).
    pub async fn done_events(&self) -> DoneEvents {
        DoneEvents::subscribe(&self.redis.url(), &self.prefix).await
    }

    pub fn client(&self) -> Client {
        Client {
            http: self.http.clone(),
            base: self.lb.url(),
        }
    }

    /// A client pinned to one master, not the load balancer.
    pub fn client_of(&self, master: &Service) -> Client {
        Client {
            http: self.http.clone(),
            base: master.url().to_string(),
        }
    }

    /// Σ `ensemble_tasks_succeeded_total` over the masters that are still running.
    pub async fn succeeded_counter(&self) -> u64 {
        self.metric_sum(&self.system.masters, "ensemble_tasks_succeeded_total", "")
            .await
    }

    /// Σ of a metric's samples whose line contains `label` over some running services.
    pub async fn metric_sum(&self, services: &[Service], name: &str, label: &str) -> u64 {
        let mut sum = 0;
        for service in services {
            let text = match self
                .http
                .get(format!("{}/metrics", service.url()))
                .send()
                .await
            {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => panic!("{} has no /metrics: {e}", service.name()),
            };
            sum += metric(&text, name, label);
        }
        sum
    }

    /// The end of every process's log, for a failure message.
    pub fn logs_tail(&self) -> String {
        let services = self.system.masters.iter().chain(&self.system.workers);
        services
            .map(|s| format!("--- {} ---\n{}\n", s.name(), tail(&s.log())))
            .collect()
    }
}

/// Sums the samples of a Prometheus metric whose line contains `label` (`""`: all).
pub fn metric(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

// ---------------------------------------------------------------------------------------
// The client

/// A task the system accepted, with the input it was given.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub task_id: String,
    pub input: Value,
}

/// What one `POST /task` came to.
#[derive(Debug)]
pub enum Submit {
    /// `202` (new) or `200` (the idempotency key's existing task).
    Accepted(String),
    /// Any other status, with `Retry-After` if given.
    Refused(u16, Option<String>),
    /// No HTTP answer (connection refused or reset, timeout).
    NoAnswer(String),
}

impl Submit {
    pub fn describe(&self) -> String {
        match self {
            Self::Accepted(id) => format!("accepted as {id}"),
            Self::Refused(status, retry_after) => {
                format!("refused with {status}, Retry-After {retry_after:?}")
            }
            Self::NoAnswer(why) => format!("no answer: {why}"),
        }
    }
}

/// Talks to the masters like a real client.
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
}

/// A task input with a unique nonce, so that a result can be matched to its own task.
pub fn task_input(i: usize, delay_ms: u64) -> Value {
    json!({
        "nonce": uuid::Uuid::new_v4().to_string(),
        "i": i,
        "echo_delay_ms": delay_ms,
    })
}

impl Client {
    /// One `POST /task` of `pipeline` with the input's nonce as idempotency key.
    pub async fn submit_once(&self, pipeline: &str, input: &Value) -> Submit {
        let key = input["nonce"].as_str().unwrap_or_default().to_string();
        let sent = self
            .http
            .post(format!("{}/task", self.base))
            .bearer_auth(API_KEY)
            .header("idempotency-key", key)
            .json(&json!({"pipeline": pipeline, "input": input}))
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 202 || r.status() == 200 => {
                let body: Value = r.json().await.unwrap_or_default();
                match body["task_id"].as_str() {
                    Some(id) => Submit::Accepted(id.to_string()),
                    None => Submit::NoAnswer(format!("no task_id in {body}")),
                }
            }
            Ok(r) => Submit::Refused(
                r.status().as_u16(),
                r.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from),
            ),
            Err(e) => Submit::NoAnswer(e.to_string()),
        }
    }

    /// Submits with retries (same idempotency key) on `503`, `429` and no answer, for up
    /// to `within`. `None` when never accepted.
    pub async fn submit(&self, pipeline: &str, input: &Value, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        let mut backoff = Duration::from_millis(100);
        loop {
            let last = match self.submit_once(pipeline, input).await {
                Submit::Accepted(id) => return Some(id),
                Submit::Refused(status, _) if status != 503 && status != 429 => {
                    panic!("POST /task refused with {status}")
                }
                other => other,
            };
            if Instant::now() + backoff > deadline {
                eprintln!("never accepted within {within:?}: {}", last.describe());
                return None;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// [`Self::submit_all`] in the background, each task given up to a minute.
    pub fn spawn_submit_all(
        &self,
        pipeline: &'static str,
        inputs: Vec<Value>,
        concurrency: usize,
    ) -> tokio::task::JoinHandle<Vec<Accepted>> {
        let client = self.clone();
        tokio::spawn(async move {
            client
                .submit_all(pipeline, inputs, concurrency, Duration::from_secs(60))
                .await
        })
    }

    /// Submits many tasks, `concurrency` at a time; the accepted ones, in order.
    pub async fn submit_all(
        &self,
        pipeline: &str,
        inputs: Vec<Value>,
        concurrency: usize,
        within: Duration,
    ) -> Vec<Accepted> {
        futures::stream::iter(inputs)
            .map(|input| async move {
                let id = self.submit(pipeline, &input, within).await;
                id.map(|task_id| Accepted { task_id, input })
            })
            .buffered(concurrency)
            .filter_map(|a| async move { a })
            .collect()
            .await
    }

    /// `GET /task/{id}`, retried on no answer and 5xx for up to 10 s. `None` for 404.
    pub async fn view(&self, id: &str) -> Option<TaskView> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let sent = self
                .http
                .get(format!("{}/task/{id}", self.base))
                .bearer_auth(API_KEY)
                .send()
                .await;
            match sent {
                Ok(r) if r.status() == 200 => return Some(r.json().await.expect("a task view")),
                Ok(r) if r.status() == 404 => return None,
                Ok(r) if r.status().is_client_error() => {
                    panic!("GET /task/{id} answered {}", r.status())
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "GET /task/{id} kept failing for 10 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Counting

/// One scenario's figures.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Tasks answered `202` (or `200` for a repeated idempotency key), distinct.
    pub accepted: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Accepted tasks not finished (or not found) after the bounded wait.
    pub lost: usize,
    /// Tasks whose result was recorded more than once, or not as their own: see
    /// [`settle`].
    pub duplicates: usize,
    /// Σ over steps of (attempts − 1): steps run again after a kill, a lapse or a retry.
    pub reexecuted: u64,
    /// Finished tasks whose `done` event the subscriber never saw. Not in the line: pub/sub
    /// may drop messages while Redis is down, so only scenarios where Redis stays up
    /// assert it is 0 (every task finished exactly once in the record).
    pub unannounced: usize,
}

impl Tally {
    pub fn line(&self, name: &str) -> String {
        format!(
            "scenario {name}: accepted {}, succeeded {}, failed {}, lost {}, duplicate-results {}, re-executed {}",
            self.accepted, self.succeeded, self.failed, self.lost, self.duplicates, self.reexecuted
        )
    }

    /// Prints the line (stdout, for `cargo test -- --nocapture`), appends it to
    /// `$CARGO_TARGET_DIR/reliability-report.txt`, and asserts nothing was lost or
    /// recorded twice.
    pub fn report(&self, name: &str, context: &str) {
        let line = self.line(name);
        report_line(&line);
        assert_eq!(self.lost, 0, "{line}\n{context}");
        assert_eq!(self.duplicates, 0, "{line}\n{context}");
        assert_eq!(
            self.accepted,
            self.succeeded + self.failed,
            "{line}\n{context}"
        );
    }
}

/// Prints a line of the reliability report and appends it to
/// `$CARGO_TARGET_DIR/reliability-report.txt`, which CI prints.
pub fn report_line(line: &str) {
    println!("{line}");
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("reliability-report.txt"))
    {
        let _ = writeln!(f, "{line}");
    }
}

/// What a finished task should look like, checked by [`settle`].
pub type Expect = fn(&Accepted, &TaskView) -> Result<(), String>;

/// The echo pipelines' expectation: every step succeeded with the task's own input as
/// output, and that is the result.
pub fn echoed(task: &Accepted, view: &TaskView) -> Result<(), String> {
    if view.status != TaskStatus::Succeeded {
        return Ok(());
    }
    if view.input != task.input {
        return Err(format!("input is {} not {}", view.input, task.input));
    }
    if view.result.as_ref() != Some(&task.input) {
        return Err(format!("result is {:?}, not its own input", view.result));
    }
    for s in &view.steps {
        if s.status != StepStatus::Succeeded || s.output.as_ref() != Some(&task.input) {
            return Err(format!(
                "step {} is {:?} with output {:?}",
                s.index, s.status, s.output
            ));
        }
    }
    Ok(())
}

/// Waits up to `within` for every accepted task to finish, then counts.
///
/// `duplicate-results` counts tasks for which any of these holds:
/// - the store finished the task more than once (more than one `done:{id}` event);
/// - what was recorded is not that task's own outcome (`expect` fails: with echo agents,
///   a step output or the result that is not the task's own input, whose nonce is unique,
///   means another attempt's or another task's output overwrote it);
/// - and, when `counter` is given (the scenario killed no master, so every master's
///   counter lived through the run), Σ `ensemble_tasks_succeeded_total` over the masters
///   exceeds the number of distinct succeeded tasks by that many.
pub async fn settle(
    client: &Client,
    tasks: &[Accepted],
    done: &DoneEvents,
    within: Duration,
    expect: Expect,
) -> (Tally, Vec<String>) {
    let deadline = Instant::now() + within;
    let mut pending: Vec<&Accepted> = tasks.iter().collect();
    let mut views: HashMap<String, TaskView> = HashMap::new();
    // Tasks finish roughly in submission order: each round reads the pending ones in
    // order and stops at the first batch that has unfinished ones, so waiting costs a few
    // reads per round, not one per task.
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        let mut unfinished_seen = 0;
        for chunk in pending.chunks(32) {
            if unfinished_seen >= 8 {
                still.extend_from_slice(chunk);
                continue;
            }
            let read: Vec<Option<TaskView>> =
                futures::future::join_all(chunk.iter().map(|t| client.view(&t.task_id))).await;
            for (t, v) in chunk.iter().zip(read) {
                match v {
                    Some(v) if v.status.is_terminal() => {
                        views.insert(t.task_id.clone(), v);
                    }
                    _ => {
                        unfinished_seen += 1;
                        still.push(*t);
                    }
                }
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    // Let the last `done` events arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut tally = Tally {
        accepted: tasks
            .iter()
            .map(|t| t.task_id.as_str())
            .collect::<HashSet<_>>()
            .len(),
        ..Tally::default()
    };
    let mut problems = Vec::new();
    for t in tasks {
        let Some(v) = views.get(&t.task_id) else {
            tally.lost += 1;
            problems.push(format!("lost: {}", t.task_id));
            continue;
        };
        match v.status {
            TaskStatus::Succeeded => tally.succeeded += 1,
            _ => tally.failed += 1,
        }
        tally.reexecuted += v
            .steps
            .iter()
            .map(|s| u64::from(s.attempts.saturating_sub(1)))
            .sum::<u64>();
        let finished = done.count(&t.task_id);
        if finished == 0 {
            tally.unannounced += 1;
            problems.push(format!("no done event for {}", t.task_id));
        }
        let own = expect(t, v);
        if finished > 1 || own.is_err() {
            tally.duplicates += 1;
            problems.push(format!(
                "duplicate: {} finished {finished} times; {:?}",
                t.task_id, own
            ));
        }
    }
    (tally, problems)
}

/// Adds the masters' counter check to a tally (see [`settle`]); only when no master died.
/// `base` is the counters' sum before the tasks of this tally were submitted.
pub async fn check_counter(
    cluster: &Cluster,
    tally: &mut Tally,
    problems: &mut Vec<String>,
    base: u64,
) {
    // The counters are bumped just after the store answers; give them a moment.
    let mut counted = 0;
    for _ in 0..20 {
        counted = cluster.succeeded_counter().await.saturating_sub(base);
        if counted >= tally.succeeded as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let extra = counted.saturating_sub(tally.succeeded as u64);
    if extra > 0 {
        tally.duplicates += extra as usize;
        problems.push(format!(
            "the masters counted {counted} successes for {} succeeded tasks",
            tally.succeeded
        ));
    }
}

/// Which of the masters' records outlived the run, so which checks apply.
#[derive(Clone, Copy, Debug)]
pub struct Survivors {
    /// Every master lived through the run: check their success counters (see [`settle`]).
    pub masters: bool,
    /// Redis stayed up: every finished task's `done` event must have been seen once.
    pub redis: bool,
}

impl Survivors {
    /// Every master and Redis lived through the run.
    pub const ALL: Self = Self {
        masters: true,
        redis: true,
    };
    /// A master went away (its counter with it); Redis stayed up.
    pub const NOT_A_MASTER: Self = Self {
        masters: false,
        redis: true,
    };
    /// The masters lived; Redis went away for a while (its pub/sub messages with it).
    pub const NOT_REDIS: Self = Self {
        masters: true,
        redis: false,
    };
}

/// Ends a scenario on the echo pipelines: waits for the tasks (bounded by `within`),
/// counts, prints and records the line, and asserts (with `expected` tasks accepted).
/// Returns the tally and a failure context for further assertions.
pub async fn conclude(
    (cluster, done): (&Cluster, &DoneEvents),
    tasks: &[Accepted],
    expected: usize,
    (within, survivors): (Duration, Survivors),
    name: &str,
) -> (Tally, String) {
    let (mut tally, mut problems) = settle(&cluster.client(), tasks, done, within, echoed).await;
    if survivors.masters {
        check_counter(cluster, &mut tally, &mut problems, 0).await;
    }
    let ctx = context(&problems, cluster);
    tally.report(name, &ctx);
    if survivors.redis {
        assert_eq!(tally.unannounced, 0, "{ctx}");
    }
    assert_eq!(tally.accepted, expected, "{ctx}");
    (tally, ctx)
}

/// A short description of what went wrong, for an assertion message.
pub fn context(problems: &[String], cluster: &Cluster) -> String {
    let shown: Vec<&String> = problems.iter().take(20).collect();
    format!("{shown:#?}\n{}", cluster.logs_tail())
}

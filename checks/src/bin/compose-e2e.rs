//! Runs `docker-compose.yml`, the file a user runs, for real and checks what a user relies
//! on: every health check passes, a task goes through the load balancer, scaled workers each
//! get their own steps, a worker stopped or killed in the middle of a step loses nothing,
//! losing a master replica costs a client about a second at most, and Redis comes back from
//! its AOF after a restart. Everything is torn down at the end, also on failure.
//!
//!   cargo build -p master -p worker -p llm-gateway
//!   cargo run -p checks --bin compose-e2e -- [--offline] [--bin-dir target/debug]
//!
//! It builds the three images from `deploy/Dockerfile` with `BINARIES=prebuilt`: the runtime
//! stage users get, around binaries built on this machine (the Rust build stage is not run:
//! see deploy/README.md for what this proves and what it does not). `--offline` first builds
//! stand-ins for the public base images from Debian packages (`deploy/offline-images.sh`)
//! and uses them, for a machine that cannot reach a registry. Needs a Docker engine with
//! BuildKit and Compose v1.29 or v2 (`DOCKER`/`COMPOSE` name the commands; defaults
//! `docker` and `docker-compose`). It talks only to the containers it started, on the
//! loopback port it publishes.

#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

/// Each step's simulated model call (the gateway's mock provider), long enough to stop a
/// worker in the middle of one.
const STEP_MS: u64 = 1500;
const PIPELINE: [&str; 4] = ["plan", "retrieve", "evaluate", "finalize"];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let offline = args.iter().any(|a| a == "--offline");
    let bin_dir = args
        .iter()
        .position(|a| a == "--bin-dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("checks/ has a parent")?
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
    let bin_dir = bin_dir.unwrap_or_else(|| target.join("debug"));
    let started = Instant::now();

    let images = Images::prepare(&root, &bin_dir, offline)?;
    println!("images ready in {:.0?}", started.elapsed());
    let stack = Stack::up(&root, &images)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(scenarios(&stack));
    if result.is_err() {
        stack.print_logs();
    }
    drop(stack);
    result?;
    println!("compose e2e passed in {:.0?}", started.elapsed());
    Ok(())
}

async fn scenarios(stack: &Stack) -> Result<()> {
    let api = Api::new(stack.port, &stack.client_key, &stack.operator_key);
    let step = Instant::now();
    let id = api.submit("through the load balancer").await?;
    api.wait_succeeded(&id, Duration::from_secs(60)).await?;
    println!(
        "a task went through the load balancer ({:.0?})",
        step.elapsed()
    );

    scaled_workers(stack, &api).await?;
    worker_stopped_mid_step(stack, &api, "stop").await?;
    worker_stopped_mid_step(stack, &api, "kill").await?;
    master_replica_lost(stack, &api).await?;
    redis_restarted(stack, &api, &id).await?;
    Ok(())
}

/// `--scale worker-a=3`: three `plan` workers, each advertising its own address, and each
/// step runs on the worker the master leased it to.
async fn scaled_workers(stack: &Stack, api: &Api) -> Result<()> {
    let step = Instant::now();
    stack.scale("worker-a", 3)?;
    let planners = wait_for(
        Duration::from_secs(60),
        "three live `plan` workers",
        || async {
            let planners = api.workers_serving("plan").await.ok()?;
            (planners.len() == 3).then_some(planners)
        },
    )
    .await?;
    let urls: std::collections::BTreeSet<&str> =
        planners.iter().filter_map(|w| w["url"].as_str()).collect();
    ensure!(
        urls.len() == 3,
        "the three replicas must advertise three addresses: {planners:?}"
    );

    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(api.submit(&format!("scaled {i}")).await?);
    }
    // While the plan steps run: every step a replica says it runs is leased to that replica.
    // A replica's `in_flight` is what its last heartbeat said (every 2 s) and a step lasts
    // STEP_MS, so a heartbeat can fall between two steps: keep submitting, so that plan
    // steps are in flight all the time the check looks.
    let mut checked = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    while checked < 3 && Instant::now() < deadline {
        if ids.len() < 60 {
            ids.push(api.submit(&format!("scaled {}", ids.len())).await?);
        }
        for worker in api.workers_serving("plan").await? {
            for held in worker["in_flight"].as_array().into_iter().flatten() {
                let task = held["task_id"].as_str().context("in_flight task_id")?;
                let index = held["step"].as_u64().context("in_flight step")?;
                let view = api.task(task).await?;
                let Some(step) = slot(&view, index) else {
                    continue;
                };
                if step["status"] == "dispatched" {
                    ensure!(
                        step["worker_id"] == worker["id"],
                        "step {task}:{index} runs on {} but is leased to {}",
                        worker["id"],
                        step["worker_id"]
                    );
                    checked += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(checked > 0, "saw no plan step in flight to check");
    let mut ran_on = std::collections::BTreeSet::new();
    for id in &ids {
        let view = api.wait_succeeded(id, Duration::from_secs(90)).await?;
        ran_on.insert(view["steps"][0]["worker_id"].to_string());
    }
    ensure!(
        ran_on.len() >= 2,
        "{} plan steps over three replicas all ran on {ran_on:?}",
        ids.len()
    );
    stack.scale("worker-a", 1)?;
    println!(
        "scaled worker-a to 3: steps spread over {} replicas, each on the worker it was leased to ({:.0?})",
        ran_on.len(),
        step.elapsed()
    );
    Ok(())
}

/// Step `index` (a slot: a declared step, or a map instance under its step) of a task view.
fn slot(view: &Value, index: u64) -> Option<&Value> {
    view["steps"]
        .as_array()?
        .iter()
        .flat_map(|s| std::iter::once(s).chain(instances(s)))
        .find(|s| s["index"].as_u64() == Some(index))
}

/// A map step's instances (none for other steps).
fn instances(step: &Value) -> impl Iterator<Item = &Value> {
    step["instances"].as_array().into_iter().flatten()
}

/// `docker stop` (the worker drains) or `docker kill` (the lease lapses and the step runs
/// again) on the `retrieve` worker while it runs a step: the task still succeeds.
async fn worker_stopped_mid_step(stack: &Stack, api: &Api, how: &str) -> Result<()> {
    let step = Instant::now();
    let id = api.submit(&format!("worker {how}")).await?;
    let started = wait_for(
        Duration::from_secs(30),
        "the retrieve step to start",
        || async {
            let view = api.task(&id).await.ok()?;
            // The tasks here are the chain PIPELINE; were retrieve a map step, any of its
            // instances would do.
            let retrieve = &view["steps"][1];
            (retrieve["status"] == "dispatched"
                || instances(retrieve).any(|i| i["status"] == "dispatched"))
            .then_some(())
        },
    )
    .await;
    if let Err(e) = started {
        let view = api.task(&id).await.unwrap_or_default();
        bail!("{e:#}; the task: {view}");
    }
    let container = stack.containers("worker-b")?;
    let container = container.first().context("no worker-b container")?;
    // `stop` returns once the worker has drained: it finished and delivered its step. After
    // `kill` the step's lease lapses and the step runs again. Either way the worker is
    // started again for the steps that need `retrieve`.
    stack.docker(&[how, container])?;
    stack.docker(&["start", container])?;
    let view = api.wait_succeeded(&id, Duration::from_secs(120)).await?;
    println!(
        "worker-b: `docker {how}` in the middle of a step: the task succeeded, retrieve after {} attempt(s) ({:.0?})",
        view["steps"][1]["attempts"],
        step.elapsed()
    );
    Ok(())
}

/// One of two master replicas stops while clients submit: no request fails, and none takes
/// much longer than the balancer's 1 s connect timeout.
async fn master_replica_lost(stack: &Stack, api: &Api) -> Result<()> {
    let masters = stack.containers("master")?;
    ensure!(
        masters.len() == 2,
        "expected two master replicas, found {masters:?}"
    );
    let submitting = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut failures = Vec::new();
            let mut sent = 0;
            let until = Instant::now() + Duration::from_secs(8);
            while Instant::now() < until {
                let t = Instant::now();
                if let Err(e) = api.submit("while a master stops").await {
                    failures.push(format!("{e:#}"));
                }
                slowest = slowest.max(t.elapsed());
                sent += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (sent, slowest, failures)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.docker(&["stop", &masters[0]])?;
    let (sent, slowest, failures) = submitting.await?;
    stack.docker(&["start", &masters[0]])?;
    ensure!(
        failures.is_empty(),
        "{} of {sent} submissions failed: {failures:?}",
        failures.len()
    );
    ensure!(
        slowest < Duration::from_millis(2500),
        "a submission took {slowest:?} while a master replica stopped"
    );
    println!(
        "a master replica stopped under load: {sent} submissions, none failed, slowest {slowest:.1?}"
    );
    Ok(())
}

/// Redis restarts: what it acknowledged is still there (AOF), and the system takes tasks
/// again.
async fn redis_restarted(stack: &Stack, api: &Api, earlier: &str) -> Result<()> {
    let step = Instant::now();
    stack.compose(&["restart", "redis"])?;
    let view = wait_for(
        Duration::from_secs(60),
        "the earlier task after the restart",
        || async { api.task(earlier).await.ok() },
    )
    .await?;
    ensure!(view["status"] == "succeeded", "after the restart: {view}");
    let id = wait_for(
        Duration::from_secs(60),
        "a submission after the restart",
        || async { api.submit("after the redis restart").await.ok() },
    )
    .await?;
    api.wait_succeeded(&id, Duration::from_secs(90)).await?;
    println!(
        "redis restarted: the earlier task was kept (AOF), a new task succeeded ({:.0?})",
        step.elapsed()
    );
    Ok(())
}

/// Polls `check` every 200 ms until it answers or `within` passes.
async fn wait_for<T, F, Fut>(within: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("gave up after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The images compose runs, built around this machine's binaries.
struct Images {
    env: Vec<(String, String)>,
    docker: String,
}

impl Images {
    fn prepare(root: &Path, bin_dir: &Path, offline: bool) -> Result<Self> {
        let docker = std::env::var("DOCKER").unwrap_or_else(|_| "docker".into());
        let mut env = Vec::new();
        let mut runtime_image = None;
        if offline {
            run(Command::new("bash")
                .arg(root.join("deploy/offline-images.sh"))
                .env("DOCKER_BUILDKIT", "1"))?;
            runtime_image = Some("ensemble-offline/debian:bookworm-slim");
            env.push(("REDIS_IMAGE".into(), "ensemble-offline/redis:7".into()));
            env.push(("NGINX_IMAGE".into(), "ensemble-offline/nginx:1".into()));
        }
        // Only target/docker/ passes .dockerignore.
        let staged = root.join("target/docker");
        std::fs::create_dir_all(&staged)?;
        for service in ["master", "worker", "llm-gateway"] {
            let built = bin_dir.join(service);
            ensure!(
                built.exists(),
                "{} is missing: cargo build -p master -p worker -p llm-gateway first",
                built.display()
            );
            std::fs::copy(&built, staged.join(service))
                .with_context(|| format!("copy {}", built.display()))?;
        }
        for service in ["master", "worker", "llm-gateway"] {
            let mut build = Command::new(&docker);
            build
                .current_dir(root)
                .env("DOCKER_BUILDKIT", "1")
                .args([
                    "build",
                    "-q",
                    "-f",
                    "deploy/Dockerfile",
                    "--target",
                    "runtime",
                ])
                .args(["--build-arg", &format!("SERVICE={service}")])
                .args(["--build-arg", "BINARIES=prebuilt"])
                .args(["-t", &format!("ensemble/{service}:local"), "."]);
            if let Some(image) = runtime_image {
                build.args(["--build-arg", &format!("RUNTIME_IMAGE={image}")]);
            }
            run(&mut build).with_context(|| format!("building ensemble/{service}:local"))?;
        }
        Ok(Self { env, docker })
    }
}

/// The running compose project; `down -v` on drop.
struct Stack {
    root: PathBuf,
    project: String,
    env_file: tempfile::NamedTempFile,
    docker: String,
    port: u16,
    client_key: String,
    operator_key: String,
}

impl Stack {
    fn up(root: &Path, images: &Images) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let secret = |what: &str| format!("{what}-{}", uuid::Uuid::new_v4().simple());
        let client_key = secret("client");
        let operator_key = secret("operator");
        let project = format!("ensemble-e2e-{}", std::process::id());
        let mut settings = vec![
            ("COMPOSE_PROJECT_NAME".to_string(), project.clone()),
            ("REDIS_PASSWORD".into(), secret("redis")),
            ("WORKER_TOKEN".into(), secret("worker")),
            ("GATEWAY_TOKEN".into(), secret("gateway")),
            ("API_KEYS".into(), format!("e2e:{client_key}")),
            ("OPERATOR_API_KEYS".into(), format!("ops:{operator_key}")),
            ("MASTER_HOST_IP".into(), "127.0.0.1".into()),
            ("MASTER_HOST_PORT".into(), port.to_string()),
            ("MOCK_LATENCY_MS".into(), STEP_MS.to_string()),
        ];
        settings.extend(images.env.iter().cloned());
        let mut env_file = tempfile::NamedTempFile::new()?;
        for (k, v) in &settings {
            std::io::Write::write_all(&mut env_file, format!("{k}={v}\n").as_bytes())?;
        }
        let stack = Self {
            root: root.to_path_buf(),
            project,
            env_file,
            docker: images.docker.clone(),
            port,
            client_key,
            operator_key,
        };
        let started = Instant::now();
        stack.compose(&["up", "-d", "--no-build"])?;
        stack.wait_healthy(Duration::from_secs(180))?;
        println!(
            "compose up: every container healthy in {:.0?}",
            started.elapsed()
        );
        Ok(stack)
    }

    fn compose(&self, args: &[&str]) -> Result<String> {
        let compose = std::env::var("COMPOSE").unwrap_or_else(|_| "docker-compose".into());
        run(Command::new(compose)
            .current_dir(&self.root)
            .arg("--project-name")
            .arg(&self.project)
            .arg("--env-file")
            .arg(self.env_file.path())
            .args(["-f", "docker-compose.yml"])
            .args(args))
    }

    /// `up --scale service=replicas`, leaving the other containers as they are.
    fn scale(&self, service: &str, replicas: u32) -> Result<String> {
        let scale = format!("{service}={replicas}");
        self.compose(&["up", "-d", "--no-build", "--no-recreate", "--scale", &scale])
    }

    fn docker(&self, args: &[&str]) -> Result<String> {
        run(Command::new(&self.docker).args(args))
    }

    /// The containers of one service, or of every service with `""`.
    fn containers(&self, service: &str) -> Result<Vec<String>> {
        let mut args = vec!["ps", "-q"];
        if !service.is_empty() {
            args.push(service);
        }
        Ok(self
            .compose(&args)?
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// Every container of the project reports `healthy`.
    fn wait_healthy(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let ids = self.containers("")?;
            let mut waiting = Vec::new();
            for id in &ids {
                let state = self.docker(&[
                    "inspect",
                    "-f",
                    "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
                    id,
                ])?;
                if !state.trim().ends_with(" healthy") {
                    waiting.push(state.trim().to_string());
                }
            }
            if !ids.is_empty() && waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not healthy after {within:?}: {waiting:?}");
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn print_logs(&self) {
        if let Ok(logs) = self.compose(&["logs", "--no-color", "--tail", "40"]) {
            eprintln!("--- compose logs (last 40 lines per container) ---\n{logs}");
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Err(e) = self.compose(&["down", "-v", "--remove-orphans", "--timeout", "10"]) {
            eprintln!("compose down failed: {e:#}");
        }
    }
}

/// Runs a command; its stdout, or an error with its stderr.
fn run(command: &mut Command) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The master's API through the load balancer.
#[derive(Clone)]
struct Api {
    base: String,
    client_key: String,
    operator_key: String,
    http: reqwest::Client,
}

impl Api {
    fn new(port: u16, client_key: &str, operator_key: &str) -> Self {
        Self {
            base: format!("http://127.0.0.1:{port}"),
            client_key: client_key.into(),
            operator_key: operator_key.into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(40))
                .build()
                .expect("an HTTP client"),
        }
    }

    async fn submit(&self, input: &str) -> Result<String> {
        let response = self
            .http
            .post(format!("{}/task", self.base))
            .bearer_auth(&self.client_key)
            .json(&json!({ "steps": PIPELINE, "input": input }))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        ensure!(
            status.as_u16() == 202,
            "POST /task answered {status}: {body}"
        );
        Ok(body["task_id"].as_str().context("task_id")?.to_string())
    }

    async fn task(&self, id: &str) -> Result<Value> {
        let response = self
            .http
            .get(format!("{}/task/{id}", self.base))
            .bearer_auth(&self.client_key)
            .send()
            .await?;
        ensure!(
            response.status().is_success(),
            "GET /task/{id}: {}",
            response.status()
        );
        Ok(response.json().await?)
    }

    /// Long-polls `/result/{id}` until the task finishes; it must have succeeded.
    async fn wait_succeeded(&self, id: &str, within: Duration) -> Result<Value> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let answer = self
                .http
                .get(format!("{}/result/{id}?wait=20", self.base))
                .bearer_auth(&self.client_key)
                .send()
                .await;
            if let Ok(response) = answer
                && response.status().as_u16() == 200
            {
                let view = self.task(id).await?;
                ensure!(view["status"] == "succeeded", "task {id} ended: {view}");
                return Ok(view);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!(
            "task {id} did not finish within {within:?}: {}",
            self.task(id).await?
        )
    }

    /// `GET /workers`: the live workers serving `capability`.
    async fn workers_serving(&self, capability: &str) -> Result<Vec<Value>> {
        let body: Value = self
            .http
            .get(format!("{}/workers", self.base))
            .bearer_auth(&self.operator_key)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(body["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| {
                w["capabilities"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c == capability))
            })
            .cloned()
            .collect())
    }
}

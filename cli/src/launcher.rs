//! `ensemble up`: the llm-gateway, the master and four workers in this process, each on its
//! own port, on a redis-server the launcher starts (or an existing Redis, or the master's
//! in-memory store), stopped in order: workers first (they drain and deliver), then the
//! master, then the gateway, then Redis.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use common::config::Settings;
use common::redis::RedisSettings;
use common::wire::{Capability, WorkerRecord};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use master::dispatch::WorkerSource;
use master::store::{MemoryStore, StoreError};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::args::LaunchArgs;
use crate::client::Client;
use crate::redis_server::{RedisProcess, free_port};

/// The four workers, one capability each, in pipeline order.
pub const CAPABILITIES: [&str; 4] = ["plan", "retrieve", "evaluate", "finalize"];

/// The master's lease in memory mode: workers cannot heartbeat into a store that lives in
/// the master, so a lease must outlast the longest step (the default step timeout).
const MEMORY_LEASE_MS: u64 = 300_000;

/// How long start-up may take before the launcher gives up (registration included).
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the master keeps tasks.
#[derive(Debug, Clone)]
pub enum Store {
    /// A redis-server the launcher started (its URL).
    OwnRedis(String),
    /// A Redis given with `--redis-url` (where, without credentials).
    Redis(String),
    /// The master's memory: lost on exit, workers not registered in Redis.
    Memory,
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OwnRedis(url) => write!(f, "its own redis-server at {url}, not persisted"),
            Self::Redis(target) => write!(f, "Redis at {target}"),
            Self::Memory => f.write_str("in memory, lost on exit"),
        }
    }
}

/// One service running as a task of this process.
struct Service {
    /// For messages.
    name: String,
    /// Cancels this service alone, so they can stop in order.
    stop: CancellationToken,
    handle: JoinHandle<()>,
    /// How long its graceful stop may take before it is aborted.
    grace: Duration,
    /// Services stop by stage, lowest first, those of one stage together.
    stage: u8,
}

/// The running system.
pub struct System {
    /// The llm-gateway's base URL.
    pub gateway_url: String,
    /// The model provider behind the gateway's `default` alias.
    pub provider: String,
    /// The master's base URL.
    pub master_url: String,
    /// `(capability, base URL)` of each worker.
    pub workers: Vec<(String, String)>,
    /// The key clients and operators use.
    pub api_key: String,
    /// Where tasks live.
    pub store: Store,
    /// Every service; they stop by stage: workers, master, gateway.
    services: Vec<Service>,
    /// Services report here when they end, normally or not.
    ended: mpsc::UnboundedReceiver<(String, anyhow::Result<()>)>,
    ended_tx: mpsc::UnboundedSender<(String, anyhow::Result<()>)>,
    redis: Option<RedisProcess>,
}

/// The ports each service gets, `0` meaning any free one.
#[derive(Debug, Clone, PartialEq)]
pub struct Ports {
    /// The gateway's.
    pub gateway: u16,
    /// The master's.
    pub master: u16,
    /// The workers', in [`CAPABILITIES`] order.
    pub workers: [u16; 4],
}

impl Ports {
    /// The ports the flags ask for, offset applied.
    pub fn from_args(args: &LaunchArgs) -> anyhow::Result<Self> {
        let workers: [u16; 4] = match args.worker_ports.as_slice() {
            [one] => [*one; 4],
            [a, b, c, d] => [*a, *b, *c, *d],
            other => anyhow::bail!(
                "--worker-ports needs four ports (plan,retrieve,evaluate,finalize) or one, not {}",
                other.len()
            ),
        };
        let shift = |port: u16| -> anyhow::Result<u16> {
            if port == 0 {
                return Ok(0);
            }
            port.checked_add(args.port_offset).with_context(|| {
                format!(
                    "--port-offset {} takes port {port} past 65535",
                    args.port_offset
                )
            })
        };
        Ok(Self {
            gateway: shift(args.gateway_port)?,
            master: shift(args.master_port)?,
            workers: [
                shift(workers[0])?,
                shift(workers[1])?,
                shift(workers[2])?,
                shift(workers[3])?,
            ],
        })
    }
}

async fn bind(what: &str, port: u16) -> anyhow::Result<(TcpListener, String)> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| {
            format!(
                "cannot listen on 127.0.0.1:{port} for the {what} (is another Ensemble running? \
             pick other ports with --port-offset, or 0 for any free port)"
            )
        })?;
    let url = format!("http://{}", listener.local_addr()?);
    Ok((listener, url))
}

/// 32 random hex characters.
pub fn random_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Loads a service's settings the usual way (defaults, the TOML file, the environment),
/// with the launcher's own values on top, and validates the result.
fn load<T: Settings>(service: &str, file: Option<&Path>, overrides: Value) -> anyhow::Result<T> {
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        anyhow::ensure!(
            path.is_file(),
            "the config file {} does not exist",
            path.display()
        );
        figment = figment.merge(Toml::file_exact(path));
    }
    let figment = figment
        .merge(common::config::env_provider(T::env_vars()))
        .merge(Serialized::defaults(overrides));
    common::config::extract(figment)
        .with_context(|| format!("the {service}'s configuration is invalid"))
}

/// The workers the launcher started, for the master in memory mode, where workers cannot
/// register themselves.
struct KnownWorkers(Vec<WorkerRecord>);

impl KnownWorkers {
    /// The records of `(capability, URL, settings)` workers, as they would register.
    fn new<'a>(
        workers: impl Iterator<Item = (&'a str, &'a str, &'a worker::Config)>,
    ) -> anyhow::Result<Self> {
        let records = workers
            .map(|(cap, url, config)| {
                Ok(WorkerRecord {
                    id: config.worker_id()?,
                    url: url.to_string(),
                    capabilities: vec![Capability::new(cap)?],
                    max_concurrency: config.max_concurrency,
                    in_flight: Vec::new(),
                    version: common::VERSION.to_string(),
                    started_at_ms: common::wire::now_ms(),
                    draining: false,
                    heartbeat_at_ms: 0,
                    degraded: None,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self(records))
    }
}

#[async_trait]
impl WorkerSource for KnownWorkers {
    async fn live(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        Ok(self.0.clone())
    }
}

/// The gateway's provider: `LLM_PROVIDER` when set, else Gemini when `GEMINI_API_KEY` is,
/// else the mock.
fn provider_override() -> Value {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if !set("LLM_PROVIDER") && set("GEMINI_API_KEY") {
        json!({ "llm_provider": "gemini" })
    } else {
        json!({})
    }
}

/// Merges `extra`'s keys into `base` (both JSON objects).
fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    base
}

impl System {
    /// Starts everything and waits until the workers are known to the master.
    pub async fn start(args: &LaunchArgs) -> anyhow::Result<Self> {
        let ports = Ports::from_args(args)?;
        // Bind first: port 0 works and every URL is known before anything is wired.
        let (gateway_listener, gateway_url) = bind("llm-gateway", ports.gateway).await?;
        let (master_listener, master_url) = bind("master", ports.master).await?;
        let mut worker_listeners = Vec::new();
        for (cap, port) in CAPABILITIES.iter().zip(ports.workers) {
            worker_listeners.push((*cap, bind(&format!("{cap} worker"), port).await?));
        }

        let (store, redis_json, redis) = choose_store(args).await?;
        let api_key = args
            .api_key
            .clone()
            .filter(|k| !k.is_empty())
            .unwrap_or_else(random_key);
        let worker_token = random_key();
        let gateway_token = random_key();
        let file = args.config.as_deref();
        let memory = matches!(store, Store::Memory);

        let gateway: llm_gateway::Config = load(
            "llm-gateway",
            file,
            with(
                json!({
                    "host": "127.0.0.1",
                    "port": port_of(&gateway_url),
                    "gateway_token": gateway_token,
                }),
                provider_override(),
            ),
        )?;
        let provider = gateway.llm_provider.to_string();
        let mut master_overrides = json!({
            "host": "127.0.0.1",
            "port": port_of(&master_url),
            "redis": redis_json,
            "api_keys": format!("local:{api_key}"),
            "operator_api_keys": format!("operator:{api_key}"),
            "worker_token": worker_token,
            // Everything runs on this machine, callback receivers included.
            "callback_allow_private": true,
        });
        if memory {
            master_overrides = with(master_overrides, json!({ "lease_ms": MEMORY_LEASE_MS }));
        }
        let mut master: master::Config = load("master", file, master_overrides)?;
        if master.callback_secret.is_empty() {
            // Callbacks are always signed; a receiver that checks signatures needs
            // CALLBACK_SECRET set before the launch.
            master.callback_secret = common::config::Secret::new(random_key());
            tracing::info!(
                "CALLBACK_SECRET is not set: completion callbacks are signed with a generated secret"
            );
        }
        let mut workers = Vec::new();
        for (cap, (listener, url)) in worker_listeners {
            let config: worker::Config = load(
                &format!("{cap} worker"),
                file,
                json!({
                    "host": "127.0.0.1",
                    "port": port_of(&url),
                    "redis": redis_json,
                    "agent_id": format!("worker-{cap}"),
                    "capabilities": [cap],
                    "master_url": master_url,
                    "llm_gateway_url": gateway_url,
                    "worker_token": worker_token,
                    "gateway_token": gateway_token,
                    "advertise_url": url,
                    // LLM_MODEL names the gateway's model here; workers ask for its alias.
                    "llm_model": llm_gateway::config::DEFAULT_ALIAS,
                }),
            )?;
            workers.push((cap, listener, url, config));
        }

        let backends = if memory {
            let known = workers
                .iter()
                .map(|(cap, _, url, config)| (*cap, url.as_str(), config));
            master::Backends {
                store: Arc::new(MemoryStore::new()),
                workers: Arc::new(KnownWorkers::new(known)?),
                events: None,
            }
        } else {
            master::Backends::redis(&master.redis)?
        };

        let (ended_tx, ended) = mpsc::unbounded_channel();
        let mut system = Self {
            gateway_url,
            provider,
            master_url,
            workers: workers
                .iter()
                .map(|(c, _, u, _)| (c.to_string(), u.clone()))
                .collect(),
            api_key,
            store,
            services: Vec::new(),
            ended,
            ended_tx,
            redis,
        };
        for (cap, listener, _, config) in workers {
            let grace = config.shutdown_grace() + Duration::from_secs(5);
            system.spawn(format!("{cap} worker"), 0, grace, move |stop| {
                worker::serve(config, listener, stop)
            });
        }
        system.spawn("master".into(), 1, Duration::from_secs(20), move |stop| {
            master::serve_with(master, master_listener, stop, backends)
        });
        system.spawn(
            "llm-gateway".into(),
            2,
            Duration::from_secs(10),
            move |stop| llm_gateway::serve(gateway, gateway_listener, stop),
        );
        if let Err(e) = system.wait_ready().await {
            system.stop().await;
            return Err(e);
        }
        Ok(system)
    }

    fn spawn<F, Fut>(&mut self, name: String, stage: u8, grace: Duration, serve: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let served = serve(stop.clone());
        let ended = self.ended_tx.clone();
        let label = name.clone();
        let handle = tokio::spawn(async move {
            let _ = ended.send((label, served.await));
        });
        self.services.push(Service {
            name,
            stop,
            handle,
            grace,
            stage,
        });
    }

    /// A client of this system's master.
    pub fn client(&self) -> Client {
        Client::with(&self.master_url, Some(self.api_key.clone()))
    }

    /// Waits until the gateway and master are ready and the master sees all four workers;
    /// fails early if a service ends.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = self.client();
        let http = common::http::client(Duration::from_secs(2));
        let gateway_ready = format!("{}/ready", self.gateway_url);
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok((name, result)) = self.ended.try_recv() {
                return Err(ended_early(&name, result));
            }
            let gateway_up = http
                .get(&gateway_ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            let workers = if gateway_up {
                client.get("/workers").await.ok()
            } else {
                None
            };
            let known = workers
                .as_ref()
                .and_then(|w| w.get("by_capability"))
                .and_then(Value::as_object)
                .map_or(0, |by| {
                    CAPABILITIES.iter().filter(|c| by.contains_key(**c)).count()
                });
            if known == CAPABILITIES.len() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "the system did not come up within {READY_TIMEOUT:?} (gateway ready: {gateway_up}, \
                     workers known to the master: {known} of 4)"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs until `shutdown` fires (then stops cleanly) or a service ends on its own (then
    /// stops the rest and reports it).
    pub async fn run_until(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ended = tokio::select! {
            () = shutdown.cancelled() => None,
            ended = self.ended.recv() => ended,
        };
        let failure = ended.map(|(name, result)| ended_early(&name, result));
        self.stop().await;
        failure.map_or(Ok(()), Err)
    }

    /// Stops the services by stage (workers, master, gateway), then Redis. Another
    /// ctrl-c or SIGTERM meanwhile aborts whatever is still stopping.
    pub async fn stop(mut self) {
        let services = std::mem::take(&mut self.services);
        let aborts: Vec<_> = services.iter().map(|s| s.handle.abort_handle()).collect();
        tokio::select! {
            () = stop_in_order(services) => {}
            () = common::shutdown::wait_for_signal() => {
                eprintln!("quitting without waiting");
                aborts.iter().for_each(tokio::task::AbortHandle::abort);
            }
        }
        while let Ok((name, result)) = self.ended.try_recv() {
            if let Err(e) = result {
                tracing::error!(service = %name, error = %format!("{e:#}"), "stopped with an error");
            }
        }
        if let Some(redis) = self.redis.take() {
            redis.stop().await;
        }
    }
}

/// Stops the services stage by stage; those of one stage stop together (four workers
/// draining at once take one grace period, not four).
async fn stop_in_order(mut services: Vec<Service>) {
    services.sort_by_key(|s| s.stage);
    while !services.is_empty() {
        let stage = services[0].stage;
        let rest = services.split_off(services.iter().take_while(|s| s.stage == stage).count());
        futures::future::join_all(services.into_iter().map(stop_one)).await;
        services = rest;
    }
}

async fn stop_one(service: Service) {
    service.stop.cancel();
    let mut handle = service.handle;
    if tokio::time::timeout(service.grace, &mut handle)
        .await
        .is_err()
    {
        tracing::warn!(service = %service.name, "did not stop in time; aborting it");
        handle.abort();
    }
}

fn ended_early(name: &str, result: anyhow::Result<()>) -> anyhow::Error {
    match result {
        Ok(()) => anyhow::anyhow!("the {name} stopped unexpectedly"),
        Err(e) => e.context(format!("the {name} failed")),
    }
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// Whether `args` lead to the in-memory store (`--memory`, or no `--redis-url` and no
/// redis-server on PATH).
pub async fn memory_mode(args: &LaunchArgs) -> bool {
    args.memory || (args.redis_url.is_none() && !RedisProcess::available().await)
}

/// Picks the store: `--memory`, `--redis-url`, a redis-server of our own when one is on
/// PATH, else memory (said loudly). Returns the `redis` settings every service gets on top
/// of its own: with `--redis-url` only the URL, so the other `REDIS_*` variables still
/// apply; otherwise all of them. In memory mode they point at a closed port, so the
/// workers' heartbeats fail fast.
async fn choose_store(args: &LaunchArgs) -> anyhow::Result<(Store, Value, Option<RedisProcess>)> {
    if let Some(url) = &args.redis_url {
        let target = RedisSettings::from_url(url.clone()).target();
        return Ok((Store::Redis(target), json!({ "url": url }), None));
    }
    if !args.memory {
        if RedisProcess::available().await {
            let redis = RedisProcess::start()
                .await
                .context("cannot start redis-server")?;
            let settings = serde_json::to_value(RedisSettings::from_url(redis.url()))?;
            return Ok((Store::OwnRedis(redis.url()), settings, Some(redis)));
        }
        eprintln!(
            "WARNING: redis-server is not on PATH: tasks are kept in the master's memory and \
             lost on exit, and the workers will log that Redis is unreachable (they cannot \
             register; the launcher tells the master about them). Install Redis to run the \
             real thing."
        );
    }
    let closed = free_port().await?;
    let settings = RedisSettings {
        connect_timeout_ms: 200,
        ..RedisSettings::from_url(format!("redis://127.0.0.1:{closed}"))
    };
    Ok((Store::Memory, serde_json::to_value(settings)?, None))
}

#[cfg(test)]
mod tests {
    // `figment::Jail` closures return figment's (large) error type.
    #![allow(clippy::unwrap_used, clippy::result_large_err)]

    use clap::Parser;

    use super::*;

    fn ports(args: &[&str]) -> anyhow::Result<Ports> {
        let cli = crate::args::Cli::try_parse_from([&["ensemble", "up"], args].concat()).unwrap();
        match cli.command {
            crate::args::Command::Up(launch) => Ports::from_args(&launch),
            _ => unreachable!(),
        }
    }

    #[test]
    fn ports_default_offset_and_any() {
        let defaults = ports(&[]).unwrap();
        assert_eq!(
            defaults,
            Ports {
                gateway: 7000,
                master: 8000,
                workers: [5001, 5002, 5003, 5004]
            }
        );
        let shifted = ports(&["--port-offset", "100", "--gateway-port", "0"]).unwrap();
        assert_eq!(
            shifted,
            Ports {
                gateway: 0,
                master: 8100,
                workers: [5101, 5102, 5103, 5104]
            }
        );
        assert_eq!(ports(&["--worker-ports", "0"]).unwrap().workers, [0; 4]);
        let err = ports(&["--worker-ports", "1,2,3"]).unwrap_err().to_string();
        assert!(err.contains("--worker-ports needs four ports"), "{err}");
        let err = ports(&["--port-offset", "60000"]).unwrap_err().to_string();
        assert!(err.contains("past 65535"), "{err}");
    }

    #[test]
    fn keys_are_32_random_hex_characters() {
        let (a, b) = (random_key(), random_key());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn launcher_values_override_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PORT", "1");
            jail.set_env("CAPABILITIES", "other");
            jail.set_env("MAX_CONCURRENCY", "3");
            let config: worker::Config = load(
                "test worker",
                None,
                json!({ "port": 5001, "capabilities": ["plan"], "worker_token": "t" }),
            )
            .unwrap();
            assert_eq!(config.port, 5001);
            assert_eq!(config.capabilities, ["plan"]);
            assert_eq!(
                config.max_concurrency, 3,
                "the rest still comes from the environment"
            );
            jail.set_env("MAX_CONCURRENCY", "0");
            let err = load::<worker::Config>("plan worker", None, json!({ "worker_token": "t" }))
                .unwrap_err();
            let err = format!("{err:#}");
            assert!(
                err.contains("the plan worker's configuration is invalid"),
                "{err}"
            );
            assert!(err.contains("MAX_CONCURRENCY"), "{err}");
            Ok(())
        });
    }
}

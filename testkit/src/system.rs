//! A whole Ensemble system: a store (a redis-server of its own, a Redis at a URL, or the
//! master's memory), an llm-gateway, masters and workers, in this process or as child
//! processes, wired to each other and stopped in order.
//!
//! ```no_run
//! # async fn example(bin_dir: std::path::PathBuf) -> anyhow::Result<()> {
//! use testkit::system::{Binaries, System};
//!
//! // The usual case: its own redis-server, a gateway, a master, four workers.
//! let system = System::builder().workers(4).start().await?;
//! system.stop().await;
//!
//! // Two masters and three workers as child processes, each setting typed, per service.
//! let system = System::builder()
//!     .masters(2)
//!     .workers(3)
//!     .processes(Binaries::in_dir(bin_dir))
//!     .worker_config(|_, worker| worker.max_concurrency = 16)
//!     .start()
//!     .await?;
//! system.stop().await;
//! # Ok(())
//! # }
//! ```
//!
//! Each service's configuration is its own typed struct (`llm_gateway::Config`,
//! `master::Config`, `worker::Config`): the builder starts from its defaults (or, for the
//! launcher, from the environment and a TOML file, as the service itself would load it),
//! sets what wires the services together (ports, the Redis URL, tokens, the master's and
//! the gateway's URLs), then runs the caller's closure, then validates. A child process
//! gets the result as environment variables ([`child_env`], the one place that does it).
//!
//! Stopping goes workers first (they drain and deliver), then masters, then the gateway,
//! then Redis; the services of one stage stop together.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use common::config::{Secret, Settings};
use common::redis::RedisSettings;
use common::wire::{Capability, WorkerRecord};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use master::dispatch::WorkerSource;
use master::store::{MemoryStore, StoreError};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::redis::{RedisOptions, RedisServer};
use crate::service::{Exit, Service, tail};

/// One capability per worker, in the `default` pipeline's order: worker `i` serves
/// `CAPABILITIES[i % 4]` unless its closure says otherwise.
pub const CAPABILITIES: [&str; 4] = ["plan", "retrieve", "evaluate", "finalize"];

/// The master's lease in memory mode: workers cannot heartbeat into a store that lives in
/// the master, so a lease must outlast the longest step (the default step timeout).
pub const MEMORY_LEASE_MS: u64 = 300_000;

/// How long start-up may take (registration included) unless told otherwise.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the master and the gateway may take to stop; a worker gets its own
/// `shutdown_grace` and this much more.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// Where the master keeps tasks.
#[derive(Debug, Clone)]
pub enum Store {
    /// A redis-server of the system's own, started with these options.
    OwnRedis(RedisOptions),
    /// A Redis at this URL: only the URL is set, every other Redis setting is the
    /// services' own.
    Url(String),
    /// The master's memory: in-process only, lost on exit, workers not registered in Redis
    /// (the master is told about them).
    Memory,
}

/// What a child process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The llm-gateway.
    Gateway,
    /// A master.
    Master,
    /// A worker.
    Worker,
}

impl Role {
    /// The binary's name.
    pub fn binary(self) -> &'static str {
        match self {
            Self::Gateway => "llm-gateway",
            Self::Master => "master",
            Self::Worker => "worker",
        }
    }
}

/// How to start a service as a child process: the command for each role, before the
/// builder adds the environment.
#[derive(Clone)]
pub struct Binaries(Arc<dyn Fn(Role) -> Command + Send + Sync>);

impl std::fmt::Debug for Binaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Binaries")
    }
}

impl Binaries {
    /// `{dir}/master`, `{dir}/worker`, `{dir}/llm-gateway`.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        let dir: PathBuf = dir.into();
        Self(Arc::new(move |role| Command::new(dir.join(role.binary()))))
    }

    /// Fails unless every binary [`Self::in_dir`] would run exists.
    pub fn check_dir(dir: &Path) -> anyhow::Result<()> {
        for role in [Role::Gateway, Role::Master, Role::Worker] {
            let path = dir.join(role.binary());
            anyhow::ensure!(path.is_file(), "{} does not exist", path.display());
        }
        Ok(())
    }

    /// Any command per role (a binary that runs several services, say).
    pub fn from_fn(command: impl Fn(Role) -> Command + Send + Sync + 'static) -> Self {
        Self(Arc::new(command))
    }
}

/// Where each service's configuration starts from, before the builder wires it.
#[derive(Debug, Clone, Default)]
pub enum Base {
    /// The struct's `Default` (tests: nothing leaks in from the developer's shell).
    #[default]
    Defaults,
    /// Defaults, then this TOML file, then the environment: what the service would load
    /// (the launcher).
    Environment(Option<PathBuf>),
}

impl Base {
    fn load<T: Settings>(&self) -> anyhow::Result<T> {
        let Self::Environment(file) = self else {
            return Ok(T::default());
        };
        let mut figment = Figment::from(Serialized::defaults(T::default()));
        if let Some(path) = file {
            anyhow::ensure!(
                path.is_file(),
                "the config file {} does not exist",
                path.display()
            );
            figment = figment.merge(Toml::file_exact(path));
        }
        let figment = figment.merge(common::config::env_provider(T::env_vars()));
        // Validation waits until the builder has set its values (a worker's environment
        // need not name its capabilities); `extract` validates, so it only runs to explain
        // a failure, which it then meets first.
        Ok(figment
            .extract::<T>()
            .or_else(|_| common::config::extract::<T>(figment))?)
    }
}

type GatewayConfigFn = Box<dyn FnOnce(&mut llm_gateway::Config) + Send>;
type MasterConfigFn = Box<dyn FnMut(usize, &mut master::Config) + Send>;
type WorkerConfigFn = Box<dyn FnMut(usize, &mut worker::Config) + Send>;

/// Builds a [`System`]; see the module docs.
#[must_use]
pub struct Builder {
    store: Store,
    binaries: Option<Binaries>,
    gateway: bool,
    masters: usize,
    workers: usize,
    gateway_port: u16,
    master_ports: Vec<u16>,
    worker_ports: Vec<u16>,
    /// Appended to the message when a port cannot be bound.
    port_hint: String,
    api_key: Option<String>,
    base: Base,
    gateway_config: Option<GatewayConfigFn>,
    master_config: Option<MasterConfigFn>,
    worker_config: Option<WorkerConfigFn>,
    child_env: Vec<(String, String)>,
    ready_within: Duration,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            store: Store::OwnRedis(RedisOptions::default()),
            binaries: None,
            gateway: true,
            masters: 1,
            workers: 0,
            gateway_port: 0,
            master_ports: Vec::new(),
            worker_ports: Vec::new(),
            port_hint: String::new(),
            api_key: None,
            base: Base::Defaults,
            gateway_config: None,
            master_config: None,
            worker_config: None,
            child_env: Vec::new(),
            ready_within: READY_TIMEOUT,
        }
    }
}

impl Builder {
    /// Where tasks live (a redis-server of its own by default).
    pub fn store(mut self, store: Store) -> Self {
        self.store = store;
        self
    }

    /// Services as child processes of these binaries (in this process by default).
    pub fn processes(mut self, binaries: Binaries) -> Self {
        self.binaries = Some(binaries);
        self
    }

    /// Whether to start an llm-gateway (yes by default).
    pub fn gateway(mut self, on: bool) -> Self {
        self.gateway = on;
        self
    }

    /// How many masters (1 by default; 0 for a gateway alone).
    pub fn masters(mut self, n: usize) -> Self {
        self.masters = n;
        self
    }

    /// How many workers (none by default).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// The gateway's port (any free one by default).
    pub fn gateway_port(mut self, port: u16) -> Self {
        self.gateway_port = port;
        self
    }

    /// The masters' ports, in order; those not given get any free one.
    pub fn master_ports(mut self, ports: Vec<u16>) -> Self {
        self.master_ports = ports;
        self
    }

    /// The workers' ports, in order; those not given get any free one.
    pub fn worker_ports(mut self, ports: Vec<u16>) -> Self {
        self.worker_ports = ports;
        self
    }

    /// Words added to the error when a port is taken (how to pick another).
    pub fn port_hint(mut self, hint: impl Into<String>) -> Self {
        self.port_hint = hint.into();
        self
    }

    /// The key clients and operators use (a random one by default).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Where configurations start from ([`Base::Defaults`] by default).
    pub fn base(mut self, base: Base) -> Self {
        self.base = base;
        self
    }

    /// Changes the gateway's configuration after the builder's wiring.
    pub fn gateway_config(
        mut self,
        f: impl FnOnce(&mut llm_gateway::Config) + Send + 'static,
    ) -> Self {
        self.gateway_config = Some(Box::new(f));
        self
    }

    /// Changes master `i`'s configuration after the builder's wiring.
    pub fn master_config(
        mut self,
        f: impl FnMut(usize, &mut master::Config) + Send + 'static,
    ) -> Self {
        self.master_config = Some(Box::new(f));
        self
    }

    /// Changes worker `i`'s configuration after the builder's wiring.
    pub fn worker_config(
        mut self,
        f: impl FnMut(usize, &mut worker::Config) + Send + 'static,
    ) -> Self {
        self.worker_config = Some(Box::new(f));
        self
    }

    /// One more environment variable for every child process (after its configuration's:
    /// `RUST_LOG`, say, which is `warn` otherwise).
    pub fn child_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.child_env.push((name.into(), value.into()));
        self
    }

    /// How long start-up may take (30 s by default).
    pub fn ready_within(mut self, within: Duration) -> Self {
        self.ready_within = within;
        self
    }

    /// Starts everything and waits until it is ready: the gateway and the masters answer
    /// `/ready`, the workers `/health`, and the first master lists every worker. On
    /// failure, whatever started is stopped again.
    pub async fn start(mut self) -> anyhow::Result<System> {
        let memory = matches!(self.store, Store::Memory);
        if memory && self.binaries.is_some() {
            bail!("the in-memory store lives in the master: it needs in-process services");
        }
        if self.workers > 0 && self.masters == 0 {
            bail!("workers need a master");
        }
        // Bind first: port 0 works and every URL is known before anything is wired.
        let gateway = match self.gateway {
            true => Some(self.bind("llm-gateway", self.gateway_port).await?),
            false => None,
        };
        let mut masters = Vec::new();
        for i in 0..self.masters {
            let port = self.master_ports.get(i).copied().unwrap_or(0);
            masters.push(
                self.bind(&numbered("master", i, self.masters), port)
                    .await?,
            );
        }
        let mut workers = Vec::new();
        for i in 0..self.workers {
            let port = self.worker_ports.get(i).copied().unwrap_or(0);
            workers.push(self.bind(&format!("worker {}", i + 1), port).await?);
        }

        let (redis, redis_settings) = open_store(&self.store).await?;
        let dir = tempfile::Builder::new()
            .prefix("ensemble-system-")
            .tempdir()
            .context("cannot create a temp dir for the system's logs")?;
        let api_key = self
            .api_key
            .clone()
            .filter(|k| !k.is_empty())
            .unwrap_or_else(random_key);
        let mut wiring = Wiring {
            binaries: self.binaries.clone(),
            base: self.base.clone(),
            store: self.store.clone(),
            redis: redis_settings,
            master_urls: masters.iter().map(|(_, url)| url.clone()).collect(),
            gateway_url: gateway.as_ref().map(|(_, url)| url.clone()),
            worker_token: random_key(),
            gateway_token: random_key(),
            child_env: self.child_env.clone(),
            dir,
            started_workers: 0,
        };

        let gateway_config = match &gateway {
            Some((_, url)) => Some(wiring.gateway_config(url, self.gateway_config.take())?),
            None => None,
        };
        if let Some(config) = &gateway_config {
            wiring.gateway_token = config.gateway_token.expose().to_string();
        }
        let mut master_configs = Vec::new();
        for (i, (_, url)) in masters.iter().enumerate() {
            let mut config = wiring.master_config(url, &api_key)?;
            if let Some(f) = self.master_config.as_mut() {
                f(i, &mut config);
            }
            master_configs.push(validated(config, &numbered("master", i, self.masters))?);
        }
        if let Some(first) = master_configs.first() {
            wiring.worker_token = first.worker_token.expose().to_string();
        }
        let mut worker_configs = Vec::new();
        for (i, (_, url)) in workers.iter().enumerate() {
            let mut config = wiring.worker_config(i, url)?;
            if let Some(f) = self.worker_config.as_mut() {
                f(i, &mut config);
            }
            let name = worker_name(&config, i);
            worker_configs.push(validated(config, &name)?);
        }
        wiring.started_workers = worker_configs.len();
        let operator_key = master_configs
            .first()
            .map(|c| first_key(&c.operator_api_keys))
            .unwrap_or_default();

        let mut system = System {
            redis,
            gateway: None,
            masters: Vec::new(),
            workers: Vec::new(),
            api_key,
            operator_key,
            gateway_config: gateway_config.clone(),
            master_configs: master_configs.clone(),
            worker_configs: worker_configs.clone(),
            wiring,
        };
        let started = system
            .spawn_all(gateway, masters, workers, self.ready_within)
            .await;
        match started {
            Ok(()) => Ok(system),
            Err(e) => {
                system.stop().await;
                Err(e)
            }
        }
    }

    async fn bind(&self, what: &str, port: u16) -> anyhow::Result<(TcpListener, String)> {
        let listener = if port == 0 && self.binaries.is_some() {
            // A child binds it after this listener is dropped (see `reserve_port`).
            reserved().with_context(|| format!("no free port for the {what}"))?
        } else {
            TcpListener::bind(("127.0.0.1", port))
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on 127.0.0.1:{port} for the {what}{}",
                        self.port_hint
                    )
                })?
        };
        let url = format!("http://{}", listener.local_addr()?);
        Ok((listener, url))
    }
}

/// `name` alone when there is one, else `name-i`.
fn numbered(name: &str, i: usize, of: usize) -> String {
    if of == 1 {
        name.to_string()
    } else {
        format!("{name}-{i}")
    }
}

/// A worker's name: its id, or `worker-N` when it generates one.
fn worker_name(config: &worker::Config, i: usize) -> String {
    config
        .agent_id
        .clone()
        .unwrap_or_else(|| format!("worker-{}", i + 1))
}

/// `config`, if it is valid; the error names the service.
fn validated<T: Settings>(config: T, name: &str) -> anyhow::Result<T> {
    config
        .validate()
        .with_context(|| format!("the {name}'s configuration is invalid"))?;
    Ok(config)
}

/// 32 random hex characters.
pub fn random_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The key of the first `name:key` entry of a key list.
fn first_key(keys: &Secret) -> String {
    let first = keys.expose().split(',').next().unwrap_or_default();
    first
        .split_once(':')
        .map_or(first, |(_, key)| key)
        .trim()
        .to_string()
}

/// Starts the system's own redis-server, if it has one, and returns the Redis settings the
/// services get. In memory mode they point at a closed port, so the workers' heartbeats
/// fail fast.
async fn open_store(store: &Store) -> anyhow::Result<(Option<RedisServer>, RedisSettings)> {
    match store {
        Store::OwnRedis(options) => {
            let options = options.clone();
            let redis = tokio::task::spawn_blocking(move || RedisServer::try_start(options))
                .await?
                .context("cannot start redis-server")?;
            let settings = redis.service_settings();
            Ok((Some(redis), settings))
        }
        Store::Url(url) => Ok((None, RedisSettings::from_url(url.clone()))),
        Store::Memory => {
            let closed = crate::free_port();
            let settings = RedisSettings {
                connect_timeout_ms: 200,
                ..RedisSettings::from_url(format!("redis://127.0.0.1:{closed}"))
            };
            Ok((None, settings))
        }
    }
}

/// What every service needs to know about the others, kept for adding workers later.
struct Wiring {
    binaries: Option<Binaries>,
    base: Base,
    store: Store,
    /// The Redis settings services get (only the URL of it with [`Store::Url`]).
    redis: RedisSettings,
    master_urls: Vec<String>,
    gateway_url: Option<String>,
    worker_token: String,
    gateway_token: String,
    child_env: Vec<(String, String)>,
    /// Child processes' logs and configuration files.
    dir: tempfile::TempDir,
    /// Workers made so far (the next one's index).
    started_workers: usize,
}

impl Wiring {
    fn redis_into(&self, redis: &mut RedisSettings) {
        match self.store {
            Store::Url(_) => redis.url = self.redis.url.clone(),
            Store::OwnRedis(_) | Store::Memory => *redis = self.redis.clone(),
        }
    }

    fn gateway_config(
        &self,
        url: &str,
        customise: Option<GatewayConfigFn>,
    ) -> anyhow::Result<llm_gateway::Config> {
        let mut config: llm_gateway::Config = self.base.load()?;
        config.host = "127.0.0.1".into();
        config.port = port_of(url);
        config.gateway_token = Secret::new(self.gateway_token.clone());
        // On the system's Redis the gateway keeps its ledger, cache and replay records
        // beside the tasks (same prefix), so the master shows each task's model usage.
        let shares_redis = match &self.store {
            Store::OwnRedis(_) => true,
            Store::Url(url) => !url.is_empty(),
            Store::Memory => false,
        };
        if shares_redis {
            config.use_redis = true;
            self.redis_into(&mut config.redis);
        }
        if let Some(f) = customise {
            f(&mut config);
        }
        validated(config, "llm-gateway")
    }

    fn master_config(&self, url: &str, api_key: &str) -> anyhow::Result<master::Config> {
        let mut config: master::Config = self.base.load()?;
        config.host = "127.0.0.1".into();
        config.port = port_of(url);
        self.redis_into(&mut config.redis);
        config.api_keys = Secret::new(format!("local:{api_key}"));
        config.operator_api_keys = Secret::new(format!("operator:{api_key}"));
        config.worker_token = Secret::new(self.worker_token.clone());
        // Everything runs on this machine, callback receivers included.
        config.callback_allow_private = true;
        if matches!(self.store, Store::Memory) {
            config.lease_ms = MEMORY_LEASE_MS;
        }
        Ok(config)
    }

    fn worker_config(&self, i: usize, url: &str) -> anyhow::Result<worker::Config> {
        let mut config: worker::Config = self.base.load()?;
        config.host = "127.0.0.1".into();
        config.port = port_of(url);
        self.redis_into(&mut config.redis);
        config.agent_id = Some(format!("worker-{}", i + 1));
        config.capabilities = vec![CAPABILITIES[i % CAPABILITIES.len()].to_string()];
        config.master_url = self.master_urls[i % self.master_urls.len()].clone();
        config.worker_token = Secret::new(self.worker_token.clone());
        config.advertise_url = Some(url.to_string());
        if let Some(gateway) = &self.gateway_url {
            config.llm_gateway_url = gateway.clone();
            config.gateway_token = Secret::new(self.gateway_token.clone());
            // LLM_MODEL names the gateway's model here; workers ask for its alias.
            config.llm_model = llm_gateway::config::DEFAULT_ALIAS.to_string();
        }
        Ok(config)
    }

    /// The child-process command for `role`, with `config` in its environment.
    fn command<T: Settings>(&self, role: Role, name: &str, config: &T) -> anyhow::Result<Command> {
        let binaries = self.binaries.as_ref().context("no binaries")?;
        let mut command = (binaries.0)(role);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .envs(child_env(config, self.dir.path(), name)?)
            .envs(self.child_env.iter().map(|(k, v)| (k, v)));
        Ok(command)
    }

    fn gateway(
        &self,
        listener: TcpListener,
        config: llm_gateway::Config,
    ) -> anyhow::Result<Service> {
        let name = "llm-gateway";
        let service = match self.binaries {
            None => Service::in_process(name, listener, |l, stop| {
                llm_gateway::serve(config, l, stop)
            })?,
            Some(_) => {
                let url = url_of(listener)?;
                let command = self.command(Role::Gateway, name, &config)?;
                Service::child(name, url, command, Some(self.dir.path()))?
            }
        };
        Ok(service.with_grace(STOP_GRACE))
    }

    fn master(
        &self,
        name: &str,
        listener: TcpListener,
        config: master::Config,
        workers: &[worker::Config],
    ) -> anyhow::Result<Service> {
        let service = match (&self.binaries, &self.store) {
            (None, Store::Memory) => {
                let known = workers
                    .iter()
                    .map(KnownWorkers::record)
                    .collect::<anyhow::Result<_>>()?;
                let backends = master::Backends {
                    store: Arc::new(MemoryStore::new()),
                    workers: Arc::new(KnownWorkers(known)),
                    events: None,
                };
                Service::in_process(name, listener, |l, stop| {
                    master::serve_with(config, l, stop, backends)
                })?
            }
            (None, _) => {
                Service::in_process(name, listener, |l, stop| master::serve(config, l, stop))?
            }
            (Some(_), _) => {
                let url = url_of(listener)?;
                let command = self.command(Role::Master, name, &config)?;
                Service::child(name, url, command, Some(self.dir.path()))?
            }
        };
        Ok(service.with_grace(STOP_GRACE))
    }

    fn worker(
        &self,
        name: String,
        listener: TcpListener,
        config: worker::Config,
    ) -> anyhow::Result<Service> {
        let grace = config.shutdown_grace() + Duration::from_secs(5);
        let service = match self.binaries {
            None => Service::in_process(name, listener, |l, stop| worker::serve(config, l, stop))?,
            Some(_) => {
                let url = url_of(listener)?;
                let command = self.command(Role::Worker, &name, &config)?;
                Service::child(name, url, command, Some(self.dir.path()))?
            }
        };
        Ok(service.with_grace(grace))
    }
}

/// The running system. Stop it with [`System::stop`]; dropped, each service stops on its
/// own (a child with SIGTERM, then SIGKILL).
pub struct System {
    /// Its own redis-server ([`Store::OwnRedis`]).
    pub redis: Option<RedisServer>,
    /// The gateway, when started.
    pub gateway: Option<Service>,
    /// The masters.
    pub masters: Vec<Service>,
    /// The workers, in the order they were made.
    pub workers: Vec<Service>,
    /// The key clients and operators use (`local` and `operator` unless the master's
    /// closure changed them).
    pub api_key: String,
    /// The first master's first operator key, for `/workers` and `/queues`.
    pub operator_key: String,
    /// The gateway's configuration as started.
    pub gateway_config: Option<llm_gateway::Config>,
    /// Each master's configuration as started.
    pub master_configs: Vec<master::Config>,
    /// Each worker's configuration as started.
    pub worker_configs: Vec<worker::Config>,
    wiring: Wiring,
}

impl System {
    /// A builder with the defaults: its own redis-server, a gateway, one master, no
    /// workers, in this process.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The first master's base URL.
    pub fn master_url(&self) -> &str {
        self.masters.first().map_or("", Service::url)
    }

    /// The gateway's base URL.
    pub fn gateway_url(&self) -> Option<&str> {
        self.gateway.as_ref().map(Service::url)
    }

    /// The Redis settings the services got.
    pub fn redis_settings(&self) -> &RedisSettings {
        &self.wiring.redis
    }

    /// Where child processes' logs and configuration files are.
    pub fn dir(&self) -> &Path {
        self.wiring.dir.path()
    }

    async fn spawn_all(
        &mut self,
        gateway: Option<(TcpListener, String)>,
        masters: Vec<(TcpListener, String)>,
        workers: Vec<(TcpListener, String)>,
        within: Duration,
    ) -> anyhow::Result<()> {
        if let (Some((listener, _)), Some(config)) = (gateway, self.gateway_config.clone()) {
            self.gateway = Some(self.wiring.gateway(listener, config)?);
        }
        let count = masters.len();
        for (i, ((listener, _), config)) in masters
            .into_iter()
            .zip(self.master_configs.clone())
            .enumerate()
        {
            let name = numbered("master", i, count);
            let master = self
                .wiring
                .master(&name, listener, config, &self.worker_configs)?;
            self.masters.push(master);
        }
        let configs = self.worker_configs.clone();
        for (i, ((listener, _), config)) in workers.into_iter().zip(configs).enumerate() {
            let worker = self
                .wiring
                .worker(worker_name(&config, i), listener, config)?;
            self.workers.push(worker);
        }
        self.wait_ready(within).await
    }

    /// Waits until every service answers and the first master lists every worker; fails
    /// early if a service ends.
    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Some(gateway) = self.gateway.as_mut() {
            gateway.wait_ready("/ready", left()).await?;
        }
        for master in &mut self.masters {
            master.wait_ready("/ready", left()).await?;
        }
        for worker in &mut self.workers {
            // `/ready` needs Redis, which a worker in memory mode never reaches.
            worker.wait_ready("/health", left()).await?;
        }
        self.wait_workers_listed(left()).await
    }

    /// Waits until the first master lists every worker of this system.
    async fn wait_workers_listed(&mut self, within: Duration) -> anyhow::Result<()> {
        let Some(master) = self.masters.first() else {
            return Ok(());
        };
        let ids: Vec<String> = self
            .worker_configs
            .iter()
            .filter_map(|c| c.agent_id.clone())
            .collect();
        let http = reqwest::Client::new();
        let url = format!("{}/workers", master.url());
        let deadline = tokio::time::Instant::now() + within;
        loop {
            for service in self.services_mut() {
                service.check_running()?;
            }
            let listed: Vec<String> = match http
                .get(&url)
                .bearer_auth(&self.operator_key)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => r
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|v| v.get("workers").and_then(Value::as_array).cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|w| w.get("id").and_then(Value::as_str).map(String::from))
                    .collect(),
                _ => Vec::new(),
            };
            let known = ids.iter().filter(|id| listed.contains(id)).count();
            if known == ids.len() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                // Child processes' logs say why; in-process services log to this process.
                let logs: String = self
                    .services_mut()
                    .filter(|s| s.pid().is_some())
                    .map(|s| format!("\n--- {}:\n{}", s.name(), tail(&s.log())))
                    .collect();
                bail!(
                    "the system did not come up within {within:?} (workers known to the master: \
                     {known} of {}){logs}",
                    ids.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts one more worker (wired like the others), changed by `customise`, and waits
    /// until it is ready and listed by the first master.
    pub async fn add_worker(
        &mut self,
        customise: impl FnOnce(&mut worker::Config),
    ) -> anyhow::Result<&mut Service> {
        let mut customise = Some(customise);
        self.add_workers(1, |_, config| {
            if let Some(f) = customise.take() {
                f(config);
            }
        })
        .await?;
        self.workers.last_mut().context("no worker")
    }

    /// Starts `n` more workers at once (wired like the others; worker `i`, counted over
    /// the system's life, changed by `customise(i, _)`), then waits until they are ready
    /// and listed by the first master. At once, so that workers added to a deep queue (the
    /// benchmark's Q3) start draining it together, not one start-up after another.
    pub async fn add_workers(
        &mut self,
        n: usize,
        mut customise: impl FnMut(usize, &mut worker::Config),
    ) -> anyhow::Result<()> {
        if matches!(self.wiring.store, Store::Memory) {
            bail!("in memory mode the master knows only the workers it started with");
        }
        for _ in 0..n {
            let i = self.wiring.started_workers;
            let listener = match self.wiring.binaries {
                Some(_) => reserved()?,
                None => TcpListener::bind("127.0.0.1:0").await?,
            };
            let url = url_of_listener(&listener)?;
            let mut config = self.wiring.worker_config(i, &url)?;
            customise(i, &mut config);
            let name = worker_name(&config, i);
            let config = validated(config, &name)?;
            self.wiring.started_workers += 1;
            let service = self.wiring.worker(name, listener, config.clone())?;
            self.worker_configs.push(config);
            self.workers.push(service);
        }
        let added = self.workers.len() - n;
        for service in &mut self.workers[added..] {
            service.wait_ready("/health", READY_TIMEOUT).await?;
        }
        self.wait_workers_listed(READY_TIMEOUT).await
    }

    /// Every service, workers first.
    fn services_mut(&mut self) -> impl Iterator<Item = &mut Service> {
        self.workers
            .iter_mut()
            .chain(self.masters.iter_mut())
            .chain(self.gateway.as_mut())
    }

    /// Waits until some service ends; returns its name and how.
    pub async fn first_exit(&mut self) -> (String, Exit) {
        let waits: Vec<_> = self
            .services_mut()
            .map(|s| {
                Box::pin(async move {
                    let exit = s.exited().await;
                    (s.name().to_string(), exit)
                })
            })
            .collect();
        if waits.is_empty() {
            return futures::future::pending().await;
        }
        futures::future::select_all(waits).await.0
    }

    /// Stops everything in order: workers (together), masters, the gateway, Redis.
    /// Services that end with an error or must be killed are logged.
    pub async fn stop(self) {
        self.stop_unless(futures::future::pending()).await;
    }

    /// [`Self::stop`], unless `hurry` completes first: then whatever is still stopping is
    /// killed at once (ctrl-c twice, say).
    pub async fn stop_unless(mut self, hurry: impl Future<Output = ()>) {
        let ordered = async {
            stop_together(&mut self.workers).await;
            stop_together(&mut self.masters).await;
            stop_together(self.gateway.as_mut()).await;
        };
        let hurried = tokio::select! {
            () = ordered => false,
            () = hurry => true,
        };
        if hurried {
            for service in self.services_mut() {
                service.kill().await;
            }
        }
        if let Some(mut redis) = self.redis.take() {
            let _ = tokio::task::spawn_blocking(move || redis.stop()).await;
        }
    }
}

/// Stops the services of one stage together (four workers draining at once take one grace
/// period, not four), logging those that end badly.
async fn stop_together<'a>(services: impl IntoIterator<Item = &'a mut Service>) {
    let stops = services.into_iter().map(|service| async move {
        match service.stop().await {
            Exit::Clean => {}
            Exit::Failed(e) => {
                tracing::error!(service = %service.name(), error = %e, "stopped with an error");
            }
            Exit::Killed => {}
        }
    });
    futures::future::join_all(stops).await;
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

fn url_of_listener(listener: &TcpListener) -> anyhow::Result<String> {
    Ok(format!("http://{}", listener.local_addr()?))
}

/// [`crate::reserve_port`] as a tokio listener.
fn reserved() -> std::io::Result<TcpListener> {
    let listener = crate::reserve_port()?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// A child binds its own port: the listener only reserved it until now.
fn url_of(listener: TcpListener) -> anyhow::Result<String> {
    url_of_listener(&listener)
}

/// A service configuration as a child process's environment: each setting the service
/// reads from a variable becomes that variable (`max_concurrency` → `MAX_CONCURRENCY`,
/// `redis.port` → `REDIS_PORT`, a list as JSON); settings no variable can carry (tables
/// such as `pipelines`) go to `{dir}/{name}.toml`, named by `ENSEMBLE_CONFIG`.
pub fn child_env<T: Settings>(
    config: &T,
    dir: &Path,
    name: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let vars = T::env_vars();
    let Value::Object(settings) = serde_json::to_value(config)? else {
        bail!("a configuration is not a table");
    };
    let mut env = Vec::new();
    let mut rest = serde_json::Map::new();
    for (key, value) in settings {
        if key == "redis"
            && let Value::Object(redis) = value
        {
            let mut redis_rest = serde_json::Map::new();
            for (key, value) in redis {
                let var = format!("REDIS_{}", key.to_ascii_uppercase());
                match env_text(&value) {
                    Some(text) if vars.contains(&var.as_str()) => env.push((var, text)),
                    _ if value.is_null() => {}
                    _ => {
                        redis_rest.insert(key, value);
                    }
                }
            }
            if !redis_rest.is_empty() {
                rest.insert("redis".into(), Value::Object(redis_rest));
            }
            continue;
        }
        let var = key.to_ascii_uppercase();
        match env_text(&value) {
            Some(text) if vars.contains(&var.as_str()) => env.push((var, text)),
            _ if value.is_null() => {}
            _ => {
                rest.insert(key, value);
            }
        }
    }
    if !rest.is_empty() {
        let file = dir.join(format!("{name}.toml"));
        let text = toml::to_string(&without_nulls(Value::Object(rest)))
            .context("cannot write the configuration as TOML")?;
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
        env.push((
            common::config::CONFIG_FILE_ENV.to_string(),
            file.display().to_string(),
        ));
    }
    Ok(env)
}

/// `value` without its `null`s, which TOML cannot write (an unset option is left out).
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

/// A setting as a variable's text; `None` for what a variable cannot carry (an empty
/// string counts as unset in the environment).
fn env_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
            Some(value.to_string())
        }
        _ => None,
    }
}

/// The workers the system started, for a master in memory mode, where workers cannot
/// register themselves.
struct KnownWorkers(Vec<WorkerRecord>);

impl KnownWorkers {
    /// The record a worker with `config` would register.
    fn record(config: &worker::Config) -> anyhow::Result<WorkerRecord> {
        Ok(WorkerRecord::starting(
            config.worker_id()?,
            config.advertise_url.clone().unwrap_or_default(),
            config
                .capabilities
                .iter()
                .map(|c| Capability::new(c.as_str()))
                .collect::<Result<_, _>>()?,
            config.max_concurrency,
        ))
    }
}

#[async_trait]
impl WorkerSource for KnownWorkers {
    async fn live(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        Ok(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    // `figment::Jail` closures return figment's (large) error type.
    #![allow(clippy::result_large_err)]

    use std::collections::BTreeMap;

    use common::wire::{StepDef, StepSpec};
    use master::config::PipelineConfig;

    use super::*;

    /// `child_env` of `config`, loaded back the way the service loads its settings.
    fn through_env<T: Settings + std::fmt::Debug>(config: &T) -> T {
        let dir = tempfile::tempdir().unwrap();
        let env = child_env(config, dir.path(), "service").unwrap();
        let mut loaded = None;
        figment::Jail::expect_with(|jail| {
            for (name, value) in &env {
                jail.set_env(name, value);
            }
            loaded = Some(common::config::load::<T>().unwrap());
            Ok(())
        });
        loaded.unwrap()
    }

    fn same<T: Settings>(a: &T, b: &T) {
        assert_eq!(
            serde_json::to_value(a).unwrap(),
            serde_json::to_value(b).unwrap()
        );
    }

    #[test]
    fn configs_reach_a_child_process_whole() {
        let redis = RedisSettings {
            key_prefix: "kit".into(),
            command_timeout_ms: 1_234,
            ..RedisSettings::from_url("redis://:secret@127.0.0.1:6390")
        };

        let mut worker = worker::Config {
            redis: redis.clone(),
            agent_id: Some("w-1".into()),
            capabilities: vec!["plan".into(), "retrieve".into()],
            max_concurrency: 7,
            heartbeat_interval_ms: 250,
            llm_temperature: Some(0.5),
            worker_token: Secret::new("12345"),
            ..worker::Config::default()
        };
        worker
            .prompts
            .insert("plan".into(), "Plan this: {input}".into());
        same(&through_env(&worker), &worker);

        let mut master = master::Config {
            redis,
            api_keys: Secret::new("a:key-aaaa-1111,b:key-bbbb-2222"),
            worker_token: Secret::new("token-0123456789"),
            lease_ms: 4_321,
            callback_allow_private: true,
            ..master::Config::default()
        };
        master.pipelines = BTreeMap::from([(
            "two".to_string(),
            PipelineConfig {
                steps: vec![
                    StepSpec::Name(Capability::new("plan").unwrap()),
                    StepSpec::Def(Box::new(StepDef {
                        capability: Some(Capability::new("finalize").unwrap()),
                        max_attempts: Some(2),
                        ..StepDef::default()
                    })),
                ],
            },
        )]);
        same(&through_env(&master), &master);

        let mut gateway = llm_gateway::Config {
            gateway_token: Secret::new("g"),
            max_retries: 5,
            ..llm_gateway::Config::default()
        };
        gateway.models.insert(
            "fast".into(),
            llm_gateway::config::AliasConfig {
                targets: vec![llm_gateway::config::Target {
                    provider: llm_gateway::config::ProviderKind::Mock,
                    model: "m".into(),
                }],
                cache_ttl_s: None,
            },
        );
        same(&through_env(&gateway), &gateway);
    }

    #[test]
    fn keys_are_32_random_hex_characters() {
        let (a, b) = (random_key(), random_key());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn the_first_key_of_a_key_list() {
        assert_eq!(first_key(&Secret::new("ops:k1, other:k2")), "k1");
        assert_eq!(first_key(&Secret::new("")), "");
    }
}

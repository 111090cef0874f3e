//! Starts what a benchmark needs (its own redis-server, the master, workers, the gateway),
//! inside this process or as child processes, and reads their peak RSS and CPU time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::redis::RedisSettings;
use testkit::RedisServer;
use common::wire::Capability;
use master::config::{PipelineConfig, StepConfig};
use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The pipeline every queue benchmark submits: one `echo` step.
pub const PIPELINE: &str = "bench";
/// The capability it needs.
pub const CAPABILITY: &str = "echo";

/// How services are started.
#[derive(Clone, Debug)]
pub struct Launch {
    /// As child processes (else as tasks in this process).
    pub processes: bool,
    /// Where the `master`, `worker` and `llm-gateway` binaries are.
    pub bin_dir: PathBuf,
    /// Extra environment for every child process (after the bench's own settings).
    pub extra_env: Vec<(String, String)>,
}

impl Launch {
    /// From the flags: `--bin-dir`, or the directory of this binary.
    pub fn new(
        processes: bool,
        bin_dir: Option<PathBuf>,
        extra_env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let bin_dir = match bin_dir {
            Some(dir) => dir,
            None => std::env::current_exe()
                .context("cannot find this binary's directory")?
                .parent()
                .map(Path::to_path_buf)
                .context("this binary has no directory")?,
        };
        if processes {
            for name in ["master", "worker", "llm-gateway"] {
                if !bin_dir.join(name).is_file() {
                    bail!(
                        "--processes needs `{}`; build it with `cargo build --release -p master \
                         -p worker -p llm-gateway` into the same target directory, or pass --bin-dir",
                        bin_dir.join(name).display()
                    );
                }
            }
        }
        Ok(Self {
            processes,
            bin_dir,
            extra_env,
        })
    }

    /// Runs `serve` as a task of this process, with a shutdown token of its own.
    fn task<F, Fut>(name: &str, serve: F) -> Service
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(serve(shutdown.clone()));
        Service::Task {
            shutdown,
            handle,
            name: name.into(),
        }
    }

    /// Starts `binary` of the bin dir as a child with `env` (and nothing else from ours but
    /// `PATH`); its stderr goes to `{logs}/{name}.log`.
    fn process(
        &self,
        name: &str,
        binary: &str,
        env: &[(&str, String)],
        logs: &Path,
    ) -> anyhow::Result<Service> {
        let log_path = logs.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let child = tokio::process::Command::new(self.bin_dir.join(binary))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin_dir.join(binary).display()))?;
        Ok(Service::Process {
            child,
            name: name.into(),
            log: log_path,
        })
    }
}

/// A running service.
pub enum Service {
    /// `serve` running in this process.
    Task {
        /// Stops it.
        shutdown: CancellationToken,
        /// Its result.
        handle: JoinHandle<anyhow::Result<()>>,
        /// For messages.
        name: String,
    },
    /// A child process.
    Process {
        /// The child (killed on drop).
        child: tokio::process::Child,
        /// For messages.
        name: String,
        /// Where its stderr goes.
        log: PathBuf,
    },
}

impl Service {
    /// The process id, for a child process.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Task { .. } => None,
            Self::Process { child, .. } => child.id(),
        }
    }

    /// Peak RSS and CPU time: the child's, or this whole process's when in-process.
    pub fn usage(&self) -> Option<Usage> {
        match self.pid() {
            Some(pid) => Usage::of(&pid.to_string()),
            None => Usage::of("self"),
        }
    }

    /// Fails if the service has already stopped (with its log for a child).
    fn check_running(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Task { handle, name, .. } => {
                if handle.is_finished() {
                    bail!("{name} stopped at start-up");
                }
            }
            Self::Process {
                child, name, log, ..
            } => {
                if let Ok(Some(status)) = child.try_wait() {
                    let text = std::fs::read_to_string(log).unwrap_or_default();
                    bail!("{name} exited with {status}:\n{text}");
                }
            }
        }
        Ok(())
    }

    /// Stops it: cancels the task (and waits for it), or kills the child.
    pub async fn stop(self) {
        match self {
            Self::Task {
                shutdown, handle, ..
            } => {
                shutdown.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(20), handle).await;
            }
            Self::Process { mut child, .. } => {
                let _ = child.kill().await;
            }
        }
    }
}

/// What a process used, from `/proc/PID/status` and `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Peak resident set size (`VmHWM`), in MiB.
    pub peak_rss_mb: f64,
    /// User + system CPU time so far, in seconds.
    pub cpu_secs: f64,
}

impl Usage {
    /// For `/proc/{pid}` (`self` for this process); `None` off Linux or once it is gone.
    pub fn of(pid: &str) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let hwm_kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces) start at field 3;
        // utime and stime are fields 14 and 15, in USER_HZ ticks (100 per second on Linux).
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i - 3)?.parse::<f64>().ok();
        Some(Self {
            peak_rss_mb: hwm_kb / 1024.0,
            cpu_secs: (ticks(14)? + ticks(15)?) / 100.0,
        })
    }
}

/// Load averages from `/proc/loadavg` (1, 5, 15 minutes).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Redis figures at one moment: calls per command and the server's CPU time.
#[derive(Clone, Debug, Default)]
pub struct RedisStats {
    /// `INFO commandstats`: command → calls.
    pub calls: BTreeMap<String, u64>,
    /// `INFO cpu`: `used_cpu_user + used_cpu_sys`, in seconds.
    pub cpu_secs: f64,
}

impl RedisStats {
    /// Reads them from the server at `url`.
    pub async fn read(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).context("bad Redis URL")?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .context("cannot connect to Redis")?;
        let commands: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await?;
        let cpu: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await?;
        Ok(Self::parse(&commands, &cpu))
    }

    /// Parses `INFO commandstats` and `INFO cpu` text.
    pub fn parse(commands: &str, cpu: &str) -> Self {
        let calls = commands
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))?
                    .parse()
                    .ok()?;
                Some((name.to_string(), calls))
            })
            .collect();
        let field = |name: &str| {
            cpu.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Self {
            calls,
            cpu_secs: field("used_cpu_user") + field("used_cpu_sys"),
        }
    }

    /// Calls per command between `before` and `self`, without the `INFO` calls the bench
    /// made itself.
    pub fn since(&self, before: &Self) -> BTreeMap<String, u64> {
        self.calls
            .iter()
            .filter(|(name, _)| name.as_str() != "info")
            .map(|(name, n)| {
                let was = before.calls.get(name).copied().unwrap_or(0);
                (name.clone(), n.saturating_sub(was))
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// Redis, a master and its workers.
pub struct QueueCluster {
    launch: Launch,
    /// Our own redis-server (none when targeting a running master).
    _redis: Option<RedisServer>,
    redis_url: Option<String>,
    settings: Option<RedisSettings>,
    /// The master's base URL.
    pub master_url: String,
    /// The pipeline to submit.
    pub pipeline: String,
    master: Option<Service>,
    workers: Vec<Service>,
    /// Config files and logs of child processes.
    dir: tempfile::TempDir,
}

impl QueueCluster {
    /// Starts a redis-server on a free port and a master on it, without workers.
    pub async fn start(launch: &Launch) -> anyhow::Result<Self> {
        let redis = tokio::task::spawn_blocking(RedisServer::start).await?;
        let settings = RedisSettings {
            pool_size: 32,
            command_timeout_ms: 10_000,
            ..redis.settings()
        };
        let dir = tempfile::Builder::new()
            .prefix("ensemble-bench-")
            .tempdir()?;
        let listener = common::http::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let master_url = format!("http://127.0.0.1:{port}");
        let master = if launch.processes {
            drop(listener);
            let toml = dir.path().join("master.toml");
            std::fs::write(
                &toml,
                format!("[pipelines.{PIPELINE}]\nsteps = [\"{CAPABILITY}\"]\n"),
            )?;
            let env = [
                ("ENSEMBLE_CONFIG", toml.display().to_string()),
                ("HOST", "127.0.0.1".into()),
                ("PORT", port.to_string()),
                ("REDIS_URL", redis.url()),
                ("REDIS_KEY_PREFIX", settings.key_prefix.clone()),
                ("REDIS_POOL_SIZE", settings.pool_size.to_string()),
                ("AUTH_DISABLED", "true".into()),
                ("RATE_LIMIT_PER_SEC", "0".into()),
                ("LONG_POLL_MAX_PER_CLIENT", BENCH_LONG_POLLS.to_string()),
            ];
            launch.process("master", "master", &env, dir.path())?
        } else {
            let config = master_config(settings.clone())?;
            Launch::task("master", |shutdown| {
                master::serve(config, listener, shutdown)
            })
        };
        let mut cluster = Self {
            launch: launch.clone(),
            redis_url: Some(redis.url()),
            _redis: Some(redis),
            settings: Some(settings),
            master_url,
            pipeline: PIPELINE.into(),
            master: Some(master),
            workers: Vec::new(),
            dir,
        };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// A running master (with its workers) and, optionally, its Redis.
    pub fn external(
        master_url: &str,
        redis_url: Option<String>,
        pipeline: &str,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            launch: Launch {
                processes: false,
                bin_dir: PathBuf::new(),
                extra_env: Vec::new(),
            },
            _redis: None,
            redis_url,
            settings: None,
            master_url: master_url.trim_end_matches('/').to_string(),
            pipeline: pipeline.into(),
            master: None,
            workers: Vec::new(),
            dir: tempfile::tempdir()?,
        })
    }

    /// Whether this cluster was started here (so workers can be added).
    pub fn owned(&self) -> bool {
        self.settings.is_some()
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let http = crate::client::http_client(1);
        let url = format!("{}/ready", self.master_url);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(master) = self.master.as_mut() {
                master.check_running()?;
            }
            if http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the master at {} was not ready within 30 s",
                    self.master_url
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts `count` echo workers sharing `slots` between them and waits until the master
    /// lists them all.
    pub async fn start_workers(&mut self, count: usize, slots: u32) -> anyhow::Result<()> {
        let Some(settings) = self.settings.clone() else {
            bail!("workers can only be added to a cluster this bench started");
        };
        let count = count.max(1);
        for i in 0..count {
            // Spread the slots as evenly as possible: 16 over 3 workers is 6, 5, 5.
            let share = slots / count as u32 + u32::from((i as u32) < slots % count as u32);
            let listener = common::http::bind("127.0.0.1:0").await?;
            let port = listener.local_addr()?.port();
            let name = format!("worker-{}", self.workers.len() + 1);
            let advertise = format!("http://127.0.0.1:{port}");
            let service = if self.launch.processes {
                drop(listener);
                let env = [
                    ("HOST", "127.0.0.1".to_string()),
                    ("PORT", port.to_string()),
                    ("AGENT_ID", format!("bench-{name}")),
                    ("CAPABILITIES", CAPABILITY.into()),
                    ("AGENT_KIND", "echo".into()),
                    ("MAX_CONCURRENCY", share.max(1).to_string()),
                    ("MASTER_URL", self.master_url.clone()),
                    ("ADVERTISE_URL", advertise),
                    ("AUTH_DISABLED", "true".into()),
                    ("REDIS_URL", self.redis_url.clone().unwrap_or_default()),
                    ("REDIS_KEY_PREFIX", settings.key_prefix.clone()),
                ];
                self.launch
                    .process(&name, "worker", &env, self.dir.path())?
            } else {
                let config = worker::Config {
                    host: "127.0.0.1".into(),
                    port,
                    redis: settings.clone(),
                    agent_id: Some(format!("bench-{name}")),
                    capabilities: vec![CAPABILITY.into()],
                    master_url: self.master_url.clone(),
                    auth_disabled: true,
                    max_concurrency: share.max(1),
                    advertise_url: Some(advertise),
                    agent_kind: worker::AgentKind::Echo,
                    ..worker::Config::default()
                };
                Launch::task(&name, |shutdown| worker::serve(config, listener, shutdown))
            };
            self.workers.push(service);
        }
        let client = crate::client::MasterClient::new(&self.master_url, &self.pipeline, 1);
        let want = self.workers.len();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for w in &mut self.workers {
                w.check_running()?;
            }
            if client.live_workers(CAPABILITY).await.unwrap_or(0) >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the master did not list {want} live workers within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Redis's command counts and CPU time now (`None` without a Redis URL).
    pub async fn redis_stats(&self) -> anyhow::Result<Option<RedisStats>> {
        match &self.redis_url {
            Some(url) => Ok(Some(RedisStats::read(url).await?)),
            None => Ok(None),
        }
    }

    /// The master's usage (the whole bench process when in-process; `None` when external).
    pub fn master_usage(&self) -> Option<Usage> {
        self.master.as_ref().and_then(Service::usage)
    }

    /// Each worker's usage (child processes only).
    pub fn worker_usage(&self) -> Vec<Usage> {
        self.workers
            .iter()
            .filter(|w| w.pid().is_some())
            .filter_map(Service::usage)
            .collect()
    }

    /// Whether services run as child processes (so usage is per service).
    pub fn per_process(&self) -> bool {
        self.launch.processes && self.master.is_some()
    }

    /// Stops workers, then the master; the redis-server goes on drop.
    pub async fn stop(mut self) {
        for w in self.workers.drain(..) {
            w.stop().await;
        }
        if let Some(m) = self.master.take() {
            m.stop().await;
        }
    }
}

/// The master's settings for a benchmark: no rate limit, no auth, the `bench` pipeline.
fn master_config(redis: RedisSettings) -> anyhow::Result<master::Config> {
    let mut pipelines = BTreeMap::new();
    pipelines.insert(
        PIPELINE.to_string(),
        PipelineConfig {
            steps: vec![StepConfig::Name(Capability::new(CAPABILITY)?)],
        },
    );
    Ok(master::Config {
        host: "127.0.0.1".into(),
        port: 0,
        redis,
        auth_disabled: true,
        rate_limit_per_sec: 0.0,
        long_poll_max_per_client: BENCH_LONG_POLLS,
        pipelines,
        ..master::Config::default()
    })
}

/// Every benchmark request is client `anonymous` (no auth), so the per-client long-poll
/// cap would be the whole benchmark's: lift it to the process's total, as the rate limit
/// is lifted.
const BENCH_LONG_POLLS: usize = 2_000;

/// The gateway, in-process or as a child, with the `default` alias on the Gemini provider
/// pointed at `gemini_base_url`.
pub struct Gateway {
    /// Its base URL.
    pub url: String,
    service: Service,
    _dir: tempfile::TempDir,
}

/// The Gemini key the fake upstream expects.
pub const FAKE_GEMINI_KEY: &str = testkit::fakes::gemini::GEMINI_KEY;
/// The Gemini model name behind the `default` alias.
pub const FAKE_GEMINI_MODEL: &str = "bench-model";

impl Gateway {
    /// Starts a gateway whose `default` alias calls Gemini at `gemini_base_url`.
    pub async fn start(launch: &Launch, gemini_base_url: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ensemble-bench-")
            .tempdir()?;
        let listener = common::http::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let service = if launch.processes {
            drop(listener);
            let env = [
                ("HOST", "127.0.0.1".to_string()),
                ("PORT", port.to_string()),
                ("AUTH_DISABLED", "true".into()),
                ("LLM_PROVIDER", "gemini".into()),
                ("LLM_MODEL", FAKE_GEMINI_MODEL.into()),
                ("GEMINI_API_KEY", FAKE_GEMINI_KEY.into()),
                ("GEMINI_BASE_URL", gemini_base_url.into()),
            ];
            launch.process("llm-gateway", "llm-gateway", &env, dir.path())?
        } else {
            let config = llm_gateway::Config {
                host: "127.0.0.1".into(),
                port,
                auth_disabled: true,
                llm_provider: llm_gateway::config::ProviderKind::Gemini,
                llm_model: FAKE_GEMINI_MODEL.into(),
                gemini_api_key: common::config::Secret::new(FAKE_GEMINI_KEY.to_string()),
                gemini_base_url: gemini_base_url.into(),
                ..llm_gateway::Config::default()
            };
            Launch::task("llm-gateway", |shutdown| {
                llm_gateway::serve(config, listener, shutdown)
            })
        };
        let mut gateway = Self {
            url: format!("http://127.0.0.1:{port}"),
            service,
            _dir: dir,
        };
        let http = crate::client::http_client(1);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            gateway.service.check_running()?;
            let ready = http.get(format!("{}/ready", gateway.url)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(gateway);
            }
            if Instant::now() > deadline {
                bail!("the gateway was not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its usage (the whole process when in-process).
    pub fn usage(&self) -> Option<Usage> {
        self.service.usage()
    }

    /// Stops it.
    pub async fn stop(self) {
        self.service.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_are_parsed_and_diffed() {
        let before = RedisStats::parse(
            "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=5,usec_per_call=0.5\r\n\
             cmdstat_info:calls=1,usec=1,usec_per_call=1\r\n",
            "used_cpu_sys:1.5\r\nused_cpu_user:2.0\r\n",
        );
        let after = RedisStats::parse(
            "cmdstat_evalsha:calls=25,usec=9\r\ncmdstat_info:calls=3,usec=1\r\n\
             cmdstat_publish:calls=4,usec=1\r\n",
            "used_cpu_sys:2.0\r\nused_cpu_user:3.0\r\n",
        );
        assert_eq!(before.cpu_secs, 3.5);
        let diff = after.since(&before);
        assert_eq!(diff.get("evalsha"), Some(&15));
        assert_eq!(diff.get("publish"), Some(&4));
        assert_eq!(diff.get("info"), None);
    }

    #[test]
    fn own_usage_is_readable() {
        let usage = Usage::of("self").expect("Linux /proc");
        assert!(usage.peak_rss_mb > 0.0);
    }
}

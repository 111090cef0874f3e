//! Starts what a benchmark needs (its own redis-server, the master, workers, the gateway)
//! with the test kit's system builder, inside this process or as child processes, and
//! reads what is the benchmark's own: peak RSS and CPU time by pid, and Redis's command
//! counts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use common::redis::RedisSettings;
use common::wire::{Capability, StepSpec};
use master::config::PipelineConfig;
use testkit::system::Builder;
use testkit::{Binaries, RedisOptions, Service, Store, System};

/// The pipeline every queue benchmark submits: one `echo` step.
pub const PIPELINE: &str = "bench";
/// The capability it needs.
pub const CAPABILITY: &str = "echo";

/// How services are started.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The `master`, `worker` and `llm-gateway` binaries, with `--processes` (else the
    /// services run as tasks in this process).
    binaries: Option<Binaries>,
    /// Extra environment for every child process (after the bench's own settings).
    extra_env: Vec<(String, String)>,
    /// Extra arguments for the redis-server the bench starts.
    redis_args: Vec<String>,
}

impl Launch {
    /// From the flags: `--bin-dir`, or the directory of this binary.
    pub fn new(
        processes: bool,
        bin_dir: Option<PathBuf>,
        extra_env: Vec<(String, String)>,
        redis_args: Vec<String>,
    ) -> anyhow::Result<Self> {
        let binaries = if processes {
            let dir = match bin_dir {
                Some(dir) => dir,
                None => std::env::current_exe()
                    .context("cannot find this binary's directory")?
                    .parent()
                    .map(Path::to_path_buf)
                    .context("this binary has no directory")?,
            };
            Binaries::check_dir(&dir).context(
                "--processes needs the service binaries; build them with `cargo build --release \
                 -p master -p worker -p llm-gateway` into the same target directory, or pass \
                 --bin-dir",
            )?;
            Some(Binaries::in_dir(dir))
        } else {
            None
        };
        Ok(Self {
            binaries,
            extra_env,
            redis_args,
        })
    }

    /// Whether services run as child processes (so usage is per service).
    fn processes(&self) -> bool {
        self.binaries.is_some()
    }

    /// A system builder that starts services this way.
    fn builder(&self) -> Builder {
        let mut builder = System::builder().store(Store::OwnRedis(RedisOptions {
            extra_args: self.redis_args.clone(),
            ..RedisOptions::default()
        }));
        if let Some(binaries) = &self.binaries {
            builder = builder.processes(binaries.clone());
        }
        for (name, value) in &self.extra_env {
            builder = builder.child_env(name, value);
        }
        builder
    }
}

/// Peak RSS and CPU time of a service: the child's, or this whole process's when
/// in-process.
fn usage(service: &Service) -> Option<Usage> {
    match service.pid() {
        Some(pid) => Usage::of(&pid.to_string()),
        None => Usage::of("self"),
    }
}

/// What a process used, from `/proc/PID/status` and `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Peak resident set size (`VmHWM`), in MiB.
    pub peak_rss_mb: f64,
    /// Resident set size now (`VmRSS`), in MiB: what the soak samples over time.
    pub rss_mb: f64,
    /// User + system CPU time so far, in seconds.
    pub cpu_secs: f64,
}

impl Usage {
    /// For `/proc/{pid}` (`self` for this process); `None` off Linux or once it is gone.
    pub fn of(pid: &str) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb = |field: &str| -> Option<f64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        };
        let (hwm_kb, rss_kb) = (kb("VmHWM:")?, kb("VmRSS:")?);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces) start at field 3;
        // utime and stime are fields 14 and 15, in USER_HZ ticks (100 per second on Linux).
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i - 3)?.parse::<f64>().ok();
        Some(Self {
            peak_rss_mb: hwm_kb / 1024.0,
            rss_mb: rss_kb / 1024.0,
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

/// A connection to the Redis at `url`, for the bench's own reads. Some take seconds (S1's
/// `MEMORY USAGE … SAMPLES 0` of a sorted set of millions): no 500 ms response timeout.
pub async fn connect(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).context("bad Redis URL")?;
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(std::time::Duration::from_secs(120)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("cannot connect to Redis")
}

/// Redis figures at one moment: calls per command and the server's CPU time.
#[derive(Clone, Debug, Default)]
pub struct RedisStats {
    /// `INFO commandstats`: command → calls.
    pub calls: BTreeMap<String, u64>,
    /// `INFO commandstats`: command → µs spent running it (a script's own time includes the
    /// commands it calls, which are also counted under their names).
    pub usec: BTreeMap<String, u64>,
    /// `INFO cpu`: `used_cpu_user + used_cpu_sys`, in seconds.
    pub cpu_secs: f64,
}

impl RedisStats {
    /// Reads them from the server at `url`.
    pub async fn read(url: &str) -> anyhow::Result<Self> {
        let mut conn = connect(url).await?;
        let commands: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await?;
        let cpu: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await?;
        Ok(Self::parse(&commands, &cpu))
    }

    /// Parses `INFO commandstats` and `INFO cpu` text.
    pub fn parse(commands: &str, cpu: &str) -> Self {
        let stat = |key: &str| -> BTreeMap<String, u64> {
            commands
                .lines()
                .filter_map(|l| {
                    let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                    let value = rest
                        .split(',')
                        .find_map(|kv| kv.strip_prefix(key))?
                        .parse()
                        .ok()?;
                    Some((name.to_string(), value))
                })
                .collect()
        };
        let field = |name: &str| {
            cpu.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Self {
            calls: stat("calls="),
            usec: stat("usec="),
            cpu_secs: field("used_cpu_user") + field("used_cpu_sys"),
        }
    }

    /// µs per command between `before` and `self`, most first, without the bench's `INFO`.
    pub fn usec_since(&self, before: &Self) -> Vec<(String, u64)> {
        let mut rows: Vec<(String, u64)> = self
            .usec
            .iter()
            .filter(|(name, _)| name.as_str() != "info")
            .map(|(name, n)| {
                let was = before.usec.get(name).copied().unwrap_or(0);
                (name.clone(), n.saturating_sub(was))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        rows.sort_by_key(|row| std::cmp::Reverse(row.1));
        rows
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
    /// What this bench started (none when targeting a running master).
    system: Option<System>,
    redis_url: Option<String>,
    /// The master's base URL.
    pub master_url: String,
    /// The pipeline to submit.
    pub pipeline: String,
    per_process: bool,
}

impl QueueCluster {
    /// Starts a redis-server on a free port and a master on it, without workers.
    pub async fn start(launch: &Launch) -> anyhow::Result<Self> {
        let pipelines = bench_pipelines()?;
        let system = launch
            .builder()
            .gateway(false)
            .master_config(move |_, config| {
                bench_redis(&mut config.redis);
                config.auth_disabled = true;
                config.rate_limit_per_sec = 0.0;
                config.long_poll_max_per_client = BENCH_LONG_POLLS;
                config.pipelines = pipelines.clone();
            })
            .start()
            .await?;
        Ok(Self {
            redis_url: system.redis.as_ref().map(testkit::RedisServer::url),
            master_url: system.master_url().to_string(),
            pipeline: PIPELINE.into(),
            per_process: launch.processes(),
            system: Some(system),
        })
    }

    /// A running master (with its workers) and, optionally, its Redis.
    pub fn external(master_url: &str, redis_url: Option<String>, pipeline: &str) -> Self {
        Self {
            system: None,
            redis_url,
            master_url: master_url.trim_end_matches('/').to_string(),
            pipeline: pipeline.into(),
            per_process: false,
        }
    }

    /// Starts `count` echo workers sharing `slots` between them and waits until the master
    /// lists them all.
    pub async fn start_workers(&mut self, count: usize, slots: u32) -> anyhow::Result<()> {
        let system = self
            .system
            .as_mut()
            .context("workers can only be added to a cluster this bench started")?;
        let count = count.max(1);
        let mut shares = (0..count).map(move |i| {
            // Spread the slots as evenly as possible: 16 over 3 workers is 6, 5, 5.
            slots / count as u32 + u32::from((i as u32) < slots % count as u32)
        });
        system
            .add_workers(count, |_, config| {
                bench_redis(&mut config.redis);
                config.capabilities = vec![CAPABILITY.into()];
                config.agent_kind = worker::AgentKind::Echo;
                config.auth_disabled = true;
                config.max_concurrency = shares.next().unwrap_or(1).max(1);
            })
            .await
    }

    /// The Redis URL, when known.
    pub fn redis_url(&self) -> Option<String> {
        self.redis_url.clone()
    }

    /// The Redis settings the services got (`None` for a running master).
    pub fn redis_settings(&self) -> Option<RedisSettings> {
        self.system.as_ref().map(|s| s.redis_settings().clone())
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
        self.system
            .as_ref()
            .and_then(|s| s.masters.first())
            .and_then(usage)
    }

    /// Each worker's usage (child processes only).
    pub fn worker_usage(&self) -> Vec<Usage> {
        self.system
            .iter()
            .flat_map(|s| &s.workers)
            .filter(|w| w.pid().is_some())
            .filter_map(usage)
            .collect()
    }

    /// Whether services run as child processes (so usage is per service).
    pub fn per_process(&self) -> bool {
        self.per_process
    }

    /// Stops workers, then the master, then the redis-server.
    pub async fn stop(self) {
        if let Some(system) = self.system {
            system.stop().await;
        }
    }
}

/// The `bench` pipeline: one `echo` step.
fn bench_pipelines() -> anyhow::Result<BTreeMap<String, PipelineConfig>> {
    let step = StepSpec::Name(Capability::new(CAPABILITY)?);
    Ok(BTreeMap::from([(
        PIPELINE.to_string(),
        PipelineConfig { steps: vec![step] },
    )]))
}

/// A pool as large as the benchmark's concurrency needs, and a command timeout that a
/// saturated Redis does not hit.
fn bench_redis(redis: &mut RedisSettings) {
    redis.pool_size = 32;
    redis.command_timeout_ms = 10_000;
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
    system: System,
}

/// The Gemini key the fake upstream expects.
pub const FAKE_GEMINI_KEY: &str = testkit::fakes::gemini::GEMINI_KEY;
/// The Gemini model name behind the `default` alias.
pub const FAKE_GEMINI_MODEL: &str = "bench-model";

impl Gateway {
    /// Starts a gateway whose `default` alias calls Gemini at `gemini_base_url`.
    pub async fn start(launch: &Launch, gemini_base_url: &str) -> anyhow::Result<Self> {
        let base_url = gemini_base_url.to_string();
        let system = launch
            .builder()
            .masters(0)
            // The gateway alone keeps nothing in Redis: no redis-server to start.
            .store(Store::Url(String::new()))
            .gateway_config(move |config| {
                config.auth_disabled = true;
                config.llm_provider = llm_gateway::config::ProviderKind::Gemini;
                config.llm_model = FAKE_GEMINI_MODEL.into();
                config.gemini_api_key = common::config::Secret::new(FAKE_GEMINI_KEY.to_string());
                config.gemini_base_url = base_url;
            })
            .start()
            .await?;
        Ok(Self {
            url: system.gateway_url().unwrap_or_default().to_string(),
            system,
        })
    }

    /// Its usage (the whole process when in-process).
    pub fn usage(&self) -> Option<Usage> {
        self.system.gateway.as_ref().and_then(usage)
    }

    /// Whether it is a child process (so its usage is its own, not this whole process's).
    pub fn per_process(&self) -> bool {
        self.system
            .gateway
            .as_ref()
            .is_some_and(|g| g.pid().is_some())
    }

    /// Stops it.
    pub async fn stop(self) {
        self.system.stop().await;
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
        assert!(usage.rss_mb > 0.0 && usage.rss_mb <= usage.peak_rss_mb);
    }
}

//! `ensemble up`: the llm-gateway, the master and four workers in this process, each on its
//! own port, on a redis-server the launcher starts (or an existing Redis, or the master's
//! in-memory store), stopped in order: workers first (they drain and deliver), then the
//! master, then the gateway, then Redis. The system is testkit's; the launcher chooses its
//! ports and store, loads each service's settings as the service would (defaults, the
//! TOML file, the environment) and reports what happens.

use std::time::Duration;

use anyhow::Context;
use common::redis::RedisSettings;
use testkit::service::Exit;
use testkit::system::{Base, CAPABILITIES, Store as SystemStore, random_key};
use tokio_util::sync::CancellationToken;

use crate::args::LaunchArgs;
use crate::client::Client;

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
    system: testkit::System,
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

/// Whether a variable is set to something.
fn is_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

impl System {
    /// Starts everything and waits until the workers are known to the master.
    pub async fn start(args: &LaunchArgs) -> anyhow::Result<Self> {
        let ports = Ports::from_args(args)?;
        let store = choose_store(args);
        let mut builder = testkit::System::builder()
            .store(store.clone())
            .base(Base::Environment(args.config.clone()))
            .gateway_port(ports.gateway)
            .master_ports(vec![ports.master])
            .worker_ports(ports.workers.to_vec())
            .workers(CAPABILITIES.len())
            .port_hint(
                " (is another Ensemble running? pick other ports with --port-offset, or 0 for \
                 any free port)",
            )
            .ready_within(READY_TIMEOUT)
            .gateway_config(|gateway| {
                // Gemini when its key is set and no provider is chosen; the mock otherwise.
                if !is_set("LLM_PROVIDER") && is_set("GEMINI_API_KEY") {
                    gateway.llm_provider = llm_gateway::config::ProviderKind::Gemini;
                }
            })
            .master_config(|_, master| {
                if master.callback_secret.is_empty() {
                    // Callbacks are always signed; a receiver that checks signatures needs
                    // CALLBACK_SECRET set before the launch.
                    master.callback_secret = common::config::Secret::new(random_key());
                    tracing::info!(
                        "CALLBACK_SECRET is not set: completion callbacks are signed with a generated secret"
                    );
                }
            })
            .worker_config(|i, worker| {
                worker.agent_id = Some(format!("worker-{}", CAPABILITIES[i]));
            });
        if let Some(key) = args.api_key.clone() {
            builder = builder.api_key(key);
        }
        let system = builder.start().await?;
        let store = match store {
            SystemStore::OwnRedis(_) => Store::OwnRedis(
                system
                    .redis
                    .as_ref()
                    .map(testkit::RedisServer::url)
                    .unwrap_or_default(),
            ),
            SystemStore::Url(url) => Store::Redis(RedisSettings::from_url(url).target()),
            SystemStore::Memory => Store::Memory,
        };
        Ok(Self {
            gateway_url: system.gateway_url().unwrap_or_default().to_string(),
            provider: system
                .gateway_config
                .as_ref()
                .map(|g| g.llm_provider.to_string())
                .unwrap_or_default(),
            master_url: system.master_url().to_string(),
            workers: system
                .worker_configs
                .iter()
                .zip(&system.workers)
                .map(|(config, service)| (config.capabilities.join(","), service.url().to_string()))
                .collect(),
            api_key: system.api_key.clone(),
            store,
            system,
        })
    }

    /// A client of this system's master.
    pub fn client(&self) -> Client {
        Client::with(&self.master_url, Some(self.api_key.clone()))
    }

    /// Runs until `shutdown` fires (then stops cleanly) or a service ends on its own (then
    /// stops the rest and reports it).
    pub async fn run_until(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ended = tokio::select! {
            () = shutdown.cancelled() => None,
            ended = self.system.first_exit() => Some(ended),
        };
        let failure = ended.map(|(name, exit)| ended_early(&name, exit));
        self.stop().await;
        failure.map_or(Ok(()), Err)
    }

    /// Stops the services by stage (workers, master, gateway), then Redis. Another
    /// ctrl-c or SIGTERM meanwhile kills whatever is still stopping.
    pub async fn stop(self) {
        self.system
            .stop_unless(async {
                common::shutdown::wait_for_signal().await;
                eprintln!("quitting without waiting");
            })
            .await;
    }
}

fn ended_early(name: &str, exit: Exit) -> anyhow::Error {
    match exit {
        Exit::Clean => anyhow::anyhow!("the {name} stopped unexpectedly"),
        Exit::Failed(e) => anyhow::anyhow!("the {name} failed: {e}"),
        Exit::Killed => anyhow::anyhow!("the {name} was killed"),
    }
}

/// Whether `args` lead to the in-memory store (`--memory`, or no `--redis-url` and no
/// redis-server on PATH).
pub fn memory_mode(args: &LaunchArgs) -> bool {
    args.memory || (args.redis_url.is_none() && !testkit::redis::redis_available())
}

/// Picks the store: `--memory`, `--redis-url`, a redis-server of our own when one is on
/// PATH, else memory (said loudly). With `--redis-url` only the URL is set, so the other
/// `REDIS_*` variables still apply.
fn choose_store(args: &LaunchArgs) -> SystemStore {
    if let Some(url) = &args.redis_url {
        return SystemStore::Url(url.clone());
    }
    if memory_mode(args) {
        if !args.memory {
            eprintln!(
                "WARNING: redis-server is not on PATH: tasks are kept in the master's memory and \
                 lost on exit, and the workers will log that Redis is unreachable (they cannot \
                 register; the launcher tells the master about them). Install Redis to run the \
                 real thing."
            );
        }
        return SystemStore::Memory;
    }
    SystemStore::OwnRedis(testkit::RedisOptions::default())
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

    /// The workers' configurations of the launcher's system, started in memory mode on free
    /// ports (and stopped).
    fn worker_configs() -> anyhow::Result<Vec<worker::Config>> {
        let cli = crate::args::Cli::try_parse_from([
            "ensemble",
            "up",
            "--memory",
            "--gateway-port",
            "0",
            "--master-port",
            "0",
            "--worker-ports",
            "0",
        ])
        .unwrap();
        let crate::args::Command::Up(launch) = cli.command else {
            unreachable!()
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let system = System::start(&launch).await?;
            let configs = system.system.worker_configs.clone();
            system.stop().await;
            Ok(configs)
        })
    }

    #[test]
    fn launcher_values_override_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PORT", "1");
            jail.set_env("CAPABILITIES", "other");
            jail.set_env("MAX_CONCURRENCY", "3");
            let configs = worker_configs().unwrap();
            let plan = &configs[0];
            assert_ne!(plan.port, 1);
            assert_eq!(plan.capabilities, ["plan"]);
            assert_eq!(
                plan.max_concurrency, 3,
                "the rest still comes from the environment"
            );
            jail.set_env("MAX_CONCURRENCY", "0");
            let err = format!("{:#}", worker_configs().unwrap_err());
            assert!(
                err.contains("the worker-plan's configuration is invalid"),
                "{err}"
            );
            assert!(err.contains("MAX_CONCURRENCY"), "{err}");
            Ok(())
        });
    }
}

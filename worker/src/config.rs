//! The worker's settings: which capabilities it serves and with which agents, where the
//! master and the gateway are, its tokens, its concurrency, and its timings.

use std::collections::BTreeMap;
use std::time::Duration;

use common::config::{ConfigError, Secret, Settings};
use common::redis::{REDIS_ENV_VARS, RedisSettings};
use common::wire::{Capability, WorkerId};
use serde::{Deserialize, Serialize};

/// Which built-in agent serves a capability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    /// Renders the capability's prompt template and calls the llm-gateway.
    #[default]
    Llm,
    /// Returns the step's input as its output (tests, benchmarks).
    Echo,
    /// POSTs the step to an agent service of the team's own, in any language
    /// (`AGENT_URL`, `[agent_urls]`); see `agents::http`.
    Http,
}

/// The worker's configuration: defaults, then `--config`/`ENSEMBLE_CONFIG` TOML, then the
/// environment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// `HOST`: address to listen on.
    #[serde(deserialize_with = "common::config::lenient_string")]
    pub host: String,
    /// `PORT`: port to listen on (`0` picks a free one, for tests).
    pub port: u16,
    /// `[redis]` / `REDIS_*`: where the registry lives.
    pub redis: RedisSettings,
    /// `AGENT_ID`: this worker's id in the registry. Unset, each process makes its own, so
    /// two replicas of one ECS service never share a record.
    #[serde(deserialize_with = "common::config::lenient_opt_string")]
    pub agent_id: Option<String>,
    /// `CAPABILITIES`: what this worker serves, a JSON list (`["retrieve"]`) or a comma
    /// list. The default, `["plan"]`, is the deployment guide's worker-a, which sets none.
    #[serde(deserialize_with = "common::config::string_list")]
    pub capabilities: Vec<String>,
    /// `MASTER_URL`: where results go (`{MASTER_URL}/result`), the master's load balancer.
    #[serde(deserialize_with = "common::config::lenient_string")]
    pub master_url: String,
    /// `LLM_GATEWAY_URL`: the gateway the `llm` agent calls.
    #[serde(deserialize_with = "common::config::lenient_string")]
    pub llm_gateway_url: String,
    /// `WORKER_TOKEN`: the shared master ↔ worker token, required on `/work` and sent with
    /// results. Required unless `AUTH_DISABLED=true`.
    pub worker_token: Secret,
    /// `GATEWAY_TOKEN`: the bearer token for the llm-gateway (empty: none sent).
    pub gateway_token: Secret,
    /// `AUTH_DISABLED`: accept `/work` from anyone (local development only; logged loudly).
    pub auth_disabled: bool,
    /// `MAX_CONCURRENCY`: steps held at once (running or delivering); more get `429`.
    pub max_concurrency: u32,
    /// `ADVERTISE_URL`: the base URL the master should call. Unset, the worker asks the ECS
    /// task metadata endpoint for its private IP, else uses its bound address.
    #[serde(deserialize_with = "common::config::lenient_opt_string")]
    pub advertise_url: Option<String>,
    /// `ECS_CONTAINER_METADATA_URI_V4`: set by ECS in every container; read only when
    /// `ADVERTISE_URL` is not set.
    #[serde(deserialize_with = "common::config::lenient_opt_string")]
    pub ecs_container_metadata_uri_v4: Option<String>,
    /// `AGENT_KIND`: `llm` (default), `echo` or `http`; `echo` and `http` serve every
    /// capability with that agent, whatever `[agents]` says.
    pub agent_kind: AgentKind,
    /// `[agents]` (TOML): capability → `llm` | `echo` | `http`, for a worker that mixes
    /// them. Capabilities not listed use `llm`.
    pub agents: BTreeMap<String, AgentKind>,
    /// `AGENT_URL`: where the `http` agent POSTs each step, for every `http` capability that
    /// `[agent_urls]` does not name. Required when an `http` capability has no other URL.
    #[serde(deserialize_with = "common::config::lenient_opt_string")]
    pub agent_url: Option<String>,
    /// `[agent_urls]` (TOML): capability → URL, for a worker whose capabilities are served
    /// by different agent services (or different paths of one).
    pub agent_urls: BTreeMap<String, String>,
    /// `AGENT_HEALTH_URL`: what the health task GETs for the capabilities served at
    /// `AGENT_URL`. Unset: `AGENT_URL`'s scheme, host and port with the path `/health`.
    #[serde(deserialize_with = "common::config::lenient_opt_string")]
    pub agent_health_url: Option<String>,
    /// `[agent_health_urls]` (TOML): capability → health URL, for a capability in
    /// `[agent_urls]` whose service answers health somewhere other than `/health` on its
    /// own origin.
    pub agent_health_urls: BTreeMap<String, String>,
    /// `AGENT_HEALTH_INTERVAL_MS`: how often every agent health URL is checked. Two failures
    /// in a row make the worker unavailable, so an outage is seen within about two of these.
    pub agent_health_interval_ms: u64,
    /// `AGENT_TIMEOUT_MS`: the longest one `http` agent call may take. Unset, the step's own
    /// deadline is the only bound, which is what a pipeline's `timeout_ms` already says.
    pub agent_timeout_ms: Option<u64>,
    /// `[prompts]` (TOML): capability → prompt template for the `llm` agent, overriding the
    /// built-in ones. Placeholders: see `agents::prompt`.
    pub prompts: BTreeMap<String, String>,
    /// `LLM_MODEL`: the model alias the `llm` agent asks the gateway for.
    #[serde(deserialize_with = "common::config::lenient_string")]
    pub llm_model: String,
    /// `LLM_TEMPERATURE`: sent to the gateway when set.
    pub llm_temperature: Option<f64>,
    /// `LLM_MAX_TOKENS`: sent to the gateway when set.
    pub llm_max_tokens: Option<u32>,
    /// `HEARTBEAT_INTERVAL_MS`: how often the registry record is refreshed. The record's
    /// TTL is three intervals, so one late beat is not taken for death.
    pub heartbeat_interval_ms: u64,
    /// `SHUTDOWN_GRACE_MS`: how long a SIGTERM drain may take; below ECS's 30 s stop
    /// timeout, so the drain ends before the SIGKILL. Steps still running then are left to
    /// lease expiry.
    pub shutdown_grace_ms: u64,
    /// `RESULT_DELIVERY_TIMEOUT_MS`: how long a result is retried while the master is
    /// unreachable, about as long as its lease can stay current.
    pub result_delivery_timeout_ms: u64,
    /// `BODY_LIMIT_BYTES`: largest `/work` body (a step carries every earlier output).
    pub body_limit_bytes: usize,
    /// `PROGRESS_FLUSH_MS`: how long a step's partial output may wait to be batched before
    /// it is posted to `{MASTER_URL}/progress`; `0` turns forwarding off (partial output is
    /// then only counted). Longer batches cost the master fewer writes per token and show
    /// the tokens later.
    pub progress_flush_ms: u64,
}

/// The longest duration setting: one day.
const MAX_DURATION_MS: u64 = 24 * 60 * 60 * 1000;

/// The longest `PROGRESS_FLUSH_MS`: partial output held longer than this is no longer live.
const MAX_PROGRESS_FLUSH_MS: u64 = 10_000;

impl Default for Config {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 5000,
            redis: RedisSettings::default(),
            agent_id: None,
            capabilities: vec!["plan".into()],
            master_url: "http://127.0.0.1:8000".into(),
            llm_gateway_url: "http://127.0.0.1:7000".into(),
            worker_token: Secret::default(),
            gateway_token: Secret::default(),
            auth_disabled: false,
            max_concurrency: 8,
            advertise_url: None,
            ecs_container_metadata_uri_v4: None,
            agent_kind: AgentKind::Llm,
            agents: BTreeMap::new(),
            agent_url: None,
            agent_urls: BTreeMap::new(),
            agent_health_url: None,
            agent_health_urls: BTreeMap::new(),
            agent_health_interval_ms: 1_000,
            agent_timeout_ms: None,
            prompts: BTreeMap::new(),
            llm_model: "default".into(),
            llm_temperature: None,
            llm_max_tokens: None,
            heartbeat_interval_ms: 2_000,
            shutdown_grace_ms: 25_000,
            result_delivery_timeout_ms: 120_000,
            body_limit_bytes: 8 * 1024 * 1024,
            progress_flush_ms: 50,
        }
    }
}

impl Config {
    /// `HEARTBEAT_INTERVAL_MS` as a duration.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    /// The registry record's TTL: three heartbeat intervals, so one late beat is not death.
    pub fn heartbeat_ttl(&self) -> Duration {
        self.heartbeat_interval() * 3
    }

    /// `SHUTDOWN_GRACE_MS` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// `RESULT_DELIVERY_TIMEOUT_MS` as a duration.
    pub fn result_delivery_timeout(&self) -> Duration {
        Duration::from_millis(self.result_delivery_timeout_ms)
    }

    /// `PROGRESS_FLUSH_MS` as a duration; `None` when forwarding is off.
    pub fn progress_flush(&self) -> Option<Duration> {
        (self.progress_flush_ms > 0).then(|| Duration::from_millis(self.progress_flush_ms))
    }

    /// The configured capabilities, checked.
    pub fn capability_list(&self) -> Result<Vec<Capability>, ConfigError> {
        self.capabilities
            .iter()
            .map(|c| {
                Capability::new(c.as_str()).map_err(|e| ConfigError::invalid("CAPABILITIES", e))
            })
            .collect()
    }

    /// This worker's id: `AGENT_ID`, or a fresh one per process.
    pub fn worker_id(&self) -> Result<WorkerId, ConfigError> {
        match &self.agent_id {
            Some(id) => WorkerId::new(id.as_str()).map_err(|e| ConfigError::invalid("AGENT_ID", e)),
            None => Ok(WorkerId::generate("worker")),
        }
    }

    /// The built-in agent that serves `capability`.
    pub fn agent_kind_for(&self, capability: &str) -> AgentKind {
        match self.agent_kind {
            AgentKind::Echo => AgentKind::Echo,
            AgentKind::Http => AgentKind::Http,
            AgentKind::Llm => self
                .agents
                .get(capability)
                .copied()
                .unwrap_or(AgentKind::Llm),
        }
    }

    /// `AGENT_HEALTH_INTERVAL_MS` as a duration.
    pub fn agent_health_interval(&self) -> Duration {
        Duration::from_millis(self.agent_health_interval_ms)
    }

    /// `AGENT_TIMEOUT_MS` as a duration, when set.
    pub fn agent_timeout(&self) -> Option<Duration> {
        self.agent_timeout_ms.map(Duration::from_millis)
    }

    /// The URL the `http` agent POSTs `capability`'s steps to (`[agent_urls]`, else
    /// `AGENT_URL`), and the name of the setting it came from, for errors.
    pub fn agent_url_for(&self, capability: &str) -> Option<(&str, String)> {
        match self.agent_urls.get(capability) {
            Some(url) => Some((url.as_str(), format!("agent_urls.{capability}"))),
            None => self
                .agent_url
                .as_deref()
                .map(|url| (url, "AGENT_URL".to_string())),
        }
    }

    /// The health URL for an `http` capability: `[agent_health_urls]`, else
    /// `AGENT_HEALTH_URL` when the capability is served at `AGENT_URL`, else `/health` on
    /// the origin of its URL. `None` when it has no URL (which validation refuses).
    pub fn agent_health_url_for(&self, capability: &str) -> Option<String> {
        if let Some(url) = self.agent_health_urls.get(capability) {
            return Some(url.clone());
        }
        if !self.agent_urls.contains_key(capability)
            && let Some(url) = &self.agent_health_url
        {
            return Some(url.clone());
        }
        let (url, _) = self.agent_url_for(capability)?;
        let mut health = reqwest::Url::parse(url).ok()?;
        health.set_path("/health");
        health.set_query(None);
        health.set_fragment(None);
        Some(health.to_string())
    }

    /// The capabilities (checked) that the `http` agent serves.
    pub fn http_capabilities(&self) -> Result<Vec<Capability>, ConfigError> {
        Ok(self
            .capability_list()?
            .into_iter()
            .filter(|c| self.agent_kind_for(c.as_str()) == AgentKind::Http)
            .collect())
    }

    /// Checks the `http` agent's settings: every `http` capability has a URL, and every URL
    /// is http(s).
    fn validate_http_agents(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.agent_url {
            check_url("AGENT_URL", url)?;
        }
        if let Some(url) = &self.agent_health_url {
            check_url("AGENT_HEALTH_URL", url)?;
        }
        for (table, urls) in [
            ("agent_urls", &self.agent_urls),
            ("agent_health_urls", &self.agent_health_urls),
        ] {
            for (capability, url) in urls {
                let setting = format!("{table}.{capability}");
                Capability::new(capability.as_str())
                    .map_err(|e| ConfigError::invalid(&setting, e))?;
                check_url(&setting, url)?;
            }
        }
        for capability in self.http_capabilities()? {
            if self.agent_url_for(capability.as_str()).is_none() {
                return Err(ConfigError::invalid(
                    "AGENT_URL",
                    format!(
                        "is required: capability `{capability}` is served by the http agent \
                         (set AGENT_URL, or agent_urls.{capability} in the config file)"
                    ),
                ));
            }
        }
        if !(50..=MAX_DURATION_MS).contains(&self.agent_health_interval_ms) {
            return Err(ConfigError::invalid(
                "AGENT_HEALTH_INTERVAL_MS",
                format!("must be at least 50 and at most {MAX_DURATION_MS} (one day)"),
            ));
        }
        if let Some(ms) = self.agent_timeout_ms
            && !(1..=MAX_DURATION_MS).contains(&ms)
        {
            return Err(ConfigError::invalid(
                "AGENT_TIMEOUT_MS",
                format!("must be at least 1 and at most {MAX_DURATION_MS} (one day)"),
            ));
        }
        Ok(())
    }
}

fn check_url(setting: &str, url: &str) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ConfigError::invalid(setting, format!("`{url}` is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ConfigError::invalid(
            setting,
            format!("`{url}` must be an http:// or https:// URL"),
        ));
    }
    Ok(())
}

impl Settings for Config {
    fn env_vars() -> Vec<&'static str> {
        let mut vars = vec![
            "HOST",
            "PORT",
            "AGENT_ID",
            "CAPABILITIES",
            "MASTER_URL",
            "LLM_GATEWAY_URL",
            "WORKER_TOKEN",
            "GATEWAY_TOKEN",
            "AUTH_DISABLED",
            "MAX_CONCURRENCY",
            "ADVERTISE_URL",
            "ECS_CONTAINER_METADATA_URI_V4",
            "AGENT_KIND",
            "AGENT_URL",
            "AGENT_HEALTH_URL",
            "AGENT_HEALTH_INTERVAL_MS",
            "AGENT_TIMEOUT_MS",
            "LLM_MODEL",
            "LLM_TEMPERATURE",
            "LLM_MAX_TOKENS",
            "HEARTBEAT_INTERVAL_MS",
            "SHUTDOWN_GRACE_MS",
            "RESULT_DELIVERY_TIMEOUT_MS",
            "BODY_LIMIT_BYTES",
            "PROGRESS_FLUSH_MS",
        ];
        vars.extend_from_slice(REDIS_ENV_VARS);
        vars
    }

    fn required_env_vars() -> Vec<&'static str> {
        vec!["MASTER_URL", "WORKER_TOKEN", "CAPABILITIES", "REDIS_HOST"]
    }

    fn renamed_env_vars() -> Vec<(&'static str, &'static str)> {
        vec![
            ("HEARTBEAT_INTERVAL", "HEARTBEAT_INTERVAL_MS"),
            ("SHUTDOWN_GRACE", "SHUTDOWN_GRACE_MS"),
            ("RESULT_DELIVERY_TIMEOUT", "RESULT_DELIVERY_TIMEOUT_MS"),
        ]
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()?;
        self.worker_id()?;
        if self.capability_list()?.is_empty() {
            return Err(ConfigError::invalid(
                "CAPABILITIES",
                "must list at least one capability",
            ));
        }
        check_url("MASTER_URL", &self.master_url)?;
        check_url("LLM_GATEWAY_URL", &self.llm_gateway_url)?;
        if let Some(url) = &self.advertise_url {
            check_url("ADVERTISE_URL", url)?;
        }
        if self.worker_token.is_empty() && !self.auth_disabled {
            return Err(ConfigError::invalid(
                "WORKER_TOKEN",
                "is required (set AUTH_DISABLED=true to run without one, for local development only)",
            ));
        }
        if self.max_concurrency == 0 {
            return Err(ConfigError::invalid(
                "MAX_CONCURRENCY",
                "must be at least 1",
            ));
        }
        if self.heartbeat_interval_ms < 50 {
            return Err(ConfigError::invalid(
                "HEARTBEAT_INTERVAL_MS",
                "must be at least 50",
            ));
        }
        if self.result_delivery_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "RESULT_DELIVERY_TIMEOUT_MS",
                "must be more than zero",
            ));
        }
        // Each is added to the time now somewhere (a deadline); a day is far past any sensible
        // value and keeps that sum from overflowing.
        for (name, ms) in [
            ("HEARTBEAT_INTERVAL_MS", self.heartbeat_interval_ms),
            ("SHUTDOWN_GRACE_MS", self.shutdown_grace_ms),
            (
                "RESULT_DELIVERY_TIMEOUT_MS",
                self.result_delivery_timeout_ms,
            ),
        ] {
            if ms > MAX_DURATION_MS {
                return Err(ConfigError::invalid(
                    name,
                    format!("must be at most {MAX_DURATION_MS} (one day)"),
                ));
            }
        }
        if self.body_limit_bytes < 1024 {
            return Err(ConfigError::invalid(
                "BODY_LIMIT_BYTES",
                "must be at least 1024",
            ));
        }
        if self.progress_flush_ms > MAX_PROGRESS_FLUSH_MS {
            return Err(ConfigError::invalid(
                "PROGRESS_FLUSH_MS",
                format!("must be at most {MAX_PROGRESS_FLUSH_MS} (0 turns forwarding off)"),
            ));
        }
        if self.llm_model.trim().is_empty() {
            return Err(ConfigError::invalid("LLM_MODEL", "must not be empty"));
        }
        for capability in self.agents.keys() {
            Capability::new(capability.as_str())
                .map_err(|e| ConfigError::invalid(&format!("agents.{capability}"), e))?;
        }
        self.validate_http_agents()?;
        for (capability, template) in &self.prompts {
            Capability::new(capability.as_str())
                .map_err(|e| ConfigError::invalid(&format!("prompts.{capability}"), e))?;
            crate::agents::prompt::check(template)
                .map_err(|e| ConfigError::invalid(&format!("prompts.{capability}"), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    // `figment::Jail` closures return figment's (large) error type.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

    use std::path::Path;

    use figment::Figment;
    use figment::providers::{Format, Serialized, Toml};

    use super::*;

    fn load(toml: &str) -> Result<Config, ConfigError> {
        let figment = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(toml))
            .merge(common::config::env_provider(Config::env_vars()));
        common::config::extract(figment)
    }

    #[test]
    fn deployment_names_work_as_they_are() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AGENT_ID", "worker-b");
            jail.set_env("CAPABILITIES", r#"["retrieve","evaluate"]"#);
            jail.set_env("MASTER_URL", "http://master.internal:8000");
            jail.set_env("WORKER_TOKEN", "s3cret-token");
            jail.set_env("MAX_CONCURRENCY", "3");
            jail.set_env("HEARTBEAT_INTERVAL_MS", "500");
            jail.set_env("SHUTDOWN_GRACE_MS", "10000");
            jail.set_env("AGENT_KIND", "echo");
            let config = load("").unwrap();
            assert_eq!(config.agent_id.as_deref(), Some("worker-b"));
            assert_eq!(config.capabilities, ["retrieve", "evaluate"]);
            assert_eq!(config.max_concurrency, 3);
            assert_eq!(config.heartbeat_interval(), Duration::from_millis(500));
            assert_eq!(config.heartbeat_ttl(), Duration::from_millis(1500));
            assert_eq!(config.shutdown_grace(), Duration::from_secs(10));
            assert_eq!(config.agent_kind_for("retrieve"), AgentKind::Echo);
            assert_eq!(format!("{:?}", config.worker_token), "[redacted]");
            jail.set_env("SHUTDOWN_GRACE_MS", "10s");
            let err = load("").unwrap_err().to_string();
            assert!(
                err.contains("SHUTDOWN_GRACE_MS") && err.contains("milliseconds"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_mistyped_key_in_the_file_is_refused_and_a_correct_file_loads() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "typo.toml",
                "auth_disabled = true\nheartbeat_interval = 500\n",
            )?;
            let err = common::config::load_from::<Config>(Some(Path::new("typo.toml")))
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                "unknown key heartbeat_interval in the config file: \
                 did you mean heartbeat_interval_ms?"
            );
            jail.create_file(
                "good.toml",
                "auth_disabled = true\nheartbeat_interval_ms = 500\n\
                 [agents]\nplan = \"echo\"\n[prompts]\nplan = \"{{ task_input }}\"\n",
            )?;
            let config = common::config::load_from::<Config>(Some(Path::new("good.toml"))).unwrap();
            assert_eq!(config.heartbeat_interval(), Duration::from_millis(500));
            assert_eq!(config.agent_kind_for("plan"), AgentKind::Echo);
            Ok(())
        });
    }

    #[test]
    fn a_former_duration_name_is_refused_with_its_replacement() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AUTH_DISABLED", "true");
            jail.set_env("SHUTDOWN_GRACE", "25s");
            let err = common::config::load_from::<Config>(None)
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                "SHUTDOWN_GRACE is no longer read: set SHUTDOWN_GRACE_MS instead \
                 (durations are whole milliseconds)"
            );
            Ok(())
        });
    }

    #[test]
    fn durations_past_a_day_are_refused_naming_the_setting() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AUTH_DISABLED", "true");
            for name in [
                "HEARTBEAT_INTERVAL_MS",
                "SHUTDOWN_GRACE_MS",
                "RESULT_DELIVERY_TIMEOUT_MS",
            ] {
                jail.set_env(name, u64::MAX.to_string());
                let err = load("").unwrap_err().to_string();
                assert!(err.contains(name) && err.contains("at most"), "{err}");
                jail.set_env(name, MAX_DURATION_MS.to_string());
                assert!(load("").is_ok(), "{name} of one day");
            }
            Ok(())
        });
    }

    #[test]
    fn progress_flush_ms_defaults_to_50_zero_turns_forwarding_off_and_is_bounded() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AUTH_DISABLED", "true");
            assert_eq!(
                load("").unwrap().progress_flush(),
                Some(Duration::from_millis(50))
            );
            jail.set_env("PROGRESS_FLUSH_MS", "0");
            assert_eq!(load("").unwrap().progress_flush(), None);
            jail.set_env("PROGRESS_FLUSH_MS", "10001");
            let err = load("").unwrap_err().to_string();
            assert!(
                err.contains("PROGRESS_FLUSH_MS") && err.contains("at most 10000"),
                "{err}"
            );
            jail.set_env("PROGRESS_FLUSH_MS", "20ms");
            let err = load("").unwrap_err().to_string();
            assert!(err.contains("PROGRESS_FLUSH_MS"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_token_is_required_unless_auth_is_disabled() {
        figment::Jail::expect_with(|jail| {
            let err = load("").unwrap_err().to_string();
            assert!(err.contains("WORKER_TOKEN"), "{err}");
            jail.set_env("AUTH_DISABLED", "true");
            assert!(load("").is_ok());
            Ok(())
        });
    }

    #[test]
    fn bad_values_name_their_setting() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("WORKER_TOKEN", "t0ken");
            jail.set_env("CAPABILITIES", "Not A Capability");
            let err = load("").unwrap_err().to_string();
            assert!(err.contains("CAPABILITIES"), "{err}");
            jail.set_env("CAPABILITIES", "plan");
            jail.set_env("AGENT_ID", "has spaces");
            let err = load("").unwrap_err().to_string();
            assert!(err.contains("AGENT_ID"), "{err}");
            jail.set_env("AGENT_ID", "w1");
            jail.set_env("MAX_CONCURRENCY", "0");
            let err = load("").unwrap_err().to_string();
            assert!(err.contains("MAX_CONCURRENCY"), "{err}");
            jail.set_env("MAX_CONCURRENCY", "2");
            jail.set_env("MASTER_URL", "master:8000");
            let err = load("").unwrap_err().to_string();
            assert!(err.contains("MASTER_URL"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn prompts_and_agents_come_from_toml_and_are_checked() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("WORKER_TOKEN", "t0ken");
            let config = load(
                "capabilities = [\"plan\", \"summarize\"]\n\
                 [agents]\nsummarize = \"echo\"\n\
                 [prompts]\nplan = \"Plan this: {{ task_input }}\"\n",
            )
            .unwrap();
            assert_eq!(config.agent_kind_for("summarize"), AgentKind::Echo);
            assert_eq!(config.agent_kind_for("plan"), AgentKind::Llm);
            assert_eq!(config.prompts["plan"], "Plan this: {{ task_input }}");
            let err = load("[prompts]\nplan = \"{{ nonsense }}\"\n")
                .unwrap_err()
                .to_string();
            assert!(err.contains("prompts.plan"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn an_http_agent_needs_a_url_and_takes_one_per_capability_from_toml() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("WORKER_TOKEN", "t0ken");
            jail.set_env("CAPABILITIES", "research,write");
            jail.set_env("AGENT_KIND", "http");
            let err = load("").unwrap_err().to_string();
            assert!(
                err.contains("AGENT_URL") && err.contains("research"),
                "{err}"
            );
            jail.set_env("AGENT_URL", "ftp://agent:9000/step");
            let err = load("").unwrap_err().to_string();
            assert!(
                err.contains("AGENT_URL") && err.contains("http://"),
                "{err}"
            );

            jail.set_env("AGENT_URL", "http://agent:9000/step?v=1");
            let config = load("").unwrap();
            assert_eq!(config.agent_kind_for("write"), AgentKind::Http);
            assert_eq!(
                config.agent_health_url_for("write").as_deref(),
                Some("http://agent:9000/health")
            );
            assert_eq!(config.agent_health_interval(), Duration::from_secs(1));
            assert_eq!(config.agent_timeout(), None);

            let config = load(
                "[agent_urls]\nwrite = \"https://writer.internal/v1/write\"\n\
                 [agent_health_urls]\nwrite = \"https://writer.internal/v1/ready\"\n",
            )
            .unwrap();
            assert_eq!(
                config.agent_url_for("write").map(|(url, _)| url),
                Some("https://writer.internal/v1/write")
            );
            assert_eq!(
                config.agent_url_for("research").map(|(url, _)| url),
                Some("http://agent:9000/step?v=1")
            );
            assert_eq!(
                config.agent_health_url_for("write").as_deref(),
                Some("https://writer.internal/v1/ready")
            );
            let err = load("[agent_urls]\nwrite = \"writer:80\"\n")
                .unwrap_err()
                .to_string();
            assert!(err.contains("agent_urls.write"), "{err}");

            // Per capability, with no AGENT_URL: each listed one needs its own.
            jail.set_env("AGENT_URL", "");
            jail.set_env("AGENT_KIND", "llm");
            jail.set_env("AGENT_HEALTH_INTERVAL_MS", "10");
            let err = load("[agents]\nwrite = \"http\"\n")
                .unwrap_err()
                .to_string();
            assert!(err.contains("AGENT_URL") && err.contains("write"), "{err}");
            let err = load("[agents]\nwrite = \"http\"\n[agent_urls]\nwrite = \"http://w/x\"\n")
                .unwrap_err()
                .to_string();
            assert!(err.contains("AGENT_HEALTH_INTERVAL_MS"), "{err}");
            jail.set_env("AGENT_HEALTH_INTERVAL_MS", "250");
            jail.set_env("AGENT_TIMEOUT_MS", "5000");
            let config =
                load("[agents]\nwrite = \"http\"\n[agent_urls]\nwrite = \"http://w/x\"\n").unwrap();
            assert_eq!(config.agent_kind_for("research"), AgentKind::Llm);
            assert_eq!(
                config.http_capabilities().unwrap(),
                vec![Capability::new("write").unwrap()]
            );
            assert_eq!(config.agent_timeout(), Some(Duration::from_secs(5)));
            Ok(())
        });
    }
}

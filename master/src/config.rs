//! The master's settings: listen address, Redis, auth, pipelines, leases and retries,
//! limits, metrics.

use std::collections::BTreeMap;
use std::time::Duration;

use common::auth::KeyRing;
use common::config::{ConfigError, Secret, Settings};
use common::redis::{REDIS_ENV_VARS, RedisSettings};
use common::wire::{Capability, MapDef, StepDef, StepSpec};
use serde::{Deserialize, Serialize};

/// The master's configuration: defaults, then `--config`/`ENSEMBLE_CONFIG` TOML, then the
/// environment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// `HOST`: address to listen on.
    #[serde(deserialize_with = "common::config::lenient_string")]
    pub host: String,
    /// `PORT`: port to listen on.
    pub port: u16,
    /// `[redis]` / `REDIS_*`.
    pub redis: RedisSettings,
    /// `BODY_LIMIT_BYTES`: largest request body accepted (`413` above it).
    pub body_limit_bytes: usize,

    /// `API_KEYS`: client API keys, `client_id:key,client_id:key`.
    pub api_keys: Secret,
    /// `OPERATOR_API_KEYS`: keys for `/dispatch`, `/workers`, `/queues`, same format.
    pub operator_api_keys: Secret,
    /// `WORKER_TOKEN`: the shared token on master ↔ worker traffic.
    pub worker_token: Secret,
    /// `JWT_SECRET`: accept HS256 bearer JWTs signed with this secret (`sub` = client id).
    pub jwt_secret: Secret,
    /// `JWT_PUBLIC_KEY_FILE`: accept RS256 bearer JWTs verified with this PEM public key.
    pub jwt_public_key_file: Option<String>,
    /// `JWT_ISSUER`: required `iss`, when set.
    #[serde(deserialize_with = "common::config::lenient_opt_string")]
    pub jwt_issuer: Option<String>,
    /// `JWT_AUDIENCE`: required `aud`, when set.
    #[serde(deserialize_with = "common::config::lenient_opt_string")]
    pub jwt_audience: Option<String>,
    /// `AUTH_DISABLED`: accept every caller (local use only; logged loudly).
    pub auth_disabled: bool,

    /// `[pipelines.NAME]` in TOML: named pipelines. `default` is built in.
    pub pipelines: BTreeMap<String, PipelineConfig>,
    /// `MAX_ATTEMPTS`: attempts per step unless its pipeline says otherwise.
    pub max_attempts: u32,
    /// `STEP_TIMEOUT_MS`: how long a step may run unless its pipeline says otherwise.
    pub step_timeout_ms: u64,
    /// `LEASE_MS`: a dispatched step's lease; extended while its worker's heartbeat lists
    /// it, re-queued within this long after that stops.
    pub lease_ms: u64,
    /// `RETRY_BASE_MS`: first retry backoff; doubles per attempt, with jitter.
    pub retry_base_ms: u64,
    /// `RETRY_MAX_MS`: the longest retry backoff.
    pub retry_max_ms: u64,
    /// `TASK_RETENTION_MS`: finished tasks (and idempotency keys) expire after this.
    pub task_retention_ms: u64,
    /// `RATE_LIMIT_PER_SEC`: sustained `/task` submissions per client (0 = unlimited).
    pub rate_limit_per_sec: f64,
    /// `RATE_LIMIT_BURST`: submissions a client may make at once above the rate.
    pub rate_limit_burst: u32,
    /// `DISPATCH_TIMEOUT_MS`: how long `POST {worker}/work` may take to be answered.
    pub dispatch_timeout_ms: u64,
    /// `DISPATCH_POLL_MS`: how often a dispatcher looks for work it was not told about
    /// (steps queued through another master replica).
    pub dispatch_poll_ms: u64,
    /// `METRICS_INTERVAL_MS`: how often queue gauges are refreshed.
    pub metrics_interval_ms: u64,
    /// `METRICS_EMF`: also print queue metrics as CloudWatch Embedded Metric Format lines.
    pub metrics_emf: bool,
    /// `LONG_POLL_MAX_PER_CLIENT`: `GET /result/{id}?wait=S` long polls one client may
    /// hold open at once (`429` beyond), so one client cannot take every connection.
    pub long_poll_max_per_client: usize,
    /// `LONG_POLL_MAX_TOTAL`: long polls this process holds open at once, all clients
    /// together (`503` beyond). Kept to at most half the open-file limit at start, so
    /// `/health` and `POST /task` still get a connection when it is reached.
    pub long_poll_max_total: usize,
    /// `EVENT_STREAMS_MAX_PER_CLIENT`: event streams (`GET /task/{id}/events`) one client
    /// may hold open at once (`429` beyond). Operators share one count for `GET /events`.
    pub event_streams_max_per_client: usize,
    /// `EVENT_STREAMS_MAX_TOTAL`: event streams this process holds open at once (`503`
    /// beyond), kept to at most half the open-file limit like `LONG_POLL_MAX_TOTAL`.
    pub event_streams_max_total: usize,

    /// `WORK_BODY_LIMIT_BYTES`: the largest `POST {worker}/work` body the master sends.
    /// Keep it at or below the workers' `BODY_LIMIT_BYTES`: a step whose request would be
    /// larger fails at once (`step_too_large`) instead of being refused by every worker.
    pub work_body_limit_bytes: usize,
    /// `WORKER_HEARTBEAT_MS`: the workers' `HEARTBEAT_INTERVAL_MS`, as the master expects
    /// it. A lease is extended only by a heartbeat, so `LEASE_MS` must cover at least two
    /// of them or every running step would lapse between beats.
    pub worker_heartbeat_ms: u64,

    /// `CALLBACK_SECRET`: signs every completion callback (HMAC-SHA256 in the
    /// `Ensemble-Signature` header), so a receiver can tell the master's callbacks from
    /// anyone else's. Unset, `callback_url` is refused (`422`): an unsigned callback is one
    /// any caller could forge.
    pub callback_secret: Secret,
    /// `CALLBACK_ALLOW_PRIVATE`: let callbacks reach loopback, private, link-local and other
    /// internal addresses (local use; the all-in-one launcher sets it). Off, a
    /// `callback_url` cannot make the master call into its own network (SSRF): such IP
    /// literals are refused at submit, and names are checked against every address they
    /// resolve to when the callback connects.
    pub callback_allow_private: bool,
    /// `CALLBACK_MAX_ATTEMPTS`: delivery attempts before a callback is marked `failed`.
    pub callback_max_attempts: u32,
    /// `CALLBACK_RETRY_BASE_MS`: the backoff after a callback's first failed attempt;
    /// doubles per attempt (with jitter) up to `CALLBACK_RETRY_MAX_MS`. The defaults spread
    /// 8 attempts over about an hour.
    pub callback_retry_base_ms: u64,
    /// `CALLBACK_RETRY_MAX_MS`: the longest backoff between two callback attempts.
    pub callback_retry_max_ms: u64,
    /// `CALLBACK_TIMEOUT_MS`: how long one callback attempt may take, connecting included.
    pub callback_timeout_ms: u64,
    /// `CALLBACK_VISIBILITY_MS`: how long a claimed callback is hidden from the other
    /// replicas. A replica that dies mid-delivery is replaced by another after this, so it
    /// must exceed `CALLBACK_TIMEOUT_MS` (or a slow receiver would be called twice).
    pub callback_visibility_ms: u64,
    /// `CALLBACK_POLL_MS`: how often each replica looks for callbacks that are due.
    pub callback_poll_ms: u64,
}

/// A named pipeline: its steps, in the shape of `POST /task`'s `steps` (capability names
/// for a chain, tables for a graph; see `docs/workflows.md`). Checked at start with
/// [`crate::graph::plan_steps`]: a pipeline that would be refused at submit keeps the
/// master from starting.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// The steps as written.
    pub steps: Vec<StepSpec>,
}

impl PipelineConfig {
    /// The capabilities its worker steps need: the dispatcher knows them from the start.
    pub fn capabilities(&self) -> impl Iterator<Item = &Capability> {
        self.steps.iter().filter_map(|s| match s {
            StepSpec::Name(c) => Some(c),
            StepSpec::Def(d) => d.capability.as_ref(),
        })
    }
}

/// The built-in `default` pipeline: `plan`, then `retrieve` once per element of the
/// plan's `queries` (8 at a time), then `evaluate` over what they found, then `finalize`.
pub fn default_pipeline() -> PipelineConfig {
    let name = |c: &str| Capability::new(c).ok().map(StepSpec::Name);
    let retrieve = Capability::new("retrieve").ok().map(|c| {
        StepSpec::Def(Box::new(StepDef {
            capability: Some(c),
            map: Some(MapDef {
                over: "plan.queries".into(),
                concurrency: Some(8),
            }),
            ..StepDef::default()
        }))
    });
    PipelineConfig {
        steps: [name("plan"), retrieve, name("evaluate"), name("finalize")]
            .into_iter()
            .flatten()
            .collect(),
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 8000,
            redis: RedisSettings::default(),
            body_limit_bytes: common::http::DEFAULT_BODY_LIMIT,
            api_keys: Secret::default(),
            operator_api_keys: Secret::default(),
            worker_token: Secret::default(),
            jwt_secret: Secret::default(),
            jwt_public_key_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            auth_disabled: false,
            pipelines: BTreeMap::new(),
            max_attempts: 3,
            step_timeout_ms: 300_000,
            lease_ms: 10_000,
            retry_base_ms: 500,
            retry_max_ms: 60_000,
            task_retention_ms: 7 * 24 * 3600 * 1000,
            rate_limit_per_sec: 200.0,
            rate_limit_burst: 400,
            dispatch_timeout_ms: 5_000,
            dispatch_poll_ms: 50,
            metrics_interval_ms: 1_000,
            metrics_emf: false,
            long_poll_max_per_client: 100,
            long_poll_max_total: 2_000,
            event_streams_max_per_client: 20,
            event_streams_max_total: 1_000,
            work_body_limit_bytes: 8 * 1024 * 1024,
            worker_heartbeat_ms: 2_000,
            callback_secret: Secret::default(),
            callback_allow_private: false,
            callback_max_attempts: 8,
            callback_retry_base_ms: 30_000,
            callback_retry_max_ms: 30 * 60_000,
            callback_timeout_ms: 10_000,
            callback_visibility_ms: 30_000,
            callback_poll_ms: 500,
        }
    }
}

impl Settings for Config {
    fn env_vars() -> Vec<&'static str> {
        let mut vars = vec![
            "HOST",
            "PORT",
            "BODY_LIMIT_BYTES",
            "API_KEYS",
            "OPERATOR_API_KEYS",
            "WORKER_TOKEN",
            "JWT_SECRET",
            "JWT_PUBLIC_KEY_FILE",
            "JWT_ISSUER",
            "JWT_AUDIENCE",
            "AUTH_DISABLED",
            "MAX_ATTEMPTS",
            "STEP_TIMEOUT_MS",
            "LEASE_MS",
            "RETRY_BASE_MS",
            "RETRY_MAX_MS",
            "TASK_RETENTION_MS",
            "RATE_LIMIT_PER_SEC",
            "RATE_LIMIT_BURST",
            "DISPATCH_TIMEOUT_MS",
            "DISPATCH_POLL_MS",
            "METRICS_INTERVAL_MS",
            "METRICS_EMF",
            "LONG_POLL_MAX_PER_CLIENT",
            "LONG_POLL_MAX_TOTAL",
            "WORK_BODY_LIMIT_BYTES",
            "WORKER_HEARTBEAT_MS",
            "CALLBACK_SECRET",
            "CALLBACK_ALLOW_PRIVATE",
            "CALLBACK_MAX_ATTEMPTS",
            "CALLBACK_RETRY_BASE_MS",
            "CALLBACK_RETRY_MAX_MS",
            "CALLBACK_TIMEOUT_MS",
            "CALLBACK_VISIBILITY_MS",
            "CALLBACK_POLL_MS",
        ];
        vars.extend_from_slice(REDIS_ENV_VARS);
        vars
    }

    fn required_env_vars() -> Vec<&'static str> {
        vec!["WORKER_TOKEN"]
    }

    fn renamed_env_vars() -> Vec<(&'static str, &'static str)> {
        vec![("TASK_RETENTION_SECS", "TASK_RETENTION_MS")]
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()?;
        if self.body_limit_bytes < 1024 {
            return Err(ConfigError::invalid(
                "BODY_LIMIT_BYTES",
                "must be at least 1024",
            ));
        }
        KeyRing::parse("API_KEYS", self.api_keys.expose())?;
        KeyRing::parse("OPERATOR_API_KEYS", self.operator_api_keys.expose())?;
        if self.max_attempts == 0 {
            return Err(ConfigError::invalid("MAX_ATTEMPTS", "must be at least 1"));
        }
        if self.lease_ms < 500 {
            return Err(ConfigError::invalid("LEASE_MS", "must be at least 500"));
        }
        if self.worker_heartbeat_ms == 0 {
            return Err(ConfigError::invalid(
                "WORKER_HEARTBEAT_MS",
                "must be above 0",
            ));
        }
        if self.lease_ms < self.worker_heartbeat_ms.saturating_mul(2) {
            return Err(ConfigError::invalid(
                "LEASE_MS",
                format!(
                    "must be at least twice WORKER_HEARTBEAT_MS (LEASE_MS={}, WORKER_HEARTBEAT_MS={}): \
                     leases are extended only by heartbeats, so a shorter lease lapses between beats",
                    self.lease_ms, self.worker_heartbeat_ms
                ),
            ));
        }
        if self.work_body_limit_bytes < 1024 {
            return Err(ConfigError::invalid(
                "WORK_BODY_LIMIT_BYTES",
                "must be at least 1024",
            ));
        }
        if self.step_timeout_ms == 0 {
            return Err(ConfigError::invalid("STEP_TIMEOUT_MS", "must be above 0"));
        }
        if self.retry_max_ms < self.retry_base_ms {
            return Err(ConfigError::invalid(
                "RETRY_MAX_MS",
                "must be at least RETRY_BASE_MS",
            ));
        }
        if !(self.rate_limit_per_sec >= 0.0 && self.rate_limit_per_sec.is_finite()) {
            return Err(ConfigError::invalid(
                "RATE_LIMIT_PER_SEC",
                "must be 0 or more",
            ));
        }
        if self.dispatch_poll_ms == 0 || self.metrics_interval_ms == 0 {
            return Err(ConfigError::invalid(
                "DISPATCH_POLL_MS",
                "DISPATCH_POLL_MS and METRICS_INTERVAL_MS must be above 0",
            ));
        }
        if self.long_poll_max_per_client == 0 {
            return Err(ConfigError::invalid(
                "LONG_POLL_MAX_PER_CLIENT",
                "must be at least 1 (a client needs one long poll to wait at all)",
            ));
        }
        if self.long_poll_max_total < self.long_poll_max_per_client {
            return Err(ConfigError::invalid(
                "LONG_POLL_MAX_TOTAL",
                "must be at least LONG_POLL_MAX_PER_CLIENT",
            ));
        }
        if self.event_streams_max_per_client == 0 {
            return Err(ConfigError::invalid(
                "EVENT_STREAMS_MAX_PER_CLIENT",
                "must be at least 1 (a client needs one stream to follow a task)",
            ));
        }
        if self.event_streams_max_total < self.event_streams_max_per_client {
            return Err(ConfigError::invalid(
                "EVENT_STREAMS_MAX_TOTAL",
                "must be at least EVENT_STREAMS_MAX_PER_CLIENT",
            ));
        }
        for (name, pipeline) in &self.pipelines {
            crate::graph::plan_steps(&pipeline.steps, self.into())
                .map_err(|e| ConfigError::invalid(&format!("pipelines.{name}"), e.message))?;
        }
        if self.callback_max_attempts == 0 {
            return Err(ConfigError::invalid(
                "CALLBACK_MAX_ATTEMPTS",
                "must be at least 1",
            ));
        }
        if self.callback_retry_base_ms == 0
            || self.callback_retry_max_ms < self.callback_retry_base_ms
        {
            return Err(ConfigError::invalid(
                "CALLBACK_RETRY_MAX_MS",
                "CALLBACK_RETRY_BASE_MS must be above 0 and CALLBACK_RETRY_MAX_MS at least that",
            ));
        }
        if self.callback_timeout_ms == 0 || self.callback_poll_ms == 0 {
            return Err(ConfigError::invalid(
                "CALLBACK_TIMEOUT_MS",
                "CALLBACK_TIMEOUT_MS and CALLBACK_POLL_MS must be above 0",
            ));
        }
        if self.callback_visibility_ms <= self.callback_timeout_ms {
            return Err(ConfigError::invalid(
                "CALLBACK_VISIBILITY_MS",
                format!(
                    "must be above CALLBACK_TIMEOUT_MS ({} ms): a delivery still running when \
                     its claim becomes visible again is made twice",
                    self.callback_timeout_ms
                ),
            ));
        }
        let has_keys = !self.api_keys.is_empty()
            || !self.jwt_secret.is_empty()
            || self.jwt_public_key_file.is_some();
        if !self.auth_disabled && (!has_keys || self.worker_token.is_empty()) {
            return Err(ConfigError(
                "no credentials configured: set API_KEYS (or JWT_SECRET / JWT_PUBLIC_KEY_FILE) \
                 and WORKER_TOKEN, or AUTH_DISABLED=true for local use"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Most steps a task may have.
pub use crate::graph::MAX_STEPS;

impl Config {
    /// The named pipelines, with the built-in `default` unless configured otherwise.
    pub fn all_pipelines(&self) -> BTreeMap<String, PipelineConfig> {
        let mut all = self.pipelines.clone();
        all.entry("default".into()).or_insert_with(default_pipeline);
        all
    }

    /// The lease as a duration.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// The backoff between completion-callback attempts.
    pub fn callback_backoff(&self) -> common::backoff::Backoff {
        common::backoff::Backoff {
            base: Duration::from_millis(self.callback_retry_base_ms),
            max: Duration::from_millis(self.callback_retry_max_ms),
        }
    }

    /// Finished-task retention as a duration.
    pub fn retention(&self) -> Duration {
        Duration::from_millis(self.task_retention_ms)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn load_toml(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.toml");
        std::fs::write(&path, text).unwrap();
        common::config::load_from(Some(&path))
    }

    #[test]
    fn a_mistyped_key_is_refused_with_the_nearest_known_one() {
        for (toml, expected) in [
            (
                "auth_disabled = true\ntask_retention_secs = 60",
                "unknown key task_retention_secs in the config file: did you mean task_retention_ms?",
            ),
            (
                "auth_disabled = true\n[redis]\nhots = \"redis\"",
                "unknown key redis.hots in the config file: did you mean host?",
            ),
            (
                "auth_disabled = true\n[pipelines.x]\nstepz = [\"plan\"]",
                "unknown key pipelines.x.stepz in the config file: did you mean steps?",
            ),
        ] {
            assert_eq!(load_toml(toml).unwrap_err().to_string(), expected);
        }
    }

    #[test]
    fn a_correct_file_loads() {
        let config = load_toml(
            "auth_disabled = true\nlease_ms = 4000\ntask_retention_ms = 60000\n\
             [redis]\nport = 6380\n\
             [pipelines.fast]\n\
             steps = [\"plan\", { capability = \"finalize\", timeout_ms = 500 }]\n",
        )
        .unwrap();
        assert_eq!(config.lease(), Duration::from_secs(4));
        assert_eq!(config.retention(), Duration::from_secs(60));
        assert_eq!(config.redis.port, 6380);
        assert_eq!(config.all_pipelines()["fast"].steps.len(), 2);
    }

    #[test]
    fn a_pipeline_is_a_graph_of_strings_and_tables_in_one_shape() {
        let config = load_toml(
            "auth_disabled = true\n\
             [pipelines.review]\n\
             steps = [\n\
               \"plan\",\n\
               { id = \"search\", capability = \"retrieve\", map = { over = \"plan.queries\", concurrency = 4 } },\n\
               { id = \"approve\", needs = [\"plan\"], wait = { timeout_ms = 60000, on_timeout = \"continue\" } },\n\
               { capability = \"finalize\", needs = [\"search\", \"approve\"], allow_failure = true },\n\
             ]\n",
        )
        .unwrap();
        let review = &config.all_pipelines()["review"];
        let planned = crate::graph::plan_steps(&review.steps, (&config).into()).unwrap();
        let ids: Vec<&str> = planned.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["plan", "search", "approve", "finalize"]);
        assert_eq!(planned[3].needs, [1, 2]);
        let caps: Vec<&str> = review.capabilities().map(|c| c.as_str()).collect();
        assert_eq!(caps, ["plan", "retrieve", "finalize"]);
    }

    #[test]
    fn a_pipeline_the_graph_refuses_keeps_the_master_from_starting_naming_it() {
        for (steps, why) in [
            ("[]", "at least one step"),
            (
                "[{ id = \"a\", capability = \"x\", needs = [\"b\"] }, { id = \"b\", capability = \"y\", needs = [\"a\"] }]",
                "a → b → a",
            ),
            (
                "[{ wait = { signal = \"go\" } }]",
                "`wait.timeout_ms` is required",
            ),
            (
                "[{ capability = \"x\", map = { over = \"input\", concurrency = 0 } }]",
                "`map.concurrency`",
            ),
        ] {
            let text = format!("auth_disabled = true\n[pipelines.broken]\nsteps = {steps}\n");
            let error = load_toml(&text).unwrap_err().to_string();
            assert!(
                error.contains("pipelines.broken") && error.contains(why),
                "{steps}: {error}"
            );
        }
    }

    #[test]
    fn the_default_pipeline_maps_retrieve_over_the_plans_queries() {
        let planned =
            crate::graph::plan_steps(&default_pipeline().steps, (&Config::default()).into())
                .unwrap();
        let ids: Vec<&str> = planned.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["plan", "retrieve", "evaluate", "finalize"]);
        match &planned[1].kind {
            crate::store::PlannedKind::Work { map: Some(map), .. } => {
                assert_eq!(
                    (map.from, map.path.as_slice()),
                    (Some(0), &["queries".to_string()][..])
                );
                assert_eq!(map.concurrency, 8);
            }
            other => panic!("retrieve does not map: {other:?}"),
        }
    }
}

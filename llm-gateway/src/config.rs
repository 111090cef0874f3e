//! The gateway's settings: listen address, its token, timeouts and retries, the providers'
//! credentials and endpoints, and the model aliases with their ordered targets.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use common::config::{ConfigError, Secret, Settings};
use common::redis::{REDIS_ENV_VARS, RedisSettings};
use serde::{Deserialize, Serialize};

/// The alias served when nothing else is configured; built from `LLM_PROVIDER`/`LLM_MODEL`
/// unless `[models.default]` is in the TOML file.
pub const DEFAULT_ALIAS: &str = "default";

/// Google's Generative Language API.
pub const GEMINI_DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com/v1beta";

/// The gateway's configuration: defaults, then `--config`/`ENSEMBLE_CONFIG` TOML, then the
/// environment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// `HOST`: address to listen on.
    #[serde(deserialize_with = "common::config::lenient_string")]
    pub host: String,
    /// `PORT`: port to listen on.
    pub port: u16,
    /// `GATEWAY_TOKEN`: the bearer token every `/v1` call must present.
    pub gateway_token: Secret,
    /// `AUTH_DISABLED`: accept every caller (local use only; logged loudly). Without it the
    /// gateway refuses to start with no `GATEWAY_TOKEN`.
    pub auth_disabled: bool,
    /// `[keys.<name>]` in TOML: more gateway keys, each with its own token (and budget).
    /// `GATEWAY_TOKEN` is the key named `default`.
    pub keys: BTreeMap<String, KeyConfig>,
    /// `GATEWAY_OPERATOR_TOKEN`: the bearer token of `GET /v1/usage`. Empty: that route
    /// answers `401` to everyone (unless `AUTH_DISABLED`).
    pub gateway_operator_token: Secret,

    /// `USE_REDIS`: keep the usage ledger, budgets, the response cache and
    /// `Idempotency-Key` replay in Redis (`[redis]`/`REDIS_*`). Off, the gateway needs no
    /// Redis and those features are off.
    pub use_redis: bool,
    /// `[redis]` / `REDIS_*`: where the ledger, cache and replay records live (the same
    /// Redis and `REDIS_KEY_PREFIX` as the master, so the master can show a task's usage).
    pub redis: RedisSettings,
    /// `IDEMPOTENCY_TTL_S`: how long a chat completion made with an `Idempotency-Key` is
    /// kept for replay (with `USE_REDIS`). A day covers a worker retrying a step after a
    /// restart; longer keeps answers no retry will ask for.
    pub idempotency_ttl_s: u64,

    /// `[prices."<provider model>"]` in TOML: what a model's tokens cost, keyed by the
    /// provider's model name (a target's `model`). A model without a price costs 0 in the
    /// ledger, and a call a dollar budget applies to is refused on it.
    pub prices: BTreeMap<String, Price>,
    /// `DAILY_MAX_TOKENS`: the `default` key's (`GATEWAY_TOKEN`'s) token budget per UTC day.
    /// `[keys.<name>]` have their own.
    pub daily_max_tokens: Option<u64>,
    /// `DAILY_MAX_COST_USD`: the `default` key's dollar budget per UTC day.
    pub daily_max_cost_usd: Option<f64>,
    /// `USAGE_RETENTION_DAYS`: how many days after its date a day of the ledger is kept.
    pub usage_retention_days: u32,
    /// `USAGE_TASK_TTL_S`: the lifetime of a task's usage hash the gateway creates (one the
    /// master created at submit keeps the master's retention instead).
    pub usage_task_ttl_s: u64,

    /// `LLM_PROVIDER`: the provider behind the `default` alias (`mock`, `gemini`, `bedrock`).
    pub llm_provider: ProviderKind,
    /// `LLM_MODEL`: the model behind the `default` alias; empty means the provider's usual
    /// one ([`ProviderKind::default_model`]).
    #[serde(deserialize_with = "common::config::lenient_string")]
    pub llm_model: String,
    /// `[models.<alias>]` in TOML: each alias's ordered fallback targets.
    pub models: BTreeMap<String, AliasConfig>,

    /// `REQUEST_TIMEOUT_MS`: the longest one upstream attempt may take (and, when
    /// streaming, the longest wait for the next chunk).
    pub request_timeout_ms: u64,
    /// `MAX_RETRIES`: retries of one target on a retryable failure before falling back.
    pub max_retries: u32,
    /// `RETRY_BASE_MS`: the first retry backoff; doubles per retry, with jitter.
    pub retry_base_ms: u64,
    /// `RETRY_MAX_MS`: the longest backoff, also the cap on an upstream's `Retry-After`.
    pub retry_max_ms: u64,
    /// `MAX_CONCURRENCY_PER_PROVIDER`: upstream requests in flight per provider; excess waits.
    pub max_concurrency_per_provider: usize,
    /// `QUEUE_TIMEOUT_MS`: how long an excess request waits for a slot before `429`.
    pub queue_timeout_ms: u64,

    /// `GEMINI_API_KEY`: sent in the `x-goog-api-key` header, never in the URL.
    pub gemini_api_key: Secret,
    /// `GEMINI_BASE_URL`: the Generative Language API root (tests point it at a fake).
    #[serde(deserialize_with = "common::config::lenient_string")]
    pub gemini_base_url: String,
    /// `AWS_REGION`: Bedrock's region. Credentials come from the default chain.
    #[serde(deserialize_with = "common::config::lenient_opt_string")]
    pub aws_region: Option<String>,
    /// `BEDROCK_ENDPOINT_URL`: overrides Bedrock's endpoint (tests point it at a fake).
    #[serde(deserialize_with = "common::config::lenient_opt_string")]
    pub bedrock_endpoint_url: Option<String>,

    /// `MOCK_LATENCY_MS`: the mock provider's delay before its answer (or its first chunk).
    pub mock_latency_ms: u64,
    /// `MOCK_FAIL_RATE`: share of mock calls (0.0–1.0) that fail with a retryable `503`.
    pub mock_fail_rate: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 7000,
            gateway_token: Secret::default(),
            auth_disabled: false,
            keys: BTreeMap::new(),
            gateway_operator_token: Secret::default(),
            use_redis: false,
            redis: RedisSettings::default(),
            prices: BTreeMap::new(),
            daily_max_tokens: None,
            daily_max_cost_usd: None,
            usage_retention_days: 400,
            usage_task_ttl_s: 7 * 24 * 3600,
            idempotency_ttl_s: 86_400,
            llm_provider: ProviderKind::Mock,
            llm_model: String::new(),
            models: BTreeMap::new(),
            request_timeout_ms: 60_000,
            max_retries: 2,
            retry_base_ms: 200,
            retry_max_ms: 10_000,
            max_concurrency_per_provider: 256,
            queue_timeout_ms: 5_000,
            gemini_api_key: Secret::default(),
            gemini_base_url: GEMINI_DEFAULT_BASE_URL.into(),
            aws_region: None,
            bedrock_endpoint_url: None,
            mock_latency_ms: 0,
            mock_fail_rate: 0.0,
        }
    }
}

/// The environment variables the gateway reads.
const ENV_VARS: &[&str] = &[
    "HOST",
    "PORT",
    "GATEWAY_TOKEN",
    "AUTH_DISABLED",
    "GATEWAY_OPERATOR_TOKEN",
    "USE_REDIS",
    "DAILY_MAX_TOKENS",
    "DAILY_MAX_COST_USD",
    "USAGE_RETENTION_DAYS",
    "USAGE_TASK_TTL_S",
    "IDEMPOTENCY_TTL_S",
    "LLM_PROVIDER",
    "LLM_MODEL",
    "REQUEST_TIMEOUT_MS",
    "MAX_RETRIES",
    "RETRY_BASE_MS",
    "RETRY_MAX_MS",
    "MAX_CONCURRENCY_PER_PROVIDER",
    "QUEUE_TIMEOUT_MS",
    "GEMINI_API_KEY",
    "GEMINI_BASE_URL",
    "AWS_REGION",
    "BEDROCK_ENDPOINT_URL",
    "MOCK_LATENCY_MS",
    "MOCK_FAIL_RATE",
];

impl Settings for Config {
    fn env_vars() -> Vec<&'static str> {
        ENV_VARS.iter().chain(REDIS_ENV_VARS).copied().collect()
    }

    fn required_env_vars() -> Vec<&'static str> {
        vec!["GATEWAY_TOKEN", "LLM_PROVIDER"]
    }

    fn renamed_env_vars() -> Vec<(&'static str, &'static str)> {
        vec![("REQUEST_TIMEOUT", "REQUEST_TIMEOUT_MS")]
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.gateway_token.is_empty() && !self.auth_disabled {
            return Err(ConfigError::invalid(
                "GATEWAY_TOKEN",
                "is required (or set AUTH_DISABLED=true for local use)",
            ));
        }
        if self.host.trim().is_empty() {
            return Err(ConfigError::invalid("HOST", "must not be empty"));
        }
        self.validate_keys()?;
        self.validate_ledger()?;
        if self.use_redis {
            self.redis.validate()?;
        }
        if !(1..=MAX_STORE_TTL_S).contains(&self.idempotency_ttl_s) {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_TTL_S",
                format!("must be between 1 and {MAX_STORE_TTL_S} seconds (30 days)"),
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "REQUEST_TIMEOUT_MS",
                "must be above zero",
            ));
        }
        if self.max_concurrency_per_provider == 0 {
            return Err(ConfigError::invalid(
                "MAX_CONCURRENCY_PER_PROVIDER",
                "must be at least 1",
            ));
        }
        if self.retry_base_ms > self.retry_max_ms {
            return Err(ConfigError::invalid(
                "RETRY_BASE_MS",
                format!("must not exceed RETRY_MAX_MS ({})", self.retry_max_ms),
            ));
        }
        if !(0.0..=1.0).contains(&self.mock_fail_rate) {
            return Err(ConfigError::invalid(
                "MOCK_FAIL_RATE",
                "must be between 0.0 and 1.0",
            ));
        }
        for (alias, config) in &self.models {
            if alias.is_empty() {
                return Err(ConfigError::invalid("models", "an alias name is empty"));
            }
            if config.targets.is_empty() {
                return Err(ConfigError::invalid(
                    &format!("models.{alias}.targets"),
                    "needs at least one {provider, model} target",
                ));
            }
            if let Some(t) = config.targets.iter().find(|t| t.model.trim().is_empty()) {
                return Err(ConfigError::invalid(
                    &format!("models.{alias}.targets"),
                    format!("a `{}` target has an empty model", t.provider),
                ));
            }
            if let Some(ttl) = config.cache_ttl_s {
                let setting = format!("models.{alias}.cache_ttl_s");
                if !(1..=MAX_STORE_TTL_S).contains(&ttl) {
                    return Err(ConfigError::invalid(
                        &setting,
                        format!("must be between 1 and {MAX_STORE_TTL_S} seconds (30 days)"),
                    ));
                }
                if !self.use_redis {
                    return Err(ConfigError::invalid(
                        &setting,
                        "needs USE_REDIS=true: the cache is kept in Redis",
                    ));
                }
            }
        }
        let used = self.aliases();
        let uses = |kind: ProviderKind| {
            used.values()
                .any(|targets| targets.iter().any(|t| t.provider == kind))
        };
        if uses(ProviderKind::Gemini) && self.gemini_api_key.is_empty() {
            return Err(ConfigError::invalid(
                "GEMINI_API_KEY",
                "is required when a model alias uses the gemini provider",
            ));
        }
        if uses(ProviderKind::Gemini) && !self.gemini_base_url.starts_with("http") {
            return Err(ConfigError::invalid(
                "GEMINI_BASE_URL",
                "must be an http(s) URL",
            ));
        }
        if uses(ProviderKind::Bedrock) && self.aws_region.is_none() {
            return Err(ConfigError::invalid(
                "AWS_REGION",
                "is required when a model alias uses the bedrock provider",
            ));
        }
        Ok(())
    }
}

impl Config {
    /// `[keys]`: names that fit a Redis field and a metric label, non-empty tokens that
    /// differ from each other and from `GATEWAY_TOKEN`.
    fn validate_keys(&self) -> Result<(), ConfigError> {
        let mut tokens: Vec<&str> = Vec::new();
        if !self.gateway_token.is_empty() {
            tokens.push(self.gateway_token.expose());
        }
        for (name, key) in &self.keys {
            let setting = format!("keys.{name}");
            let fits = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if name == DEFAULT_KEY || !fits {
                return Err(ConfigError::invalid(
                    &setting,
                    format!(
                        "a key's name is 1 to 64 letters, digits, `-` and `_`, and not \
                         `{DEFAULT_KEY}` (that is GATEWAY_TOKEN)"
                    ),
                ));
            }
            if key.token.is_empty() {
                return Err(ConfigError::invalid(
                    &format!("{setting}.token"),
                    "must not be empty",
                ));
            }
            if tokens.contains(&key.token.expose()) {
                return Err(ConfigError::invalid(
                    &format!("{setting}.token"),
                    "is the same as another key's token",
                ));
            }
            tokens.push(key.token.expose());
        }
        Ok(())
    }

    /// Prices and budgets: finite non-negative prices, budgets above zero, and no budget
    /// without the Redis that keeps the figures it is checked against.
    fn validate_ledger(&self) -> Result<(), ConfigError> {
        for (model, price) in &self.prices {
            for (field, value) in [
                ("input_usd_per_mtok", price.input_usd_per_mtok),
                ("output_usd_per_mtok", price.output_usd_per_mtok),
            ] {
                if !value.is_finite() || value < 0.0 {
                    return Err(ConfigError::invalid(
                        &format!("prices.\"{model}\".{field}"),
                        "must be a finite number of dollars, zero or more",
                    ));
                }
            }
        }
        let mut budgets = vec![(
            "DAILY_MAX_TOKENS".to_string(),
            "DAILY_MAX_COST_USD".to_string(),
            self.daily_max_tokens,
            self.daily_max_cost_usd,
        )];
        budgets.extend(self.keys.iter().map(|(name, key)| {
            (
                format!("keys.{name}.daily_max_tokens"),
                format!("keys.{name}.daily_max_cost_usd"),
                key.daily_max_tokens,
                key.daily_max_cost_usd,
            )
        }));
        for (tokens_setting, cost_setting, tokens, cost) in budgets {
            if tokens == Some(0) {
                return Err(ConfigError::invalid(
                    &tokens_setting,
                    "must be above zero (leave it out for no budget)",
                ));
            }
            if let Some(cost) = cost
                && (!cost.is_finite() || cost <= 0.0)
            {
                return Err(ConfigError::invalid(
                    &cost_setting,
                    "must be a finite number of dollars above zero (leave it out for no budget)",
                ));
            }
            if !self.use_redis {
                let set = match (tokens, cost) {
                    (Some(_), _) => Some(tokens_setting),
                    (None, Some(_)) => Some(cost_setting),
                    (None, None) => None,
                };
                if let Some(setting) = set {
                    return Err(ConfigError::invalid(
                        &setting,
                        "a budget needs the usage ledger: set USE_REDIS=true (and REDIS_*)",
                    ));
                }
            }
        }
        if self.usage_retention_days == 0 {
            return Err(ConfigError::invalid(
                "USAGE_RETENTION_DAYS",
                "must be at least 1",
            ));
        }
        if self.usage_task_ttl_s == 0 {
            return Err(ConfigError::invalid(
                "USAGE_TASK_TTL_S",
                "must be above zero",
            ));
        }
        Ok(())
    }

    /// Every alias the gateway serves with its targets: the `[models]` table plus
    /// `default` from `LLM_PROVIDER`/`LLM_MODEL` when the table does not define it.
    pub fn aliases(&self) -> BTreeMap<String, Vec<Target>> {
        let mut aliases: BTreeMap<String, Vec<Target>> = self
            .models
            .iter()
            .map(|(alias, config)| (alias.clone(), config.targets.clone()))
            .collect();
        aliases.entry(DEFAULT_ALIAS.to_string()).or_insert_with(|| {
            let model = match self.llm_model.trim() {
                "" => self.llm_provider.default_model().to_string(),
                model => model.to_string(),
            };
            vec![Target {
                provider: self.llm_provider,
                model,
            }]
        });
        aliases
    }

    /// `REQUEST_TIMEOUT_MS` as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// `RETRY_BASE_MS` as a duration.
    pub fn retry_base(&self) -> Duration {
        Duration::from_millis(self.retry_base_ms)
    }

    /// `RETRY_MAX_MS` as a duration.
    pub fn retry_max(&self) -> Duration {
        Duration::from_millis(self.retry_max_ms)
    }
}

/// The longest `IDEMPOTENCY_TTL_S` and `cache_ttl_s`: 30 days. Past that a record is more
/// likely a forgotten setting than a wish.
pub const MAX_STORE_TTL_S: u64 = 30 * 86_400;

/// The name of the key `GATEWAY_TOKEN` is, in the ledger and in `/v1/usage`.
pub const DEFAULT_KEY: &str = "default";

/// One gateway key in `[keys.<name>]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The bearer token callers present.
    pub token: Secret,
    /// Most tokens (prompt and completion) this key's calls may use per UTC day.
    pub daily_max_tokens: Option<u64>,
    /// Most dollars (from `[prices]`) this key's calls may cost per UTC day.
    pub daily_max_cost_usd: Option<f64>,
}

/// What one model's tokens cost, in `[prices."<provider model>"]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// US dollars per million prompt tokens.
    pub input_usd_per_mtok: f64,
    /// US dollars per million completion tokens.
    pub output_usd_per_mtok: f64,
}

/// One alias in `[models.<alias>]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AliasConfig {
    /// Tried in order: a retryable failure of one falls back to the next.
    pub targets: Vec<Target>,
    /// Seconds an answer is kept in the exact-match response cache (1 to 30 days; needs
    /// `USE_REDIS`). Unset: this alias is never cached, since an owner who wants fresh
    /// samples for the same prompt must not get a stored one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_ttl_s: Option<u64>,
}

/// A provider and the model name it knows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Which provider serves it.
    pub provider: ProviderKind,
    /// The provider's own model name (`gemini-2.5-flash`, a Bedrock model or profile id).
    pub model: String,
}

/// The providers the gateway can call.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Deterministic, offline: the default for local runs and tests.
    Mock,
    /// Google Gemini over the Generative Language REST API.
    Gemini,
    /// AWS Bedrock through the SDK's Converse API.
    Bedrock,
}

impl ProviderKind {
    /// Every provider, in a stable order.
    pub const ALL: [ProviderKind; 3] = [Self::Mock, Self::Gemini, Self::Bedrock];

    /// The name used in settings, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mock => "mock",
            Self::Gemini => "gemini",
            Self::Bedrock => "bedrock",
        }
    }

    /// The model used when `LLM_MODEL` is not set.
    pub fn default_model(self) -> &'static str {
        match self {
            Self::Mock => "mock-1",
            Self::Gemini => "gemini-2.5-flash",
            Self::Bedrock => "anthropic.claude-3-5-haiku-20241022-v1:0",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn open() -> Config {
        Config {
            auth_disabled: true,
            ..Config::default()
        }
    }

    #[test]
    fn no_token_refuses_to_start_unless_auth_is_disabled() {
        let err = Config::default().validate().unwrap_err().to_string();
        assert!(err.contains("GATEWAY_TOKEN"), "{err}");
        open().validate().unwrap();
        Config {
            gateway_token: Secret::new("t"),
            ..Config::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn default_alias_comes_from_llm_provider_and_model() {
        let aliases = open().aliases();
        assert_eq!(
            aliases[DEFAULT_ALIAS],
            vec![Target {
                provider: ProviderKind::Mock,
                model: "mock-1".into()
            }]
        );
        let config = Config {
            llm_provider: ProviderKind::Gemini,
            llm_model: "gemini-2.0-flash".into(),
            ..open()
        };
        assert_eq!(config.aliases()[DEFAULT_ALIAS][0].model, "gemini-2.0-flash");
    }

    #[test]
    fn providers_in_use_need_their_settings() {
        let gemini = Config {
            llm_provider: ProviderKind::Gemini,
            ..open()
        };
        let err = gemini.validate().unwrap_err().to_string();
        assert!(err.contains("GEMINI_API_KEY"), "{err}");
        let bedrock = Config {
            llm_provider: ProviderKind::Bedrock,
            ..open()
        };
        let err = bedrock.validate().unwrap_err().to_string();
        assert!(err.contains("AWS_REGION"), "{err}");
    }

    #[test]
    fn aliases_load_from_toml() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            r#"
auth_disabled = true
[models.smart]
targets = [{provider = "mock", model = "a"}, {provider = "mock", model = "b"}]
"#,
        )
        .unwrap();
        let config: Config = common::config::load_from(Some(&path)).unwrap();
        let aliases = config.aliases();
        assert_eq!(aliases["smart"].len(), 2);
        assert!(aliases.contains_key(DEFAULT_ALIAS));

        std::fs::write(
            &path,
            "auth_disabled = true\n[models.x]\ntargets = [{provider = \"openai\", model = \"a\"}]\n",
        )
        .unwrap();
        let err = common::config::load_from::<Config>(Some(&path))
            .unwrap_err()
            .to_string();
        assert!(err.contains("MODELS"), "{err}");
    }

    #[test]
    fn prices_and_budgets_load_from_toml_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            r#"
auth_disabled = true
use_redis = true
daily_max_cost_usd = 2.5
[keys.team]
token = "t"
daily_max_tokens = 1000
[prices."gemini-2.5-flash"]
input_usd_per_mtok = 0.3
output_usd_per_mtok = 2.5
"#,
        )
        .unwrap();
        let config: Config = common::config::load_from(Some(&path)).unwrap();
        config.validate().unwrap();
        assert_eq!(config.keys["team"].daily_max_tokens, Some(1000));
        assert_eq!(config.daily_max_cost_usd, Some(2.5));
        assert_eq!(config.prices["gemini-2.5-flash"].output_usd_per_mtok, 2.5);

        for (config, setting) in [
            (
                Config {
                    daily_max_tokens: Some(0),
                    use_redis: true,
                    ..open()
                },
                "DAILY_MAX_TOKENS",
            ),
            (
                Config {
                    daily_max_cost_usd: Some(f64::NAN),
                    use_redis: true,
                    ..open()
                },
                "DAILY_MAX_COST_USD",
            ),
            (
                Config {
                    daily_max_cost_usd: Some(1.0),
                    ..open()
                },
                "DAILY_MAX_COST_USD",
            ),
            (
                Config {
                    usage_retention_days: 0,
                    ..open()
                },
                "USAGE_RETENTION_DAYS",
            ),
        ] {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(setting), "{setting}: {err}");
        }

        std::fs::write(
            &path,
            "auth_disabled = true\n[prices.m]\ninput_usd_per_mtok = 1\noutput_usd_per_mtk = 1\n",
        )
        .unwrap();
        let err = common::config::load_from::<Config>(Some(&path))
            .unwrap_err()
            .to_string();
        assert!(err.contains("output_usd_per_mtk"), "{err}");
    }

    #[test]
    fn a_mistyped_key_is_refused_with_the_nearest_known_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        for (toml, expected) in [
            (
                "auth_disabled = true\nrequest_timeout = 5000\n",
                "unknown key request_timeout in the config file: did you mean request_timeout_ms?",
            ),
            (
                "auth_disabled = true\n[models.smart]\ntargest = []\n",
                "unknown key models.smart.targest in the config file: did you mean targets?",
            ),
            (
                "auth_disabled = true\n[models.smart]\n\
                 targets = [{provider = \"mock\", modle = \"a\"}]\n",
                "unknown key models.smart.targets.0.modle in the config file: did you mean model?",
            ),
        ] {
            std::fs::write(&path, toml).unwrap();
            let err = common::config::load_from::<Config>(Some(&path))
                .unwrap_err()
                .to_string();
            assert_eq!(err, expected, "for {toml:?}");
        }
    }
}

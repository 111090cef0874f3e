//! The master's settings.

use common::config::{ConfigError, Settings};
use common::redis::{REDIS_ENV_VARS, RedisSettings};
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 8000,
            redis: RedisSettings::default(),
            body_limit_bytes: common::http::DEFAULT_BODY_LIMIT,
        }
    }
}

impl Settings for Config {
    fn env_vars() -> Vec<&'static str> {
        let mut vars = vec!["HOST", "PORT", "BODY_LIMIT_BYTES"];
        vars.extend_from_slice(REDIS_ENV_VARS);
        vars
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()?;
        if self.body_limit_bytes < 1024 {
            return Err(ConfigError::invalid(
                "BODY_LIMIT_BYTES",
                "must be at least 1024",
            ));
        }
        Ok(())
    }
}

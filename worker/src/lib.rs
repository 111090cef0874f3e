//! The Ensemble worker (skeleton: health, readiness and metrics only).

use axum::Router;
use common::config::{ConfigError, Settings};
use common::redis::{REDIS_ENV_VARS, RedisPool, RedisSettings};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The worker's configuration.
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 5000,
            redis: RedisSettings::default(),
        }
    }
}

impl Settings for Config {
    fn env_vars() -> Vec<&'static str> {
        let mut vars = vec!["HOST", "PORT"];
        vars.extend_from_slice(REDIS_ENV_VARS);
        vars
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()
    }
}

/// Serves on `listener` until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = RedisPool::new(&config.redis)?;
    let router = Router::new().merge(common::http::ops_routes(
        "worker",
        common::http::redis_ready(pool),
    ));
    let router = common::http::finish_router(router, "worker", common::http::DEFAULT_BODY_LIMIT);
    common::http::serve(listener, router, shutdown).await?;
    Ok(())
}

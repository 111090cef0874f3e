//! The Redis connection pool every service uses: plain TCP or TLS (rustls, public web PKI
//! roots or a private CA), AUTH with a password or an ACL user, connect and command
//! timeouts, and recovery after Redis restarts.
//!
//! The pool is deadpool's, with a manager of our own rather than deadpool-redis's: that
//! one can neither take a private CA nor avoid a `PING` round trip on every checkout. Ours
//! marks a connection broken when a command on it fails with an I/O or timeout error and
//! only pings connections that sat idle, so a healthy hot path costs no extra command and
//! a dead connection is replaced on the next checkout.

use std::path::PathBuf;
use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, Pool, RecycleError, RecycleResult};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo,
    RedisError, TlsCertificates,
};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Secret};

pub use redis as client;

/// Redis connection settings (`REDIS_*` environment variables, `[redis]` in TOML).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisSettings {
    /// `REDIS_URL`: a complete `redis://` or `rediss://` URL. When set it wins over host,
    /// port and TLS; `REDIS_PASSWORD`/`REDIS_USERNAME` still apply if the URL has none.
    /// A secret, because URLs carry passwords.
    pub url: Option<Secret>,
    /// `REDIS_HOST`.
    #[serde(deserialize_with = "crate::config::lenient_string")]
    pub host: String,
    /// `REDIS_PORT`.
    pub port: u16,
    /// `REDIS_PASSWORD`: AUTH password (ElastiCache auth token).
    pub password: Option<Secret>,
    /// `REDIS_USERNAME`: ACL user name (ElastiCache RBAC); empty means the default user.
    #[serde(deserialize_with = "crate::config::lenient_opt_string")]
    pub username: Option<String>,
    /// `REDIS_TLS`: connect with TLS (ElastiCache in-transit encryption).
    pub tls: bool,
    /// `REDIS_CA_FILE`: PEM file of the CA that signed the server's certificate, for a private
    /// CA. Without it the public web PKI roots are trusted (ElastiCache's chain to those).
    pub ca_file: Option<PathBuf>,
    /// `REDIS_DB`: logical database number.
    pub db: i64,
    /// `REDIS_POOL_SIZE`: most connections this process opens.
    pub pool_size: usize,
    /// `REDIS_CONNECT_TIMEOUT_MS`: TCP + TLS + AUTH must finish within this.
    pub connect_timeout_ms: u64,
    /// `REDIS_COMMAND_TIMEOUT_MS`: one command (or script) must answer within this, so an
    /// outage turns into a `503` rather than a hung request.
    pub command_timeout_ms: u64,
    /// `REDIS_KEY_PREFIX`: every key this deployment writes starts with it, so several
    /// deployments (or tests) can share one Redis.
    #[serde(deserialize_with = "crate::config::lenient_string")]
    pub key_prefix: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: None,
            host: "127.0.0.1".into(),
            port: 6379,
            password: None,
            username: None,
            tls: false,
            ca_file: None,
            db: 0,
            pool_size: 16,
            connect_timeout_ms: 2_000,
            command_timeout_ms: 3_000,
            key_prefix: "ensemble".into(),
        }
    }
}

/// The `REDIS_*` variables [`RedisSettings`] reads, for a service's `ENV_VARS`.
pub const REDIS_ENV_VARS: &[&str] = &[
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "REDIS_USERNAME",
    "REDIS_TLS",
    "REDIS_CA_FILE",
    "REDIS_DB",
    "REDIS_POOL_SIZE",
    "REDIS_CONNECT_TIMEOUT_MS",
    "REDIS_COMMAND_TIMEOUT_MS",
    "REDIS_KEY_PREFIX",
];

impl RedisSettings {
    /// Settings for a URL, the rest default.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: Some(Secret::new(url)),
            ..Self::default()
        }
    }

    /// Checks the settings without connecting. Errors name the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.connection_info()?;
        if self.pool_size == 0 {
            return Err(ConfigError::invalid(
                "REDIS_POOL_SIZE",
                "must be at least 1",
            ));
        }
        if let Some(ca) = &self.ca_file {
            if !self.uses_tls() {
                return Err(ConfigError::invalid(
                    "REDIS_CA_FILE",
                    "is set but TLS is off (set REDIS_TLS=true or use a rediss:// URL)",
                ));
            }
            if !ca.is_file() {
                return Err(ConfigError::invalid(
                    "REDIS_CA_FILE",
                    format!("{} is not a readable file", ca.display()),
                ));
            }
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}', ' ']) {
            return Err(ConfigError::invalid(
                "REDIS_KEY_PREFIX",
                "must be non-empty, without spaces or braces",
            ));
        }
        Ok(())
    }

    /// Whether connections use TLS.
    pub fn uses_tls(&self) -> bool {
        match self.url.as_ref().filter(|u| !u.is_empty()) {
            Some(url) => url.expose().starts_with("rediss://"),
            None => self.tls,
        }
    }

    /// Where this connects, for logs: scheme, host and port, never credentials.
    pub fn target(&self) -> String {
        match self.connection_info() {
            Ok(info) => match info.addr() {
                ConnectionAddr::Tcp(h, p) => format!("redis://{h}:{p}"),
                ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{host}:{port}"),
                ConnectionAddr::Unix(path) => format!("unix://{}", path.display()),
                _ => "redis".to_string(),
            },
            Err(_) => "redis (invalid settings)".to_string(),
        }
    }

    /// The redis crate's connection info for these settings.
    pub fn connection_info(&self) -> Result<ConnectionInfo, ConfigError> {
        let info = match self.url.as_ref().filter(|u| !u.is_empty()) {
            Some(url) => url.expose().into_connection_info().map_err(|e| {
                // The URL may hold a password: name the setting, not the value.
                ConfigError::invalid(
                    "REDIS_URL",
                    format!("not a valid Redis URL ({:?})", e.kind()),
                )
            })?,
            None => {
                if self.host.trim().is_empty() {
                    return Err(ConfigError::invalid("REDIS_HOST", "must not be empty"));
                }
                let addr = if self.tls {
                    ConnectionAddr::TcpTls {
                        host: self.host.clone(),
                        port: self.port,
                        insecure: false,
                        tls_params: None,
                    }
                } else {
                    ConnectionAddr::Tcp(self.host.clone(), self.port)
                };
                addr.into_connection_info()
                    .map_err(|e| ConfigError::invalid("REDIS_HOST", e))?
                    .set_redis_settings(redis::RedisConnectionInfo::default().set_db(self.db))
            }
        };
        let mut redis_settings = info.redis_settings().clone();
        if redis_settings.password().is_none()
            && let Some(password) = self.password.as_ref().filter(|p| !p.is_empty())
        {
            redis_settings = redis_settings.set_password(password.expose());
        }
        if redis_settings.username().is_none()
            && let Some(user) = &self.username
        {
            redis_settings = redis_settings.set_username(user);
        }
        Ok(info.set_redis_settings(redis_settings))
    }

    fn client(&self) -> Result<Client, ConfigError> {
        crate::install_crypto_provider();
        let info = self.connection_info()?;
        match &self.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    ConfigError::invalid("REDIS_CA_FILE", format!("{}: {e}", path.display()))
                })?;
                Client::build_with_tls(
                    info,
                    TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
                .map_err(|e| ConfigError::invalid("REDIS_CA_FILE", describe(&e)))
            }
            None => Client::open(info).map_err(|e| ConfigError::invalid("REDIS_URL", describe(&e))),
        }
    }
}

/// Redis could not serve a request: unreachable, refused, timed out, or rejected our
/// credentials. Services answer `503` with `Retry-After` for it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Unavailable {
    /// A one-line explanation, safe to show to a client or an operator.
    pub message: String,
}

impl From<RedisError> for Unavailable {
    fn from(e: RedisError) -> Self {
        Self {
            message: describe(&e),
        }
    }
}

/// A clear, one-line explanation of a Redis error: authentication and TLS failures say so
/// and name the settings to check.
pub fn describe(e: &RedisError) -> String {
    let text = e.to_string();
    let upper = text.to_ascii_uppercase();
    if e.kind() == ErrorKind::AuthenticationFailed
        || upper.contains("WRONGPASS")
        || upper.contains("NOAUTH")
        || upper.contains("NOPERM")
    {
        return format!(
            "Redis authentication failed (check REDIS_PASSWORD and REDIS_USERNAME): {text}"
        );
    }
    let lower = text.to_ascii_lowercase();
    if lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("handshake")
        || lower.contains("unknownissuer")
    {
        return format!(
            "Redis TLS connection failed (is the server's certificate trusted? set REDIS_CA_FILE for a private CA): {text}"
        );
    }
    if e.is_timeout() {
        return format!("Redis did not answer in time: {text}");
    }
    if e.is_connection_refusal() || e.is_io_error() || e.is_connection_dropped() {
        return format!("Redis is unreachable: {text}");
    }
    format!("Redis error: {text}")
}

/// A Redis connection as the pool hands it out.
pub struct Tracked {
    conn: MultiplexedConnection,
    /// Set when a command failed in a way that leaves the connection unusable, so the pool
    /// drops it instead of handing it out again.
    broken: bool,
}

fn breaks_connection(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

/// Creates connections and decides whether a returned one can be reused.
pub struct Manager {
    client: Client,
    config: AsyncConnectionConfig,
}

/// Connections idle longer than this are pinged before reuse; busier ones are trusted,
/// because a failure on them already marked them broken.
const PING_AFTER_IDLE: Duration = Duration::from_secs(5);

impl managed::Manager for Manager {
    type Type = Tracked;
    type Error = RedisError;

    async fn create(&self) -> Result<Tracked, RedisError> {
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        Ok(Tracked {
            conn,
            broken: false,
        })
    }

    async fn recycle(&self, c: &mut Tracked, metrics: &Metrics) -> RecycleResult<RedisError> {
        if c.broken {
            return Err(RecycleError::message("connection failed earlier"));
        }
        if metrics.last_used() > PING_AFTER_IDLE {
            redis::cmd("PING")
                .query_async::<()>(&mut c.conn)
                .await
                .map_err(RecycleError::Backend)?;
        }
        Ok(())
    }
}

/// One connection checked out of the pool; use it with `redis::cmd(..).query_async(&mut c)`
/// or `redis::AsyncCommands`. It goes back to the pool when dropped.
pub struct RedisConn(Object<Manager>);

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        let Tracked { conn, broken } = &mut *self.0;
        Box::pin(async move {
            let result = conn.req_packed_command(cmd).await;
            if let Err(e) = &result {
                *broken |= breaks_connection(e);
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        let Tracked { conn, broken } = &mut *self.0;
        Box::pin(async move {
            let result = conn.req_packed_commands(cmd, offset, count).await;
            if let Err(e) = &result {
                *broken |= breaks_connection(e);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.0.conn.get_db()
    }
}

/// The service's Redis pool. Cheap to clone.
#[derive(Clone)]
pub struct RedisPool {
    pool: Pool<Manager>,
    target: String,
    prefix: String,
}

impl std::fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPool")
            .field("target", &self.target)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisPool {
    /// Builds the pool. Nothing connects until the first use, so a service can start while
    /// Redis is still coming up (and `/ready` says so).
    pub fn new(settings: &RedisSettings) -> Result<Self, ConfigError> {
        settings.validate()?;
        let connect = Duration::from_millis(settings.connect_timeout_ms.max(1));
        let command = Duration::from_millis(settings.command_timeout_ms.max(1));
        let manager = Manager {
            client: settings.client()?,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect))
                .set_response_timeout(Some(command)),
        };
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(command))
            .create_timeout(Some(connect + Duration::from_millis(100)))
            .recycle_timeout(Some(command))
            .build()
            .map_err(|e| ConfigError::invalid("REDIS_POOL_SIZE", e))?;
        Ok(Self {
            pool,
            target: settings.target(),
            prefix: settings.key_prefix.clone(),
        })
    }

    /// A connection, or [`Unavailable`] with the reason.
    pub async fn get(&self) -> Result<RedisConn, Unavailable> {
        match self.pool.get().await {
            Ok(obj) => Ok(RedisConn(obj)),
            Err(managed::PoolError::Backend(e)) => Err(e.into()),
            Err(managed::PoolError::Timeout(_)) => Err(Unavailable {
                message: format!("Redis at {} did not answer in time", self.target),
            }),
            Err(e) => Err(Unavailable {
                message: format!("Redis pool error: {e}"),
            }),
        }
    }

    /// `PING`: what `/ready` asks.
    pub async fn ping(&self) -> Result<(), Unavailable> {
        let mut conn = self.get().await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// The key prefix every key of this deployment starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where this pool connects (no credentials), for logs.
    pub fn target(&self) -> &str {
        &self.target
    }
}

/// Opens one dedicated connection outside the pool, for blocking commands or pub/sub that
/// must not hold a pooled connection.
pub async fn dedicated_client(settings: &RedisSettings) -> Result<Client, ConfigError> {
    settings.validate()?;
    settings.client()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_wins_and_password_fills_in() {
        let s = RedisSettings {
            url: Some(Secret::new("rediss://cache.example:6380/2")),
            password: Some(Secret::new("pw")),
            username: Some("app".into()),
            ..RedisSettings::default()
        };
        let info = s.connection_info().unwrap();
        assert!(
            matches!(info.addr(), ConnectionAddr::TcpTls { host, port: 6380, .. } if host == "cache.example")
        );
        assert_eq!(info.redis_settings().password(), Some("pw"));
        assert_eq!(info.redis_settings().username(), Some("app"));
        assert_eq!(s.target(), "rediss://cache.example:6380");
        assert!(s.uses_tls());
    }

    #[test]
    fn host_port_tls_build_a_tls_address() {
        let s = RedisSettings {
            host: "h".into(),
            port: 7000,
            tls: true,
            ..RedisSettings::default()
        };
        assert_eq!(s.target(), "rediss://h:7000");
    }

    #[test]
    fn ca_file_without_tls_is_rejected_naming_the_setting() {
        let s = RedisSettings {
            ca_file: Some("/nonexistent".into()),
            ..RedisSettings::default()
        };
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("REDIS_CA_FILE"), "{err}");
    }

    #[test]
    fn bad_url_names_the_setting_without_echoing_it() {
        let s = RedisSettings::from_url("http://user:sekrit@host");
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("REDIS_URL"), "{err}");
        assert!(!err.contains("sekrit"), "{err}");
    }
}

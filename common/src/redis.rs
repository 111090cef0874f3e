//! The Redis connection pool every service uses: plain TCP or TLS (rustls, public web PKI
//! roots or a private CA), AUTH with a password or an ACL user, connect and command
//! timeouts, and recovery after Redis restarts.
//!
//! The pool is deadpool's, with a manager of our own rather than deadpool-redis's: that
//! one can neither take a private CA nor avoid a `PING` round trip on every checkout. Ours
//! marks a connection broken when a command on it fails with an I/O or timeout error and
//! only pings connections that sat idle, so a healthy hot path costs no extra command and
//! a dead connection is replaced on the next checkout.
//!
//! Failover (ElastiCache Multi-AZ): the endpoint's name moves to the promoted replica, but
//! connections already open stay on the old primary, now a replica, which answers every
//! write with `READONLY`. A role error (`READONLY`, `LOADING`, `MASTERDOWN`, `UNBLOCKED`)
//! therefore retires not only its own connection but every connection opened before it, so
//! the pool reconnects, resolving the endpoint again, after one failed command instead of
//! one per pooled connection.
//!
//! Memory: Ensemble's keys must never be evicted, so the first connection reads
//! `maxmemory_policy` (from `INFO memory`: ElastiCache blocks `CONFIG`) and logs one loud
//! warning unless it is `noeviction`. Under `noeviction` a full Redis answers writes with
//! `OOM`; [`classify`] sorts that apart from outages, and [`RedisPool::check_writable`]
//! (what `/ready` asks) reports it, as it reports a node that is not the primary.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// The log message of every Redis outage a service sees (a request, the dispatch loop, a
/// worker's heartbeat); a `during` field says where. The "Redis errors" alarm counts
/// exactly this message (`deploy/terraform/alarms.tf`, held to it by `checks`), so logging
/// an outage with other words hides it from the alarm.
pub const UNAVAILABLE_LOG: &str = "redis unavailable";

/// Redis could not serve a request. Mostly it is unreachable, refused, timed out, or
/// rejected our credentials (`503` with `Retry-After`), but `failure` says which: a full
/// store (`507`) and anything else (`500`) are told apart, as [`classify`] sorts them.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Unavailable {
    /// A one-line explanation, safe to show to a client or an operator.
    pub message: String,
    /// What it means for the request.
    pub failure: Failure,
}

impl From<RedisError> for Unavailable {
    fn from(e: RedisError) -> Self {
        Self {
            message: describe(&e),
            failure: classify(&e),
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

/// What a failed Redis command means for the request that sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Redis cannot serve now but will again: refused, I/O, timeout, dropped, credentials
    /// rejected, or the node reached is not a writable primary (`READONLY`, `LOADING`,
    /// `MASTERDOWN` during a failover). Retrying helps: `503` with `Retry-After`.
    Unavailable,
    /// `OOM`: Redis reached `maxmemory` and, under `noeviction`, refuses writes. Retrying
    /// does not help until an operator frees memory or raises `maxmemory`: `507`.
    StorageFull,
    /// Anything else (a script error, `WRONGTYPE`, `NOPERM`, a reply of the wrong shape): a
    /// bug or tampered data, not an outage: `500`, logged in full.
    Other,
}

/// The error's code, when it is one this module treats specially (role changes, transient
/// refusals, `OOM`); `None` for any other. Redis 7 keeps the code of an error raised inside
/// a script; Redis 6 wraps it in `ERR Error running script … -OOM …`, so an `ERR` is
/// searched for these codes.
fn error_code(e: &RedisError) -> Option<&'static str> {
    const CODES: &[&str] = &[
        "READONLY",
        "LOADING",
        "MASTERDOWN",
        "UNBLOCKED",
        "NOREPLICAS",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "OOM",
    ];
    let code = e.code()?;
    if let Some(known) = CODES.iter().find(|c| **c == code) {
        return Some(known);
    }
    if code == "ERR" {
        let text = e.to_string();
        return CODES
            .iter()
            .find(|c| text.contains(&format!("-{c} ")) || text.contains(&format!(": {c} ")))
            .copied();
    }
    None
}

/// Whether the node this connection reaches is not (or no longer, or not yet) a writable
/// primary: the connection must go and the endpoint be resolved again.
fn is_role_error(e: &RedisError) -> bool {
    matches!(
        error_code(e),
        Some("READONLY" | "LOADING" | "MASTERDOWN" | "UNBLOCKED")
    )
}

/// Sorts a Redis error into what the client should be told (see [`Failure`]).
pub fn classify(e: &RedisError) -> Failure {
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.kind() == ErrorKind::AuthenticationFailed
    {
        return Failure::Unavailable;
    }
    match error_code(e) {
        Some("OOM") => Failure::StorageFull,
        Some(_) => Failure::Unavailable,
        None => {
            let upper = e.to_string().to_ascii_uppercase();
            if upper.contains("WRONGPASS") || upper.contains("NOAUTH") {
                Failure::Unavailable
            } else {
                Failure::Other
            }
        }
    }
}

/// Why `/ready` fails: a stable reason code and a sentence for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct NotReady {
    /// `unavailable` (unreachable, timed out, credentials rejected), `read_only` (the node
    /// reached is a replica: a failover is under way or the endpoint has not moved yet),
    /// `loading` (the node is loading its data set), or `storage_full` (Redis is at
    /// `maxmemory` and refuses writes).
    pub reason: &'static str,
    /// What is wrong, for a person; no credentials.
    pub message: String,
}

impl From<Unavailable> for NotReady {
    fn from(e: Unavailable) -> Self {
        Self {
            reason: "unavailable",
            message: e.message,
        }
    }
}

/// What an operator reads when Redis is full.
pub const STORAGE_FULL_MESSAGE: &str = "the task store is full: Redis reached maxmemory and refuses writes; an operator must free memory or raise maxmemory (retrying will not help until then)";

/// For how long after a write met `OOM` [`RedisPool::check_writable`] still reports the
/// store full, even if `INFO memory` shows a little room again.
const FULL_FOR: Duration = Duration::from_secs(5);

/// The warning for a `maxmemory-policy`, or `None` when it is `noeviction` (the only policy
/// under which Redis never deletes a key on its own).
pub fn eviction_warning(policy: &str) -> Option<String> {
    if policy == "noeviction" {
        return None;
    }
    Some(format!(
        "Redis maxmemory-policy is `{policy}`: when memory runs short Redis will silently evict \
         keys Ensemble relies on (finished tasks, worker records, idempotency keys, leases). \
         Set maxmemory-policy to `noeviction` (ElastiCache: in the parameter group, see \
         deploy/terraform/elasticache.tf; elsewhere: `CONFIG SET maxmemory-policy noeviction`)"
    ))
}

/// Reads `maxmemory_policy` from `INFO memory`; `None` when the field is absent.
async fn read_policy(conn: &mut impl ConnectionLike) -> Result<Option<String>, RedisError> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    Ok(info_field(&info, "maxmemory_policy").map(str::to_string))
}

/// One `field:value` line of an `INFO` reply.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// Whether an error says the command is not allowed here (an ACL without `ROLE` or `INFO`),
/// in which case the check it belongs to is skipped rather than failed.
fn not_permitted(e: &RedisError) -> bool {
    let text = e.to_string();
    e.code() == Some("NOPERM") || text.contains("unknown command") || text.contains("NOPERM")
}

/// What every connection of one pool shares.
struct Shared {
    /// Where the pool connects (no credentials), for logs.
    target: String,
    /// Bumped when a connection meets a role error: connections of an older generation are
    /// dropped at their next checkout, so the whole pool reconnects at once.
    generation: AtomicU64,
    /// When a write last met `OOM`, in ms since the Unix epoch (0: never), so `/ready` can
    /// report the store full.
    last_full_ms: AtomicU64,
    /// Set once a connection has started the `maxmemory-policy` check, so it runs once.
    policy_checked: AtomicBool,
    /// The `maxmemory_policy` that check found; `None` before it, or when `INFO` is not
    /// permitted.
    policy: Mutex<Option<String>>,
}

impl Shared {
    /// Takes note of a failed command on a connection of `generation`; returns whether the
    /// connection must be dropped.
    fn observe(&self, generation: u64, e: &RedisError) -> bool {
        if is_role_error(e) {
            // Only the first connection of a generation to see it moves the generation on.
            if self.generation.fetch_max(generation + 1, Ordering::SeqCst) <= generation {
                tracing::warn!(
                    redis = %self.target,
                    error = %e,
                    "the Redis node reached is not a writable primary (failover?); reconnecting every pooled connection"
                );
            }
            return true;
        }
        if classify(e) == Failure::StorageFull {
            let now = crate::wire::now_ms();
            let before = self.last_full_ms.swap(now, Ordering::SeqCst);
            metrics::counter!("ensemble_storage_full_total").increment(1);
            if now.saturating_sub(before) > FULL_FOR.as_millis() as u64 {
                tracing::error!(redis = %self.target, error = %e, "{STORAGE_FULL_MESSAGE}");
            }
        }
        e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
    }

    /// The connection hands a server's error reply (`READONLY`, `OOM`, …) back as a value,
    /// which becomes an `Err` only later, in the caller's conversion: look at it here. A
    /// `MULTI`/`EXEC` reply holds its commands' errors one level down.
    fn observe_reply(&self, generation: u64, value: &redis::Value) -> bool {
        match value {
            redis::Value::ServerError(e) => self.observe(generation, &e.clone().into()),
            redis::Value::Array(items) => items.iter().fold(false, |broken, item| match item {
                redis::Value::ServerError(e) => {
                    self.observe(generation, &e.clone().into()) || broken
                }
                _ => broken,
            }),
            _ => false,
        }
    }

    fn recently_full(&self) -> bool {
        let last = self.last_full_ms.load(Ordering::SeqCst);
        last != 0 && crate::wire::now_ms().saturating_sub(last) < FULL_FOR.as_millis() as u64
    }

    /// The once-per-pool `maxmemory-policy` check, in the background on a clone of the
    /// first connection, so that making a connection never waits for it.
    fn check_policy_once(self: &Arc<Self>, conn: &MultiplexedConnection) {
        if self.policy_checked.swap(true, Ordering::SeqCst) {
            return;
        }
        let shared = self.clone();
        let mut conn = conn.clone();
        tokio::spawn(async move {
            match read_policy(&mut conn).await {
                Ok(policy) => {
                    match policy.as_deref().and_then(eviction_warning) {
                        Some(warning) => tracing::warn!(redis = %shared.target, "{warning}"),
                        None if policy.is_none() => tracing::warn!(
                            redis = %shared.target,
                            "Redis did not report maxmemory_policy; make sure it is `noeviction`"
                        ),
                        None => tracing::debug!("Redis maxmemory-policy is noeviction"),
                    }
                    if let Ok(mut slot) = shared.policy.lock() {
                        *slot = policy;
                    }
                }
                Err(e) if not_permitted(&e) => tracing::warn!(
                    redis = %shared.target,
                    "INFO is not permitted, so the maxmemory-policy cannot be checked; make sure it is `noeviction`"
                ),
                // The connection failed: let the next one try again.
                Err(_) => shared.policy_checked.store(false, Ordering::SeqCst),
            }
        });
    }
}

/// A Redis connection as the pool hands it out.
pub struct Tracked {
    conn: MultiplexedConnection,
    /// Set when a command failed in a way that leaves the connection unusable, so the pool
    /// drops it instead of handing it out again.
    broken: bool,
    /// The pool's generation when this connection was made (see [`Shared::generation`]).
    generation: u64,
    /// The pool's shared state, which a failed command updates.
    shared: Arc<Shared>,
}

/// Creates connections and decides whether a returned one can be reused.
pub struct Manager {
    client: Client,
    config: AsyncConnectionConfig,
    shared: Arc<Shared>,
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
        self.shared.check_policy_once(&conn);
        Ok(Tracked {
            conn,
            broken: false,
            generation: self.shared.generation.load(Ordering::SeqCst),
            shared: self.shared.clone(),
        })
    }

    async fn recycle(&self, c: &mut Tracked, metrics: &Metrics) -> RecycleResult<RedisError> {
        if c.broken {
            return Err(RecycleError::message("connection failed earlier"));
        }
        if c.generation < self.shared.generation.load(Ordering::SeqCst) {
            return Err(RecycleError::message(
                "made before a failover was noticed; reconnecting",
            ));
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
        let Tracked {
            conn,
            broken,
            generation,
            shared,
        } = &mut *self.0;
        Box::pin(async move {
            let result = conn.req_packed_command(cmd).await;
            match &result {
                Err(e) => *broken |= shared.observe(*generation, e),
                Ok(value) => *broken |= shared.observe_reply(*generation, value),
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
        let Tracked {
            conn,
            broken,
            generation,
            shared,
        } = &mut *self.0;
        Box::pin(async move {
            let result = conn.req_packed_commands(cmd, offset, count).await;
            match &result {
                Err(e) => *broken |= shared.observe(*generation, e),
                Ok(values) => {
                    for value in values {
                        *broken |= shared.observe_reply(*generation, value);
                    }
                }
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.0.conn.get_db()
    }
}

impl RedisConn {
    /// Drops this connection, and every other made before it, at the next checkout: the node
    /// it reaches cannot take writes.
    fn retire(&mut self) {
        let Tracked {
            broken,
            generation,
            shared,
            ..
        } = &mut *self.0;
        *broken = true;
        shared
            .generation
            .fetch_max(*generation + 1, Ordering::SeqCst);
    }
}

/// The service's Redis pool. Cheap to clone.
#[derive(Clone)]
pub struct RedisPool {
    pool: Pool<Manager>,
    target: String,
    prefix: String,
    shared: Arc<Shared>,
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
        let shared = Arc::new(Shared {
            target: settings.target(),
            generation: AtomicU64::new(0),
            last_full_ms: AtomicU64::new(0),
            policy_checked: AtomicBool::new(false),
            policy: Mutex::new(None),
        });
        let manager = Manager {
            client: settings.client()?,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect))
                .set_response_timeout(Some(command)),
            shared: shared.clone(),
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
            shared,
        })
    }

    /// A connection, or [`Unavailable`] with the reason.
    pub async fn get(&self) -> Result<RedisConn, Unavailable> {
        match self.pool.get().await {
            Ok(obj) => Ok(RedisConn(obj)),
            Err(managed::PoolError::Backend(e)) => Err(e.into()),
            Err(managed::PoolError::Timeout(_)) => Err(Unavailable {
                message: format!("Redis at {} did not answer in time", self.target),
                failure: Failure::Unavailable,
            }),
            Err(e) => Err(Unavailable {
                message: format!("Redis pool error: {e}"),
                failure: Failure::Unavailable,
            }),
        }
    }

    /// What `/ready` asks: [`Self::check_writable`].
    pub async fn ping(&self) -> Result<(), NotReady> {
        self.check_writable().await
    }

    /// Whether Redis can take this service's writes now: reachable, the node reached is
    /// the primary (`ROLE`, or `role:` of `INFO replication` when an ACL forbids `ROLE`),
    /// and not full (no write met `OOM` in the last few seconds, and `INFO memory` shows
    /// `used_memory` below `maxmemory`). A check an ACL forbids is skipped, not failed.
    /// Finding a replica retires the pool's connections, so it reconnects by itself.
    pub async fn check_writable(&self) -> Result<(), NotReady> {
        let mut conn = self.get().await?;
        match node_role(&mut conn).await {
            Ok(Some(role)) if role != "master" => {
                conn.retire();
                return Err(NotReady {
                    reason: "read_only",
                    message: format!(
                        "Redis at {} is a {role}, not the primary, and cannot take writes (a failover is under way or the endpoint has not moved yet); reconnecting",
                        self.target
                    ),
                });
            }
            Ok(_) => {}
            Err(e) => return Err(self.not_ready(&e)),
        }
        if self.shared.recently_full() {
            return Err(storage_full());
        }
        let info = match redis::cmd("INFO")
            .arg("memory")
            .query_async::<String>(&mut conn)
            .await
        {
            Ok(info) => info,
            Err(e) if not_permitted(&e) => return Ok(()),
            Err(e) => return Err(self.not_ready(&e)),
        };
        let number = |field| info_field(&info, field).and_then(|v| v.parse::<u64>().ok());
        if let (Some(used), Some(max)) = (number("used_memory"), number("maxmemory"))
            && max > 0
            && used >= max
        {
            return Err(storage_full());
        }
        Ok(())
    }

    fn not_ready(&self, e: &RedisError) -> NotReady {
        let reason = match error_code(e) {
            Some("LOADING") => "loading",
            Some("READONLY" | "MASTERDOWN" | "UNBLOCKED") => "read_only",
            Some("OOM") => return storage_full(),
            _ => "unavailable",
        };
        NotReady {
            reason,
            message: describe(e),
        }
    }

    /// Reads Redis's `maxmemory_policy` now (`INFO memory`); `None` when Redis does not
    /// report it.
    pub async fn maxmemory_policy(&self) -> Result<Option<String>, Unavailable> {
        let mut conn = self.get().await?;
        Ok(read_policy(&mut conn).await?)
    }

    /// The `maxmemory_policy` the pool's first connection found (the start-up check; its
    /// warning, from [`eviction_warning`], is logged then); `None` until that check has run.
    pub fn checked_maxmemory_policy(&self) -> Option<String> {
        self.shared.policy.lock().ok().and_then(|p| p.clone())
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

fn storage_full() -> NotReady {
    NotReady {
        reason: "storage_full",
        message: STORAGE_FULL_MESSAGE.to_string(),
    }
}

/// The node's role: `master`, `slave`/`replica`, `sentinel`; `None` when neither `ROLE`
/// nor `INFO replication` is permitted.
async fn node_role(conn: &mut RedisConn) -> Result<Option<String>, RedisError> {
    match redis::cmd("ROLE")
        .query_async::<redis::Value>(&mut *conn)
        .await
    {
        Ok(redis::Value::Array(items)) => {
            if let Some(first) = items.first()
                && let Ok(role) = redis::from_redis_value_ref::<String>(first)
            {
                return Ok(Some(role));
            }
        }
        Ok(_) => {}
        Err(e) if not_permitted(&e) => {}
        Err(e) => return Err(e),
    }
    match redis::cmd("INFO")
        .arg("replication")
        .query_async::<String>(&mut *conn)
        .await
    {
        Ok(info) => Ok(info_field(&info, "role").map(str::to_string)),
        Err(e) if not_permitted(&e) => Ok(None),
        Err(e) => Err(e),
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

    /// An error reply as Redis sends it, through the client's own parser.
    fn server_error(line: &str) -> RedisError {
        match redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap() {
            redis::Value::ServerError(e) => e.into(),
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn errors_are_sorted_into_outages_a_full_store_and_the_rest() {
        use Failure::*;
        // (reply, what the client is told, whether the pool reconnects everything)
        let cases = [
            (
                "READONLY You can't write against a read only replica.",
                Unavailable,
                true,
            ),
            (
                "LOADING Redis is loading the dataset in memory",
                Unavailable,
                true,
            ),
            ("MASTERDOWN Link with MASTER is down", Unavailable, true),
            (
                "UNBLOCKED force unblock from blocking operation",
                Unavailable,
                true,
            ),
            (
                "NOREPLICAS Not enough good replicas to write.",
                Unavailable,
                false,
            ),
            (
                "READONLY You can't write against a read only replica. script: 9f, on @user_script:1.",
                Unavailable,
                true,
            ),
            (
                "OOM command not allowed when used memory > 'maxmemory'. script: 9f, on @user_script:1.",
                StorageFull,
                false,
            ),
            // Redis 6 wraps an error raised inside a script.
            (
                "ERR Error running script (call to f_9f): @user_script:1: @user_script: 1: -OOM command not allowed when used memory > 'maxmemory'.",
                StorageFull,
                false,
            ),
            (
                "ERR Error running script (call to f_9f): @user_script:1: @user_script: 1: -READONLY You can't write against a read only replica.",
                Unavailable,
                true,
            ),
            (
                "WRONGTYPE Operation against a key holding the wrong kind of value",
                Other,
                false,
            ),
            (
                "ERR user_script:1: boom script: 9f, on @user_script:1.",
                Other,
                false,
            ),
            (
                "NOPERM this user has no permissions to run the 'eval' command",
                Other,
                false,
            ),
            (
                "WRONGPASS invalid username-password pair",
                Unavailable,
                false,
            ),
        ];
        for (reply, failure, role) in cases {
            let e = server_error(reply);
            assert_eq!(classify(&e), failure, "{reply}");
            assert_eq!(is_role_error(&e), role, "{reply}");
        }
    }

    #[test]
    fn only_noeviction_is_safe_and_the_warning_names_the_fix() {
        assert_eq!(eviction_warning("noeviction"), None);
        for policy in [
            "volatile-lru",
            "allkeys-lru",
            "volatile-ttl",
            "allkeys-random",
        ] {
            let w = eviction_warning(policy).unwrap();
            assert!(w.contains(policy) && w.contains("noeviction"), "{w}");
        }
        let info =
            "# Memory\r\nused_memory:1024\r\nmaxmemory:0\r\nmaxmemory_policy:volatile-lru\r\n";
        assert_eq!(info_field(info, "maxmemory_policy"), Some("volatile-lru"));
        assert_eq!(info_field(info, "maxmemory"), Some("0"));
        assert_eq!(info_field(info, "role"), None);
    }

    #[test]
    fn bad_url_names_the_setting_without_echoing_it() {
        let s = RedisSettings::from_url("http://user:sekrit@host");
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("REDIS_URL"), "{err}");
        assert!(!err.contains("sekrit"), "{err}");
    }
}

//! A real `redis-server` on a free loopback port in a temp dir: plain, `requirepass`, an
//! ACL user, TLS only (certificates generated for the run), or AOF persistence so a test
//! can kill and restart it and keep the data.
//!
//! [`RedisServer::try_start`] returns a [`RedisStartError`] (the launcher reports it);
//! [`RedisServer::start`] and the other constructors panic with it (tests). A missing
//! `redis-server` is an error, never a silent skip. The server's output is kept in a log
//! file in its directory: start-up errors quote its end, and a server dropped while a test
//! panics prints it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::config::Secret;
use common::redis::RedisSettings;

use crate::free_port;
use crate::service::{stop_child, tail};

/// How long a fresh server may take to log that it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a graceful stop (SIGTERM) may take before the server is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Ports tried when the chosen one is taken before redis-server binds it.
const PORT_ATTEMPTS: usize = 5;

/// How to start a Redis.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// `requirepass` for the default user.
    pub password: Option<String>,
    /// An ACL user `(name, password)`; the default user is then disabled.
    pub acl_user: Option<(String, String)>,
    /// Serve TLS only (no plain port), with a CA and server certificate made for this run.
    pub tls: bool,
    /// `appendonly yes` with `appendfsync always`, so a kill loses no acknowledged write.
    pub aof: bool,
    /// More `redis-server` arguments, each its own element, passed last (so they win), e.g.
    /// `["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]`.
    pub extra_args: Vec<String>,
    /// The program to run; `redis-server` from PATH when unset.
    pub program: Option<PathBuf>,
    /// How long it may take to become ready; 15 s when unset.
    pub ready_within: Option<Duration>,
}

/// Why a redis-server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RedisStartError {
    /// The program cannot be run.
    #[error(
        "cannot run {program}: {source}. Install Redis (Debian/Ubuntu: `sudo apt-get install -y \
         redis-server`; macOS: `brew install redis`)"
    )]
    NotOnPath {
        /// What was run.
        program: String,
        /// Why it could not be.
        source: std::io::Error,
    },
    /// Its directory or certificates could not be made.
    #[error("cannot prepare redis-server's directory: {0}")]
    Setup(String),
    /// It exited during start-up.
    #[error("redis-server exited at start-up ({status}); the end of its log:\n{log_tail}")]
    Exited {
        /// How it exited.
        status: ExitStatus,
        /// The last lines it printed.
        log_tail: String,
    },
    /// It ran but never said it was ready.
    #[error("redis-server was not ready within {within:?}; the end of its log:\n{log_tail}")]
    NotReady {
        /// How long it was given.
        within: Duration,
        /// The last lines it printed.
        log_tail: String,
    },
}

impl RedisStartError {
    /// Whether another process took the port: worth a retry on another one.
    fn port_taken(&self) -> bool {
        matches!(self, Self::Exited { log_tail, .. } if log_tail.contains("Address already in use"))
    }
}

/// Certificates made for one TLS server.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate (PEM) that signed the server's certificate.
    pub ca_cert: PathBuf,
    /// The server certificate (PEM), for `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    /// The server's private key (PEM).
    pub server_key: PathBuf,
    /// Another CA, which did not sign anything this server uses.
    pub other_ca_cert: PathBuf,
}

/// A running `redis-server`. Stopped (SIGTERM, then SIGKILL), and its directory removed, on
/// drop.
pub struct RedisServer {
    /// `None` once killed.
    child: Option<Child>,
    /// Data, certificates and the log; removed with the server.
    dir: tempfile::TempDir,
    port: u16,
    options: RedisOptions,
    tls: Option<TlsFiles>,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("options", &self.options)
            .finish()
    }
}

/// Whether `redis-server` can be run from PATH.
pub fn redis_available() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl RedisServer {
    /// Starts a server with the given options and waits until it is ready. A port taken
    /// between choosing and binding it costs a retry on another.
    pub fn try_start(options: RedisOptions) -> Result<Self, RedisStartError> {
        let dir = tempfile::Builder::new()
            .prefix("ensemble-redis-")
            .tempdir()
            .map_err(|e| RedisStartError::Setup(e.to_string()))?;
        let tls = if options.tls {
            Some(make_certificates(dir.path()).map_err(RedisStartError::Setup)?)
        } else {
            None
        };
        let mut server = Self {
            child: None,
            dir,
            port: 0,
            options,
            tls,
        };
        let mut attempts = 0;
        loop {
            server.port = free_port();
            attempts += 1;
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) if e.port_taken() && attempts < PORT_ATTEMPTS => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Plain Redis, no auth.
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    /// Redis with `requirepass`.
    pub fn with_password(password: &str) -> Self {
        Self::start_with(RedisOptions {
            password: Some(password.into()),
            ..Default::default()
        })
    }

    /// Redis with AOF (`appendfsync always`), for restart tests.
    pub fn with_aof() -> Self {
        Self::start_with(RedisOptions {
            aof: true,
            ..Default::default()
        })
    }

    /// Plain Redis with more `redis-server` arguments (see [`RedisOptions::extra_args`]).
    pub fn with_args(args: &[&str]) -> Self {
        Self::start_with(RedisOptions {
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        })
    }

    /// [`Self::try_start`] for tests: panics with the error.
    pub fn start_with(options: RedisOptions) -> Self {
        Self::try_start(options).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The file the server writes its log to (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            // Log to stdout, which goes to the log file with stderr: configuration errors
            // are printed before the log file would be opened.
            "--logfile".into(),
            String::new(),
            "--save".into(),
            String::new(),
            "--daemonize".into(),
            "no".into(),
            "--protected-mode".into(),
            "no".into(),
            // As deploy/terraform/elasticache.tf and docker-compose.yml set it: a task's
            // hash keeps the compact encoding with its input in it (Redis 6 and 7 both take
            // this older name of hash-max-listpack-value).
            "--hash-max-ziplist-value".into(),
            "1024".into(),
        ];
        if self.options.aof {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        if let Some(password) = &self.options.password {
            args.extend(["--requirepass".into(), password.clone()]);
        }
        if let Some((user, password)) = &self.options.acl_user {
            // redis-server quotes an argument that holds spaces, so each ACL rule is its
            // own argument.
            args.extend([
                "--user".to_string(),
                user.clone(),
                "on".into(),
                format!(">{password}"),
                "~*".into(),
                "&*".into(),
                "+@all".into(),
                "--user".into(),
                "default".into(),
                "off".into(),
            ]);
        }
        let port = self.port.to_string();
        match &self.tls {
            Some(tls) => args.extend([
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port,
                "--tls-cert-file".into(),
                tls.server_cert.display().to_string(),
                "--tls-key-file".into(),
                tls.server_key.display().to_string(),
                "--tls-ca-cert-file".into(),
                tls.ca_cert.display().to_string(),
                "--tls-auth-clients".into(),
                "no".into(),
            ]),
            None => args.extend(["--port".into(), port]),
        }
        args.extend(self.options.extra_args.iter().cloned());
        args
    }

    /// Runs the server on `self.port` and waits until it logs that it is ready.
    fn spawn(&mut self) -> Result<(), RedisStartError> {
        let program = self
            .options
            .program
            .clone()
            .unwrap_or_else(|| PathBuf::from("redis-server"));
        let log = std::fs::File::create(self.log_path())
            .and_then(|f| Ok((f.try_clone()?, f)))
            .map_err(|e| RedisStartError::Setup(e.to_string()))?;
        let child = Command::new(&program)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(log.0)
            .stderr(log.1)
            .spawn()
            .map_err(|source| RedisStartError::NotOnPath {
                program: program.display().to_string(),
                source,
            })?;
        self.child = Some(child);
        let within = self.options.ready_within.unwrap_or(READY_TIMEOUT);
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if log.contains("Ready to accept connections") {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(RedisStartError::Exited {
                    status,
                    log_tail: tail(&log),
                });
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(RedisStartError::NotReady {
                    within,
                    log_tail: tail(&self.log()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port it listens on (the TLS port for a TLS server).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The certificates, for a TLS server.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// A URL with credentials: `redis://` or `rediss://`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = match (&self.options.acl_user, &self.options.password) {
            (Some((user, pw)), _) => format!("{user}:{pw}@"),
            (None, Some(pw)) => format!(":{pw}@"),
            (None, None) => String::new(),
        };
        format!("{scheme}://{auth}127.0.0.1:{}", self.port)
    }

    /// Client settings for this server as a service would have them: its URL with
    /// credentials and, for TLS, the test CA; everything else the defaults.
    pub fn service_settings(&self) -> RedisSettings {
        RedisSettings {
            ca_file: self.tls.as_ref().map(|t| t.ca_cert.clone()),
            ..RedisSettings::from_url(self.url())
        }
    }

    /// Client settings for a test: [`Self::service_settings`] with short timeouts and a
    /// key prefix of its own, so tests sharing a server do not see each other's keys.
    pub fn settings(&self) -> RedisSettings {
        RedisSettings {
            url: Some(Secret::new(self.url())),
            connect_timeout_ms: 1_000,
            command_timeout_ms: 2_000,
            key_prefix: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            ..self.service_settings()
        }
    }

    /// `kill -9`: the server dies without saving anything beyond what AOF already has.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it gracefully: SIGTERM (it writes nothing: snapshots are off, AOF is synced on
    /// every write), then SIGKILL if it takes longer than a few seconds.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, STOP_GRACE);
        }
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts it again on the same port and directory (after [`Self::kill`]); with AOF the
    /// data comes back. Retries while the old socket lingers.
    pub fn try_restart(&mut self) -> Result<(), RedisStartError> {
        self.kill();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.spawn() {
                Err(e) if e.port_taken() && attempts < 20 => {
                    std::thread::sleep(Duration::from_millis(250));
                }
                outcome => return outcome,
            }
        }
    }

    /// [`Self::try_restart`] for tests: panics with the error.
    pub fn restart(&mut self) {
        let port = self.port;
        self.try_restart()
            .unwrap_or_else(|e| panic!("could not restart redis-server on port {port}: {e}"));
    }
}

impl Drop for RedisServer {
    /// Stops the server; if a test is failing, prints the end of its log first.
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "--- redis-server on port {} (log {}):\n{}",
                self.port,
                self.log_path().display(),
                tail(&self.log())
            );
        }
        self.stop();
    }
}

fn make_certificates(dir: &Path) -> Result<TlsFiles, String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    fn ca(name: &str) -> Result<(CertificateParams, KeyPair, String), rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok((params, key, cert.pem()))
    }

    let certificates = || -> Result<_, rcgen::Error> {
        let (ca_params, ca_key, ca_pem) = ca("Ensemble test CA")?;
        let issuer = Issuer::new(ca_params, ca_key);
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_key = KeyPair::generate()?;
        let server_cert = server_params.signed_by(&server_key, &issuer)?;
        let (_, _, other_pem) = ca("Some other CA")?;
        Ok((
            ca_pem,
            server_cert.pem(),
            server_key.serialize_pem(),
            other_pem,
        ))
    };
    let (ca_pem, cert_pem, key_pem, other_pem) =
        certificates().map_err(|e| format!("cannot make test certificates: {e}"))?;
    let files = TlsFiles {
        ca_cert: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        other_ca_cert: dir.join("other-ca.pem"),
    };
    for (path, pem) in [
        (&files.ca_cert, ca_pem),
        (&files.server_cert, cert_pem),
        (&files.server_key, key_pem),
        (&files.other_ca_cert, other_pem),
    ] {
        std::fs::write(path, pem).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(files)
}

//! Test harness: a real `redis-server` on a free loopback port in a temp dir, stopped on
//! drop. Flavours: plain, `requirepass`, an ACL user, TLS only (certificates generated at
//! test time), and AOF persistence so a test can kill and restart it and keep the data.
//!
//! If `redis-server` is not on PATH the harness panics with install instructions: tests
//! never skip silently.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::config::Secret;
use common::redis::RedisSettings;

use crate::free_port;

/// How to start a test Redis.
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
}

/// Certificates made for one TLS test server.
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

/// A running `redis-server`. Killed, and its directory removed, on drop.
pub struct RedisServer {
    child: Option<Child>,
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

/// The message tests fail with when `redis-server` is missing.
pub const MISSING_REDIS: &str = "redis-server is not on PATH. Ensemble's tests need a real Redis: \
install it (Debian/Ubuntu: `sudo apt-get install -y redis-server`; macOS: `brew install redis`) \
and run the tests again.";

/// Whether `redis-server` can be run.
pub fn redis_available() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}


impl RedisServer {
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

    /// Starts a server with the given options.
    pub fn start_with(options: RedisOptions) -> Self {
        assert!(redis_available(), "{MISSING_REDIS}");
        let mut dir = tempfile::Builder::new()
            .prefix("ensemble-redis-")
            .tempdir()
            .expect("temp dir");
        let tls = options.tls.then(|| make_certificates(dir.path()));
        // A port can be taken between choosing and binding it; try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = Self {
                child: None,
                dir,
                port: free_port(),
                options: options.clone(),
                tls: tls.clone(),
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => {
                    last_error = e;
                    dir = server.take_dir();
                }
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        self.kill();
        let placeholder = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let mut args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--logfile".into(),
            self.log_path().display().to_string(),
            "--save".into(),
            String::new(),
            "--daemonize".into(),
            "no".into(),
            "--protected-mode".into(),
            "no".into(),
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
        let _ = std::fs::remove_file(self.log_path());
        let child = Command::new("redis-server")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{MISSING_REDIS} ({e})"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            if log.contains("Ready to accept connections") {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("redis-server exited with {status}; log:\n{log}"));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "redis-server did not become ready in 15 s; log:\n{log}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port it listens on (the TLS port for a TLS server).
    pub fn port(&self) -> u16 {
        self.port
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

    /// Client settings for this server: URL with credentials, the test CA for TLS, short
    /// timeouts, and a key prefix of its own.
    pub fn settings(&self) -> RedisSettings {
        RedisSettings {
            url: Some(Secret::new(self.url())),
            ca_file: self.tls.as_ref().map(|t| t.ca_cert.clone()),
            connect_timeout_ms: 1_000,
            command_timeout_ms: 2_000,
            key_prefix: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            ..RedisSettings::default()
        }
    }

    /// `kill -9`: the server dies without saving anything beyond what AOF already has.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
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
    pub fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
        panic!(
            "could not restart redis-server on port {}: {last}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn make_certificates(dir: &Path) -> TlsFiles {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        (params, key, cert.pem())
    }

    let (ca_params, ca_key, ca_pem) = ca("Ensemble test CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let mut server_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server params");
    server_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server_key = KeyPair::generate().expect("server key");
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .expect("server cert");
    let (_, _, other_pem) = ca("Some other CA");

    let files = TlsFiles {
        ca_cert: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        other_ca_cert: dir.join("other-ca.pem"),
    };
    std::fs::write(&files.ca_cert, ca_pem).expect("write ca");
    std::fs::write(&files.server_cert, server_cert.pem()).expect("write cert");
    std::fs::write(&files.server_key, server_key.serialize_pem()).expect("write key");
    std::fs::write(&files.other_ca_cert, other_pem).expect("write other ca");
    files
}

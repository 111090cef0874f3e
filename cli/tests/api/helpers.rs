//! Test helpers: run the `ensemble` binary with a time limit, start `ensemble up` or the
//! service binaries as child processes (killed on drop), build those binaries once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `ensemble` binary cargo built for these tests.
pub const ENSEMBLE: &str = env!("CARGO_BIN_EXE_ensemble");

/// An `ensemble` command with a clean environment (no `ENSEMBLE_*` or `REDIS_*` leaking in
/// from the developer's shell).
pub fn ensemble(args: &[&str]) -> Command {
    let mut command = Command::new(ENSEMBLE);
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    command
}

/// Runs a command to the end, killing it if it takes longer than `limit`.
pub fn run(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Read the pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut buf).ok();
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut buf).ok();
        buf
    });
    let Some(status) = wait_until(&mut child, limit) else {
        let _ = child.kill();
        let _ = child.wait();
        let stderr = text(&err.join().unwrap());
        panic!("{command:?} did not finish within {limit:?}; stderr:\n{stderr}");
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Waits for a child to exit, at most `limit`.
pub fn wait_until(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Text of an output stream.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A child process with its output in files; killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `command` with stdout and stderr going to `{dir}/{name}.log`.
    pub fn start(name: &str, mut command: Command, dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.into(),
            child,
            log,
        }
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its output contains `needle`; panics with the output after `limit` or
    /// if it exits first.
    pub fn wait_for_output(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let output = self.output();
            if output.contains(needle) {
                return output;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) before printing {needle:?}:\n{output}",
                    self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not print {needle:?} within {limit:?}:\n{output}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `limit` for it to exit.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM failed");
        wait_until(&mut self.child, limit)
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    /// SIGTERM first, so an `ensemble up` stops the redis-server it started; SIGKILL if it
    /// takes more than a few seconds.
    fn drop(&mut self) {
        if self.is_running() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status();
            if wait_until(&mut self.child, Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    testkit::free_port()
}

/// GETs `url` until it answers 2xx, at most `limit`.
pub async fn wait_http_ok(url: &str, limit: Duration) {
    let http = reqwest::Client::new();
    let ok = testkit::eventually(limit, || async {
        let r = http
            .get(url)
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    assert!(ok.is_some(), "{url} was not ready within {limit:?}");
}

/// `GET url` with a bearer key: the JSON body when the answer is `200`, else `None`.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    key: &str,
) -> Option<T> {
    let response = http.get(url).bearer_auth(key).send().await.ok()?;
    if response.status() != reqwest::StatusCode::OK {
        return None;
    }
    response.json().await.ok()
}

/// The directory holding the `master`, `worker` and `llm-gateway` binaries, built once per
/// test run with the same target dir and profile as this test (cargo only builds the
/// binaries of the package under test). The dependency feature the tests enable is passed
/// too, so the libraries built for the tests are reused rather than rebuilt.
pub fn service_binaries() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = Path::new(ENSEMBLE);
        let profile_dir = exe.parent().expect("the binary's directory");
        let target_dir = profile_dir.parent().expect("the target dir");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut command = Command::new(env!("CARGO"));
        command
            .args(["build", "--quiet", "--profile", profile, "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(target_dir)
            .args(["-p", "master", "-p", "worker", "-p", "llm-gateway"])
            .args(["--bin", "master", "--bin", "worker", "--bin", "llm-gateway"])
            .args(["--features", "common/test-util"]);
        let output = run(command, Duration::from_secs(30 * 60));
        assert!(
            output.status.success(),
            "building the service binaries failed:\n{}",
            text(&output.stderr)
        );
        for bin in ["master", "worker", "llm-gateway"] {
            assert!(profile_dir.join(bin).is_file(), "{bin} was not built");
        }
        profile_dir.to_path_buf()
    })
}

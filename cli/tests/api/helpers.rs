//! Test helpers: run the `ensemble` binary with a time limit, build the service binaries
//! once. Child processes that keep running (`ensemble up`, the services) are
//! `testkit::Service`s.

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
        let stdout = text(&out.join().unwrap());
        panic!("{command:?} did not finish within {limit:?}; stdout:\n{stdout}\nstderr:\n{stderr}");
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Waits for a child to exit, at most `limit`.
fn wait_until(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
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
/// binaries of the package under test).
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
            .args(["--bin", "master", "--bin", "worker", "--bin", "llm-gateway"]);
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

//! `ensemble demo` runs one task through the four workers and prints its result.

use std::process::{Command, Output};
use std::time::Duration;

use crate::helpers::*;

/// `ensemble demo` with the master on `master_port`, the rest on free ports, and `extra`
/// flags.
fn demo_on(master_port: &str, extra: &[&str]) -> Command {
    let ports = [
        "--gateway-port",
        "0",
        "--worker-ports",
        "0",
        "--master-port",
        master_port,
    ];
    ensemble(&[&["demo"], &ports[..], extra].concat())
}

/// `ensemble demo` on free ports.
fn demo(extra: &[&str]) -> Command {
    demo_on("0", extra)
}

/// Runs it; asserts it exited 0 and ran the task; returns (stdout, stderr).
fn succeeds(command: Command) -> (String, String) {
    let output: Output = run(command, Duration::from_secs(120));
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(stdout.contains("task succeeded"), "{stdout}");
    (stdout, stderr)
}

#[test]
fn demo_runs_a_task_end_to_end_and_exits_zero() {
    let (stdout, _) = succeeds(demo(&[]));
    assert!(
        stdout.contains("store: its own redis-server at redis://127.0.0.1:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("pipeline `default`: plan -> retrieve -> evaluate -> finalize"),
        "{stdout}"
    );
    for capability in ["plan", "retrieve", "evaluate", "finalize"] {
        assert!(
            stdout.lines().any(|l| l.contains(capability)
                && l.contains("succeeded")
                && l.contains(&format!("worker-{capability}"))),
            "no success line for {capability}:\n{stdout}"
        );
    }
    // The result is the finalize step's output from the llm agent via the gateway's mock.
    let json_start = stdout.find("result:\n").expect("a result") + "result:\n".len();
    let result: serde_json::Value =
        serde_json::from_str(&stdout[json_start..]).expect("the result is JSON");
    assert!(
        result["text"].as_str().unwrap().starts_with("Mock reply"),
        "{result}"
    );
    assert!(
        result["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{result}"
    );
}

#[test]
fn demo_without_redis_uses_the_memory_store() {
    // No redis-server on PATH: the memory store, said loudly.
    let empty = tempfile::tempdir().unwrap();
    let mut command = demo(&[]);
    command.env("PATH", empty.path());
    let (stdout, stderr) = succeeds(command);
    assert!(
        stderr.contains("WARNING: redis-server is not on PATH"),
        "{stderr}"
    );
    assert!(stdout.contains("store: in memory"), "{stdout}");
    // `--memory` asks for it even with Redis around, without the warning.
    let (stdout, stderr) = succeeds(demo(&["--memory"]));
    assert!(!stderr.contains("WARNING"), "{stderr}");
    assert!(stdout.contains("store: in memory"), "{stdout}");
}

#[test]
fn demo_reports_a_port_in_use_and_exits_non_zero() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = run(demo_on(&port, &[]), Duration::from_secs(60));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port} for the master")),
        "{stderr}"
    );
}

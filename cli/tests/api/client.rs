//! `ensemble up` as a child process, driven by the client commands; then SIGTERM stops it.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use testkit::{Exit, Service, free_port};

use crate::helpers::*;

const KEY: &str = "0123456789abcdef0123456789abcdef";
const LIMIT: Duration = Duration::from_secs(60);

/// Runs a client command against `url` with the key.
fn client(url: &str, args: &[&str]) -> Output {
    let mut command = ensemble(args);
    command
        .env("ENSEMBLE_URL", url)
        .env("ENSEMBLE_API_KEY", KEY);
    run(command, LIMIT)
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            text(&output.stdout),
            text(&output.stderr)
        )
    })
}

/// The one line a failed command prints.
fn error_line(output: &Output) -> String {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
    lines[0].to_string()
}

#[tokio::test]
async fn client_commands_against_ensemble_up() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut up = Service::child(
        "ensemble up",
        &url,
        {
            let mut c = ensemble(&[
                "up",
                "--master-port",
                &port.to_string(),
                "--gateway-port",
                "0",
                "--worker-ports",
                "0",
                "--api-key",
                KEY,
            ]);
            c.env("RUST_LOG", "error");
            c
        },
        None,
    )
    .unwrap();
    let banner = up.wait_for_log("Ensemble is up", LIMIT).await.unwrap();
    assert!(
        banner.contains(&format!("master           {url}")),
        "{banner}"
    );
    assert!(banner.contains(KEY), "{banner}");

    // An API error is one clear line on stderr, exit code 1.
    let bad = client(&url, &["submit", "--pipeline", "x", "--input", "{}"]);
    assert_eq!(
        error_line(&bad),
        "error: 422 invalid: `pipeline`: unknown pipeline `x`"
    );
    let mut unauthorized = ensemble(&["workers", "--url", &url, "--api-key", "wrong"]);
    unauthorized.env("ENSEMBLE_API_KEY", KEY);
    let line = error_line(&run(unauthorized, LIMIT));
    assert!(line.starts_with("error: 401 "), "{line}");
    let line = error_line(&client(&url, &["submit", "--input", "not json"]));
    assert!(line.contains("--input is not JSON"), "{line}");
    let line = error_line(&client(&url, &["status", "no-such-task"]));
    assert!(line.starts_with("error: 404 "), "{line}");
    let line = error_line(&client("http://127.0.0.1:1", &["queues"]));
    assert!(
        line.contains("cannot reach the master at http://127.0.0.1:1"),
        "{line}"
    );

    // `submit --wait` follows the task and prints its result as JSON (no progress bar
    // when stdout is not a terminal).
    let waited = client(
        &url,
        &["submit", "--input", r#"{"question":"why?"}"#, "--wait"],
    );
    assert!(waited.status.success(), "{}", text(&waited.stderr));
    let result = json_of(&waited);
    assert_eq!(result["status"], "succeeded", "{result}");
    assert!(
        result["result"]["text"]
            .as_str()
            .unwrap()
            .starts_with("Mock reply"),
        "{result}"
    );
    assert!(text(&waited.stderr).contains("submitted"));

    // `submit` prints the id; `status` and `result` print JSON.
    let dir = tempfile::tempdir().unwrap();
    let input_file = dir.path().join("input.json");
    std::fs::write(&input_file, r#"{"from": "a file"}"#).unwrap();
    let input_arg = format!("@{}", input_file.display());
    let submitted = client(
        &url,
        &[
            "submit",
            "--steps",
            "plan,finalize",
            "--input",
            &input_arg,
            "--priority",
            "-5",
            "--idempotency-key",
            "k1",
        ],
    );
    assert!(submitted.status.success(), "{}", text(&submitted.stderr));
    let id = text(&submitted.stdout).trim().to_string();
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "{id:?}"
    );
    let again = client(
        &url,
        &[
            "submit",
            "--steps",
            "plan,finalize",
            "--input",
            "null",
            "--idempotency-key",
            "k1",
        ],
    );
    assert_eq!(
        text(&again.stdout).trim(),
        id,
        "the idempotency key returns the first task"
    );

    let result = client(&url, &["result", &id, "--wait", "30"]);
    assert!(result.status.success(), "{}", text(&result.stderr));
    let result = json_of(&result);
    assert_eq!(result["task_id"], id.as_str());
    assert_eq!(result["status"], "succeeded");

    let status = json_of(&client(&url, &["status", &id]));
    assert_eq!(status["status"], "succeeded");
    assert_eq!(status["priority"], -5);
    assert_eq!(status["input"], serde_json::json!({"from": "a file"}));
    let steps: Vec<&str> = status["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["capability"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["plan", "finalize"]);

    let workers = json_of(&client(&url, &["workers"]));
    let by_capability = workers["by_capability"].as_object().unwrap();
    for capability in ["plan", "retrieve", "evaluate", "finalize"] {
        assert_eq!(
            by_capability[capability],
            serde_json::json!([format!("worker-{capability}")])
        );
    }
    let queues = json_of(&client(&url, &["queues"]));
    assert!(
        queues["queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["capability"] == "plan"),
        "{queues}"
    );

    // SIGTERM stops everything cleanly.
    up.signal("TERM").unwrap();
    let exit = up.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(exit, Some(Exit::Clean), "{}", up.log());
    assert!(up.log().contains("stopped"), "{}", up.log());
}

//! The whole system as separate processes, as in production: one llm-gateway (mock
//! provider), two masters on one Redis, four workers (one per capability), on a
//! redis-server with AUTH and TLS. 200 tasks go in through `ensemble submit`, alternating
//! between the masters; every one must succeed with the llm agent's output at every step.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use testkit::{RedisOptions, RedisServer};
use common::wire::{StepStatus, TaskStatus, TaskView};
use serde_json::{Value, json};

use crate::helpers::*;

const TASKS: usize = 200;
const API_KEY: &str = "e2e-client-key-0123456789";
const OPERATOR_KEY: &str = "e2e-operator-key-0123456789";
const WORKER_TOKEN: &str = "e2e-worker-token-0123456789";
const GATEWAY_TOKEN: &str = "e2e-gateway-token-0123456789";
const REDIS_PASSWORD: &str = "e2e-redis-pw-0123456789";
const CAPABILITIES: [&str; 4] = ["plan", "retrieve", "evaluate", "finalize"];

/// A service binary with only the environment given (plus a quiet log level).
fn service(bins: &Path, name: &str, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(bins.join(name));
    command.env_clear().env("RUST_LOG", "warn");
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

/// Submits one task with the `ensemble` binary; returns its id.
fn submit(master: &str, n: usize) -> String {
    let mut command = ensemble(&["submit", "--input", &json!({ "n": n }).to_string()]);
    command
        .env("ENSEMBLE_URL", master)
        .env("ENSEMBLE_API_KEY", API_KEY);
    let output = run(command, Duration::from_secs(60));
    assert!(
        output.status.success(),
        "submit {n} failed: {}",
        text(&output.stderr)
    );
    text(&output.stdout).trim().to_string()
}

fn check_task(view: &TaskView, n: usize) {
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:?}");
    assert_eq!(view.input, json!({ "n": n }));
    assert_eq!(view.steps.len(), 4, "{view:?}");
    for (step, capability) in view.steps.iter().zip(CAPABILITIES) {
        assert_eq!(step.capability.as_str(), capability);
        assert_eq!(step.status, StepStatus::Succeeded, "{view:?}");
        assert_eq!(
            step.worker_id.as_ref().map(|w| w.as_str().to_string()),
            Some(format!("e2e-{capability}"))
        );
        let output = step.output.as_ref().expect("a step output");
        let mut fields: Vec<&str> = output
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        assert_eq!(fields, ["model", "text", "usage"], "{output}");
        assert!(
            output["text"]
                .as_str()
                .unwrap()
                .starts_with("Mock reply from "),
            "{output}"
        );
        assert!(!output["model"].as_str().unwrap().is_empty(), "{output}");
        assert!(
            output["usage"]["total_tokens"].as_u64().unwrap() > 0,
            "{output}"
        );
    }
    assert_eq!(view.result, view.steps[3].output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_tasks_through_separate_processes_on_tls_redis_with_auth() {
    let bins = tokio::task::spawn_blocking(service_binaries).await.unwrap();
    let redis = RedisServer::start_with(RedisOptions {
        tls: true,
        password: Some(REDIS_PASSWORD.into()),
        ..Default::default()
    });
    let redis_env = [
        (
            "REDIS_URL",
            format!("rediss://:{REDIS_PASSWORD}@localhost:{}", redis.port()),
        ),
        (
            "REDIS_CA_FILE",
            redis.tls_files().unwrap().ca_cert.display().to_string(),
        ),
        ("REDIS_KEY_PREFIX", "e2e".to_string()),
    ];
    let logs = tempfile::tempdir().unwrap();
    let mut procs = Vec::new();

    let gateway_port = free_port();
    let gateway_url = format!("http://127.0.0.1:{gateway_port}");
    procs.push(Proc::start(
        "llm-gateway",
        service(
            bins,
            "llm-gateway",
            &[
                ("HOST", "127.0.0.1".into()),
                ("PORT", gateway_port.to_string()),
                ("GATEWAY_TOKEN", GATEWAY_TOKEN.into()),
                ("LLM_PROVIDER", "mock".into()),
            ],
        ),
        logs.path(),
    ));

    let mut masters = Vec::new();
    for i in 0..2 {
        let port = free_port();
        masters.push(format!("http://127.0.0.1:{port}"));
        let mut env = vec![
            ("HOST", "127.0.0.1".to_string()),
            ("PORT", port.to_string()),
            ("API_KEYS", format!("e2e:{API_KEY}")),
            ("OPERATOR_API_KEYS", format!("ops:{OPERATOR_KEY}")),
            ("WORKER_TOKEN", WORKER_TOKEN.into()),
        ];
        env.extend(redis_env.iter().cloned());
        procs.push(Proc::start(
            &format!("master-{i}"),
            service(bins, "master", &env),
            logs.path(),
        ));
    }

    for (i, capability) in CAPABILITIES.iter().enumerate() {
        let port = free_port();
        let mut env = vec![
            ("HOST", "127.0.0.1".to_string()),
            ("PORT", port.to_string()),
            ("AGENT_ID", format!("e2e-{capability}")),
            ("CAPABILITIES", format!("[\"{capability}\"]")),
            ("MASTER_URL", masters[i % 2].clone()),
            ("LLM_GATEWAY_URL", gateway_url.clone()),
            ("WORKER_TOKEN", WORKER_TOKEN.into()),
            ("GATEWAY_TOKEN", GATEWAY_TOKEN.into()),
            ("ADVERTISE_URL", format!("http://127.0.0.1:{port}")),
            ("HEARTBEAT_INTERVAL_MS", "500".into()),
        ];
        env.extend(redis_env.iter().cloned());
        procs.push(Proc::start(
            &format!("worker-{capability}"),
            service(bins, "worker", &env),
            logs.path(),
        ));
    }
    let dump = |procs: &mut Vec<Proc>| -> String {
        procs
            .iter_mut()
            .map(|p| {
                let running = p.is_running();
                format!("--- {} (running: {running})\n{}", p.name, p.output())
            })
            .collect()
    };

    // Everyone up, and every worker registered in Redis (seen by both masters).
    wait_http_ok(&format!("{gateway_url}/ready"), Duration::from_secs(30)).await;
    for master in &masters {
        wait_http_ok(&format!("{master}/ready"), Duration::from_secs(30)).await;
    }
    let http = reqwest::Client::new();
    for master in &masters {
        let registered = testkit::eventually(Duration::from_secs(30), || async {
            let body: Value = get_json(&http, &format!("{master}/workers"), OPERATOR_KEY).await?;
            let by = body["by_capability"].as_object()?.clone();
            CAPABILITIES
                .iter()
                .all(|c| by.contains_key(*c))
                .then_some(())
        })
        .await;
        assert!(
            registered.is_some(),
            "workers did not register:\n{}",
            dump(&mut procs)
        );
    }

    // 200 submissions through the `ensemble` binary, 8 at a time, alternating masters.
    let masters = Arc::new(masters);
    let mut ids: Vec<Option<String>> = vec![None; TASKS];
    for batch in (0..TASKS).collect::<Vec<_>>().chunks(8) {
        let handles: Vec<_> = batch
            .iter()
            .map(|&n| {
                let master = masters[n % 2].clone();
                (n, tokio::task::spawn_blocking(move || submit(&master, n)))
            })
            .collect();
        for (n, handle) in handles {
            ids[n] = Some(handle.await.unwrap());
        }
    }
    let ids: Vec<String> = ids.into_iter().map(Option::unwrap).collect();
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), TASKS, "every submission made its own task");

    // Every task finishes, read back through either master.
    for (n, id) in ids.iter().enumerate() {
        let master = &masters[(n + 1) % 2];
        // `200` once finished (`202` while running).
        let result_url = format!("{master}/result/{id}?wait=5");
        let finished = testkit::eventually(Duration::from_secs(60), || async {
            get_json::<Value>(&http, &result_url, API_KEY).await
        })
        .await;
        assert!(
            finished.is_some(),
            "task {n} ({id}) did not finish:\n{}",
            dump(&mut procs)
        );
        let view: TaskView = get_json(&http, &format!("{master}/task/{id}"), API_KEY)
            .await
            .expect("the task's view");
        check_task(&view, n);
    }

    for p in &mut procs {
        assert!(p.is_running(), "{} died:\n{}", p.name, p.output());
    }
}

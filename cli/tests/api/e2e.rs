//! The whole system as separate processes, as in production: one llm-gateway (mock
//! provider), two masters on one Redis, four workers (one per capability), on a
//! redis-server with AUTH and TLS. 200 tasks go in through `ensemble submit`, alternating
//! between the masters; every one must succeed with the llm agent's output at every step.

use std::sync::Arc;
use std::time::Duration;

use common::config::Secret;
use common::wire::{StepStatus, TaskStatus, TaskView};
use serde_json::{Value, json};
use testkit::RedisOptions;
use testkit::system::{Binaries, CAPABILITIES, Store, System};

use crate::helpers::*;

const TASKS: usize = 200;
const API_KEY: &str = "e2e-client-key-0123456789";
const OPERATOR_KEY: &str = "e2e-operator-key-0123456789";
const REDIS_PASSWORD: &str = "e2e-redis-pw-0123456789";

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

/// A model answer as the llm agent records it: `{model, text, usage}`.
fn check_llm_output(output: &Value) {
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

/// The default pipeline ran as its graph: plan answered sub-queries (the mock's structured
/// plan), retrieve ran once per query on the retrieve worker and its output is theirs in
/// order, evaluate and finalize answered, and the result is finalize's output.
fn check_task(view: &TaskView, n: usize) {
    assert_eq!(view.status, TaskStatus::Succeeded, "{view:?}");
    assert_eq!(view.input, json!({ "n": n }));
    assert_eq!(view.steps.len(), 4, "{view:?}");
    for (step, capability) in view.steps.iter().zip(CAPABILITIES) {
        assert_eq!(
            step.capability.as_ref().map(|c| c.as_str()),
            Some(capability)
        );
        assert_eq!(step.status, StepStatus::Succeeded, "{view:?}");
    }
    assert_eq!(
        view.steps[0].worker_id.as_ref().map(|w| w.as_str()),
        Some("e2e-plan")
    );
    let plan = view.steps[0].output.as_ref().expect("plan's output");
    let queries = plan["queries"].as_array().expect("plan answers queries");
    assert!(
        (2..=4).contains(&queries.len()) && queries.iter().all(Value::is_string),
        "{plan}"
    );
    let retrieve = &view.steps[1];
    assert_eq!(retrieve.instances.len(), queries.len(), "{retrieve:?}");
    let mut outputs = Vec::new();
    for (i, instance) in retrieve.instances.iter().enumerate() {
        assert_eq!(instance.element_index, Some(i as u32));
        assert_eq!(instance.status, StepStatus::Succeeded, "{instance:?}");
        assert_eq!(
            instance.worker_id.as_ref().map(|w| w.as_str().to_string()),
            Some("e2e-retrieve".to_string())
        );
        let output = instance.output.clone().expect("an instance output");
        check_llm_output(&output);
        outputs.push(output);
    }
    assert_eq!(retrieve.output, Some(Value::Array(outputs)));
    for step in &view.steps[2..] {
        assert_eq!(
            step.worker_id.as_ref().map(|w| w.as_str().to_string()),
            step.capability.as_ref().map(|c| format!("e2e-{c}"))
        );
        check_llm_output(step.output.as_ref().expect("a step output"));
    }
    assert_eq!(view.result, view.steps[3].output);
}

/// Every service's log, for a failure message.
fn dump(system: &mut System) -> String {
    let services = system
        .gateway
        .iter_mut()
        .chain(system.masters.iter_mut())
        .chain(system.workers.iter_mut());
    services
        .map(|s| {
            let running = s.is_running();
            format!("--- {} (running: {running})\n{}", s.name(), s.log())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_tasks_through_separate_processes_on_tls_redis_with_auth() {
    let bins = tokio::task::spawn_blocking(service_binaries).await.unwrap();
    // Each worker reports to the masters in turn (the builder's wiring).
    let mut system = System::builder()
        .store(Store::OwnRedis(RedisOptions {
            tls: true,
            password: Some(REDIS_PASSWORD.into()),
            ..Default::default()
        }))
        .processes(Binaries::in_dir(bins))
        .masters(2)
        .workers(CAPABILITIES.len())
        .api_key(API_KEY)
        .master_config(|_, master| {
            master.operator_api_keys = Secret::new(format!("ops:{OPERATOR_KEY}"));
        })
        .worker_config(|i, worker| {
            worker.agent_id = Some(format!("e2e-{}", CAPABILITIES[i]));
            worker.heartbeat_interval_ms = 500;
        })
        .start()
        .await
        .unwrap();
    assert!(
        system.redis_settings().uses_tls(),
        "the services talk TLS to Redis"
    );
    let masters: Vec<String> = system.masters.iter().map(|m| m.url().to_string()).collect();

    // Every worker registered in Redis is seen by both masters.
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
            dump(&mut system)
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
            dump(&mut system)
        );
        let view: TaskView = get_json(&http, &format!("{master}/task/{id}"), API_KEY)
            .await
            .expect("the task's view");
        check_task(&view, n);
    }

    for service in system.masters.iter_mut().chain(system.workers.iter_mut()) {
        assert!(
            service.is_running(),
            "{} died:\n{}",
            service.name(),
            service.log()
        );
    }
    system.stop().await;
}

//! The system builder: one line starts Redis, a gateway, a master and four workers that run
//! a task of the `default` pipeline; the memory store does too; a worker can be added.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::{Store, System};

/// Submits a `default` task and waits for its result.
async fn run_task(system: &System) -> Value {
    let http = reqwest::Client::new();
    let submitted: Value = http
        .post(format!("{}/task", system.master_url()))
        .bearer_auth(&system.api_key)
        .json(&json!({ "pipeline": "default", "input": { "question": "why?" } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = submitted["task_id"].as_str().unwrap().to_string();
    let url = format!("{}/result/{id}?wait=5", system.master_url());
    testkit::eventually(Duration::from_secs(60), || async {
        let response = http
            .get(&url)
            .bearer_auth(&system.api_key)
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(response.json::<Value>().await.ok()?)
    })
    .await
    .expect("the task finished")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_line_starts_a_system_that_runs_a_task_and_stops_in_order() {
    let mut system = System::builder().workers(4).start().await.unwrap();
    assert!(system.redis.is_some());
    assert_eq!(system.workers.len(), 4);
    let result = run_task(&system).await;
    assert_eq!(result["status"], "succeeded", "{result}");

    let worker = system
        .add_worker(|w| w.capabilities = vec!["plan".into()])
        .await
        .unwrap();
    assert_eq!(worker.name(), "worker-5");
    assert_eq!(system.worker_configs.len(), 5);

    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_needs_no_redis() {
    let system = System::builder()
        .store(Store::Memory)
        .workers(4)
        .start()
        .await
        .unwrap();
    assert!(system.redis.is_none());
    let result = run_task(&system).await;
    assert_eq!(result["status"], "succeeded", "{result}");
    system.stop().await;
}

#[tokio::test]
async fn an_invalid_configuration_names_the_service() {
    let err = System::builder()
        .store(Store::Memory)
        .workers(1)
        .worker_config(|_, w| w.max_concurrency = 0)
        .start()
        .await
        .err()
        .unwrap();
    let err = format!("{err:#}");
    assert!(
        err.contains("the worker-1's configuration is invalid"),
        "{err}"
    );
    assert!(err.contains("MAX_CONCURRENCY"), "{err}");
}

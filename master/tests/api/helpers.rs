//! Test helpers: start a master on a free port, with the kit's fake workers
//! (`testkit::fakes::worker`) that speak the worker protocol.

use std::collections::HashMap;
use std::time::Duration;

use common::redis::RedisSettings;
use common::wire::{StepRef, TaskView};
use master::Config;
use serde_json::Value;
use testkit::RedisServer;
use testkit::service::Service;
use testkit::system::CAPABILITIES;

/// The master's tests call the kit's fake worker a test worker.
pub use testkit::fakes::worker::FakeWorker as TestWorker;
pub use testkit::fakes::worker::{Behavior, WORKER_TOKEN};
pub const ALICE: &str = "alice-key-123456";
pub const BOB: &str = "bob-key-1234567";
pub const OPERATOR: &str = "ops-key-12345678";

/// Settings for tests: short leases and backoffs, real credentials.
pub fn test_config(redis: &RedisSettings) -> Config {
    Config {
        host: "127.0.0.1".into(),
        port: 0,
        redis: redis.clone(),
        api_keys: common::config::Secret::new(format!("alice:{ALICE},bob:{BOB}")),
        operator_api_keys: common::config::Secret::new(format!("ops:{OPERATOR}")),
        worker_token: common::config::Secret::new(WORKER_TOKEN),
        lease_ms: 1_500,
        // As often as the fake workers beat.
        worker_heartbeat_ms: testkit::fakes::worker::HEARTBEAT.as_millis() as u64,
        retry_base_ms: 50,
        retry_max_ms: 200,
        dispatch_poll_ms: 20,
        metrics_interval_ms: 200,
        dispatch_timeout_ms: 2_000,
        rate_limit_per_sec: 0.0,
        ..Config::default()
    }
}

/// A master running in this process.
pub struct TestMaster {
    pub url: String,
    pub http: reqwest::Client,
    service: Service,
}

impl TestMaster {
    /// Starts a master with `config` and waits until it answers `/health`.
    pub async fn start(config: Config) -> Self {
        let service = Service::start_local("master", |listener, stop| {
            master::serve(config, listener, stop)
        })
        .await
        .unwrap()
        .with_grace(Duration::from_secs(20));
        Self {
            url: service.url().to_string(),
            http: reqwest::Client::new(),
            service,
        }
    }

    /// Stops it the way SIGTERM does: the dispatch loop and open requests finish first.
    pub async fn stop(mut self) {
        self.service.stop().await;
    }

    pub fn post(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
    }

    pub fn get(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(key)
    }

    /// Submits a task as alice and returns its id.
    pub async fn submit(&self, body: Value) -> String {
        let r = self.post("/task", ALICE).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        v["task_id"].as_str().unwrap().to_string()
    }

    /// Waits (long-poll) until the task finishes; returns its full view.
    pub async fn wait(&self, id: &str, within: Duration) -> TaskView {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let r = self
                .get(&format!("/result/{id}?wait=2"), ALICE)
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {id} not finished in {within:?}: {:?}",
                self.view(id).await
            );
        }
        self.view(id).await
    }

    /// `GET path` with the operator key, as JSON.
    pub async fn operator_json(&self, path: &str) -> Value {
        self.get(path, OPERATOR)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `GET /queues` (operator): the row of one capability.
    pub async fn queue(&self, capability: &str) -> Value {
        let queues = self.operator_json("/queues").await;
        queues["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["capability"] == capability)
            .unwrap_or_else(|| panic!("no queue row for {capability}: {queues}"))
            .clone()
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn view(&self, id: &str) -> TaskView {
        let r = self
            .get(&format!("/task/{id}"), ALICE)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }
}

/// What most tests start, in one line: a master with [`test_config`] on `redis`, and a
/// fake worker for each capability of the default pipeline (`w-plan`, …).
pub async fn spawn_app(redis: &RedisServer) -> (TestMaster, Vec<TestWorker>) {
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let mut workers = Vec::new();
    for capability in CAPABILITIES {
        let succeed = Behavior::Succeed {
            delay: Duration::from_millis(5),
        };
        let name = format!("w-{capability}");
        let worker =
            TestWorker::start(&name, &[capability], 4, succeed, &settings, &master.url).await;
        workers.push(worker);
    }
    (master, workers)
}

/// Counts duplicates in a list of received steps.
pub fn duplicates(steps: &[StepRef]) -> usize {
    let mut seen: HashMap<&StepRef, usize> = HashMap::new();
    for s in steps {
        *seen.entry(s).or_default() += 1;
    }
    seen.values().filter(|n| **n > 1).count()
}

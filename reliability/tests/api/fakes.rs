//! Misbehaving workers against a real master process: one that answers `202` and never
//! reports, one that reports garbage, one that reports twice, and a slow one whose lease
//! lapses and whose late report must be discarded by fencing. The fake speaks the worker
//! protocol (`common::wire`, registry heartbeat) and misbehaves on a step's first attempt
//! only, so every task can still finish.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use common::redis::RedisPool;
use common::registry::Registry;
use common::wire::{
    Capability, ReportStatus, ResultReport, StepRef, TaskId, WorkRequest, WorkerId, WorkerRecord,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    Accepted, Cluster, Options, WORKER_TOKEN, check_counter, context, echoed, scaled, serial,
    settle, task_input,
};

/// What the fake saw and was told.
#[derive(Default)]
struct Journal {
    /// Acks of well-formed reports, per (task, step): `recorded`, `discarded`, `http NNN`.
    acks: HashMap<(String, u32), Vec<String>>,
    /// Acks of late reports for a lapsed attempt, per task.
    late_acks: HashMap<String, String>,
    /// (variant, status, body) of every garbage report.
    garbage: Vec<(String, u16, String)>,
    /// First attempts the slow worker sits on, per task.
    held: HashMap<String, WorkRequest>,
}

struct Fake {
    id: WorkerId,
    master: String,
    http: reqwest::Client,
    in_flight: Mutex<Vec<StepRef>>,
    journal: Mutex<Journal>,
}

struct FakeWorker {
    state: Arc<Fake>,
    stop: CancellationToken,
}

impl FakeWorker {
    async fn start(cluster: &Cluster) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Fake {
            id: WorkerId::new("fake-worker").unwrap(),
            master: cluster.lb.url(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            in_flight: Mutex::default(),
            journal: Mutex::default(),
        });
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/work", post(work))
            .with_state(state.clone());
        let server_stop = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(server_stop.cancelled_owned())
                .await;
        });
        let mut settings = cluster.redis.settings();
        settings.key_prefix = cluster.prefix.clone();
        let registry = Registry::new(RedisPool::new(&settings).unwrap());
        let mut record = WorkerRecord {
            id: state.id.clone(),
            url: format!("http://{addr}"),
            capabilities: ["silent", "garbage", "twice", "late"]
                .into_iter()
                .map(|c| Capability::new(c).unwrap())
                .collect(),
            max_concurrency: 64,
            in_flight: vec![],
            version: "fake".into(),
            started_at_ms: common::wire::now_ms(),
            draining: false,
            heartbeat_at_ms: 0,
            degraded: None,
        };
        registry
            .heartbeat(&record, Duration::from_millis(900))
            .await
            .unwrap();
        let (beat_state, beat_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                record.in_flight = beat_state.in_flight.lock().unwrap().clone();
                let _ = registry
                    .heartbeat(&record, Duration::from_millis(900))
                    .await;
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(300)) => {}
                    () = beat_stop.cancelled() => return,
                }
            }
        });
        Self { state, stop }
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn work(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(step): Json<WorkRequest>,
) -> StatusCode {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if token != format!("Bearer {WORKER_TOKEN}") {
        return StatusCode::UNAUTHORIZED;
    }
    tokio::spawn(async move { fake.handle(step).await });
    StatusCode::ACCEPTED
}

/// A well-formed report.
fn report(worker: &WorkerId, step: &WorkRequest, output: Value) -> ResultReport {
    ResultReport {
        task_id: step.task_id.clone(),
        step: step.step,
        attempt: step.attempt,
        worker_id: worker.clone(),
        status: ReportStatus::Succeeded,
        output: Some(output),
        error: None,
        duration_ms: Some(1),
    }
}

impl Fake {
    async fn handle(self: Arc<Self>, step: WorkRequest) {
        let first = step.attempt == 1;
        let key = step.task_id.to_string();
        match step.capability.as_str() {
            // Takes the first attempt and goes quiet: no report, not in its heartbeat.
            "silent" if first => {}
            // Sits on the first attempt until the second arrives, then reports the first,
            // late, with an output that must never be recorded.
            "late" if first => {
                self.journal.lock().unwrap().held.insert(key, step);
            }
            "late" => {
                let held = self.journal.lock().unwrap().held.remove(&key);
                if let Some(old) = held {
                    let stale = report(&self.id, &old, json!({"stale": true}));
                    let ack = self.send(&stale).await;
                    self.journal.lock().unwrap().late_acks.insert(key, ack);
                }
                self.run(&step, 1).await;
            }
            "garbage" if first => {
                self.send_garbage(&step).await;
                self.run(&step, 1).await;
            }
            "twice" => self.run(&step, 3).await,
            _ => self.run(&step, 1).await,
        }
    }

    /// Does the step properly (echo), listed in flight, and delivers the report `times`
    /// times: twice at once, then once more.
    async fn run(&self, step: &WorkRequest, times: usize) {
        let r = step.step_ref();
        self.in_flight.lock().unwrap().push(r.clone());
        tokio::time::sleep(Duration::from_millis(10)).await;
        let report = report(&self.id, step, step.input.clone());
        let mut acks = Vec::new();
        if times >= 2 {
            let (a, b) = tokio::join!(self.send(&report), self.send(&report));
            acks.extend([a, b]);
        }
        for _ in acks.len()..times {
            acks.push(self.send(&report).await);
        }
        self.journal
            .lock()
            .unwrap()
            .acks
            .entry((step.task_id.to_string(), step.step))
            .or_default()
            .extend(acks);
        self.in_flight.lock().unwrap().retain(|s| *s != r);
    }

    /// Delivers a report until the master answers something other than 5xx or no answer.
    async fn send(&self, report: &ResultReport) -> String {
        for _ in 0..100 {
            let sent = self
                .http
                .post(format!("{}/result", self.master))
                .bearer_auth(WORKER_TOKEN)
                .json(report)
                .send()
                .await;
            match sent {
                Ok(r) if r.status() == 200 => {
                    let body: Value = r.json().await.unwrap_or_default();
                    return body["status"].as_str().unwrap_or("unreadable").to_string();
                }
                Ok(r) if !r.status().is_server_error() => return format!("http {}", r.status()),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        "undelivered".into()
    }

    async fn send_garbage(&self, step: &WorkRequest) {
        // Listed in flight meanwhile, so the lease holds while the garbage goes out.
        self.in_flight.lock().unwrap().push(step.step_ref());
        let good = report(&self.id, step, json!({"garbage": true}));
        let with = |f: &dyn Fn(&mut Value)| {
            let mut v = serde_json::to_value(&good).unwrap();
            f(&mut v);
            v.to_string()
        };
        let variants: Vec<(&str, Option<&str>, String)> = vec![
            ("not json", Some(WORKER_TOKEN), "{\"task_id\": ".into()),
            (
                "not a report",
                Some(WORKER_TOKEN),
                "{\"hello\": \"world\"}".into(),
            ),
            ("an array", Some(WORKER_TOKEN), "[1, 2, 3]".into()),
            (
                "succeeded with an error",
                Some(WORKER_TOKEN),
                with(&|v| v["error"] = json!({"message": "x", "retryable": false})),
            ),
            (
                "failed without an error",
                Some(WORKER_TOKEN),
                with(&|v| v["status"] = json!("failed")),
            ),
            (
                "attempt 0",
                Some(WORKER_TOKEN),
                with(&|v| v["attempt"] = json!(0)),
            ),
            (
                "negative step",
                Some(WORKER_TOKEN),
                with(&|v| v["step"] = json!(-1)),
            ),
            (
                "unknown status",
                Some(WORKER_TOKEN),
                with(&|v| v["status"] = json!("maybe")),
            ),
            (
                "bad task id",
                Some(WORKER_TOKEN),
                with(&|v| v["task_id"] = json!("../../etc/passwd")),
            ),
            (
                "unknown task",
                Some(WORKER_TOKEN),
                with(&|v| v["task_id"] = json!(TaskId::generate().to_string())),
            ),
            (
                "step out of range",
                Some(WORKER_TOKEN),
                with(&|v| v["step"] = json!(7)),
            ),
            (
                "future attempt",
                Some(WORKER_TOKEN),
                with(&|v| v["attempt"] = json!(99)),
            ),
            ("wrong token", Some("not-the-token"), with(&|_| {})),
            ("no token", None, with(&|_| {})),
            (
                "error of the wrong type",
                Some(WORKER_TOKEN),
                with(&|v| {
                    v["status"] = json!("failed");
                    v["output"] = Value::Null;
                    v["error"] = json!({"message": 5});
                }),
            ),
        ];
        for (name, token, body) in variants {
            let mut req = self
                .http
                .post(format!("{}/result", self.master))
                .header("content-type", "application/json")
                .body(body);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let (status, text) = match req.send().await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            };
            self.journal
                .lock()
                .unwrap()
                .garbage
                .push((name.to_string(), status, text));
        }
    }
}

/// Which misbehaviour a pipeline exercises, and how many re-executions it implies.
const BEHAVIOURS: [(&str, u64); 4] = [("silent", 1), ("garbage", 0), ("twice", 0), ("late", 1)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_workers_lose_nothing_and_record_once() {
    let _serial = serial().await;
    let cluster = Cluster::start(Options {
        masters: 1,
        workers: 0,
        ..Options::default()
    })
    .await;
    let fake = FakeWorker::start(&cluster).await;
    let done = cluster.done_events().await;
    let client = cluster.client();
    let n = scaled(25);
    for (b, (pipeline, reruns)) in BEHAVIOURS.into_iter().enumerate() {
        let base = cluster.succeeded_counter().await;
        let inputs = (0..n).map(|i| task_input(b * n + i, 0)).collect();
        let accepted: Vec<Accepted> = client
            .submit_all(pipeline, inputs, 8, Duration::from_secs(20))
            .await;
        let (mut tally, mut problems) =
            settle(&client, &accepted, &done, Duration::from_secs(40), echoed).await;
        check_counter(&cluster, &mut tally, &mut problems, base).await;

        let journal = fake.state.journal.lock().unwrap();
        for t in &accepted {
            let acks = journal
                .acks
                .get(&(t.task_id.clone(), 0))
                .cloned()
                .unwrap_or_default();
            let recorded = acks.iter().filter(|a| *a == "recorded").count();
            // The `twice` worker sends the same report three times: each repeat of the
            // report that was recorded is answered `recorded` again (a worker whose answer
            // was lost must not give up), while the transition happens once, which the
            // done events and the success counter above hold to exactly one.
            let expected = if pipeline == "twice" { 3 } else { 1 };
            if recorded > expected {
                tally.duplicates += 1;
                problems.push(format!("{}: reports acknowledged {acks:?}", t.task_id));
            }
            if pipeline == "late" {
                let late = journal.late_acks.get(&t.task_id);
                if late.map(String::as_str) != Some("discarded") {
                    tally.duplicates += 1;
                    problems.push(format!("{}: the late report got {late:?}", t.task_id));
                }
            }
        }
        let bad_garbage: Vec<_> = journal
            .garbage
            .iter()
            .filter(|(_, status, body)| {
                let refused = (400..500).contains(status);
                let discarded = *status == 200 && body.contains("discarded");
                !(refused || discarded)
            })
            .cloned()
            .collect::<Vec<_>>();
        drop(journal);
        let ctx = context(&problems, &cluster);
        tally.report(&format!("worker-{pipeline}"), &ctx);
        assert_eq!(tally.unannounced, 0, "{ctx}");
        assert_eq!(tally.accepted, n, "{ctx}");
        assert_eq!(tally.succeeded, n, "{ctx}");
        assert_eq!(tally.reexecuted, reruns * n as u64, "{ctx}");
        assert!(
            bad_garbage.is_empty(),
            "garbage reports must get a 4xx (or a `discarded` ack), never a 5xx or `recorded`: {bad_garbage:#?}"
        );
    }
    let journal = fake.state.journal.lock().unwrap();
    assert_eq!(
        journal.garbage.len(),
        15 * n,
        "every garbage variant was sent"
    );
    let mut answers: Vec<(String, u16)> = journal
        .garbage
        .iter()
        .map(|(variant, status, _)| (variant.clone(), *status))
        .collect();
    answers.sort();
    answers.dedup();
    eprintln!("garbage reports were answered: {answers:?}");
    let twice: usize = journal
        .acks
        .values()
        .filter(|a| a.len() == 3 && a.iter().all(|s| s == "recorded"))
        .count();
    assert_eq!(
        twice, n,
        "each triple report: recorded once, and the two repeats answered `recorded` too"
    );
}

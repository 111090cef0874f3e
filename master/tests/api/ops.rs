//! Operations: readiness across a Redis restart with no accepted task lost, the real binary
//! on TLS + AUTH, metrics, EMF lines, and the OpenAPI description.

use std::time::Duration;

use common::wire::TaskStatus;
use serde_json::{Value, json};
use testkit::{RedisOptions, RedisServer, eventually};

use crate::helpers::*;

#[tokio::test]
async fn redis_restart_under_load_loses_no_accepted_task() {
    let mut redis = RedisServer::with_aof();
    let (master, workers) = spawn_app(&redis).await;
    let mut accepted = Vec::new();
    for i in 0..50 {
        accepted.push(
            master
                .submit(json!({"steps": ["plan", "retrieve", "evaluate", "finalize"], "input": i}))
                .await,
        );
    }
    redis.kill();
    // While Redis is down: /ready 503, writes 503 with Retry-After, nothing hangs.
    let r = master
        .http
        .get(format!("{}/ready", master.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let started = std::time::Instant::now();
    let r = master
        .post("/task", ALICE)
        .json(&json!({"pipeline": "default"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a write must not hang"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    let ready = eventually(Duration::from_secs(10), || async {
        let r = master
            .http
            .get(format!("{}/ready", master.url))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "/ready did not recover");
    for i in 0..20 {
        accepted.push(
            master
                .submit(json!({"steps": ["plan", "retrieve", "evaluate", "finalize"], "input": 100 + i}))
                .await,
        );
    }
    for id in &accepted {
        let v = master.wait(id, Duration::from_secs(60)).await;
        assert_eq!(v.status, TaskStatus::Succeeded, "{v:?}");
    }
    drop(workers);
    master.stop().await;
}

#[tokio::test]
async fn master_binary_on_tls_and_auth_is_ready_and_wrong_password_is_not() {
    let redis = RedisServer::start_with(RedisOptions {
        tls: true,
        password: Some("tls-pass-123".into()),
        ..Default::default()
    });
    let ca = redis.tls_files().unwrap().ca_cert.clone();
    for (password, expect) in [("tls-pass-123", 200), ("wrong-pass", 503)] {
        let port = testkit::free_port();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_master"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env(
                "REDIS_URL",
                format!("rediss://:{password}@localhost:{}", redis.port()),
            )
            .env("REDIS_CA_FILE", &ca)
            .env("API_KEYS", format!("alice:{ALICE}"))
            .env("WORKER_TOKEN", WORKER_TOKEN)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let http = reqwest::Client::new();
        let status = eventually(Duration::from_secs(20), || async {
            let r = http
                .get(format!("http://127.0.0.1:{port}/ready"))
                .send()
                .await
                .ok()?;
            let s = r.status().as_u16();
            (s == expect).then_some(r.json::<Value>().await.ok()?)
        })
        .await;
        let _ = child.kill();
        let _ = child.wait();
        let body = status
            .unwrap_or_else(|| panic!("/ready never answered {expect} with password {password}"));
        if expect == 503 {
            assert_eq!(body["reason"], "unavailable", "{body}");
            assert!(
                body["message"]
                    .as_str()
                    .unwrap()
                    .contains("authentication failed"),
                "{body}"
            );
        }
    }
}

#[tokio::test]
async fn bad_setting_stops_the_binary_naming_it() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_master"))
        .env_clear()
        .env("REDIS_PORT", "abc")
        .env("AUTH_DISABLED", "true")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("REDIS_PORT"), "{stderr}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_master"))
        .env_clear()
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "no credentials and auth not disabled: refuse to start"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("AUTH_DISABLED"));
}

#[tokio::test]
async fn metrics_and_queues_report_per_capability() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let _w = TestWorker::start("w", &["plan"], 1, Behavior::Hang, &settings, &master.url).await;
    for _ in 0..3 {
        master.submit(json!({"steps": ["plan"]})).await;
    }
    let queues = eventually(Duration::from_secs(5), || async {
        let q: Value = master
            .get("/queues", OPERATOR)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let plan = q["queues"]
            .as_array()?
            .iter()
            .find(|r| r["capability"] == "plan")?
            .clone();
        (plan["in_flight"] == 1 && plan["queued"] == 2).then_some(plan)
    })
    .await
    .expect("queue figures");
    assert_eq!(queues["live_workers"], 1);
    // Two queued and one in flight, over one worker.
    assert_eq!(queues["backlog_per_worker"], 3.0);
    let workers: Value = master
        .get("/workers", OPERATOR)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(workers["by_capability"]["plan"], json!(["w"]));
    let text = master.metrics().await;
    for name in [
        "ensemble_tasks_submitted_total",
        "ensemble_queue_depth{capability=\"plan\"}",
        "ensemble_in_flight{capability=\"plan\"}",
        "ensemble_live_workers{capability=\"plan\"}",
        "ensemble_backlog_per_worker",
        "ensemble_oldest_queued_age_seconds",
        "ensemble_http_requests_total",
    ] {
        assert!(text.contains(name), "missing {name} in /metrics");
    }
    master.stop().await;
}

#[test]
fn emf_lines_follow_the_specification() {
    use master::metrics::QueueRow;
    let rows = vec![QueueRow {
        capability: common::wire::Capability::new("plan").unwrap(),
        queued: 0,
        in_flight: 0,
        dead_lettered: 0,
        live_workers: 0,
        backlog_per_worker: 0.0,
        oldest_queued_age_seconds: 0.0,
    }];
    let lines = master::emf::EmfState::default().lines(&rows, 1_700_000_000_000);
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert!(!line.contains('\n'), "one line each");
        let v: Value = serde_json::from_str(line).unwrap();
        let aws = &v["_aws"];
        assert!(aws["Timestamp"].is_u64());
        let directives = aws["CloudWatchMetrics"].as_array().unwrap();
        for d in directives {
            assert_eq!(d["Namespace"], "Ensemble");
            // Every dimension and every metric named must be a member of the root object.
            for set in d["Dimensions"].as_array().unwrap() {
                for dim in set.as_array().unwrap() {
                    assert!(
                        v[dim.as_str().unwrap()].is_string(),
                        "dimension {dim} missing"
                    );
                }
            }
            for m in d["Metrics"].as_array().unwrap() {
                let name = m["Name"].as_str().unwrap();
                assert!(
                    v[name].is_number(),
                    "metric {name} missing or not a number in {line}"
                );
            }
        }
    }
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["Capability"], "plan");
    for m in [
        "QueueDepth",
        "InFlight",
        "LiveWorkers",
        "OldestQueuedAgeSeconds",
    ] {
        assert_eq!(first[m].as_f64(), Some(0.0), "explicit zero for {m}");
    }
}

#[tokio::test]
async fn openapi_describes_every_route() {
    let redis = RedisServer::start();
    let master = TestMaster::start(test_config(&redis.settings())).await;
    let spec: Value = master
        .http
        .get(format!("{}/openapi.json", master.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    for (path, method) in [
        ("/task", "post"),
        ("/task/{id}", "get"),
        ("/task/{id}", "delete"),
        ("/task/{id}/signal", "post"),
        ("/task/{id}/events", "get"),
        ("/result/{id}", "get"),
        ("/result", "post"),
        ("/results", "post"),
        ("/progress", "post"),
        ("/events", "get"),
        ("/dispatch", "post"),
        ("/workers", "get"),
        ("/queues", "get"),
        ("/ui", "get"),
        ("/ui/login", "post"),
        ("/ui/session", "get"),
        ("/ui/logout", "post"),
        ("/tasks", "get"),
        ("/tasks", "post"),
        ("/deadletters", "get"),
        ("/deadletters/{capability}", "delete"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            spec["paths"][path][method].is_object(),
            "{method} {path} missing from openapi.json"
        );
    }
    // `POST /work` is served by workers, so it is a webhook (OpenAPI 3.1), not a path; every
    // answer the dispatcher treats differently must be described.
    let work = &spec["webhooks"]["work"]["post"];
    // One step, or a batch of them.
    let body = &work["requestBody"]["content"]["application/json"]["schema"]["oneOf"];
    assert_eq!(body[0]["$ref"], "#/components/schemas/WorkRequest");
    assert_eq!(body[1]["items"]["$ref"], "#/components/schemas/WorkRequest");
    assert_eq!(
        work["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/WorkBatchAnswer"
    );
    for status in ["202", "401", "413", "421", "422", "429", "503"] {
        assert!(
            work["responses"][status].is_object(),
            "the /work webhook does not describe {status}"
        );
    }
    // The batch submit: its body, its per-task answers, and every whole-request refusal.
    let batch = &spec["paths"]["/tasks"]["post"];
    for status in ["200", "400", "401", "413", "422", "503", "507"] {
        assert!(
            batch["responses"][status].is_object(),
            "POST /tasks does not describe {status}"
        );
    }
    for name in [
        "WorkRequest",
        "WorkAccepted",
        "ResultReport",
        "WorkerRecord",
        "ErrorBody",
        "SubmitBatch",
        "SubmitBatchAnswer",
        "SubmitItemAnswer",
    ] {
        assert!(
            spec["components"]["schemas"][name].is_object(),
            "the schema {name} is missing from openapi.json"
        );
    }
    master.stop().await;
}

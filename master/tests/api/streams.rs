//! Task events over HTTP (docs/events.md): `GET /task/{id}/events` and `GET /events` as
//! Server-Sent Events on a real master and redis-server, resumed with `Last-Event-ID` on
//! another replica and after a restart, the workers' `POST /progress`, and the streams under
//! misuse (another tenant, bad cursors, too many streams, bad progress).

use std::collections::HashSet;
use std::time::Duration;

use common::sse::SseMessage;
use common::wire::TaskEvent;
use serde_json::{Value, json};
use testkit::RedisServer;
use testkit::sse::EventStream;

use crate::helpers::*;

const WITHIN: Duration = Duration::from_secs(20);

async fn open(master: &TestMaster, path: &str, key: &str, last: Option<&str>) -> EventStream {
    let mut request = master.get(path, key);
    if let Some(id) = last {
        request = request.header("last-event-id", id);
    }
    match EventStream::open(request).await {
        Ok(s) => s,
        Err((status, body)) => panic!("{path}: {status} {body}"),
    }
}

async fn refused(master: &TestMaster, path: &str, key: &str, last: Option<&str>) -> (u16, Value) {
    let mut request = master.get(path, key);
    if let Some(id) = last {
        request = request.header("last-event-id", id);
    }
    match EventStream::open(request).await {
        Ok(_) => panic!("{path} was served"),
        Err((status, body)) => (status, serde_json::from_str(&body).unwrap_or_default()),
    }
}

fn event(m: &SseMessage) -> TaskEvent {
    let e: TaskEvent = serde_json::from_str(&m.data).unwrap();
    assert_eq!(
        m.id.as_deref(),
        Some(e.id.as_str()),
        "the SSE id is the event's"
    );
    assert_eq!(m.event, e.kind, "the SSE event name is the event's type");
    e
}

/// Reads events until one of type `kind` (returned with those before it).
async fn until(stream: &mut EventStream, kind: &str) -> Vec<TaskEvent> {
    let mut seen = Vec::new();
    loop {
        let Some(m) = stream.next(WITHIN).await else {
            panic!("the stream ended before `{kind}`: {seen:?}")
        };
        if m.id.is_none() {
            continue;
        }
        let e = event(&m);
        let done = e.kind == kind;
        seen.push(e);
        if done {
            return seen;
        }
    }
}

/// A chain of the kit's four capabilities.
fn chain(input: Value) -> Value {
    json!({"steps": testkit::system::CAPABILITIES, "input": input})
}

fn kinds(events: &[TaskEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match &e.step {
            Some(step) => format!("{} {step}", e.kind),
            None => e.kind.clone(),
        })
        .collect()
}

#[tokio::test]
async fn a_task_stream_runs_from_submit_to_the_final_event_and_closes() {
    let redis = RedisServer::start();
    let (master, _workers) = spawn_app(&redis).await;
    let id = master.submit(chain(json!({"question": "q"}))).await;
    let mut stream = open(&master, &format!("/task/{id}/events"), ALICE, None).await;
    assert!(
        stream.content_type.starts_with("text/event-stream"),
        "{}",
        stream.content_type
    );
    let first = stream.next(WITHIN).await.unwrap();
    assert_eq!(first.retry_ms, Some(2_000), "a reconnect hint comes first");
    let events: Vec<TaskEvent> = stream.rest(WITHIN).await.iter().map(event).collect();
    let mut expected = vec!["task.submitted".to_string()];
    for step in testkit::system::CAPABILITIES {
        for kind in ["step.queued", "step.dispatched", "step.succeeded"] {
            expected.push(format!("{kind} {step}"));
        }
    }
    expected.push("task.succeeded".into());
    assert_eq!(kinds(&events), expected, "{events:#?}");
    assert!(events.iter().all(|e| e.task_id.as_str() == id));
    let view = master.view(&id).await;
    assert_eq!(events.last().unwrap().output, view.result);
    // A finished task's stream is its whole history at once, then the end.
    let again: Vec<TaskEvent> = open(&master, &format!("/task/{id}/events"), ALICE, None)
        .await
        .rest(WITHIN)
        .await
        .iter()
        .map(event)
        .collect();
    assert_eq!(again, events);
    // `?after=` does what `Last-Event-ID` does.
    let after = &events[5].id;
    let tail: Vec<TaskEvent> = open(
        &master,
        &format!("/task/{id}/events?after={after}"),
        ALICE,
        None,
    )
    .await
    .rest(WITHIN)
    .await
    .iter()
    .map(event)
    .collect();
    assert_eq!(tail, events[6..]);
    master.stop().await;
}

/// `draft` → `approve` (a wait for signal `approval`) → `publish`.
fn approval_task() -> Value {
    json!({
        "steps": [
            {"id": "draft", "capability": "plan", "needs": []},
            {"id": "approve", "needs": ["draft"],
             "wait": {"signal": "approval", "timeout_ms": 600_000}},
            {"id": "publish", "capability": "finalize", "needs": ["approve"]},
        ],
        "input": {},
    })
}

#[tokio::test]
async fn a_client_resumes_on_another_replica_and_after_a_restart_missing_and_repeating_nothing() {
    let redis = RedisServer::start();
    // One key prefix for every replica (each `settings()` call makes a new one).
    let settings = redis.settings();
    let a = TestMaster::start(test_config(&settings)).await;
    let mut workers = Vec::new();
    for capability in ["plan", "finalize"] {
        let succeed = Behavior::Succeed {
            delay: Duration::from_millis(5),
        };
        let name = format!("w-{capability}");
        workers.push(TestWorker::start(&name, &[capability], 4, succeed, &settings, &a.url).await);
    }
    let b = TestMaster::start(test_config(&settings)).await;
    let id = a.submit(approval_task()).await;
    let path = format!("/task/{id}/events");
    // On replica A until the task waits for its signal.
    let mut on_a = open(&a, &path, ALICE, None).await;
    let mut got = until(&mut on_a, "step.waiting").await;
    let cursor = got.last().unwrap().id.clone();
    drop(on_a);
    // A goes away mid-task; the client resumes on B.
    a.stop().await;
    let mut on_b = open(&b, &path, ALICE, Some(&cursor)).await;
    assert!(
        on_b.try_next(Duration::from_millis(300))
            .await
            .is_ok_and(|m| m.is_some_and(|m| m.id.is_none())),
        "nothing new yet: only the reconnect hint"
    );
    let (status, _) = {
        let r = b
            .post(&format!("/task/{id}/signal"), ALICE)
            .json(&json!({"name": "approval", "payload": {"ok": true}}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), ())
    };
    assert_eq!(status, 202);
    // B was started without workers of its own: A's workers report to A's address, which
    // is gone, so the rest runs on a restarted A (same Redis, new process).
    let a2 = TestMaster::start(test_config(&settings)).await;
    for w in &workers {
        w.set_master(&a2.url);
    }
    let rest: Vec<TaskEvent> = on_b.rest(WITHIN).await.iter().map(event).collect();
    got.extend(rest);
    // The whole story, once each, in order, as a fresh reader on the restarted master sees.
    let whole: Vec<TaskEvent> = open(&a2, &path, ALICE, None)
        .await
        .rest(WITHIN)
        .await
        .iter()
        .map(event)
        .collect();
    assert_eq!(got, whole);
    let ids: HashSet<&str> = got.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), got.len(), "no event twice");
    assert_eq!(
        kinds(&got),
        [
            "task.submitted",
            "step.queued draft",
            "step.dispatched draft",
            "step.succeeded draft",
            "step.waiting approve",
            "signal.received approve",
            "step.succeeded approve",
            "step.queued publish",
            "step.dispatched publish",
            "step.succeeded publish",
            "task.succeeded",
        ]
    );
    assert_eq!(got[5].signal.as_deref(), Some("approval"));
    assert_eq!(got[6].output, Some(json!({"ok": true})));
    b.stop().await;
    a2.stop().await;
}

#[tokio::test]
async fn streams_are_refused_to_other_tenants_bad_cursors_and_strangers() {
    let redis = RedisServer::start();
    let (master, _workers) = spawn_app(&redis).await;
    let id = master.submit(chain(json!({}))).await;
    let path = format!("/task/{id}/events");
    let (status, body) = refused(&master, &path, BOB, None).await;
    assert_eq!(
        status, 404,
        "another tenant's task does not exist for it: {body}"
    );
    let (status, _) = refused(&master, "/task/no-such-task/events", ALICE, None).await;
    assert_eq!(status, 404);
    let (status, _) = refused(&master, &path, "wrong-key-000000", None).await;
    assert_eq!(status, 401);
    for bad in [
        "garbage",
        "1-2",
        "1-2.x",
        "99999999999999999999999-0.0",
        "1-0.0 x",
    ] {
        let (status, body) = refused(&master, &path, ALICE, Some(bad)).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_event_id", "{body}");
    }
    let (status, body) = refused(&master, &format!("{path}?after=nope"), ALICE, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_event_id"))
    );
    // An operator may follow any task; a client may not follow everyone's.
    open(&master, &path, OPERATOR, None)
        .await
        .rest(WITHIN)
        .await;
    let (status, _) = refused(&master, "/events", ALICE, None).await;
    assert!(status == 401 || status == 403, "{status}");
    master.stop().await;
}

#[tokio::test]
async fn streams_per_client_are_capped_and_given_back_when_the_client_leaves() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(master::Config {
        event_streams_max_per_client: 2,
        event_streams_max_total: 3,
        ..test_config(&settings)
    })
    .await;
    // No worker runs here: the task stays queued and its streams stay open.
    let id = master.submit(json!({"input": {}})).await;
    let path = format!("/task/{id}/events");
    let first = open(&master, &path, ALICE, None).await;
    let _second = open(&master, &path, ALICE, None).await;
    let (status, body) = refused(&master, &path, ALICE, None).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("EVENT_STREAMS_MAX_PER_CLIENT")
    );
    // Another client has its own count, until the process's total.
    let bob_task = {
        let r = master
            .post("/task", BOB)
            .json(&json!({"input": {}}))
            .send()
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()["task_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let bob_path = format!("/task/{bob_task}/events");
    let _bob = open(&master, &bob_path, BOB, None).await;
    let (status, _) = refused(&master, &bob_path, BOB, None).await;
    assert_eq!(status, 503, "the process's total is reached");
    // Alice hangs up one stream: its place comes back.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match EventStream::open(master.get(&path, ALICE)).await {
            Ok(_) => break,
            Err((429 | 503, _)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("the place never came back: {other:?}"),
        }
    }
    master.stop().await;
}

#[tokio::test]
async fn the_operators_stream_shows_every_tasks_events_live_but_no_progress() {
    let redis = RedisServer::start();
    let (master, _workers) = spawn_app(&redis).await;
    let done_before = master.submit(chain(json!({}))).await;
    master.wait(&done_before, WITHIN).await;
    let mut all = open(&master, "/events", OPERATOR, None).await;
    let one = master.submit(chain(json!({"n": 1}))).await;
    let two = master.submit(chain(json!({"n": 2}))).await;
    let mut finished = HashSet::new();
    let mut seen = Vec::new();
    while finished.len() < 2 {
        let m = all
            .next(WITHIN)
            .await
            .expect("the operators' stream stays open");
        if m.id.is_none() {
            continue;
        }
        let e = event(&m);
        assert_ne!(e.task_id.as_str(), done_before, "it starts from now: {e:?}");
        if e.kind == "task.succeeded" {
            finished.insert(e.task_id.to_string());
        }
        seen.push(e);
    }
    assert_eq!(finished, HashSet::from([one.clone(), two.clone()]));
    for id in [&one, &two] {
        let of_task: Vec<String> = kinds(
            &seen
                .iter()
                .filter(|e| e.task_id.as_str() == id.as_str())
                .cloned()
                .collect::<Vec<_>>(),
        );
        assert_eq!(of_task.first().map(String::as_str), Some("task.submitted"));
        assert_eq!(of_task.len(), 2 + 3 * testkit::system::CAPABILITIES.len());
    }
    // Resuming the operators' stream from one of its ids gives what came after.
    let cursor = seen[2].id.clone();
    let mut resumed = open(&master, "/events", OPERATOR, Some(&cursor)).await;
    let next = until(&mut resumed, &seen[3].kind).await;
    assert_eq!(next.last().unwrap(), &seen[3]);
    master.stop().await;
}

#[tokio::test]
async fn progress_from_the_worker_holding_the_step_reaches_the_stream_and_nothing_else_does() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let _worker = TestWorker::start(
        "w-hold",
        &["plan"],
        2,
        Behavior::Hang,
        &settings,
        &master.url,
    )
    .await;
    let id = master
        .submit(json!({"steps": [{"id": "think", "capability": "plan"}], "input": {}}))
        .await;
    let mut stream = open(&master, &format!("/task/{id}/events"), ALICE, None).await;
    let dispatched = until(&mut stream, "step.dispatched").await.pop().unwrap();
    let attempt = dispatched.attempt.unwrap();
    let worker = dispatched.worker_id.clone().unwrap();
    assert_eq!(worker.as_str(), "w-hold");
    let progress = |body: Value, token: &str| {
        master
            .http
            .post(format!("{}/progress", master.url))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let body = |attempt: u32, worker: &str, messages: Value| {
        json!({"task_id": id, "step": 0, "attempt": attempt, "worker_id": worker,
               "messages": messages})
    };
    let r = progress(
        body(
            attempt,
            "w-hold",
            json!([{"delta": "Hel"}, {"delta": "lo"}]),
        ),
        WORKER_TOKEN,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "recorded");
    let e = until(&mut stream, "step.progress").await.pop().unwrap();
    assert_eq!(
        e.messages,
        vec![json!({"delta": "Hel"}), json!({"delta": "lo"})]
    );
    assert_eq!(
        (e.attempt, e.step.as_deref()),
        (Some(attempt), Some("think"))
    );
    // Fenced: another worker, another attempt, an unknown task are dropped, not errors.
    for stale in [
        body(attempt, "w-other", json!([{"delta": "x"}])),
        body(attempt + 1, "w-hold", json!([{"delta": "x"}])),
        json!({"task_id": "no-such-task", "step": 0, "attempt": 1, "worker_id": "w-hold",
               "messages": [1]}),
    ] {
        let r = progress(stale.clone(), WORKER_TOKEN).await.unwrap();
        assert_eq!(r.status(), 200, "{stale}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["status"],
            "discarded",
            "{stale}"
        );
    }
    // Refused: no worker token, too large, empty, too deep, not the shape.
    let r = progress(body(attempt, "w-hold", json!([1])), ALICE)
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let big = "x".repeat(common::wire::MAX_PROGRESS_BYTES);
    let r = progress(body(attempt, "w-hold", json!([big])), WORKER_TOKEN)
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "progress_too_large"
    );
    let r = progress(body(attempt, "w-hold", json!([])), WORKER_TOKEN)
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let mut deep = json!(1);
    for _ in 0..70 {
        deep = json!([deep]);
    }
    let r = progress(body(attempt, "w-hold", json!([deep])), WORKER_TOKEN)
        .await
        .unwrap();
    assert!(r.status() == 422 || r.status() == 400, "{}", r.status());
    let r = progress(json!({"task_id": id, "step": -1}), WORKER_TOKEN)
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    // Nothing of that reached the stream: cancel ends it with the step stopped.
    let r = master
        .http
        .delete(format!("{}/task/{id}", master.url))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rest: Vec<TaskEvent> = stream.rest(WITHIN).await.iter().map(event).collect();
    assert_eq!(kinds(&rest), ["step.cancelled think", "task.cancelled"]);
    master.stop().await;
}

/// The resident memory of a process, in bytes (`VmRSS` of `/proc/<pid>/status`).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn a_reader_that_stops_reading_holds_a_page_not_the_backlog_and_then_gets_it_all() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PIECES: usize = 2_000;
    const PIECE_BYTES: usize = 30_000;
    let redis = RedisServer::start();
    let settings = redis.settings();
    // The master as a process of its own, so its memory can be read.
    let port = testkit::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_master"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("REDIS_URL", redis.url())
        .env("REDIS_KEY_PREFIX", &settings.key_prefix)
        .env("API_KEYS", format!("alice:{ALICE}"))
        .env("WORKER_TOKEN", WORKER_TOKEN)
        .env(
            "WORKER_HEARTBEAT_MS",
            testkit::fakes::worker::HEARTBEAT.as_millis().to_string(),
        )
        .env("LEASE_MS", "1500")
        .env("RUST_LOG", "warn");
    let mut service = testkit::service::Service::child("master", &url, command, None).unwrap();
    service
        .wait_ready("/ready", Duration::from_secs(20))
        .await
        .unwrap();
    let pid = service.pid().unwrap();
    let _worker = TestWorker::start("w-hold", &["plan"], 2, Behavior::Hang, &settings, &url).await;
    let http = reqwest::Client::new();
    let id: String = http
        .post(format!("{url}/task"))
        .bearer_auth(ALICE)
        .json(&json!({"steps": [{"id": "think", "capability": "plan"}], "input": {}}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    // A reader with a small receive buffer that reads the answer's head and then nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut reader = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    reader
        .write_all(
            format!(
                "GET /task/{id}/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {ALICE}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = [0u8; 256];
    let n = reader.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    let attempt = loop {
        let view: Value = http
            .get(format!("{url}/task/{id}"))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if view["steps"][0]["status"] == "dispatched" {
            break view["steps"][0]["attempts"].as_u64().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let before = rss(pid);
    // 60 MB of partial output while the reader reads nothing.
    let piece = "x".repeat(PIECE_BYTES);
    for _ in 0..PIECES {
        let r = http
            .post(format!("{url}/progress"))
            .bearer_auth(WORKER_TOKEN)
            .json(
                &json!({"task_id": id, "step": 0, "attempt": attempt, "worker_id": "w-hold",
                          "messages": [{"delta": piece}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grown = rss(pid).saturating_sub(before);
    assert!(
        grown < 20 << 20,
        "the master grew {} MiB for a reader that reads nothing ({} MiB were published)",
        grown >> 20,
        (PIECES * PIECE_BYTES) >> 20
    );
    // The reader catches up: every piece arrives, then the end.
    let r = http
        .delete(format!("{url}/task/{id}"))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), reader.read_to_end(&mut body))
        .await
        .expect("the stream ends after the task's final event")
        .unwrap();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(text.matches("event: step.progress").count(), PIECES);
    assert!(text.contains("event: task.cancelled"));
    service.stop().await;
}

//! Completion callbacks end to end: SSRF refusals (at submit and at connect time), the
//! signature, no redirects, retries with backoff, and delivery by another replica when the
//! one that claimed a callback dies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::IntoResponse;
use common::config::Secret;
use common::redis::{RedisPool, RedisSettings};
use common::wire::{
    CallbackStatus, CallbackView, Capability, ReportStatus, ResultReport, TaskView, WorkerId,
};
use master::Config;
use master::store::{NewTask, PlannedStep, RateLimit, RedisStore, TaskStore};
use serde_json::{Value, json};
use testkit::{RedisServer, eventually};
use tokio::time::Instant;

use crate::helpers::{ALICE, Behavior, TestMaster, TestWorker, test_config};

const SECRET: &str = "whsec-test-0123456789";

/// A master whose callbacks retry quickly.
fn config(redis: &RedisSettings, allow_private: bool, max_attempts: u32) -> Config {
    Config {
        callback_secret: Secret::new(SECRET),
        callback_allow_private: allow_private,
        callback_max_attempts: max_attempts,
        callback_retry_base_ms: 100,
        callback_retry_max_ms: 400,
        callback_timeout_ms: 2_000,
        callback_visibility_ms: 3_000,
        callback_poll_ms: 20,
        ..test_config(redis)
    }
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Hit {
    path: String,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

/// A callback receiver on 127.0.0.1. `/redirect` answers `302` to `/target`; `/flaky`
/// answers the given statuses in turn, then `204`; everything else `204`.
struct Receiver {
    base: String,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    async fn start(flaky: Vec<u16>) -> Self {
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let answers = Arc::new(Mutex::new(flaky));
        let sink = hits.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let sink = sink.clone();
            let answers = answers.clone();
            async move {
                let path = uri.path().to_string();
                sink.lock().unwrap().push(Hit {
                    path: path.clone(),
                    headers,
                    body,
                    at: Instant::now(),
                });
                match path.as_str() {
                    "/redirect" => {
                        (StatusCode::FOUND, [(header::LOCATION, "/target")]).into_response()
                    }
                    "/flaky" => {
                        let mut a = answers.lock().unwrap();
                        if a.is_empty() {
                            StatusCode::NO_CONTENT.into_response()
                        } else {
                            StatusCode::from_u16(a.remove(0)).unwrap().into_response()
                        }
                    }
                    _ => StatusCode::NO_CONTENT.into_response(),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { base, hits }
    }

    fn hits(&self, path: &str) -> Vec<Hit> {
        let all = self.hits.lock().unwrap();
        all.iter().filter(|h| h.path == path).cloned().collect()
    }
}

/// A master with a `plan` worker that succeeds at once.
async fn system(config: Config, redis: &RedisSettings) -> (TestMaster, TestWorker) {
    let master = TestMaster::start(config).await;
    let worker = TestWorker::start(
        "w",
        &["plan"],
        4,
        Behavior::Succeed {
            delay: Duration::ZERO,
        },
        redis,
        &master.url,
    )
    .await;
    (master, worker)
}

/// Waits until the task's callback is no longer pending.
async fn settled(master: &TestMaster, id: &str) -> CallbackView {
    let done = eventually(Duration::from_secs(15), || async {
        master
            .view(id)
            .await
            .callback
            .filter(|c| c.status != CallbackStatus::Pending)
    })
    .await;
    match done {
        Some(callback) => callback,
        None => panic!(
            "callback of {id} still pending: {:?}",
            master.view(id).await.callback
        ),
    }
}

/// HMAC-SHA256 written out from its definition (RFC 2104) over a plain SHA-256, so the
/// test does not share the master's HMAC code.
fn hmac_sha256_hex(key: &[u8], message: &[u8]) -> String {
    use aws_lc_rs::digest::{SHA256, digest};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(digest(&SHA256, key).as_ref());
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|k| k ^ byte).collect::<Vec<u8>>();
    let mut inner = pad(0x36);
    inner.extend_from_slice(message);
    let mut outer = pad(0x5c);
    outer.extend_from_slice(digest(&SHA256, &inner).as_ref());
    digest(&SHA256, &outer)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a receiver does: parse `t=…,v1=…`, recompute, compare.
fn verifies(headers: &HeaderMap, body: &[u8], secret: &str) -> bool {
    let value = headers
        .get("ensemble-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parts: HashMap<&str, &str> = value.split(',').filter_map(|p| p.split_once('=')).collect();
    let (Some(t), Some(v1)) = (parts.get("t"), parts.get("v1")) else {
        return false;
    };
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    hmac_sha256_hex(secret.as_bytes(), &signed) == *v1
}

#[test]
fn the_test_hmac_matches_rfc_4231() {
    assert_eq!(
        hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[tokio::test]
async fn internal_targets_are_refused_by_default() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let receiver = Receiver::start(vec![]).await;
    let (master, _worker) = system(config(&settings, false, 2), &settings).await;
    let port = receiver.base.rsplit(':').next().unwrap().to_string();
    let refused = [
        (format!("http://127.0.0.1:{port}/hook"), "internal address"),
        (
            "http://169.254.169.254/latest/meta-data/".into(),
            "internal address",
        ),
        ("http://[::1]:6379/".into(), "internal address"),
        ("http://[::ffff:10.0.0.1]/".into(), "internal address"),
        ("http://[fd00:ec2::254]/".into(), "internal address"),
        ("http://10.0.0.8/".into(), "internal address"),
        ("http://100.64.0.1/".into(), "internal address"),
        ("http://0x7f.1/".into(), "internal address"),
        ("ftp://hooks.example.com/".into(), "http(s)"),
        ("https://user:pass@hooks.example.com/".into(), "credentials"),
        (
            format!("https://hooks.example.com/{}", "a".repeat(2048)),
            "2048",
        ),
    ];
    for (url, why) in refused {
        let r = master
            .post("/task", ALICE)
            .json(&json!({"steps": ["plan"], "callback_url": url}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{url}");
        let body: Value = r.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("callback_url") && message.contains(why),
            "{url}: {message}"
        );
    }

    // A name is checked when the callback connects: `localhost` resolves to loopback only,
    // so the attempts fail without a request reaching the receiver, and the task view says so.
    let id = master
        .submit(json!({"steps": ["plan"], "callback_url": format!("http://localhost:{port}/hook")}))
        .await;
    assert_eq!(
        master.wait(&id, Duration::from_secs(10)).await.status,
        common::wire::TaskStatus::Succeeded
    );
    let callback = settled(&master, &id).await;
    assert_eq!(callback.status, CallbackStatus::Failed, "{callback:?}");
    assert_eq!(callback.attempts, 2);
    let error = callback.last_error.unwrap_or_default();
    assert!(error.contains("internal"), "{error}");
    assert!(receiver.hits("/hook").is_empty());
    master.stop().await;
}

#[tokio::test]
async fn callbacks_need_a_secret() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let r = master
        .post("/task", ALICE)
        .json(&json!({"steps": ["plan"], "callback_url": "https://hooks.example.com/done"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("CALLBACK_SECRET"), "{message}");
    master.stop().await;
}

#[tokio::test]
async fn a_signed_callback_reaches_a_local_receiver_when_private_targets_are_allowed() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let receiver = Receiver::start(vec![]).await;
    let (master, _worker) = system(config(&settings, true, 3), &settings).await;
    let hook = format!("{}/hook", receiver.base);
    let id = master
        .submit(json!({"steps": ["plan"], "input": 7, "callback_url": hook}))
        .await;
    let plain = master.submit(json!({"steps": ["plan"], "input": 8})).await;
    let view = master.wait(&id, Duration::from_secs(10)).await;
    let callback = settled(&master, &id).await;
    assert_eq!(
        callback,
        CallbackView {
            url: hook.clone(),
            status: CallbackStatus::Delivered,
            attempts: 1,
            last_error: None,
        }
    );
    let hits = receiver.hits("/hook");
    assert_eq!(hits.len(), 1, "one task with a callback_url, one callback");
    let hit = &hits[0];
    assert!(verifies(&hit.headers, &hit.body, SECRET));
    assert!(!verifies(&hit.headers, &hit.body, "another-secret"));
    let mut tampered = hit.body.to_vec();
    tampered.push(b' ');
    assert!(!verifies(&hit.headers, &tampered, SECRET));
    let header = |name: &str| hit.headers.get(name).unwrap().to_str().unwrap().to_string();
    assert_eq!(header("content-type"), "application/json");
    assert_eq!(header("ensemble-event"), "task.succeeded");
    assert_eq!(header("ensemble-attempt"), "1");
    assert_eq!(
        header("ensemble-delivery"),
        format!("{id}.{}", view.finished_at_ms.unwrap())
    );
    let t: u64 = header("ensemble-signature")
        .strip_prefix("t=")
        .and_then(|rest| rest.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(t.abs_diff(common::wire::now_ms() / 1000) < 60);
    let sent: TaskView = serde_json::from_slice(&hit.body).unwrap();
    assert_eq!(sent.task_id.as_str(), id);
    assert_eq!(sent.result, view.result);
    assert_eq!(sent.callback, None, "the delivery bookkeeping is not sent");

    // Without a callback_url the view has no `callback` at all.
    master.wait(&plain, Duration::from_secs(10)).await;
    let raw: Value = master
        .get(&format!("/task/{plain}"), ALICE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(raw.get("callback").is_none(), "{raw}");

    // A cancelled task calls back too.
    let queued = master
        .submit(json!({"steps": ["retrieve"], "callback_url": hook}))
        .await;
    let r = master
        .http
        .delete(format!("{}/task/{queued}", master.url))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        settled(&master, &queued).await.status,
        CallbackStatus::Delivered
    );
    let hits = receiver.hits("/hook");
    assert_eq!(hits.len(), 2);
    assert_eq!(
        hits[1].headers.get("ensemble-event").unwrap(),
        "task.cancelled"
    );
    master.stop().await;
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let receiver = Receiver::start(vec![]).await;
    let (master, _worker) = system(config(&settings, true, 2), &settings).await;
    let id = master
        .submit(json!({"steps": ["plan"], "callback_url": format!("{}/redirect", receiver.base)}))
        .await;
    let callback = settled(&master, &id).await;
    assert_eq!(callback.status, CallbackStatus::Failed);
    assert_eq!(callback.attempts, 2);
    let error = callback.last_error.unwrap_or_default();
    assert!(error.contains("302"), "{error}");
    assert_eq!(receiver.hits("/redirect").len(), 2);
    assert!(
        receiver.hits("/target").is_empty(),
        "the redirect target never gets a request"
    );
    master.stop().await;
}

#[tokio::test]
async fn a_failing_receiver_is_retried_with_backoff_until_it_succeeds() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let receiver = Receiver::start(vec![500, 503]).await;
    let (master, _worker) = system(config(&settings, true, 8), &settings).await;
    let id = master
        .submit(json!({"steps": ["plan"], "callback_url": format!("{}/flaky", receiver.base)}))
        .await;
    let callback = settled(&master, &id).await;
    assert_eq!(callback.status, CallbackStatus::Delivered, "{callback:?}");
    assert_eq!(callback.attempts, 3);
    assert_eq!(
        callback.last_error.as_deref(),
        Some("the receiver answered 503 Service Unavailable")
    );
    let hits = receiver.hits("/flaky");
    assert_eq!(hits.len(), 3);
    let attempts: Vec<&str> = hits
        .iter()
        .map(|h| h.headers.get("ensemble-attempt").unwrap().to_str().unwrap())
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    let delivery = hits[0].headers.get("ensemble-delivery").unwrap();
    assert!(
        hits.iter()
            .all(|h| h.headers.get("ensemble-delivery") == Some(delivery))
    );
    // Equal-jitter backoff from 100 ms: at least 50 ms, then at least 100 ms.
    assert!(hits[1].at - hits[0].at >= Duration::from_millis(50));
    assert!(hits[2].at - hits[1].at >= Duration::from_millis(100));
    master.stop().await;
}

#[tokio::test]
async fn a_callback_claimed_by_a_replica_that_died_is_delivered_by_another() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let receiver = Receiver::start(vec![]).await;
    let hook = format!("{}/hook", receiver.base);
    // The task finishes through the store, as on a replica that then died.
    let store = RedisStore::new(RedisPool::new(&settings).unwrap());
    let plan = Capability::new("plan").unwrap();
    let task = NewTask {
        id: common::wire::TaskId::generate(),
        client: "alice".into(),
        pipeline: None,
        steps: vec![PlannedStep::chain_link(0, "plan", plan.clone(), 1, 60_000)],
        input: "1".into(),
        priority: 0,
        idempotency_key: None,
        callback_url: Some(hook.clone()),
        request_id: "req-died".into(),
        budget: None,
        traceparent: None,
    };
    let id = task.id.clone();
    let no_limit = RateLimit {
        per_sec: 0.0,
        burst: 1,
    };
    let retention = Duration::from_secs(3600);
    store.submit(task, no_limit, retention).await.unwrap();
    let w = WorkerId::new("w1").unwrap();
    let claimed = store
        .claim(&plan, std::slice::from_ref(&w), Duration::from_secs(60))
        .await
        .unwrap();
    let report = ResultReport {
        task_id: id.clone(),
        step: 0,
        attempt: claimed[0].work.attempt,
        worker_id: w,
        status: ReportStatus::Succeeded,
        output: Some(json!("done")),
        error: None,
        duration_ms: None,
    };
    let retry = common::backoff::Backoff {
        base: Duration::from_millis(50),
        max: Duration::from_millis(50),
    };
    store.report(&report, retry, 0.5, retention).await.unwrap();
    // The dying replica claims the callback and never finishes it.
    let visibility = Duration::from_millis(1_500);
    let claimed_at = Instant::now();
    let claims = store.claim_callbacks(10, visibility, 8).await.unwrap();
    assert_eq!(claims.len(), 1);
    drop(claims);

    let master = TestMaster::start(Config {
        callback_visibility_ms: 1_500,
        callback_timeout_ms: 1_000,
        ..config(&settings, true, 8)
    })
    .await;
    let delivered = eventually(Duration::from_secs(10), || async {
        receiver.hits("/hook").first().cloned()
    })
    .await
    .expect("another master delivers the callback");
    assert!(
        delivered.at - claimed_at >= visibility - Duration::from_millis(100),
        "not before the dead claim's visibility ran out"
    );
    assert!(verifies(&delivered.headers, &delivered.body, SECRET));
    assert_eq!(delivered.headers.get("ensemble-attempt").unwrap(), "2");
    assert_eq!(delivered.headers.get("x-request-id").unwrap(), "req-died");
    let callback = settled(&master, id.as_str()).await;
    assert_eq!(
        (callback.status, callback.attempts),
        (CallbackStatus::Delivered, 2)
    );
    assert_eq!(store.callbacks_pending().await.unwrap(), 0);
    assert_eq!(receiver.hits("/hook").len(), 1);
    master.stop().await;
}

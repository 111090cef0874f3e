//! Property tests of the parsers: arbitrary JSON (and mutations of valid bodies) sent to
//! `POST /task` and `POST /result` never get a 5xx or crash the master; nasty inputs
//! (deep nesting, invalid UTF-8, huge headers) get their documented status.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Value, json};
use testkit::RedisServer;

use crate::helpers::*;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[a-z_]{0,8}".prop_map(Value::String),
        prop::sample::select(vec![
            "plan",
            "default",
            "succeeded",
            "failed",
            "0",
            "-1",
            ""
        ])
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "steps",
                    "pipeline",
                    "input",
                    "priority",
                    "idempotency_key",
                    "callback_url",
                    "task_id",
                    "step",
                    "attempt",
                    "worker_id",
                    "status",
                    "output",
                    "error",
                    "retryable",
                    "message",
                    "x",
                ])
                .prop_map(String::from),
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid body with one field replaced by an arbitrary value.
fn mutated(base: Value) -> impl Strategy<Value = Value> {
    let keys: Vec<String> = base
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    (prop::sample::select(keys), json_value()).prop_map(move |(k, v)| {
        let mut b = base.clone();
        b[k.as_str()] = v;
        b
    })
}

#[test]
fn arbitrary_bodies_never_get_a_server_error() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = rt.block_on(TestMaster::start(test_config(&settings)));
    let valid_task =
        json!({"steps": ["plan"], "input": {"a": 1}, "priority": 1, "idempotency_key": "k"});
    let valid_report = json!({"task_id": "0190a0a0-0000-7000-8000-000000000000", "step": 0, "attempt": 1,
        "worker_id": "w", "status": "succeeded", "output": {}});
    let bodies = prop_oneof![json_value(), mutated(valid_task), mutated(valid_report),];
    let config = ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(body in bodies)| {
        rt.block_on(async {
            for (path, key) in [("/task", ALICE), ("/result", WORKER_TOKEN), ("/dispatch", OPERATOR)] {
                let r = master.post(path, key).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                prop_assert!(status < 500, "{path} answered {status} to {body}");
                if status >= 400 {
                    let err: Value = r.json().await.unwrap();
                    prop_assert!(err["error"]["message"].is_string(), "{err}");
                }
            }
            Ok(())
        })?;
    });
    rt.block_on(async {
        let r = master
            .http
            .get(format!("{}/ready", master.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "still healthy");
        master.stop().await;
    });
}

#[tokio::test]
async fn nasty_inputs_get_their_documented_status() {
    let redis = RedisServer::start();
    let master = TestMaster::start(test_config(&redis.settings())).await;
    // Deeply nested JSON: rejected (serde's recursion limit), no stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let r = master
        .post("/task", ALICE)
        .header("content-type", "application/json")
        .body(deep.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "an array is not a task");
    let deep = format!(
        "{{\"input\": {}1{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let r = master
        .post("/task", ALICE)
        .header("content-type", "application/json")
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        400,
        "past serde_json's recursion limit: malformed, not a crash"
    );
    // Invalid UTF-8.
    let r = master
        .post("/task", ALICE)
        .header("content-type", "application/json")
        .body(vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Headers past hyper's buffer (about 400 KB): refused with 431 or the connection
    // closed, never a crash.
    let huge = "x".repeat(1_000_000);
    let r = master
        .post("/task", ALICE)
        .header("x-junk", huge)
        .json(&json!({}))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => assert!(!e.is_timeout(), "the master hung on a huge header: {e}"),
    }
    // Unknown routes and methods.
    for (method, path, status) in [
        (reqwest::Method::GET, "/taskz", 404),
        (reqwest::Method::PATCH, "/task/x", 405),
        (reqwest::Method::DELETE, "/result/x", 405),
        (reqwest::Method::GET, "/result", 405),
    ] {
        let r = master
            .http
            .request(method.clone(), format!("{}{path}", master.url))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"]["code"].is_string());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        master
            .http
            .get(format!("{}/ready", master.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    master.stop().await;
}

/// A number at or near the edge of what some field's type can hold.
fn extreme_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            json!(i64::MIN),
            json!(i64::MAX),
            json!(i32::MIN),
            json!(i32::MAX),
            json!(i64::from(i32::MIN) - 1),
            json!(i64::from(i32::MAX) + 1),
            json!(u64::from(u32::MAX)),
            json!(u64::from(u32::MAX) + 1),
            json!(u64::MAX),
            json!(-1),
            json!(0),
            json!(-100),
            json!(100),
            json!(-101),
            json!(101),
            json!(60),
            json!(61),
            json!(-0.0),
            json!(0.5),
            json!(-0.5),
            json!(1e300),
            json!(-1e300),
            json!(f64::MIN_POSITIVE),
        ]),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| json!(f)),
    ]
}

/// The integer a JSON number is, if it is one.
fn integer(v: &Value) -> Option<i128> {
    v.as_i64()
        .map(i128::from)
        .or_else(|| v.as_u64().map(i128::from))
}

/// Every numeric field of every request body (and the `wait` query), at its extremes:
/// in range is accepted, out of range is `422` naming the field, and nothing panics or
/// answers `5xx` (`priority: -2147483648` used to pass validation through an `abs()`
/// overflow, and a debug build panicked).
#[test]
fn numeric_extremes_are_422_never_a_panic() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let redis = RedisServer::start();
    let master = rt.block_on(TestMaster::start(test_config(&redis.settings())));
    let config = ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let report = |field: &str, n: &Value| {
        let mut body = json!({"task_id": "0190a0a0-0000-7000-8000-000000000000", "step": 0,
            "attempt": 1, "worker_id": "w", "status": "succeeded", "output": {}});
        body[field] = n.clone();
        body
    };
    proptest!(config, |(n in extreme_number())| {
        rt.block_on(async {
            let int = integer(&n);
            // (path, key, body, whether the value is in range for the field, the field)
            let cases = [
                ("/task", ALICE, json!({"steps": ["plan"], "priority": n}),
                    int.is_some_and(|i| (-100..=100).contains(&i)), "priority"),
                ("/result", WORKER_TOKEN, report("step", &n),
                    int.is_some_and(|i| (0..=i128::from(u32::MAX)).contains(&i)), "step"),
                ("/result", WORKER_TOKEN, report("attempt", &n),
                    int.is_some_and(|i| (1..=i128::from(u32::MAX)).contains(&i)), "attempt"),
                // Any non-negative number (a fraction is rounded; past u64 saturates).
                ("/result", WORKER_TOKEN, report("duration_ms", &n),
                    n.as_f64().is_some_and(|f| f >= 0.0), "duration_ms"),
                ("/dispatch", OPERATOR, json!({"capability": "plan", "limit": n}),
                    int.is_some_and(|i| (0..=i128::from(u64::MAX)).contains(&i)), "limit"),
            ];
            for (path, key, body, in_range, field) in cases {
                let r = master.post(path, key).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                let text = r.text().await.unwrap();
                if in_range {
                    prop_assert!(status < 300, "{path} {field}={n}: {status} {text}");
                } else {
                    prop_assert_eq!(status, 422, "{} {}={}: {}", path, field, n, text);
                    let err: Value = serde_json::from_str(&text).unwrap();
                    let message = err["error"]["message"].as_str().unwrap_or("");
                    // serde names `attempt: 0` differently ("starts at 1"); the rest name
                    // the field.
                    prop_assert!(message.contains(field) || message.contains("attempt"),
                        "{} {}={}: {}", path, field, n, message);
                }
            }
            let wait = n.to_string();
            let r = master
                .get(&format!("/result/0190a0a0-0000-7000-8000-000000000000?wait={wait}"), ALICE)
                .send()
                .await
                .unwrap();
            let ok = n.as_f64().is_some_and(|w| (0.0..=60.0).contains(&w));
            let expected = if ok { 404 } else { 422 };
            prop_assert_eq!(r.status().as_u16(), expected, "wait={}", wait);
            Ok(())
        })?;
    });
    rt.block_on(async {
        let r = master
            .http
            .get(format!("{}/ready", master.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "still healthy");
        master.stop().await;
    });
}

//! Every client mistake gets the documented status and the JSON error body, never a 500.

use std::time::Duration;

use testkit::RedisServer;
use serde_json::{Value, json};

use crate::helpers::*;

async fn expect(r: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "{:?}", r.text().await);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    body
}

#[tokio::test]
async fn client_mistakes_get_clear_errors() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let mut config = test_config(&settings);
    config.body_limit_bytes = 4096;
    let master = TestMaster::start(config).await;
    let _w = TestWorker::start("w", &["plan"], 2, Behavior::Hang, &settings, &master.url).await;
    let url = &master.url;
    let http = &master.http;

    // 401: no key, wrong key, worker token as a client key.
    expect(
        http.post(format!("{url}/task"))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        401,
        "unauthorized",
    )
    .await;
    expect(
        master
            .post("/task", "nope-nope-nope")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        401,
        "unauthorized",
    )
    .await;
    expect(
        master
            .post("/task", WORKER_TOKEN)
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        401,
        "unauthorized",
    )
    .await;
    // ... and a client key as the worker token, or as an operator key.
    expect(
        master
            .post("/result", ALICE)
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        401,
        "unauthorized",
    )
    .await;
    expect(
        master.get("/queues", ALICE).send().await.unwrap(),
        403,
        "forbidden",
    )
    .await;

    // 400 malformed JSON; 415 no JSON content type.
    let r = master
        .post("/task", ALICE)
        .header("content-type", "application/json")
        .body("{\"steps\": [")
        .send()
        .await
        .unwrap();
    expect(r, 400, "invalid_json").await;
    let r = master
        .post("/task", ALICE)
        .body("steps=plan")
        .send()
        .await
        .unwrap();
    expect(r, 415, "unsupported_media_type").await;

    // 422: wrong types, unknown pipeline/capability, empty steps, both, unknown field.
    let body = expect(
        master
            .post("/task", ALICE)
            .json(&json!({"steps": "plan"}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid",
    )
    .await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("steps"),
        "{body}"
    );
    let body = expect(
        master
            .post("/task", ALICE)
            .json(&json!({"pipeline": "nope"}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid",
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pipeline"),
        "{body}"
    );
    let body = expect(
        master
            .post("/task", ALICE)
            .json(&json!({"steps": ["teleport"]}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid",
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("teleport"),
        "{body}"
    );
    expect(
        master
            .post("/task", ALICE)
            .json(&json!({"steps": []}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid",
    )
    .await;
    expect(
        master
            .post("/task", ALICE)
            .json(&json!({"steps": ["plan"], "pipeline": "default"}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid",
    )
    .await;
    expect(
        master
            .post("/task", ALICE)
            .json(&json!({"steps": ["Bad Cap"]}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid",
    )
    .await;
    expect(
        master
            .post("/task", ALICE)
            .json(&json!({"steps": ["plan"], "priority": 1000}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid",
    )
    .await;
    expect(
        master
            .post("/task", ALICE)
            .json(&json!({"steps": ["plan"], "callback_url": "ftp://x"}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid",
    )
    .await;
    let body = expect(
        master
            .post("/task", ALICE)
            .json(&json!({"steps": ["plan"], "inptu": 1}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid",
    )
    .await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("inptu"),
        "{body}"
    );

    // 413 over the body limit.
    let big = json!({"steps": ["plan"], "input": "x".repeat(10_000)});
    expect(
        master.post("/task", ALICE).json(&big).send().await.unwrap(),
        413,
        "payload_too_large",
    )
    .await;

    // 404: unknown task, malformed id, another client's task, unknown route; 405.
    let id = master.submit(json!({"steps": ["plan"]})).await;
    expect(
        master
            .get(&format!("/task/{id}"), BOB)
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    expect(
        master
            .get(&format!("/result/{id}"), BOB)
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    expect(
        master
            .get("/task/0190a0a0-0000-7000-8000-000000000000", ALICE)
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    expect(
        master.get("/task/..%2Fetc", ALICE).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    expect(
        master.get("/nope", ALICE).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    expect(
        http.put(format!("{url}/task")).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;

    // 422 on a bad wait and on malformed worker reports.
    expect(
        master
            .get(&format!("/result/{id}?wait=61"), ALICE)
            .send()
            .await
            .unwrap(),
        422,
        "invalid",
    )
    .await;
    expect(
        master
            .get(&format!("/result/{id}?wait=soon"), ALICE)
            .send()
            .await
            .unwrap(),
        422,
        "invalid",
    )
    .await;
    let r = master
        .post("/result", WORKER_TOKEN)
        .json(&json!({"task_id": id, "step": 0}))
        .send()
        .await
        .unwrap();
    expect(r, 422, "invalid").await;
    let r = master
        .post("/result", WORKER_TOKEN)
        .json(&json!({"task_id": id, "step": 0, "attempt": 1,
        "worker_id": "w", "status": "failed"}))
        .send()
        .await
        .unwrap();
    expect(r, 422, "invalid").await;
    expect(
        master
            .post("/dispatch", OPERATOR)
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid",
    )
    .await;

    // Still healthy, and the accepted task is intact.
    assert_eq!(
        http.get(format!("{url}/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = master
        .get(&format!("/result/{id}"), ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "still running (the worker hangs)");
    master.stop().await;
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let mut config = test_config(&settings);
    config.rate_limit_per_sec = 1.0;
    config.rate_limit_burst = 2;
    let master = TestMaster::start(config).await;
    for _ in 0..2 {
        master.submit(json!({"pipeline": "default"})).await;
    }
    let r = master
        .post("/task", ALICE)
        .json(&json!({"pipeline": "default"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let r = master
        .post("/task", BOB)
        .json(&json!({"pipeline": "default"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "another client is not limited");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = master
        .post("/task", ALICE)
        .json(&json!({"pipeline": "default"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "the limit refills");
    master.stop().await;
}

#[tokio::test]
async fn jwt_clients_are_accepted_and_bad_tokens_refused() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let redis = RedisServer::start();
    let settings = redis.settings();
    let mut config = test_config(&settings);
    config.jwt_secret = common::config::Secret::new("jwt-secret-for-tests");
    config.jwt_issuer = Some("ensemble-tests".into());
    let master = TestMaster::start(config).await;
    let now = common::wire::now_ms() / 1000;
    let token = |sub: &str, exp: u64, secret: &str| {
        encode(
            &Header::default(),
            &json!({"sub": sub, "exp": exp, "iss": "ensemble-tests"}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let token_with_iss = |sub: &str, exp: u64, iss: &str| {
        encode(
            &Header::default(),
            &json!({"sub": sub, "exp": exp, "iss": iss}),
            &EncodingKey::from_secret(b"jwt-secret-for-tests"),
        )
        .unwrap()
    };
    let good = token("carol", now + 60, "jwt-secret-for-tests");
    let r = master
        .post("/task", &good)
        .json(&json!({"pipeline": "default"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        master
            .get(&format!("/task/{id}"), &good)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        master
            .get(&format!("/task/{id}"), ALICE)
            .send()
            .await
            .unwrap()
            .status(),
        404,
        "carol's task is not alice's"
    );
    for bad in [
        token("carol", now - 120, "jwt-secret-for-tests"),
        token("carol", now + 60, "some-other-secret"),
        // alg: none
        format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&format!(r#"{{"sub":"carol","exp":{}}}"#, now + 60))
        ),
        "not.a.jwt".to_string(),
        // JWT_ISSUER is set: a token without `iss` is refused, not waved through.
        encode(
            &Header::default(),
            &json!({"sub": "carol", "exp": now + 60}),
            &EncodingKey::from_secret(b"jwt-secret-for-tests"),
        )
        .unwrap(),
        token_with_iss("carol", now + 60, "someone-else"),
    ] {
        let r = master
            .post("/task", &bad)
            .json(&json!({"pipeline": "default"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{bad}");
    }
    master.stop().await;
}

fn b64(text: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn rs256_jwts_verified_with_the_public_key_file() {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::{KeyPair, KeySize};
    use aws_lc_rs::signature::KeyPair as _;
    use base64::Engine;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

    fn pem(label: &str, der: &[u8]) -> String {
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }
    let keys = |_: ()| {
        let pair = KeyPair::generate(KeySize::Rsa2048).unwrap();
        let private = pem(
            "PRIVATE KEY",
            AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair)
                .unwrap()
                .as_ref(),
        );
        let public = pem(
            "PUBLIC KEY",
            AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(pair.public_key())
                .unwrap()
                .as_ref(),
        );
        (private, public)
    };
    let (private, public) = keys(());
    let (other_private, _) = keys(());
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("jwt.pub.pem");
    std::fs::write(&key_file, public).unwrap();

    let redis = RedisServer::start();
    let mut config = test_config(&redis.settings());
    config.jwt_public_key_file = Some(key_file.display().to_string());
    config.jwt_audience = Some("ensemble".into());
    let master = TestMaster::start(config).await;
    let now = common::wire::now_ms() / 1000;
    let sign = |key: &str, aud: &str| {
        encode(
            &Header::new(Algorithm::RS256),
            &json!({"sub": "dave", "exp": now + 60, "aud": aud}),
            &EncodingKey::from_rsa_pem(key.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let r = master
        .post("/task", &sign(&private, "ensemble"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // JWT_AUDIENCE is set: a token without `aud` is refused too.
    let no_aud = encode(
        &Header::new(Algorithm::RS256),
        &json!({"sub": "dave", "exp": now + 60}),
        &EncodingKey::from_rsa_pem(private.as_bytes()).unwrap(),
    )
    .unwrap();
    for bad in [
        sign(&other_private, "ensemble"),
        sign(&private, "someone-else"),
        no_aud,
    ] {
        let r = master
            .post("/task", &bad)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    // An HS256 token is refused: no HMAC secret is configured, the algorithm is pinned.
    let hs = encode(
        &Header::default(),
        &json!({"sub": "dave", "exp": now + 60, "aud": "ensemble"}),
        &EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    let r = master
        .post("/task", &hs)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    master.stop().await;
}

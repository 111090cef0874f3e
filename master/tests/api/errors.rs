//! Every client mistake gets the documented status and the JSON error body, never a 500.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use testkit::RedisServer;

use crate::helpers::*;

/// One client mistake: the request, and the status, error code and message fragment the
/// answer must carry.
struct Case {
    name: &'static str,
    method: Method,
    path: String,
    /// The bearer key sent, if any.
    key: Option<&'static str>,
    body: Body,
    status: u16,
    code: &'static str,
    /// A fragment the error message must contain ("" for any non-empty message).
    message: &'static str,
}

enum Body {
    None,
    Json(Value),
    /// A body sent as is, with this content type (none when `None`).
    Raw(Option<&'static str>, &'static str),
}

impl Case {
    fn new(name: &'static str, method: Method, path: impl Into<String>) -> Self {
        Self {
            name,
            method,
            path: path.into(),
            key: None,
            body: Body::None,
            status: 0,
            code: "",
            message: "",
        }
    }

    fn key(self, key: &'static str) -> Self {
        Self {
            key: Some(key),
            ..self
        }
    }

    fn json(self, body: Value) -> Self {
        Self {
            body: Body::Json(body),
            ..self
        }
    }

    fn raw(self, content_type: Option<&'static str>, body: &'static str) -> Self {
        Self {
            body: Body::Raw(content_type, body),
            ..self
        }
    }

    fn expect(self, status: u16, code: &'static str) -> Self {
        Self {
            status,
            code,
            ..self
        }
    }

    fn mentioning(self, message: &'static str) -> Self {
        Self { message, ..self }
    }

    /// Sends the request; `None` when the answer is what the case expects, else what was
    /// wrong with it.
    async fn check(&self, master: &TestMaster) -> Option<String> {
        let mut request = master
            .http
            .request(self.method.clone(), format!("{}{}", master.url, self.path));
        if let Some(key) = self.key {
            request = request.bearer_auth(key);
        }
        request = match &self.body {
            Body::None => request,
            Body::Json(body) => request.json(body),
            Body::Raw(Some(content_type), body) => {
                request.header("content-type", *content_type).body(*body)
            }
            Body::Raw(None, body) => request.body(*body),
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or("");
        let right = status == self.status
            && body["error"]["code"] == self.code
            && !message.is_empty()
            && message.contains(self.message);
        (!right).then(|| {
            format!(
                "{}: expected {} {} mentioning {:?}, got {status} {body}",
                self.name, self.status, self.code, self.message
            )
        })
    }
}

/// Every client mistake the API documents, against one running task `id` that alice owns
/// and one task of hers that has finished (`done`).
fn cases(id: &str, done: &str) -> Vec<Case> {
    use Method as M;
    let task = |name| Case::new(name, M::POST, "/task");
    let signal = |name, task: &str| Case::new(name, M::POST, format!("/task/{task}/signal"));
    let mut nested = json!(1);
    for _ in 0..100 {
        nested = json!([nested]);
    }
    let too_many: Vec<Value> = (0..65).map(|_| json!("plan")).collect();
    vec![
        // 401 and 403: missing or misused credentials.
        task("no key").json(json!({})).expect(401, "unauthorized"),
        task("wrong key")
            .key("nope-nope-nope")
            .json(json!({}))
            .expect(401, "unauthorized"),
        task("worker token as a client key")
            .key(WORKER_TOKEN)
            .json(json!({}))
            .expect(401, "unauthorized"),
        Case::new("client key as the worker token", M::POST, "/result")
            .key(ALICE)
            .json(json!({}))
            .expect(401, "unauthorized"),
        Case::new("client key as an operator key", M::GET, "/queues")
            .key(ALICE)
            .expect(403, "forbidden"),
        // 400 and 415: not JSON.
        task("malformed JSON")
            .key(ALICE)
            .raw(Some("application/json"), "{\"steps\": [")
            .expect(400, "invalid_json"),
        task("no JSON content type")
            .key(ALICE)
            .raw(None, "steps=plan")
            .expect(415, "unsupported_media_type"),
        // 422: a task that cannot be run.
        task("steps of the wrong type")
            .key(ALICE)
            .json(json!({"steps": "plan"}))
            .expect(422, "invalid")
            .mentioning("steps"),
        task("unknown pipeline")
            .key(ALICE)
            .json(json!({"pipeline": "nope"}))
            .expect(422, "invalid")
            .mentioning("pipeline"),
        task("unknown capability")
            .key(ALICE)
            .json(json!({"steps": ["teleport"]}))
            .expect(422, "invalid")
            .mentioning("teleport"),
        task("empty steps")
            .key(ALICE)
            .json(json!({"steps": []}))
            .expect(422, "invalid"),
        task("both steps and pipeline")
            .key(ALICE)
            .json(json!({"steps": ["plan"], "pipeline": "default"}))
            .expect(422, "invalid"),
        task("malformed capability")
            .key(ALICE)
            .json(json!({"steps": ["Bad Cap"]}))
            .expect(422, "invalid"),
        task("priority out of range")
            .key(ALICE)
            .json(json!({"steps": ["plan"], "priority": 1000}))
            .expect(422, "invalid"),
        task("callback_url not http")
            .key(ALICE)
            .json(json!({"steps": ["plan"], "callback_url": "ftp://x"}))
            .expect(422, "invalid"),
        task("unknown field")
            .key(ALICE)
            .json(json!({"steps": ["plan"], "inptu": 1}))
            .expect(422, "invalid")
            .mentioning("inptu"),
        // 422: a graph that cannot run, naming the step and the limit.
        task("a cycle")
            .key(ALICE)
            .json(json!({"steps": [
                {"id": "a", "capability": "plan", "needs": ["b"]},
                {"id": "b", "capability": "plan", "needs": ["a"]},
            ]}))
            .expect(422, "invalid")
            .mentioning("a → b → a"),
        task("a need that is no step")
            .key(ALICE)
            .json(json!({"steps": ["plan", {"id": "x", "capability": "plan", "needs": ["nope"]}]}))
            .expect(422, "invalid")
            .mentioning("`nope`"),
        task("a duplicate id")
            .key(ALICE)
            .json(json!({"steps": ["plan", {"id": "plan", "capability": "retrieve"}]}))
            .expect(422, "invalid")
            .mentioning("id `plan` is already"),
        task("map concurrency 0")
            .key(ALICE)
            .json(json!({"steps": [{"id": "m", "capability": "plan",
                "map": {"over": "input", "concurrency": 0}}]}))
            .expect(422, "invalid")
            .mentioning("`map.concurrency` must be 1 to 1000"),
        task("map concurrency 1001")
            .key(ALICE)
            .json(json!({"steps": [{"id": "m", "capability": "plan",
                "map": {"over": "input", "concurrency": 1001}}]}))
            .expect(422, "invalid")
            .mentioning("not 1001"),
        task("a wait without a timeout")
            .key(ALICE)
            .json(json!({"steps": [{"id": "w", "wait": {"signal": "go"}}]}))
            .expect(422, "invalid")
            .mentioning("`wait.timeout_ms` is required"),
        task("65 steps")
            .key(ALICE)
            .json(json!({"steps": too_many}))
            .expect(422, "invalid")
            .mentioning("at most 64 steps"),
        // Signals: 401, 404, 409, 413 and 422.
        signal("a signal without a key", id)
            .json(json!({"name": "go"}))
            .expect(401, "unauthorized"),
        signal("a signal to another client's task", id)
            .key(BOB)
            .json(json!({"name": "go"}))
            .expect(404, "not_found"),
        signal("a signal to a finished task", done)
            .key(ALICE)
            .json(json!({"name": "go"}))
            .expect(409, "conflict")
            .mentioning("cancelled"),
        signal("a signal no wait step listens for", id)
            .key(ALICE)
            .json(json!({"name": "nobody-listens"}))
            .expect(422, "invalid")
            .mentioning("`nobody-listens`"),
        signal("a signal payload nested too deep", id)
            .key(ALICE)
            .json(json!({"name": "go", "payload": nested}))
            .expect(422, "invalid")
            .mentioning("`payload`"),
        signal("a signal with an unknown field", id)
            .key(ALICE)
            .json(json!({"name": "go", "paylod": 1}))
            .expect(422, "invalid")
            .mentioning("paylod"),
        signal("a signal body over the limit", id)
            .key(ALICE)
            .json(json!({"name": "go", "payload": "x".repeat(10_000)}))
            .expect(413, "payload_too_large"),
        // 413: over BODY_LIMIT_BYTES (4096 here).
        task("body over the limit")
            .key(ALICE)
            .json(json!({"steps": ["plan"], "input": "x".repeat(10_000)}))
            .expect(413, "payload_too_large"),
        // 404 and 405: nothing there for this caller.
        Case::new("another client's task", M::GET, format!("/task/{id}"))
            .key(BOB)
            .expect(404, "not_found"),
        Case::new("another client's result", M::GET, format!("/result/{id}"))
            .key(BOB)
            .expect(404, "not_found"),
        Case::new(
            "unknown task",
            M::GET,
            "/task/0190a0a0-0000-7000-8000-000000000000",
        )
        .key(ALICE)
        .expect(404, "not_found"),
        Case::new("malformed task id", M::GET, "/task/..%2Fetc")
            .key(ALICE)
            .expect(404, "not_found"),
        Case::new("unknown route", M::GET, "/nope")
            .key(ALICE)
            .expect(404, "not_found"),
        Case::new("wrong method", M::PUT, "/task").expect(405, "method_not_allowed"),
        // 422: a bad long-poll wait, malformed worker reports, an empty redrive.
        Case::new(
            "wait over the maximum",
            M::GET,
            format!("/result/{id}?wait=61"),
        )
        .key(ALICE)
        .expect(422, "invalid"),
        Case::new(
            "wait not a number",
            M::GET,
            format!("/result/{id}?wait=soon"),
        )
        .key(ALICE)
        .expect(422, "invalid"),
        Case::new("report missing fields", M::POST, "/result")
            .key(WORKER_TOKEN)
            .json(json!({"task_id": id, "step": 0}))
            .expect(422, "invalid"),
        Case::new("failed report without an error", M::POST, "/result")
            .key(WORKER_TOKEN)
            .json(json!({"task_id": id, "step": 0, "attempt": 1,
                "worker_id": "w", "status": "failed"}))
            .expect(422, "invalid"),
        Case::new("redrive without a capability", M::POST, "/dispatch")
            .key(OPERATOR)
            .json(json!({}))
            .expect(422, "invalid"),
    ]
}

#[tokio::test]
async fn client_mistakes_get_clear_errors() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let mut config = test_config(&settings);
    config.body_limit_bytes = 4096;
    let master = TestMaster::start(config).await;
    let _w = TestWorker::start("w", &["plan"], 2, Behavior::Hang, &settings, &master.url).await;
    let id = master.submit(json!({"steps": ["plan"]})).await;
    let done = master.submit(json!({"steps": ["plan"]})).await;
    let cancel = master.http.delete(format!("{}/task/{done}", master.url));
    let cancelled = cancel.bearer_auth(ALICE).send().await.unwrap();
    assert_eq!(cancelled.status(), 200);

    let mut wrong = Vec::new();
    for case in cases(&id, &done) {
        wrong.extend(case.check(&master).await);
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Still healthy, and the accepted task is intact.
    let ready = master.http.get(format!("{}/ready", master.url)).send();
    assert_eq!(ready.await.unwrap().status(), 200);
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

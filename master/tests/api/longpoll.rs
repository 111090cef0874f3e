//! Long polls are capped per client (`429`) and per process (`503`), so one client cannot
//! take every connection: health checks, submits and plain reads still answer while the
//! caps are reached, and a poll's place is given back when it ends or its client hangs up.

use std::time::Duration;

use common::http::ErrorBody;
use common::redis::RedisSettings;
use master::Config;
use reqwest::StatusCode;
use serde_json::json;
use testkit::{RedisServer, eventually};
use tokio::task::JoinHandle;

use crate::helpers::*;

const CAROL: &str = "carol-key-123456";

/// Three clients, at most 3 long polls each and 5 in all.
fn capped(redis: &RedisSettings) -> Config {
    Config {
        api_keys: common::config::Secret::new(format!("alice:{ALICE},bob:{BOB},carol:{CAROL}")),
        long_poll_max_per_client: 3,
        long_poll_max_total: 5,
        ..test_config(redis)
    }
}

/// Submits a task nobody will run (there are no workers) as the client with `key`.
async fn idle_task(master: &TestMaster, key: &str) -> String {
    let r = master
        .post("/task", key)
        .json(&json!({"steps": ["plan"], "input": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    r.json::<serde_json::Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A long poll of `wait` seconds held in the background. A refusal is retried: a
/// [`probe`] may hold a place for a moment. The task ends with the poll's final status.
fn hold(master: &TestMaster, key: &'static str, id: &str, wait: u32) -> JoinHandle<StatusCode> {
    let http = master.http.clone();
    let url = format!("{}/result/{id}?wait={wait}", master.url);
    tokio::spawn(async move {
        for _ in 0..500 {
            let status = http
                .get(&url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status();
            if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE
            {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the long poll never got a place");
    })
}

/// A short long poll (`wait=0.1`).
async fn probe(master: &TestMaster, key: &str, id: &str) -> reqwest::Response {
    master
        .get(&format!("/result/{id}?wait=0.1"), key)
        .send()
        .await
        .unwrap()
}

/// Probes until the answer has `status`; returns it.
async fn probe_until(
    master: &TestMaster,
    key: &str,
    id: &str,
    status: StatusCode,
) -> reqwest::Response {
    eventually(Duration::from_secs(10), || async {
        let r = probe(master, key, id).await;
        (r.status() == status).then_some(r)
    })
    .await
    .unwrap_or_else(|| panic!("a long poll as {key} never got {status}"))
}

/// Checks a refusal: status, `Retry-After`, the JSON error body and its code.
async fn assert_refused(r: reqwest::Response, status: StatusCode, code: &str, setting: &str) {
    assert_eq!(r.status(), status);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body: ErrorBody = r.json().await.unwrap();
    assert_eq!(body.error.code, code);
    assert!(
        body.error.message.contains(setting),
        "{}",
        body.error.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_polls_are_capped_per_client_and_in_total_while_the_rest_still_answers() {
    let redis = RedisServer::start();
    let master = TestMaster::start(capped(&redis.settings())).await;
    let alices = idle_task(&master, ALICE).await;
    let bobs = idle_task(&master, BOB).await;
    let carols = idle_task(&master, CAROL).await;

    // Alice fills her own cap: her next long poll is refused with 429 …
    let alice_polls: Vec<_> = (0..3).map(|_| hold(&master, ALICE, &alices, 60)).collect();
    let refused = probe_until(&master, ALICE, &alices, StatusCode::TOO_MANY_REQUESTS).await;
    assert_refused(
        refused,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_concurrent",
        "LONG_POLL_MAX_PER_CLIENT",
    )
    .await;
    // … while a plain read of hers needs no place, and another client is still served.
    let plain = master
        .get(&format!("/result/{alices}"), ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), StatusCode::ACCEPTED);
    assert_eq!(
        probe(&master, BOB, &bobs).await.status(),
        StatusCode::ACCEPTED
    );

    // Bob takes the last two places of the process: now everyone's long poll gets 503.
    let bob_polls: Vec<_> = (0..2).map(|_| hold(&master, BOB, &bobs, 60)).collect();
    let refused = probe_until(&master, CAROL, &carols, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_refused(
        refused,
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "LONG_POLL_MAX_TOTAL",
    )
    .await;
    assert_eq!(
        probe(&master, BOB, &bobs).await.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "below his own cap, bob meets the total one"
    );

    // With both caps reached, health checks, submits and reads still answer, promptly.
    let prompt = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let health = prompt
        .get(format!("{}/health", master.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let submitted = prompt
        .post(format!("{}/task", master.url))
        .bearer_auth(CAROL)
        .json(&json!({"steps": ["plan"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(submitted.status(), StatusCode::ACCEPTED);
    let status = prompt
        .get(format!("{}/task/{carols}", master.url))
        .bearer_auth(CAROL)
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), StatusCode::OK);

    // Alice's clients hang up mid-wait: their places come back, for carol and for alice.
    for poll in &alice_polls {
        poll.abort();
    }
    probe_until(&master, CAROL, &carols, StatusCode::ACCEPTED).await;
    probe_until(&master, ALICE, &alices, StatusCode::ACCEPTED).await;
    for poll in &bob_polls {
        poll.abort();
    }
    master.stop().await;
}

#[tokio::test]
async fn a_long_poll_gives_its_place_back_when_it_ends() {
    let redis = RedisServer::start();
    let config = Config {
        long_poll_max_per_client: 2,
        long_poll_max_total: 2,
        ..test_config(&redis.settings())
    };
    let master = TestMaster::start(config).await;
    let id = idle_task(&master, ALICE).await;
    let polls: Vec<_> = (0..2).map(|_| hold(&master, ALICE, &id, 2)).collect();
    probe_until(&master, ALICE, &id, StatusCode::TOO_MANY_REQUESTS).await;
    for poll in polls {
        assert_eq!(
            poll.await.unwrap(),
            StatusCode::ACCEPTED,
            "the poll ran its time"
        );
    }
    // Both ended: both places are free again, at once.
    let again: Vec<_> = (0..2).map(|_| probe(&master, ALICE, &id)).collect();
    for r in futures::future::join_all(again).await {
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    master.stop().await;
}

#[test]
fn the_caps_are_validated_at_start() {
    use common::config::Settings;
    for (per_client, total, setting) in [
        (0, 10, "LONG_POLL_MAX_PER_CLIENT"),
        (10, 5, "LONG_POLL_MAX_TOTAL"),
    ] {
        let config = Config {
            long_poll_max_per_client: per_client,
            long_poll_max_total: total,
            ..test_config(&RedisSettings::default())
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains(setting), "{error}");
    }
}

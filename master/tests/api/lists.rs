//! The operators' lists over HTTP: the task search (`GET /tasks`), the dead letters
//! (`GET /deadletters`, `DELETE /deadletters/{capability}`), and operators reading any
//! client's task — with the callers and inputs that should be turned away.

use std::time::Duration;

use common::wire::TaskStatus;
use serde_json::{Value, json};
use testkit::RedisServer;
use testkit::sse::EventStream;

use crate::helpers::*;

/// Status and JSON body of a request.
async fn answer(request: reqwest::RequestBuilder) -> (u16, Value) {
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

fn delete(master: &TestMaster, path: &str, key: &str) -> reqwest::RequestBuilder {
    master
        .http
        .delete(format!("{}{path}", master.url))
        .bearer_auth(key)
}

/// Submits a task as `key`'s client.
async fn submit_as(master: &TestMaster, key: &str, body: Value) -> String {
    let (status, v) = answer(master.post("/task", key).json(&body)).await;
    assert_eq!(status, 202, "{v}");
    v["task_id"].as_str().unwrap().to_string()
}

fn ids(page: &Value, list: &str) -> Vec<String> {
    page[list]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t.get("id")
                .or_else(|| t.get("task_id"))
                .and_then(Value::as_str)
                .unwrap()
                .to_string()
        })
        .collect()
}

fn owned(list: &[&String]) -> Vec<String> {
    list.iter().map(|s| (*s).clone()).collect()
}

#[tokio::test]
async fn the_operator_lists_need_an_operator_key() {
    let redis = RedisServer::start();
    let master = TestMaster::start(test_config(&redis.settings())).await;
    for (method, path) in [
        ("GET", "/tasks"),
        ("GET", "/deadletters"),
        ("DELETE", "/deadletters/plan"),
    ] {
        let call = |key: &str| {
            if method == "GET" {
                master.get(path, key)
            } else {
                delete(&master, path, key)
            }
        };
        let anonymous = if method == "GET" {
            master.http.get(format!("{}{path}", master.url))
        } else {
            master.http.delete(format!("{}{path}", master.url))
        };
        assert_eq!(
            answer(anonymous).await.0,
            401,
            "{method} {path} without a key"
        );
        assert_eq!(
            answer(call("not-a-key-0000000")).await.0,
            401,
            "{method} {path}"
        );
        assert_eq!(
            answer(call(ALICE)).await.0,
            403,
            "{method} {path} with a client key"
        );
        assert_eq!(answer(call(OPERATOR)).await.0, 200, "{method} {path}");
    }
    master.stop().await;
}

#[tokio::test]
async fn the_task_search_turns_away_bad_parameters_with_a_422_naming_them() {
    let redis = RedisServer::start();
    let master = TestMaster::start(test_config(&redis.settings())).await;
    let long = "x".repeat(300);
    let cases: Vec<(String, &str)> = vec![
        ("status=bogus".into(), "bogus"),
        ("status=waiting".into(), "waiting"),
        ("status=RUNNING".into(), "status"),
        ("limit=0".into(), "limit"),
        ("limit=501".into(), "limit"),
        ("limit=-1".into(), "limit"),
        ("limit=99999999999999999999999".into(), "limit"),
        ("limit=1.5".into(), "limit"),
        ("since=-1".into(), "since"),
        ("since=18446744073709551616".into(), "since"),
        ("until=tomorrow".into(), "until"),
        ("cursor=garbage".into(), "cursor"),
        ("cursor=1.a:b".into(), "cursor"),
        ("cursor=99999999999999.abc".into(), "cursor"),
        ("cursor=-5.abc".into(), "cursor"),
        (format!("cursor={}.abc", u64::MAX), "cursor"),
        (format!("client={long}"), "client"),
        (format!("pipeline={long}"), "pipeline"),
        ("stauts=failed".into(), "stauts"),
        ("limit=1&limit=2".into(), "limit"),
    ];
    for (query, named) in cases {
        let (status, body) = answer(master.get(&format!("/tasks?{query}"), OPERATOR)).await;
        assert_eq!(status, 422, "{query}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(named), "{query}: {message}");
    }
    // Extremes that are well-formed answer an empty page or every task, not an error.
    let id = submit_as(&master, ALICE, json!({"steps": ["plan"]})).await;
    for (query, want) in [
        (format!("since={}", u64::MAX), vec![]),
        (format!("until={}", u64::MAX), vec![id.clone()]),
        ("since=5&until=4".to_string(), vec![]),
        ("since=5&until=5".to_string(), vec![]),
        ("limit=500&status=&client=".to_string(), vec![id.clone()]),
        ("cursor=1.nothing".to_string(), vec![]),
    ] {
        let (status, page) = answer(master.get(&format!("/tasks?{query}"), OPERATOR)).await;
        assert_eq!(status, 200, "{query}: {page}");
        assert_eq!(ids(&page, "tasks"), want, "{query}");
    }
    master.stop().await;
}

#[tokio::test]
async fn operators_search_every_clients_tasks_and_read_any_of_them() {
    let redis = RedisServer::start();
    // No workers: the tasks stay queued.
    let master = TestMaster::start(test_config(&redis.settings())).await;
    let a1 = submit_as(&master, ALICE, json!({"steps": ["plan"], "input": 1})).await;
    tokio::time::sleep(Duration::from_millis(3)).await;
    let b1 = submit_as(&master, BOB, json!({"pipeline": "default", "input": {}})).await;
    tokio::time::sleep(Duration::from_millis(3)).await;
    let a2 = submit_as(&master, ALICE, json!({"steps": ["plan", "evaluate"]})).await;

    let (status, page) = answer(master.get("/tasks", OPERATOR)).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page, "tasks"), owned(&[&a2, &b1, &a1]));
    assert_eq!(page["next"], Value::Null);
    let row = &page["tasks"][0];
    assert_eq!(row["client"], "alice");
    assert_eq!(row["status"], "queued");
    assert_eq!(row["pipeline"], Value::Null);
    assert_eq!(row["steps"], 2);
    assert_eq!(row["finished_at"], Value::Null);
    assert!(row["created_at"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(page["tasks"][1]["pipeline"], "default");

    for (query, want) in [
        ("client=bob", vec![&b1]),
        ("client=alice", vec![&a2, &a1]),
        ("pipeline=default", vec![&b1]),
        ("status=queued&client=alice", vec![&a2, &a1]),
        ("status=failed", vec![]),
        ("status=running", vec![]),
    ] {
        let (status, page) = answer(master.get(&format!("/tasks?{query}"), OPERATOR)).await;
        assert_eq!(status, 200, "{query}: {page}");
        assert_eq!(ids(&page, "tasks"), owned(&want), "{query}");
    }
    // One at a time, following `next`.
    let mut seen = Vec::new();
    let mut path = "/tasks?limit=1".to_string();
    loop {
        let (_, page) = answer(master.get(&path, OPERATOR)).await;
        seen.extend(ids(&page, "tasks"));
        match page["next"].as_str() {
            Some(next) => path = format!("/tasks?limit=1&cursor={next}"),
            None => break,
        }
        assert!(seen.len() <= 3, "the pages end: {seen:?}");
    }
    assert_eq!(seen, owned(&[&a2, &b1, &a1]));

    // An operator reads any client's task and its events; a client only its own.
    let (status, view) = answer(master.get(&format!("/task/{b1}"), OPERATOR)).await;
    assert_eq!((status, view["task_id"].as_str()), (200, Some(b1.as_str())));
    assert_eq!(answer(master.get(&format!("/task/{b1}"), BOB)).await.0, 200);
    assert_eq!(
        answer(master.get(&format!("/task/{b1}"), ALICE)).await.0,
        404
    );
    assert_eq!(answer(master.get(&format!("/task/{a1}"), BOB)).await.0, 404);
    assert_eq!(
        answer(master.get("/task/no-such-task", OPERATOR)).await.0,
        404
    );
    assert_eq!(answer(master.get("/task/bad%20id", OPERATOR)).await.0, 404);
    let events = format!("/task/{b1}/events");
    assert!(
        EventStream::open(master.get(&events, OPERATOR))
            .await
            .is_ok(),
        "an operator follows any task"
    );
    match EventStream::open(master.get(&events, ALICE)).await {
        Ok(_) => panic!("alice followed bob's task"),
        Err((status, _)) => assert_eq!(status, 404),
    }
    master.stop().await;
}

#[tokio::test]
async fn dead_letters_are_listed_purged_and_then_not_redriven() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let master = TestMaster::start(test_config(&settings)).await;
    let _failing = TestWorker::start(
        "failing",
        &["evaluate"],
        4,
        Behavior::Fail { retryable: false },
        &settings,
        &master.url,
    )
    .await;
    let t1 = master
        .submit(json!({"steps": ["evaluate"], "input": 1}))
        .await;
    let v1 = master.wait(&t1, Duration::from_secs(20)).await;
    let t2 = submit_as(&master, BOB, json!({"steps": ["evaluate"], "input": 2})).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while master.queue("evaluate").await["dead_lettered"] != 2 {
        assert!(tokio::time::Instant::now() < deadline, "t2 never failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(v1.status, TaskStatus::Failed);

    let (status, page) = answer(master.get("/deadletters", OPERATOR)).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page, "dead_letters"), owned(&[&t2, &t1]));
    let row = &page["dead_letters"][1];
    assert_eq!(row["capability"], "evaluate");
    assert_eq!(row["client"], "alice");
    assert_eq!(row["step"].as_str(), Some(v1.steps[0].id.as_str()));
    assert_eq!(
        row["error"].as_str(),
        v1.error.as_ref().map(|e| e.message.as_str())
    );
    assert_eq!(row["failed_at"].as_u64(), v1.finished_at_ms);
    assert_eq!(page["dead_letters"][0]["client"], "bob");

    // Paged, and per capability.
    let (_, first) = answer(master.get("/deadletters?limit=1&capability=evaluate", OPERATOR)).await;
    assert_eq!(ids(&first, "dead_letters"), owned(&[&t2]));
    let next = first["next"].as_str().unwrap();
    let (_, second) =
        answer(master.get(&format!("/deadletters?limit=1&cursor={next}"), OPERATOR)).await;
    assert_eq!(ids(&second, "dead_letters"), owned(&[&t1]));
    assert_eq!(second["next"], Value::Null);
    let (_, none) = answer(master.get("/deadletters?capability=plan", OPERATOR)).await;
    assert_eq!(ids(&none, "dead_letters"), Vec::<String>::new());
    for bad in [
        "capability=Not%20one",
        "capability=x%3Ay",
        "limit=0",
        "limit=100000",
        "cursor=1.t1",
        "cursor=1.t1.UPPER",
        "cursor=99999999999999.t.plan",
        "task_id=x",
    ] {
        let (status, body) = answer(master.get(&format!("/deadletters?{bad}"), OPERATOR)).await;
        assert_eq!(status, 422, "{bad}: {body}");
    }

    // Purging another capability's entry, a malformed id or capability, takes nothing.
    for (path, want) in [
        (format!("/deadletters/plan?task_id={t1}"), 200),
        ("/deadletters/nothing-here".to_string(), 200),
        ("/deadletters/evaluate?task_id=bad%20id".to_string(), 422),
        ("/deadletters/Evaluate".to_string(), 422),
        ("/deadletters/evaluate?everything=1".to_string(), 422),
    ] {
        let (status, body) = answer(delete(&master, &path, OPERATOR)).await;
        assert_eq!(status, want, "{path}: {body}");
        if status == 200 {
            assert_eq!(body["purged"], 0, "{path}");
        }
    }
    assert_eq!(master.queue("evaluate").await["dead_lettered"], 2);

    // One purged: out of the list, still failed, and not redriven by id or capability.
    let (status, body) = answer(delete(
        &master,
        &format!("/deadletters/evaluate?task_id={t1}"),
        OPERATOR,
    ))
    .await;
    assert_eq!((status, body["purged"].as_u64()), (200, Some(1)));
    assert_eq!(master.queue("evaluate").await["dead_lettered"], 1);
    let (status, body) = answer(
        master
            .post("/dispatch", OPERATOR)
            .json(&json!({"task_id": t1})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("purged")
    );
    assert_eq!(master.view(&t1).await.status, TaskStatus::Failed);

    // The whole capability purged: its count is 0 and a redrive of it finds nothing.
    let (status, body) = answer(delete(&master, "/deadletters/evaluate", OPERATOR)).await;
    assert_eq!((status, body["purged"].as_u64()), (200, Some(1)));
    assert_eq!(master.queue("evaluate").await["dead_lettered"], 0);
    let (status, body) = answer(
        master
            .post("/dispatch", OPERATOR)
            .json(&json!({"capability": "evaluate"})),
    )
    .await;
    assert_eq!((status, body["redriven"].clone()), (200, json!([])));
    let (status, _) = answer(
        master
            .post("/dispatch", OPERATOR)
            .json(&json!({"task_id": t2})),
    )
    .await;
    assert_eq!(status, 409);
    let (_, page) = answer(master.get("/deadletters", OPERATOR)).await;
    assert_eq!(page["dead_letters"], json!([]));
    master.stop().await;
}

//! `POST /tasks`, the batch submit: each task of `{"tasks": [...]}` is submitted as
//! `POST /task` of it alone would be, and answered with what that would have answered; a
//! batch that is not one, or not allowed, submits nothing.

use std::time::Duration;

use common::wire::TaskStatus;
use serde_json::{Value, json};
use testkit::RedisServer;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(20);

/// `POST /tasks` with `body` as JSON, as `token` (none: no credentials).
async fn post_batch(master: &TestMaster, token: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = master.http.post(format!("{}/tasks", master.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.json(body).send().await.unwrap()
}

/// `POST /tasks` as alice, which must answer `200`: its entries.
async fn batch_entries(master: &TestMaster, tasks: Vec<Value>) -> Vec<Value> {
    let r = post_batch(master, Some(ALICE), &json!({ "tasks": tasks })).await;
    let status = r.status();
    let answer: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{answer}");
    let entries = answer["tasks"].as_array().unwrap().clone();
    assert_eq!(entries.len(), tasks.len(), "one entry per task: {answer}");
    entries
}

/// `POST /task` of `body` alone, as alice: its status and JSON body.
async fn alone(master: &TestMaster, body: &Value) -> (u16, Value) {
    let r = master.post("/task", ALICE).json(body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Alice's tasks, as the operator search sees them.
async fn alices_tasks(master: &TestMaster) -> usize {
    let page = master.operator_json("/tasks?client=alice&limit=500").await;
    page["tasks"].as_array().unwrap().len()
}

/// A JSON value nesting arrays `depth` levels deep.
fn nested(depth: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..depth {
        value = json!([value]);
    }
    value
}

#[tokio::test]
async fn each_task_of_a_batch_is_stored_with_its_own_input_and_runs() {
    let redis = RedisServer::start();
    let (master, _workers) = spawn_app(&redis).await;
    let tasks: Vec<Value> = (0..5)
        .map(|i| json!({"steps": ["plan", "finalize"], "input": {"i": i}}))
        .collect();
    let entries = batch_entries(&master, tasks).await;
    let mut ids = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(entry["status"], 202, "{entry}");
        assert_eq!(entry["task_status"], "queued", "{entry}");
        assert!(entry.get("error").is_none(), "{entry}");
        let id = entry["task_id"].as_str().unwrap().to_string();
        assert_eq!(master.view(&id).await.input, json!({ "i": i }));
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "five distinct tasks");
    for id in &ids {
        let view = master.wait(id, WAIT).await;
        assert_eq!(view.status, TaskStatus::Succeeded, "{view:?}");
    }
    master.stop().await;
}

#[tokio::test]
async fn each_task_of_a_mixed_batch_gets_the_answer_post_task_would_give_it() {
    let redis = RedisServer::start();
    let settings = redis.settings();
    let mut config = test_config(&settings);
    // Small, so that one task of a batch can be over it: the batch may be 8 times that.
    config.body_limit_bytes = 16 * 1024;
    let master = TestMaster::start(config).await;
    let _worker = TestWorker::start(
        "w-plan",
        &["plan"],
        4,
        Behavior::Succeed {
            delay: Duration::from_millis(5),
        },
        &settings,
        &master.url,
    )
    .await;
    let keyed = json!({"steps": ["plan"], "input": {"keyed": true}, "idempotency_key": "k-1"});
    let elements = vec![
        json!({"steps": ["plan"], "input": {"n": 1}}),
        json!({"pipeline": "default", "priority": 1000}),
        json!({"steps": ["nonesuch"]}),
        // Deeper than an input may be, within what JSON parsing allows: `422`.
        json!({"steps": ["plan"], "input": nested(100)}),
        // Deeper than the JSON parser goes: `400`, as for the same body alone.
        json!({"steps": ["plan"], "input": nested(200)}),
        keyed.clone(),
        keyed.clone(),
        json!({"steps": ["plan"], "callback_url": "http://127.0.0.1:9/hook"}),
        json!(42),
        json!({"pipeline": "default", "colour": "blue"}),
        json!({"steps": ["plan"], "input": "x".repeat(20 * 1024)}),
        json!({"steps": ["plan"], "input": {"n": 2}}),
        // Numeric extremes: a priority past i32, a negative budget.
        json!({"steps": ["plan"], "priority": 99_999_999_999_999_u64}),
        json!({"steps": ["plan"], "budget": {"max_cost_usd": -1.0}}),
    ];
    let entries = batch_entries(&master, elements.clone()).await;
    let statuses: Vec<u64> = entries
        .iter()
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses,
        vec![
            202, 422, 422, 422, 400, 202, 200, 422, 422, 422, 413, 202, 422, 422
        ],
        "{entries:#?}"
    );
    // The repeat of the key names the first task, as two single submits would.
    assert_eq!(entries[6]["task_id"], entries[5]["task_id"]);
    let keyed_id = entries[5]["task_id"].as_str().unwrap();
    // And the key is the same one `POST /task` knows: sent alone, it names that task too.
    let (status, body) = alone(&master, &keyed).await;
    assert_eq!((status, body["task_id"].as_str()), (200, Some(keyed_id)));

    // Every refusal is word for word that of the same body sent alone.
    for (i, entry) in entries.iter().enumerate() {
        if matches!(i, 5 | 6) {
            continue;
        }
        let (status, body) = alone(&master, &elements[i]).await;
        assert_eq!(entry["status"], status, "task {i}: {entry} vs {body}");
        if status >= 400 {
            assert_eq!(entry["error"], body["error"], "task {i}");
            assert!(entry.get("task_id").is_none(), "task {i}: {entry}");
        }
    }
    assert!(
        entries[4]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("recursion limit"),
        "{}",
        entries[4]
    );
    assert_eq!(entries[10]["error"]["code"], "payload_too_large");

    // The accepted ones are stored, each with its own input, and run.
    for (i, input) in [
        (0, json!({"n": 1})),
        (5, json!({"keyed": true})),
        (11, json!({"n": 2})),
    ] {
        let id = entries[i]["task_id"].as_str().unwrap();
        let view = master.wait(id, WAIT).await;
        assert_eq!(view.input, input, "task {i}");
        assert_eq!(view.status, TaskStatus::Succeeded, "task {i}: {view:?}");
    }
    master.stop().await;
}

#[tokio::test]
async fn a_batch_that_is_not_one_or_not_allowed_is_refused_whole_and_submits_nothing() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.settings());
    config.body_limit_bytes = 4096;
    let master = TestMaster::start(config).await;
    let task = json!({"pipeline": "default"});

    for token in [None, Some("wrong"), Some(OPERATOR), Some(WORKER_TOKEN)] {
        let r = post_batch(&master, token, &json!({ "tasks": [task] })).await;
        let mut single = master.http.post(format!("{}/task", master.url));
        if let Some(token) = token {
            single = single.bearer_auth(token);
        }
        let single = single.json(&task).send().await.unwrap();
        assert_eq!(r.status(), 401, "token {token:?}");
        assert_eq!(single.status(), 401, "as `POST /task` with token {token:?}");
    }
    let too_many: Vec<Value> = (0..101).map(|_| task.clone()).collect();
    for (body, says) in [
        (json!({"tasks": []}), "no task"),
        (json!({ "tasks": too_many }), "at most 100"),
        (json!({"tasks": task}), "an array"),
        (json!({"tasks": "text"}), "an array"),
        (json!([task]), "an array"),
        (json!({}), "missing field `tasks`"),
        (json!({"tasks": [task], "more": 1}), "unknown field `more`"),
        (json!("text"), "SubmitBatch"),
    ] {
        let r = post_batch(&master, Some(ALICE), &body).await;
        assert_eq!(r.status(), 422, "{body}");
        let error: Value = r.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid", "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    let raw = |body: String| {
        master
            .post("/tasks", ALICE)
            .header("content-type", "application/json")
            .body(body)
    };
    let r = raw(r#"{"tasks": [{"pipeline": "default"}, "#.into())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_json", "{error}");
    // Over 8 × BODY_LIMIT_BYTES (32 KiB here), though each task is small.
    let over: Vec<Value> = (0..100)
        .map(|i| json!({"pipeline": "default", "input": format!("{i}{}", "x".repeat(400))}))
        .collect();
    let over = json!({ "tasks": over }).to_string();
    assert!(over.len() > 8 * 4096);
    let r = raw(over).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "payload_too_large", "{error}");
    // In a batch, each task gives its own key: a header for all of them is refused.
    let r = master
        .post("/tasks", ALICE)
        .header("idempotency-key", "k-1")
        .json(&json!({ "tasks": [task] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "bad_request", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key"),
        "{error}"
    );

    assert_eq!(
        alices_tasks(&master).await,
        0,
        "a refused batch submits nothing"
    );
    // Just under the limits, the same endpoint takes the batch.
    let at_most: Vec<Value> = (0..100).map(|i| json!({"input": i})).collect();
    let entries = batch_entries(&master, at_most).await;
    assert!(entries.iter().all(|e| e["status"] == 202), "{entries:?}");
    assert_eq!(alices_tasks(&master).await, 100);
    master.stop().await;
}

#[tokio::test]
async fn the_tasks_of_a_batch_belong_to_the_client_that_sent_it() {
    let redis = RedisServer::start();
    let master = TestMaster::start(test_config(&redis.settings())).await;
    let entries = batch_entries(
        &master,
        vec![
            json!({"input": "a"}),
            json!({"input": "b", "idempotency_key": "shared"}),
        ],
    )
    .await;
    for entry in &entries {
        let id = entry["task_id"].as_str().unwrap();
        let path = format!("/task/{id}");
        let r = master.get(&path, BOB).send().await.unwrap();
        assert_eq!(r.status(), 404, "bob sees alice's task {id}");
        let r = master.get(&path, ALICE).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    // Keys are per client: bob's `shared` is his own task, not alice's.
    let r = master
        .post("/task", BOB)
        .json(&json!({"input": "b", "idempotency_key": "shared"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let bobs: Value = r.json().await.unwrap();
    assert_ne!(bobs["task_id"], entries[1]["task_id"]);
    master.stop().await;
}

#[tokio::test]
async fn the_rate_limit_counts_each_task_of_a_batch() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.settings());
    // A burst of 3, and no refill to speak of within the test.
    config.rate_limit_per_sec = 0.01;
    config.rate_limit_burst = 3;
    let master = TestMaster::start(config).await;
    let tasks: Vec<Value> = (0..6).map(|i| json!({"input": i})).collect();
    let entries = batch_entries(&master, tasks).await;
    let statuses: Vec<u64> = entries
        .iter()
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![202, 202, 202, 429, 429, 429], "{entries:#?}");
    for entry in &entries[3..] {
        assert_eq!(entry["error"]["code"], "rate_limited", "{entry}");
        assert!(entry["retry_after"].as_u64().unwrap() >= 1, "{entry}");
    }
    assert_eq!(alices_tasks(&master).await, 3);
    // The batch spent the bucket: a single submit is limited too, and bob is not.
    let (status, _) = alone(&master, &json!({"input": "one more"})).await;
    assert_eq!(status, 429);
    let r = post_batch(&master, Some(BOB), &json!({"tasks": [{"input": 1}]})).await;
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["tasks"][0]["status"], 202, "{answer}");
    master.stop().await;
}

#[tokio::test]
async fn a_full_store_refuses_the_whole_batch_only_when_none_of_it_was_accepted() {
    let redis = RedisServer::with_args(&["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]);
    let master = TestMaster::start(test_config(&redis.settings())).await;
    // No worker: accepted tasks stay queued, so nothing frees memory. 100 × 32 KiB is more
    // than 3 MB holds.
    let pad = "x".repeat(32 * 1024);
    let mut tasks: Vec<Value> = (0..99)
        .map(|i| json!({"steps": ["plan"], "input": {"i": i, "pad": pad}}))
        .collect();
    tasks.push(json!({"steps": ["plan"], "priority": 1000}));
    let entries = batch_entries(&master, tasks).await;
    let accepted = entries.iter().take_while(|e| e["status"] == 202).count();
    assert!(accepted > 10, "only {accepted} accepted: {:?}", entries[0]);
    assert!(accepted < 99, "3 MB held the whole batch");
    // Once one was accepted, a full store is the answer of each task it refuses, and the
    // rest are still tried: each is answered on its own (memory a client buffer frees
    // meanwhile may let a later one in), and the last one is refused for its own fault.
    for entry in &entries[accepted..99] {
        match entry["status"].as_u64() {
            Some(202) => {}
            Some(507) => assert_eq!(entry["error"]["code"], "storage_full", "{entry}"),
            _ => panic!("a task of a batch on a full store got {entry}"),
        }
    }
    assert_eq!(entries[accepted]["status"], 507, "{}", entries[accepted]);
    assert_eq!(entries[99]["status"], 422, "{}", entries[99]);
    for (i, entry) in entries[..99].iter().enumerate() {
        if entry["status"] == 202 {
            let view = master.view(entry["task_id"].as_str().unwrap()).await;
            assert_eq!(view.input["i"], i, "{view:?}");
        }
    }

    // Before any task is accepted, it is the whole request's answer. (A bigger task than
    // those above, so that no memory freed since, such as a client buffer, can fit it.)
    let pad = "x".repeat(512 * 1024);
    let r = post_batch(
        &master,
        Some(ALICE),
        &json!({"tasks": [{"steps": ["plan"], "input": pad}, {"input": 2}]}),
    )
    .await;
    assert_eq!(r.status(), 507);
    master.stop().await;
}

#[tokio::test]
async fn an_unreachable_store_answers_the_whole_batch_503() {
    let mut redis = RedisServer::start();
    let master = TestMaster::start(test_config(&redis.settings())).await;
    redis.stop();
    let r = post_batch(
        &master,
        Some(ALICE),
        &json!({"tasks": [{"input": 1}, {"input": 2}]}),
    )
    .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "unavailable", "{error}");
    master.stop().await;
}

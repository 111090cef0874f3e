//! Graphs under chaos (`docs/workflows.md`): a worker `kill -9`ed in the middle of a
//! 100-wide fan-out (every instance ends with one recorded output, the join runs once),
//! and Redis restarted (AOF) while tasks wait on signals (the waits, and signals buffered
//! before the restart, still release them).

use std::time::{Duration, Instant};

use common::wire::{StepStatus, StepView, TaskStatus, TaskView};
use serde_json::{Value, json};
use testkit::fakes::worker::{Behavior, FakeWorker};

use crate::helpers::{
    API_KEY, Accepted, Client, Cluster, Options, Tally, context, report_line, scaled, serial,
    settle, task_input,
};

/// Elements of each fan-out.
const WIDTH: usize = 100;

/// The declared step `id` of a view.
fn step<'a>(view: &'a TaskView, id: &str) -> Option<&'a StepView> {
    view.steps.iter().find(|s| s.id == id)
}

/// `POST /task` of inline `steps`; the task id (retried on `503`/no answer for 30 s).
async fn submit_graph(client: &Client, steps: &Value, input: &Value) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sent = client
            .http
            .post(format!("{}/task", client.base))
            .bearer_auth(API_KEY)
            .json(&json!({"steps": steps, "input": input}))
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 202 => {
                let body: Value = r.json().await.unwrap();
                return body["task_id"].as_str().unwrap().to_string();
            }
            Ok(r) if r.status().is_client_error() && r.status() != 429 => {
                let status = r.status();
                panic!("POST /task answered {status}: {}", r.text().await.unwrap())
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "POST /task kept failing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (bounded) until the task has finished; its view.
async fn finished(client: &Client, id: &str, within: Duration) -> Option<TaskView> {
    let deadline = Instant::now() + within;
    loop {
        let view = client.view(id).await;
        if let Some(v) = view.filter(|v| v.status.is_terminal()) {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_a_worker_mid_fan_out_records_each_instance_once_and_joins_once() {
    let _serial = serial().await;
    let mut cluster = Cluster::start(Options::default()).await;
    let mut settings = cluster.redis.settings();
    settings.key_prefix = cluster.prefix.clone();
    // The join runs on a worker of its own, which counts what it ran.
    let joiner = FakeWorker::start(
        "joiner",
        &["join"],
        4,
        Behavior::Succeed {
            delay: Duration::ZERO,
        },
        &settings,
        &cluster.lb.url(),
    )
    .await;
    let done = cluster.done_events().await;
    let client = cluster.client();
    let steps = json!([
        {"id": "fan", "capability": "echo", "needs": [],
         "map": {"over": "input.items", "concurrency": WIDTH}},
        {"id": "join", "capability": "join", "needs": ["fan"]},
    ]);
    let mut tasks = Vec::new();
    for t in 0..scaled(1) {
        // Each element unique (a nonce), slow enough for a kill to catch some mid-step.
        let items: Vec<Value> = (0..WIDTH)
            .map(|i| task_input(t * WIDTH + i, 300 + (i as u64 * 37) % 500))
            .collect();
        let input = json!({"items": items});
        let id = submit_graph(&client, &steps, &input).await;
        tasks.push(Accepted { task_id: id, input });
    }

    // Kill -9 the worker holding the most of the fan-out's steps, once it holds several.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (victim, held) = loop {
        let records = cluster.live_workers().await;
        let busiest = (0..cluster.system.workers.len())
            .map(|i| {
                let name = cluster.system.workers[i].name();
                let held = records
                    .iter()
                    .find(|r| r.id.as_str() == name)
                    .map_or(0, |r| {
                        r.in_flight
                            .iter()
                            .filter(|s| tasks.iter().any(|t| t.task_id == s.task_id.as_str()))
                            .count()
                    });
                (i, held)
            })
            .max_by_key(|(_, held)| *held);
        if let Some((i, held)) = busiest
            && held >= 3
        {
            break (i, held);
        }
        assert!(
            Instant::now() < deadline,
            "no worker ever held the fan-out's steps\n{}",
            cluster.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let victim_name = cluster.system.workers[victim].name().to_string();
    cluster.kill_and_replace_worker(victim).await;

    let mut tally = Tally {
        accepted: tasks.len(),
        ..Tally::default()
    };
    let mut problems = Vec::new();
    let mut joins = 0;
    for task in &tasks {
        let Some(view) = finished(&client, &task.task_id, Duration::from_secs(90)).await else {
            tally.lost += 1;
            problems.push(format!("lost: {}", task.task_id));
            continue;
        };
        match view.status {
            TaskStatus::Succeeded => tally.succeeded += 1,
            _ => {
                tally.failed += 1;
                problems.push(format!(
                    "{} ended {:?}: {:?}",
                    task.task_id, view.status, view.error
                ));
            }
        }
        let items = task.input["items"].as_array().unwrap();
        let fan = step(&view, "fan").expect("the fan step");
        tally.reexecuted += fan
            .instances
            .iter()
            .map(|s| u64::from(s.attempts.saturating_sub(1)))
            .sum::<u64>();
        let mut wrong = Vec::new();
        if fan.instances.len() != WIDTH {
            wrong.push(format!("{} instances", fan.instances.len()));
        }
        for (i, instance) in fan.instances.iter().enumerate() {
            if instance.status != StepStatus::Succeeded
                || instance.output.as_ref() != items.get(i)
                || instance.element_index != Some(i as u32)
            {
                wrong.push(format!(
                    "instance {i}: {:?} {:?} {:?}",
                    instance.status, instance.element_index, instance.output
                ));
            }
        }
        let map = fan.map.as_ref().expect("a map view");
        if map.total != Some(WIDTH as u32) || map.finished != WIDTH as u32 {
            wrong.push(format!(
                "the map counts {:?} instances, {} finished",
                map.total, map.finished
            ));
        }
        if fan.output.as_ref() != Some(&task.input["items"]) {
            wrong.push("the fan's output is not its elements in order".into());
        }
        let ran = joiner
            .received()
            .iter()
            .filter(|s| s.task_id.as_str() == task.task_id)
            .count();
        joins += ran;
        if ran != 1 {
            wrong.push(format!("the join ran {ran} times"));
        }
        let join = step(&view, "join").and_then(|s| s.output.clone());
        if join.as_ref().map(|o| &o["input"]) != Some(&task.input["items"]) {
            wrong.push(format!("the join received {join:?}"));
        }
        if done.count(&task.task_id) != 1 {
            wrong.push(format!(
                "finished {} times in the record",
                done.count(&task.task_id)
            ));
        }
        if !wrong.is_empty() {
            tally.duplicates += 1;
            problems.push(format!("{}: {wrong:#?}", task.task_id));
        }
    }
    let name = "fanout-kill-9-worker";
    let ctx = context(&problems, &cluster);
    tally.report(name, &ctx);
    report_line(&format!(
        "fanout {name}: {} task(s) × {WIDTH} instances, {} outputs recorded once each, join ran {joins} time(s) for {} task(s); kill -9 of {victim_name} holding {held} steps, {} instance attempts re-run",
        tasks.len(),
        tasks.len() * WIDTH,
        tasks.len(),
        tally.reexecuted
    ));
    assert_eq!(tally.succeeded, tasks.len(), "{ctx}");
    assert!(
        tally.reexecuted > 0,
        "the killed worker's steps must have run again\n{ctx}"
    );
}

/// A wait for signal `go`, then an echo of its payload. `first`: an echo step before the
/// wait (slow, by its input's `echo_delay_ms`), so that a signal sent at once arrives
/// before the wait is reached.
fn wait_graph(first: bool) -> Value {
    match first {
        false => json!([
            {"id": "approve", "needs": [], "wait": {"signal": "go", "timeout_ms": 600_000}},
            {"id": "after", "capability": "echo", "needs": ["approve"]},
        ]),
        true => json!([
            {"id": "first", "capability": "echo", "needs": []},
            {"id": "approve", "needs": ["first"],
             "wait": {"signal": "go", "timeout_ms": 600_000}},
            {"id": "after", "capability": "echo", "needs": ["approve"]},
        ]),
    }
}

/// The payload task `input` is signalled with: its own nonce, so a result can only be its
/// own.
fn payload(input: &Value) -> Value {
    json!({"approved": input["nonce"]})
}

/// A task of [`wait_graph`] that succeeded is right when its result and its wait's output
/// are its own payload (one that did not is counted as failed).
fn released_by_its_signal(task: &Accepted, view: &TaskView) -> Result<(), String> {
    if view.status != TaskStatus::Succeeded {
        return Ok(());
    }
    let want = payload(&task.input);
    if view.result.as_ref() != Some(&want) {
        return Err(format!("result {:?}, not {want}", view.result));
    }
    let approve = step(view, "approve").and_then(|s| s.output.as_ref());
    if approve != Some(&want) {
        return Err(format!("the wait's output is {approve:?}"));
    }
    Ok(())
}

/// `POST /task/{id}/signal` through the load balancer, again while the masters answer
/// `503` or not at all (Redis coming back), for up to 30 s: the status and body.
async fn send_signal(client: &Client, id: &str, body: &Value) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sent = client
            .http
            .post(format!("{}/task/{id}/signal", client.base))
            .bearer_auth(API_KEY)
            .json(body)
            .send()
            .await;
        match sent {
            Ok(r) if !r.status().is_server_error() => {
                let status = r.status().as_u16();
                return (status, r.json().await.unwrap_or_default());
            }
            _ if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("POST /task/{id}/signal kept failing: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_while_tasks_wait_on_signals_loses_no_wait() {
    let _serial = serial().await;
    let mut cluster = Cluster::start(Options {
        workers: 2,
        ..Options::default()
    })
    .await;
    let done = cluster.done_events().await;
    let client = cluster.client();
    let waiting = scaled(6);
    let buffered = scaled(2);
    let mut tasks = Vec::new();
    for i in 0..waiting {
        let input = task_input(i, 0);
        let id = submit_graph(&client, &wait_graph(false), &input).await;
        tasks.push(Accepted { task_id: id, input });
    }
    // Signalled at once, while `first` (4 s) runs: kept until their wait is reached, which
    // is after Redis has come back.
    for i in 0..buffered {
        let input = task_input(waiting + i, 4_000);
        let id = submit_graph(&client, &wait_graph(true), &input).await;
        let (status, body) = send_signal(
            &client,
            &id,
            &json!({"name": "go", "payload": payload(&input)}),
        )
        .await;
        assert_eq!(
            (status, &body),
            (202, &json!({"status": "buffered"})),
            "task {id}"
        );
        tasks.push(Accepted { task_id: id, input });
    }
    for t in &tasks[..waiting] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let view = client.view(&t.task_id).await.expect("the task");
            if view.status == TaskStatus::Waiting {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "task {} never waited: {view:#?}",
                t.task_id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // kill -9, a second down, then the same port and data directory (AOF, fsync always).
    cluster.redis.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| cluster.redis.restart());
    assert!(cluster.redis.is_running());

    let mut delivered = 0;
    for t in &tasks[..waiting] {
        let (status, body) = send_signal(
            &client,
            &t.task_id,
            &json!({"name": "go", "payload": payload(&t.input)}),
        )
        .await;
        assert_eq!(
            (status, &body),
            (202, &json!({"status": "delivered"})),
            "task {} after the restart\n{}",
            t.task_id,
            cluster.logs_tail()
        );
        delivered += 1;
    }
    let (tally, problems) = settle(
        &client,
        &tasks,
        &done,
        Duration::from_secs(60),
        released_by_its_signal,
    )
    .await;
    let name = "redis-restart-while-waiting";
    let ctx = context(&problems, &cluster);
    tally.report(name, &ctx);
    report_line(&format!(
        "waits {name}: {waiting} tasks waiting and {buffered} with a buffered signal across a Redis kill -9 and restart; {delivered} signals delivered after it, {} of {} released by their own signal",
        tally.succeeded,
        tasks.len()
    ));
    assert_eq!(tally.succeeded, tasks.len(), "{ctx}");
}

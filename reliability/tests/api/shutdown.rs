//! SIGTERM under load: a worker drains (finishes and reports what it holds, exits 0), a
//! master answers the HTTP requests it is serving and exits 0; nothing is lost.

use std::time::{Duration, Instant};

use common::wire::StepRef;
use serde_json::Value;
use testkit::Exit;

use crate::helpers::{
    API_KEY, Accepted, Cluster, Options, Survivors, conclude, scaled, serial, task_input,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_a_worker_mid_step_drains_and_exits_0() {
    let _serial = serial().await;
    let mut cluster = Cluster::start(Options {
        workers: 2,
        worker_slots: 8,
        ..Options::default()
    })
    .await;
    let done = cluster.done_events().await;
    let client = cluster.client();
    let n = scaled(100);
    let inputs: Vec<_> = (0..n)
        .map(|i| task_input(i, 200 + (i as u64 * 71) % 600))
        .collect();
    let accepted = client
        .submit_all("chaos", inputs, 16, Duration::from_secs(30))
        .await;

    // SIGTERM worker-0 while its heartbeat lists steps in flight.
    let name = cluster.system.workers[0].name().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let held: Vec<StepRef> = loop {
        let held = cluster
            .live_workers()
            .await
            .into_iter()
            .find(|r| r.id.as_str() == name)
            .map(|r| r.in_flight)
            .unwrap_or_default();
        if held.len() >= 3 {
            break held;
        }
        assert!(Instant::now() < deadline, "{name} never held 3 steps");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cluster.system.workers[0].signal("TERM").expect("SIGTERM");
    let status = cluster.system.workers[0]
        .wait_exit(Duration::from_secs(25))
        .await;
    assert!(
        status == Some(Exit::Clean),
        "{name} after SIGTERM: {status:?}; log:\n{}",
        cluster.system.workers[0].log()
    );

    let (_, ctx) = conclude(
        (&cluster, &done),
        &accepted,
        n,
        (Duration::from_secs(60), Survivors::ALL),
        "sigterm-worker",
    )
    .await;
    // What it held when the signal came, it finished and reported itself: the step ended on
    // this worker, which has exited (a step run again would have ended on the other one).
    // `attempts` counts attempts spent, not the attempt number: a step refused by a full
    // worker (429) gets a new attempt number at no cost, so the two differ under load.
    let mut rerun = Vec::new();
    for s in &held {
        let view = client.view(s.task_id.as_str()).await.expect("held task");
        let step = &view.steps[s.step as usize];
        if step.status != common::wire::StepStatus::Succeeded
            || step.worker_id.as_ref().map(|w| w.as_str()) != Some(&name)
        {
            rerun.push(format!("held step {s:?} ended as {step:?}"));
        }
    }
    assert!(
        rerun.is_empty(),
        "of the {} steps the draining worker held, these ran again: {rerun:#?}\n{ctx}",
        held.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_a_master_answers_in_flight_http_and_exits_0() {
    let _serial = serial().await;
    let mut cluster = Cluster::start(Options {
        workers: 2,
        ..Options::default()
    })
    .await;
    let done = cluster.done_events().await;
    let client = cluster.client();
    let n = scaled(300);
    let inputs: Vec<_> = (0..n)
        .map(|i| task_input(i, 100 + (i as u64 * 37) % 500))
        .collect();
    let submitter = client.spawn_submit_all("chaos", inputs, 16);
    done.wait_finished(n / 5, Duration::from_secs(60)).await;

    // Slow tasks on master-0, and its clients long-polling master-0 for them.
    let direct = cluster.client_of(&cluster.system.masters[0]);
    let slow: Vec<Value> = (0..10).map(|i| task_input(n + i, 3_000)).collect();
    let slow = direct
        .submit_all("chaos", slow, 10, Duration::from_secs(10))
        .await;
    assert_eq!(slow.len(), 10);
    let polls: Vec<_> = slow
        .iter()
        .map(|t| {
            let url = format!("{}/result/{}?wait=30", direct.base, t.task_id);
            let http = direct.http.clone();
            tokio::spawn(async move {
                let sent = http.get(url).bearer_auth(API_KEY).send().await;
                sent.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A burst of submissions to master-0 racing the signal, on fresh connections.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let burst_inputs: Vec<Value> = (0..40).map(|i| task_input(n + 10 + i, 50)).collect();
    // Spread over 200 ms, with the signal sent 50 ms in: some are served before, some
    // during the drain, some find the listener closed.
    let burst: Vec<_> = burst_inputs
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, input)| {
            let (fresh, url) = (fresh.clone(), format!("{}/task", direct.base));
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(5 * i as u64)).await;
                let key = input["nonce"].as_str().unwrap().to_string();
                let sent = fresh
                    .post(url)
                    .bearer_auth(API_KEY)
                    .header("idempotency-key", key)
                    .json(&serde_json::json!({"pipeline": "chaos", "input": input}))
                    .send()
                    .await;
                match sent {
                    Ok(r) => Ok(r.status().as_u16()),
                    Err(e) if e.is_connect() => Err(None),
                    Err(e) => Err(Some(format!("{e:?}"))),
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    cluster.system.masters[0].signal("TERM").expect("SIGTERM");

    for p in polls {
        let answer = p.await.unwrap();
        assert!(
            matches!(answer, Ok(200 | 202)),
            "a long poll in flight at SIGTERM got {answer:?}"
        );
    }
    // A connection the kernel accepted just as the listener closed, before the server
    // read a request from it, is reset: the client sees "dropped after connect" and sends
    // again (below). Requests the server was serving are all answered.
    let (mut answered, mut refused, mut dropped) = (0, 0, Vec::new());
    for b in burst {
        match b.await.unwrap() {
            Ok(_) => answered += 1,
            Err(None) => refused += 1,
            Err(Some(e)) => dropped.push(e),
        }
    }
    eprintln!(
        "sigterm-master: burst of 40 to master-0: {answered} answered, {refused} refused at connect, {} dropped after connect {dropped:?}",
        dropped.len()
    );
    let status = cluster.system.masters[0]
        .wait_exit(Duration::from_secs(25))
        .await;
    assert!(
        status == Some(Exit::Clean),
        "master-0 after SIGTERM: {status:?}; log:\n{}",
        cluster.system.masters[0].log()
    );

    // Whatever the burst did not get an answer for, the client sends again through the
    // load balancer with the same idempotency key: one task per key either way.
    let mut accepted: Vec<Accepted> = submitter.await.unwrap();
    accepted.extend(slow);
    accepted.extend(
        client
            .submit_all("chaos", burst_inputs, 8, Duration::from_secs(30))
            .await,
    );
    // No counter check: master-0's counter left with it.
    conclude(
        (&cluster, &done),
        &accepted,
        n + 50,
        (Duration::from_secs(60), Survivors::NOT_A_MASTER),
        "sigterm-master",
    )
    .await;
}

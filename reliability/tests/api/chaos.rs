//! Processes and Redis dying under load: `kill -9` of workers and of a master replica,
//! a Redis restart (AOF), and Redis unreachable (black-holed) for ten seconds.

use std::time::{Duration, Instant};

use common::wire::TaskStatus;

use crate::helpers::{
    API_KEY, Accepted, Client, Cluster, Options, REDIS_TIMEOUT_MS, Submit, Survivors, Via,
    conclude, scaled, serial, soak, task_input,
};

/// Echo delays from 20 to 200 ms, spread by the task's index.
fn short_delay(i: usize) -> u64 {
    20 + (i as u64 * 37) % 180
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_workers_mid_step_while_2000_tasks_run() {
    let _serial = serial().await;
    let mut cluster = Cluster::start(Options::default()).await;
    let done = cluster.done_events().await;
    let client = cluster.client();
    let inputs = (0..scaled(2_000))
        .map(|i| task_input(i, short_delay(i)))
        .collect();
    let submitter = client.spawn_submit_all("chaos", inputs, 32);

    // Kill the busiest worker every 1.2 s and start a replacement (a new id, like a new
    // ECS task), while tasks keep flowing.
    let kills = if soak() { 40 } else { 8 };
    let mut mid_step = 0;
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let records = cluster.live_workers().await;
        let busiest = (0..cluster.system.workers.len())
            .max_by_key(|&i| {
                records
                    .iter()
                    .find(|r| r.id.as_str() == cluster.system.workers[i].name())
                    .map_or(0, |r| r.in_flight.len())
            })
            .unwrap_or(0);
        let held = records
            .iter()
            .find(|r| r.id.as_str() == cluster.system.workers[busiest].name())
            .map_or(0, |r| r.in_flight.len());
        if held > 0 {
            mid_step += 1;
        }
        cluster.kill_and_replace_worker(busiest).await;
    }
    let accepted = submitter.await.unwrap();
    let (tally, _) = conclude(
        (&cluster, &done),
        &accepted,
        scaled(2_000),
        (Duration::from_secs(120), Survivors::ALL),
        "kill-9-workers",
    )
    .await;
    assert!(mid_step > 0, "no kill caught a worker mid-step");
    assert!(
        tally.reexecuted > 0,
        "steps killed mid-flight must have run again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_one_of_two_masters_under_load() {
    let _serial = serial().await;
    let mut cluster = Cluster::start(Options::default()).await;
    let done = cluster.done_events().await;
    let client = cluster.client();
    let n = scaled(600);
    let inputs: Vec<_> = (0..n).map(|i| task_input(i, 50 + short_delay(i))).collect();
    let submitter = client.spawn_submit_all("chaos", inputs, 16);
    done.wait_finished(n / 5, Duration::from_secs(60)).await;

    // Clients of master-0 long-poll it directly; when it dies they ask again through the
    // load balancer, which only has master-1 left.
    let dead = cluster.client_of(&cluster.system.masters[0]);
    let lb = cluster.client();
    let victims = {
        // Tasks submitted to master-0 itself, still running when it dies.
        let mut ids = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ids.len() < 20 && Instant::now() < deadline {
            let probe = task_input(n + ids.len(), 400);
            if let Submit::Accepted(id) = dead.submit_once("chaos", &probe).await {
                ids.push(Accepted {
                    task_id: id,
                    input: probe,
                });
            }
        }
        ids
    };
    let followers: Vec<_> = victims
        .iter()
        .map(|t| {
            let (dead, lb, id) = (dead.clone(), lb.clone(), t.task_id.clone());
            tokio::spawn(async move { follow(&dead, &lb, &id).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.system.masters[0].kill().await;

    let mut accepted = submitter.await.unwrap();
    let mut switched = 0;
    for f in followers {
        let (status, moved) = f.await.unwrap();
        assert!(
            status.is_some_and(TaskStatus::is_terminal),
            "a client of the dead master never got its result"
        );
        switched += usize::from(moved);
    }
    assert!(
        switched > 0,
        "no client of master-0 was still waiting when it died"
    );
    accepted.extend(victims);
    // No counter check: master-0's counter died with it.
    conclude(
        (&cluster, &done),
        &accepted,
        n + 20,
        (Duration::from_secs(90), Survivors::NOT_A_MASTER),
        "kill-9-master",
    )
    .await;
}

/// Long-polls `GET /result/{id}` on `first`; once that stops answering, on `then`.
/// Returns the final status and whether it had to move.
async fn follow(first: &Client, then: &Client, id: &str) -> (Option<TaskStatus>, bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut target = first;
    while Instant::now() < deadline {
        let sent = target
            .http
            .get(format!("{}/result/{id}?wait=10", target.base))
            .bearer_auth(API_KEY)
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 200 => {
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                let status = serde_json::from_value(body["status"].clone()).ok();
                return (status, !std::ptr::eq(target, first));
            }
            Ok(r) if r.status() == 202 || r.status().is_server_error() => {}
            Ok(r) => panic!("GET /result/{id} answered {}", r.status()),
            Err(_) => {
                target = then;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    (None, !std::ptr::eq(target, first))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarts_under_load_and_everyone_reconnects() {
    let _serial = serial().await;
    let mut cluster = Cluster::start(Options::default()).await;
    let done = cluster.done_events().await;
    let client = cluster.client();
    let n = scaled(800);
    let inputs: Vec<_> = (0..n).map(|i| task_input(i, 50 + short_delay(i))).collect();
    let submitter = client.spawn_submit_all("chaos", inputs, 16);
    done.wait_finished(n / 5, Duration::from_secs(60)).await;
    let finished_at_kill = done.finished();

    // kill -9, two seconds down, then the same port and data directory: AOF with
    // `appendfsync always` keeps every acknowledged write.
    cluster.redis.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| cluster.redis.restart());
    assert!(cluster.redis.is_running());
    let back = Instant::now();

    let accepted = submitter.await.unwrap();
    // No silent stall: everything finishes within a bounded time after Redis is back.
    conclude(
        (&cluster, &done),
        &accepted,
        n,
        (Duration::from_secs(60), Survivors::NOT_REDIS),
        "redis-restart",
    )
    .await;
    eprintln!(
        "redis-restart: killed with {finished_at_kill} of {n} tasks finished; all settled {:.1} s after Redis came back",
        back.elapsed().as_secs_f64()
    );
}

/// How long `POST /task` may take while Redis is black-holed: a pool checkout may wait
/// one command timeout, a new connection one connect timeout (+100 ms), and the submit
/// script one command timeout: 3.1 s with the 1 s timeouts the cluster uses, plus slack
/// for a loaded 2-core machine.
const OUTAGE_ANSWER_BOUND: Duration = Duration::from_millis(3 * REDIS_TIMEOUT_MS + 2_000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_for_10_s_answers_503_then_resumes() {
    let _serial = serial().await;
    let cluster = Cluster::start(Options {
        workers: 2,
        redis_via_proxy: Via::Everyone,
        ..Options::default()
    })
    .await;
    let done = cluster.done_events().await;
    let client = cluster.client();
    let n = scaled(200);
    // Long steps, so that many are in flight when Redis goes away.
    let before: Vec<_> = (0..n)
        .map(|i| task_input(i, 300 + (i as u64 * 53) % 1_200))
        .collect();
    let mut accepted = client
        .submit_all("chaos", before, 16, Duration::from_secs(30))
        .await;
    done.wait_finished(10, Duration::from_secs(30)).await;

    let proxy = cluster.redis_proxy.as_ref().unwrap();
    proxy.set_outage(true);
    let outage_end = Instant::now() + Duration::from_secs(10);
    // Let the proxy stop every relay before the first probe.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut probes = 0;
    let mut slowest = Duration::ZERO;
    while Instant::now() + OUTAGE_ANSWER_BOUND < outage_end {
        let master = &cluster.system.masters[probes % cluster.system.masters.len()];
        let started = Instant::now();
        let answer = cluster
            .client_of(master)
            .submit_once("chaos", &task_input(probes, 0))
            .await;
        let took = started.elapsed();
        slowest = slowest.max(took);
        match answer {
            Submit::Refused(503, Some(retry_after)) => {
                assert!(retry_after.parse::<u64>().is_ok_and(|s| s >= 1));
            }
            other => panic!(
                "POST /task to {} during the outage: {}\n{}",
                master.name(),
                other.describe(),
                cluster.logs_tail()
            ),
        }
        assert!(
            took <= OUTAGE_ANSWER_BOUND,
            "POST /task took {took:?} during the outage (bound {OUTAGE_ANSWER_BOUND:?})"
        );
        let started = Instant::now();
        let read = cluster
            .http
            .get(format!("{}/task/{}", master.url(), accepted[0].task_id))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), 503, "GET /task during the outage");
        assert!(read.headers().contains_key("retry-after"));
        assert!(started.elapsed() <= OUTAGE_ANSWER_BOUND, "GET /task hung");
        let ready = cluster
            .http
            .get(format!("{}/ready", master.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 503, "/ready during the outage");
        probes += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(probes >= 2, "too few probes during the outage");
    tokio::time::sleep_until(outage_end.into()).await;
    proxy.set_outage(false);
    eprintln!("redis-outage: {probes} probes answered 503, slowest in {slowest:?}");

    let after: Vec<_> = (n..2 * n).map(|i| task_input(i, short_delay(i))).collect();
    accepted.extend(
        client
            .submit_all("chaos", after, 16, Duration::from_secs(30))
            .await,
    );
    conclude(
        (&cluster, &done),
        &accepted,
        2 * n,
        (Duration::from_secs(60), Survivors::NOT_REDIS),
        "redis-unreachable-10s",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_cut_off_from_redis_for_4_s_lose_nothing() {
    let _serial = serial().await;
    let cluster = Cluster::start(Options {
        workers: 2,
        redis_via_proxy: Via::Workers,
        ..Options::default()
    })
    .await;
    let done = cluster.done_events().await;
    let client = cluster.client();
    // Steps longer than a lease plus a heartbeat TTL, so that the ones in flight when the
    // partition starts outlive their leases.
    let n = scaled(60);
    let inputs: Vec<_> = (0..n)
        .map(|i| task_input(i, 1_500 + (i as u64 * 53) % 1_500))
        .collect();
    let submitter = client.spawn_submit_all("chaos", inputs, 16);
    done.wait_finished(5, Duration::from_secs(60)).await;

    // The masters still see Redis, but no heartbeat gets through: the workers' records
    // expire and their leases lapse, while the workers carry on and report over HTTP.
    // Those late reports are for attempts that are no longer current: fencing must
    // discard them, and the re-queued steps run again once the workers are back.
    let proxy = cluster.redis_proxy.as_ref().unwrap();
    proxy.set_outage(true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set_outage(false);

    let accepted = submitter.await.unwrap();
    let (tally, ctx) = conclude(
        (&cluster, &done),
        &accepted,
        n,
        (Duration::from_secs(60), Survivors::ALL),
        "workers-partitioned-from-redis",
    )
    .await;
    assert!(
        tally.reexecuted > 0,
        "the partition should have lapsed leases"
    );
    // The workers' reports for lapsed attempts reached a master and were fenced off.
    let discarded = cluster
        .metric_sum(
            &cluster.system.workers,
            "ensemble_worker_result_deliveries_total",
            "outcome=\"discarded\"",
        )
        .await;
    eprintln!("workers-partitioned-from-redis: {discarded} late reports discarded by fencing");
    assert!(discarded > 0, "no late report was discarded\n{ctx}");
}

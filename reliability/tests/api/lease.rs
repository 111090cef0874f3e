//! The lease promise with a real process killed: a step whose worker dies is re-queued
//! within `LEASE_MS` of the last heartbeat that listed it (plus the reaper's tick), not a
//! whole extra lease later because the dead worker's record lingers until its TTL.

use std::time::Duration;

use common::wire::now_ms;

use crate::helpers::{Cluster, Options, report_line, serial, task_input};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_step_is_requeued_within_one_lease_of_its_last_heartbeat() {
    let _serial = serial().await;
    // A record lives 3 heartbeats (3 s) and a lease is 2 s: extending a lease that comes
    // due while the dead worker's record is still listed would re-queue the step at least
    // 3 s after the last beat; the promise is 2 s plus the reaper's tick.
    let lease_ms = 2_000;
    let mut cluster = Cluster::start(Options {
        masters: 1,
        workers: 1,
        lease_ms,
        heartbeat_ms: 1_000,
        ..Options::default()
    })
    .await;
    let client = cluster.client();
    let id = client
        .submit("chaos", &task_input(0, 60_000), Duration::from_secs(10))
        .await
        .expect("accepted");
    // Wait until the worker's heartbeat lists the step, and a lease renewal has happened
    // (the step outlived its first lease), so the kill hits a step kept alive by beats.
    let dispatched_at = loop {
        let view = client.view(&id).await.expect("the task");
        if let Some(at) = view.steps[0].dispatched_at_ms
            && now_ms() > at + lease_ms + 500
        {
            break at;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let view = client.view(&id).await.expect("the task");
    assert_eq!(
        view.steps[0].attempts, 1,
        "the lease was extended while beating"
    );
    cluster.system.workers[0].kill().await;
    // The record outlives the process: its heartbeat time is the last beat.
    let last_beat = cluster
        .live_workers()
        .await
        .into_iter()
        .find(|w| w.id.as_str() == cluster.system.workers[0].name())
        .map(|w| w.heartbeat_at_ms)
        .expect("the dead worker's record is still listed");
    assert!(last_beat > dispatched_at);
    let requeued_at = loop {
        let view = client.view(&id).await.expect("the task");
        let lapsed = view.steps[0]
            .error
            .as_ref()
            .is_some_and(|e| e.kind.as_deref() == Some("lease_expired"));
        if lapsed {
            break now_ms();
        }
        assert!(
            now_ms() < last_beat + 10_000,
            "the step was never re-queued: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let after = requeued_at.saturating_sub(last_beat);
    // LEASE_MS + the reaper's 250 ms tick + the registry refresh + this loop's polling.
    let bound = lease_ms + 700;
    report_line(&format!(
        "scenario lease-after-kill-9: re-queued {after} ms after the last heartbeat (LEASE_MS {lease_ms}, bound {bound})"
    ));
    assert!(
        after <= bound,
        "re-queued {after} ms after the last heartbeat; promised LEASE_MS ({lease_ms}) + the reaper's tick"
    );
    assert!(
        after + 300 >= lease_ms,
        "re-queued {after} ms after the last heartbeat: before the lease ran out"
    );
}

//! Misbehaving workers against a real master process: one that answers `202` and never
//! reports, one that reports garbage, one that reports twice, and a slow one whose lease
//! lapses and whose late report must be discarded by fencing. The kit's fake worker
//! (`testkit::fakes::worker`) misbehaves on a step's first attempt only, so every task can
//! still finish.

use std::time::Duration;

use testkit::fakes::worker::{Behavior, FakeWorker, GARBAGE_REPORTS};

use crate::helpers::{
    Accepted, Cluster, Options, check_counter, context, echoed, scaled, serial, settle, task_input,
};

/// Which misbehaviour a pipeline exercises, and how many re-executions it implies.
const BEHAVIOURS: [(&str, u64); 4] = [("silent", 1), ("garbage", 0), ("twice", 0), ("late", 1)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_workers_lose_nothing_and_record_once() {
    let _serial = serial().await;
    let cluster = Cluster::start(Options {
        masters: 1,
        workers: 0,
        ..Options::default()
    })
    .await;
    let mut settings = cluster.redis.settings();
    settings.key_prefix = cluster.prefix.clone();
    let fake = FakeWorker::start_mixed(
        "fake-worker",
        &[
            ("silent", Behavior::SilentOnce),
            ("garbage", Behavior::GarbageOnce),
            ("twice", Behavior::Duplicate),
            ("late", Behavior::LateOnce),
        ],
        64,
        &settings,
        &cluster.lb.url(),
    )
    .await;
    let done = cluster.done_events().await;
    let client = cluster.client();
    let n = scaled(25);
    for (b, (pipeline, reruns)) in BEHAVIOURS.into_iter().enumerate() {
        let base = cluster.succeeded_counter().await;
        let inputs = (0..n).map(|i| task_input(b * n + i, 0)).collect();
        let accepted: Vec<Accepted> = client
            .submit_all(pipeline, inputs, 8, Duration::from_secs(20))
            .await;
        let (mut tally, mut problems) =
            settle(&client, &accepted, &done, Duration::from_secs(40), echoed).await;
        check_counter(&cluster, &mut tally, &mut problems, base).await;

        let journal = fake.journal();
        for t in &accepted {
            let acks = journal
                .acks
                .get(&(t.task_id.clone(), 0))
                .cloned()
                .unwrap_or_default();
            let recorded = acks.iter().filter(|a| *a == "recorded").count();
            // The `twice` worker sends the same report three times: each repeat of the
            // report that was recorded is answered `recorded` again (a worker whose answer
            // was lost must not give up), while the transition happens once, which the
            // done events and the success counter above hold to exactly one.
            let expected = if pipeline == "twice" { 3 } else { 1 };
            if recorded > expected {
                tally.duplicates += 1;
                problems.push(format!("{}: reports acknowledged {acks:?}", t.task_id));
            }
            if pipeline == "late" {
                let late = journal.late_acks.get(&t.task_id);
                if late.map(String::as_str) != Some("discarded") {
                    tally.duplicates += 1;
                    problems.push(format!("{}: the late report got {late:?}", t.task_id));
                }
            }
        }
        let bad_garbage: Vec<_> = journal
            .garbage
            .iter()
            .filter(|(_, status, body)| {
                let refused = (400..500).contains(status);
                let discarded = *status == 200 && body.contains("discarded");
                !(refused || discarded)
            })
            .cloned()
            .collect::<Vec<_>>();
        drop(journal);
        let ctx = context(&problems, &cluster);
        tally.report(&format!("worker-{pipeline}"), &ctx);
        assert_eq!(tally.unannounced, 0, "{ctx}");
        assert_eq!(tally.accepted, n, "{ctx}");
        assert_eq!(tally.succeeded, n, "{ctx}");
        assert_eq!(tally.reexecuted, reruns * n as u64, "{ctx}");
        assert!(
            bad_garbage.is_empty(),
            "garbage reports must get a 4xx (or a `discarded` ack), never a 5xx or `recorded`: {bad_garbage:#?}"
        );
    }
    let journal = fake.journal();
    assert_eq!(
        journal.garbage.len(),
        GARBAGE_REPORTS * n,
        "every garbage variant was sent"
    );
    let mut answers: Vec<(String, u16)> = journal
        .garbage
        .iter()
        .map(|(variant, status, _)| (variant.clone(), *status))
        .collect();
    answers.sort();
    answers.dedup();
    eprintln!("garbage reports were answered: {answers:?}");
    let twice: usize = journal
        .acks
        .values()
        .filter(|a| a.len() == 3 && a.iter().all(|s| s == "recorded"))
        .count();
    assert_eq!(
        twice, n,
        "each triple report: recorded once, and the two repeats answered `recorded` too"
    );
}

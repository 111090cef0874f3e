//! Smoke test of `ensemble-bench`: the quick mode of Q1 with tiny numbers runs every task
//! to completion and prints the table. It asserts behaviour only, never speed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;

use helpers::tiny_args;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_q1_finishes_every_task_and_prints_the_table() {
    let args = tiny_args(&["--only", "q1", "--tasks", "60", "--clients", "4"]);
    let report = bench::run(&args).await.expect("the bench runs");
    let text = report.render();
    let throughput = report
        .figures
        .iter()
        .find(|f| f.name.starts_with("Q1 throughput"))
        .expect("a Q1 row");
    assert_eq!(throughput.runs.len(), 1, "{text}");
    assert!(throughput.runs[0] > 0.0, "{text}");
    assert!(text.contains("| figure"), "{text}");
    assert!(text.contains("Q1 Redis commands per task"), "{text}");
    assert!(
        text.contains("fcall"),
        "the breakdown lists Redis commands: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_q3_and_g1_run_with_tiny_numbers() {
    let args = tiny_args(&[
        "--only",
        "q3,g1",
        "--tasks",
        "40",
        "--scale-workers",
        "1,2",
        "--deep-queue",
        "2000",
        "--gateway-secs",
        "1",
        "--connections",
        "1,4",
        "--clients",
        "4",
    ]);
    let report = bench::run(&args).await.expect("the bench runs");
    let text = report.render();
    for row in [
        "Q3 throughput, 1 worker(s) × 16 slots",
        "Q3 throughput, 2 worker(s) × 8 slots",
        "Q3 deep / near-empty dispatch rate",
        "G1 gateway, 1 conn, p50",
        "G1 gateway req/s as % of direct, 4 conn",
    ] {
        let f = report
            .figure(row)
            .unwrap_or_else(|| panic!("no `{row}` row in\n{text}"));
        assert!(f.median().is_finite(), "{row}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_soak_samples_the_rss_and_reports_its_growth() {
    let args = tiny_args(&[
        "--only",
        "soak",
        "--soak-secs",
        "2",
        "--soak-every",
        "1",
        "--soak-connections",
        "4",
    ]);
    let report = bench::run(&args).await.expect("the bench runs");
    let text = report.render();
    let rps = report
        .figures
        .iter()
        .find(|f| f.name.starts_with("Soak gateway, 4 conn, 2 s"))
        .unwrap_or_else(|| panic!("no soak req/s row in\n{text}"));
    assert!(rps.runs[0] > 0.0, "{text}");
    let growth = report
        .figures
        .iter()
        .find(|f| f.name.contains("growth"))
        .unwrap_or_else(|| panic!("no growth row in\n{text}"));
    assert!(growth.median().is_finite(), "{text}");
    // In-process the whole bench's RSS is sampled: the label must say so.
    assert!(growth.name.contains("whole bench process"), "{text}");
    // A sample before the load, one a second while it runs, one after it.
    let series = report
        .notes
        .iter()
        .find(|(title, _)| title.starts_with("Soak"))
        .unwrap_or_else(|| panic!("no soak series in\n{text}"));
    assert!(series.1[0].split(", ").count() >= 3, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_b1_and_s1_queue_every_task_and_say_where_the_memory_goes() {
    let args = tiny_args(&[
        "--only",
        "b1,s1",
        "--tasks",
        "250",
        "--clients",
        "4",
        "--sim-workers",
        "20",
        "--scale-secs",
        "1",
        "--scale-queued",
        "300",
    ]);
    let report = bench::run(&args).await.expect("the bench runs");
    let text = report.render();
    for row in [
        "B1 submit rate, one per POST /task",
        "B1 submit rate, 100 per POST /tasks",
        "S1 heartbeats per second",
    ] {
        let f = report
            .figure(row)
            .unwrap_or_else(|| panic!("no `{row}` row in\n{text}"));
        assert!(f.median() > 0.0, "{row}: {text}");
    }
    let memory = report
        .figures
        .iter()
        .find(|f| {
            f.name
                .starts_with("S1 Redis memory per queued one-step task")
        })
        .unwrap_or_else(|| panic!("no S1 memory row in\n{text}"));
    assert!(memory.median() > 0.0, "{text}");
    // The test kit's redis-server keeps a queued task's hash compact.
    assert!(text.contains("task hash encoding: listpack"), "{text}");
    assert!(
        text.contains("q:echo"),
        "the breakdown names the queue: {text}"
    );
}

//! Partial output forwarded to the master (`POST /progress`): batched, fenced by the
//! attempt, stopped when the master says so, and never in the way of the step's report.
//! An agent of the test's own emits the messages, paced by what the fake master has seen.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::wire::{ReportStatus, StepError, WorkRequest};
use reqwest::StatusCode;
use serde_json::{Value, json};
use testkit::eventually;
use worker::{Agent, Agents, Config, current_progress};

use crate::helpers::*;

/// Emits the groups of messages in its input (`{"groups": [[m, …], …]}`) as partial
/// output: each group at once, then waits (bounded) until the master has seen one more
/// `/progress` post before the next group. Outputs `{"done": true}`.
struct TalkAgent {
    posts_seen: Box<dyn Fn() -> usize + Send + Sync>,
}

#[worker::async_trait]
impl Agent for TalkAgent {
    async fn handle(&self, step: &WorkRequest) -> Result<Value, StepError> {
        let progress = current_progress();
        let groups = step.input["groups"].as_array().cloned().unwrap_or_default();
        let before = (self.posts_seen)();
        for (i, group) in groups.iter().enumerate() {
            for message in group.as_array().into_iter().flatten() {
                progress.partial(step, message);
            }
            if i + 1 < groups.len() {
                eventually(WAIT, || async {
                    ((self.posts_seen)() > before + i).then_some(())
                })
                .await
                .ok_or_else(|| StepError::permanent("test", "the master saw no post"))?;
            }
        }
        Ok(json!({"done": true}))
    }
}

async fn talking_worker(redis: &TestRedis, master: &FakeMaster, config: Config) -> TestWorker {
    let agent = Arc::new(TalkAgent {
        posts_seen: Box::new(master.progress_counter()),
    });
    spawn_worker(redis, config, Agents::new().with(cap("talk"), agent)).await
}

fn talk(groups: Value) -> WorkRequest {
    work_request("talk", json!({ "groups": groups }))
}

fn delta(text: &str) -> Value {
    json!({ "delta": text })
}

#[tokio::test]
async fn partial_output_is_batched_with_deltas_joined_and_names_the_attempt_and_worker() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let worker = talking_worker(&redis, &master, test_config(&redis, &master)).await;

    let mut step = talk(json!([
        [delta("Hel"), delta("lo"), delta(", world"), {"tool": "search"}, delta("!")],
        [delta("more")]
    ]));
    step.step = 2;
    step.attempt = 3;
    worker.post_work_as(Some(TOKEN), &step, "req-talk").await;
    let report = master.wait_for_reports(1).await.remove(0).body;
    assert_eq!(report.status, ReportStatus::Succeeded);

    let posts = master.progress();
    assert_eq!(posts.len(), 2, "{posts:?}");
    assert_eq!(
        posts[0].progress.body.messages,
        vec![delta("Hello, world"), json!({"tool": "search"}), delta("!")]
    );
    assert_eq!(posts[1].progress.body.messages, vec![delta("more")]);
    for post in &posts {
        let body = &post.progress.body;
        assert_eq!(body.task_id, step.task_id);
        assert_eq!((body.step, body.attempt), (2, 3));
        assert_eq!(body.worker_id.as_str(), worker.id);
        assert_eq!(
            post.progress.authorization.as_deref(),
            Some(&*format!("Bearer {TOKEN}"))
        );
        assert_eq!(post.progress.request_id.as_deref(), Some("req-talk"));
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn the_masters_answer_decides_whether_the_attempt_sends_more() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let worker = talking_worker(&redis, &master, test_config(&redis, &master)).await;
    let limit = json!({"error": {"code": "progress_limit", "message": "the task has 5000 progress events"}});
    // The first post of each step gets this answer; whether the second group is posted.
    let cases = [
        (StatusCode::OK, json!({"status": "discarded"}), false),
        (StatusCode::TOO_MANY_REQUESTS, limit, false),
        (StatusCode::OK, json!({"status": "recorded"}), true),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": {"code": "unavailable", "message": "Redis is unavailable"}}),
            true,
        ),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": {"code": "progress_too_large", "message": "too large"}}),
            true,
        ),
    ];
    for (n, (status, answer, goes_on)) in cases.into_iter().enumerate() {
        master.script_progress([(status, answer)]);
        let seen = master.progress().len();
        let step = talk(json!([[delta("first")], [delta("second")]]));
        worker.post_work(&step).await;
        let report = master.wait_for_reports(n + 1).await.remove(n).body;
        assert_eq!(report.task_id, step.task_id);
        assert_eq!(report.status, ReportStatus::Succeeded, "{status}");
        // The report comes after the attempt's last progress: all posts are in by now.
        let posts: Vec<Vec<Value>> = master.progress()[seen..]
            .iter()
            .map(|post| post.progress.body.messages.clone())
            .collect();
        if goes_on {
            assert_eq!(
                posts,
                vec![vec![delta("first")], vec![delta("second")]],
                "{status}: the batch is dropped and the next ones go"
            );
        } else {
            assert_eq!(
                posts,
                vec![vec![delta("first")]],
                "{status}: nothing after the first"
            );
        }
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_master_that_hangs_on_progress_holds_the_report_back_at_most_half_a_second() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    master.hang_progress();
    let worker = talking_worker(&redis, &master, test_config(&redis, &master)).await;

    worker
        .post_work(&talk(json!([[delta("stuck")], [delta("waiting")]])))
        .await;
    // The agent returns as soon as the first post is in; its second batch waits behind it.
    master.wait_for_progress(1).await;
    let agent_done = Instant::now();
    let report = master.wait_for_reports(1).await.remove(0).body;
    let late = agent_done.elapsed();
    assert_eq!(report.status, ReportStatus::Succeeded);
    // Without the bound it would wait out the hung post (5 s) and then the next one.
    assert!(
        late < Duration::from_secs(4),
        "the report came {late:?} late"
    );
    assert_eq!(master.progress().len(), 1, "one post in flight at a time");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn progress_flush_ms_zero_sends_no_progress() {
    let redis = TestRedis::start();
    let master = FakeMaster::start().await;
    let config = Config {
        progress_flush_ms: 0,
        ..test_config(&redis, &master)
    };
    let worker = talking_worker(&redis, &master, config).await;

    worker
        .post_work(&talk(json!([[delta("never"), delta(" sent")]])))
        .await;
    let report = master.wait_for_reports(1).await.remove(0).body;
    assert_eq!(report.status, ReportStatus::Succeeded);
    assert!(master.progress().is_empty(), "{:?}", master.progress());
    worker.stop().await.unwrap();
}

//! A fake master for the worker's tests: `POST /result` is recorded and answered from a
//! script (by default `200 recorded`, as the master acknowledges a report), `POST /progress`
//! likewise from a script of its own (or left unanswered, as a master that hangs),
//! `GET /health` answers, and it can be stopped and restarted on its port, as a master
//! redeploy is seen from a worker. Like an older master it has no `POST /results`, unless
//! [`FakeMaster::take_batches`] is called: then each report of a batch is recorded and
//! answered from the same script, and the batches' sizes are kept.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::wire::{ResultBatchAnswer, ResultItemAnswer, ResultReport, StepProgress};
use serde_json::{Value, json};

use super::server::{Fake, Received, wait_for};

/// A `POST /result` the fake received, and the status it answered.
#[derive(Clone, Debug)]
pub struct ReportCall {
    pub report: Received<ResultReport>,
    pub status: StatusCode,
}

/// A `POST /progress` the fake received, and the status it answered (`None`: it held the
/// request without answering).
#[derive(Clone, Debug)]
pub struct ProgressCall {
    pub progress: Received<StepProgress>,
    pub status: Option<StatusCode>,
}

/// How long a hanging `/progress` holds a request before it answers after all.
const HANG: Duration = Duration::from_secs(60);

/// `/progress`'s own script and record, apart from the reports'.
#[derive(Default)]
struct ProgressLog {
    answers: Mutex<VecDeque<(StatusCode, Value)>>,
    /// Answer every `/progress` with this once `answers` is empty (else `200 recorded`).
    always: Mutex<Option<(StatusCode, Value)>>,
    /// Hold every `/progress` for [`HANG`] before answering.
    hang: Mutex<bool>,
    seen: Mutex<Vec<ProgressCall>>,
}

impl ProgressLog {
    async fn answer(&self, headers: &axum::http::HeaderMap, body: &[u8]) -> Response {
        let Ok(progress) = serde_json::from_slice::<StepProgress>(body) else {
            return StatusCode::UNPROCESSABLE_ENTITY.into_response();
        };
        let received = Received::new(headers, progress);
        if *self.hang.lock().unwrap() {
            self.seen.lock().unwrap().push(ProgressCall {
                progress: received,
                status: None,
            });
            tokio::time::sleep(HANG).await;
            return answer(StatusCode::OK, json!({"status": "recorded"}));
        }
        let queued = self.answers.lock().unwrap().pop_front();
        let (status, body) = queued
            .or_else(|| self.always.lock().unwrap().clone())
            .unwrap_or_else(|| (StatusCode::OK, json!({"status": "recorded"})));
        self.seen.lock().unwrap().push(ProgressCall {
            progress: received,
            status: Some(status),
        });
        answer(status, body)
    }
}

/// `POST /results`: whether it is served, how long each answer waits, the sizes seen.
#[derive(Default)]
struct BatchLog {
    on: std::sync::atomic::AtomicBool,
    delay: Mutex<Duration>,
    sizes: Mutex<Vec<usize>>,
}

/// The running fake master.
pub struct FakeMaster(
    Fake<(StatusCode, Value), ReportCall>,
    Arc<ProgressLog>,
    Arc<BatchLog>,
);

impl FakeMaster {
    pub async fn start() -> Self {
        let progress = Arc::new(ProgressLog::default());
        let log = progress.clone();
        let batches = Arc::new(BatchLog::default());
        let batch_log = batches.clone();
        Self(
            Fake::serve(
                0,
                "",
                move |script, method, uri: Uri, headers, body: Bytes| {
                    let progress = log.clone();
                    let batches = batch_log.clone();
                    async move {
                        let delay = *batches.delay.lock().unwrap();
                        tokio::time::sleep(delay).await;
                        match (method, uri.path()) {
                            (Method::POST, "/results")
                                if batches.on.load(std::sync::atomic::Ordering::Relaxed) =>
                            {
                                let Ok(reports) =
                                    serde_json::from_slice::<Vec<ResultReport>>(&body)
                                else {
                                    return StatusCode::UNPROCESSABLE_ENTITY.into_response();
                                };
                                batches.sizes.lock().unwrap().push(reports.len());
                                let results = reports
                                    .into_iter()
                                    .map(|report| {
                                        let (status, body) = script.next().unwrap_or_else(|| {
                                            (StatusCode::OK, json!({"status": "recorded"}))
                                        });
                                        script.record(ReportCall {
                                            report: Received::new(&headers, report),
                                            status,
                                        });
                                        ResultItemAnswer {
                                            status: status.as_u16(),
                                            ack: serde_json::from_value(body["status"].clone())
                                                .ok(),
                                            error: serde_json::from_value(body["error"].clone())
                                                .ok(),
                                        }
                                    })
                                    .collect();
                                Json(ResultBatchAnswer { results }).into_response()
                            }
                            (Method::POST, "/progress") => progress.answer(&headers, &body).await,
                            // What a degraded worker probes to learn that the master is back.
                            (Method::GET, "/health") => {
                                Json(json!({"status": "ok"})).into_response()
                            }
                            (Method::POST, "/result") => {
                                let Ok(report) = serde_json::from_slice::<ResultReport>(&body)
                                else {
                                    return StatusCode::UNPROCESSABLE_ENTITY.into_response();
                                };
                                let (status, body) = script.next().unwrap_or_else(|| {
                                    (StatusCode::OK, json!({"status": "recorded"}))
                                });
                                script.record(ReportCall {
                                    report: Received::new(&headers, report),
                                    status,
                                });
                                answer(status, body)
                            }
                            _ => StatusCode::NOT_FOUND.into_response(),
                        }
                    }
                },
            )
            .await
            .expect("bind a free loopback port"),
            progress,
            batches,
        )
    }

    /// Serves `POST /results` from now on, as a master of this version does.
    pub fn take_batches(&self) {
        self.2.on.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits this long before answering any request: a master far away, or busy.
    pub fn answer_after(&self, delay: Duration) {
        *self.2.delay.lock().unwrap() = delay;
    }

    /// How many reports each `POST /results` carried, in order.
    pub fn batches(&self) -> Vec<usize> {
        self.2.sizes.lock().unwrap().clone()
    }

    /// Answers the next `/progress` posts with these statuses and bodies, then
    /// [`Self::always_progress`]'s answer (by default `200 recorded`).
    pub fn script_progress(&self, answers: impl IntoIterator<Item = (StatusCode, Value)>) {
        self.1.answers.lock().unwrap().extend(answers);
    }

    /// Answers every `/progress` post with this once the script is empty.
    pub fn always_progress(&self, status: StatusCode, body: Value) {
        *self.1.always.lock().unwrap() = Some((status, body));
    }

    /// Holds every `/progress` post (a minute) before answering: a master that hangs.
    pub fn hang_progress(&self) {
        *self.1.hang.lock().unwrap() = true;
    }

    /// Every `/progress` post so far, in the order they came.
    pub fn progress(&self) -> Vec<ProgressCall> {
        self.1.seen.lock().unwrap().clone()
    }

    /// How many `/progress` posts have come so far, for an agent under test that paces
    /// its partial output by what the master has seen.
    pub fn progress_counter(&self) -> impl Fn() -> usize + Send + Sync + 'static {
        let log = self.1.clone();
        move || log.seen.lock().unwrap().len()
    }

    /// Waits for `n` `/progress` posts.
    pub async fn wait_for_progress(&self, n: usize) -> Vec<ProgressCall> {
        wait_for(
            n,
            || self.progress(),
            |seen| format!("progress posts, got {seen:?}"),
        )
        .await
    }

    pub fn url(&self) -> String {
        self.0.url.clone()
    }

    /// Stops listening and closes every connection.
    pub async fn stop(&mut self) {
        self.0.stop().await;
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        self.0.restart().await;
    }

    /// Answers the next reports with these statuses and bodies, then `200 recorded`.
    pub fn script(&self, answers: impl IntoIterator<Item = (StatusCode, Value)>) {
        for answer in answers {
            self.0.push(answer);
        }
    }

    /// Every report delivered so far, accepted or not.
    pub fn attempts(&self) -> usize {
        self.0.requests().len()
    }

    /// The reports it accepted (answered `2xx`) so far.
    pub fn reports(&self) -> Vec<Received<ResultReport>> {
        self.0
            .requests()
            .into_iter()
            .filter(|call| call.status.is_success())
            .map(|call| call.report)
            .collect()
    }

    /// Waits for `n` accepted reports.
    pub async fn wait_for_reports(&self, n: usize) -> Vec<Received<ResultReport>> {
        wait_for(
            n,
            || self.reports(),
            |seen| format!("reports, got {seen:?} after {} attempts", self.attempts()),
        )
        .await
    }
}

/// The master's answer; a `503` carries `Retry-After`, as the master's does when Redis is
/// down.
fn answer(status: StatusCode, body: Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert("retry-after", "1".parse().unwrap());
    }
    response
}

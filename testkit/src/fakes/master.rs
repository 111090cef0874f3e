//! A fake master for the worker's tests: `POST /result` is recorded and answered from a
//! script (by default `200 recorded`, as the master acknowledges a report), `GET /health`
//! answers, and it can be stopped and restarted on its port, as a master redeploy is seen
//! from a worker.

use axum::Json;
use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::wire::ResultReport;
use serde_json::{Value, json};

use super::server::{Fake, Received, wait_for};

/// A `POST /result` the fake received, and the status it answered.
#[derive(Clone, Debug)]
pub struct ReportCall {
    pub report: Received<ResultReport>,
    pub status: StatusCode,
}

/// The running fake master.
pub struct FakeMaster(Fake<(StatusCode, Value), ReportCall>);

impl FakeMaster {
    pub async fn start() -> Self {
        Self(
            Fake::serve(
                0,
                "",
                |script, method, uri: Uri, headers, body: Bytes| async move {
                    match (method, uri.path()) {
                        // What a degraded worker probes to learn that the master is back.
                        (Method::GET, "/health") => Json(json!({"status": "ok"})).into_response(),
                        (Method::POST, "/result") => {
                            let Ok(report) = serde_json::from_slice::<ResultReport>(&body) else {
                                return StatusCode::UNPROCESSABLE_ENTITY.into_response();
                            };
                            let (status, body) = script
                                .next()
                                .unwrap_or_else(|| (StatusCode::OK, json!({"status": "recorded"})));
                            script.record(ReportCall {
                                report: Received::new(&headers, report),
                                status,
                            });
                            answer(status, body)
                        }
                        _ => StatusCode::NOT_FOUND.into_response(),
                    }
                },
            )
            .await
            .expect("bind a free loopback port"),
        )
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

//! G1: the llm-gateway's overhead. The kit's fake Gemini (`testkit::fakes::gemini`)
//! answers `generateContent` at once; the same chat request is timed straight against it
//! and through the gateway.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::header;
use bytes::Bytes;

use crate::cluster::{FAKE_GEMINI_KEY, FAKE_GEMINI_MODEL};
use crate::stats::Percentiles;

/// The prompt both ways send.
const PROMPT: &str = "Reply with one word: hello.";

/// Which way a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Straight to the fake upstream, in Gemini's format.
    Direct,
    /// Through the gateway, in OpenAI's format.
    Gateway,
}

/// One request, ready to send again and again.
#[derive(Clone)]
pub struct Call {
    url: String,
    body: Bytes,
    key: Option<&'static str>,
}

impl Call {
    /// The Gemini request the gateway itself would send for [`Call::gateway`].
    pub fn direct(gemini_base_url: &str) -> Self {
        let body = serde_json::json!({
            "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
            "generationConfig": {"maxOutputTokens": 16},
        });
        Self {
            url: format!("{gemini_base_url}/models/{FAKE_GEMINI_MODEL}:generateContent"),
            body: Bytes::from(body.to_string()),
            key: Some(FAKE_GEMINI_KEY),
        }
    }

    /// The OpenAI chat-completion request to the gateway.
    pub fn gateway(gateway_url: &str, model: &str) -> Self {
        let body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 16,
        });
        Self {
            url: format!("{}/v1/chat/completions", gateway_url.trim_end_matches('/')),
            body: Bytes::from(body.to_string()),
            key: None,
        }
    }

    async fn send(&self, http: &reqwest::Client) -> anyhow::Result<()> {
        let mut request = http
            .post(&self.url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(self.body.clone());
        if let Some(key) = self.key {
            request = request.header("x-goog-api-key", key);
        }
        let response = request.send().await?;
        let status = response.status();
        // Read the whole body: a client of either would.
        let body = response.bytes().await?;
        anyhow::ensure!(
            status.is_success(),
            "{} answered {status}: {}",
            self.url,
            String::from_utf8_lossy(&body)
        );
        Ok(())
    }
}

/// One G1 measurement: a closed loop on `connections` connections for a while.
#[derive(Clone, Copy, Debug)]
pub struct LoadRun {
    /// Requests answered per second.
    pub rps: f64,
    /// Latency percentiles.
    pub latency: Percentiles,
    /// Requests that failed.
    pub errors: usize,
}

/// Sends `call` back to back on `connections` connections for `duration`.
pub async fn load(call: &Call, connections: usize, duration: Duration) -> anyhow::Result<LoadRun> {
    let connections = connections.max(1);
    let http = crate::client::http_client(connections);
    // Open the connections and warm both sides up.
    for _ in 0..3 {
        let warm: Vec<_> = (0..connections).map(|_| call.send(&http)).collect();
        for r in futures::future::join_all(warm).await {
            r.context("a warm-up request failed")?;
        }
    }
    let call = Arc::new(call.clone());
    let start = Instant::now();
    let end = start + duration;
    let mut loops = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (http, call) = (http.clone(), call.clone());
        loops.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(1 << 14);
            let mut errors = 0usize;
            while Instant::now() < end {
                let sent = Instant::now();
                match call.send(&http).await {
                    Ok(()) => samples.push(sent.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (samples, errors)
        }));
    }
    let mut samples = Vec::new();
    let mut errors = 0;
    for l in loops {
        let (s, e) = l.await.context("a load loop panicked")?;
        samples.extend(s);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(LoadRun {
        rps: samples.len() as f64 / elapsed,
        latency: Percentiles::of(&mut samples),
        errors,
    })
}

/// One soak: the gateway's RSS sampled while the G1 request runs for a long while.
#[derive(Clone, Debug)]
pub struct SoakRun {
    /// `(seconds since the soak started, RSS in MiB)`, the first before any request, the
    /// last after the load stopped.
    pub samples: Vec<(f64, f64)>,
    /// The load itself (requests/s, latency).
    pub load: LoadRun,
}

impl SoakRun {
    /// The RSS at the end of the warm-up plateau: the first sample at or after `at`
    /// seconds (10 s by default: connections, pools and buffers are allocated by then).
    pub fn plateau_mb(&self, at: f64) -> f64 {
        self.samples
            .iter()
            .find(|(t, _)| *t >= at)
            .or(self.samples.last())
            .map_or(f64::NAN, |s| s.1)
    }

    /// The RSS at the end.
    pub fn end_mb(&self) -> f64 {
        self.samples.last().map_or(f64::NAN, |s| s.1)
    }

    /// Growth from the plateau at `at` seconds to the end, in MiB.
    pub fn growth_mb(&self, at: f64) -> f64 {
        self.end_mb() - self.plateau_mb(at)
    }

    /// The series on one line: `0 s 9.8, 5 s 24.1, …` (MiB).
    pub fn series(&self) -> String {
        self.samples
            .iter()
            .map(|(t, mb)| format!("{t:.0} s {mb:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Sends `call` on `connections` connections for `duration` (as [`load`]) and reads
/// `rss()` (MiB) before, every `every` while it runs, and after.
pub async fn soak(
    call: &Call,
    connections: usize,
    duration: Duration,
    every: Duration,
    rss: impl Fn() -> Option<f64>,
) -> anyhow::Result<SoakRun> {
    let start = Instant::now();
    let mut samples = Vec::new();
    let sample = |samples: &mut Vec<(f64, f64)>| {
        if let Some(mb) = rss() {
            samples.push((start.elapsed().as_secs_f64(), mb));
        }
    };
    sample(&mut samples);
    let call = call.clone();
    let mut running = tokio::spawn(async move { load(&call, connections, duration).await });
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: the baseline above stands for it.
    ticks.tick().await;
    let load = loop {
        tokio::select! {
            done = &mut running => break done.context("the soak's load panicked")??,
            _ = ticks.tick() => sample(&mut samples),
        }
    };
    sample(&mut samples);
    anyhow::ensure!(
        samples.len() >= 2,
        "the gateway's RSS could not be read (is it still running?)"
    );
    Ok(SoakRun { samples, load })
}

//! The gateway's Prometheus series, all named `ensemble_gateway_*`. Handles for each
//! provider+model target are made once at start, so the hot path records without building
//! label sets.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram};

use crate::config::ProviderKind;
use crate::openai::Usage;

/// Requests answered, by provider, model, outcome (`ok`, `error`) and endpoint (`chat`,
/// `embeddings`; every per-target series carries the endpoint).
pub const REQUESTS: &str = "ensemble_gateway_requests_total";
/// Failures by provider, model and kind (`rate_limited`, `timeout`, `invalid_json`, …);
/// gateway-level rejections carry `provider="gateway"`.
pub const ERRORS: &str = "ensemble_gateway_errors_total";
/// Client-visible latency of served requests, by provider and model.
pub const REQUEST_DURATION: &str = "ensemble_gateway_request_duration_seconds";
/// Latency of each upstream attempt, by provider and model.
pub const UPSTREAM_DURATION: &str = "ensemble_gateway_upstream_duration_seconds";
/// Tokens by provider, model and direction (`in`, `out`).
pub const TOKENS: &str = "ensemble_gateway_tokens_total";
/// Retries of one target, by provider and model.
pub const RETRIES: &str = "ensemble_gateway_retries_total";
/// Fallbacks to a later target, by the provider fallen back to.
pub const FALLBACKS: &str = "ensemble_gateway_fallbacks_total";
/// The gateway's own time per request (total minus upstream and backoff), by mode
/// (`unary`, `stream`).
pub const OVERHEAD: &str = "ensemble_gateway_overhead_seconds";

/// `Idempotency-Key` requests by outcome: `replayed`, `recorded`, `reused` (422),
/// `in_progress` (409), `too_large` (served, not recorded), `unavailable` (Redis failed).
pub const REPLAYS: &str = "ensemble_gateway_replays_total";
/// Response-cache lookups and stores of cached aliases, by alias and outcome: `hit`,
/// `miss`, `store_error` (Redis failed; a lookup then misses), `too_large` (not stored).
pub const CACHE: &str = "ensemble_gateway_cache_total";

/// Cached handles for one provider+model target.
#[derive(Debug)]
pub struct TargetMetrics {
    provider: &'static str,
    model: String,
    endpoint: &'static str,
    ok: Counter,
    failed: Counter,
    duration: Histogram,
    upstream: Histogram,
    tokens_in: Counter,
    tokens_out: Counter,
    retries: Counter,
    fallbacks: Counter,
}

impl TargetMetrics {
    /// Registers the series for `provider` and `model`. The Prometheus recorder must be
    /// installed first (`common::telemetry::metrics()`), or the handles record nowhere.
    pub fn new(provider: ProviderKind, model: &str, endpoint: Endpoint) -> Self {
        let p = provider.as_str();
        let m = model.to_string();
        let e = endpoint.as_str();
        Self {
            ok: metrics::counter!(REQUESTS, "provider" => p, "model" => m.clone(), "outcome" => "ok", "endpoint" => e),
            failed: metrics::counter!(REQUESTS, "provider" => p, "model" => m.clone(), "outcome" => "error", "endpoint" => e),
            duration: metrics::histogram!(REQUEST_DURATION, "provider" => p, "model" => m.clone(), "endpoint" => e),
            upstream: metrics::histogram!(UPSTREAM_DURATION, "provider" => p, "model" => m.clone(), "endpoint" => e),
            tokens_in: metrics::counter!(TOKENS, "provider" => p, "model" => m.clone(), "direction" => "in", "endpoint" => e),
            tokens_out: metrics::counter!(TOKENS, "provider" => p, "model" => m.clone(), "direction" => "out", "endpoint" => e),
            retries: metrics::counter!(RETRIES, "provider" => p, "model" => m.clone(), "endpoint" => e),
            fallbacks: metrics::counter!(FALLBACKS, "provider" => p, "model" => m.clone(), "endpoint" => e),
            provider: p,
            model: m,
            endpoint: e,
        }
    }

    /// One upstream attempt took `elapsed`.
    pub fn attempt(&self, elapsed: Duration) {
        self.upstream.record(elapsed.as_secs_f64());
    }

    /// An upstream attempt (or a stream) failed.
    pub fn error(&self, kind: &'static str) {
        metrics::counter!(ERRORS, "provider" => self.provider, "model" => self.model.clone(), "kind" => kind, "endpoint" => self.endpoint)
            .increment(1);
    }

    /// The target is retried.
    pub fn retry(&self) {
        self.retries.increment(1);
    }

    /// The router fell back to this target.
    pub fn fallback(&self) {
        self.fallbacks.increment(1);
    }

    /// A request ended on this target, served or not.
    pub fn finished(&self, ok: bool, total: Duration, usage: Option<Usage>) {
        if ok {
            self.ok.increment(1);
            self.duration.record(total.as_secs_f64());
        } else {
            self.failed.increment(1);
        }
        if let Some(usage) = usage {
            self.tokens_in.increment(u64::from(usage.prompt_tokens));
            self.tokens_out
                .increment(u64::from(usage.completion_tokens));
        }
    }
}

/// Which API a request came through: a label on every per-target series, so chat and
/// embeddings traffic to one model (the mock's, say) stay apart. Two values: bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Endpoint {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Embeddings => "embeddings",
        }
    }
}

/// A request the gateway refused before any provider was involved.
pub fn rejected(kind: &'static str) {
    metrics::counter!(ERRORS, "provider" => "gateway", "model" => "", "kind" => kind).increment(1);
}

/// How a request was answered, for the overhead histogram.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// One JSON body.
    Unary,
    /// Server-Sent Events.
    Stream,
}

/// The gateway's own share of one request. The two handles are made once (after the
/// recorder is installed, which `app::build` ensures before any request).
pub fn overhead(mode: Mode, total: Duration, outside: Duration) {
    static UNARY: OnceLock<Histogram> = OnceLock::new();
    static STREAM: OnceLock<Histogram> = OnceLock::new();
    let histogram = match mode {
        Mode::Unary => UNARY.get_or_init(|| metrics::histogram!(OVERHEAD, "mode" => "unary")),
        Mode::Stream => STREAM.get_or_init(|| metrics::histogram!(OVERHEAD, "mode" => "stream")),
    };
    histogram.record(total.saturating_sub(outside).as_secs_f64());
}

/// An `Idempotency-Key` request ended in `outcome` (see [`REPLAYS`]).
pub fn replay(outcome: &'static str) {
    metrics::counter!(REPLAYS, "outcome" => outcome).increment(1);
}

/// A cache lookup or store for `alias` ended in `outcome` (see [`CACHE`]). Only aliases
/// with `cache_ttl_s` get here, so the label is bounded by the configuration.
pub fn cache(alias: &str, outcome: &'static str) {
    metrics::counter!(CACHE, "alias" => alias.to_string(), "outcome" => outcome).increment(1);
}

//! Logs and metrics: `tracing` (JSON when `LOG_FORMAT=json`, readable otherwise, filtered by
//! `RUST_LOG`), one Prometheus recorder per process rendered on `/metrics`, and the HTTP
//! middleware that gives every request an `x-request-id`, a log span and request metrics.
//! Traces (OTLP export, `traceparent`) are in [`crate::traces`]; this module installs their
//! layer and joins each request's span to its caller's trace.

use std::sync::{OnceLock, PoisonError, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer as _};

/// The header that carries a request id from client to master to worker to gateway.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Initializes logging once per process. `LOG_FORMAT=json` gives one JSON object a line
/// (for CloudWatch); anything else gives readable lines. `RUST_LOG` filters them (default
/// `info`). With `OTEL_EXPORTER_OTLP_ENDPOINT` set (and called on a Tokio runtime), spans
/// are also exported as `service` (or `OTEL_SERVICE_NAME`), whatever `RUST_LOG` says; the
/// binary calls [`crate::traces::shutdown`] on its way out to flush them.
pub fn init_tracing(service: &'static str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
        // Each layer filters for itself: a quiet log (`RUST_LOG=warn`) still exports spans.
        let registry = tracing_subscriber::registry().with(crate::traces::layer(service));
        // A second subscriber (tests, the all-in-one launcher) is not an error.
        let _ = if json {
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_current_span(true)
                        .with_span_list(false)
                        .with_filter(filter),
                )
                .try_init()
        } else {
            registry
                .with(tracing_subscriber::fmt::layer().with_filter(filter))
                .try_init()
        };
    });
}

/// Latency buckets in seconds, from 100 µs (a queue hop) to 2 minutes (an LLM call).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The process's Prometheus handle, installing the recorder on first use. Services started
/// in one process (the all-in-one launcher, tests) share it, and their series carry a
/// `service` label where it matters.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Suffix("_tokens".into()),
                    &[16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0],
                )
            });
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        // Fails only if another recorder is installed; then this handle renders nothing,
        // which is visible in /metrics rather than fatal.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
        }
        spawn_upkeep(handle.clone());
        handle
    })
}

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds histogram samples into their buckets every [`UPKEEP_EVERY`], for the life of the
/// process. A recorder made with `build_recorder` leaves this to its owner: until a
/// render (a `/metrics` scrape) drains them, every recorded sample is kept, 8 bytes each
/// plus its block, so an unscraped service grows without bound (the gateway grew by
/// 50 MiB in 90 s at 16,000 requests/s, four histograms a request). A thread, not a
/// task: the recorder may be installed before any runtime, and one runtime of several
/// (tests) must not take it down when it stops.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no metrics upkeep thread: histograms grow until /metrics is scraped");
    }
}

/// Renders the Prometheus text for `/metrics`.
pub fn render_metrics() -> String {
    let handle = metrics();
    handle.run_upkeep();
    handle.render()
}

/// A request's id, in the request's extensions for handlers that pass it on.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Middleware: takes `x-request-id` from the request (or makes one), echoes it in the
/// response, and runs the request inside a span that carries it.
pub async fn request_context(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(String::from)
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!(
        "http",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = %id,
        otel.name = tracing::field::Empty,
        otel.kind = tracing::field::Empty,
    );
    if crate::traces::enabled() {
        // Named for trace views (`POST /task`); the log line keeps `http`.
        span.record(
            "otel.name",
            format!("{} {}", req.method(), req.uri().path()).as_str(),
        );
        span.record("otel.kind", "server");
        crate::traces::adopt_headers(&span, req.headers());
    }
    let mut response = next.run(req).instrument(span).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID.clone(), value);
    }
    response
}

/// Middleware (as a route layer, so the matched route is known): counts requests by
/// service, method, route and status, and records their latency.
pub async fn track_http(State(service): State<&'static str>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = req.extensions().get::<MatchedPath>().cloned();
    let response = next.run(req).await;
    let (requests, duration) = http_series(service, method, route, response.status());
    requests.increment(1);
    duration.record(start.elapsed().as_secs_f64());
    response
}

/// The `method` label: the standard methods by name, any other as `OTHER`, so a client
/// inventing methods cannot grow the label set.
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
    ];
    KNOWN
        .into_iter()
        .find(|known| *known == method.as_str())
        .unwrap_or("OTHER")
}

/// The request counter and latency histogram of one series.
type HttpHandles = (metrics::Counter, metrics::Histogram);

/// The handles of `service`, `method`, `route` (`None`: unmatched) and `status`, made once
/// and then looked up: building the four labels and finding the series in the recorder's
/// registry took a dozen allocations per request. Bounded: routes are the routers', methods
/// the nine standard ones and `OTHER`, statuses at most 900.
fn http_series(
    service: &'static str,
    method: &'static str,
    route: Option<MatchedPath>,
    status: StatusCode,
) -> HttpHandles {
    /// By route, then a short list of (service, method, status).
    type Series = std::collections::HashMap<
        String,
        Vec<(&'static str, &'static str, StatusCode, HttpHandles)>,
    >;
    static SERIES: OnceLock<RwLock<Series>> = OnceLock::new();
    let series = SERIES.get_or_init(RwLock::default);
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let find = |series: &Series| {
        series.get(route).and_then(|list| {
            list.iter()
                .find(|(s, m, st, _)| *s == service && *m == method && *st == status)
                .map(|entry| entry.3.clone())
        })
    };
    if let Some(found) = find(&series.read().unwrap_or_else(PoisonError::into_inner)) {
        return found;
    }
    let mut series = series.write().unwrap_or_else(PoisonError::into_inner);
    // Another request may have made it between the two locks.
    if let Some(found) = find(&series) {
        return found;
    }
    let labels = [
        ("service", service.to_owned()),
        ("method", method.to_owned()),
        ("route", route.to_owned()),
        ("status", status.as_u16().to_string()),
    ];
    let made = (
        metrics::counter!("ensemble_http_requests_total", &labels),
        metrics::histogram!("ensemble_http_request_duration_seconds", &labels),
    );
    series
        .entry(route.to_owned())
        .or_default()
        .push((service, method, status, made.clone()));
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        for invented in ["BREW", "get", "X-ANYTHING"] {
            let method = Method::from_bytes(invented.as_bytes()).expect("a valid token");
            assert_eq!(method_label(&method), "OTHER", "{invented}");
        }
    }

    #[test]
    fn one_series_is_made_once_and_found_again() {
        metrics();
        let route = || None;
        let (a, _) = http_series("telemetry-test", "GET", route(), StatusCode::OK);
        let (b, _) = http_series("telemetry-test", "GET", route(), StatusCode::OK);
        let (other, _) = http_series("telemetry-test", "GET", route(), StatusCode::NOT_FOUND);
        a.increment(2);
        b.increment(3);
        other.increment(7);
        let text = render_metrics();
        let line = |status: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("ensemble_http_requests_total")
                        && l.contains("service=\"telemetry-test\"")
                        && l.contains(&format!("status=\"{status}\""))
                })
                .unwrap_or_else(|| panic!("no {status} series in\n{text}"))
                .to_string()
        };
        assert!(line("200").ends_with(" 5"), "{text}");
        assert!(line("404").ends_with(" 7"), "{text}");
        assert!(line("200").contains("route=\"unmatched\""), "{text}");
    }
}

//! Traces across services: W3C `traceparent` in and out of every hop, and OTLP/HTTP (JSON)
//! export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! With the endpoint unset nothing here runs: no layer, no exporter, and every helper
//! returns after one relaxed atomic load ([`enabled`]), so the hot paths (the benchmark's
//! dispatch and gateway loops) pay for nothing they do not use. Spans made for traces
//! (submit, step attempt, result delivery, model call) are made only when [`enabled`]. Only
//! spans are exported, not log events, at `info` and above whatever `RUST_LOG` says.
//!
//! Spans carry coordinates (task id, step, attempt, capability, provider, model), never a
//! task's input or output, a prompt or a completion.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::registry::LookupSpan;

/// The W3C trace-context header.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The standard OTel variable that turns export on (`http://collector:4318`); the
/// exporter appends `/v1/traces`.
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The standard OTel variable naming the service in exported spans; the default is the
/// service's own name (`master`, `worker`, `llm-gateway`).
pub const SERVICE_NAME_VAR: &str = "OTEL_SERVICE_NAME";

/// Whether spans are exported: set once, by [`layer`], when the exporter is built.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// The provider, kept so [`shutdown`] can flush what the batch processor still holds.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether this process exports traces. The one check the hot paths make.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The `tracing-opentelemetry` layer, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (and a
/// Tokio runtime is running to send from); `None` otherwise, which adds no layer at all.
pub(crate) fn layer<S>(service: &'static str) -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let endpoint = std::env::var(ENDPOINT_VAR).ok()?;
    if endpoint.trim().is_empty() {
        return None;
    }
    let runtime = match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime,
        Err(_) => {
            eprintln!("{ENDPOINT_VAR} is set but there is no Tokio runtime: traces are off");
            return None;
        }
    };
    crate::install_crypto_provider();
    let client = OnRuntime {
        client: crate::http::client(Duration::from_secs(10)),
        runtime,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_http_client(client)
        .build();
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(e) => {
            // Logging is not set up yet: this is the subscriber being built.
            eprintln!("{ENDPOINT_VAR}={endpoint}: no trace exporter ({e}); traces are off");
            return None;
        }
    };
    let name = std::env::var(SERVICE_NAME_VAR)
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| service.to_string());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(name).build())
        .build();
    let tracer = provider.tracer(service);
    // init_tracing runs once per process, so this is the only provider.
    let _ = PROVIDER.set(provider);
    ENABLED.store(true, Ordering::Relaxed);
    // Spans only, at `info` and above: log events stay in the log (an error message may
    // quote what an agent said), and `RUST_LOG` does not decide what is traced.
    let spans = tracing_subscriber::filter::filter_fn(|meta| {
        meta.is_span() && *meta.level() <= tracing::Level::INFO
    });
    Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(spans),
    )
}

/// Exports the spans still queued and stops the exporter. Each binary calls it once, on
/// its way out; without export it returns at once.
pub async fn shutdown() {
    let Some(provider) = PROVIDER.get().cloned() else {
        return;
    };
    // The flush blocks until the batch thread has sent, and the send runs on this runtime.
    let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    if let Ok(Err(e)) = flushed {
        tracing::warn!(error = %e, "traces not flushed at shutdown");
    }
}

/// Makes `traceparent` (from a request's headers) the parent of `span`. Without a valid
/// `traceparent`, `span` starts a trace of its own.
pub fn adopt_headers(span: &Span, headers: &HeaderMap) {
    if !enabled() {
        return;
    }
    if let Some(value) = headers.get(&TRACEPARENT).and_then(|v| v.to_str().ok()) {
        adopt_unchecked(span, value);
    }
}

/// Makes a stored `traceparent` the parent of `span`.
pub fn adopt(span: &Span, traceparent: Option<&str>) {
    if let Some(traceparent) = traceparent.filter(|_| enabled()) {
        adopt_unchecked(span, traceparent);
    }
}

/// Makes `parent` (a local span) the trace parent of `span`, whatever their places in
/// `tracing`'s tree (a background job's span is a root there, for its logs).
pub fn follow(span: &Span, parent: &Span) {
    if enabled() {
        let _ = span.set_parent(parent.context());
    }
}

fn adopt_unchecked(span: &Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACEPARENT.as_str().to_string(), traceparent.to_string())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// `span`'s `traceparent`, to store or send on; `None` when traces are off.
pub fn traceparent(span: &Span) -> Option<String> {
    if enabled() {
        traceparent_unchecked(span)
    } else {
        None
    }
}

fn traceparent_unchecked(span: &Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT.as_str())
}

/// Adds the current span's `traceparent` to an outgoing request (nothing when traces are
/// off).
pub fn propagate(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match traceparent(&Span::current()) {
        Some(value) => request.header(&TRACEPARENT, value),
        None => request,
    }
}

/// The exporter's HTTP client: the workspace's reqwest, run on the service's runtime. The
/// batch processor exports from a thread of its own with no runtime, where an async
/// client cannot run; spawning onto the runtime captured at start-up lets it.
#[derive(Debug)]
struct OnRuntime {
    /// Ensemble's client defaults, with the OTLP default timeout (10 s).
    client: reqwest::Client,
    /// The runtime the service runs on.
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let request = reqwest::Request::try_from(request)?;
        let sent = self.runtime.spawn(async move {
            let response = client.execute(request).await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            let mut answer = Response::new(body);
            *answer.status_mut() = status;
            *answer.headers_mut() = headers;
            Ok::<_, reqwest::Error>(answer)
        });
        Ok(sent.await??)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// A subscriber with the OTel layer over a provider that exports nowhere: spans get
    /// real ids, which is all propagation needs.
    fn with_layer(test: impl FnOnce()) {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, test);
    }

    #[test]
    fn a_span_adopting_a_traceparent_joins_its_trace_as_a_child() {
        with_layer(|| {
            let span = tracing::info_span!("child");
            adopt_unchecked(&span, CLIENT);
            let own = traceparent_unchecked(&span).expect("a traceparent");
            let parts: Vec<&str> = own.split('-').collect();
            assert_eq!(parts.len(), 4, "{own}");
            assert_eq!(parts[0], "00");
            assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
            assert_ne!(parts[2], "00f067aa0ba902b7", "a span of its own");
            assert_eq!(parts[3], "01", "sampled, as the client asked");
        });
    }

    #[test]
    fn a_malformed_traceparent_starts_a_trace_of_its_own() {
        with_layer(|| {
            for bad in [
                "",
                "garbage",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            ] {
                let span = tracing::info_span!("child");
                adopt_unchecked(&span, bad);
                let own = traceparent_unchecked(&span).expect("a traceparent");
                assert!(
                    !own.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
                    "{bad}: {own}"
                );
                assert!(
                    !own.contains("-00000000000000000000000000000000-"),
                    "{bad}: {own}"
                );
            }
        });
    }

    #[test]
    fn with_export_off_nothing_is_read_or_written() {
        // The layer is present here, so only the switch keeps the helpers quiet.
        with_layer(|| {
            assert!(!enabled(), "no test in this binary turns export on");
            let span = tracing::info_span!("child");
            let mut headers = HeaderMap::new();
            headers.insert(&TRACEPARENT, CLIENT.parse().expect("a header value"));
            adopt_headers(&span, &headers);
            assert_eq!(traceparent(&span), None);
            let unrelated = traceparent_unchecked(&span).expect("a traceparent");
            assert!(!unrelated.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
        });
    }
}

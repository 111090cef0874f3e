//! Routing: model aliases to ordered provider+model targets. A retryable failure (429, 5xx,
//! timeout, connection) is retried with exponential backoff and jitter, honouring the
//! upstream's `Retry-After`/`retryDelay` up to a cap, then the next target is tried. A
//! stream falls back only before its first event has been handed on; after that an error
//! ends it. Each provider has a cap on concurrent upstream requests.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, ProviderKind};
use crate::error::GatewayError;
use crate::metrics::{Endpoint, TargetMetrics};
use crate::openai::Usage;
use crate::providers::{
    ChatRequest, Completion, EmbeddingRequest, Embeddings, ErrorKind, EventStream, Provider,
    ProviderError, Providers, StreamEvent,
};

/// One provider+model an alias may be served by.
pub struct RoutedTarget {
    /// Which provider.
    pub kind: ProviderKind,
    /// The provider's model name.
    pub model: Arc<str>,
    provider: Arc<dyn Provider>,
    /// Shared by every target of the same provider.
    limiter: Arc<Semaphore>,
    chat_metrics: TargetMetrics,
    embedding_metrics: TargetMetrics,
}

impl RoutedTarget {
    /// The series this target records requests of `endpoint` in.
    fn metrics(&self, endpoint: Endpoint) -> &TargetMetrics {
        match endpoint {
            Endpoint::Chat => &self.chat_metrics,
            Endpoint::Embeddings => &self.embedding_metrics,
        }
    }
}

/// How the router retries and waits.
#[derive(Clone, Debug)]
struct Policy {
    request_timeout: Duration,
    max_retries: u32,
    retry_base: Duration,
    retry_max: Duration,
    queue_timeout: Duration,
}

/// Aliases and their targets; read-only after start, so requests share it without locks.
pub struct Router {
    aliases: HashMap<String, Vec<Arc<RoutedTarget>>>,
    /// Alias names in order, with the provider of their first target, for `/v1/models`.
    listing: Vec<(String, ProviderKind)>,
    policy: Policy,
}

/// What served a request.
#[derive(Clone, Debug)]
pub struct Served {
    /// The provider that answered.
    pub provider: ProviderKind,
    /// Its model.
    pub model: Arc<str>,
    /// Time spent outside the gateway: upstream calls, backoff sleeps, queueing for a slot.
    pub outside: Duration,
}

/// A streamed reply routed to one target: events until it ends; an error (upstream or a
/// stalled stream) is the last item.
pub struct RoutedStream {
    /// What serves it.
    pub served: Served,
    /// The events.
    pub events: EventStream,
}

/// A successful attempt and what it holds on to.
struct Routed<T> {
    value: T,
    permit: OwnedSemaphorePermit,
    target: Arc<RoutedTarget>,
    outside: Duration,
}

impl Router {
    /// Builds the alias table from `config` over `providers`.
    pub fn new(config: &Config, providers: &Providers) -> anyhow::Result<Self> {
        let limiters: HashMap<ProviderKind, Arc<Semaphore>> = ProviderKind::ALL
            .into_iter()
            .map(|kind| {
                let permits = config
                    .max_concurrency_per_provider
                    .min(Semaphore::MAX_PERMITS);
                (kind, Arc::new(Semaphore::new(permits)))
            })
            .collect();
        let mut aliases = HashMap::new();
        let mut listing = Vec::new();
        for (alias, targets) in config.aliases() {
            let mut routed = Vec::with_capacity(targets.len());
            for target in &targets {
                let provider = providers.get(target.provider).cloned().ok_or_else(|| {
                    anyhow::anyhow!(
                        "model alias `{alias}` uses provider `{}`, which is not set up",
                        target.provider
                    )
                })?;
                routed.push(Arc::new(RoutedTarget {
                    kind: target.provider,
                    model: Arc::from(target.model.as_str()),
                    provider,
                    limiter: limiters[&target.provider].clone(),
                    chat_metrics: TargetMetrics::new(
                        target.provider,
                        &target.model,
                        Endpoint::Chat,
                    ),
                    embedding_metrics: TargetMetrics::new(
                        target.provider,
                        &target.model,
                        Endpoint::Embeddings,
                    ),
                }));
            }
            if let Some(first) = targets.first() {
                listing.push((alias.clone(), first.provider));
            }
            aliases.insert(alias, routed);
        }
        Ok(Self {
            aliases,
            listing,
            policy: Policy {
                request_timeout: config.request_timeout(),
                max_retries: config.max_retries,
                retry_base: config.retry_base(),
                retry_max: config.retry_max(),
                queue_timeout: Duration::from_millis(config.queue_timeout_ms),
            },
        })
    }

    /// The provider and model of each of `alias`'s targets, in order; `None` for an unknown
    /// alias. The ledger asks before a call whether each has a price.
    pub fn targets(&self, alias: &str) -> Option<Vec<(ProviderKind, &str)>> {
        self.aliases
            .get(alias)
            .map(|targets| targets.iter().map(|t| (t.kind, &*t.model)).collect())
    }

    /// Every alias with the provider of its first target, in name order.
    pub fn aliases(&self) -> &[(String, ProviderKind)] {
        &self.listing
    }

    /// Answers `request` in one piece.
    pub async fn complete(
        &self,
        alias: &str,
        request: &ChatRequest,
    ) -> Result<(Completion, Served), GatewayError> {
        let started = Instant::now();
        let routed = self
            .route(alias, Endpoint::Chat, |provider, model| async move {
                provider.complete(&model, request).await
            })
            .await?;
        drop(routed.permit);
        let served = Served {
            provider: routed.target.kind,
            model: routed.target.model.clone(),
            outside: routed.outside,
        };
        routed
            .target
            .chat_metrics
            .finished(true, started.elapsed(), Some(routed.value.usage));
        Ok((routed.value, served))
    }

    /// Embeds `request`'s texts, with the same retries and fallback as a chat answer; a
    /// target that cannot take the request (not an embedding model, `dimensions` it lacks)
    /// is skipped for the next.
    pub async fn embed(
        &self,
        alias: &str,
        request: &EmbeddingRequest,
    ) -> Result<(Embeddings, Served), GatewayError> {
        let started = Instant::now();
        let routed = self
            .route(alias, Endpoint::Embeddings, |provider, model| async move {
                let embeddings = provider.embed(&model, request).await?;
                if embeddings.vectors.len() != request.inputs.len() {
                    return Err(ProviderError::new(
                        provider.kind(),
                        ErrorKind::Protocol,
                        format!(
                            "{} vectors for {} inputs",
                            embeddings.vectors.len(),
                            request.inputs.len()
                        ),
                    ));
                }
                Ok(embeddings)
            })
            .await?;
        drop(routed.permit);
        let served = Served {
            provider: routed.target.kind,
            model: routed.target.model.clone(),
            outside: routed.outside,
        };
        routed.target.embedding_metrics.finished(
            true,
            started.elapsed(),
            Some(Usage::new(routed.value.prompt_tokens, 0)),
        );
        Ok((routed.value, served))
    }

    /// Starts a streamed answer. Failures up to and including the first event fall back;
    /// later ones end the stream.
    pub async fn stream(
        &self,
        alias: &str,
        request: &ChatRequest,
    ) -> Result<RoutedStream, GatewayError> {
        let started = Instant::now();
        let routed = self
            .route(alias, Endpoint::Chat, |provider, model| async move {
                let mut events = provider.stream(&model, request).await?;
                match events.next().await {
                    Some(Err(e)) => Err(e),
                    Some(Ok(first)) => Ok((first, events)),
                    None => Err(ProviderError::new(
                        provider.kind(),
                        ErrorKind::Protocol,
                        "the upstream stream ended without an event",
                    )),
                }
            })
            .await?;
        let (first, upstream) = routed.value;
        let served = Served {
            provider: routed.target.kind,
            model: routed.target.model.clone(),
            outside: routed.outside,
        };
        let relay = Relay {
            first: Some(first),
            upstream,
            _permit: routed.permit,
            target: routed.target,
            timeout: self.policy.request_timeout,
            started,
            outside: routed.outside,
            usage: None,
            finished: false,
            failed: false,
            done: false,
        };
        Ok(RoutedStream {
            served,
            events: futures::stream::unfold(relay, Relay::next).boxed(),
        })
    }

    /// Tries the alias's targets in order until one succeeds.
    async fn route<T, F, Fut>(
        &self,
        alias: &str,
        endpoint: Endpoint,
        call: F,
    ) -> Result<Routed<T>, GatewayError>
    where
        F: Fn(Arc<dyn Provider>, Arc<str>) -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let targets = self
            .aliases
            .get(alias)
            .ok_or_else(|| GatewayError::ModelNotFound(alias.to_string()))?;
        let mut outside = Duration::ZERO;
        let mut last_error = None;
        for (index, target) in targets.iter().enumerate() {
            if index > 0 {
                target.metrics(endpoint).fallback();
                tracing::info!(alias, provider = %target.kind, model = %target.model, "falling back");
            }
            let mut retries = 0;
            loop {
                let queued = Instant::now();
                let permit = tokio::time::timeout(
                    self.policy.queue_timeout,
                    target.limiter.clone().acquire_owned(),
                )
                .await;
                outside += queued.elapsed();
                let Ok(Ok(permit)) = permit else {
                    target
                        .metrics(endpoint)
                        .error(ErrorKind::Saturated.as_str());
                    target
                        .metrics(endpoint)
                        .finished(false, Duration::ZERO, None);
                    last_error = Some(ProviderError::new(
                        target.kind,
                        ErrorKind::Saturated,
                        "too many concurrent upstream requests",
                    ));
                    break;
                };
                let attempt_started = Instant::now();
                let result = tokio::time::timeout(
                    self.policy.request_timeout,
                    call(target.provider.clone(), target.model.clone()),
                )
                .await
                .unwrap_or_else(|_| Err(timeout_error(target.kind)));
                let elapsed = attempt_started.elapsed();
                outside += elapsed;
                target.metrics(endpoint).attempt(elapsed);
                let error = match result {
                    Ok(value) => {
                        return Ok(Routed {
                            value,
                            permit,
                            target: target.clone(),
                            outside,
                        });
                    }
                    Err(error) => error,
                };
                drop(permit);
                target.metrics(endpoint).error(error.kind.as_str());
                tracing::warn!(
                    alias, provider = %target.kind, model = %target.model, retries,
                    error = %error, "upstream attempt failed"
                );
                if error.kind == ErrorKind::InvalidRequest {
                    // The request itself is at fault: another target would refuse it too.
                    target
                        .metrics(endpoint)
                        .finished(false, Duration::ZERO, None);
                    return Err(GatewayError::Upstream(error));
                }
                if !error.retryable() || retries >= self.policy.max_retries {
                    target
                        .metrics(endpoint)
                        .finished(false, Duration::ZERO, None);
                    last_error = Some(error);
                    break;
                }
                let delay = self.backoff(retries, error.retry_after);
                target.metrics(endpoint).retry();
                tokio::time::sleep(delay).await;
                outside += delay;
                retries += 1;
            }
        }
        Err(match last_error {
            Some(error) => GatewayError::Upstream(error),
            None => GatewayError::ModelNotFound(alias.to_string()),
        })
    }

    /// The wait before retry number `retry + 1`: the upstream's hint when it gave one,
    /// else exponential from `RETRY_BASE_MS` with equal jitter; never above `RETRY_MAX_MS`.
    fn backoff(&self, retry: u32, hint: Option<Duration>) -> Duration {
        if let Some(hint) = hint {
            return hint.min(self.policy.retry_max);
        }
        common::backoff::Backoff {
            base: self.policy.retry_base,
            max: self.policy.retry_max,
        }
        .delay(retry)
    }
}

fn timeout_error(kind: ProviderKind) -> ProviderError {
    ProviderError::new(
        kind,
        ErrorKind::Timeout,
        "no answer within REQUEST_TIMEOUT_MS",
    )
}

/// Hands a routed stream's events on: bounds each wait by `REQUEST_TIMEOUT_MS`, ends after an
/// error, treats an end without a finish reason as an error (a cut-off reply), and records
/// the request's metrics when dropped (finished, failed or abandoned by the client).
struct Relay {
    first: Option<StreamEvent>,
    upstream: EventStream,
    /// Held until the stream is done: it counts against the provider's concurrency cap.
    _permit: OwnedSemaphorePermit,
    target: Arc<RoutedTarget>,
    timeout: Duration,
    started: Instant,
    outside: Duration,
    usage: Option<Usage>,
    finished: bool,
    failed: bool,
    done: bool,
}

impl Relay {
    async fn next(mut self) -> Option<(Result<StreamEvent, ProviderError>, Self)> {
        if self.done {
            return None;
        }
        if let Some(first) = self.first.take() {
            self.observe(&first);
            return Some((Ok(first), self));
        }
        let waited = Instant::now();
        let next = tokio::time::timeout(self.timeout, self.upstream.next()).await;
        self.outside += waited.elapsed();
        let error = match next {
            Ok(Some(Ok(event))) => {
                self.observe(&event);
                return Some((Ok(event), self));
            }
            Ok(None) if self.finished => return None,
            Ok(None) => ProviderError::new(
                self.target.kind,
                ErrorKind::Protocol,
                "the upstream stream ended before the reply finished",
            ),
            Ok(Some(Err(error))) => error,
            Err(_) => timeout_error(self.target.kind),
        };
        tracing::warn!(provider = %self.target.kind, model = %self.target.model, error = %error, "stream failed mid-way");
        self.target.chat_metrics.error(error.kind.as_str());
        self.failed = true;
        self.done = true;
        Some((Err(error), self))
    }

    fn observe(&mut self, event: &StreamEvent) {
        match event {
            StreamEvent::Usage(usage) => self.usage = Some(*usage),
            StreamEvent::Finish(_) => self.finished = true,
            StreamEvent::Delta(_)
            | StreamEvent::ToolCallStart { .. }
            | StreamEvent::ToolCallArguments { .. } => {}
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let total = self.started.elapsed();
        let ok = self.finished && !self.failed;
        self.target.chat_metrics.finished(ok, total, self.usage);
        crate::metrics::overhead(crate::metrics::Mode::Stream, total, self.outside);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{AliasConfig, Target};
    use crate::providers::{Turn, TurnRole};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Fails `failures` times with `kind`, then answers.
    struct Flaky {
        failures: u32,
        kind: ErrorKind,
        calls: AtomicU32,
    }

    #[async_trait::async_trait]
    impl Provider for Flaky {
        fn kind(&self) -> ProviderKind {
            ProviderKind::Gemini
        }
        async fn complete(&self, _: &str, _: &ChatRequest) -> Result<Completion, ProviderError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(ProviderError::new(ProviderKind::Gemini, self.kind, "flaky"));
            }
            Ok(Completion {
                tool_calls: Vec::new(),
                text: "ok".into(),
                finish: crate::providers::FinishReason::Stop,
                usage: Usage::default(),
            })
        }
        async fn stream(&self, _: &str, _: &ChatRequest) -> Result<EventStream, ProviderError> {
            Err(ProviderError::new(ProviderKind::Gemini, self.kind, "no"))
        }
        async fn embed(&self, _: &str, _: &EmbeddingRequest) -> Result<Embeddings, ProviderError> {
            Err(ProviderError::new(ProviderKind::Gemini, self.kind, "no"))
        }
    }

    fn router(flaky: Arc<Flaky>, max_retries: u32) -> Router {
        let config = Config {
            auth_disabled: true,
            max_retries,
            retry_base_ms: 1,
            retry_max_ms: 5,
            models: [(
                "smart".to_string(),
                AliasConfig {
                    targets: vec![
                        Target {
                            provider: ProviderKind::Gemini,
                            model: "g".into(),
                        },
                        Target {
                            provider: ProviderKind::Mock,
                            model: "m".into(),
                        },
                    ],
                    cache_ttl_s: None,
                },
            )]
            .into(),
            ..Config::default()
        };
        let mut providers = Providers::default();
        providers.insert(flaky);
        providers.insert(Arc::new(crate::providers::mock::MockProvider::new(
            Duration::ZERO,
            0.0,
        )));
        Router::new(&config, &providers).unwrap()
    }

    fn ask() -> ChatRequest {
        ChatRequest {
            turns: vec![Turn {
                role: TurnRole::User,
                parts: vec![crate::providers::Part::Text("hi".into())],
            }],
            ..ChatRequest::default()
        }
    }

    fn flaky(failures: u32, kind: ErrorKind) -> Arc<Flaky> {
        Arc::new(Flaky {
            failures,
            kind,
            calls: AtomicU32::new(0),
        })
    }

    #[tokio::test]
    async fn retryable_failures_are_retried_on_the_same_target() {
        let f = flaky(2, ErrorKind::Unavailable);
        let (reply, served) = router(f.clone(), 2)
            .complete("smart", &ask())
            .await
            .unwrap();
        assert_eq!(reply.text, "ok");
        assert_eq!(served.provider, ProviderKind::Gemini);
        assert_eq!(f.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn exhausted_retries_fall_back_to_the_next_target() {
        let f = flaky(10, ErrorKind::RateLimited);
        let (_, served) = router(f.clone(), 1)
            .complete("smart", &ask())
            .await
            .unwrap();
        assert_eq!(served.provider, ProviderKind::Mock);
        assert_eq!(f.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn auth_failures_fall_back_without_retry_and_bad_requests_stop() {
        let f = flaky(10, ErrorKind::Auth);
        let (_, served) = router(f.clone(), 3)
            .complete("smart", &ask())
            .await
            .unwrap();
        assert_eq!(served.provider, ProviderKind::Mock);
        assert_eq!(f.calls.load(Ordering::SeqCst), 1);

        let f = flaky(10, ErrorKind::InvalidRequest);
        let err = router(f.clone(), 3)
            .complete("smart", &ask())
            .await
            .unwrap_err();
        assert!(
            matches!(err, GatewayError::Upstream(ref e) if e.kind == ErrorKind::InvalidRequest)
        );
        assert_eq!(f.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unknown_aliases_are_not_found() {
        let err = router(flaky(0, ErrorKind::Unavailable), 0)
            .complete("nope", &ask())
            .await
            .unwrap_err();
        assert!(matches!(err, GatewayError::ModelNotFound(_)));
    }

    #[test]
    fn backoff_honours_hints_up_to_the_cap_and_grows() {
        let r = router(flaky(0, ErrorKind::Unavailable), 0);
        assert_eq!(
            r.backoff(0, Some(Duration::from_millis(2))),
            Duration::from_millis(2)
        );
        assert_eq!(
            r.backoff(0, Some(Duration::from_secs(60))),
            Duration::from_millis(5)
        );
        for retry in 0..10 {
            let d = r.backoff(retry, None);
            assert!(d <= Duration::from_millis(5), "{d:?}");
        }
        assert!(r.backoff(0, None) >= Duration::from_micros(500));
    }
}

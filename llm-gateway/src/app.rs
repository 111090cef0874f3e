//! Builds the gateway's HTTP router and serves it: `/v1` behind the bearer token, the
//! operational routes open, every error in OpenAI's shape.

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::config::{Secret, Settings};
use common::redis::RedisPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DEFAULT_KEY};
use crate::error::GatewayError;
use crate::ledger::Ledger;
use crate::providers::{Overrides, Providers};
use crate::routes;
use crate::routing;

/// The service name in logs, `/health` and HTTP metrics.
pub const SERVICE: &str = "llm-gateway";

/// Prompts with long contexts are large; 8 MiB holds about two million tokens of text.
pub const BODY_LIMIT: usize = 8 * 1024 * 1024;

/// What every handler shares. Read-only after start.
pub struct AppState {
    /// Aliases, targets, retry policy, concurrency caps.
    pub router: routing::Router,
    /// The gateway keys: `GATEWAY_TOKEN` as [`DEFAULT_KEY`], then `[keys]`.
    pub keys: Vec<(Caller, Secret)>,
    /// `GATEWAY_OPERATOR_TOKEN`.
    pub operator_token: Secret,
    /// `AUTH_DISABLED`.
    pub auth_disabled: bool,
    /// With `USE_REDIS`: the pool the ledger, budgets, cache and replay use.
    pub redis: Option<RedisPool>,
    /// With `USE_REDIS`: the usage ledger and budgets (shared by the hooks that record
    /// answers after the handler returned, hence the `Arc`).
    pub ledger: Option<Arc<Ledger>>,
    /// With `USE_REDIS`: `Idempotency-Key` replay (without it the header is ignored).
    pub replay: Option<crate::replay::Replay>,
    /// With `USE_REDIS`: the response cache of aliases with `cache_ttl_s`.
    pub cache: Option<crate::cache::Cache>,
    /// Unix seconds at start, the `created` of every model in `/v1/models`.
    pub started_at: u64,
}

/// Serves on `listener` until `shutdown` is cancelled, with providers built from `config`.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with(config, Overrides::default(), listener, shutdown).await
}

/// Like [`serve`], with provider settings supplied by the caller (tests give Bedrock
/// static credentials this way).
pub async fn serve_with(
    config: Config,
    overrides: Overrides,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config
        .validate()
        .context("the llm-gateway's configuration is invalid")?;
    let providers = Providers::from_config(&config, overrides)
        .await
        .context("could not set up the model providers")?;
    let router = build(&config, &providers)?;
    if config.auth_disabled {
        tracing::warn!("AUTH_DISABLED=true: the gateway accepts every caller");
    }
    let aliases: Vec<String> = config.aliases().into_keys().collect();
    tracing::info!(
        address = %listener.local_addr()?,
        default_provider = %config.llm_provider,
        ?aliases,
        "llm-gateway listening"
    );
    common::http::serve(listener, router, shutdown).await?;
    Ok(())
}

/// The gateway's router over `providers`.
pub fn build(config: &Config, providers: &Providers) -> anyhow::Result<Router> {
    // The recorder must exist before the router caches its metric handles.
    common::telemetry::metrics();
    let redis = if config.use_redis {
        Some(RedisPool::new(&config.redis).context("the Redis settings are invalid")?)
    } else {
        None
    };
    let mut keys = vec![(Caller::new(DEFAULT_KEY), config.gateway_token.clone())];
    keys.extend(
        config
            .keys
            .iter()
            .map(|(name, key)| (Caller::new(name), key.token.clone())),
    );
    let state = Arc::new(AppState {
        router: routing::Router::new(config, providers)?,
        keys,
        operator_token: config.gateway_operator_token.clone(),
        auth_disabled: config.auth_disabled,
        redis: redis.clone(),
        ledger: redis
            .clone()
            .map(|pool| Arc::new(Ledger::new(config, pool))),
        replay: redis
            .clone()
            .map(|pool| crate::replay::Replay::new(pool, config)),
        cache: redis
            .clone()
            .map(|pool| crate::cache::Cache::new(pool, config)),
        started_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
    });
    let api = Router::new()
        .route("/v1/chat/completions", post(routes::chat::chat_completions))
        .route("/v1/embeddings", post(routes::embeddings::embeddings))
        .route("/v1/models", get(routes::models::list))
        .route("/v1/models/{*model}", get(routes::models::retrieve))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state.clone());
    // The operators' report: its own token, not the callers' keys.
    let operator = Router::new()
        .route("/v1/usage", get(routes::usage::usage))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_operator,
        ))
        .with_state(state);
    // The configuration was validated at start: readiness is Redis's, when it is used.
    let ready = match redis {
        Some(pool) => common::http::redis_ready(pool),
        None => common::http::always_ready(),
    };
    let router = api
        .merge(operator)
        .merge(common::http::ops_routes(SERVICE, ready));
    let router = common::http::finish_router_with(
        router,
        SERVICE,
        BODY_LIMIT,
        common::http::ErrorBodies {
            not_found: || GatewayError::RouteNotFound.into_response(),
            method_not_allowed: || GatewayError::MethodNotAllowed.into_response(),
        },
    );
    Ok(router)
}

/// The gateway key a request came with: its name in the ledger, budgets and replay records.
/// Handlers take it as an `Extension<Caller>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller(pub Arc<str>);

impl Caller {
    fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// Lets a request through with a known key's bearer token (any caller with auth disabled,
/// counted as [`DEFAULT_KEY`]), and tells the handler which key it was.
async fn require_token(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let presented = common::auth::bearer(req.headers());
    let caller = presented.and_then(|presented| {
        // Every key is compared, so the time taken does not tell which one matched.
        let mut found = None;
        for (caller, token) in &state.keys {
            if !token.is_empty() && common::auth::matches(token, presented) && found.is_none() {
                found = Some(caller.clone());
            }
        }
        found
    });
    match caller {
        Some(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        None if state.auth_disabled => {
            req.extensions_mut().insert(state.keys[0].0.clone());
            next.run(req).await
        }
        None => {
            crate::metrics::rejected("invalid_api_key");
            GatewayError::Unauthorized.into_response()
        }
    }
}

/// Lets a request through with `GATEWAY_OPERATOR_TOKEN` (compared in constant time), or
/// anyone with auth disabled. An empty operator token lets no one in.
async fn require_operator(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let presented = common::auth::bearer(req.headers());
    let operator = !state.operator_token.is_empty()
        && presented.is_some_and(|p| common::auth::matches(&state.operator_token, p));
    if operator || state.auth_disabled {
        next.run(req).await
    } else {
        crate::metrics::rejected("invalid_api_key");
        GatewayError::Unauthorized.into_response()
    }
}

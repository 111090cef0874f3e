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
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::GatewayError;
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
    /// `GATEWAY_TOKEN`.
    pub token: Secret,
    /// `AUTH_DISABLED`.
    pub auth_disabled: bool,
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
    let state = Arc::new(AppState {
        router: routing::Router::new(config, providers)?,
        token: config.gateway_token.clone(),
        auth_disabled: config.auth_disabled,
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
        .with_state(state);
    // The configuration was validated at start, so readiness needs no further check.
    let router = api.merge(common::http::ops_routes(
        SERVICE,
        common::http::always_ready(),
    ));
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

/// Lets a request through with the right bearer token (or with auth disabled).
async fn require_token(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let presented = common::auth::bearer(req.headers());
    if state.auth_disabled || presented.is_some_and(|t| common::auth::matches(&state.token, t)) {
        next.run(req).await
    } else {
        crate::metrics::rejected("invalid_api_key");
        GatewayError::Unauthorized.into_response()
    }
}

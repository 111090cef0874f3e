//! Builds the master: store, worker source, dispatcher, router; serves until shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use common::redis::{RedisPool, RedisSettings};
use common::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::dispatch::{Dispatcher, WorkerSource};
use crate::hub::Hub;
use crate::store::{RedisStore, StoreError, TaskStore};
use crate::tasks::Tasks;
use crate::{Config, routes};

/// Where the master keeps its state.
pub struct Backends {
    /// Where tasks live: Redis in production, the in-memory store where one process is
    /// the whole system (the launcher's quick start, tests).
    pub store: Arc<dyn TaskStore>,
    /// Where the dispatcher learns which workers are alive: the Redis registry, or a fixed
    /// list where the launcher starts the workers itself.
    pub workers: Arc<dyn WorkerSource>,
    /// Redis settings for the events subscription (other replicas' completions and new
    /// workers); `None` with the in-memory store.
    pub events: Option<RedisSettings>,
}

impl Backends {
    /// Redis for everything.
    pub fn redis(settings: &RedisSettings) -> anyhow::Result<Self> {
        let pool = RedisPool::new(settings)?;
        Ok(Self {
            store: Arc::new(RedisStore::new(pool.clone()).with_event_tail(settings.clone())),
            workers: Arc::new(Registry::new(pool)),
            events: Some(settings.clone()),
        })
    }
}

/// Serves the master on `listener` with Redis, until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let backends = Backends::redis(&config.redis)?;
    serve_with(config, listener, shutdown, backends).await
}

/// Serves the master with the given backends.
pub async fn serve_with(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    backends: Backends,
) -> anyhow::Result<()> {
    use common::config::Settings;
    config.validate()?;
    let auth = Auth::from_config(&config)?;
    if auth.disabled() {
        tracing::warn!(
            "AUTH_DISABLED=true: every caller is accepted as client `anonymous`; never do this outside a laptop"
        );
    }
    let config = Arc::new(config);
    let tracker = TaskTracker::new();
    let hub = Arc::new(Hub::default());
    let dispatcher = Dispatcher::new(
        config.clone(),
        backends.store.clone(),
        backends.workers.clone(),
        hub.clone(),
        tracker.clone(),
        shutdown.clone(),
    );
    dispatcher.start();
    crate::callbacks::spawn(
        config.clone(),
        backends.store.clone(),
        &tracker,
        shutdown.clone(),
    )?;
    if let Some(settings) = backends.events.clone() {
        let hub = hub.clone();
        let stop = shutdown.clone();
        tracker.spawn(async move { crate::dispatch::events::listen(settings, hub, stop).await });
    }
    let state = routes::AppState {
        tasks: Arc::new(Tasks::new(
            config.clone(),
            backends.store.clone(),
            backends.workers,
            dispatcher,
            hub,
            shutdown.clone(),
        )),
        auth: Arc::new(auth),
        long_polls: crate::limits::long_polls(&config),
        event_streams: Arc::new(routes::EventStreams(crate::limits::event_streams(&config))),
    };
    let store = backends.store;
    let ready: common::http::ReadyCheck = Arc::new(move || {
        let store = store.clone();
        Box::pin(async move { store.ping().await.map_err(StoreError::not_ready) })
    });
    let router = Router::new()
        .merge(routes::router(state))
        .merge(common::http::ops_routes("master", ready));
    let router = common::http::finish_router(router, "master", config.body_limit_bytes);
    tracing::info!(addr = %listener.local_addr()?, redis = %config.redis.target(), "master listening");
    common::http::serve(listener, router, shutdown.clone()).await?;
    shutdown.cancel();
    tracker.close();
    // Dispatches in progress finish (bounded by the dispatch timeout).
    let _ = tokio::time::timeout(Duration::from_secs(15), tracker.wait()).await;
    tracing::info!("master stopped");
    Ok(())
}

//! Builds the master's router and serves it.

use axum::Router;
use common::redis::RedisPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Config;

/// Serves the master on `listener` until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = RedisPool::new(&config.redis)?;
    tracing::info!(
        addr = %listener.local_addr()?,
        redis = %pool.target(),
        "master listening"
    );
    let router = Router::new().merge(common::http::ops_routes(
        "master",
        common::http::redis_ready(pool.clone()),
    ));
    let router = common::http::finish_router(router, "master", config.body_limit_bytes);
    common::http::serve(listener, router, shutdown).await?;
    Ok(())
}

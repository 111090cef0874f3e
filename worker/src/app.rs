//! Builds the worker and runs it: HTTP server, heartbeat, step runner, and the SIGTERM
//! drain that ties them together.
//!
//! The drain, in order: stop admitting (new `/work` gets `503`) and publish a record with
//! `draining: true` at once, so dispatchers pass this worker by while the leases of the
//! steps it holds are still extended; wait up to `SHUTDOWN_GRACE_MS` for those steps to run and
//! their results to be delivered; abandon whatever is left to lease expiry; deregister;
//! close the listener. Keeping the record (marked draining) until the held steps settle,
//! rather than deleting it first, is what keeps their leases alive during the drain.
//!
//! A worker whose results cannot reach the master is *degraded* (see `delivery`): its
//! record says so, `/work` answers `503 degraded`, `/ready` answers `503` with the reason,
//! and it probes the master until it answers again.
//!
//! A worker with `http` agents is *unavailable* while an agent service fails its health
//! check (see `agent_health`): its record says so, `/work` answers `503 agent_unavailable`
//! and `/ready` `503`, but the master keeps extending the leases of the steps it holds.

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::Context;
use common::config::{Secret, Settings};
use common::http::ReadyCheck;
use common::redis::{NotReady, RedisPool};
use common::registry::Registry;
use common::wire::WorkerRecord;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agent::Agents;
use crate::agent_health::AgentHealth;
use crate::config::Config;
use crate::delivery::{Delivery, MasterLink};
use crate::heartbeat::Heartbeat;
use crate::inflight::InFlight;
use crate::progress::ProgressForwarder;
use crate::runner::Runner;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Admits and runs steps.
    pub runner: Arc<Runner>,
    /// The token `/work` callers must present.
    pub worker_token: Secret,
    /// `AUTH_DISABLED`: accept any caller.
    pub auth_disabled: bool,
}

/// Serves with the built-in agents until `shutdown` fires, then drains; returns once the
/// drain is complete.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with_agents(config, listener, shutdown, Agents::new()).await
}

/// Like [`serve`], with Rust agents of the caller's. The worker serves the configured
/// `capabilities` (with the built-in agents `AGENT_KIND` / `[agents]` name) plus every
/// capability in `agents`; an agent in `agents` replaces the built-in one for its
/// capability.
pub async fn serve_with_agents(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    agents: Agents,
) -> anyhow::Result<()> {
    config
        .validate()
        .context("the worker's configuration is invalid")?;
    // Install the metrics recorder before the first step records anything.
    common::telemetry::metrics();
    let worker_id = config.worker_id()?;
    let recheck = Arc::new(Notify::new());
    // The agent services to watch: those of `http` capabilities not replaced by the
    // caller's own agents.
    let own = agents.capabilities();
    let health_urls: Vec<String> = config
        .http_capabilities()?
        .iter()
        .filter(|c| !own.contains(c))
        .filter_map(|c| config.agent_health_url_for(c.as_str()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let agents = Agents::from_config_with(&config, recheck.clone())?.overridden_by(agents);
    let bound = listener
        .local_addr()
        .context("the listener has no local address")?;
    let url = crate::metadata::advertise_url(&config, bound).await;
    if config.auth_disabled {
        tracing::warn!(
            "AUTH_DISABLED=true: /work accepts steps from ANY caller. Never run this way outside local development."
        );
    }
    tracing::info!(
        worker_id = %worker_id,
        address = %bound,
        url = %url,
        capabilities = ?agents.capabilities(),
        max_concurrency = config.max_concurrency,
        "worker listening"
    );

    let pool = RedisPool::new(&config.redis).context("the Redis settings are invalid")?;
    let in_flight = InFlight::new(config.max_concurrency as usize, worker_id.as_str());
    let heartbeat = Heartbeat::new(
        Registry::new(pool.clone()),
        WorkerRecord {
            // It takes as many steps in one request as it has slots (see routes/work.rs).
            max_batch: config
                .max_concurrency
                .min(u32::try_from(common::wire::MAX_BATCH).unwrap_or(u32::MAX)),
            ..WorkerRecord::starting(
                worker_id.clone(),
                url,
                agents.capabilities(),
                config.max_concurrency,
            )
        },
        in_flight.clone(),
        config.heartbeat_interval(),
        config.heartbeat_ttl(),
    );
    let agent_health = AgentHealth::new(
        health_urls,
        config.agent_health_interval(),
        crate::agents::http::client()?,
        in_flight.clone(),
        heartbeat.waker(),
        recheck,
    );
    let delivery = Delivery::new(
        &config.master_url,
        config.worker_token.clone(),
        config.result_delivery_timeout(),
        MasterLink::new(in_flight.clone(), heartbeat.waker()),
    );
    let progress = config.progress_flush().map(|flush| {
        ProgressForwarder::new(
            &config.master_url,
            config.worker_token.clone(),
            flush,
            worker_id.clone(),
        )
    });
    let runner = Arc::new(
        Runner::new(worker_id, agents, in_flight.clone(), delivery.clone()).with_progress(progress),
    );

    let state = AppState {
        runner: runner.clone(),
        worker_token: config.worker_token.clone(),
        auth_disabled: config.auth_disabled,
    };
    let router = crate::routes::router(state).merge(common::http::ops_routes(
        "worker",
        ready_check(in_flight.clone(), pool),
    ));
    let router = common::http::finish_router(router, "worker", config.body_limit_bytes);
    let server_stop = CancellationToken::new();
    let mut server = tokio::spawn(common::http::serve(listener, router, server_stop.clone()));
    // The listener is bound and serving: now the master may learn about us.
    let beats_stop = CancellationToken::new();
    let beats = tokio::spawn(heartbeat.clone().run(beats_stop.clone()));
    let probe = tokio::spawn(delivery.probe_while_degraded(beats_stop.clone()));
    let health = tokio::spawn(agent_health.run(beats_stop.clone()));

    let server_failed = tokio::select! {
        () = shutdown.cancelled() => None,
        result = &mut server => Some(result),
    };

    drain(&config, &in_flight, &runner, &heartbeat).await;
    beats_stop.cancel();
    let _ = beats.await;
    let _ = probe.await;
    let _ = health.await;
    heartbeat.deregister().await;
    server_stop.cancel();
    let served = match server_failed {
        Some(result) => result,
        None => server.await,
    };
    served
        .context("the HTTP server task failed")?
        .context("the HTTP server failed")?;
    tracing::info!("drained; stopping");
    Ok(())
}

/// `/ready`: `503 degraded` (with the reason as the message) while results cannot reach
/// the master, `503 agent_unavailable` while an agent service fails its health check, else
/// Redis's verdict.
fn ready_check(in_flight: Arc<InFlight>, pool: RedisPool) -> ReadyCheck {
    let redis = common::http::redis_ready(pool);
    Arc::new(move || {
        let not_ready = match (in_flight.degraded(), in_flight.unavailable()) {
            (Some(message), _) => Some(NotReady {
                reason: "degraded",
                message,
            }),
            (None, Some(message)) => Some(NotReady {
                reason: "agent_unavailable",
                message,
            }),
            (None, None) => None,
        };
        let redis = redis.clone();
        Box::pin(async move {
            match not_ready {
                Some(not_ready) => Err(not_ready),
                None => redis().await,
            }
        })
    })
}

/// Stops admitting, publishes the draining record, and waits up to `SHUTDOWN_GRACE_MS` for
/// the held steps to run and settle their results; abandons the rest to lease expiry.
async fn drain(config: &Config, in_flight: &InFlight, runner: &Runner, heartbeat: &Heartbeat) {
    in_flight.start_draining();
    heartbeat.beat_now();
    tracing::info!(
        held = in_flight.len(),
        grace_ms = config.shutdown_grace_ms,
        "draining: refusing new work, finishing held steps"
    );
    if tokio::time::timeout(config.shutdown_grace(), runner.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            abandoned = in_flight.len(),
            "the shutdown grace ran out; abandoning the remaining steps to lease expiry"
        );
        runner.abandon().await;
    }
}

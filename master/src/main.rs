//! The `master` binary: loads its settings and serves until SIGTERM or ctrl-c.

use anyhow::Context;

/// mimalloc rather than glibc's malloc, as in the llm-gateway: a task makes many small allocations (request and reply bodies, Redis replies, JSON), freed on other threads as often as not; under Q1 glibc's malloc/free were about 15 % of the master's CPU. The binary only:
/// the library (tests, the bench's in-process mode, the launcher) keeps its host's
/// allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::telemetry::init_tracing("master");
    // Before listening: every connection is a file descriptor.
    common::limits::raise_nofile();
    let config: master::Config =
        common::config::load().context("the master's configuration is invalid")?;
    let listener = common::http::bind(&format!("{}:{}", config.host, config.port)).await?;
    let shutdown = common::shutdown::on_signal();
    let served = master::serve(config, listener, shutdown).await;
    // The spans of the last requests, which the batch exporter may still hold.
    common::traces::shutdown().await;
    served
}

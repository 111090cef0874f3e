//! The `worker` binary: loads its settings, serves until SIGTERM or ctrl-c, then drains.

use anyhow::Context;

/// mimalloc rather than glibc's malloc, as in the llm-gateway: each step's request, agent call and report allocate and free on different threads. The binary only:
/// the library (tests, the bench's in-process mode, the launcher) keeps its host's
/// allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::telemetry::init_tracing("worker");
    // Before listening: every connection is a file descriptor.
    common::limits::raise_nofile();
    let config: worker::Config =
        common::config::load().context("the worker's configuration is invalid")?;
    let listener = common::http::bind(&format!("{}:{}", config.host, config.port)).await?;
    let shutdown = common::shutdown::on_signal();
    let served = worker::serve(config, listener, shutdown).await;
    // The spans of the last requests, which the batch exporter may still hold.
    common::traces::shutdown().await;
    served
}

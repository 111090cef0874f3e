//! The `llm-gateway` binary: loads its settings and serves until SIGTERM or ctrl-c.

use anyhow::Context;

/// mimalloc rather than glibc's malloc: a request makes about a hundred small allocations,
/// freed on other threads as often as not, and malloc/free were about a fifth of the
/// gateway's instructions per request. The binary only: the library (tests, the bench's
/// in-process mode) keeps its host's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::telemetry::init_tracing("llm-gateway");
    // Before listening: every connection is a file descriptor.
    common::limits::raise_nofile();
    let config: llm_gateway::Config =
        common::config::load().context("the llm-gateway's configuration is invalid")?;
    let listener = common::http::bind(&format!("{}:{}", config.host, config.port)).await?;
    let shutdown = common::shutdown::on_signal();
    let served = llm_gateway::serve(config, listener, shutdown).await;
    // The spans of the last requests, which the batch exporter may still hold.
    common::traces::shutdown().await;
    served
}

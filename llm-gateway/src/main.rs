//! The `llm-gateway` binary: loads its settings and serves until SIGTERM or ctrl-c.

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::telemetry::init_tracing();
    // Before listening: every connection is a file descriptor.
    common::limits::raise_nofile();
    let config: llm_gateway::Config =
        common::config::load().context("the llm-gateway's configuration is invalid")?;
    let listener = common::http::bind(&format!("{}:{}", config.host, config.port)).await?;
    let shutdown = common::shutdown::on_signal();
    llm_gateway::serve(config, listener, shutdown).await
}

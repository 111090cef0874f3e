//! The `worker` binary: loads its settings, serves until SIGTERM or ctrl-c, then drains.

use anyhow::Context;

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

//! The worker's integration tests: one binary, with a real redis-server per test, a fake
//! master and a fake llm-gateway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod batches;
mod degraded;
mod delivery;
mod drain;
mod heartbeat;
mod helpers;
mod http_agent;
mod llm;
mod metadata;
mod progress;
mod work;

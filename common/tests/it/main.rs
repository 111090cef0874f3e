//! Integration tests of `common` against a real redis-server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

mod config;
mod failover;
mod redis;
mod registry;
mod wire;

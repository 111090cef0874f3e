//! Deployment checks: `docker-compose.yml` and `deploy/terraform` held against the settings
//! each service's `Config` really reads (names, required settings, ports, health checks).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod compose;
mod helpers;
mod terraform;

//! Reliability scenarios with real processes: `ensemble-node` masters and workers, a real
//! `redis-server` with AOF, loopback only, every wait bounded. Each scenario prints
//! `scenario <name>: accepted N, succeeded N, failed N, lost 0, duplicate-results 0,
//! re-executed K` (run with `cargo test -p reliability -- --nocapture` to see it; the lines
//! are also appended to `$CARGO_TARGET_DIR/reliability-report.txt`) and asserts that nothing
//! was lost or recorded twice. `ENSEMBLE_SOAK=1` runs heavier variants.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod chaos;
mod failover;
mod helpers;
mod lease;
mod misbehaving;
mod proxy;
mod shutdown;
mod workflows;

//! Deployment and protocol checks: tests that hold `docker-compose.yml` and
//! `deploy/terraform` against the settings each service really reads, and the worker
//! protocol's generated schemas against the Rust types (`protocol`). The tests live in
//! `tests/`; `protocol/` holds the conformance test a worker in any language can run.

pub mod protocol;

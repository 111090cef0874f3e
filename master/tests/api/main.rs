//! Integration tests of the master: real redis-server, real HTTP, and the kit's fake
//! workers (`testkit::fakes::worker`), which follow the worker protocol.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;

mod batches;
mod bulk;
mod callbacks;
mod conformance;
mod dashboard;
mod degraded;
mod e2e;
mod errors;
mod fuzz;
mod hardening;
mod lists;
mod longpoll;
mod model;
mod ops;
mod storage;
mod streams;
mod usage;
mod workflows;

//! Tests of the kit itself: the redis-server launcher's errors, the service handle's stop
//! order and log capture, and a whole system started by the builder.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod redis;
mod service;
mod system;

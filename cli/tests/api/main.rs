//! Integration tests of the `ensemble` command: the demo, `up` with the client commands,
//! and the whole system as separate processes on a TLS + AUTH Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;

mod budget;
mod client;
mod demo;
mod e2e;
mod traces;
mod watch;

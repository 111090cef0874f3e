//! Starts Ensemble systems for the launcher, the benchmark, the reliability scenarios and
//! every test suite, so that each of them starts things the same way.
//!
//! - [`redis`]: a real `redis-server` (plain, AUTH, ACL user, TLS with generated
//!   certificates, AOF) on a free loopback port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod redis;

use std::net::TcpListener;
use std::time::Duration;

pub use redis::{RedisOptions, RedisServer, TlsFiles};

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Polls `check` every 20 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

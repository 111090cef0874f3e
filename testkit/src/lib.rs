//! Starts Ensemble systems for the launcher, the benchmark, the reliability scenarios and
//! every test suite, so that each of them starts things the same way.
//!
//! Which to use when:
//!
//! - [`system`]: a whole system (Redis or memory, a gateway, masters, workers), in this
//!   process or as child processes, configured through each service's typed config and
//!   stopped in order. Start here: `System::builder().workers(4).start().await?`. The
//!   `ensemble` launcher, the benchmark and the reliability scenarios are built on it.
//! - [`service`]: one service handle, for a test that starts a single service itself
//!   (with `serve_with` and its own backends, say) or runs another binary (`ensemble up`):
//!   readiness, log, ordered stop, `kill -9`, pid.
//! - [`redis`]: a real `redis-server` (plain, AUTH, ACL user, TLS with generated
//!   certificates, AOF) on a free loopback port. `try_start` returns errors (the
//!   launcher); `start` and friends panic (tests).
//! - [`fakes`]: every fake (worker, master, gateway, Gemini, Bedrock), scripted.
//! - [`events`]: completions counted per task from the store's own announcements, for a
//!   test that must show something finished exactly once.

// The launcher builds on `system`, `service` and `redis`, which return errors. The fakes,
// the event counter and `free_port` serve tests only, where a panic is the failure report.
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod events;
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod fakes;
pub mod redis;
pub mod service;
pub mod sse;
pub mod system;

use std::net::TcpListener;
use std::time::Duration;

pub use events::DoneEvents;
pub use redis::{RedisOptions, RedisServer, RedisStartError, TlsFiles};
pub use service::{Exit, Service};
pub use system::{Base, Binaries, Role, Store, System};

/// A free TCP port on 127.0.0.1 for something else to bind (a child process, a server
/// started later): see [`reserve_port`].
#[allow(clippy::expect_used)]
pub fn free_port() -> u16 {
    let l = reserve_port().expect("a free loopback port");
    l.local_addr().expect("local addr").port()
}

/// A listener on a free loopback port below the kernel's ephemeral range, to be released
/// when another process is about to bind the port. Port 0 would come from the ephemeral
/// range, where every outgoing connection of every test running at the same time also takes
/// its local port: released, such a port was taken again before a child could bind it
/// ("Address already in use"). Below the range only other reservations like this one
/// compete, at random.
pub fn reserve_port() -> std::io::Result<TcpListener> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 12_000 {
        for _ in 0..200 {
            let port = rand::random_range(10_000..low);
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
                return Ok(listener);
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
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

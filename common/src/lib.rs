//! Pieces every Ensemble service shares: wire types, configuration, telemetry, the Redis
//! pool, HTTP helpers, auth helpers, graceful shutdown and the worker registry.

pub mod auth;
pub mod backoff;
pub mod config;
pub mod http;
pub mod limits;
pub mod redis;
pub mod registry;
pub mod shutdown;
pub mod sse;
pub mod telemetry;
pub mod traces;
pub mod usage;
pub mod wire;

/// The version every service reports (in `/health`, worker records and logs).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Installs rustls's process-wide crypto provider (aws-lc-rs) once. Both the Redis client
/// and reqwest use rustls; an explicit provider avoids a panic if a dependency ever enables
/// a second one.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

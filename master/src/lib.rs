//! The Ensemble master: task intake, the task store, capability dispatch, leases, retries,
//! dead letters and results.

pub mod app;
pub mod auth;
pub mod callbacks;
pub mod config;
pub mod dispatch;
pub mod emf;
mod error;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod routes;
pub mod store;
pub(crate) mod tasks;

pub use app::{Backends, serve, serve_with};
pub use config::Config;

//! The Ensemble master: task intake, the task store, capability dispatch, leases, retries,
//! dead letters and results.

pub(crate) mod app;
pub(crate) mod auth;
pub(crate) mod callbacks;
pub mod config;
pub mod dispatch;
pub mod emf;
mod error;
pub mod graph;
pub(crate) mod hub;
pub(crate) mod limits;
pub mod metrics;
pub(crate) mod routes;
pub(crate) mod session;
pub mod store;
pub(crate) mod tasks;

pub use app::{Backends, serve, serve_with};
pub use config::Config;

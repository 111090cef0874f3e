//! The Ensemble master: task intake, the task store, dispatch and results.

pub mod app;
pub mod config;

pub use app::serve;
pub use config::Config;

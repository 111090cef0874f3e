//! The Ensemble worker: registers itself in the Redis registry and keeps a heartbeat,
//! accepts steps on `POST /work`, runs them with agents (built-in `llm` and `echo`, `http`
//! for an agent service in any language, or Rust agents of your own), delivers results to
//! the master, and drains on SIGTERM.

pub mod agent;
pub mod agent_health;
pub mod agents;
pub mod app;
pub mod config;
pub mod delivery;
pub mod error;
pub mod heartbeat;
pub mod inflight;
pub mod metadata;
pub mod metrics;
pub mod progress;
mod routes;
pub mod runner;

pub use agent::{
    Agent, Agents, CountPartials, Progress, current_progress, current_request_id, with_progress,
};
pub use agents::{AgentRequest, EchoAgent, HttpAgent, LlmAgent, LlmSettings};
pub use app::{serve, serve_with_agents};
pub use config::{AgentKind, Config};

/// Re-exported so agent crates need not depend on `async-trait` themselves to name it.
pub use async_trait::async_trait;

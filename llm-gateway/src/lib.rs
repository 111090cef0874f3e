//! The Ensemble llm-gateway: one OpenAI-compatible chat-completions and embeddings API in
//! front of Google Gemini, AWS Bedrock and a deterministic mock, with streaming, retries,
//! fallback across providers, per-provider concurrency caps and Prometheus metrics.

pub mod app;
pub mod cache;
pub mod config;
pub mod error;
pub mod ledger;
pub mod metrics;
pub mod openai;
pub mod providers;
pub mod replay;
pub mod routes;
pub mod routing;

pub use app::{serve, serve_with};
pub use config::Config;

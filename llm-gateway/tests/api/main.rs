//! The llm-gateway's integration tests: the real server on a free port, talked to by a real
//! OpenAI client library and by plain HTTP, with the real Gemini and Bedrock provider code
//! against local fakes that speak each provider's wire format.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bedrock;
mod cache;
mod embeddings;
mod errors;
mod gemini;
mod helpers;
mod ledger;
mod openai_client;
mod replay;
mod routing;
mod tools;

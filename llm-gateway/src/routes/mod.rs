//! Thin HTTP handlers: parse, call the router, shape the answer in OpenAI's format.

pub mod chat;
pub mod models;

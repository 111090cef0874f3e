//! The built-in agents: `llm` (a prompt per capability, sent to the llm-gateway) and `echo`
//! (returns its input).

mod echo;
mod llm;
pub mod prompt;

pub use echo::EchoAgent;
pub use llm::{LlmAgent, LlmSettings};

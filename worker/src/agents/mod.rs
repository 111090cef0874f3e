//! The built-in agents: `llm` (a prompt per capability, sent to the llm-gateway), `echo`
//! (returns its input) and `http` (POSTs the step to an agent service in any language).

mod echo;
pub mod http;
mod llm;
pub mod prompt;

pub use echo::EchoAgent;
pub use http::{AgentRequest, HttpAgent};
pub use llm::{LlmAgent, LlmSettings};

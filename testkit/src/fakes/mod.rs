//! Every fake in one place, so each speaks its protocol one way for every suite: what
//! cannot run here (Gemini, Bedrock) and what a test must script or watch (a worker that
//! misbehaves, a master or a gateway that answers on cue and records what it received).
//!
//! - [`worker`]: a worker following the protocol (registry heartbeat, `POST /work`,
//!   `POST {master}/result`) whose behaviour per capability is scripted.
//! - [`master`]: `POST /result` and `POST /progress` recorded and answered from scripts;
//!   stops and restarts.
//! - [`gateway`]: an llm-gateway's chat completions, recorded and scripted.
//! - [`gemini`], [`bedrock`]: the providers' wire formats, checked as they check them.
//!
//! They share one server ([`Fake`]): a script of replies, the requests seen, a delay.

pub mod bedrock;
pub mod gateway;
pub mod gemini;
pub mod master;
mod server;
pub mod worker;

pub use bedrock::FakeBedrock;
pub use gateway::FakeGateway;
pub use gemini::FakeGemini;
pub use master::FakeMaster;
pub use server::{Fake, Received, Script};
pub use worker::{Behavior, FakeWorker};

//! The `echo` agent: returns the step's input as its output. For tests, benchmarks and
//! pipelines that only move data.

use async_trait::async_trait;
use common::wire::{StepError, WorkRequest};
use serde_json::Value;

use crate::agent::Agent;

/// Returns the step's input unchanged.
#[derive(Clone, Copy, Debug, Default)]
pub struct EchoAgent;

#[async_trait]
impl Agent for EchoAgent {
    async fn handle(&self, step: &WorkRequest) -> Result<Value, StepError> {
        Ok(step.input.clone())
    }
}

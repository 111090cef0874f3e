//! The `echo` agent: returns the step's input as its output. For tests, benchmarks and
//! pipelines that only move data. An input object with a numeric `"echo_delay_ms"` makes
//! it wait that long first (capped at one minute), so reliability tests can catch steps in
//! the middle of their work.

use std::time::Duration;

use async_trait::async_trait;
use common::wire::{StepError, WorkRequest};
use serde_json::Value;

use crate::agent::Agent;

/// Longest delay an input may ask for.
const MAX_DELAY: Duration = Duration::from_secs(60);

/// Returns the step's input unchanged.
#[derive(Clone, Copy, Debug, Default)]
pub struct EchoAgent;

#[async_trait]
impl Agent for EchoAgent {
    async fn handle(&self, step: &WorkRequest) -> Result<Value, StepError> {
        if let Some(ms) = step.input.get("echo_delay_ms").and_then(Value::as_u64) {
            tokio::time::sleep(Duration::from_millis(ms).min(MAX_DELAY)).await;
        }
        Ok(step.input.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::wire::{Capability, StepContext, TaskId};
    use serde_json::json;

    fn step(input: Value) -> WorkRequest {
        WorkRequest {
            task_id: TaskId::generate(),
            step: 0,
            attempt: 1,
            capability: Capability::new("echo").unwrap(),
            input,
            context: StepContext::default(),
            deadline_ms: u64::MAX,
            worker_id: None,
            request_id: None,
        }
    }

    #[tokio::test]
    async fn echoes_and_waits_when_asked() {
        let started = tokio::time::Instant::now();
        let out = EchoAgent
            .handle(&step(json!({"echo_delay_ms": 30, "x": 1})))
            .await
            .unwrap();
        assert_eq!(out, json!({"echo_delay_ms": 30, "x": 1}));
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(
            EchoAgent.handle(&step(json!([1, 2]))).await.unwrap(),
            json!([1, 2])
        );
    }
}

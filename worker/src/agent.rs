//! The agent trait, which does a step's actual work, and the capability → agent table a
//! worker serves.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use common::wire::{Capability, StepError, WorkRequest};
use serde_json::Value;

use tokio::sync::Notify;

use crate::agents::{EchoAgent, HttpAgent, LlmAgent};
use crate::config::{AgentKind, Config};

/// Does the work of a step. The worker calls `handle` once per accepted step attempt, under
/// the step's deadline; the returned value becomes the step's output.
///
/// Return `Err(StepError::retryable(..))` for failures another attempt may fix (an upstream
/// 429 or 5xx, a network error) and `Err(StepError::permanent(..))` for ones it would
/// repeat (bad input, a 4xx). Agents need not enforce the deadline: the worker drops the
/// future when it passes and reports a retryable `timeout`.
#[async_trait]
pub trait Agent: Send + Sync {
    /// Runs one step.
    async fn handle(&self, step: &WorkRequest) -> Result<Value, StepError>;
}

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The request id of the step being handled (the master's `x-request-id`), for agents that
/// pass it on, as the `llm` agent does to the gateway.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Runs `fut` with `request_id` visible to [`current_request_id`].
pub(crate) async fn with_request_id<F: Future>(request_id: String, fut: F) -> F::Output {
    REQUEST_ID.scope(request_id, fut).await
}

/// Where an agent sends *partial output*: messages it has before its final answer (the
/// `llm` agent's tokens as `{"delta": "<text>"}`, the `http` agent's stream events before
/// the last). The runner puts a [`crate::progress::AttemptProgress`] in place around each
/// step attempt, which counts them and forwards them to the master's `POST /progress`;
/// with `PROGRESS_FLUSH_MS=0` (or outside a step) they are only counted ([`CountPartials`]).
pub trait Progress: Send + Sync {
    /// One partial message of `step`, in the order the agent produced them.
    fn partial(&self, step: &WorkRequest, message: &Value);
}

/// The default [`Progress`]: counts partial messages per capability
/// (`ensemble_worker_agent_partials_total`) and logs each at debug.
#[derive(Clone, Copy, Debug, Default)]
pub struct CountPartials;

impl Progress for CountPartials {
    fn partial(&self, step: &WorkRequest, message: &Value) {
        ::metrics::counter!(
            crate::metrics::AGENT_PARTIALS,
            "capability" => step.capability.to_string(),
        )
        .increment(1);
        tracing::debug!(partial = %message, "partial output");
    }
}

tokio::task_local! {
    static PROGRESS: Arc<dyn Progress>;
}

/// Where the step being handled sends partial output: what [`with_progress`] set, else
/// [`CountPartials`].
pub fn current_progress() -> Arc<dyn Progress> {
    PROGRESS
        .try_with(Clone::clone)
        .unwrap_or_else(|_| Arc::new(CountPartials))
}

/// Runs `fut` with `progress` as its [`current_progress`].
pub async fn with_progress<F: Future>(progress: Arc<dyn Progress>, fut: F) -> F::Output {
    PROGRESS.scope(progress, fut).await
}

/// Which agent serves each capability.
#[derive(Clone, Default)]
pub struct Agents {
    by_capability: BTreeMap<Capability, Arc<dyn Agent>>,
}

impl std::fmt::Debug for Agents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.by_capability.keys()).finish()
    }
}

impl Agents {
    /// No agents.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the agent for a capability.
    pub fn insert(&mut self, capability: Capability, agent: Arc<dyn Agent>) {
        self.by_capability.insert(capability, agent);
    }

    /// Builder form of [`Self::insert`].
    pub fn with(mut self, capability: Capability, agent: Arc<dyn Agent>) -> Self {
        self.insert(capability, agent);
        self
    }

    /// The agent for a capability.
    pub fn get(&self, capability: &Capability) -> Option<&Arc<dyn Agent>> {
        self.by_capability.get(capability)
    }

    /// The capabilities served, in order.
    pub fn capabilities(&self) -> Vec<Capability> {
        self.by_capability.keys().cloned().collect()
    }

    /// Whether no capability is served.
    pub fn is_empty(&self) -> bool {
        self.by_capability.is_empty()
    }

    /// The built-in agents for the configured capabilities (`AGENT_KIND`, `[agents]`).
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        Self::from_config_with(config, Arc::new(Notify::new()))
    }

    /// [`Self::from_config`], with `http` agents that wake `recheck` when their service
    /// refuses a connection, so the health task looks at once rather than at its next tick.
    pub(crate) fn from_config_with(config: &Config, recheck: Arc<Notify>) -> anyhow::Result<Self> {
        let mut agents = Self::new();
        let mut llm: Option<Arc<dyn Agent>> = None;
        let echo: Arc<dyn Agent> = Arc::new(EchoAgent);
        // One connection pool for every `http` capability.
        let http_client = crate::agents::http::client()?;
        for capability in config.capability_list()? {
            let agent = match config.agent_kind_for(capability.as_str()) {
                AgentKind::Echo => echo.clone(),
                AgentKind::Llm => match &llm {
                    Some(agent) => agent.clone(),
                    None => {
                        let agent: Arc<dyn Agent> = Arc::new(LlmAgent::from_config(config)?);
                        llm = Some(agent.clone());
                        agent
                    }
                },
                AgentKind::Http => Arc::new(
                    HttpAgent::from_config(config, capability.as_str(), http_client.clone())?
                        .with_recheck(recheck.clone()),
                ),
            };
            agents.insert(capability, agent);
        }
        Ok(agents)
    }

    /// `self` with the agents of `other` added, replacing any for the same capability.
    pub fn overridden_by(mut self, other: Agents) -> Self {
        self.by_capability.extend(other.by_capability);
        self
    }
}

impl FromIterator<(Capability, Arc<dyn Agent>)> for Agents {
    fn from_iter<I: IntoIterator<Item = (Capability, Arc<dyn Agent>)>>(iter: I) -> Self {
        Self {
            by_capability: iter.into_iter().collect(),
        }
    }
}

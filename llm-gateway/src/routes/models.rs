//! `GET /v1/models` and `GET /v1/models/{model}`: the aliases the gateway serves.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};

use crate::app::AppState;
use crate::error::GatewayError;
use crate::openai::{Model, ModelList};

/// Every alias.
pub async fn list(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: state
            .router
            .aliases()
            .iter()
            .map(|(alias, provider)| model(&state, alias, provider.as_str()))
            .collect(),
    })
}

/// One alias, `404` in OpenAI's shape when unknown.
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Path(wanted): Path<String>,
) -> Result<Json<Model>, GatewayError> {
    state
        .router
        .aliases()
        .iter()
        .find(|(alias, _)| *alias == wanted)
        .map(|(alias, provider)| Json(model(&state, alias, provider.as_str())))
        .ok_or(GatewayError::ModelNotFound(wanted))
}

fn model(state: &AppState, alias: &str, provider: &str) -> Model {
    Model {
        id: alias.to_string(),
        object: "model",
        created: state.started_at,
        owned_by: provider.to_string(),
    }
}

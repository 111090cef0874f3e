//! `POST /work`: the master hands over one step, or a batch of them (a JSON array, to a
//! worker whose record has `max_batch` above 1). Checks the worker token, parses the
//! steps, and answers at once; the steps run in the background.

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use common::http::JsonBody;
use common::telemetry::RequestId;
use common::wire::{WorkAccepted, WorkBatchAnswer, WorkItemAnswer, WorkRequest, batch_elements};
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::app::AppState;
use crate::error::WorkError;
use crate::runner::Accepted;

/// Proof that the caller presented the worker token (or that auth is disabled). Extracted
/// before the body, so an unauthenticated caller learns nothing about what it sent.
pub struct Authorized;

impl FromRequestParts<AppState> for Authorized {
    type Rejection = WorkError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, WorkError> {
        if state.auth_disabled {
            return Ok(Self);
        }
        match common::auth::bearer(&parts.headers) {
            Some(token) if common::auth::matches(&state.worker_token, token) => Ok(Self),
            _ => Err(WorkError::Unauthorized),
        }
    }
}

/// The body of `POST /work`: one step (an object), or a batch (an array of steps, each
/// parsed on its own so that one malformed step is refused alone).
pub enum WorkBody {
    /// One step.
    One(Box<WorkRequest>),
    /// A batch, unparsed.
    Many(Vec<Box<RawValue>>),
}

impl<'de> serde::Deserialize<'de> for WorkBody {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Body;
        impl<'de> Visitor<'de> for Body {
            type Value = WorkBody;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a step (an object) or a batch of steps (an array)")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<WorkBody, A::Error> {
                let step = serde::Deserialize::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(WorkBody::One(Box::new(step)))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<WorkBody, A::Error> {
                Ok(WorkBody::Many(batch_elements(
                    seq,
                    "steps",
                    common::wire::MAX_BATCH,
                )?))
            }
        }
        deserializer.deserialize_any(Body)
    }
}

/// `202 {"accepted": true}` for a started (or already running) step; for a batch, `200`
/// with one answer per step (`WorkBatchAnswer`).
pub async fn accept(
    _: Authorized,
    State(state): State<AppState>,
    request_id: Option<axum::Extension<RequestId>>,
    JsonBody(body): JsonBody<WorkBody>,
) -> Result<Response, WorkError> {
    let request_id = request_id.map(|r| r.0.0).unwrap_or_default();
    let steps = match body {
        WorkBody::One(step) => {
            let body = WorkAccepted {
                accepted: true,
                duplicate: state.runner.accept(*step, request_id)? == Accepted::Duplicate,
            };
            return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
        }
        WorkBody::Many(steps) if steps.is_empty() => {
            return Err(WorkError::Invalid("the batch holds no step".into()));
        }
        WorkBody::Many(steps) => steps,
    };
    let answers = steps
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let taken = serde_json::from_str::<WorkRequest>(raw.get())
                .map_err(|e| WorkError::Invalid(format!("step {i} of the batch: {e}")))
                .and_then(|mut step| {
                    // Each step's own request id; else the request's, numbered.
                    let id = step
                        .request_id
                        .take()
                        .unwrap_or_else(|| format!("{request_id}-{i}"));
                    state.runner.accept(step, id)
                });
            match taken {
                Ok(accepted) => WorkItemAnswer {
                    status: StatusCode::ACCEPTED.as_u16(),
                    duplicate: accepted == Accepted::Duplicate,
                    error: None,
                },
                Err(refused) => {
                    let error = refused.api_error();
                    WorkItemAnswer {
                        status: error.status.as_u16(),
                        duplicate: false,
                        error: Some(common::http::ErrorDetail {
                            code: error.code.to_string(),
                            message: error.message,
                        }),
                    }
                }
            }
        })
        .collect();
    Ok((StatusCode::OK, Json(WorkBatchAnswer { steps: answers })).into_response())
}

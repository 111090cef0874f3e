//! `POST /v1/embeddings`: OpenAI's request in, one vector per input out, as numbers or as
//! base64 little-endian `f32` bytes.

use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::app::{AppState, Caller};
use crate::error::GatewayError;
use crate::openai::{
    EmbeddingData, EmbeddingList, EmbeddingUsage, EmbeddingVector, EmbeddingsRequest,
    EncodingFormat,
};
use crate::providers::EmbeddingRequest;
use crate::routes::{parse, respond, served_headers};

/// The handler.
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    respond(answer(&state, &caller, &headers, body, started).await)
}

async fn answer(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    started: Instant,
) -> Result<Response, GatewayError> {
    let request: EmbeddingsRequest = parse(body)?;
    let embed = EmbeddingRequest::from_openai(&request)?;
    let format = request.encoding_format.unwrap_or_default();
    let charge = crate::ledger::admit(state, caller, headers, &request.model).await?;
    let span = super::model_call_span(headers, &request.model, "embeddings");
    let (embeddings, served) = state
        .router
        .embed(&request.model, &embed)
        .instrument(span.clone())
        .await?;
    super::record_served(&span, &served);
    if let Some(charge) = &charge {
        charge.embedded(&served, embeddings.prompt_tokens).await;
    }
    let data = (0u32..)
        .zip(embeddings.vectors)
        .map(|(index, vector)| EmbeddingData {
            object: "embedding",
            index,
            embedding: match format {
                EncodingFormat::Float => EmbeddingVector::Float(vector),
                EncodingFormat::Base64 => EmbeddingVector::Base64(base64_f32_le(&vector)),
            },
        })
        .collect();
    let body = EmbeddingList {
        object: "list",
        data,
        model: &request.model,
        usage: EmbeddingUsage {
            prompt_tokens: embeddings.prompt_tokens,
            total_tokens: embeddings.prompt_tokens,
        },
    };
    let json = serde_json::to_vec(&body)
        .map_err(|e| GatewayError::Internal(format!("unencodable reply: {e}")))?;
    let mut response = ([(header::CONTENT_TYPE, "application/json")], json).into_response();
    served_headers(&mut response, &served);
    crate::metrics::overhead(
        crate::metrics::Mode::Unary,
        started.elapsed(),
        served.outside,
    );
    Ok(response)
}

/// The vector as OpenAI's `base64` encoding: each `f32` as 4 little-endian bytes, the
/// bytes in standard base64 with padding.
fn base64_f32_le(vector: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32_with_padding() {
        // 1.0f32 is 00 00 80 3f.
        assert_eq!(base64_f32_le(&[1.0]), "AACAPw==");
        // Two floats, 8 bytes: one padding character.
        assert_eq!(base64_f32_le(&[1.0, -2.0]), "AACAPwAAAMA=");
        // Three floats, 12 bytes: none.
        assert_eq!(base64_f32_le(&[0.0, 0.0, 0.0]), "AAAAAAAAAAAAAAAA");
        assert_eq!(base64_f32_le(&[]), "");
    }
}

//! `Idempotency-Key` replay (with `USE_REDIS`): the first chat completion made with a key
//! is recorded, and the same request with the same key is answered from the record
//! without calling a provider again, so a worker that retries a step after a crash or a
//! lost connection gets the answer it already paid for. Also home to what the response
//! cache shares with replay: the Redis key templates, request fingerprints and the
//! recorded answer's format.
//!
//! A key moves through three states, each one atomic Lua script (`replay/*.lua`):
//! claimed (`claim.lua`, while the first request is answered), recorded (`record.lua`,
//! once it was), or gone again (`release.lua`, when it failed, so a retry calls the
//! provider). A [`Claim`] releases itself when dropped unrecorded: an upstream error, a
//! stream cut midway and a caller that hung up all end that way.

use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use common::redis::RedisPool;
use common::redis::client as redis;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::app::Caller;
use crate::config::{Config, ProviderKind};
use crate::error::GatewayError;
use crate::openai::Usage;
use crate::providers::{Completion, FinishReason, ToolCall};
use crate::routes::chat::AfterAnswer;
use crate::routing::Served;

/// The request header naming a request for replay.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// `idempotent-replayed: true` on an answer served from a record.
pub static REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The largest answer recorded (its JSON): a replay record or cache entry is read whole on
/// every hit, and Redis memory is shared with the task store. Bigger answers are served but
/// not kept.
pub const MAX_RECORDED_BYTES: usize = 1024 * 1024;

/// Every Redis key the gateway's replay and cache write, in one place.
///
/// | key | type | holds | TTL |
/// |---|---|---|---|
/// | `{prefix}:gw:idem:<key name>:<sha256 hex of the Idempotency-Key>` | hash | `fp`: the request's fingerprint; `owner`: the claim's token while the first request runs; `answer`: the recorded answer (JSON) | the claim's, then `IDEMPOTENCY_TTL_S` |
/// | `{prefix}:gw:cache:<sha256 hex of alias, newline, canonical request>` | string | the recorded answer (JSON) | the alias's `cache_ttl_s` |
pub mod keys {
    /// A replay record: scoped by the caller's key, so two keys never see each other's
    /// answers; the `Idempotency-Key` is hashed, so any printable value makes a safe name.
    pub fn idempotency(prefix: &str, caller: &str, idempotency_key: &str) -> String {
        format!(
            "{prefix}:gw:idem:{caller}:{}",
            super::sha256_hex(idempotency_key.as_bytes())
        )
    }

    /// A cache entry: not scoped by key, since the same answer to the same request is the
    /// point of the cache.
    pub fn cache(prefix: &str, digest: &str) -> String {
        format!("{prefix}:gw:cache:{digest}")
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in digest.iter() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// The request body as canonical JSON: parsed, the top-level fields in `without` removed,
/// and re-serialized with every object's keys sorted (serde_json's map is ordered by key)
/// and no whitespace, so two bodies that mean the same request give the same text.
pub fn canonical(body: &[u8], without: &[&str]) -> Result<String, GatewayError> {
    let mut value: Value = serde_json::from_slice(body)
        .map_err(|e| GatewayError::Internal(format!("a parsed body did not parse again: {e}")))?;
    if let Some(fields) = value.as_object_mut() {
        for field in without {
            fields.remove(*field);
        }
    }
    Ok(value.to_string())
}

/// An answer as recorded for replay or the cache: the completion and who served it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Recorded {
    /// The generated text.
    text: String,
    /// The tool calls, in order.
    tool_calls: Vec<RecordedCall>,
    /// OpenAI's `finish_reason`.
    finish: String,
    /// Token counts of the original answer (a replay costs none, but reports what the
    /// answer took, as the first one did).
    prompt_tokens: u32,
    /// See `prompt_tokens`.
    completion_tokens: u32,
    /// The provider that answered, for `x-ensemble-provider`.
    provider: ProviderKind,
    /// Its model, for `x-ensemble-model`.
    model: String,
}

/// One recorded tool call.
#[derive(Debug, Serialize, Deserialize)]
struct RecordedCall {
    /// The call's id, which the caller's tool result must quote.
    id: String,
    /// The function.
    name: String,
    /// Its arguments (JSON text).
    arguments: String,
}

impl Recorded {
    /// The record of `completion`, served by `served`.
    pub fn new(completion: &Completion, served: &Served) -> Self {
        Self {
            text: completion.text.clone(),
            tool_calls: completion
                .tool_calls
                .iter()
                .map(|call| RecordedCall {
                    id: call.id.clone(),
                    name: call.name.clone(),
                    arguments: call.arguments.clone(),
                })
                .collect(),
            finish: completion.finish.as_openai().to_string(),
            prompt_tokens: completion.usage.prompt_tokens,
            completion_tokens: completion.usage.completion_tokens,
            provider: served.provider,
            model: served.model.to_string(),
        }
    }

    /// Its JSON, or `None` when over [`MAX_RECORDED_BYTES`].
    pub fn encode(&self) -> Option<String> {
        serde_json::to_string(self)
            .ok()
            .filter(|json| json.len() <= MAX_RECORDED_BYTES)
    }

    /// A record read back; `None` when it does not decode (a record of another version).
    pub fn decode(json: &str) -> Option<Self> {
        serde_json::from_str(json).ok()
    }

    /// The completion and who served it, as a live answer has them. The time spent
    /// outside the gateway is zero: no provider was asked.
    pub fn into_parts(self) -> Option<(Completion, Served)> {
        let finish = [
            FinishReason::Stop,
            FinishReason::Length,
            FinishReason::ContentFilter,
            FinishReason::ToolCalls,
        ]
        .into_iter()
        .find(|f| f.as_openai() == self.finish)?;
        let completion = Completion {
            text: self.text,
            tool_calls: self
                .tool_calls
                .into_iter()
                .map(|call| ToolCall {
                    id: call.id,
                    name: call.name,
                    arguments: call.arguments,
                })
                .collect(),
            finish,
            usage: Usage::new(self.prompt_tokens, self.completion_tokens),
        };
        let served = Served {
            provider: self.provider,
            model: Arc::from(self.model),
            outside: Duration::ZERO,
        };
        Some((completion, served))
    }
}

/// The three scripts (see the module's doc and each file's header).
static CLAIM: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("replay/claim.lua")));
static RECORD: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("replay/record.lua")));
static RELEASE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("replay/release.lua")));

/// Replay's settings and store; in the app state with `USE_REDIS`.
pub struct Replay {
    /// Where records live.
    pool: RedisPool,
    /// `IDEMPOTENCY_TTL_S`: how long an answer is kept.
    ttl: Duration,
    /// How long a claim holds a key: long enough for the slowest answer the retry policy
    /// allows, so a second request does not call the provider while the first still may.
    /// Only a gateway that dies mid-request leaves a claim to expire; others release it.
    claim_ttl: Duration,
}

/// What the record of a request's `Idempotency-Key` says.
pub enum Begin {
    /// No key: answer as usual, record nothing.
    Unkeyed,
    /// Answered before: serve this, call no provider.
    Replayed(Box<(Completion, Served)>),
    /// Claimed for this request: record the answer with it (dropping it frees the key).
    Claimed(Claim),
}

impl Replay {
    /// Replay over `pool` with `config`'s TTL and retry policy.
    pub fn new(pool: RedisPool, config: &Config) -> Self {
        let targets = config
            .aliases()
            .values()
            .map(Vec::len)
            .max()
            .unwrap_or(1)
            .max(1) as u32;
        let attempts = config.max_retries.saturating_add(1);
        let per_attempt = config.request_timeout() + config.retry_max();
        let claim_ttl = per_attempt
            .saturating_mul(attempts)
            .saturating_mul(targets)
            .saturating_add(Duration::from_secs(30));
        Self {
            pool,
            ttl: Duration::from_secs(config.idempotency_ttl_s),
            claim_ttl,
        }
    }

    /// Looks up (and, when new, claims) the request's `Idempotency-Key`. `body` is the
    /// request as received; its fingerprint leaves out `stream` and `stream_options`, so a
    /// streamed first call can be replayed as JSON and the other way round.
    pub async fn begin(
        &self,
        caller: &Caller,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Begin, GatewayError> {
        let Some(idempotency_key) = idempotency_key(headers)? else {
            return Ok(Begin::Unkeyed);
        };
        let fingerprint = sha256_hex(canonical(body, &["stream", "stream_options"])?.as_bytes());
        let key = keys::idempotency(self.pool.prefix(), caller.name(), idempotency_key);
        let owner = format!("{:032x}", rand::random::<u128>());
        let unavailable = |message: String| {
            crate::metrics::replay("unavailable");
            tracing::warn!(during = "idempotency claim", error = %message, "{}", common::redis::UNAVAILABLE_LOG);
            GatewayError::StoreUnavailable(message)
        };
        let mut conn = self.pool.get().await.map_err(|e| unavailable(e.message))?;
        let reply: Vec<String> = CLAIM
            .prepare_invoke()
            .key(&key)
            .arg(&fingerprint)
            .arg(&owner)
            .arg(millis(self.claim_ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(common::redis::describe(&e)))?;
        match reply.first().map(String::as_str) {
            Some("claimed") => Ok(Begin::Claimed(Claim {
                pool: self.pool.clone(),
                key,
                owner,
                fingerprint,
                ttl: self.ttl,
                settled: false,
            })),
            Some("recorded") => {
                let answer = reply
                    .get(1)
                    .and_then(|json| Recorded::decode(json))
                    .and_then(Recorded::into_parts)
                    .ok_or_else(|| {
                        GatewayError::Internal(format!("the replay record {key} does not decode"))
                    })?;
                crate::metrics::replay("replayed");
                Ok(Begin::Replayed(Box::new(answer)))
            }
            Some("reused") => {
                crate::metrics::replay("reused");
                Err(GatewayError::IdempotencyKeyReused)
            }
            Some("in_progress") => {
                crate::metrics::replay("in_progress");
                Err(GatewayError::IdempotencyInProgress)
            }
            other => Err(GatewayError::Internal(format!(
                "claim.lua answered {other:?}"
            ))),
        }
    }
}

/// The request's `Idempotency-Key`: 1 to 255 printable ASCII characters, given once.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, GatewayError> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let invalid = |why: &str| {
        GatewayError::invalid(
            "Idempotency-Key",
            format!("the Idempotency-Key header {why}"),
        )
    };
    if values.next().is_some() {
        return Err(invalid("is given more than once"));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 {
        return Err(invalid("must be 1 to 255 characters long"));
    }
    if !bytes.iter().all(|b| (b' '..=b'~').contains(b)) {
        return Err(invalid("must be printable ASCII"));
    }
    // Checked above: printable ASCII is UTF-8.
    value
        .to_str()
        .map(Some)
        .map_err(|_| invalid("must be printable ASCII"))
}

/// `idempotent-replayed: true`.
pub fn replayed_header() -> (HeaderName, HeaderValue) {
    (REPLAYED_HEADER.clone(), HeaderValue::from_static("true"))
}

/// A key claimed for one request. Recording the answer settles it; dropped unsettled (the
/// request failed, or its caller left), it frees the key in the background.
pub struct Claim {
    /// Where the record is.
    pool: RedisPool,
    /// The record's Redis key.
    key: String,
    /// This claim's token: only the claim that holds the key may record or release it.
    owner: String,
    /// The request's fingerprint, kept with the answer.
    fingerprint: String,
    /// `IDEMPOTENCY_TTL_S`.
    ttl: Duration,
    /// Recorded: nothing to free on drop.
    settled: bool,
}

impl Claim {
    /// Records the answer, so the same request with the same key is replayed. A failure
    /// (too large, Redis gone) is logged and counted; the answer is still served, and the
    /// key is freed so a retry calls the provider again.
    pub async fn record(mut self, completion: &Completion, served: &Served) {
        let Some(answer) = Recorded::new(completion, served).encode() else {
            crate::metrics::replay("too_large");
            tracing::warn!(
                limit = MAX_RECORDED_BYTES,
                "an answer made with an Idempotency-Key is too large to record; a retry will call the provider again"
            );
            return;
        };
        let recorded: Result<i64, String> = async {
            let mut conn = self.pool.get().await.map_err(|e| e.message)?;
            RECORD
                .prepare_invoke()
                .key(&self.key)
                .arg(&self.owner)
                .arg(&self.fingerprint)
                .arg(answer)
                .arg(millis(self.ttl))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| common::redis::describe(&e))
        }
        .await;
        match recorded {
            Ok(1) => {
                self.settled = true;
                crate::metrics::replay("recorded");
            }
            // Another request holds the key now (ours expired): leave its claim alone.
            Ok(_) => self.settled = true,
            Err(error) => {
                crate::metrics::replay("unavailable");
                tracing::warn!(during = "idempotency record", %error, "{}", common::redis::UNAVAILABLE_LOG);
            }
        }
    }

    /// The [`AfterAnswer`] hook that records the answer.
    pub fn hook(self) -> AfterAnswer {
        Box::new(move |completion, served| {
            Box::pin(async move { self.record(&completion, &served).await })
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (pool, key, owner) = (
            self.pool.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.owner),
        );
        runtime.spawn(async move {
            let released: Result<i64, String> = async {
                let mut conn = pool.get().await.map_err(|e| e.message)?;
                RELEASE
                    .prepare_invoke()
                    .key(&key)
                    .arg(&owner)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| common::redis::describe(&e))
            }
            .await;
            if let Err(error) = released {
                // The claim's TTL frees the key later.
                tracing::warn!(during = "idempotency release", %error, "{}", common::redis::UNAVAILABLE_LOG);
            }
        });
    }
}

/// Milliseconds for `PEXPIRE`, at least 1.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn canonical_ignores_key_order_whitespace_and_the_named_fields() {
        let a = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}],"temperature":0.5}"#;
        let b = br#"{ "temperature": 0.5, "messages": [ {"content": "hi", "role": "user"} ],
                     "model": "m", "stream_options": {"include_usage": true} }"#;
        let without = ["stream", "stream_options"];
        assert_eq!(
            canonical(a, &without).unwrap(),
            canonical(b, &without).unwrap()
        );
        let c = br#"{"model":"m","messages":[{"role":"user","content":"hi!"}],"temperature":0.5}"#;
        assert_ne!(
            canonical(a, &without).unwrap(),
            canonical(c, &without).unwrap()
        );
    }

    #[test]
    fn keys_are_scoped_and_hashed() {
        let a = keys::idempotency("p", "alice", "step-1");
        assert_eq!(a, format!("p:gw:idem:alice:{}", sha256_hex(b"step-1")));
        assert_ne!(a, keys::idempotency("p", "bob", "step-1"));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_header_is_checked() {
        let mut headers = HeaderMap::new();
        assert!(idempotency_key(&headers).unwrap().is_none());
        headers.insert(
            &IDEMPOTENCY_KEY,
            HeaderValue::from_static("task-1:step-2 ~ok"),
        );
        assert_eq!(
            idempotency_key(&headers).unwrap(),
            Some("task-1:step-2 ~ok")
        );
        let long = "k".repeat(256);
        for bad in [
            HeaderValue::from_static(""),
            HeaderValue::from_str(&long).unwrap(),
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
            HeaderValue::from_bytes(b"a\tb").unwrap(),
        ] {
            headers.insert(&IDEMPOTENCY_KEY, bad);
            let err = idempotency_key(&headers).unwrap_err();
            assert!(
                matches!(&err, GatewayError::InvalidRequest { param: Some(p), .. } if p == "Idempotency-Key"),
                "{err}"
            );
        }
        headers.insert(&IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        headers.append(&IDEMPOTENCY_KEY, HeaderValue::from_static("b"));
        assert!(idempotency_key(&headers).is_err());
    }

    #[test]
    fn a_record_round_trips_and_is_bounded() {
        let completion = Completion {
            text: "hello".into(),
            tool_calls: vec![ToolCall {
                id: "c1".into(),
                name: "f".into(),
                arguments: "{}".into(),
            }],
            finish: FinishReason::ToolCalls,
            usage: Usage::new(3, 4),
        };
        let served = Served {
            provider: ProviderKind::Gemini,
            model: Arc::from("g"),
            outside: Duration::from_secs(1),
        };
        let json = Recorded::new(&completion, &served).encode().unwrap();
        let (back, by) = Recorded::decode(&json).unwrap().into_parts().unwrap();
        assert_eq!(back.text, "hello");
        assert_eq!(back.tool_calls[0].id, "c1");
        assert_eq!(back.finish, FinishReason::ToolCalls);
        assert_eq!(back.usage, Usage::new(3, 4));
        assert_eq!(
            (by.provider, &*by.model, by.outside),
            (ProviderKind::Gemini, "g", Duration::ZERO)
        );
        let huge = Completion {
            text: "x".repeat(MAX_RECORDED_BYTES),
            ..completion
        };
        assert!(Recorded::new(&huge, &served).encode().is_none());
    }
}

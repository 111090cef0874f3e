//! The exact-match response cache (with `USE_REDIS`), opt-in per alias with
//! `[models.<alias>] cache_ttl_s`: a request identical to an earlier one (same alias, same
//! canonical body, `stream`, `stream_options`, `user` and `metadata` aside) is answered
//! with the earlier answer. Entries are shared by every gateway key: the same answer to the
//! same request is the point. Sampling settings are part of the request, so a
//! `temperature: 0.9` request is cached too: the alias's owner opted in.
//!
//! The cache is an optimisation, never a dependency: a Redis outage makes every lookup a
//! miss (logged and counted), not an error.

use std::collections::HashMap;
use std::time::Duration;

use common::redis::RedisPool;
use common::redis::client::AsyncCommands;

use crate::config::Config;
use crate::error::GatewayError;
use crate::providers::{Completion, FinishReason};
use crate::replay::{Recorded, canonical, keys, sha256_hex};
use crate::routes::chat::AfterAnswer;
use crate::routing::Served;

/// Request fields that do not change the answer: how it is delivered (`stream`,
/// `stream_options`) and tracing hints (`user`, `metadata`).
const NOT_IN_KEY: &[&str] = &["stream", "stream_options", "user", "metadata"];

/// The cache: the store and each cached alias's TTL.
pub struct Cache {
    /// Where entries live.
    pool: RedisPool,
    /// Aliases with `cache_ttl_s`, and it; an alias missing here is never cached.
    ttls: HashMap<String, Duration>,
}

impl Cache {
    /// The cache of `config`'s aliases that set `cache_ttl_s`.
    pub fn new(pool: RedisPool, config: &Config) -> Self {
        let ttls = config
            .models
            .iter()
            .filter_map(|(alias, model)| {
                model
                    .cache_ttl_s
                    .map(|ttl| (alias.clone(), Duration::from_secs(ttl)))
            })
            .collect();
        Self { pool, ttls }
    }

    /// The cache entry of this request to `alias` (the body as received), or `None` when
    /// the alias is not cached.
    pub fn entry(&self, alias: &str, body: &[u8]) -> Result<Option<Entry>, GatewayError> {
        let Some(ttl) = self.ttls.get(alias) else {
            return Ok(None);
        };
        let request = canonical(body, NOT_IN_KEY)?;
        let digest = sha256_hex(format!("{alias}\n{request}").as_bytes());
        Ok(Some(Entry {
            pool: self.pool.clone(),
            key: keys::cache(self.pool.prefix(), &digest),
            ttl: *ttl,
            alias: alias.to_string(),
        }))
    }
}

/// One request's place in the cache.
pub struct Entry {
    /// Where entries live.
    pool: RedisPool,
    /// The entry's Redis key.
    key: String,
    /// The alias's `cache_ttl_s`.
    ttl: Duration,
    /// The alias, a label of the cache metric (configured aliases only: bounded).
    alias: String,
}

impl Entry {
    /// The cached answer, or `None` on a miss (an outage or an unreadable entry counts as
    /// one).
    pub async fn get(&self) -> Option<(Completion, Served)> {
        let found: Result<Option<String>, String> = async {
            let mut conn = self.pool.get().await.map_err(|e| e.message)?;
            conn.get(&self.key)
                .await
                .map_err(|e| common::redis::describe(&e))
        }
        .await;
        let answer = match found {
            Ok(found) => found
                .and_then(|json| Recorded::decode(&json))
                .and_then(Recorded::into_parts),
            Err(error) => {
                crate::metrics::cache(&self.alias, "store_error");
                tracing::warn!(during = "cache lookup", %error, "{}", common::redis::UNAVAILABLE_LOG);
                None
            }
        };
        let outcome = if answer.is_some() { "hit" } else { "miss" };
        crate::metrics::cache(&self.alias, outcome);
        answer
    }

    /// Stores a complete answer: stopped, at `max_tokens`, or calling tools. A filtered
    /// answer is not kept (a retry may fare better), nor one over the size limit.
    pub async fn put(self, completion: &Completion, served: &Served) {
        if !matches!(
            completion.finish,
            FinishReason::Stop | FinishReason::Length | FinishReason::ToolCalls
        ) {
            return;
        }
        let Some(answer) = Recorded::new(completion, served).encode() else {
            crate::metrics::cache(&self.alias, "too_large");
            tracing::warn!(
                alias = %self.alias,
                limit = crate::replay::MAX_RECORDED_BYTES,
                "an answer is too large to cache"
            );
            return;
        };
        let stored: Result<(), String> = async {
            let mut conn = self.pool.get().await.map_err(|e| e.message)?;
            conn.set_ex(&self.key, answer, self.ttl.as_secs().max(1))
                .await
                .map_err(|e| common::redis::describe(&e))
        }
        .await;
        if let Err(error) = stored {
            crate::metrics::cache(&self.alias, "store_error");
            tracing::warn!(during = "cache store", %error, "{}", common::redis::UNAVAILABLE_LOG);
        }
    }

    /// The [`AfterAnswer`] hook that stores the answer.
    pub fn hook(self) -> AfterAnswer {
        Box::new(move |completion, served| {
            Box::pin(async move { self.put(&completion, &served).await })
        })
    }
}

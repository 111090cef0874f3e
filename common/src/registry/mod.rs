//! The worker registry in Redis: workers write their record with a TTL on every heartbeat;
//! the master reads the live ones to dispatch and to extend leases.
//!
//! Layout (all under one hash tag, so the scripts stay in one cluster slot):
//! - `{prefix}:{registry}:worker:{id}`: the [`WorkerRecord`] as JSON, expiring after the TTL;
//! - `{prefix}:{registry}:workers`: sorted set of worker ids scored by expiry (ms);
//! - `{prefix}:events`: pub/sub channel; `worker:{id}` when a worker appears, `gone:{id}` when
//!   one deregisters.

use std::time::Duration;

use redis::Script;

use crate::redis::{RedisPool, Unavailable};
use crate::wire::{WorkerId, WorkerRecord};

/// Key names of the registry.
pub mod keys {
    /// A worker's record.
    pub fn worker(prefix: &str, id: &str) -> String {
        format!("{}{id}", worker_prefix(prefix))
    }

    /// What every worker record key starts with.
    pub fn worker_prefix(prefix: &str) -> String {
        format!("{prefix}:{{registry}}:worker:")
    }

    /// The sorted set of live workers.
    pub fn workers(prefix: &str) -> String {
        format!("{prefix}:{{registry}}:workers")
    }

    /// The pub/sub channel for registry and queue events.
    pub fn events(prefix: &str) -> String {
        format!("{prefix}:events")
    }
}

static HEARTBEAT: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/heartbeat.lua")));
static LIVE: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/live.lua")));
static DEREGISTER: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/deregister.lua")));

/// Reads and writes worker records.
#[derive(Clone, Debug)]
pub struct Registry {
    pool: RedisPool,
    /// Malformed records already logged: a bad record is named once, not every 250 ms.
    warned: std::sync::Arc<std::sync::Mutex<Vec<MalformedRecord>>>,
}

impl Registry {
    /// A registry on a pool (keys under the pool's prefix).
    pub fn new(pool: RedisPool) -> Self {
        Self {
            pool,
            warned: std::sync::Arc::default(),
        }
    }

    /// Writes (or refreshes) a worker's record. Returns whether the worker was new.
    pub async fn heartbeat(
        &self,
        record: &WorkerRecord,
        ttl: Duration,
    ) -> Result<bool, Unavailable> {
        let prefix = self.pool.prefix();
        let stamped = WorkerRecord {
            heartbeat_at_ms: crate::wire::now_ms(),
            ..record.clone()
        };
        let json = serde_json::to_string(&stamped).map_err(|e| Unavailable {
            message: format!("could not encode worker record: {e}"),
            failure: crate::redis::Failure::Other,
        })?;
        let mut conn = self.pool.get().await?;
        let new: i64 = HEARTBEAT
            .key(keys::worker(prefix, record.id.as_str()))
            .key(keys::workers(prefix))
            .arg(json)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg(record.id.as_str())
            .arg(keys::events(prefix))
            .invoke_async(&mut conn)
            .await?;
        Ok(new == 1)
    }

    /// Removes a worker now.
    pub async fn deregister(&self, id: &WorkerId) -> Result<(), Unavailable> {
        let prefix = self.pool.prefix();
        let mut conn = self.pool.get().await?;
        let _: i64 = DEREGISTER
            .key(keys::worker(prefix, id.as_str()))
            .key(keys::workers(prefix))
            .arg(id.as_str())
            .arg(keys::events(prefix))
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The live workers' records. A record that does not parse is skipped (see
    /// [`Registry::scan`]).
    pub async fn live(&self) -> Result<Vec<WorkerRecord>, Unavailable> {
        Ok(self.scan().await?.records)
    }

    /// The live workers' records, and the records that do not parse (a worker of a newer
    /// version, or another language's worker with a bug). Each malformed record is logged
    /// once, naming the worker, its key and the problem, and counted in the gauge
    /// `ensemble_registry_malformed_records`; such a worker is never dispatched to.
    pub async fn scan(&self) -> Result<Scan, Unavailable> {
        let prefix = self.pool.prefix();
        let mut conn = self.pool.get().await?;
        let raw: Vec<String> = LIVE
            .key(keys::workers(prefix))
            .arg(keys::worker_prefix(prefix))
            .invoke_async(&mut conn)
            .await?;
        let mut scan = Scan::default();
        for pair in raw.chunks_exact(2) {
            let (id, json) = (&pair[0], &pair[1]);
            match serde_json::from_str::<WorkerRecord>(json) {
                Ok(record) => scan.records.push(record),
                Err(e) => scan.malformed.push(MalformedRecord {
                    id: id.clone(),
                    key: keys::worker(prefix, id),
                    reason: e.to_string(),
                }),
            }
        }
        metrics::gauge!("ensemble_registry_malformed_records").set(scan.malformed.len() as f64);
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        warned.retain(|seen| scan.malformed.contains(seen));
        for bad in &scan.malformed {
            if !warned.contains(bad) {
                tracing::warn!(worker_id = %bad.id, key = %bad.key, problem = %bad.reason,
                    "a worker's registry record does not parse; it gets no work until it is fixed");
                warned.push(bad.clone());
            }
        }
        Ok(scan)
    }
}

/// What [`Registry::scan`] found.
#[derive(Debug, Default, Clone)]
pub struct Scan {
    /// The records that parse.
    pub records: Vec<WorkerRecord>,
    /// The ones that do not.
    pub malformed: Vec<MalformedRecord>,
}

/// A live worker's record that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MalformedRecord {
    /// The worker's id (from the live set).
    pub id: String,
    /// The Redis key of its record.
    pub key: String,
    /// What is wrong with it (serde's message: the field and what it expected).
    pub reason: String,
}

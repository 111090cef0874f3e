//! The worker registry in Redis: workers write their record with a TTL on every heartbeat;
//! the master reads the live ones to dispatch and to extend leases.
//!
//! Layout (all under one hash tag, so the scripts stay in one cluster slot):
//! - `{prefix}:{registry}:worker:{id}`: the [`WorkerRecord`] as JSON, expiring after the TTL;
//! - `{prefix}:{registry}:workers`: sorted set of worker ids scored by expiry (ms);
//! - `{prefix}:events`: pub/sub channel; `worker:{id}` when a worker appears, `gone:{id}` when
//!   one deregisters.

use std::collections::HashMap;
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

/// [`Registry::changed`] reads every record again once in this many calls (every 10 s at the
/// dispatcher's 250 ms), and drops the expired from the live set on the way. In between it
/// fetches only the records whose expiry moved; a record written twice in the same
/// millisecond (a worker that starts draining right after a beat) would otherwise wait for
/// the worker's next beat to be seen.
const FULL_READ_EVERY: u32 = 40;

/// Reads and writes worker records.
#[derive(Clone, Debug)]
pub struct Registry {
    pool: RedisPool,
    /// Malformed records already logged: a bad record is named once, not every 250 ms.
    warned: std::sync::Arc<std::sync::Mutex<Vec<MalformedRecord>>>,
    /// What [`Registry::changed`] has read.
    kept: std::sync::Arc<tokio::sync::Mutex<Kept>>,
}

/// The records [`Registry::changed`] keeps between its calls.
#[derive(Debug, Default)]
struct Kept {
    /// By worker id: the expiry (as Redis wrote the score) its record was read at, and the
    /// record or why it does not parse.
    workers: HashMap<String, (String, Result<WorkerRecord, MalformedRecord>)>,
    /// Calls since the last full read; `None` before the first.
    since_full: Option<u32>,
}

impl Registry {
    /// A registry on a pool (keys under the pool's prefix).
    pub fn new(pool: RedisPool) -> Self {
        Self {
            pool,
            warned: std::sync::Arc::default(),
            kept: std::sync::Arc::default(),
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
            match parse(prefix, &pair[0], &pair[1]) {
                Ok(record) => scan.records.push(record),
                Err(bad) => scan.malformed.push(bad),
            }
        }
        self.note_malformed(&scan.malformed);
        Ok(scan)
    }

    /// The live workers, as [`Registry::scan`] reads them, for a reader that asks often (the
    /// dispatcher, 4 times a second): between full reads it fetches only the records whose
    /// expiry moved since its last call, with the live set's ids and expiries, so 1,000 live
    /// workers beating every 2 s cost a replica about 125 records a read instead of 1,000.
    /// A worker gone from the live set (deregistered, or expired) drops out at once.
    pub async fn changed(&self) -> Result<Scan, Unavailable> {
        let mut kept = self.kept.lock().await;
        match kept.since_full {
            Some(n) if n + 1 < FULL_READ_EVERY => {
                self.read_changes(&mut kept).await?;
                kept.since_full = Some(n + 1);
            }
            _ => {
                self.read_all(&mut kept).await?;
                kept.since_full = Some(0);
            }
        }
        let mut ids: Vec<&String> = kept.workers.keys().collect();
        ids.sort();
        let mut scan = Scan::default();
        for id in ids {
            match &kept.workers[id].1 {
                Ok(record) => scan.records.push(record.clone()),
                Err(bad) => scan.malformed.push(bad.clone()),
            }
        }
        self.note_malformed(&scan.malformed);
        Ok(scan)
    }

    /// Every live record, with the expiries it was read at.
    async fn read_all(&self, kept: &mut Kept) -> Result<(), Unavailable> {
        let prefix = self.pool.prefix();
        let mut conn = self.pool.get().await?;
        // The scores first: a beat between the two calls makes the record newer than its
        // score, and the next call reads it again (never the other way round).
        let scores = live_scores(prefix, &mut conn).await?;
        let raw: Vec<String> = LIVE
            .key(keys::workers(prefix))
            .arg(keys::worker_prefix(prefix))
            .invoke_async(&mut conn)
            .await?;
        let expiry: HashMap<&str, &str> = scores
            .chunks_exact(2)
            .map(|p| (p[0].as_str(), p[1].as_str()))
            .collect();
        kept.workers.clear();
        for pair in raw.chunks_exact(2) {
            let (id, json) = (&pair[0], &pair[1]);
            // Registered between the two calls: read again next time.
            let score = expiry.get(id.as_str()).copied().unwrap_or_default();
            kept.workers
                .insert(id.clone(), (score.to_owned(), parse(prefix, id, json)));
        }
        Ok(())
    }

    /// The live set's ids and expiries, then the records of the new and the moved ones.
    async fn read_changes(&self, kept: &mut Kept) -> Result<(), Unavailable> {
        let prefix = self.pool.prefix();
        let mut conn = self.pool.get().await?;
        let scores = live_scores(prefix, &mut conn).await?;
        let live: HashMap<&str, &str> = scores
            .chunks_exact(2)
            .map(|p| (p[0].as_str(), p[1].as_str()))
            .collect();
        kept.workers.retain(|id, _| live.contains_key(id.as_str()));
        let moved: Vec<(&str, &str)> = live
            .iter()
            .filter(|(id, score)| {
                kept.workers
                    .get(**id)
                    .is_none_or(|(read_at, _)| read_at != *score)
            })
            .map(|(id, score)| (*id, *score))
            .collect();
        if moved.is_empty() {
            return Ok(());
        }
        let records: Vec<Option<String>> = redis::cmd("MGET")
            .arg(
                moved
                    .iter()
                    .map(|(id, _)| keys::worker(prefix, id))
                    .collect::<Vec<_>>(),
            )
            .query_async(&mut conn)
            .await?;
        for ((id, score), json) in moved.into_iter().zip(records) {
            match json {
                Some(json) => {
                    let record = parse(prefix, id, &json);
                    kept.workers
                        .insert(id.to_owned(), (score.to_owned(), record));
                }
                // Expired or deregistered since the scores were read.
                None => {
                    kept.workers.remove(id);
                }
            }
        }
        Ok(())
    }

    /// Counts the malformed records in the gauge, and logs each one once.
    fn note_malformed(&self, malformed: &[MalformedRecord]) {
        metrics::gauge!("ensemble_registry_malformed_records").set(malformed.len() as f64);
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        warned.retain(|seen| malformed.contains(seen));
        for bad in malformed {
            if !warned.contains(bad) {
                tracing::warn!(worker_id = %bad.id, key = %bad.key, problem = %bad.reason,
                    "a worker's registry record does not parse; it gets no work until it is fixed");
                warned.push(bad.clone());
            }
        }
    }
}

/// The live workers' ids and record expiries, without their records, as a flat list (id,
/// expiry, id, expiry, …): a plain `ZRANGEBYSCORE` from now by this process's clock (NTP
/// keeps it within milliseconds of Redis's, against a TTL of seconds; the full read,
/// live.lua, goes by Redis's clock and drops the expired from the set).
async fn live_scores(
    prefix: &str,
    conn: &mut impl redis::aio::ConnectionLike,
) -> Result<Vec<String>, Unavailable> {
    Ok(redis::cmd("ZRANGEBYSCORE")
        .arg(keys::workers(prefix))
        .arg(format!("({}", crate::wire::now_ms()))
        .arg("+inf")
        .arg("WITHSCORES")
        .query_async(conn)
        .await?)
}

/// A live record as read, or why it does not parse.
fn parse(prefix: &str, id: &str, json: &str) -> Result<WorkerRecord, MalformedRecord> {
    serde_json::from_str(json).map_err(|e| MalformedRecord {
        id: id.to_owned(),
        key: keys::worker(prefix, id),
        reason: e.to_string(),
    })
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

//! S1, the scale figures of issue 17: what 1,000 workers cost Redis, and what a queued task
//! costs it in memory.
//!
//! A master with no real worker starts on its own Redis. `--sim-workers` simulated workers
//! register and heartbeat as the Rust worker does (`Registry::heartbeat`, every 2 s, the
//! default `HEARTBEAT_INTERVAL_MS`, with a TTL of three intervals), each with 8 slots, for a
//! capability nothing is queued for; they never receive a step. The master's dispatcher
//! reads the registry meanwhile, as it always does (every 250 ms). Over `--scale-secs`, the
//! share of one core that Redis uses is its CPU time over the wall time.
//!
//! Then `--scale-queued` one-step tasks (the Q1 body, about 100 bytes of input) are queued
//! for `echo`, which no worker serves, and Redis's `used_memory` grows by the memory per
//! queued task times their number.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use common::redis::RedisPool;
use common::registry::Registry;
use common::wire::{Capability, WorkerId, WorkerRecord};

use crate::client::MasterClient;
use crate::cluster::{CAPABILITY, Launch, QueueCluster};

/// What a simulated worker beats at: the Rust worker's default `HEARTBEAT_INTERVAL_MS`.
const HEARTBEAT: Duration = Duration::from_secs(2);

/// The capability the simulated workers advertise: nothing is queued for it.
const SIMULATED: &str = "simulated";

/// One S1 run.
#[derive(Clone, Debug)]
pub struct ScaleRun {
    /// Simulated workers.
    pub workers: usize,
    /// Heartbeats written during the measurement.
    pub beats: usize,
    /// Redis's CPU time over the wall time while only the workers and the master's
    /// registry reads ran, in % of one core.
    pub redis_core_pct: f64,
    /// Tasks queued.
    pub queued: usize,
    /// Growth of Redis's `used_memory` per queued task, in bytes.
    pub bytes_per_task: f64,
    /// Where it goes: `MEMORY USAGE` per queued task of each kind of key (task hashes
    /// sampled, the rest whole), most first.
    pub breakdown: Vec<(String, f64)>,
    /// `OBJECT ENCODING` of a queued task's hash (`listpack` is the compact one).
    pub task_encoding: String,
    /// While only the workers and the registry reads ran: per command, calls per second and
    /// the % of the wall time Redis spent in it (`INFO commandstats`), most first.
    pub commands: Vec<(String, f64, f64)>,
}

/// Runs S1 once on a cluster of its own.
pub async fn scale(
    launch: &Launch,
    workers: usize,
    secs: u64,
    queued: usize,
    clients: usize,
) -> anyhow::Result<ScaleRun> {
    let cluster = QueueCluster::start(launch).await?;
    let run = measure(&cluster, workers, secs, queued, clients).await;
    cluster.stop().await;
    run
}

async fn measure(
    cluster: &QueueCluster,
    workers: usize,
    secs: u64,
    queued: usize,
    clients: usize,
) -> anyhow::Result<ScaleRun> {
    let settings = cluster
        .redis_settings()
        .context("S1 needs the Redis this bench starts")?;
    let url = cluster.redis_url().context("S1 needs a Redis URL")?;
    let registry = Registry::new(RedisPool::new(&settings)?);
    let beats = Arc::new(AtomicUsize::new(0));
    let mut beaters = Vec::new();
    for i in 0..workers {
        let mut record = WorkerRecord::starting(
            WorkerId::new(format!("sim-{i:04}"))?,
            format!("http://127.0.0.1:9/sim-{i}"),
            vec![Capability::new(SIMULATED)?],
            8,
        );
        record.version = "simulated".into();
        let (registry, beats) = (registry.clone(), beats.clone());
        // Spread over the interval, as workers started at different times are.
        let offset = HEARTBEAT.mul_f64(i as f64 / workers.max(1) as f64);
        beaters.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut every = tokio::time::interval(HEARTBEAT);
            loop {
                every.tick().await;
                record.heartbeat_at_ms = common::wire::now_ms();
                if registry.heartbeat(&record, HEARTBEAT * 3).await.is_ok() {
                    beats.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Every worker registered, and a few refreshes of the dispatcher's view.
    tokio::time::sleep(HEARTBEAT * 2).await;
    let before = crate::cluster::RedisStats::read(&url).await?;
    let (beats_before, started) = (beats.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(secs.max(1))).await;
    let after = crate::cluster::RedisStats::read(&url).await?;
    let wall = started.elapsed().as_secs_f64();
    let beats = beats.load(Ordering::Relaxed) - beats_before;
    let redis_core_pct = 100.0 * (after.cpu_secs - before.cpu_secs) / wall;
    let calls = after.since(&before);
    let commands = after
        .usec_since(&before)
        .into_iter()
        .map(|(name, usec)| {
            let per_sec = calls.get(&name).copied().unwrap_or(0) as f64 / wall;
            (name, per_sec, usec as f64 / 1e4 / wall)
        })
        .collect();

    let memory_before = used_memory(&url).await?;
    let client = MasterClient::new(&cluster.master_url, &cluster.pipeline, clients);
    crate::queue::submit_all(&client, queued, clients).await?;
    let (waiting, _) = client.queue_depth(CAPABILITY).await?;
    anyhow::ensure!(
        waiting as usize >= queued,
        "only {waiting} of {queued} tasks are queued"
    );
    let memory_after = used_memory(&url).await?;
    for b in beaters {
        b.abort();
    }
    let (breakdown, task_encoding) = breakdown(&url, queued).await?;
    Ok(ScaleRun {
        workers,
        beats,
        redis_core_pct,
        queued,
        bytes_per_task: (memory_after.saturating_sub(memory_before)) as f64 / queued.max(1) as f64,
        breakdown,
        task_encoding,
        commands,
    })
}

/// Task hashes whose `MEMORY USAGE` is averaged.
const SAMPLED_TASKS: usize = 100;

/// `MEMORY USAGE` per queued task of each kind of key: task hashes (a sample, plus the
/// main dictionary's entry, which `MEMORY USAGE` counts), and every other key (the queue,
/// the task index, …) whole, named by its key with the prefix cut. Also the task hash's
/// encoding.
async fn breakdown(url: &str, queued: usize) -> anyhow::Result<(Vec<(String, f64)>, String)> {
    let mut conn = crate::cluster::connect(url).await?;
    let (mut cursor, mut tasks, mut others) = (0u64, Vec::new(), Vec::new());
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await?;
        for key in keys {
            if key.contains(":task:") {
                if tasks.len() < SAMPLED_TASKS {
                    tasks.push(key);
                }
            } else {
                others.push(key);
            }
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut rows = Vec::new();
    let mut task_bytes = 0u64;
    for key in &tasks {
        let bytes: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .query_async(&mut conn)
            .await?;
        task_bytes += bytes.unwrap_or(0);
    }
    rows.push((
        "task hash (key included)".to_string(),
        task_bytes as f64 / tasks.len().max(1) as f64,
    ));
    for key in others {
        let bytes: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(&key)
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut conn)
            .await?;
        let per_task = bytes.unwrap_or(0) as f64 / queued.max(1) as f64;
        // Keys of a few bytes per million tasks (the rate limit, the capabilities) are noise.
        if per_task >= 1.0 {
            let name = key.split_once(':').map_or(key.as_str(), |(_, rest)| rest);
            rows.push((name.to_string(), per_task));
        }
    }
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let encoding: String = match tasks.first() {
        Some(key) => {
            redis::cmd("OBJECT")
                .arg("ENCODING")
                .arg(key)
                .query_async(&mut conn)
                .await?
        }
        None => "none".into(),
    };
    Ok((rows, encoding))
}

/// `INFO memory`'s `used_memory`, in bytes.
async fn used_memory(url: &str) -> anyhow::Result<u64> {
    let mut conn = crate::cluster::connect(url).await?;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .context("INFO memory has no used_memory")
}

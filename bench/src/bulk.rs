//! B1, the batch submit of issue 17: how fast a master queues tasks sent one per
//! `POST /task`, and sent 100 per `POST /tasks` (as BullMQ's `addBulk`), with the CPU per
//! task of the master and of Redis each way.
//!
//! Each way runs on a cluster of its own with no worker, so both fill an empty queue to the
//! same depth: `--tasks` one-step tasks (the Q1 body), from `--clients` connections.

use std::time::Instant;

use crate::client::MasterClient;
use crate::cluster::{CAPABILITY, Launch, QueueCluster};

/// Tasks per `POST /tasks`: the endpoint's most.
pub const BATCH: usize = 100;

/// One way of submitting, measured once.
#[derive(Clone, Copy, Debug)]
pub struct SubmitRun {
    /// Tasks queued per second.
    pub rate: f64,
    /// The master's CPU per task, in µs (with `--processes`).
    pub master_us: Option<f64>,
    /// Redis's CPU per task, in µs.
    pub redis_us: Option<f64>,
}

/// Queues `tasks` tasks on a fresh cluster, `batch` per request (1: `POST /task`).
pub async fn submit_run(
    launch: &Launch,
    tasks: usize,
    clients: usize,
    batch: usize,
) -> anyhow::Result<SubmitRun> {
    let cluster = QueueCluster::start(launch).await?;
    let run = measure(&cluster, tasks, clients, batch).await;
    cluster.stop().await;
    run
}

async fn measure(
    cluster: &QueueCluster,
    tasks: usize,
    clients: usize,
    batch: usize,
) -> anyhow::Result<SubmitRun> {
    let client = MasterClient::new(&cluster.master_url, &cluster.pipeline, clients);
    let (master_before, redis_before) = (cluster.master_usage(), cluster.redis_stats().await?);
    let started = Instant::now();
    crate::queue::submit_in_batches(&client, tasks, clients, batch).await?;
    let secs = started.elapsed().as_secs_f64();
    let (master_after, redis_after) = (cluster.master_usage(), cluster.redis_stats().await?);
    let (queued, _) = client.queue_depth(CAPABILITY).await?;
    anyhow::ensure!(
        queued as usize >= tasks,
        "only {queued} of {tasks} tasks are queued"
    );
    let per_task = |secs: f64| secs * 1e6 / tasks.max(1) as f64;
    Ok(SubmitRun {
        rate: tasks as f64 / secs,
        master_us: master_before
            .zip(master_after)
            .filter(|_| cluster.per_process())
            .map(|(b, a)| per_task(a.cpu_secs - b.cpu_secs)),
        redis_us: redis_before
            .zip(redis_after)
            .map(|(b, a)| per_task(a.cpu_secs - b.cpu_secs)),
    })
}

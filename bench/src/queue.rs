//! The queue benchmarks, one run each: Q1 throughput, Q2 open-loop latency, Q3 scaling and
//! dispatch rate against queue depth.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::{Mutex, mpsc};

use crate::client::{MasterClient, Outcome};
use crate::cluster::{CAPABILITY, Launch, QueueCluster, Usage};
use crate::stats::Percentiles;

/// What one closed-loop drive of `n` tasks measured.
#[derive(Clone, Copy, Debug)]
pub struct Drive {
    /// Tasks submitted (and waited for).
    pub tasks: usize,
    /// Tasks that ended other than `succeeded`.
    pub failed: usize,
    /// First submit to last result read.
    pub elapsed: Duration,
    /// First submit to last submit answered.
    pub submitting: Duration,
}

impl Drive {
    /// Tasks per second over the whole drive.
    pub fn rate(&self) -> f64 {
        self.tasks as f64 / self.elapsed.as_secs_f64()
    }
}

/// Submits `tasks` tasks from `clients` connections as fast as the master takes them while
/// as many connections read the results, in submission order, with long polls.
pub async fn drive(client: &MasterClient, tasks: usize, clients: usize) -> anyhow::Result<Drive> {
    let clients = clients.max(1);
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let rx = Arc::new(Mutex::new(rx));
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut submitters = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (client, next, tx) = (client.clone(), next.clone(), tx.clone());
        submitters.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= tasks {
                    return Ok::<_, anyhow::Error>(());
                }
                let id = client.submit(client.body(n)).await?;
                // The readers outlive the submitters, so the channel is open.
                let _ = tx.send(id);
            }
        }));
    }
    drop(tx);
    let mut readers = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (client, rx) = (client.clone(), rx.clone());
        readers.push(tokio::spawn(async move {
            let mut failed = 0usize;
            let mut read = 0usize;
            loop {
                let Some(id) = rx.lock().await.recv().await else {
                    return Ok::<_, anyhow::Error>((read, failed, Instant::now()));
                };
                if client.wait(&id).await? != Outcome::Succeeded {
                    failed += 1;
                }
                read += 1;
            }
        }));
    }
    for s in submitters {
        s.await.context("a submitter panicked")??;
    }
    let submitting = start.elapsed();
    let (mut read, mut failed, mut last) = (0, 0, start);
    for r in readers {
        let (n, f, at) = r.await.context("a reader panicked")??;
        read += n;
        failed += f;
        last = last.max(at);
    }
    if read != tasks {
        bail!("{read} of {tasks} results were read");
    }
    Ok(Drive {
        tasks,
        failed,
        elapsed: last - start,
        submitting,
    })
}

/// One Q1 (or Q3 scaling) run.
#[derive(Clone, Debug)]
pub struct ThroughputRun {
    /// The measured drive.
    pub drive: Drive,
    /// Redis calls per command during the drive (empty without a Redis URL).
    pub commands: BTreeMap<String, u64>,
    /// Redis CPU seconds during the drive.
    pub redis_cpu_secs: Option<f64>,
    /// The master's peak RSS and CPU (this whole process when in-process).
    pub master: Option<Usage>,
    /// Each worker's (child processes only).
    pub workers: Vec<Usage>,
    /// CPU seconds this process spent during the drive: the client alone when the
    /// services are child processes.
    pub bench_cpu_secs: f64,
    /// CPU seconds the master and the workers spent during the drive (child processes).
    pub service_cpu_secs: Option<(f64, f64)>,
    /// Whether master and workers were child processes.
    pub per_process: bool,
}

impl ThroughputRun {
    /// Redis commands per task (`None` without a Redis URL).
    pub fn commands_per_task(&self) -> Option<f64> {
        if self.commands.is_empty() {
            return None;
        }
        Some(self.commands.values().sum::<u64>() as f64 / self.drive.tasks as f64)
    }
}

/// Tasks run before a measurement so connections, workers and scripts are warm.
fn warm_up_tasks(tasks: usize) -> usize {
    (tasks / 10).clamp(10, 500)
}

fn cpu_of(usages: &[Usage]) -> f64 {
    usages.iter().map(|u| u.cpu_secs).sum()
}

/// Runs `tasks` tasks through `cluster` (already started, with workers) and reads what
/// Redis and the processes spent on them.
pub async fn throughput(
    cluster: &QueueCluster,
    tasks: usize,
    clients: usize,
) -> anyhow::Result<ThroughputRun> {
    let client = MasterClient::new(&cluster.master_url, &cluster.pipeline, clients * 2);
    drive(&client, warm_up_tasks(tasks), clients)
        .await
        .context("warm-up failed")?;
    let redis_before = cluster.redis_stats().await?;
    let bench_before = Usage::of("self").unwrap_or_default();
    let master_before = cluster.master_usage().unwrap_or_default();
    let workers_before = cluster.worker_usage();
    let drive = drive(&client, tasks, clients).await?;
    let redis_after = cluster.redis_stats().await?;
    let bench_after = Usage::of("self").unwrap_or_default();
    let master = cluster.master_usage();
    let workers = cluster.worker_usage();
    let per_process = cluster.per_process();
    let (commands, redis_cpu_secs) = match (&redis_before, &redis_after) {
        (Some(b), Some(a)) => (a.since(b), Some(a.cpu_secs - b.cpu_secs)),
        _ => (BTreeMap::new(), None),
    };
    Ok(ThroughputRun {
        drive,
        commands,
        redis_cpu_secs,
        service_cpu_secs: per_process.then(|| {
            (
                master.unwrap_or_default().cpu_secs - master_before.cpu_secs,
                cpu_of(&workers) - cpu_of(&workers_before),
            )
        }),
        master,
        workers,
        bench_cpu_secs: bench_after.cpu_secs - bench_before.cpu_secs,
        per_process,
    })
}

/// One Q2 run: end-to-end latencies at a fixed offered rate.
#[derive(Clone, Debug)]
pub struct LatencyRun {
    /// Latency percentiles, scheduled submit → result read.
    pub latency: Percentiles,
    /// Tasks offered.
    pub offered: usize,
    /// Tasks that ended other than `succeeded`, or whose submit or read failed.
    pub failed: usize,
    /// The rate actually achieved (tasks finished per second of the offer window).
    pub achieved_rate: f64,
}

/// Offers `rate` tasks per second for `secs`, open loop: task `i` is submitted at
/// `start + i / rate` whatever happened to the others, and its latency runs from that
/// scheduled instant to the moment its result has been read.
pub async fn latency(cluster: &QueueCluster, rate: u32, secs: u64) -> anyhow::Result<LatencyRun> {
    let client = MasterClient::new(&cluster.master_url, &cluster.pipeline, 256);
    drive(&client, 200, 16).await.context("warm-up failed")?;
    let offered = (u64::from(rate) * secs) as usize;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut handles = Vec::with_capacity(offered);
    for n in 0..offered {
        let client = client.clone();
        let at = start + interval * n as u32;
        handles.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let id = client.submit(client.body(n)).await?;
            let outcome = client.wait(&id).await?;
            Ok::<_, anyhow::Error>((outcome, at.elapsed()))
        }));
    }
    let mut samples = Vec::with_capacity(offered);
    let mut failed = 0;
    for h in handles {
        match h.await {
            Ok(Ok((Outcome::Succeeded, took))) => samples.push(took),
            _ => failed += 1,
        }
    }
    let window = (tokio::time::Instant::now() - start).as_secs_f64();
    Ok(LatencyRun {
        latency: Percentiles::of(&mut samples),
        offered,
        failed,
        achieved_rate: (offered - failed) as f64 / window,
    })
}

/// One Q3 deep-queue run.
#[derive(Clone, Copy, Debug)]
pub struct DeepQueueRun {
    /// Tasks queued before any worker started.
    pub depth: usize,
    /// Tasks per second submitted into the worker-less queue.
    pub submit_rate: f64,
    /// Steps dispatched per second while the deep queue fell from 99 % to 89 % of `depth`.
    pub deep_rate: f64,
    /// Steps dispatched per second while a queue of a tenth of `depth` drained from 95 %
    /// to 5 %: the near-empty baseline.
    pub shallow_rate: f64,
}

impl DeepQueueRun {
    /// `deep_rate / shallow_rate`: 1.0 is flat; below 1 the deep queue slows dispatch.
    pub fn flatness(&self) -> f64 {
        self.deep_rate / self.shallow_rate
    }
}

/// Q3's dispatch rate against queue depth: queues `depth` tasks with no worker running,
/// starts workers with `slots` in total and times the first tenth of the drain; then, on a
/// fresh cluster, the same with a queue a tenth as deep drained to empty.
pub async fn deep_queue(
    launch: &Launch,
    depth: usize,
    workers: usize,
    slots: u32,
    clients: usize,
) -> anyhow::Result<DeepQueueRun> {
    let d = depth as f64;
    let mut cluster = QueueCluster::start(launch).await?;
    let deep = drain(&mut cluster, depth, workers, slots, clients, 0.89 * d).await;
    cluster.stop().await;
    let (submit_rate, samples) = deep?;
    let deep_rate = drain_rate(&samples, 0.99 * d, 0.89 * d)?;

    let shallow = (depth / 10).max(1);
    let s = shallow as f64;
    let mut cluster = QueueCluster::start(launch).await?;
    let drained = drain(&mut cluster, shallow, workers, slots, clients, 0.0).await;
    cluster.stop().await;
    let (_, samples) = drained?;
    Ok(DeepQueueRun {
        depth,
        submit_rate,
        deep_rate,
        shallow_rate: drain_rate(&samples, 0.95 * s, 0.05 * s)?,
    })
}

/// Submits `count` tasks (the Q1 body) over `clients` connections, as fast as the master
/// takes them: one per `POST /task`.
pub async fn submit_all(client: &MasterClient, count: usize, clients: usize) -> anyhow::Result<()> {
    submit_in_batches(client, count, clients, 1).await
}

/// [`submit_all`], `batch` tasks per request: with more than one, `POST /tasks`.
pub async fn submit_in_batches(
    client: &MasterClient,
    count: usize,
    clients: usize,
    batch: usize,
) -> anyhow::Result<()> {
    let batch = batch.max(1);
    let next = Arc::new(AtomicUsize::new(0));
    let mut submitters = Vec::new();
    for _ in 0..clients.max(1) {
        let (client, next) = (client.clone(), next.clone());
        submitters.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                if batch == 1 {
                    client.submit(client.body(from)).await?;
                } else {
                    client.submit_batch(from, batch.min(count - from)).await?;
                }
            }
        }));
    }
    for s in submitters {
        s.await.context("a submitter panicked")??;
    }
    Ok(())
}

/// Queues `depth` tasks with no worker, starts the workers, and samples the queue depth
/// (`GET /queues`) until it is at or below `until` (and nothing is in flight, for 0).
/// Returns the submit rate and the samples.
async fn drain(
    cluster: &mut QueueCluster,
    depth: usize,
    workers: usize,
    slots: u32,
    clients: usize,
    until: f64,
) -> anyhow::Result<(f64, Vec<(Instant, u64)>)> {
    let client = MasterClient::new(&cluster.master_url, &cluster.pipeline, clients);
    let started = Instant::now();
    submit_all(&client, depth, clients).await?;
    let submit_rate = depth as f64 / started.elapsed().as_secs_f64();
    let (queued, _) = client.queue_depth(CAPABILITY).await?;
    if (queued as usize) < depth {
        bail!("only {queued} of {depth} steps are queued before any worker started");
    }

    cluster.start_workers(workers, slots).await?;
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let (queued, in_flight) = client.queue_depth(CAPABILITY).await?;
        samples.push((Instant::now(), queued));
        if queued as f64 <= until && (until > 0.0 || in_flight == 0) {
            return Ok((submit_rate, samples));
        }
        if Instant::now() > deadline {
            bail!("the queue did not drain within 900 s ({queued} left)");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Steps per second between the first sample at or below `from` and the first at or
/// below `to` (depths, `from > to`); when both are the same sample, from the one before.
fn drain_rate(samples: &[(Instant, u64)], from: f64, to: f64) -> anyhow::Result<f64> {
    let first_at_or_below = |depth: f64| {
        samples
            .iter()
            .position(|(_, q)| *q as f64 <= depth)
            .context("the queue never got that short")
    };
    let (mut i0, i1) = (first_at_or_below(from)?, first_at_or_below(to)?);
    if i0 == i1 {
        i0 = i0
            .checked_sub(1)
            .context("the queue drained before the first sample; use a deeper queue")?;
    }
    let ((t0, q0), (t1, q1)) = (samples[i0], samples[i1]);
    Ok(q0.saturating_sub(q1) as f64 / (t1 - t0).as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_rate_uses_the_first_samples_past_each_mark() {
        let t = Instant::now();
        let s = |ms: u64, q: u64| (t + Duration::from_millis(ms), q);
        let samples = [s(0, 100), s(100, 96), s(200, 90), s(1_100, 10), s(1_200, 0)];
        // 95 → first at or below is 90 (200 ms); 5 → 0 (1200 ms): 90 steps in 1 s.
        assert_eq!(drain_rate(&samples, 95.0, 5.0).unwrap(), 90.0);
        // Both marks fall on one sample: measured from the sample before.
        assert_eq!(drain_rate(&samples, 95.0, 94.0).unwrap(), 60.0);
        assert!(drain_rate(&samples, 101.0, 100.0).is_err());
    }
}

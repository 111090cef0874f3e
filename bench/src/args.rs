//! Command-line flags: what to run, how big, and whether to start the services or use
//! running ones.

use std::path::PathBuf;

use clap::Parser;

/// Ensemble's benchmark: queue throughput (Q1), latency (Q2), scaling (Q3), a workflow's
/// fan-out (F1), the llm-gateway's overhead (G1) and its memory under sustained load
/// (soak). Prints one table; each figure is the median of `--runs`.
#[derive(Clone, Debug, Parser)]
#[command(name = "ensemble-bench", version)]
pub struct Args {
    /// Shrink everything for a smoke run: 2,000 tasks, 3 s phases, a 10,000-deep queue,
    /// one run.
    #[arg(long)]
    pub quick: bool,
    /// Benchmarks to run, comma separated: q1, q2, q3, f1, g1, soak, b1, s1 (not by default:
    /// queueing a million tasks takes minutes).
    #[arg(long, value_delimiter = ',', default_value = "q1,q2,q3,f1,g1,soak,b1")]
    pub only: Vec<Bench>,
    /// Runs per figure (the table shows the median and the spread). Default 3, 1 with
    /// `--quick`.
    #[arg(long)]
    pub runs: Option<usize>,
    /// Q1/Q3: tasks per run. Default 20,000, 2,000 with `--quick`.
    #[arg(long)]
    pub tasks: Option<usize>,
    /// Q1/Q2: workers started (the slots are split between them).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Q1/Q2/Q3: worker slots in total (`MAX_CONCURRENCY` summed over the workers).
    #[arg(long, default_value_t = 16)]
    pub slots: u32,
    /// Q3: worker counts to compare, each with `--slots` in total.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub scale_workers: Vec<usize>,
    /// Q3: tasks queued before any worker starts. Default 100,000, 10,000 with `--quick`.
    #[arg(long)]
    pub deep_queue: Option<usize>,
    /// Q1/Q3: concurrent client connections submitting (as many again read results).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Q2: tasks per second offered, open loop.
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Q2: seconds offered. Default 20, 3 with `--quick`.
    #[arg(long)]
    pub latency_secs: Option<u64>,
    /// F1: elements the task maps over (at most 1,000, the widest map).
    #[arg(long, default_value_t = 1_000)]
    pub fanout_width: usize,
    /// F1: the map's `concurrency`, instances queued at once. Default: the width (all of
    /// them), so that the worker slots, not the map, bound the pace.
    #[arg(long)]
    pub fanout_concurrency: Option<usize>,
    /// G1: seconds per measurement. Default 15, 3 with `--quick`.
    #[arg(long)]
    pub gateway_secs: Option<u64>,
    /// G1: connection counts.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub connections: Vec<usize>,
    /// Soak: seconds of the G1 request through the gateway. Default 90, 12 with `--quick`.
    #[arg(long)]
    pub soak_secs: Option<u64>,
    /// Soak: seconds between two samples of the gateway's RSS.
    #[arg(long, default_value_t = 5)]
    pub soak_every: u64,
    /// S1: simulated workers heartbeating.
    #[arg(long, default_value_t = 1_000)]
    pub sim_workers: usize,
    /// S1: seconds Redis's CPU is measured with only the heartbeats running. Default 30, 5
    /// with `--quick`.
    #[arg(long)]
    pub scale_secs: Option<u64>,
    /// S1: one-step tasks queued for the memory figure. Default 1,000,000, 5,000 with
    /// `--quick`.
    #[arg(long)]
    pub scale_queued: Option<usize>,
    /// Soak: connections sending the G1 request.
    #[arg(long, default_value_t = 64)]
    pub soak_connections: usize,
    /// Start master, workers and gateway as separate processes (the `master`, `worker` and
    /// `llm-gateway` binaries of `--bin-dir`), so peak RSS and CPU are per service.
    /// Without it they run inside this process.
    #[arg(long)]
    pub processes: bool,
    /// With `--processes`: an extra `NAME=VALUE` for every service started (repeatable), to
    /// measure what a setting changes, e.g. `--service-env DISPATCH_POLL_MS=5`.
    #[arg(long, value_parser = parse_env)]
    pub service_env: Vec<(String, String)>,
    /// Where the service binaries are (default: next to this binary). Build them with
    /// `cargo build --release -p master -p worker -p llm-gateway`.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Q1/Q2: use a running master (and its workers) instead of starting one. Q3 needs to
    /// start workers itself and is skipped.
    #[arg(long)]
    pub master_url: Option<String>,
    /// An extra argument for the redis-server the bench starts (repeatable, passed last,
    /// so it wins), to measure what a Redis setting changes, e.g.
    /// `--redis-arg=--hash-max-ziplist-value --redis-arg=64` (Redis's default).
    #[arg(long, allow_hyphen_values = true)]
    pub redis_arg: Vec<String>,
    /// With `--master-url`: the master's Redis, for commands per task.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// With `--master-url`: the pipeline to submit (one `echo` step).
    #[arg(long, default_value = "bench")]
    pub pipeline: String,
    /// G1: use a running gateway; its `--model` alias must point (`GEMINI_BASE_URL`) at the
    /// fake upstream this bench serves on `--upstream-port`.
    #[arg(long, requires = "upstream_port")]
    pub gateway_url: Option<String>,
    /// G1: the port the fake Gemini upstream listens on (default: a free one).
    #[arg(long)]
    pub upstream_port: Option<u16>,
    /// G1: the model alias requested from the gateway.
    #[arg(long, default_value = "default")]
    pub model: String,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{text}` is not NAME=VALUE")),
    }
}

/// One benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Bench {
    /// Queue throughput.
    Q1,
    /// Queue latency at a fixed offered rate.
    Q2,
    /// Throughput per worker count, and dispatch rate against queue depth.
    Q3,
    /// One task fanning a no-op step out over 1,000 elements, then a join.
    F1,
    /// Gateway overhead against a direct call.
    G1,
    /// The gateway's RSS over a long G1 run at 64 connections: flat or growing.
    Soak,
    /// What 1,000 heartbeating workers cost Redis, and the memory per queued task.
    S1,
    /// Submit rate: one task per `POST /task` against 100 per `POST /tasks`.
    B1,
}

impl Args {
    /// Whether `bench` was selected.
    pub fn selected(&self, bench: Bench) -> bool {
        self.only.contains(&bench)
    }

    /// Runs per figure.
    pub fn runs(&self) -> usize {
        self.runs.unwrap_or(if self.quick { 1 } else { 3 }).max(1)
    }

    /// Q1 tasks per run.
    pub fn tasks(&self) -> usize {
        self.tasks
            .unwrap_or(if self.quick { 2_000 } else { 20_000 })
    }

    /// Q3's queue depth before workers start.
    pub fn deep_queue(&self) -> usize {
        self.deep_queue
            .unwrap_or(if self.quick { 10_000 } else { 100_000 })
    }

    /// F1's map concurrency.
    pub fn fanout_concurrency(&self) -> usize {
        self.fanout_concurrency.unwrap_or(self.fanout_width)
    }

    /// Q2's duration in seconds.
    pub fn latency_secs(&self) -> u64 {
        self.latency_secs.unwrap_or(if self.quick { 3 } else { 20 })
    }

    /// G1's duration per measurement in seconds.
    pub fn gateway_secs(&self) -> u64 {
        self.gateway_secs.unwrap_or(if self.quick { 3 } else { 15 })
    }

    /// S1's measurement in seconds.
    pub fn scale_secs(&self) -> u64 {
        self.scale_secs.unwrap_or(if self.quick { 5 } else { 30 })
    }

    /// S1's queued tasks.
    pub fn scale_queued(&self) -> usize {
        self.scale_queued
            .unwrap_or(if self.quick { 5_000 } else { 1_000_000 })
    }

    /// The soak's duration in seconds.
    pub fn soak_secs(&self) -> u64 {
        self.soak_secs.unwrap_or(if self.quick { 12 } else { 90 })
    }
}

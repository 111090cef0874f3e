//! `ensemble-bench`: Ensemble's own benchmark. It starts what it needs (a redis-server on a
//! free port, the master, echo workers, the llm-gateway and a fake Gemini upstream), in
//! this process or as child processes, or targets running services by URL, and prints one
//! table: Q1 throughput, Q2 latency, Q3 scaling, F1 fan-out, G1 gateway overhead, and the
//! gateway's RSS over a soak; and, on request (`--only s1`), what 1,000 heartbeating
//! workers cost Redis and the memory per queued task.

pub mod args;
pub mod bulk;
pub mod client;
pub mod cluster;
pub mod fanout;
pub mod gateway;
pub mod queue;
pub mod report;
pub mod scale;
pub mod stats;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;

pub use args::{Args, Bench};
pub use report::{Report, Target};

use testkit::fakes::FakeGemini;

use crate::cluster::{Gateway, Launch, QueueCluster, load_average};
use crate::gateway::{Call, LoadRun};
use crate::queue::ThroughputRun;
use crate::stats::median_index;

/// Runs the selected benchmarks and returns the report (print it with
/// [`Report::render`]). Fails if any task is lost or a service does not start.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    common::install_crypto_provider();
    let launch = Launch::new(
        args.processes,
        args.bin_dir.clone(),
        args.service_env.clone(),
        args.redis_arg.clone(),
    )?;
    let mut report = Report {
        header: header(args),
        ..Report::default()
    };
    let mut loads = vec![format!("start: {}", load_average())];
    if args.selected(Bench::Q1) {
        q1(args, &launch, &mut report).await?;
        loads.push(format!("after Q1: {}", load_average()));
    }
    if args.selected(Bench::Q2) {
        q2(args, &launch, &mut report).await?;
        loads.push(format!("after Q2: {}", load_average()));
    }
    if args.selected(Bench::Q3) {
        q3(args, &launch, &mut report).await?;
        loads.push(format!("after Q3: {}", load_average()));
    }
    if args.selected(Bench::F1) {
        f1(args, &launch, &mut report).await?;
        loads.push(format!("after F1: {}", load_average()));
    }
    if args.selected(Bench::G1) {
        g1(args, &launch, &mut report).await?;
        loads.push(format!("after G1: {}", load_average()));
    }
    if args.selected(Bench::Soak) {
        soak(args, &launch, &mut report).await?;
        loads.push(format!("after the soak: {}", load_average()));
    }
    if args.selected(Bench::S1) {
        s1(args, &launch, &mut report).await?;
        loads.push(format!("after S1: {}", load_average()));
    }
    if args.selected(Bench::B1) {
        b1(args, &launch, &mut report).await?;
        loads.push(format!("after B1: {}", load_average()));
    }
    report.note("Load average (1, 5, 15 min):", loads);
    Ok(report)
}

fn header(args: &Args) -> Vec<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mode = if args.master_url.is_some() {
        "against a running master"
    } else if args.processes {
        "services as child processes"
    } else {
        "services in this process"
    };
    let mut lines = vec![
        format!("# ensemble-bench {}", env!("CARGO_PKG_VERSION")),
        format!(
            "machine: {cpu}, {cores} cores, Linux {}; {mode}; {} run(s) per figure",
            kernel.trim(),
            args.runs()
        ),
    ];
    if !args.redis_arg.is_empty() {
        lines.push(format!("redis-server with: {}", args.redis_arg.join(" ")));
    }
    lines
}

/// A started cluster with workers, or the running one given by URL.
async fn cluster(args: &Args, launch: &Launch, workers: usize) -> anyhow::Result<QueueCluster> {
    if let Some(url) = &args.master_url {
        return Ok(QueueCluster::external(
            url,
            args.redis_url.clone(),
            &args.pipeline,
        ));
    }
    let mut cluster = QueueCluster::start(launch).await?;
    cluster.start_workers(workers, args.slots).await?;
    Ok(cluster)
}

/// Runs Q1 `runs` times with `workers` workers, each on a fresh cluster.
async fn throughput_runs(
    args: &Args,
    launch: &Launch,
    workers: usize,
) -> anyhow::Result<Vec<ThroughputRun>> {
    let mut runs = Vec::new();
    for _ in 0..args.runs() {
        let cluster = cluster(args, launch, workers).await?;
        let run = queue::throughput(&cluster, args.tasks(), args.clients).await;
        cluster.stop().await;
        let run = run?;
        if run.drive.failed > 0 {
            anyhow::bail!("{} of {} tasks failed", run.drive.failed, run.drive.tasks);
        }
        runs.push(run);
    }
    Ok(runs)
}

async fn q1(args: &Args, launch: &Launch, report: &mut Report) -> anyhow::Result<()> {
    let runs = throughput_runs(args, launch, args.workers).await?;
    let of = |f: &dyn Fn(&ThroughputRun) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    let per_process = runs.iter().all(|r| r.per_process);
    report.add(
        format!(
            "Q1 throughput ({} tasks, {} workers, {} slots)",
            args.tasks(),
            args.workers,
            args.slots
        ),
        "tasks/s",
        of(&|r| r.drive.rate()),
        Some(Target::AtLeast(10_000.0)),
    );
    report.add(
        "Q1 submit rate (while results are read)",
        "tasks/s",
        of(&|r| r.drive.tasks as f64 / r.drive.submitting.as_secs_f64()),
        None,
    );
    if runs.iter().all(|r| r.commands_per_task().is_some()) {
        report.add(
            "Q1 Redis commands per task",
            "",
            of(&|r| r.commands_per_task().unwrap_or(f64::NAN)),
            Some(Target::AtMost(12.0)),
        );
    }
    if runs.iter().all(|r| r.master.is_some()) {
        let name = if per_process {
            "Q1 master peak RSS"
        } else {
            "Q1 peak RSS of the whole bench process (in-process; use --processes)"
        };
        report.add(
            name,
            "MiB",
            of(&|r| r.master.map_or(f64::NAN, |u| u.peak_rss_mb)),
            per_process.then_some(Target::Below(64.0)),
        );
    }
    if per_process {
        report.add(
            "Q1 worker peak RSS (largest)",
            "MiB",
            of(&|r| r.workers.iter().map(|u| u.peak_rss_mb).fold(0.0, f64::max)),
            None,
        );
    }
    let mid = &runs[median_index(&of(&|r| r.drive.rate()))];
    report.note(
        "Q1 Redis commands per task, by command (median run):",
        commands_breakdown(&mid.commands, mid.drive.tasks, "task"),
    );
    report.note(
        "Q1 CPU seconds during the drive (median run):",
        cpu_split(mid),
    );
    Ok(())
}

/// One line per Redis command: calls per `unit` (of which there were `count`), most first.
fn commands_breakdown(commands: &BTreeMap<String, u64>, count: usize, unit: &str) -> Vec<String> {
    if commands.is_empty() {
        return vec!["(no Redis URL: pass --redis-url)".into()];
    }
    let mut rows: Vec<(&String, &u64)> = commands.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1));
    rows.into_iter()
        .map(|(name, n)| {
            format!(
                "{name:<14} {:>8.3} per {unit}  ({n} calls)",
                *n as f64 / count.max(1) as f64
            )
        })
        .collect()
}

fn cpu_split(run: &ThroughputRun) -> Vec<String> {
    let wall = run.drive.elapsed.as_secs_f64();
    let line = |who: &str, secs: f64| {
        format!(
            "{who:<28} {secs:>7.2} s  ({:>5.1} % of one core over {wall:.2} s; {:.1} µs per task)",
            secs / wall * 100.0,
            secs / run.drive.tasks as f64 * 1e6
        )
    };
    let mut lines = Vec::new();
    match run.service_cpu_secs {
        Some((master, workers)) => {
            lines.push(line("master", master));
            lines.push(line("workers (all)", workers));
            lines.push(line("bench client", run.bench_cpu_secs));
        }
        None => lines.push(line(
            "bench process (client + services)",
            run.bench_cpu_secs,
        )),
    }
    if let Some(redis) = run.redis_cpu_secs {
        lines.push(line("redis-server", redis));
    }
    lines
}

/// F1: one fan-out task per run, each on a fresh cluster with `--workers` and `--slots`.
async fn f1(args: &Args, launch: &Launch, report: &mut Report) -> anyhow::Result<()> {
    let (width, concurrency) = (args.fanout_width, args.fanout_concurrency());
    let mut runs = Vec::new();
    for _ in 0..args.runs() {
        let cluster = cluster(args, launch, args.workers).await?;
        let run = fanout::fan_out(&cluster, width, concurrency).await;
        cluster.stop().await;
        runs.push(run?);
    }
    let of = |f: &dyn Fn(&fanout::FanOutRun) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    let label = format!(
        "F1 fan-out of {} (concurrency {}) + join, {} slots",
        report::number(width as f64),
        report::number(concurrency as f64),
        args.slots
    );
    report.add(
        format!("{label}, submit to result"),
        "ms",
        of(&|r| stats::ms(r.elapsed)),
        None,
    );
    report.add(
        "F1 steps per second (instances + join)",
        "steps/s",
        of(&fanout::FanOutRun::steps_per_sec),
        None,
    );
    if runs.iter().all(|r| r.commands_per_element().is_some()) {
        report.add(
            "F1 Redis commands per element",
            "",
            of(&|r| r.commands_per_element().unwrap_or(f64::NAN)),
            None,
        );
        let mid = &runs[median_index(&of(&|r| stats::ms(r.elapsed)))];
        report.note(
            "F1 Redis commands per element, by command (median run):",
            commands_breakdown(&mid.commands, mid.width, "element"),
        );
    }
    Ok(())
}

async fn q2(args: &Args, launch: &Launch, report: &mut Report) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for _ in 0..args.runs() {
        let cluster = cluster(args, launch, args.workers).await?;
        let run = queue::latency(&cluster, args.rate, args.latency_secs()).await;
        cluster.stop().await;
        let run = run?;
        if run.failed > 0 {
            anyhow::bail!("{} of {} tasks failed", run.failed, run.offered);
        }
        runs.push(run);
    }
    let label = format!(
        "Q2 latency at {}/s for {} s",
        args.rate,
        args.latency_secs()
    );
    let of = |f: &dyn Fn(&queue::LatencyRun) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    report.add(
        format!("{label}, p50"),
        "ms",
        of(&|r| r.latency.p50),
        Some(Target::AtMost(1.0)),
    );
    report.add(format!("{label}, p95"), "ms", of(&|r| r.latency.p95), None);
    report.add(
        format!("{label}, p99"),
        "ms",
        of(&|r| r.latency.p99),
        Some(Target::AtMost(3.0)),
    );
    report.add(format!("{label}, max"), "ms", of(&|r| r.latency.max), None);
    report.add(
        "Q2 rate achieved",
        "tasks/s",
        of(&|r| r.achieved_rate),
        None,
    );
    Ok(())
}

async fn q3(args: &Args, launch: &Launch, report: &mut Report) -> anyhow::Result<()> {
    if args.master_url.is_some() {
        report.note(
            "Q3 skipped:",
            vec!["it starts and stops workers itself, so it cannot use --master-url".into()],
        );
        return Ok(());
    }
    for &workers in &args.scale_workers {
        let runs = throughput_runs(args, launch, workers).await?;
        report.add(
            format!(
                "Q3 throughput, {workers} worker(s) × {} slots",
                slots_each(args.slots, workers)
            ),
            "tasks/s",
            runs.iter().map(|r| r.drive.rate()).collect(),
            None,
        );
    }
    let depth = args.deep_queue();
    let mut runs = Vec::new();
    for _ in 0..args.runs() {
        runs.push(queue::deep_queue(launch, depth, args.workers, args.slots, args.clients).await?);
    }
    let (deep, shallow) = (
        report::number(depth as f64),
        report::number((depth / 10) as f64),
    );
    type Row = (
        String,
        &'static str,
        fn(&queue::DeepQueueRun) -> f64,
        Option<Target>,
    );
    let rows: [Row; 4] = [
        (
            format!("Q3 submit rate into a queue growing to {deep}"),
            "tasks/s",
            |r| r.submit_rate,
            None,
        ),
        (
            format!("Q3 dispatch rate, queue at 99–89 % of {deep}"),
            "steps/s",
            |r| r.deep_rate,
            None,
        ),
        (
            format!("Q3 dispatch rate, a {shallow} queue at 95–5 % (near empty)"),
            "steps/s",
            |r| r.shallow_rate,
            None,
        ),
        (
            "Q3 deep / near-empty dispatch rate".into(),
            "",
            queue::DeepQueueRun::flatness,
            Some(Target::AtLeast(0.9)),
        ),
    ];
    for (name, unit, value, target) in rows {
        report.add(name, unit, runs.iter().map(value).collect(), target);
    }
    Ok(())
}

fn slots_each(slots: u32, workers: usize) -> String {
    let workers = workers.max(1) as u32;
    if slots.is_multiple_of(workers) {
        (slots / workers).to_string()
    } else {
        format!("~{}", slots / workers)
    }
}

async fn g1(args: &Args, launch: &Launch, report: &mut Report) -> anyhow::Result<()> {
    let port = args.upstream_port.unwrap_or(0);
    let mut upstream = FakeGemini::start_on(port)
        .await
        .with_context(|| format!("the fake Gemini could not listen on port {port}"))?;
    upstream.stop_recording();
    let gateway = match &args.gateway_url {
        Some(_) => None,
        None => Some(Gateway::start(launch, &upstream.url).await?),
    };
    let gateway_url = args
        .gateway_url
        .clone()
        .or_else(|| gateway.as_ref().map(|g| g.url.clone()))
        .context("no gateway to measure")?;
    let direct = Call::direct(&upstream.url);
    let through = Call::gateway(&gateway_url, &args.model);
    let secs = Duration::from_secs(args.gateway_secs());
    let result = async {
        for &connections in &args.connections {
            let mut pairs: Vec<(LoadRun, LoadRun)> = Vec::new();
            for _ in 0..args.runs() {
                let d = gateway::load(&direct, connections, secs).await?;
                let g = gateway::load(&through, connections, secs).await?;
                if d.errors + g.errors > 0 {
                    anyhow::bail!(
                        "G1 at {connections} connection(s): {} direct and {} gateway requests failed",
                        d.errors,
                        g.errors
                    );
                }
                pairs.push((d, g));
            }
            g1_rows(report, connections, &pairs, args.gateway_secs());
        }
        Ok(())
    }
    .await;
    if let Some(g) = gateway {
        if let Some(usage) = g.usage().filter(|_| args.processes) {
            report.note(
                "G1 gateway process:",
                vec![format!(
                    "peak RSS {:.1} MiB, CPU {:.2} s over the whole G1",
                    usage.peak_rss_mb, usage.cpu_secs
                )],
            );
        }
        g.stop().await;
    }
    upstream.stop().await;
    result
}

fn g1_rows(report: &mut Report, connections: usize, pairs: &[(LoadRun, LoadRun)], secs: u64) {
    let c = format!("{connections} conn");
    let of = |f: &dyn Fn(&(LoadRun, LoadRun)) -> f64| pairs.iter().map(f).collect::<Vec<_>>();
    report.add(
        format!("G1 direct, {c}, {secs} s"),
        "req/s",
        of(&|p| p.0.rps),
        None,
    );
    report.add(
        format!("G1 gateway, {c}, {secs} s"),
        "req/s",
        of(&|p| p.1.rps),
        None,
    );
    report.add(
        format!("G1 direct, {c}, p50"),
        "ms",
        of(&|p| p.0.latency.p50),
        None,
    );
    report.add(
        format!("G1 gateway, {c}, p50"),
        "ms",
        of(&|p| p.1.latency.p50),
        None,
    );
    report.add(
        format!("G1 direct, {c}, p99"),
        "ms",
        of(&|p| p.0.latency.p99),
        None,
    );
    report.add(
        format!("G1 gateway, {c}, p99"),
        "ms",
        of(&|p| p.1.latency.p99),
        None,
    );
    let single = connections == 1;
    report.add(
        format!("G1 added by the gateway, {c}, p50"),
        "ms",
        of(&|p| p.1.latency.p50 - p.0.latency.p50),
        single.then_some(Target::AtMost(0.1)),
    );
    report.add(
        format!("G1 added by the gateway, {c}, p99"),
        "ms",
        of(&|p| p.1.latency.p99 - p.0.latency.p99),
        single.then_some(Target::AtMost(0.5)),
    );
    report.add(
        format!("G1 gateway req/s as % of direct, {c}"),
        "%",
        of(&|p| p.1.rps / p.0.rps * 100.0),
        (connections >= 64).then_some(Target::AtLeast(50.0)),
    );
}

/// S1: the Redis core share of `--sim-workers` heartbeating workers and the dispatcher's
/// registry reads, then the Redis memory per queued one-step task.
async fn s1(args: &Args, launch: &Launch, report: &mut Report) -> anyhow::Result<()> {
    if args.master_url.is_some() {
        report.note(
            "S1 skipped:",
            vec!["it needs a master and Redis of its own, so it cannot use --master-url".into()],
        );
        return Ok(());
    }
    let mut runs = Vec::new();
    for _ in 0..args.runs() {
        runs.push(
            scale::scale(
                launch,
                args.sim_workers,
                args.scale_secs(),
                args.scale_queued(),
                args.clients,
            )
            .await?,
        );
    }
    let of = |f: &dyn Fn(&scale::ScaleRun) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    report.add(
        format!(
            "S1 Redis, {} workers heartbeating every 2 s + registry reads",
            report::number(args.sim_workers as f64)
        ),
        "% of a core",
        of(&|r| r.redis_core_pct),
        Some(Target::Below(5.0)),
    );
    report.add(
        "S1 heartbeats per second",
        "beats/s",
        of(&|r| r.beats as f64 / args.scale_secs().max(1) as f64),
        None,
    );
    report.add(
        format!(
            "S1 Redis memory per queued one-step task, {} queued",
            report::number(args.scale_queued() as f64)
        ),
        "bytes",
        of(&|r| r.bytes_per_task),
        Some(Target::AtMost(1024.0)),
    );
    if let Some(last) = runs.last() {
        let mut lines = vec![format!("task hash encoding: {}", last.task_encoding)];
        lines.extend(
            last.breakdown
                .iter()
                .map(|(key, bytes)| format!("{key}: {bytes:.0} bytes per task")),
        );
        report.note("S1 memory by key (MEMORY USAGE, last run):", lines);
        report.note(
            "S1 Redis time by command while the workers beat (INFO commandstats, last run; a \
             script's time includes the commands it calls, listed too):",
            last.commands
                .iter()
                .take(12)
                .map(|(name, per_sec, pct)| {
                    format!("{name}: {per_sec:.0}/s, {pct:.2} % of the wall time")
                })
                .collect(),
        );
    }
    Ok(())
}

/// B1: `--tasks` tasks queued one per `POST /task`, then 100 per `POST /tasks`, each way on
/// a master of its own with no worker; alternating, `--runs` times.
async fn b1(args: &Args, launch: &Launch, report: &mut Report) -> anyhow::Result<()> {
    if args.master_url.is_some() {
        report.note(
            "B1 skipped:",
            vec!["it starts a master per run, so it cannot use --master-url".into()],
        );
        return Ok(());
    }
    let (mut single, mut batched) = (Vec::new(), Vec::new());
    for _ in 0..args.runs() {
        single.push(bulk::submit_run(launch, args.tasks(), args.clients, 1).await?);
        batched.push(bulk::submit_run(launch, args.tasks(), args.clients, bulk::BATCH).await?);
    }
    for (how, runs) in [
        ("one per POST /task", &single),
        ("100 per POST /tasks", &batched),
    ] {
        report.add(
            format!("B1 submit rate, {how}"),
            "tasks/s",
            runs.iter().map(|r| r.rate).collect(),
            None,
        );
        let master: Vec<f64> = runs.iter().filter_map(|r| r.master_us).collect();
        if !master.is_empty() {
            report.add(format!("B1 master CPU per task, {how}"), "µs", master, None);
        }
        let redis: Vec<f64> = runs.iter().filter_map(|r| r.redis_us).collect();
        if !redis.is_empty() {
            report.add(format!("B1 Redis CPU per task, {how}"), "µs", redis, None);
        }
    }
    Ok(())
}

/// Where the soak's plateau ends: by 10 s the connections, pools and buffers exist, so
/// growth after it is what sustained load adds.
const SOAK_PLATEAU_SECS: f64 = 10.0;

/// The most the gateway's RSS may grow from the plateau to the end of the soak and still
/// count as flat. Allocator noise at 64 connections is a few MiB; a leak of even one small
/// allocation per request (~1,000,000 requests in 90 s) is tens.
const SOAK_FLAT_MIB: f64 = 4.0;

/// Soak: the G1 request through a fresh gateway per run, at `--soak-connections` for
/// `--soak-secs`, its RSS sampled every `--soak-every` seconds.
async fn soak(args: &Args, launch: &Launch, report: &mut Report) -> anyhow::Result<()> {
    if args.gateway_url.is_some() {
        report.note(
            "Soak skipped:",
            vec!["it reads the RSS of a gateway it starts, so it cannot use --gateway-url".into()],
        );
        return Ok(());
    }
    let secs = args.soak_secs();
    // A short soak (`--quick`) has its plateau a third of the way in.
    let plateau = SOAK_PLATEAU_SECS.min(secs as f64 / 3.0);
    let mut runs = Vec::new();
    let mut per_process = true;
    for _ in 0..args.runs() {
        let mut upstream = FakeGemini::start_on(0)
            .await
            .context("the fake Gemini could not listen")?;
        upstream.stop_recording();
        let gateway = Gateway::start(launch, &upstream.url).await?;
        per_process &= gateway.per_process();
        let call = Call::gateway(&gateway.url, &args.model);
        let run = gateway::soak(
            &call,
            args.soak_connections,
            Duration::from_secs(secs),
            Duration::from_secs(args.soak_every),
            || gateway.usage().map(|u| u.rss_mb),
        )
        .await;
        gateway.stop().await;
        upstream.stop().await;
        let run = run?;
        if run.load.errors > 0 {
            anyhow::bail!("soak: {} gateway requests failed", run.load.errors);
        }
        runs.push(run);
    }
    let whose = if per_process {
        "gateway RSS"
    } else {
        "RSS of the whole bench process (in-process; use --processes)"
    };
    let c = format!("{} conn, {secs} s", args.soak_connections);
    let of = |f: &dyn Fn(&gateway::SoakRun) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    report.add(
        format!("Soak gateway, {c}"),
        "req/s",
        of(&|r| r.load.rps),
        None,
    );
    report.add(
        format!("Soak {whose} at {plateau:.0} s"),
        "MiB",
        of(&|r| r.plateau_mb(plateau)),
        None,
    );
    report.add(
        format!("Soak {whose} at the end"),
        "MiB",
        of(&|r| r.end_mb()),
        None,
    );
    report.add(
        format!("Soak {whose} growth, {plateau:.0} s to the end"),
        "MiB",
        of(&|r| r.growth_mb(plateau)),
        per_process.then_some(Target::AtMost(SOAK_FLAT_MIB)),
    );
    report.note(
        format!("Soak {whose} (MiB) every {} s, per run:", args.soak_every),
        runs.iter()
            .enumerate()
            .map(|(i, r)| format!("run {}: {}", i + 1, r.series()))
            .collect(),
    );
    Ok(())
}

//! The command line: `up`, `demo`, and the client commands, with their flags and the
//! environment variables that stand in for them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Ensemble: a multi-agent master/worker runtime.
#[derive(Debug, Parser)]
#[command(name = "ensemble", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole system in this process: llm-gateway, master and four workers
    /// (`plan`, `retrieve`, `evaluate`, `finalize`), on a redis-server of its own (or an
    /// in-memory store), until ctrl-c.
    Up(LaunchArgs),
    /// `up`, then one task on the `default` pipeline, shown step by step; exits 0 when it
    /// succeeded.
    Demo(DemoArgs),
    /// Submit a task; prints its id (with `--wait`, follows it, drawing its steps as a
    /// tree, and prints its result).
    Submit(SubmitArgs),
    /// A task's status (`GET /task/{id}`): its steps as a tree on a terminal, the full view
    /// as JSON otherwise (or with `--json`); `--watch` follows it to its end.
    Status(StatusArgs),
    /// Sends a signal to a task's wait step (`POST /task/{id}/signal`), releasing it with
    /// the payload as its output (or kept until the step is reached).
    Signal(SignalArgs),
    /// A task's result (`GET /result/{id}`), as JSON; exit code 0 succeeded, 3 failed or
    /// cancelled, 4 still running.
    Result(ResultArgs),
    /// Live workers per capability (`GET /workers`, operator), as JSON.
    Workers(Target),
    /// Queue depths per capability (`GET /queues`, operator), as JSON.
    Queues(Target),
    /// Follows a task live from its event stream: its steps as a tree, and agents' partial
    /// output (tokens) as it arrives; exits as `result` does (`status ID --watch` does the
    /// same).
    Watch(WatchArgs),
}

/// `watch`'s arguments.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The task.
    #[command(flatten)]
    pub task: TaskArgs,
    /// Give up after this many seconds (exit code 4).
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
}

/// How `up` and `demo` start the system.
#[derive(Debug, Args, Clone)]
pub struct LaunchArgs {
    /// The llm-gateway's port (0: any free port).
    #[arg(long, default_value_t = 7000)]
    pub gateway_port: u16,
    /// The master's port (0: any free port).
    #[arg(long, default_value_t = 8000)]
    pub master_port: u16,
    /// The four workers' ports, in the order plan,retrieve,evaluate,finalize; a single
    /// value is used for all four (only sensible as 0: any free port).
    #[arg(long, value_delimiter = ',', default_values_t = [5001, 5002, 5003, 5004])]
    pub worker_ports: Vec<u16>,
    /// Added to every non-zero port, to run a second copy beside the first.
    #[arg(long, default_value_t = 0)]
    pub port_offset: u16,
    /// Use this Redis (`redis://` or `rediss://` URL) instead of starting a redis-server;
    /// the other `REDIS_*` variables still apply.
    #[arg(long, conflicts_with = "memory")]
    pub redis_url: Option<String>,
    /// Keep tasks in the master's memory even if redis-server is on PATH (lost on exit).
    #[arg(long)]
    pub memory: bool,
    /// The API key clients (and operators) use; random unless given.
    #[arg(long, env = "ENSEMBLE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A TOML file every service reads (pipelines, prompts, model aliases, …).
    #[arg(long, env = "ENSEMBLE_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `demo`'s flags.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How to start the system.
    #[command(flatten)]
    pub launch: LaunchArgs,
    /// The task's input (JSON, or `@file`); a sample question by default.
    #[arg(long)]
    pub input: Option<String>,
    /// Give up on the task after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// Where the master is and how to authenticate.
#[derive(Debug, Args, Clone)]
pub struct Target {
    /// The master's base URL.
    #[arg(long, env = "ENSEMBLE_URL", default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// The API key (sent as a bearer token).
    #[arg(long, env = "ENSEMBLE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// `submit`'s flags.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The master.
    #[command(flatten)]
    pub target: Target,
    /// A named pipeline (`default` unless `--steps` is given).
    #[arg(long, conflicts_with = "steps")]
    pub pipeline: Option<String>,
    /// Inline steps: capabilities, comma separated (`plan,finalize`), a chain.
    #[arg(long, value_delimiter = ',', conflicts_with = "graph")]
    pub steps: Option<Vec<String>>,
    /// Inline steps as JSON (or `@file`): the `steps` array of `POST /task`, step objects
    /// with `id`, `needs`, `map`, `router`, `wait`, … (see docs/workflows.md).
    #[arg(long, conflicts_with = "pipeline")]
    pub graph: Option<String>,
    /// The task's input: JSON, `@file` for a file's JSON, `@-` for standard input.
    #[arg(long)]
    pub input: String,
    /// Follow the task live (its steps as a tree on stderr, agents' tokens as they come)
    /// and print its result; exit code 0 succeeded, 3 failed. `--follow` is the same.
    #[arg(long, visible_alias = "follow")]
    pub wait: bool,
    /// With `--wait`: give up after this many seconds (exit code 4).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Higher runs first within a capability's queue (-100..=100, as the master accepts).
    #[arg(long, allow_hyphen_values = true)]
    pub priority: Option<i32>,
    /// Submitting the same key again returns the first task instead of a new one.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// A task id and the master.
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// The master.
    #[command(flatten)]
    pub target: Target,
    /// The task's id.
    pub id: String,
}

/// `status`'s flags.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The task.
    #[command(flatten)]
    pub task: TaskArgs,
    /// Print the full view as JSON, even on a terminal.
    #[arg(long, conflicts_with = "tree")]
    pub json: bool,
    /// Draw the tree, even when stdout is not a terminal.
    #[arg(long)]
    pub tree: bool,
    /// Follow the task until it finishes (or `--timeout`), redrawing the tree.
    #[arg(long, conflicts_with = "json")]
    pub watch: bool,
    /// With `--watch`: give up after this many seconds (exit code 4).
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
}

/// `signal`'s arguments.
#[derive(Debug, Args)]
pub struct SignalArgs {
    /// The master.
    #[command(flatten)]
    pub target: Target,
    /// The task's id.
    pub id: String,
    /// The signal's name (a wait step's `signal`, by default its id).
    pub name: String,
    /// The payload, which becomes the wait step's output: JSON, `@file`, or `@-` for
    /// standard input; `null` when left out.
    pub payload: Option<String>,
}

/// `result`'s flags.
#[derive(Debug, Args)]
pub struct ResultArgs {
    /// The task.
    #[command(flatten)]
    pub task: TaskArgs,
    /// Wait up to this many seconds for the task to finish.
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn the_priority_range_in_the_help_is_the_masters() {
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("submit")
            .map(|c| c.render_help().to_string())
            .unwrap_or_default();
        let max = master::store::MAX_PRIORITY;
        assert!(
            help.contains(&format!("-{max}..={max}")),
            "`ensemble submit --help` must state the master's range: {help}"
        );
    }
}

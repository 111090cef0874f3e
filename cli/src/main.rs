//! The `ensemble` command: `up` (the whole system in one process), `demo`, and a client of
//! the master's API (`submit`, `status`, `signal`, `result`, `workers`, `queues`).

/// `println!` that does not panic when stdout is closed early (`ensemble demo | head`):
/// output nobody reads is dropped.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod args;
mod client;
mod commands;
mod demo;
mod launcher;
mod tree;
mod up;
mod watch;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::args::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // `up` shows the services' logs; the demo and the client commands only their problems.
    // In memory mode the workers' failing Redis heartbeats are expected (`up` says so).
    let launch = match &cli.command {
        Command::Up(args) => Some(("info", args)),
        Command::Demo(args) => Some(("warn", &args.launch)),
        _ => None,
    };
    let filter = match launch {
        Some((level, args)) if launcher::memory_mode(args) => {
            format!("{level},worker::heartbeat=error")
        }
        Some((level, _)) => level.to_string(),
        None => "warn".to_string(),
    };
    init_logs(&filter);
    if launch.is_some() {
        // `up` and `demo` run every service in this process: their connections share its
        // open-file limit.
        common::limits::raise_nofile();
    }
    common::install_crypto_provider();
    let outcome = match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Submit(args) => commands::submit(args).await,
        Command::Status(args) => commands::status(args).await,
        Command::Watch(args) => {
            commands::status(args::StatusArgs {
                task: args.task,
                json: false,
                tree: false,
                watch: true,
                timeout: args.timeout,
            })
            .await
        }
        Command::Signal(args) => commands::signal(args).await,
        Command::Result(args) => commands::result(args).await,
        Command::Workers(target) => commands::operator_view(target, "/workers").await,
        Command::Queues(target) => commands::operator_view(target, "/queues").await,
    };
    outcome.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

/// Logs on stderr (stdout carries results), filtered by `RUST_LOG` or `default`; one JSON
/// object a line with `LOG_FORMAT=json`, like the services.
fn init_logs(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        registry.with(layer.json().flatten_event(true)).init();
    } else {
        registry.with(layer).init();
    }
}

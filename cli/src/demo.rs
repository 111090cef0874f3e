//! `ensemble demo`: start the system, run one task on the `default` pipeline (`plan`, then
//! `retrieve` once per query of the plan, `evaluate`, `finalize`) showing its tree as it
//! runs, print the result, stop everything. Exit code 0 when the task succeeded.

use std::process::ExitCode;
use std::time::Duration;

use common::wire::{TaskStatus, TaskView};
use serde_json::{Value, json};

use crate::args::DemoArgs;
use crate::commands::{STILL_RUNNING, exit_for, print_json, read_input};
use crate::launcher::System;
use crate::tree;
use crate::watch::{Stream, TreeView, Watched, follow};

/// The sample task.
fn sample_input() -> Value {
    json!({
        "question": "What should a small team check before moving a web service to containers on AWS?"
    })
}

/// `ensemble demo`.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let input = match &args.input {
        Some(text) => read_input(text)?,
        None => sample_input(),
    };
    let shutdown = common::shutdown::on_signal();
    let system = tokio::select! {
        started = System::start(&args.launch) => started?,
        () = shutdown.cancelled() => return Ok(ExitCode::FAILURE),
    };
    say!(
        "Ensemble demo: llm-gateway ({}) {}, master {}, workers {}; store: {}",
        system.provider,
        system.gateway_url,
        system.master_url,
        system
            .workers
            .iter()
            .map(|(c, _)| c.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        system.store,
    );
    let outcome = tokio::select! {
        outcome = run_task(&system, input, Duration::from_secs(args.timeout)) => outcome,
        () = shutdown.cancelled() => {
            eprintln!("interrupted");
            Ok(ExitCode::FAILURE)
        }
    };
    system.stop().await;
    outcome
}

async fn run_task(system: &System, input: Value, timeout: Duration) -> anyhow::Result<ExitCode> {
    let client = system.client();
    say!("input: {input}");
    let submitted = client
        .submit(&json!({ "pipeline": "default", "input": input }))
        .await?;
    let id = submitted.task_id.to_string();
    let tree = std::cell::RefCell::new(TreeView::new(Stream::Stdout));
    let watched = follow(
        &client,
        &id,
        timeout,
        |before, now| {
            if before.is_none() {
                say!("task {id}: pipeline `default`: {}", describe(now));
            }
            tree.borrow_mut().show(now);
        },
        |step, text| tree.borrow_mut().partial(step, text),
    )
    .await?;
    let tree = tree.into_inner();
    let view = match watched {
        Watched::Finished(view) => {
            tree.finish(&view);
            view
        }
        Watched::TimedOut(view) => {
            tree.finish(&view);
            say!(
                "task still {} after {} s; giving up",
                view.status.as_str(),
                timeout.as_secs()
            );
            return Ok(ExitCode::from(STILL_RUNNING));
        }
    };
    print_outcome(&view)?;
    Ok(exit_for(view.status))
}

/// The graph in a line: `plan -> retrieve -> evaluate -> finalize` for a chain (a map step
/// is one link: its fan-out shows in the tree), else its step ids.
fn describe(view: &TaskView) -> String {
    tree::chain(view).unwrap_or_else(|| {
        let ids: Vec<&str> = view.steps.iter().map(|s| s.id.as_str()).collect();
        format!("a graph of {} steps ({})", ids.len(), ids.join(", "))
    })
}

fn print_outcome(view: &TaskView) -> anyhow::Result<()> {
    let took = match (view.finished_at_ms, view.created_at_ms) {
        (Some(end), start) => format!(" in {} ms", end.saturating_sub(start)),
        _ => String::new(),
    };
    match view.status {
        TaskStatus::Succeeded => {
            say!("task {}{took}; result:", view.status.as_str());
            print_json(&view.result)
        }
        _ => {
            say!("task {}{took}", view.status.as_str());
            if let Some(error) = &view.error {
                say!("error: {}", error.message);
            }
            Ok(())
        }
    }
}

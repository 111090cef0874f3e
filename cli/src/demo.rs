//! `ensemble demo`: start the system, run one task on the `default` pipeline showing each
//! step as it changes, print the result, stop everything. Exit code 0 when the task
//! succeeded.

use std::process::ExitCode;
use std::time::Duration;

use common::wire::{StepStatus, StepView, TaskStatus, TaskView};
use serde_json::{Value, json};

use crate::args::DemoArgs;
use crate::commands::{STILL_RUNNING, exit_for, print_json, read_input};
use crate::launcher::System;
use crate::watch::{Watched, changed_steps, follow};

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
    let watched = follow(&client, &id, timeout, |before, now| {
        if before.is_none() {
            let steps: Vec<&str> = now.steps.iter().map(|s| s.capability.as_str()).collect();
            say!("task {id}: pipeline `default`: {}", steps.join(" -> "));
        }
        for step in changed_steps(before, now) {
            if let Some(line) = step_line(step, now.steps.len()) {
                say!("{line}");
            }
        }
    })
    .await?;
    let view = match watched {
        Watched::Finished(view) => view,
        Watched::TimedOut(view) => {
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

/// `  [2/4] retrieve   succeeded  worker-retrieve  12 ms`; `None` for states not worth a
/// line (pending).
fn step_line(step: &StepView, total: usize) -> Option<String> {
    let worker = step
        .worker_id
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let detail = match step.status {
        StepStatus::Pending => return None,
        StepStatus::Queued => match &step.error {
            Some(e) if step.attempts > 0 => format!("retrying after: {}", e.message),
            _ => String::new(),
        },
        StepStatus::Dispatched => format!("{worker}  attempt {}", step.attempts),
        StepStatus::Succeeded => match (step.dispatched_at_ms, step.finished_at_ms) {
            (Some(start), Some(end)) => format!("{worker}  {} ms", end.saturating_sub(start)),
            _ => worker,
        },
        StepStatus::Failed => format!(
            "{worker}  {}",
            step.error
                .as_ref()
                .map(|e| e.message.as_str())
                .unwrap_or("")
        ),
    };
    Some(
        format!(
            "  [{}/{total}] {:<10} {:<10} {detail}",
            step.index + 1,
            step.capability.as_str(),
            step.status.as_str()
        )
        .trim_end()
        .to_string(),
    )
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

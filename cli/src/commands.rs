//! The client commands: `submit`, `status`, `result`, `workers`, `queues`. JSON goes to
//! stdout, everything meant for a person (progress, notes) to stderr.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use common::wire::{TaskResult, TaskStatus, TaskView};
use serde::Serialize;
use serde_json::{Value, json};

use crate::args::{ResultArgs, SubmitArgs, Target, TaskArgs};
use crate::client::Client;
use crate::watch::{StepsBar, Watched, follow};

/// Exit code: the task failed or was cancelled.
pub const TASK_FAILED: u8 = 3;
/// Exit code: the task was still running when the wait ended.
pub const STILL_RUNNING: u8 = 4;

/// The exit code for a task in `status`: 0 succeeded, 3 failed or cancelled, 4 running.
pub fn exit_for(status: TaskStatus) -> ExitCode {
    match status {
        TaskStatus::Succeeded => ExitCode::SUCCESS,
        TaskStatus::Failed | TaskStatus::Cancelled => ExitCode::from(TASK_FAILED),
        TaskStatus::Queued | TaskStatus::Running => ExitCode::from(STILL_RUNNING),
    }
}

/// Reads `--input`: JSON text, `@file`, or `@-` for standard input.
pub fn read_input(arg: &str) -> anyhow::Result<Value> {
    let (text, origin) = match arg.strip_prefix('@') {
        Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read --input from standard input")?;
            (text, "standard input".to_string())
        }
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --input file {path}"))?,
            path.to_string(),
        ),
        None => (arg.to_string(), "--input".to_string()),
    };
    serde_json::from_str(&text).with_context(|| {
        format!("{origin} is not JSON (a string needs quotes: --input '\"some text\"')")
    })
}

/// The `POST /task` body for `submit`'s flags.
fn submit_body(args: &SubmitArgs, input: Value) -> Value {
    let mut body = json!({ "input": input });
    match &args.steps {
        Some(steps) => body["steps"] = json!(steps),
        None => body["pipeline"] = json!(args.pipeline.as_deref().unwrap_or("default")),
    }
    if let Some(priority) = args.priority {
        body["priority"] = json!(priority);
    }
    if let Some(key) = &args.idempotency_key {
        body["idempotency_key"] = json!(key);
    }
    body
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    say!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The `GET /result` shape of a task view.
pub fn result_of(view: &TaskView) -> TaskResult {
    TaskResult {
        task_id: view.task_id.clone(),
        status: view.status,
        result: view.result.clone(),
        error: view.error.clone(),
    }
}

/// `ensemble submit`.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let body = submit_body(&args, read_input(&args.input)?);
    let client = Client::new(&args.target);
    let submitted = client.submit(&body).await?;
    let id = submitted.task_id.to_string();
    if !args.wait {
        say!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("task {id} submitted");
    let bar = StepsBar::new();
    let watched = follow(
        &client,
        &id,
        Duration::from_secs(args.timeout),
        |_, view| bar.show(view),
    )
    .await;
    bar.finish();
    let view = match watched? {
        Watched::Finished(view) => view,
        Watched::TimedOut(view) => {
            eprintln!(
                "task {id} is still {} after {} s",
                view.status.as_str(),
                args.timeout
            );
            view
        }
    };
    print_json(&result_of(&view))?;
    Ok(exit_for(view.status))
}

/// `ensemble status ID`.
pub async fn status(args: TaskArgs) -> anyhow::Result<ExitCode> {
    let view = Client::new(&args.target).task(&args.id).await?;
    print_json(&view)?;
    Ok(ExitCode::SUCCESS)
}

/// `ensemble result ID [--wait SECS]`: long-polls in slices the master accepts (at most
/// 60 s each) until the task finishes or the wait is over.
pub async fn result(args: ResultArgs) -> anyhow::Result<ExitCode> {
    const SLICE: Duration = Duration::from_secs(60);
    let client = Client::new(&args.task.target);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let answer = client.result(&args.task.id, left.min(SLICE)).await?;
        if answer.finished || left <= SLICE {
            print_json(&answer.result)?;
            return Ok(exit_for(answer.result.status));
        }
    }
}

/// `ensemble workers` / `ensemble queues`: an operator endpoint as JSON.
pub async fn operator_view(target: Target, path: &str) -> anyhow::Result<ExitCode> {
    print_json(&Client::new(&target).get(path).await?)?;
    Ok(ExitCode::SUCCESS)
}

//! The client commands: `submit`, `status`, `signal`, `result`, `workers`, `queues`. JSON
//! goes to stdout, everything meant for a person (progress, notes) to stderr; `status` on a
//! terminal draws the task's tree on stdout instead.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use common::wire::{SignalRequest, TaskResult, TaskStatus, TaskView};
use serde::Serialize;
use serde_json::{Value, json};

use crate::args::{ResultArgs, SignalArgs, StatusArgs, SubmitArgs, Target};
use crate::client::Client;
use crate::tree::{self, Style};
use crate::watch::{Stream, TreeView, Watched, follow};

/// Exit code: the task failed or was cancelled.
pub const TASK_FAILED: u8 = 3;
/// Exit code: the task was still running when the wait ended.
pub const STILL_RUNNING: u8 = 4;

/// The exit code for a task in `status`: 0 succeeded, 3 failed or cancelled, 4 not
/// finished (queued, running or waiting).
pub fn exit_for(status: TaskStatus) -> ExitCode {
    match status {
        TaskStatus::Succeeded => ExitCode::SUCCESS,
        TaskStatus::Failed | TaskStatus::Cancelled => ExitCode::from(TASK_FAILED),
        TaskStatus::Queued | TaskStatus::Running | TaskStatus::Waiting => {
            ExitCode::from(STILL_RUNNING)
        }
    }
}

/// Reads `--input`: JSON text, `@file`, or `@-` for standard input.
pub fn read_input(arg: &str) -> anyhow::Result<Value> {
    read_json(arg, "--input")
}

/// Reads a JSON argument named `what` (`--input`, `--graph`, the payload): JSON text,
/// `@file`, or `@-` for standard input.
pub fn read_json(arg: &str, what: &str) -> anyhow::Result<Value> {
    let (text, origin) = match arg.strip_prefix('@') {
        Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .with_context(|| format!("cannot read {what} from standard input"))?;
            (text, "standard input".to_string())
        }
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {what} file {path}"))?,
            path.to_string(),
        ),
        None => (arg.to_string(), what.to_string()),
    };
    serde_json::from_str(&text)
        .with_context(|| format!("{origin} is not JSON (a string needs quotes: '\"some text\"')"))
}

/// The `POST /task` body for `submit`'s flags (`graph`: `--graph`'s steps, read).
fn submit_body(args: &SubmitArgs, input: Value, graph: Option<Value>) -> Value {
    let mut body = json!({ "input": input });
    match (&args.steps, graph) {
        (_, Some(graph)) => body["steps"] = graph,
        (Some(steps), None) => body["steps"] = json!(steps),
        (None, None) => {
            body["pipeline"] = json!(args.pipeline.as_deref().unwrap_or("default"));
        }
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

/// Reads `--graph`: a JSON array of steps (or `@file`).
fn read_graph(arg: &str) -> anyhow::Result<Value> {
    let graph = read_json(arg, "--graph")?;
    anyhow::ensure!(
        graph.is_array(),
        "--graph must be a JSON array of steps (names or step objects), as `steps` in POST /task"
    );
    Ok(graph)
}

/// `ensemble submit`.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let graph = args.graph.as_deref().map(read_graph).transpose()?;
    let body = submit_body(&args, read_input(&args.input)?, graph);
    let client = Client::new(&args.target);
    let submitted = client.submit(&body).await?;
    let id = submitted.task_id.to_string();
    if !args.wait {
        say!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("task {id} submitted");
    let tree = std::cell::RefCell::new(TreeView::new(Stream::Stderr));
    let watched = follow(
        &client,
        &id,
        Duration::from_secs(args.timeout),
        |_, view| tree.borrow_mut().show(view),
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

/// `ensemble status ID [--json | --tree] [--watch]`: the tree on a terminal (or with
/// `--tree`), the JSON view otherwise; `--watch` follows the task with a live tree and
/// exits as `result` does.
pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.task.target);
    let id = &args.task.id;
    if args.watch {
        let tree = std::cell::RefCell::new(TreeView::new(Stream::Stdout));
        let watched = follow(
            &client,
            id,
            Duration::from_secs(args.timeout),
            |_, view| tree.borrow_mut().show(view),
            |step, text| tree.borrow_mut().partial(step, text),
        )
        .await?;
        let tree = tree.into_inner();
        let (Watched::Finished(view) | Watched::TimedOut(view)) = watched;
        tree.finish(&view);
        say!("task {}", view.status.as_str());
        return Ok(exit_for(view.status));
    }
    let view = client.task(id).await?;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    if args.tree || (terminal && !args.json) {
        let style = if terminal { Style::Color } else { Style::Plain };
        say!("{}", tree::render(&view, common::wire::now_ms(), style));
    } else {
        print_json(&view)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `ensemble signal ID NAME [PAYLOAD]`: prints the master's answer
/// (`{"status": "delivered"}` or `"buffered"`).
pub async fn signal(args: SignalArgs) -> anyhow::Result<ExitCode> {
    let payload = match &args.payload {
        Some(text) => read_json(text, "the payload")?,
        None => Value::Null,
    };
    let request = SignalRequest {
        name: args.name.clone(),
        payload,
    };
    let answer = Client::new(&args.target).signal(&args.id, &request).await?;
    print_json(&answer)?;
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

//! Following a task to its end: its event stream (`GET /task/{id}/events`) says when
//! something happened, `GET /task/{id}` then gives the view shown as a tree
//! ([`crate::tree`]), redrawn in place on a terminal, or as one line per change otherwise;
//! partial output (an agent's tokens) is shown as it arrives. Against a master without
//! event streams, or while its stream is down, it polls instead (and the stream resumes
//! where it was, with `Last-Event-ID`).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use common::wire::{TaskStatus, TaskView};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client::Client;
use crate::tree::{self, Row, Style};

/// Time between polls at first and after every change: short enough that a
/// few-millisecond step still shows as a change.
const POLL: Duration = Duration::from_millis(50);

/// Longest time between polls: while nothing changes (a wait step holding the task for an
/// hour), polls slow down to this.
const MAX_POLL: Duration = Duration::from_secs(1);

/// How a wait ended.
pub enum Watched {
    /// The task finished; its last view.
    Finished(TaskView),
    /// The time ran out first; the last view seen.
    TimedOut(TaskView),
}

/// Follows the task until it finishes or `timeout` passes, calling `on_view(before, now)`
/// with each new view (`before`: the view shown before, `None` the first time) and
/// `on_partial(step, text)` with partial output as it arrives.
pub async fn follow(
    client: &Client,
    id: &str,
    timeout: Duration,
    mut on_view: impl FnMut(Option<&TaskView>, &TaskView),
    mut on_partial: impl FnMut(&str, &str),
) -> anyhow::Result<Watched> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<TaskView> = None;
    let mut events = Events::new(id);
    let mut pause = POLL;
    loop {
        let view = client.task(id).await?;
        let changed = last.as_ref() != Some(&view);
        pause = if changed {
            POLL
        } else {
            (pause * 2).min(MAX_POLL)
        };
        if changed {
            on_view(last.as_ref(), &view);
        }
        if view.status.is_terminal() {
            return Ok(Watched::Finished(view));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Ok(Watched::TimedOut(view));
        }
        last = Some(view);
        // Until something happens to the task (or the stream is down: a poll's pause).
        let news = events.next_change(client, &mut on_partial);
        let _ = tokio::time::timeout(left, news).await;
        if !events.live() {
            tokio::time::sleep(pause.min(left)).await;
        }
    }
}

/// Longest silence on an event stream (the master sends a keep-alive every 15 s) before it
/// is taken for dead and opened again.
const STREAM_SILENCE: Duration = Duration::from_secs(45);

/// The task's event stream, opened again (resuming) when it breaks.
struct Events {
    id: String,
    body: Option<futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
    reader: common::sse::SseReader,
    pending: std::collections::VecDeque<common::sse::SseMessage>,
    /// The last event's id, to resume after.
    cursor: Option<String>,
    /// The master has no event streams (an older one): poll only.
    unsupported: bool,
    /// When the stream may be opened again after a failure.
    retry_at: Option<tokio::time::Instant>,
}

impl Events {
    fn new(id: &str) -> Self {
        Self {
            id: id.to_string(),
            body: None,
            reader: common::sse::SseReader::new(1 << 20),
            pending: std::collections::VecDeque::new(),
            cursor: None,
            unsupported: false,
            retry_at: None,
        }
    }

    /// Whether the stream is open (else the caller polls).
    fn live(&self) -> bool {
        self.body.is_some()
    }

    /// Returns at the next event that changes the task (not partial output, which goes to
    /// `on_partial`), or at once when there is no stream.
    async fn next_change(&mut self, client: &Client, on_partial: &mut impl FnMut(&str, &str)) {
        use futures::StreamExt;
        if self.body.is_none() && !self.unsupported {
            if self
                .retry_at
                .is_some_and(|at| tokio::time::Instant::now() < at)
            {
                return;
            }
            match client.events(&self.id, self.cursor.as_deref()).await {
                Ok(response) => {
                    self.body = Some(response.bytes_stream().boxed());
                    self.reader = common::sse::SseReader::new(1 << 20);
                }
                Err(e) => {
                    let status = e
                        .downcast_ref::<crate::client::ApiFailure>()
                        .map(|f| f.status.as_u16());
                    // 404: no streams on that master (the task itself was found).
                    self.unsupported = status == Some(404) || status == Some(405);
                    self.retry_at = Some(tokio::time::Instant::now() + MAX_POLL);
                    return;
                }
            }
        }
        loop {
            while let Some(m) = self.pending.pop_front() {
                if m.id.is_none() {
                    continue;
                }
                self.cursor = m.id.clone();
                if m.event != common::wire::kinds::STEP_PROGRESS {
                    return;
                }
                if let Ok(event) = serde_json::from_str::<common::wire::TaskEvent>(&m.data) {
                    let text = partial_text(&event.messages);
                    on_partial(event.step.as_deref().unwrap_or("?"), &text);
                }
            }
            let Some(body) = self.body.as_mut() else {
                return;
            };
            match tokio::time::timeout(STREAM_SILENCE, body.next()).await {
                Ok(Some(Ok(chunk))) => match self.reader.push(&chunk) {
                    Ok(messages) => self.pending.extend(messages),
                    Err(_) => self.broke(),
                },
                // Ended (the task finished, or the master let go), broke, or went silent.
                _ => {
                    self.broke();
                    return;
                }
            }
        }
    }

    fn broke(&mut self) {
        self.body = None;
        self.pending.clear();
        self.retry_at = Some(tokio::time::Instant::now() + POLL);
    }
}

/// Whether step `id` (or map instance) of the view is running.
fn running(view: &TaskView, id: &str) -> bool {
    view.steps
        .iter()
        .flat_map(|s| std::iter::once(s).chain(s.instances.iter()))
        .any(|s| {
            s.id == id
                && matches!(
                    s.status,
                    common::wire::StepStatus::Dispatched | common::wire::StepStatus::Running
                )
        })
}

/// Partial output as text: `{"delta": "…"}` messages joined, anything else as JSON.
pub fn partial_text(messages: &[serde_json::Value]) -> String {
    messages
        .iter()
        .map(
            |m| match m.get("delta").and_then(serde_json::Value::as_str) {
                Some(delta) => delta.to_string(),
                None => m.to_string(),
            },
        )
        .collect()
}

/// Where a [`TreeView`] draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Standard output (`demo`, `status --watch`).
    Stdout,
    /// Standard error, so stdout carries only JSON (`submit --wait`).
    Stderr,
}

/// A task's tree as it runs: on a terminal, redrawn in place at every view; elsewhere, one
/// line per step whose status, worker or attempt changed.
pub struct TreeView {
    stream: Stream,
    /// The live drawing, on a terminal.
    bar: Option<ProgressBar>,
    /// The rows of the view before, for the changes.
    last: Vec<Row>,
    /// The task's status in the view before.
    status: Option<TaskStatus>,
    style: Style,
    /// The tree as last drawn, on a terminal.
    picture: String,
    /// The latest partial output per step, on a terminal (the end of it).
    partials: Vec<(String, String)>,
}

/// How much of a step's partial output stays on screen under the tree.
const PARTIAL_TAIL: usize = 160;

impl TreeView {
    /// A tree on `stream`: live if it is a terminal.
    pub fn new(stream: Stream) -> Self {
        let terminal = match stream {
            Stream::Stdout => std::io::stdout().is_terminal(),
            Stream::Stderr => std::io::stderr().is_terminal(),
        };
        let style = if terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) {
            Style::Color
        } else {
            Style::Plain
        };
        let bar = terminal.then(|| {
            let target = match stream {
                Stream::Stdout => ProgressDrawTarget::stdout(),
                Stream::Stderr => ProgressDrawTarget::stderr(),
            };
            let bar = ProgressBar::with_draw_target(None, target);
            let style = ProgressStyle::with_template("{msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Self {
            stream,
            bar,
            last: Vec::new(),
            status: None,
            style,
            picture: String::new(),
            partials: Vec::new(),
        }
    }

    /// Shows partial output of a step: under the tree on a terminal (the end of what came
    /// so far), as a line per piece otherwise.
    pub fn partial(&mut self, step: &str, text: &str) {
        match &self.bar {
            Some(_) => {
                let i = match self.partials.iter().position(|(s, _)| s == step) {
                    Some(i) => i,
                    None => {
                        self.partials.push((step.to_string(), String::new()));
                        self.partials.len() - 1
                    }
                };
                let entry = &mut self.partials[i].1;
                entry.push_str(text);
                let keep = entry.chars().count().saturating_sub(PARTIAL_TAIL);
                if keep > 0 {
                    *entry = entry.chars().skip(keep).collect();
                }
                self.redraw();
            }
            None => self.write(&[format!("{step} ▸ {}", text.replace('\n', " ⏎ "))]),
        }
    }

    /// The tree, then each step's latest partial output, on one line each.
    fn redraw(&self) {
        if let Some(bar) = &self.bar {
            let mut text = self.picture.clone();
            for (step, partial) in &self.partials {
                let line: String = partial.replace('\n', " ");
                text.push_str(&format!("\n  {step} ▸ {line}"));
            }
            bar.set_message(text);
        }
    }

    /// Shows a view (at the current time).
    pub fn show(&mut self, view: &TaskView) {
        let now = common::wire::now_ms();
        match &self.bar {
            Some(_) => {
                self.picture = tree::render(view, now, self.style);
                // A step that finished leaves its partial output behind.
                self.partials.retain(|(step, _)| running(view, step));
                self.redraw();
            }
            None => {
                let rows = tree::all_rows(view, now);
                let mut lines = tree::changes(&self.last, &rows);
                self.last = rows;
                // The task's own changes while it runs (its end is the caller's to say).
                let before = self.status.replace(view.status);
                if before.is_some_and(|b| b != view.status) && !view.status.is_terminal() {
                    lines.push(format!("task {}", view.status.as_str()));
                }
                self.write(&lines);
            }
        }
    }

    /// Leaves the last view's tree: in place on a terminal, printed whole after the
    /// changes elsewhere.
    pub fn finish(&self, view: &TaskView) {
        let picture = tree::render(view, common::wire::now_ms(), self.style);
        match &self.bar {
            Some(bar) => {
                bar.set_message(picture);
                bar.finish();
            }
            None => self.write(&[String::new(), picture]),
        }
    }

    fn write(&self, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        let mut text = lines.join("\n");
        text.push('\n');
        // Output nobody reads (`ensemble demo | head`) is dropped.
        let _ = match self.stream {
            Stream::Stdout => std::io::stdout().write_all(text.as_bytes()),
            Stream::Stderr => std::io::stderr().write_all(text.as_bytes()),
        };
    }
}

//! Following a task to its end: polls `GET /task/{id}` and shows its graph as a tree
//! ([`crate::tree`]), redrawn at every poll on a terminal, or as one line per change
//! otherwise.

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

/// Polls the task until it finishes or `timeout` passes, calling `on_view(before, now)` at
/// every poll (`before`: the view of the poll before, `None` the first time). Polls come
/// every 50 ms, slowing to one a second while the task does not change.
pub async fn follow(
    client: &Client,
    id: &str,
    timeout: Duration,
    mut on_view: impl FnMut(Option<&TaskView>, &TaskView),
) -> anyhow::Result<Watched> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<TaskView> = None;
    let mut pause = POLL;
    loop {
        let view = client.task(id).await?;
        pause = if last.as_ref() == Some(&view) {
            (pause * 2).min(MAX_POLL)
        } else {
            POLL
        };
        on_view(last.as_ref(), &view);
        if view.status.is_terminal() {
            return Ok(Watched::Finished(view));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Watched::TimedOut(view));
        }
        last = Some(view);
        tokio::time::sleep(pause).await;
    }
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
}

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
        }
    }

    /// Shows a view (at the current time).
    pub fn show(&mut self, view: &TaskView) {
        let now = common::wire::now_ms();
        match &self.bar {
            Some(bar) => bar.set_message(tree::render(view, now, self.style)),
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

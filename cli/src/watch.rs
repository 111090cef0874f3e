//! Following a task to its end: polls `GET /task/{id}` and reports every change, for the
//! demo's step-by-step lines and `submit --wait`'s progress bar.

use std::io::IsTerminal;
use std::time::Duration;

use common::wire::{StepStatus, StepView, TaskView};
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::Client;

/// Time between polls: short enough that a few-millisecond step still shows as a change.
const POLL: Duration = Duration::from_millis(50);

/// How a wait ended.
pub enum Watched {
    /// The task finished; its last view.
    Finished(TaskView),
    /// The time ran out first; the last view seen.
    TimedOut(TaskView),
}

/// Polls the task until it finishes or `timeout` passes, calling `on_change(before, now)`
/// with every view that differs from the one before (and with the first).
pub async fn follow(
    client: &Client,
    id: &str,
    timeout: Duration,
    mut on_change: impl FnMut(Option<&TaskView>, &TaskView),
) -> anyhow::Result<Watched> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<TaskView> = None;
    loop {
        let view = client.task(id).await?;
        if last.as_ref() != Some(&view) {
            on_change(last.as_ref(), &view);
        }
        if view.status.is_terminal() {
            return Ok(Watched::Finished(view));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Watched::TimedOut(view));
        }
        last = Some(view);
        tokio::time::sleep(POLL).await;
    }
}

/// The steps whose status or worker changed between two views (every step when there is
/// no earlier view).
pub fn changed_steps<'a>(
    before: Option<&TaskView>,
    now: &'a TaskView,
) -> impl Iterator<Item = &'a StepView> {
    now.steps.iter().filter(move |step| {
        let old = before.and_then(|b| b.steps.get(step.index as usize));
        old.is_none_or(|o| o.status != step.status || o.worker_id != step.worker_id)
    })
}

/// A progress bar of steps done out of all, with the current step's capability and worker;
/// hidden when standard output is not a terminal. Drawn on stderr, so stdout stays JSON.
pub struct StepsBar {
    bar: ProgressBar,
    /// Whether it is drawn (on a terminal); it starts ticking at the first view, so it never
    /// shows an empty `0/0`.
    visible: bool,
    ticking: std::cell::Cell<bool>,
}

impl StepsBar {
    /// A bar (hidden unless stdout is a terminal).
    pub fn new() -> Self {
        let visible = std::io::stdout().is_terminal();
        let bar = if visible {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:24} {pos}/{len} steps  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        } else {
            ProgressBar::hidden()
        };
        Self {
            bar,
            visible,
            ticking: std::cell::Cell::new(false),
        }
    }

    /// Shows a view.
    pub fn show(&self, view: &TaskView) {
        let done = view
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Succeeded)
            .count();
        self.bar.set_length(view.steps.len() as u64);
        self.bar.set_position(done as u64);
        let current = view
            .steps
            .iter()
            .find(|s| !matches!(s.status, StepStatus::Succeeded | StepStatus::Pending));
        let message = match current {
            Some(step) => format!(
                "{} {}{}",
                step.capability,
                step.status.as_str(),
                step.worker_id
                    .as_ref()
                    .map(|w| format!(" on {w}"))
                    .unwrap_or_default()
            ),
            None => view.status.as_str().to_string(),
        };
        self.bar.set_message(message);
        if self.visible && !self.ticking.replace(true) {
            self.bar.enable_steady_tick(Duration::from_millis(100));
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

//! A task's graph as a tree of lines, for `submit --wait`, `status` and `demo`. Pure: a
//! [`TaskView`] and the time in, [`Row`]s and text out.
//!
//! Each declared step appears once, under the first step it needs (a root at the left
//! margin); a step that needs several shows `needs: a, b`. A map step shows `k/n` of its
//! instances finished and its instances indented under it, before its dependants (at most
//! [`MAX_INSTANCES`] of them: the failed and active ones first, then a summary line). A
//! step's line: symbol, id, capability (or `wait "signal"`, `sleep 5 s`), status, attempt,
//! worker, duration, notes. A waiting wait step says when it times out and is followed by
//! the `ensemble signal` command that releases it.

use std::collections::{HashMap, HashSet};

use common::wire::{OnTimeout, StepKind, StepStatus, StepView, TaskView};
use serde_json::Value;

/// Most instances of one map step drawn; the rest are summed up in one line.
pub const MAX_INSTANCES: usize = 10;

/// Longest error message shown on a step's line.
const MAX_ERROR_CHARS: usize = 100;

/// One step's line (or a map step's summary of instances not drawn).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The step's id (`map[i]` for an instance); empty for a summary line.
    pub id: String,
    /// The tree drawing before the symbol (`├─ `, `│  └─ `).
    pub prefix: String,
    /// The status's symbol.
    pub symbol: &'static str,
    /// The capability, `wait "signal"` or `sleep 5 s`.
    pub what: String,
    /// The status, with `k/n` for a map step.
    pub state: String,
    /// `attempt N` once started (worker steps).
    pub attempt: String,
    /// The worker running or last running it.
    pub worker: String,
    /// How long it ran (or has been running).
    pub duration: String,
    /// Needs, router pick, errors, timeouts.
    pub notes: Vec<String>,
    /// Drawn dimmed: skipped (and not yet reached) steps.
    pub dim: bool,
    /// The command that releases a waiting wait step, drawn on a line of its own.
    pub hint: Option<String>,
    /// What a change is: the row's status, worker, attempts, progress and error, not its
    /// running time (which changes at every poll).
    pub signature: String,
}

/// The rows of a view's tree at `now_ms`, in drawing order.
pub fn rows(view: &TaskView, now_ms: u64) -> Vec<Row> {
    rows_with(view, now_ms, MAX_INSTANCES)
}

/// [`rows`] with every map instance drawn (for [`changes`]).
pub fn all_rows(view: &TaskView, now_ms: u64) -> Vec<Row> {
    rows_with(view, now_ms, usize::MAX)
}

fn rows_with(view: &TaskView, now_ms: u64, max_instances: usize) -> Vec<Row> {
    let steps = &view.steps;
    let position: HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    // A step's parent in the tree: the first step it needs (that exists and is not itself).
    let parent = |i: usize| {
        steps[i]
            .needs
            .first()
            .and_then(|id| position.get(id.as_str()).copied())
            .filter(|&p| p != i)
    };
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    let mut roots = Vec::new();
    for i in 0..steps.len() {
        match parent(i) {
            Some(p) => children[p].push(i),
            None => roots.push(i),
        }
    }
    let mut drawer = Drawer {
        view,
        now_ms,
        max_instances,
        children: &children,
        seen: HashSet::new(),
        rows: Vec::new(),
    };
    for &root in &roots {
        drawer.step(root, "", "");
    }
    // Whatever a cycle kept out of reach (a valid graph has none) is drawn as a root.
    for i in 0..steps.len() {
        if !drawer.seen.contains(&i) {
            drawer.step(i, "", "");
        }
    }
    drawer.rows
}

struct Drawer<'a> {
    view: &'a TaskView,
    now_ms: u64,
    max_instances: usize,
    children: &'a [Vec<usize>],
    seen: HashSet<usize>,
    rows: Vec<Row>,
}

/// A child's line after its parent's: `├─ ` or `└─ `; and what its own children continue
/// with: `│  ` or `   `.
fn branch(last: bool) -> (&'static str, &'static str) {
    if last {
        ("└─ ", "   ")
    } else {
        ("├─ ", "│  ")
    }
}

impl Drawer<'_> {
    /// Declared step `i`: its row, its instances, then its dependants.
    fn step(&mut self, i: usize, prefix: &str, inner: &str) {
        if !self.seen.insert(i) {
            return;
        }
        let step = &self.view.steps[i];
        let task = self.view.task_id.as_str();
        self.rows.push(row(step, task, prefix, self.now_ms));
        let kids: Vec<usize> = self.children[i]
            .iter()
            .copied()
            .filter(|k| !self.seen.contains(k))
            .collect();
        let (shown, hidden) = pick_instances(&step.instances, self.max_instances);
        let lines = shown.len() + usize::from(hidden.is_some()) + kids.len();
        let mut n = 0;
        for instance in shown {
            n += 1;
            let (head, _) = branch(n == lines);
            let task = self.view.task_id.as_str();
            self.rows
                .push(row(instance, task, &format!("{inner}{head}"), self.now_ms));
        }
        if let Some(summary) = hidden {
            n += 1;
            let (head, _) = branch(n == lines);
            self.rows.push(Row {
                prefix: format!("{inner}{head}"),
                ..summary
            });
        }
        for kid in kids {
            n += 1;
            let (head, tail) = branch(n == lines);
            self.step(kid, &format!("{inner}{head}"), &format!("{inner}{tail}"));
        }
    }
}

/// The instances to draw (all, or the failed and active ones first, up to `max`, in
/// element order) and a summary row of the others.
fn pick_instances(instances: &[StepView], max: usize) -> (Vec<&StepView>, Option<Row>) {
    if instances.len() <= max {
        return (instances.iter().collect(), None);
    }
    let rank = |s: &StepView| match s.status {
        StepStatus::Failed => 0,
        StepStatus::Dispatched | StepStatus::Running | StepStatus::Waiting => 1,
        StepStatus::Queued => 2,
        _ => 3,
    };
    let mut order: Vec<usize> = (0..instances.len()).collect();
    order.sort_by_key(|&i| (rank(&instances[i]), i));
    let mut keep: Vec<usize> = order.into_iter().take(max.saturating_sub(1)).collect();
    keep.sort_unstable();
    let mut counts: Vec<(StepStatus, usize)> = Vec::new();
    for (i, s) in instances.iter().enumerate() {
        if keep.binary_search(&i).is_ok() {
            continue;
        }
        match counts.iter_mut().find(|(status, _)| *status == s.status) {
            Some((_, n)) => *n += 1,
            None => counts.push((s.status, 1)),
        }
    }
    let others = instances.len() - keep.len();
    let detail = counts
        .iter()
        .map(|(status, n)| format!("{n} {}", status.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let summary = Row {
        id: String::new(),
        prefix: String::new(),
        symbol: "…",
        what: format!("{others} more"),
        state: String::new(),
        attempt: String::new(),
        worker: String::new(),
        duration: String::new(),
        notes: vec![detail.clone()],
        dim: true,
        hint: None,
        signature: format!("{others} more: {detail}"),
    };
    (
        keep.into_iter().map(|i| &instances[i]).collect(),
        Some(summary),
    )
}

/// The symbol for a status.
pub fn symbol(status: StepStatus) -> &'static str {
    match status {
        StepStatus::Pending => "·",
        StepStatus::Queued => "○",
        StepStatus::Dispatched => "●",
        StepStatus::Running => "◐",
        StepStatus::Waiting => "◷",
        StepStatus::Succeeded => "✓",
        StepStatus::Failed => "✗",
        StepStatus::Skipped => "⊘",
        StepStatus::Cancelled => "⊗",
    }
}

/// One step's row.
fn row(step: &StepView, task_id: &str, prefix: &str, now_ms: u64) -> Row {
    let what = match step.kind {
        StepKind::Wait => format!(
            "wait \"{}\"",
            step.wait
                .as_ref()
                .map_or(step.id.as_str(), |w| w.signal.as_str())
        ),
        StepKind::Sleep => format!("sleep {}", duration(step.sleep_ms.unwrap_or(0))),
        StepKind::Work => step
            .capability
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    };
    let mut state = step.status.as_str().to_string();
    if let Some(map) = &step.map
        && let Some(total) = map.total
    {
        state = format!("{state} {}/{total}", map.finished);
    }
    let attempt = if step.kind == StepKind::Work && step.attempts > 0 && step.map.is_none() {
        format!("attempt {}", step.attempts)
    } else {
        String::new()
    };
    let worker = step
        .worker_id
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let (notes, hint) = notes(step, task_id, now_ms);
    let signature = format!(
        "{state}|{worker}|{attempt}|{}",
        step.error.as_ref().map_or("", |e| e.message.as_str())
    );
    Row {
        id: step.id.clone(),
        prefix: prefix.to_string(),
        symbol: symbol(step.status),
        what,
        state,
        attempt,
        worker,
        duration: ran_for(step, now_ms).map(duration).unwrap_or_default(),
        notes,
        dim: matches!(step.status, StepStatus::Skipped | StepStatus::Pending),
        hint,
        signature,
    }
}

/// How long a step ran: from its dispatch (or, for a map, wait or sleep step, from when it
/// was queued or started) to its end, or to now while it runs.
fn ran_for(step: &StepView, now_ms: u64) -> Option<u64> {
    let start = step.dispatched_at_ms.or(step.queued_at_ms)?;
    let end = match step.status {
        StepStatus::Dispatched | StepStatus::Running | StepStatus::Waiting => now_ms,
        StepStatus::Pending | StepStatus::Queued => return None,
        _ => step.finished_at_ms?,
    };
    Some(end.saturating_sub(start))
}

/// A step's notes, and for a waiting wait step the command that releases it.
fn notes(step: &StepView, task_id: &str, now_ms: u64) -> (Vec<String>, Option<String>) {
    let mut notes = Vec::new();
    let mut hint = None;
    if step.needs.len() > 1 {
        notes.push(format!("needs: {}", step.needs.join(", ")));
    }
    if let Some(map) = &step.map {
        notes.push(format!("map over {}", map.over));
    }
    if step.router {
        match step.output.as_ref().and_then(|o| o.get("next")) {
            Some(next) if step.status == StepStatus::Succeeded => {
                let picked = match next {
                    Value::String(one) => one.clone(),
                    Value::Array(many) => many
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", "),
                    other => other.to_string(),
                };
                notes.push(format!("router → {picked}"));
            }
            _ => notes.push("router".to_string()),
        }
    }
    if step.allow_failure {
        notes.push("may fail".to_string());
    }
    if let Some(wait) = &step.wait {
        let then = match wait.on_timeout {
            OnTimeout::Fail => "fails",
            OnTimeout::Continue => "continues",
        };
        match step.status {
            StepStatus::Waiting => {
                let left = step
                    .wakes_at_ms
                    .map(|at| format!("times out in {}", duration(at.saturating_sub(now_ms))))
                    .unwrap_or_else(|| format!("times out after {}", duration(wait.timeout_ms)));
                notes.push(format!("{left}, then {then}"));
                hint = Some(format!(
                    "↳ ensemble signal {task_id} {} '<json payload>'",
                    wait.signal
                ));
            }
            StepStatus::Succeeded
                if step.output.as_ref().and_then(|o| o.get("timed_out"))
                    == Some(&Value::Bool(true)) =>
            {
                notes.push("timed out, went on".to_string());
            }
            StepStatus::Pending | StepStatus::Queued => {
                notes.push(format!(
                    "timeout {}, then {then}",
                    duration(wait.timeout_ms)
                ));
            }
            _ => {}
        }
    }
    if step.kind == StepKind::Sleep
        && step.status == StepStatus::Waiting
        && let Some(at) = step.wakes_at_ms
    {
        notes.push(format!("wakes in {}", duration(at.saturating_sub(now_ms))));
    }
    if let Some(error) = &step.error {
        let message = shorten(&error.message);
        match step.status {
            StepStatus::Failed if step.allow_failure => {
                notes.push(format!("failed (allowed): {message}"));
            }
            StepStatus::Failed | StepStatus::Cancelled => notes.push(message),
            StepStatus::Queued | StepStatus::Dispatched if step.attempts > 0 => {
                notes.push(format!("retrying after: {message}"));
            }
            _ => {}
        }
    }
    (notes, hint)
}

fn shorten(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() > MAX_ERROR_CHARS {
        let cut: String = line.chars().take(MAX_ERROR_CHARS - 1).collect();
        format!("{cut}…")
    } else {
        line.to_string()
    }
}

/// `12 ms`, `1.5 s`, `3m 04s`, `2h 05m`, `3d 04h`.
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{}.{} s", s, (ms % 1000) / 100),
        60_000..3_600_000 => format!("{}m {:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// ANSI styles, when the output is a terminal that wants colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// No escapes.
    Plain,
    /// Dim skipped and pending steps, colour symbols.
    Color,
}

/// The tree as lines of text: rows with aligned columns, hints on lines of their own.
pub fn lines(rows: &[Row], style: Style) -> Vec<String> {
    let label = |r: &Row| format!("{}{} {}", r.prefix, r.symbol, r.id);
    let width =
        |f: &dyn Fn(&Row) -> String| rows.iter().map(|r| f(r).chars().count()).max().unwrap_or(0);
    let widths = [
        width(&label),
        width(&|r| r.what.clone()),
        width(&|r| r.state.clone()),
        width(&|r| r.attempt.clone()),
        width(&|r| r.worker.clone()),
        width(&|r| r.duration.clone()),
    ];
    let mut out = Vec::new();
    for r in rows {
        let cells = [
            label(r),
            r.what.clone(),
            r.state.clone(),
            r.attempt.clone(),
            r.worker.clone(),
            r.duration.clone(),
        ];
        let mut line = String::new();
        for (cell, w) in cells.iter().zip(widths) {
            if w == 0 {
                continue;
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
        }
        line.push_str(&r.notes.join("; "));
        let line = line.trim_end().to_string();
        out.push(paint(r, line, style));
        if let Some(hint) = &r.hint {
            // Under the step, past its branch.
            let indent = " ".repeat(r.prefix.chars().count() + 2);
            out.push(format!("{indent}{hint}"));
        }
    }
    out
}

fn paint(row: &Row, line: String, style: Style) -> String {
    if style == Style::Plain {
        return line;
    }
    if row.dim {
        return format!("\x1b[2m{line}\x1b[0m");
    }
    let color = match row.symbol {
        "✓" => "32",
        "✗" | "⊗" => "31",
        "◷" => "33",
        "●" | "◐" => "36",
        _ => return line,
    };
    // Colour the symbol only.
    let at = row.prefix.len();
    let (head, tail) = line.split_at(at.min(line.len()));
    match tail.strip_prefix(row.symbol) {
        Some(rest) => format!("{head}\x1b[{color}m{}\x1b[0m{rest}", row.symbol),
        None => line,
    }
}

/// The task's first line: id, status, pipeline, elapsed time.
pub fn header(view: &TaskView, now_ms: u64) -> String {
    let source = match &view.pipeline {
        Some(name) => format!("pipeline `{name}`"),
        None => "inline steps".to_string(),
    };
    let end = view.finished_at_ms.unwrap_or(now_ms);
    format!(
        "task {}  {}  {source}  {}",
        view.task_id,
        view.status.as_str(),
        duration(end.saturating_sub(view.created_at_ms))
    )
}

/// The whole picture: the header and the tree.
pub fn render(view: &TaskView, now_ms: u64, style: Style) -> String {
    let mut out = vec![header(view, now_ms)];
    out.extend(lines(&rows(view, now_ms), style));
    out.join("\n")
}

/// A chain's steps in order, `plan -> retrieve -> finalize`, when each step needs only the
/// one before (a map step too); `None` for any other graph.
pub fn chain(view: &TaskView) -> Option<String> {
    let linear = view.steps.iter().enumerate().all(|(i, s)| match i {
        0 => s.needs.is_empty(),
        _ => s.needs.len() == 1 && s.needs[0] == view.steps[i - 1].id,
    });
    linear.then(|| {
        view.steps
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>()
            .join(" -> ")
    })
}

/// The rows whose signature changed between two pictures (every row of the first), as
/// one line each: `id  what  state  attempt  worker  duration  notes`, and a waiting
/// wait step's hint after its line.
pub fn changes(before: &[Row], now: &[Row]) -> Vec<String> {
    let old: HashMap<&str, &str> = before
        .iter()
        .map(|r| (r.id.as_str(), r.signature.as_str()))
        .collect();
    let changed: Vec<Row> = now
        .iter()
        .filter(|r| old.get(r.id.as_str()) != Some(&r.signature.as_str()))
        .filter(|r| !(r.id.is_empty() && r.symbol == "…"))
        .map(|r| Row {
            prefix: "  ".to_string(),
            ..r.clone()
        })
        .collect();
    lines(&changed, Style::Plain)
}

#[cfg(test)]
mod tests;

//! A task's steps as users write them (`POST /task` `steps`, a pipeline's TOML `steps`)
//! turned into the store's [`PlannedStep`]s: ids and `needs` resolved to slots, `map.over`
//! parsed, and every limit of `docs/workflows.md` checked. Submit answers `422` with the
//! error's message; a pipeline that fails here keeps the master from starting.

use std::collections::HashMap;
use std::fmt;

use common::wire::{Capability, StepDef, StepSpec};

use crate::store::{MapPlan, PlannedKind, PlannedStep};

/// Most steps a task may have, as written (map instances are not counted).
pub const MAX_STEPS: usize = 64;
/// Most `needs` one step may list.
pub const MAX_NEEDS: usize = 64;
/// Longest step id and signal name.
pub const MAX_ID_LEN: usize = 64;
/// Most instances of a map step running at once.
pub const MAX_CONCURRENCY: u32 = 1_000;
/// A map step's `concurrency` when it gives none.
pub const DEFAULT_CONCURRENCY: u32 = 16;
/// Longest `wait.timeout_ms` and `sleep_ms`: 30 days. Timers longer than a task's
/// retention would outlive what they wait on; 30 days is already well past the default.
pub const MAX_DELAY_MS: u64 = 30 * 24 * 3600 * 1000;
/// The first segment of `map.over` that means the task input; no step may take it as id,
/// so a path never has two meanings.
const INPUT: &str = "input";

/// Per-step settings a step takes from the master's configuration when it gives none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepDefaults {
    /// `MAX_ATTEMPTS`.
    pub max_attempts: u32,
    /// `STEP_TIMEOUT_MS`.
    pub timeout_ms: u64,
}

impl From<&crate::Config> for StepDefaults {
    fn from(config: &crate::Config) -> Self {
        Self {
            max_attempts: config.max_attempts,
            timeout_ms: config.step_timeout_ms,
        }
    }
}

/// Which rule of the graph a submission broke (the message says it for people; tests and
/// callers that branch use this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// No steps at all.
    Empty,
    /// More than [`MAX_STEPS`].
    TooManySteps,
    /// Not exactly one of `capability`, `wait`, `sleep_ms`, or an option on a kind of step
    /// it does not apply to.
    Shape,
    /// An id that is malformed, reserved, or too long.
    Id,
    /// Two steps with one id.
    DuplicateId,
    /// A `needs` id that no step has.
    UnknownNeed,
    /// A step that needs itself.
    SelfNeed,
    /// A `needs` id listed twice.
    DuplicateNeed,
    /// More than [`MAX_NEEDS`] needs.
    TooManyNeeds,
    /// Steps that need each other round a loop.
    Cycle,
    /// A `map.over` that is malformed or starts at a step the map step does not need.
    MapOver,
    /// A `map.concurrency` outside 1..=[`MAX_CONCURRENCY`].
    MapConcurrency,
    /// A router that no step needs (it would have nothing to pick).
    Router,
    /// A `wait` without `timeout_ms`, or one out of range.
    WaitTimeout,
    /// A `sleep_ms` out of range.
    SleepMs,
    /// A malformed signal name.
    Signal,
    /// Two waits listening for one signal.
    DuplicateSignal,
}

/// Why a task's steps cannot run: the broken rule, and a message naming the step and the
/// limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphError {
    /// The rule.
    pub rule: Rule,
    /// What users see (in a `422`, or the error that stops the master at start).
    pub message: String,
}

impl GraphError {
    fn new(rule: Rule, message: impl Into<String>) -> Self {
        Self {
            rule,
            message: message.into(),
        }
    }
}

impl fmt::Display for GraphError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for GraphError {}

/// What a step is, before it is checked.
enum Kind<'a> {
    Work(&'a Capability),
    Wait(&'a common::wire::WaitDef),
    Sleep(u64),
}

/// Turns written steps into planned ones, or says which rule they break. A capability name
/// is a link of a chain (it needs the step before it); see [`StepDef`] for the rest.
pub fn plan_steps(
    specs: &[StepSpec],
    defaults: StepDefaults,
) -> Result<Vec<PlannedStep>, GraphError> {
    if specs.is_empty() {
        return Err(GraphError::new(
            Rule::Empty,
            "a task needs at least one step",
        ));
    }
    if specs.len() > MAX_STEPS {
        return Err(GraphError::new(
            Rule::TooManySteps,
            format!(
                "{} steps: a task has at most {MAX_STEPS} steps",
                specs.len()
            ),
        ));
    }
    let defs: Vec<StepDef> = specs
        .iter()
        .map(|s| match s {
            StepSpec::Name(c) => StepDef {
                capability: Some(c.clone()),
                ..StepDef::default()
            },
            StepSpec::Def(d) => (**d).clone(),
        })
        .collect();

    let kinds = defs
        .iter()
        .enumerate()
        .map(|(i, d)| kind(i, d))
        .collect::<Result<Vec<_>, _>>()?;
    let ids = assign_ids(&defs, &kinds)?;
    let index: HashMap<&str, u32> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i as u32))
        .collect();
    let at = |i: usize| format!("step {i} (`{}`)", ids[i]);

    let mut needs: Vec<Vec<u32>> = Vec::with_capacity(defs.len());
    for (i, def) in defs.iter().enumerate() {
        needs.push(resolve_needs(i, def, &index, &at)?);
    }
    if let Some(cycle) = find_cycle(&needs) {
        let names: Vec<&str> = cycle.iter().map(|&s| ids[s as usize].as_str()).collect();
        return Err(GraphError::new(
            Rule::Cycle,
            format!(
                "the steps need each other in a cycle: {} (each needs the next)",
                names.join(" → ")
            ),
        ));
    }
    let mut has_dependants = vec![false; defs.len()];
    for n in needs.iter().flatten() {
        has_dependants[*n as usize] = true;
    }

    let mut signals: HashMap<String, usize> = HashMap::new();
    let mut planned = Vec::with_capacity(defs.len());
    for (i, ((def, kind), needs)) in defs.iter().zip(&kinds).zip(needs).enumerate() {
        let kind = match kind {
            Kind::Work(capability) => {
                let map = match &def.map {
                    Some(m) => Some(map_plan(&at(i), m, &needs, &index)?),
                    None => None,
                };
                if def.router && map.is_some() {
                    return Err(GraphError::new(
                        Rule::Shape,
                        format!(
                            "{}: a step cannot both `map` and be a `router` (a map step's output is the array of its instances' outputs, with no `next`)",
                            at(i)
                        ),
                    ));
                }
                if def.router && !has_dependants[i] {
                    return Err(GraphError::new(
                        Rule::Router,
                        format!(
                            "{}: a `router` needs at least one step that needs it (its `next` picks among them)",
                            at(i)
                        ),
                    ));
                }
                PlannedKind::Work {
                    capability: (*capability).clone(),
                    max_attempts: def.max_attempts.unwrap_or(defaults.max_attempts).max(1),
                    timeout_ms: def.timeout_ms.unwrap_or(defaults.timeout_ms).max(1),
                    map,
                    router: def.router,
                }
            }
            Kind::Wait(wait) => {
                let timeout_ms = wait.timeout_ms.ok_or_else(|| {
                    GraphError::new(
                        Rule::WaitTimeout,
                        format!(
                            "{}: `wait.timeout_ms` is required (1 to {MAX_DELAY_MS} ms, 30 days)",
                            at(i)
                        ),
                    )
                })?;
                if !(1..=MAX_DELAY_MS).contains(&timeout_ms) {
                    return Err(GraphError::new(
                        Rule::WaitTimeout,
                        format!(
                            "{}: `wait.timeout_ms` must be 1 to {MAX_DELAY_MS} ms (30 days), not {timeout_ms}",
                            at(i)
                        ),
                    ));
                }
                let signal = wait.signal.clone().unwrap_or_else(|| ids[i].clone());
                if !valid_name(&signal) {
                    return Err(GraphError::new(
                        Rule::Signal,
                        format!(
                            "{}: `wait.signal` `{}` must be 1 to {MAX_ID_LEN} characters of `a-z`, `0-9`, `_` and `-`",
                            at(i),
                            shown(&signal)
                        ),
                    ));
                }
                if let Some(&other) = signals.get(&signal) {
                    return Err(GraphError::new(
                        Rule::DuplicateSignal,
                        format!(
                            "{}: {} already waits for signal `{signal}`; each wait listens for its own",
                            at(i),
                            at(other)
                        ),
                    ));
                }
                signals.insert(signal.clone(), i);
                PlannedKind::Wait {
                    signal,
                    timeout_ms,
                    on_timeout: wait.on_timeout,
                }
            }
            Kind::Sleep(ms) => {
                if !(1..=MAX_DELAY_MS).contains(ms) {
                    return Err(GraphError::new(
                        Rule::SleepMs,
                        format!(
                            "{}: `sleep_ms` must be 1 to {MAX_DELAY_MS} ms (30 days), not {ms}",
                            at(i)
                        ),
                    ));
                }
                PlannedKind::Sleep { ms: *ms }
            }
        };
        planned.push(PlannedStep {
            id: ids[i].clone(),
            needs,
            allow_failure: def.allow_failure,
            kind,
        });
    }
    Ok(planned)
}

/// Exactly one of `capability`, `wait`, `sleep_ms`; worker-only options only on workers.
fn kind(i: usize, def: &StepDef) -> Result<Kind<'_>, GraphError> {
    let at = || match &def.id {
        Some(id) => format!("step {i} (`{}`)", shown(id)),
        None => format!("step {i}"),
    };
    let kind = match (&def.capability, &def.wait, def.sleep_ms) {
        (Some(c), None, None) => Kind::Work(c),
        (None, Some(w), None) => Kind::Wait(w),
        (None, None, Some(ms)) => Kind::Sleep(ms),
        _ => {
            return Err(GraphError::new(
                Rule::Shape,
                format!(
                    "{}: a step has exactly one of `capability`, `wait` and `sleep_ms`",
                    at()
                ),
            ));
        }
    };
    if !matches!(kind, Kind::Work(_)) {
        let worker_only = [
            ("map", def.map.is_some()),
            ("router", def.router),
            ("max_attempts", def.max_attempts.is_some()),
            ("timeout_ms", def.timeout_ms.is_some()),
        ];
        if let Some((field, _)) = worker_only.iter().find(|(_, set)| *set) {
            return Err(GraphError::new(
                Rule::Shape,
                format!(
                    "{}: `{field}` applies to worker steps (with a `capability`) only",
                    at()
                ),
            ));
        }
    }
    Ok(kind)
}

/// Every step's id: as written, or the default (the capability when no other step has it,
/// with `.` as `_`; else `<capability>-<index>`; `wait-<index>`, `sleep-<index>`).
fn assign_ids(defs: &[StepDef], kinds: &[Kind<'_>]) -> Result<Vec<String>, GraphError> {
    let mut uses: HashMap<&Capability, usize> = HashMap::new();
    for k in kinds {
        if let Kind::Work(c) = k {
            *uses.entry(c).or_default() += 1;
        }
    }
    let mut ids = Vec::with_capacity(defs.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, (def, kind)) in defs.iter().zip(kinds).enumerate() {
        let id = match (&def.id, kind) {
            (Some(id), _) => id.clone(),
            (None, Kind::Work(c)) => {
                let base = c.as_str().replace('.', "_");
                if uses.get(c).copied() == Some(1) {
                    base
                } else {
                    format!("{base}-{i}")
                }
            }
            (None, Kind::Wait(_)) => format!("wait-{i}"),
            (None, Kind::Sleep(_)) => format!("sleep-{i}"),
        };
        if !valid_name(&id) {
            return Err(GraphError::new(
                Rule::Id,
                format!(
                    "step {i}: id `{}` must be 1 to {MAX_ID_LEN} characters of `a-z`, `0-9`, `_` and `-`{}",
                    shown(&id),
                    if def.id.is_none() {
                        " (give the step an `id`)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if id == INPUT {
            return Err(GraphError::new(
                Rule::Id,
                format!(
                    "step {i}: id `{INPUT}` is reserved (`map.over` uses it for the task input); give the step another `id`"
                ),
            ));
        }
        if let Some(&other) = seen.get(&id) {
            return Err(GraphError::new(
                Rule::DuplicateId,
                format!(
                    "step {i}: id `{id}` is already the id of step {other}; ids are unique in a task"
                ),
            ));
        }
        seen.insert(id.clone(), i);
        ids.push(id);
    }
    Ok(ids)
}

/// A step's needs as slots: absent, the step before it; `[]`, none.
fn resolve_needs(
    i: usize,
    def: &StepDef,
    index: &HashMap<&str, u32>,
    at: &impl Fn(usize) -> String,
) -> Result<Vec<u32>, GraphError> {
    let Some(written) = &def.needs else {
        return Ok(i.checked_sub(1).map(|p| p as u32).into_iter().collect());
    };
    if written.len() > MAX_NEEDS {
        return Err(GraphError::new(
            Rule::TooManyNeeds,
            format!(
                "{}: `needs` lists {} steps; a step needs at most {MAX_NEEDS}",
                at(i),
                written.len()
            ),
        ));
    }
    let mut slots = Vec::with_capacity(written.len());
    for need in written {
        let Some(&slot) = index.get(need.as_str()) else {
            return Err(GraphError::new(
                Rule::UnknownNeed,
                format!(
                    "{}: `needs` names `{}`, which is no step of the task",
                    at(i),
                    shown(need)
                ),
            ));
        };
        if slot as usize == i {
            return Err(GraphError::new(
                Rule::SelfNeed,
                format!("{}: a step cannot need itself", at(i)),
            ));
        }
        if slots.contains(&slot) {
            return Err(GraphError::new(
                Rule::DuplicateNeed,
                format!("{}: `needs` names `{need}` twice", at(i)),
            ));
        }
        slots.push(slot);
    }
    Ok(slots)
}

/// A cycle among the steps' needs, if there is one: the slots round it, each needing the
/// next, the first repeated at the end. Depth-first from slot 0 up, needs in written order,
/// so the same graph always reports the same cycle.
fn find_cycle(needs: &[Vec<u32>]) -> Option<Vec<u32>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut mark = vec![Mark::New; needs.len()];
    for start in 0..needs.len() {
        if mark[start] != Mark::New {
            continue;
        }
        // Iterative, with each frame's next need to look at.
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = Mark::OnPath;
        while let Some(frame) = path.last_mut() {
            let node = frame.0;
            if let Some(&need) = needs[node].get(frame.1) {
                frame.1 += 1;
                let need = need as usize;
                match mark[need] {
                    Mark::New => {
                        mark[need] = Mark::OnPath;
                        path.push((need, 0));
                    }
                    Mark::OnPath => {
                        let from = path.iter().position(|&(n, _)| n == need).unwrap_or(0);
                        let mut cycle: Vec<u32> =
                            path[from..].iter().map(|&(n, _)| n as u32).collect();
                        cycle.push(need as u32);
                        return Some(cycle);
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                path.pop();
            }
        }
    }
    None
}

/// `map.over` and `map.concurrency` checked: the path starts at `input` or at a step this
/// one needs, and its segments (keys or indices) are not empty.
fn map_plan(
    at: &str,
    map: &common::wire::MapDef,
    needs: &[u32],
    index: &HashMap<&str, u32>,
) -> Result<MapPlan, GraphError> {
    let concurrency = map.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
        return Err(GraphError::new(
            Rule::MapConcurrency,
            format!("{at}: `map.concurrency` must be 1 to {MAX_CONCURRENCY}, not {concurrency}"),
        ));
    }
    let mut segments = map.over.split('.');
    let head = segments.next().unwrap_or_default();
    let path: Vec<String> = segments.map(str::to_string).collect();
    if head.is_empty() || path.iter().any(String::is_empty) {
        return Err(GraphError::new(
            Rule::MapOver,
            format!(
                "{at}: `map.over` `{}` must be `input` or a needed step's id, then `.`-separated keys or indices, none empty",
                shown(&map.over)
            ),
        ));
    }
    let from = if head == INPUT {
        None
    } else {
        match index.get(head) {
            Some(slot) if needs.contains(slot) => Some(*slot),
            _ => {
                return Err(GraphError::new(
                    Rule::MapOver,
                    format!(
                        "{at}: `map.over` starts at `{}`, which is neither `input` nor a step this step needs",
                        shown(head)
                    ),
                ));
            }
        }
    };
    Ok(MapPlan {
        over: map.over.clone(),
        from,
        path,
        concurrency,
    })
}

/// A step id or signal name: `[a-z0-9_-]{1,64}`.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A user's text in an error message, cut short so a huge value cannot make a huge answer.
fn shown(text: &str) -> String {
    const MAX: usize = 80;
    if text.chars().count() <= MAX {
        text.to_string()
    } else {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests;

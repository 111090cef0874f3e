//! The operators' lists: the task search (`GET /tasks`) over the task index
//! ([`keys::task_index`](super::schema::keys::task_index)), its sweep, and the dead-letter
//! list (`GET /deadletters`). Each is written once, over the few plain reads a store
//! provides ([`Lookup`]), so the Redis and the in-memory store page alike.

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use common::wire::{Capability, StepError, TaskId, TaskStatus};
use serde::Serialize;

use super::StoreError;
use super::schema::index;

/// Most tasks one search page holds.
pub const MAX_LIMIT: usize = 500;

/// Most index members one search looks at: past it the page ends with what matched and a
/// cursor to go on from, so a filter that matches little cannot make one request read the
/// whole index.
pub const SCAN_BUDGET: usize = 5_000;

/// What `GET /tasks` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskQuery {
    /// Only tasks with this stored status (`queued`, `running`, or a final one; a waiting
    /// task is stored as `running`).
    pub status: Option<TaskStatus>,
    /// Only this client's tasks.
    pub client: Option<String>,
    /// Only tasks of this named pipeline.
    pub pipeline: Option<String>,
    /// Submitted at or after this time (ms since the epoch).
    pub since: u64,
    /// Submitted before this time (ms since the epoch); `None`: no bound.
    pub until: Option<u64>,
    /// Most tasks in the page (1 to [`MAX_LIMIT`]).
    pub limit: usize,
    /// Where the previous page ended.
    pub after: Option<TaskCursor>,
    /// Most index members to look at ([`SCAN_BUDGET`]).
    pub budget: usize,
}

impl TaskQuery {
    /// Every task, newest first, `limit` at a time.
    pub fn all(limit: usize) -> Self {
        Self {
            status: None,
            client: None,
            pipeline: None,
            since: 0,
            until: None,
            limit,
            after: None,
            budget: SCAN_BUDGET,
        }
    }
}

/// One task in a search page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskSummary {
    /// The task.
    pub id: TaskId,
    /// Its owner.
    pub client: String,
    /// Its stored status (`running` for a task `GET /task/{id}` shows as `waiting`).
    pub status: TaskStatus,
    /// Its pipeline; `None` for inline steps.
    pub pipeline: Option<String>,
    /// When it was submitted (ms since the epoch).
    pub created_at: u64,
    /// When it finished, if it has.
    pub finished_at: Option<u64>,
    /// How many steps it declared (map instances not counted).
    pub steps: u32,
}

/// One page of the task search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPage {
    /// Newest submit first.
    pub tasks: Vec<TaskSummary>,
    /// Where the next page starts; `None` when the index has no more.
    pub next: Option<TaskCursor>,
}

/// A place in the task index: the last task a page looked at. Shown to callers as
/// `<ms>.<id>`, which they give back unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskCursor {
    /// Its submit time.
    pub ms: u64,
    /// The task.
    pub id: TaskId,
}

impl fmt::Display for TaskCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.ms, self.id)
    }
}

/// A cursor that is not one this service made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`cursor` is not one a previous page gave")]
pub struct BadCursor;

/// Milliseconds as a cursor writes them: 1 to 13 digits.
fn cursor_ms(text: &str) -> Result<u64, BadCursor> {
    if text.is_empty() || text.len() > index::MS_DIGITS || !text.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(BadCursor);
    }
    text.parse().map_err(|_| BadCursor)
}

impl FromStr for TaskCursor {
    type Err = BadCursor;

    fn from_str(text: &str) -> Result<Self, BadCursor> {
        let (ms, id) = text.split_once('.').ok_or(BadCursor)?;
        Ok(Self {
            ms: cursor_ms(ms)?,
            id: TaskId::new(id).map_err(|_| BadCursor)?,
        })
    }
}

/// What a search reads of a task's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed {
    /// Its owner.
    pub client: String,
    /// Its stored status.
    pub status: TaskStatus,
    /// Its pipeline, if named.
    pub pipeline: Option<String>,
    /// When it was submitted.
    pub created_at: u64,
    /// When it finished.
    pub finished_at: Option<u64>,
    /// Declared steps.
    pub steps: u32,
}

/// A dead-lettered task as `GET /deadletters` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The failed task.
    pub task_id: TaskId,
    /// The dead-letter set it is in: its failed step's capability.
    pub capability: Capability,
    /// Its owner.
    pub client: String,
    /// When it failed (ms since the epoch).
    pub failed_at: u64,
    /// The id of the step whose failure failed it, as the task view names it (`None` for a
    /// task that failed before the master recorded it).
    pub step: Option<String>,
    /// That step's error message, as the task view shows it.
    pub error: Option<String>,
}

/// One page of dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPage {
    /// Newest failure first.
    pub dead_letters: Vec<DeadLetter>,
    /// Where the next page starts; `None` at the end.
    pub next: Option<DeadLetterCursor>,
}

/// A place in the dead-letter list: the last entry of a page. Shown as
/// `<ms>.<task id>.<capability>` (task ids have no `.`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterCursor {
    /// Its failure time.
    pub failed_at: u64,
    /// Its task.
    pub task_id: TaskId,
    /// Its capability.
    pub capability: Capability,
}

impl DeadLetterCursor {
    /// The list's order: newest failure first, then task id and capability, descending.
    fn key(&self) -> (u64, &str, &str) {
        (
            self.failed_at,
            self.task_id.as_str(),
            self.capability.as_str(),
        )
    }
}

impl fmt::Display for DeadLetterCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.failed_at, self.task_id, self.capability)
    }
}

impl FromStr for DeadLetterCursor {
    type Err = BadCursor;

    fn from_str(text: &str) -> Result<Self, BadCursor> {
        let mut parts = text.splitn(3, '.');
        let (Some(ms), Some(id), Some(cap)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(BadCursor);
        };
        Ok(Self {
            failed_at: cursor_ms(ms)?,
            task_id: TaskId::new(id).map_err(|_| BadCursor)?,
            capability: Capability::new(cap).map_err(|_| BadCursor)?,
        })
    }
}

/// What the dead-letter list reads of a failed task's hash.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// Its owner.
    pub client: String,
    /// The failed step's id.
    pub step: Option<String>,
    /// The task's error (the failed step's).
    pub error: Option<StepError>,
}

/// The plain reads and removals the lists are made of; each store answers them from its
/// own data.
#[async_trait]
pub(crate) trait Lookup: Sync {
    /// Members of the task index from `lower` (included) to `upper` (excluded), in byte
    /// order or (`rev`) reversed, at most `count`.
    async fn index_range(
        &self,
        lower: &str,
        upper: &str,
        rev: bool,
        count: usize,
    ) -> Result<Vec<String>, StoreError>;

    /// What a search reads of each task; `None` for a task that is gone.
    async fn indexed(&self, ids: &[TaskId]) -> Result<Vec<Option<Indexed>>, StoreError>;

    /// Removes members from the task index.
    async fn unindex(&self, members: &[String]) -> Result<(), StoreError>;

    /// A capability's dead letters that failed at or before `max` (ms), newest first (equal
    /// times: task id descending), skipping `offset`, at most `count`.
    async fn dead_range(
        &self,
        capability: &Capability,
        max: u64,
        offset: usize,
        count: usize,
    ) -> Result<Vec<(TaskId, u64)>, StoreError>;

    /// What the dead-letter list shows of each task; `None` for a task that is gone.
    async fn failures(&self, ids: &[TaskId]) -> Result<Vec<Option<Failure>>, StoreError>;
}

/// The part of the index a query walks: a final status's members, else the client's, else
/// the pipeline's, else every task's.
fn part(q: &TaskQuery) -> String {
    match (q.status, &q.client, &q.pipeline) {
        (Some(s), _, _) if s.is_terminal() => format!("{}{}:", index::STATUS, s.as_str()),
        (_, Some(client), _) => format!("{}{client}:", index::CLIENT),
        (_, _, Some(pipeline)) => format!("{}{pipeline}:", index::PIPELINE),
        _ => index::ALL.to_string(),
    }
}

/// Just past every member that starts with `part` (which ends in `:`).
fn part_end(part: &str) -> String {
    format!("{};", part.trim_end_matches(':'))
}

/// The submit time and task id of a member of `part`.
fn parse_member(part: &str, member: &str) -> Option<(u64, TaskId)> {
    let rest = member.strip_prefix(part)?;
    let (ms, rest) = rest.split_at_checked(index::MS_DIGITS)?;
    let rest = rest.strip_prefix(':')?;
    let id = rest.split(':').next()?;
    Some((ms.parse().ok()?, TaskId::new(id).ok()?))
}

fn wanted(q: &TaskQuery, t: &Indexed) -> bool {
    q.status.is_none_or(|s| s == t.status)
        && q.client.as_ref().is_none_or(|c| *c == t.client)
        && q.pipeline
            .as_ref()
            .is_none_or(|p| Some(p) == t.pipeline.as_ref())
        && t.created_at >= q.since
        && q.until.is_none_or(|u| t.created_at < u)
}

/// One page of the task search: walks its part of the index newest first from the cursor,
/// reads each candidate's few fields, keeps those the filters want, and drops the members
/// of tasks that are gone. Looks at [`TaskQuery::budget`] members at most.
pub(crate) async fn search(src: &impl Lookup, q: &TaskQuery) -> Result<TaskPage, StoreError> {
    let mut page = TaskPage {
        tasks: Vec::new(),
        next: None,
    };
    let limit = q.limit.clamp(1, MAX_LIMIT);
    if q.since > index::MAX_MS || q.until.is_some_and(|u| u <= q.since) {
        return Ok(page);
    }
    let part = part(q);
    let lower = format!("{part}{}", index::pad_ms(q.since));
    let mut upper = match q.until {
        Some(u) if u <= index::MAX_MS => format!("{part}{}", index::pad_ms(u)),
        _ => part_end(&part),
    };
    if let Some(c) = &q.after {
        let at = format!("{part}{}:{}", index::pad_ms(c.ms), c.id);
        upper = upper.min(at);
    }
    let budget = q.budget.max(1);
    let mut looked = 0;
    while looked < budget && lower < upper {
        let want = ((limit - page.tasks.len()) * 2)
            .clamp(16, MAX_LIMIT)
            .min(budget - looked);
        let members = src.index_range(&lower, &upper, true, want).await?;
        let exhausted = members.len() < want;
        let parsed: Vec<(String, Option<(u64, TaskId)>)> = members
            .into_iter()
            .map(|m| {
                let at = parse_member(&part, &m);
                (m, at)
            })
            .collect();
        let ids: Vec<TaskId> = parsed
            .iter()
            .filter_map(|(_, at)| at.as_ref().map(|(_, id)| id.clone()))
            .collect();
        let mut rows = src.indexed(&ids).await?.into_iter();
        let mut gone = Vec::new();
        for (i, (member, at)) in parsed.iter().enumerate() {
            looked += 1;
            upper.clone_from(member);
            let Some((ms, id)) = at else {
                // Not a member this service writes: out of the way.
                gone.push(member.clone());
                continue;
            };
            page.next = Some(TaskCursor {
                ms: *ms,
                id: id.clone(),
            });
            match rows.next().flatten() {
                // Met through its `A:` member, every member of the task goes (the sweep
                // finds a task by that member only); through another, that one.
                None if part == index::ALL => gone.extend(members_of(member, *ms, id)),
                None => gone.push(member.clone()),
                Some(t) if wanted(q, &t) => {
                    page.tasks.push(TaskSummary {
                        id: id.clone(),
                        client: t.client,
                        status: t.status,
                        pipeline: t.pipeline,
                        created_at: t.created_at,
                        finished_at: t.finished_at,
                        steps: t.steps,
                    });
                    if page.tasks.len() == limit {
                        src.unindex(&gone).await?;
                        if exhausted && i + 1 == parsed.len() {
                            page.next = None;
                        }
                        return Ok(page);
                    }
                }
                Some(_) => {}
            }
        }
        src.unindex(&gone).await?;
        if exhausted {
            page.next = None;
            return Ok(page);
        }
    }
    if lower >= upper {
        page.next = None;
    }
    Ok(page)
}

/// Every member a task can have, named from its `A:` member
/// (`A:<ms>:<id>:<client>:<pipeline>`; client ids have no `:`).
fn members_of(all: &str, ms: u64, id: &TaskId) -> Vec<String> {
    let ms = index::pad_ms(ms);
    let mut out = vec![all.to_string()];
    if let [client, pipeline] = all.splitn(5, ':').skip(3).collect::<Vec<_>>().as_slice() {
        out.push(index::client(client, &ms, id.as_str()));
        if !pipeline.is_empty() {
            out.push(index::pipeline(pipeline, &ms, id.as_str()));
        }
    }
    for status in [
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ] {
        out.push(index::status(status.as_str(), &ms, id.as_str()));
    }
    out
}

/// One round of the index sweep: up to `budget` `A:` members from after `from` (or the
/// oldest) that were submitted before `cutoff` (ms); every member of a task that is gone is
/// removed. Returns how many tasks were removed, and where the next round starts (`None`:
/// from the oldest again, this round reached the cutoff).
pub(crate) async fn sweep(
    src: &impl Lookup,
    from: Option<&str>,
    cutoff: u64,
    budget: usize,
) -> Result<(usize, Option<String>), StoreError> {
    // The smallest string after `from`: the member itself is not looked at again.
    let lower = from.map_or_else(|| index::ALL.to_string(), |m| format!("{m}\u{0}"));
    let upper = format!("{}{}", index::ALL, index::pad_ms(cutoff));
    if lower >= upper {
        return Ok((0, None));
    }
    let budget = budget.max(1);
    let members = src.index_range(&lower, &upper, false, budget).await?;
    let parsed: Vec<(&String, Option<(u64, TaskId)>)> = members
        .iter()
        .map(|m| (m, parse_member(index::ALL, m)))
        .collect();
    let ids: Vec<TaskId> = parsed
        .iter()
        .filter_map(|(_, at)| at.as_ref().map(|(_, id)| id.clone()))
        .collect();
    let mut rows = src.indexed(&ids).await?.into_iter();
    let mut gone = Vec::new();
    let mut removed = 0;
    for (member, at) in &parsed {
        let Some((ms, id)) = at else {
            gone.push((*member).clone());
            continue;
        };
        if rows.next().flatten().is_some() {
            continue;
        }
        removed += 1;
        gone.extend(members_of(member, *ms, id));
    }
    src.unindex(&gone).await?;
    let next = (members.len() >= budget)
        .then(|| members.last().cloned())
        .flatten();
    Ok((removed, next))
}

/// One page of dead letters of `capabilities`, after `after`, newest failure first.
pub(crate) async fn dead_letters(
    src: &impl Lookup,
    capabilities: &[Capability],
    after: Option<&DeadLetterCursor>,
    limit: usize,
) -> Result<DeadLetterPage, StoreError> {
    let limit = limit.clamp(1, MAX_LIMIT);
    let mut caps = capabilities.to_vec();
    caps.sort();
    caps.dedup();
    let max = after.map_or(u64::MAX, |a| a.failed_at);
    // Each capability's first `limit + 1` past the cursor; the page is the newest of all.
    let mut found: Vec<(u64, TaskId, Capability)> = Vec::new();
    for cap in &caps {
        let mut kept = 0;
        let mut offset = 0;
        loop {
            let batch = src.dead_range(cap, max, offset, limit + 1).await?;
            offset += batch.len();
            let short = batch.len() <= limit;
            for (id, at) in batch {
                let past = after.is_none_or(|a| (at, id.as_str(), cap.as_str()) < a.key());
                if past && kept <= limit {
                    kept += 1;
                    found.push((at, id, cap.clone()));
                }
            }
            if short || kept > limit {
                break;
            }
        }
    }
    found.sort_by(|a, b| (b.0, b.1.as_str(), b.2.as_str()).cmp(&(a.0, a.1.as_str(), a.2.as_str())));
    let more = found.len() > limit;
    found.truncate(limit);
    let next = more.then(|| {
        found.last().map(|(at, id, cap)| DeadLetterCursor {
            failed_at: *at,
            task_id: id.clone(),
            capability: cap.clone(),
        })
    });
    let ids: Vec<TaskId> = found.iter().map(|(_, id, _)| id.clone()).collect();
    let failures = src.failures(&ids).await?;
    let dead_letters = found
        .into_iter()
        .zip(failures)
        .filter_map(|((failed_at, task_id, capability), failure)| {
            // A task that expired before its entry was pruned is not listed.
            let f = failure?;
            Some(DeadLetter {
                task_id,
                capability,
                client: f.client,
                failed_at,
                step: f.step,
                error: f.error.map(|e| e.message),
            })
        })
        .collect();
    Ok(DeadLetterPage {
        dead_letters,
        next: next.flatten(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_back_what_they_write_and_refuse_anything_else() {
        let c = TaskCursor {
            ms: 1_700_000_000_000,
            id: TaskId::new("abc-1").unwrap(),
        };
        assert_eq!(c.to_string().parse::<TaskCursor>().unwrap(), c);
        for bad in [
            "",
            ".",
            "1.",
            ".abc",
            "x.abc",
            "-1.abc",
            "99999999999999.abc",
            "18446744073709551616.abc",
            "1.a:b",
            "1.a b",
            "1.a.b",
        ] {
            assert!(bad.parse::<TaskCursor>().is_err(), "{bad:?}");
        }
        let d = DeadLetterCursor {
            failed_at: 5,
            task_id: TaskId::new("t1").unwrap(),
            capability: Capability::new("web.search").unwrap(),
        };
        assert_eq!(d.to_string().parse::<DeadLetterCursor>().unwrap(), d);
        for bad in ["", "5", "5.t1", "5.t1.", "5.t1.UP", "x.t1.plan", "5..plan"] {
            assert!(bad.parse::<DeadLetterCursor>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn members_parse_in_their_part_only() {
        let ms = index::pad_ms(42);
        let id = "t-1";
        let all = index::all(&ms, id, "alice", "with:colon");
        assert_eq!(
            parse_member(index::ALL, &all),
            Some((42, TaskId::new(id).unwrap()))
        );
        let client = index::client("alice", &ms, id);
        assert_eq!(parse_member("C:alice:", &client).map(|(m, _)| m), Some(42));
        assert_eq!(parse_member("C:bob:", &client), None);
        assert_eq!(parse_member("C:alice:", "C:alice:12:t"), None);
        // Byte order is time order within a part, and parts do not overlap.
        assert!(index::client("alice", &index::pad_ms(9), id) < client);
        assert!(client < part_end("C:alice:"));
        assert!(*index::client("alice2", &ms, id) < *"C:alice:");
    }
}

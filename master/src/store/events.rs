//! Task events in the stores (docs/events.md): cursors, the stored form of a transition's
//! events, and, for Redis, the wake-ups of a process's readers: one subscription for every
//! followed task and one blocking `XREAD` for the operators' stream, however many readers.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use common::redis::RedisSettings;
use common::wire::{TaskEvent, TaskId};
use futures::StreamExt;
use redis::Value;
use tokio::sync::{Notify, oneshot};

use super::StoreError;

/// Where a reader of events is: the event with this id was the last one it got. The id of
/// an event is `<ms>-<seq>.<index>`: its transition's stream entry and its place there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventCursor {
    /// The entry.
    pub entry: EntryId,
    /// The event's index in its entry.
    pub index: u32,
}

/// A stream entry's id (`<ms>-<seq>`, as Redis makes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EntryId {
    /// When it was added (ms since the epoch).
    pub ms: u64,
    /// Its order among entries of the same millisecond.
    pub seq: u64,
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for EntryId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ms, seq) = s
            .split_once('-')
            .ok_or_else(|| format!("`{s}` is not an event stream entry id"))?;
        let digits = |t: &str| {
            (!t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| format!("`{s}` is not an event stream entry id"))
        };
        Ok(Self {
            ms: digits(ms)?,
            seq: digits(seq)?,
        })
    }
}

impl fmt::Display for EventCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.entry, self.index)
    }
}

impl FromStr for EventCursor {
    type Err = String;

    /// `<ms>-<seq>.<index>`, as events carry it (`Last-Event-ID`).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{}` is not an event id (`<ms>-<seq>.<index>`)", shown(s));
        let (entry, index) = s.split_once('.').ok_or_else(bad)?;
        let index =
            (!index.is_empty() && index.len() <= 10 && index.bytes().all(|b| b.is_ascii_digit()))
                .then(|| index.parse::<u32>().ok())
                .flatten()
                .ok_or_else(bad)?;
        Ok(Self {
            entry: entry.parse().map_err(|_| bad())?,
            index,
        })
    }
}

/// At most 64 characters of a client's text, for an error message.
fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

/// One transition's events as stored: a JSON array of event objects without `id`,
/// `task_id` and `at_ms`, which the entry gives.
pub(crate) fn expand(
    task_id: &TaskId,
    entry: EntryId,
    events: &str,
    after: Option<&EventCursor>,
) -> Result<Vec<TaskEvent>, StoreError> {
    let list: Vec<serde_json::Value> = serde_json::from_str(events)
        .map_err(|e| super::reply::corrupt(format!("events of task {task_id}: {e}")))?;
    expand_values(task_id, entry, list, after)
}

/// [`expand`] of events already parsed.
pub(crate) fn expand_values(
    task_id: &TaskId,
    entry: EntryId,
    list: Vec<serde_json::Value>,
    after: Option<&EventCursor>,
) -> Result<Vec<TaskEvent>, StoreError> {
    let mut out = Vec::with_capacity(list.len());
    for (i, event) in list.into_iter().enumerate() {
        let serde_json::Value::Object(mut event) = event else {
            return Err(super::reply::corrupt(format!(
                "an event of task {task_id} is not an object"
            )));
        };
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        let cursor = EventCursor { entry, index };
        // Entries come from the cursor's own on (its start is inclusive): of that one,
        // only the events after the cursor.
        if after.is_some_and(|a| a.entry == entry && index <= a.index) {
            continue;
        }
        event.insert("id".into(), cursor.to_string().into());
        event.insert("task_id".into(), task_id.as_str().into());
        event.insert("at_ms".into(), entry.ms.into());
        out.push(
            serde_json::from_value(serde_json::Value::Object(event))
                .map_err(|e| super::reply::corrupt(format!("event of task {task_id}: {e}")))?,
        );
    }
    Ok(out)
}

/// A stream entry: its id and fields.
pub(crate) type StreamEntry = (EntryId, HashMap<String, String>);

/// The entries of an `XRANGE` reply.
pub(crate) fn entries(value: Value) -> Result<Vec<StreamEntry>, StoreError> {
    let Value::Array(rows) = value else {
        return Err(super::reply::corrupt("XRANGE did not answer an array"));
    };
    rows.into_iter().map(entry).collect()
}

fn entry(row: Value) -> Result<StreamEntry, StoreError> {
    let bad = || super::reply::corrupt("an event stream entry is not [id, [field, value, …]]");
    let Value::Array(mut parts) = row else {
        return Err(bad());
    };
    if parts.len() != 2 {
        return Err(bad());
    }
    let fields = parts.pop().ok_or_else(bad)?;
    let id: String = redis::from_redis_value(parts.pop().ok_or_else(bad)?).map_err(|_| bad())?;
    let id = id.parse().map_err(|_| bad())?;
    let fields: HashMap<String, String> = redis::from_redis_value(fields).map_err(|_| bad())?;
    Ok((id, fields))
}

/// The `XRANGE` start for events after `after`: its entry (inclusive: later events of the
/// same entry are still to come), or the beginning.
pub(crate) fn range_start(after: Option<&EventCursor>) -> String {
    after.map_or_else(|| "-".to_string(), |a| a.entry.to_string())
}

/// Entries to read for `limit` transitions after `after`: one more with a cursor, whose
/// own entry comes first (inclusive start) and may hold nothing after it.
pub(crate) fn range_count(after: Option<&EventCursor>, limit: usize) -> usize {
    limit.clamp(1, MAX_PAGE) + usize::from(after.is_some())
}

/// Most transitions one read returns, whatever the caller asks: a read is one command
/// with one argument per entry.
pub const MAX_PAGE: usize = 1_000;

/// How long one blocking read of the operators' stream waits before it reads the set of
/// waiters again.
const BLOCK: Duration = Duration::from_millis(100);

/// Longest wait between two looks at a task's events, should a wake-up be lost (the
/// subscription reconnecting).
pub(crate) const FALLBACK_POLL: Duration = Duration::from_secs(2);

/// How long a mark that a task is followed lasts ([`WATCHED_UNTIL`]), and how often a
/// follower renews it.
///
/// [`WATCHED_UNTIL`]: super::schema::task_field::WATCHED_UNTIL
pub(crate) const WATCH_FOR: Duration = Duration::from_secs(60);
pub(crate) const WATCH_RENEW: Duration = Duration::from_secs(20);

/// The waiters' key for the operators' stream (task ids never contain a NUL).
const FIREHOSE: &str = "\u{0}firehose";

/// One process's wake-ups for readers of event streams. A task's transitions announce
/// `ev:<task>` on the events channel while the task is followed, and one subscription per
/// process wakes that task's readers; the operators' stream is a Redis stream, read by one
/// blocking `XREAD` per process. Readers that are woken read the events themselves.
pub(crate) struct Tailer {
    inner: Arc<Inner>,
}

impl fmt::Debug for Tailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tailer")
    }
}

struct Inner {
    settings: RedisSettings,
    state: Mutex<TailState>,
    /// Woken when the operators' stream gains a waiter.
    changed: Notify,
}

#[derive(Default)]
struct TailState {
    /// Waiters per task id (or [`FIREHOSE`]): (id, last entry seen, wake-up).
    waiters: HashMap<String, Vec<(u64, EntryId, oneshot::Sender<()>)>>,
    next_id: u64,
    /// The subscription runs.
    subscribed: bool,
    /// The operators' stream reader runs.
    tailing: bool,
    /// When this process last marked each task followed.
    marked: HashMap<String, std::time::Instant>,
}

/// Removes a waiter that stopped waiting (woken, timed out, or its client left).
struct Registration<'a> {
    inner: &'a Inner,
    key: String,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = state.waiters.get_mut(&self.key) {
            list.retain(|(id, _, _)| *id != self.id);
            if list.is_empty() {
                state.waiters.remove(&self.key);
            }
        }
    }
}

/// A registered waiter: resolves when woken.
pub(crate) struct Waiting<'a> {
    _registration: Registration<'a>,
    woken: oneshot::Receiver<()>,
}

impl Waiting<'_> {
    /// Waits until woken, or `timeout`.
    pub(crate) async fn until(self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.woken).await;
    }
}

impl Tailer {
    pub(crate) fn new(settings: RedisSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                state: Mutex::new(TailState::default()),
                changed: Notify::new(),
            }),
        }
    }

    /// Whether task `id` should be marked followed now (not marked by this process within
    /// [`WATCH_RENEW`]); records the mark as made.
    pub(crate) fn needs_mark(&self, id: &str) -> bool {
        let now = std::time::Instant::now();
        let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        if state
            .marked
            .get(id)
            .is_some_and(|at| now.duration_since(*at) < WATCH_RENEW)
        {
            return false;
        }
        state
            .marked
            .retain(|_, at| now.duration_since(*at) < WATCH_FOR);
        state.marked.insert(id.to_string(), now);
        true
    }

    /// Registers a waiter for task `id`'s events after `after` (`None`: the operators'
    /// stream), starting the reader it needs.
    pub(crate) fn register(&self, id: Option<&str>, after: Option<EntryId>) -> Waiting<'_> {
        let key = id.unwrap_or(FIREHOSE).to_string();
        let (tx, rx) = oneshot::channel();
        let waiter_id = {
            let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            state.next_id += 1;
            let waiter_id = state.next_id;
            state.waiters.entry(key.clone()).or_default().push((
                waiter_id,
                after.unwrap_or_default(),
                tx,
            ));
            if id.is_some() && !state.subscribed {
                state.subscribed = true;
                tokio::spawn(subscribe(Arc::downgrade(&self.inner)));
            }
            if id.is_none() && !state.tailing {
                state.tailing = true;
                tokio::spawn(tail(Arc::downgrade(&self.inner)));
            }
            waiter_id
        };
        if id.is_none() {
            self.inner.changed.notify_one();
        }
        Waiting {
            _registration: Registration {
                inner: &self.inner,
                key,
                id: waiter_id,
            },
            woken: rx,
        }
    }
}

/// Wakes the waiters of `key` whose last entry is before `newest` (all, with `None`).
fn wake(inner: &Inner, key: &str, newest: Option<EntryId>) {
    let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(waiters) = state.waiters.get_mut(key) {
        let mut kept = Vec::with_capacity(waiters.len());
        for (id, seen, tx) in waiters.drain(..) {
            if newest.is_none_or(|n| n > seen) {
                let _ = tx.send(());
            } else {
                kept.push((id, seen, tx));
            }
        }
        *waiters = kept;
    }
}

/// Wakes every waiter (after a reconnect: announcements may have been missed).
fn wake_all(inner: &Inner) {
    let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    for (_, waiters) in state.waiters.iter_mut() {
        for (_, _, tx) in waiters.drain(..) {
            let _ = tx.send(());
        }
    }
}

/// The subscription to the events channel: `ev:<task>` wakes that task's waiters. Runs
/// while the store exists, reconnecting after errors.
async fn subscribe(inner: Weak<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let channel = common::registry::keys::events(&strong.settings.key_prefix);
        let client = common::redis::dedicated_client(&strong.settings).await;
        drop(strong);
        let pubsub = match client {
            Ok(client) => {
                let subscribed = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                };
                tokio::time::timeout(Duration::from_secs(5), subscribed).await
            }
            Err(e) => {
                tracing::error!(error = %e, "event wake-ups cannot be configured");
                return;
            }
        };
        match pubsub {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(100);
                if let Some(strong) = inner.upgrade() {
                    wake_all(&strong);
                }
                let mut messages = pubsub.into_on_message();
                loop {
                    // Look up now and then whether the store is gone.
                    let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
                    let Some(strong) = inner.upgrade() else {
                        return;
                    };
                    match next {
                        Ok(Some(msg)) => {
                            if let Ok(payload) = msg.get_payload::<String>()
                                && let Some(task) =
                                    payload.strip_prefix(super::schema::keys::ANNOUNCEMENT_PREFIX)
                            {
                                wake(&strong, task, None);
                            }
                        }
                        Ok(None) => break,
                        Err(_) => {}
                    }
                }
                tracing::debug!("event wake-up subscription lost; reconnecting");
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %common::redis::describe(&e), "event wake-up subscription failed");
            }
            Err(_) => tracing::debug!("event wake-up subscription timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The reader of the operators' stream: one blocking `XREAD` from the oldest entry its
/// waiters have seen. Runs while the store exists.
async fn tail(inner: Weak<Inner>) {
    let mut conn = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let from = {
            let state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            state
                .waiters
                .get(FIREHOSE)
                .and_then(|list| list.iter().map(|w| w.1).min())
        };
        let Some(from) = from else {
            // Idle: wait for a waiter, letting go of the store now and then.
            let _ = tokio::time::timeout(Duration::from_secs(5), inner.changed.notified()).await;
            continue;
        };
        if conn.is_none() {
            conn = connect(&inner.settings).await;
            if conn.is_none() {
                drop(inner);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let key = super::schema::keys::firehose(&inner.settings.key_prefix);
        let reply: Result<Value, redis::RedisError> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(u64::try_from(BLOCK.as_millis()).unwrap_or(100))
            .arg("STREAMS")
            .arg(&key)
            .arg(from.to_string())
            .query_async(c)
            .await;
        match reply {
            Ok(Value::Nil) => backoff = Duration::from_millis(100),
            Ok(value) => {
                backoff = Duration::from_millis(100);
                let newest = read_ids(value).into_iter().max();
                if newest.is_some() {
                    wake(&inner, FIREHOSE, newest);
                }
            }
            Err(e) => {
                tracing::debug!(error = %common::redis::describe(&e), "operators' event stream read failed");
                conn = None;
                drop(inner);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn connect(settings: &RedisSettings) -> Option<redis::aio::MultiplexedConnection> {
    let client = common::redis::dedicated_client(settings).await.ok()?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(
            settings.connect_timeout_ms.max(1),
        )))
        .set_response_timeout(Some(
            BLOCK + Duration::from_millis(settings.command_timeout_ms.max(1)),
        ));
    match client
        .get_multiplexed_async_connection_with_config(&config)
        .await
    {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::debug!(error = %common::redis::describe(&e), "operators' event stream reader cannot connect");
            None
        }
    }
}

/// The entry ids of an `XREAD` reply (RESP2 arrays or a RESP3 map).
fn read_ids(value: Value) -> Vec<EntryId> {
    let streams: Vec<Value> = match value {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    streams
        .into_iter()
        .filter_map(|entries| super::events::entries(entries).ok())
        .flatten()
        .map(|(id, _)| id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_back_what_they_print_and_order_by_entry_then_index() {
        let c: EventCursor = "1764700000000-3.2".parse().unwrap();
        assert_eq!(c.to_string(), "1764700000000-3.2");
        let later: EventCursor = "1764700000000-4.0".parse().unwrap();
        assert!(later > c);
        assert!("1764700000000-3.3".parse::<EventCursor>().unwrap() > c);
    }

    #[test]
    fn malformed_cursors_are_refused_with_the_expected_form() {
        for bad in [
            "",
            "1-2",
            "1-2.",
            ".1",
            "a-1.0",
            "1-b.0",
            "1-2.x",
            "-1-2.0",
            "1-2.99999999999",
            "99999999999999999999999-1.0",
            "1 -2.0",
        ] {
            let e = bad.parse::<EventCursor>().unwrap_err();
            assert!(e.contains("<ms>-<seq>.<index>"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_stored_entry_expands_into_events_after_the_cursor() {
        let id = TaskId::new("t1").unwrap();
        let entry = EntryId { ms: 5, seq: 1 };
        let stored = r#"[{"type":"step.succeeded","step":"a","slot":0,"attempt":1,"output":{"x":1}},{"type":"task.succeeded","output":{"x":1}}]"#;
        let all = expand(&id, entry, stored, None).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].id, "5-1.0");
        assert_eq!(all[0].at_ms, 5);
        assert_eq!(all[0].output, Some(serde_json::json!({"x": 1})));
        assert!(all[1].is_final());
        let after = EventCursor { entry, index: 0 };
        let rest = expand(&id, entry, stored, Some(&after)).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].id, "5-1.1");
    }
}

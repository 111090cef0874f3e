//! Task events in the stores (docs/events.md): cursors, the stored form of a transition's
//! events, and, for Redis, one blocking reader per master process that wakes the SSE
//! connections of every watched stream (so a thousand watchers cost one `XREAD`, not a
//! thousand polls).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use common::redis::RedisSettings;
use common::wire::{TaskEvent, TaskId};
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
        if after.is_some_and(|a| cursor <= *a) {
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

/// The entries of an `XRANGE` reply: (id, fields).
pub(crate) fn entries(value: Value) -> Result<Vec<(EntryId, HashMap<String, String>)>, StoreError> {
    let Value::Array(rows) = value else {
        return Err(super::reply::corrupt("XRANGE did not answer an array"));
    };
    rows.into_iter().map(entry).collect()
}

fn entry(row: Value) -> Result<(EntryId, HashMap<String, String>), StoreError> {
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

/// How long one blocking read waits before the watched set is read again (a stream
/// watched since it began is included by the next read).
const BLOCK: Duration = Duration::from_millis(100);

/// One process's reader of the event streams someone waits on: a dedicated connection
/// that runs `XREAD BLOCK` over all of them and wakes the waiters of a stream when an
/// entry after theirs appears.
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
    /// Woken when the watched set gains a stream.
    changed: Notify,
}

#[derive(Default)]
struct TailState {
    /// Waiters per stream key: (id, last entry seen, wake-up).
    waiters: HashMap<String, Vec<(u64, EntryId, oneshot::Sender<()>)>>,
    next_id: u64,
    running: bool,
}

/// Removes a waiter that stopped waiting (timed out, or its client left).
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

    /// Waits until stream `key` has an entry after `after` (`None`: any entry), or
    /// `timeout` passes.
    pub(crate) async fn wait(&self, key: String, after: Option<EntryId>, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            state.next_id += 1;
            let id = state.next_id;
            state
                .waiters
                .entry(key.clone())
                .or_default()
                .push((id, after.unwrap_or_default(), tx));
            if !state.running {
                state.running = true;
                tokio::spawn(run(Arc::downgrade(&self.inner)));
            }
            id
        };
        let _registered = Registration {
            inner: &self.inner,
            key,
            id,
        };
        self.inner.changed.notify_one();
        let _ = tokio::time::timeout(timeout, rx).await;
    }
}

/// The reading loop: runs while the store exists, reconnecting after errors.
async fn run(inner: Weak<Inner>) {
    let mut conn = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let watched: Vec<(String, EntryId)> = {
            let state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            state
                .waiters
                .iter()
                .filter_map(|(k, list)| list.iter().map(|w| w.1).min().map(|c| (k.clone(), c)))
                .collect()
        };
        if watched.is_empty() {
            // Idle: wait for a watcher, but let go of the store meanwhile now and then.
            let _ = tokio::time::timeout(Duration::from_secs(5), inner.changed.notified()).await;
            continue;
        }
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
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(u64::try_from(BLOCK.as_millis()).unwrap_or(100))
            .arg("STREAMS");
        for (k, _) in &watched {
            cmd.arg(k);
        }
        for (_, c) in &watched {
            cmd.arg(c.to_string());
        }
        let reply: Result<Value, redis::RedisError> = cmd.query_async(c).await;
        match reply {
            Ok(value) => {
                backoff = Duration::from_millis(100);
                wake(&inner, value);
            }
            Err(e) => {
                tracing::debug!(error = %common::redis::describe(&e), "event tail read failed");
                conn = None;
                // Waiters fall back to their own timeouts meanwhile.
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
            tracing::debug!(error = %common::redis::describe(&e), "event tail cannot connect");
            None
        }
    }
}

/// Wakes the waiters of every stream in an `XREAD` reply whose entry is after theirs.
fn wake(inner: &Inner, value: Value) {
    // Nil: the block timed out. Else [[key, [[id, fields]…]]…] (RESP2) or a map (RESP3).
    let streams: Vec<(String, Value)> = match value {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let entries = kv.pop()?;
                    let key: String = redis::from_redis_value(kv.pop()?).ok()?;
                    Some((key, entries))
                }
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs
            .into_iter()
            .filter_map(|(k, v)| Some((redis::from_redis_value(k).ok()?, v)))
            .collect(),
        _ => return,
    };
    let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    for (key, entries) in streams {
        let Ok(list) = entries_ids(entries) else {
            continue;
        };
        let Some(newest) = list.into_iter().max() else {
            continue;
        };
        if let Some(waiters) = state.waiters.get_mut(&key) {
            let mut kept = Vec::with_capacity(waiters.len());
            for (id, seen, tx) in waiters.drain(..) {
                if newest > seen {
                    let _ = tx.send(());
                } else {
                    kept.push((id, seen, tx));
                }
            }
            *waiters = kept;
        }
    }
}

fn entries_ids(value: Value) -> Result<Vec<EntryId>, StoreError> {
    Ok(entries(value)?.into_iter().map(|(id, _)| id).collect())
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

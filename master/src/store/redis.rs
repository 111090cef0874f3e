//! The Redis task store: every transition is one Lua script (one round trip), atomic and
//! safe with several master replicas racing. The data's layout is in `schema.rs`, each
//! script's arguments in its header, and what comes back is decoded in `reply.rs`.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use common::redis::RedisPool;
use common::wire::{Capability, ReportStatus, ResultReport, StepError, StepRef, TaskId, WorkerId};
use redis::Value;

use super::events::{self, EventCursor, Tailer};
use super::reply::{self, Reply, corrupt};
use super::schema::{self, at_step, keys, step_field, task_field};
use super::search;
use super::{
    CALLBACK_ABANDONED, CallbackClaim, CallbackResult, CancelOutcome, Claimed, ExpiredLease,
    MAX_FREE_DISPATCH_FAILURES, NewTask, QueueStats, RateLimit, RedriveOutcome, ReleaseOutcome,
    ReleaseReason, ReportOutcome, RetryPolicy, StoreError, SubmitOutcome, TaskRecord, TaskStore,
    lost_on_worker,
};
use super::{FiredTimer, PlannedKind, ProgressOutcome, SignalOutcome};

/// The helpers every script starts with: the names generated from `schema.rs`, then
/// `lua/lib.lua` (guarded names, for scripts run alone by `EVAL` in tests).
#[cfg(test)]
static PRELUDE: LazyLock<String> =
    LazyLock::new(|| schema::lua_prelude(true) + include_str!("lua/lib.lua"));

/// A script's source: the prelude, then the script (run alone with `EVAL`, by tests).
#[cfg(test)]
pub(super) fn source(script: &str) -> String {
    format!("{}{script}", *PRELUDE)
}

/// A script that moves a task through its graph: the prelude, `lua/graph.lua`, then the
/// script (loaded alone, by tests).
#[cfg(test)]
pub(super) fn graph_source(script: &str) -> String {
    format!("{}{}{script}", *PRELUDE, include_str!("lua/graph.lua"))
}

/// Every script, by file: (file, its source). The store runs them as the functions of one
/// Redis library ([`LIBRARY`]).
const SCRIPTS: [(&str, &str); 16] = [
    ("submit.lua", include_str!("lua/submit.lua")),
    ("claim.lua", include_str!("lua/claim.lua")),
    ("release.lua", include_str!("lua/release.lua")),
    ("report.lua", include_str!("lua/report.lua")),
    ("expired.lua", include_str!("lua/expired.lua")),
    ("extend.lua", include_str!("lua/extend.lua")),
    ("promote.lua", include_str!("lua/promote.lua")),
    ("cancel.lua", include_str!("lua/cancel.lua")),
    ("redrive.lua", include_str!("lua/redrive.lua")),
    ("signal.lua", include_str!("lua/signal.lua")),
    ("timers.lua", include_str!("lua/timers.lua")),
    ("progress.lua", include_str!("lua/progress.lua")),
    ("watch.lua", include_str!("lua/watch.lua")),
    ("stats.lua", include_str!("lua/stats.lua")),
    ("callback_claim.lua", include_str!("lua/callback_claim.lua")),
    (
        "callback_finish.lua",
        include_str!("lua/callback_finish.lua"),
    ),
];

/// The scripts as one Redis Functions library (Redis 7): the prelude, `lua/graph.lua` and
/// the helpers run once, when the library is loaded, and each script is a function of it.
/// Run with `EVALSHA`, every call ran the prelude again (building the name tables and the
/// graph's closures: about 10 µs of Redis time per call for the graph alone, measured with
/// redis-benchmark). The name carries a hash of the source, so masters of different
/// versions each find their own functions in one Redis.
struct Library {
    /// `#!lua name=…` and the code.
    code: String,
    /// The library's name, `ensemble_<hash>`.
    name: String,
}

static LIBRARY: LazyLock<Library> = LazyLock::new(|| {
    let mut body = format!(
        "{}{}{}",
        schema::lua_prelude(false),
        include_str!("lua/lib.lua"),
        include_str!("lua/graph.lua")
    );
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&body, &mut hasher);
    for (_, script) in SCRIPTS {
        std::hash::Hash::hash(script, &mut hasher);
    }
    std::hash::Hash::hash(MANY, &mut hasher);
    let hash = format!("{:016x}", std::hash::Hasher::finish(&hasher));
    for (file, script) in SCRIPTS {
        let function = function_name(&hash, file);
        if BATCHED.contains(&file) {
            // The body once, as a local function; the script and its batch form call it.
            body += &format!(
                "local {ONE} = function(KEYS, ARGV)\n{script}\nend\n\
                 redis.register_function('{function}', function(KEYS, ARGV)\n{CALL_BEGINS}\
                 return {ONE}(KEYS, ARGV)\nend)\n\
                 redis.register_function('{function}_many', function(KEYS, ARGV)\n{CALL_BEGINS}\
                 local one = {ONE}\n{MANY}\nend)\n",
            );
        } else {
            body += &format!(
                "redis.register_function('{function}', function(KEYS, ARGV)\n{CALL_BEGINS}{script}\nend)\n",
            );
        }
    }
    let name = format!("ensemble_{hash}");
    Library {
        code: format!("#!lua name={name}\n{body}"),
        name,
    }
});

/// Scripts that also have a batch form, the function `…_many` ([`Lua::many`]).
const BATCHED: [&str; 1] = ["report.lua"];

/// The name of a batched script's body in the library (each is defined, and used, right
/// before the next one is).
const ONE: &str = "ens_one";

/// The body of a script's batch form, `one` being the script as a function: `KEYS` are
/// the `n` calls' keys then an optional shared one (the operators' stream);
/// `ARGV` is `prefix, n, width` then `width` arguments per call, each call getting
/// `prefix` and its own. Returns the `n` replies, in order.
const MANY: &str = r#"local n, width = tonumber(ARGV[2]), tonumber(ARGV[3])
local shared = KEYS[n + 1]
local replies = {}
for i = 1, n do
  local args = {ARGV[1]}
  local base = 3 + (i - 1) * width
  for j = 1, width do args[j + 1] = ARGV[base + j] end
  replies[i] = one({KEYS[i], shared}, args)
end
return replies"#;

/// The first line of every script's body: takes the call's time off `ARGV` (lib.lua's
/// `call_begins`; [`Call`] adds it last).
const CALL_BEGINS: &str = "call_begins(ARGV)\n";

/// The source of script `file` (empty for a name that is not one).
fn source_of(file: &str) -> &'static str {
    SCRIPTS
        .iter()
        .find(|(f, _)| *f == file)
        .map_or("", |(_, source)| source)
}

/// The library function that runs `file`.
fn function_name(hash: &str, file: &str) -> String {
    format!("ens_{hash}_{}", file.trim_end_matches(".lua"))
}

/// A script of the library, with its file name for error messages.
struct Lua {
    /// Names the script when its reply does not decode.
    file: &'static str,
    /// Its function in the library.
    function: String,
    /// The same script on its own (prelude, graph.lua, script), run with `EVALSHA` by a
    /// Redis older than 7.0, which has no Functions.
    script: redis::Script,
}

impl Lua {
    fn new(file: &'static str) -> Self {
        let hash = LIBRARY.name.trim_start_matches("ensemble_");
        let source = source_of(file);
        Self {
            file,
            function: function_name(hash, file),
            script: redis::Script::new(&format!(
                "{}{}{}{CALL_BEGINS}{source}",
                schema::lua_prelude(true),
                include_str!("lua/lib.lua"),
                include_str!("lua/graph.lua")
            )),
        }
    }

    /// The batch form of a script of [`BATCHED`] (see [`MANY`]).
    fn many(file: &'static str) -> Self {
        let hash = LIBRARY.name.trim_start_matches("ensemble_");
        let source = source_of(file);
        Self {
            file,
            function: format!("{}_many", function_name(hash, file)),
            script: redis::Script::new(&format!(
                "{}{}{}local {ONE} = function(KEYS, ARGV)\n{source}\nend\n\
                 {CALL_BEGINS}local one = {ONE}\n{MANY}",
                schema::lua_prelude(true),
                include_str!("lua/lib.lua"),
                include_str!("lua/graph.lua")
            )),
        }
    }

    /// A call of the script on a store's Redis, to which keys and arguments are added.
    fn call<'a>(&'a self, store: &'a RedisStore) -> Call<'a> {
        Call {
            lua: self,
            no_functions: &store.no_functions,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// `FCALL function numkeys keys… args…`, loading the library first when this Redis does
/// not have it (a new server, a flushed one, or one that failed over to a server that never
/// had it).
struct Call<'a> {
    lua: &'a Lua,
    /// Set once the store's Redis turned out to have no Functions.
    no_functions: &'a std::sync::atomic::AtomicBool,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Call<'_> {
    /// Adds the operators' event stream as the last key while it records (see
    /// [`RedisStore::firehose_on`]): the script writes its events there too.
    fn firehose(&mut self, store: &RedisStore) -> &mut Self {
        if store.firehose_on() {
            self.key(keys::firehose(store.prefix()));
        }
        self
    }

    fn key(&mut self, key: impl redis::ToRedisArgs) -> &mut Self {
        self.keys.extend(key.to_redis_args());
        self
    }

    fn arg(&mut self, arg: impl redis::ToRedisArgs) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    /// The `FCALL` of this call at time `now`.
    fn fcall(&self, now: u64) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(&self.lua.function).arg(self.keys.len());
        for key in &self.keys {
            cmd.arg(key);
        }
        for arg in &self.args {
            cmd.arg(arg);
        }
        cmd.arg(now);
        cmd
    }

    async fn invoke_async<T: redis::FromRedisValue>(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<T> {
        use std::sync::atomic::Ordering;
        // The call's time, last (lib.lua: `call_begins`).
        let now = common::wire::now_ms();
        if self.no_functions.load(Ordering::Relaxed) {
            return self.eval(conn, now).await;
        }
        match self.fcall(now).query_async(conn).await {
            Err(e) if function_missing(&e) => {
                load_library(conn).await?;
                self.fcall(now).query_async(conn).await
            }
            Err(e) if no_functions(&e) => {
                self.note_no_functions();
                self.eval(conn, now).await
            }
            other => other,
        }
    }

    /// Remembers that this Redis has no Functions, saying so once.
    fn note_no_functions(&self) {
        if !self
            .no_functions
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "this Redis has no Functions (it is older than 7.0): the store's scripts \
                 run with EVALSHA, which costs more Redis time per transition"
            );
        }
    }

    /// Runs `calls` in order in one pipeline (one round trip; each call atomic on its own),
    /// and answers each call's reply or error. The outer error is the connection's. Calls
    /// that found no library (a flushed or failed-over Redis) run again, in order, once it
    /// is loaded; on a Redis without Functions they run one by one with `EVALSHA`.
    async fn invoke_pipelined(
        calls: &[&Call<'_>],
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<Vec<redis::RedisResult<Value>>> {
        use std::sync::atomic::Ordering;
        let Some(first) = calls.first() else {
            return Ok(Vec::new());
        };
        let now = common::wire::now_ms();
        let mut replies: Vec<redis::RedisResult<Value>> =
            if first.no_functions.load(Ordering::Relaxed) {
                calls.iter().map(|_| Err(unknown_command())).collect()
            } else {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for call in calls {
                    pipe.add_command(call.fcall(now));
                }
                pipe.query_async(conn).await?
            };
        if replies
            .iter()
            .any(|r| r.as_ref().is_err_and(function_missing))
        {
            load_library(conn).await?;
            let again: Vec<usize> = (0..calls.len())
                .filter(|&i| replies[i].as_ref().is_err_and(function_missing))
                .collect();
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in &again {
                pipe.add_command(calls[i].fcall(now));
            }
            let retried: Vec<redis::RedisResult<Value>> = pipe.query_async(conn).await?;
            for (i, reply) in again.into_iter().zip(retried) {
                replies[i] = reply;
            }
        }
        for (call, reply) in calls.iter().zip(replies.iter_mut()) {
            if reply.as_ref().is_err_and(no_functions) {
                call.note_no_functions();
                *reply = call.eval(conn, now).await;
            }
        }
        Ok(replies)
    }

    /// The script run on its own, for a Redis without Functions.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        now: u64,
    ) -> redis::RedisResult<T> {
        let mut invocation = self.lua.script.prepare_invoke();
        for key in &self.keys {
            invocation.key(key);
        }
        for arg in &self.args {
            invocation.arg(arg);
        }
        invocation.arg(now);
        invocation.invoke_async(conn).await
    }
}

/// Whether `FCALL` found no library function (the library is not loaded).
fn function_missing(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

/// Whether `FCALL` is unknown: a Redis older than 7.0, without Functions.
fn no_functions(e: &redis::RedisError) -> bool {
    e.to_string()
        .to_ascii_lowercase()
        .contains("unknown command")
}

/// The error [`no_functions`] recognises, for calls known to need `EVALSHA`.
fn unknown_command() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Client,
        "unknown command",
        "FCALL: this Redis has no Functions".to_string(),
    ))
}

/// Loads the library (a replica or another master may have loaded it meanwhile: fine).
async fn load_library(conn: &mut impl redis::aio::ConnectionLike) -> redis::RedisResult<()> {
    let loaded: redis::RedisResult<String> = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(&LIBRARY.code)
        .query_async(conn)
        .await;
    match loaded {
        Err(e) if !e.to_string().contains("already exists") => Err(e),
        _ => Ok(()),
    }
}

macro_rules! script {
    ($name:ident, $file:literal) => {
        static $name: LazyLock<Lua> = LazyLock::new(|| Lua::new($file));
    };
}

script!(SUBMIT, "submit.lua");
script!(CLAIM, "claim.lua");
script!(RELEASE, "release.lua");
script!(REPORT, "report.lua");
static REPORT_MANY: LazyLock<Lua> = LazyLock::new(|| Lua::many("report.lua"));
script!(EXPIRED, "expired.lua");
script!(EXTEND, "extend.lua");
script!(PROMOTE, "promote.lua");
script!(CANCEL, "cancel.lua");
script!(REDRIVE, "redrive.lua");
script!(SIGNAL, "signal.lua");
script!(TIMERS, "timers.lua");
script!(PROGRESS, "progress.lua");
script!(WATCH, "watch.lua");
script!(STATS, "stats.lua");
script!(CALLBACK_CLAIM, "callback_claim.lua");
script!(CALLBACK_FINISH, "callback_finish.lua");

/// How many arguments of report.lua follow the prefix.
const REPORT_ARGS: usize = 12;

/// Adds report.lua's arguments after the prefix (ARGV[2] to ARGV[13]) to `call`.
fn add_report_args(
    call: &mut Call<'_>,
    report: &ResultReport,
    retry: RetryPolicy,
    jitter: f64,
    retention: Duration,
) -> Result<(), StoreError> {
    let (status, payload, retryable) = match report.status {
        ReportStatus::Succeeded => (
            "succeeded",
            serde_json::to_string(report.output.as_ref().unwrap_or(&serde_json::Value::Null)),
            false,
        ),
        ReportStatus::Failed => {
            let error = report.error.clone().unwrap_or_else(|| {
                StepError::permanent("agent", "the worker reported a failure without error")
            });
            ("failed", serde_json::to_string(&error), error.retryable)
        }
    };
    let flag = |on: bool| if on { "1" } else { "0" };
    call.arg(report.task_id.as_str())
        .arg(report.step)
        .arg(report.attempt)
        .arg(status)
        .arg(payload.map_err(corrupt)?)
        .arg(flag(retryable))
        .arg(ms(retry.base))
        .arg(ms(retry.max))
        .arg(jitter.clamp(0.0, 1.0))
        .arg(ms(retention))
        .arg(report.worker_id.as_str())
        .arg(flag(lost_on_worker(report)));
    Ok(())
}

/// The Redis-backed [`TaskStore`].
#[derive(Clone, Debug)]
pub struct RedisStore {
    pool: RedisPool,
    /// Its Redis has no Functions (older than 7.0): the scripts run with `EVALSHA`.
    no_functions: Arc<std::sync::atomic::AtomicBool>,
    /// Wakes readers of event streams ([`Self::with_event_tail`]); without it they poll.
    tail: Option<Arc<Tailer>>,
    /// Whether the operators' stream records ([`Self::firehose_on`]).
    firehose: Arc<FirehoseWatch>,
    /// Where this process's next sweep of the task index starts (see
    /// [`TaskStore::sweep_task_index`]); `None`: from the oldest member.
    sweep_from: Arc<std::sync::Mutex<Option<String>>>,
}

/// Whether some master serves the operators' stream (`keys::firehose_watched` exists), as
/// this process last read it.
#[derive(Debug, Default)]
struct FirehoseWatch {
    /// It does.
    on: std::sync::atomic::AtomicBool,
    /// When it was last read (ms since the epoch).
    read_at: std::sync::atomic::AtomicU64,
    /// A read is under way.
    reading: std::sync::atomic::AtomicBool,
    /// When this process last marked it watched.
    marked_at: std::sync::atomic::AtomicU64,
}

/// How often a process reads whether the operators' stream is followed.
const FIREHOSE_READ_MS: u64 = 1_000;

/// How often a reader of events looks again when no tail reader wakes it.
const EVENT_POLL: Duration = Duration::from_millis(200);

impl RedisStore {
    /// A store on a pool; keys go under the pool's prefix.
    pub fn new(pool: RedisPool) -> Self {
        Self {
            pool,
            no_functions: Arc::default(),
            tail: None,
            firehose: Arc::default(),
            sweep_from: Arc::default(),
        }
    }

    /// Whether transitions should add to the operators' stream: only while a master serves
    /// it (`GET /events`), so a system nobody watches that way pays nothing for it. Read
    /// from Redis at most once a second, in the background; a master serving the stream
    /// knows at once.
    fn firehose_on(&self) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Relaxed, Release};
        let watch = &self.firehose;
        let now = common::wire::now_ms();
        if now.saturating_sub(watch.read_at.load(Relaxed)) >= FIREHOSE_READ_MS
            && !watch.reading.swap(true, AcqRel)
        {
            watch.read_at.store(now, Relaxed);
            let (pool, watch) = (self.pool.clone(), self.firehose.clone());
            let key = keys::firehose_watched(self.prefix());
            tokio::spawn(async move {
                if let Ok(mut conn) = pool.get().await {
                    let on: Result<bool, _> =
                        redis::cmd("EXISTS").arg(key).query_async(&mut conn).await;
                    if let Ok(on) = on {
                        watch.on.store(on, Relaxed);
                    }
                }
                watch.reading.store(false, Release);
            });
        }
        watch.on.load(Relaxed)
    }

    /// A reader of the operators' stream is here: marks it followed (for a minute, renewed
    /// every 20 s) so that every master's transitions add to it.
    async fn follow_firehose(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = common::wire::now_ms();
        let renew = u64::try_from(events::WATCH_RENEW.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(self.firehose.marked_at.load(Relaxed)) < renew {
            return Ok(());
        }
        let mut conn = self.pool.get().await?;
        let () = redis::cmd("SET")
            .arg(keys::firehose_watched(self.prefix()))
            .arg(1)
            .arg("PX")
            .arg(ms(events::WATCH_FOR))
            .query_async(&mut conn)
            .await?;
        self.firehose.marked_at.store(now, Relaxed);
        self.firehose.on.store(true, Relaxed);
        Ok(())
    }

    /// Readers of event streams are woken by one blocking `XREAD` over all of them, on a
    /// connection of its own made with `settings` (the pool's), instead of polling.
    #[must_use]
    pub fn with_event_tail(mut self, settings: common::redis::RedisSettings) -> Self {
        self.tail = Some(Arc::new(Tailer::new(settings)));
        self
    }

    fn prefix(&self) -> &str {
        self.pool.prefix()
    }

    /// Events of the operators' stream after `after`, at most `limit` entries.
    async fn read_firehose(
        &self,
        after: Option<&EventCursor>,
        limit: usize,
    ) -> Result<Vec<common::wire::TaskEvent>, StoreError> {
        let mut conn = self.pool.get().await?;
        let value: Value = redis::cmd("XRANGE")
            .arg(keys::firehose(self.prefix()))
            .arg(events::range_start(after))
            .arg("+")
            .arg("COUNT")
            .arg(events::range_count(after, limit))
            .query_async(&mut conn)
            .await?;
        let mut out = Vec::new();
        for (entry, fields) in events::entries(value)? {
            let id = TaskId::new(fields.get(keys::FIREHOSE_TASK).map_or("", String::as_str))
                .map_err(|e| corrupt(format!("operators' event entry {entry}: {e}")))?;
            let list = fields
                .get(keys::FIREHOSE_EVENTS)
                .ok_or_else(|| corrupt(format!("event entry {entry} has no events")))?;
            out.extend(events::expand(&id, entry, list, after)?);
        }
        Ok(out)
    }

    /// How many event entries task `id` has made (0 for none, or no such task).
    async fn event_count(&self, id: &TaskId) -> Result<u64, StoreError> {
        let mut conn = self.pool.get().await?;
        let count: Option<u64> = redis::cmd("HGET")
            .arg(keys::task(self.prefix(), id.as_str()))
            .arg(task_field::EVENT_COUNT)
            .query_async(&mut conn)
            .await?;
        Ok(count.unwrap_or(0))
    }
}

/// One stored entry of a task's events: `<ms> <JSON array>`.
fn task_entry(n: u64, text: &str) -> Result<(events::EntryId, &str), StoreError> {
    let (ms, list) = text
        .split_once(' ')
        .ok_or_else(|| corrupt(format!("event entry {n} is not `<ms> <events>`")))?;
    let ms = ms
        .parse()
        .map_err(|_| corrupt(format!("event entry {n} has no time")))?;
    Ok((events::EntryId { ms, seq: n }, list))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisStore {
    /// The submit script's call for `task` (keys and arguments; the time is added when it
    /// runs).
    fn submit_call(
        &self,
        task: &NewTask,
        limit: RateLimit,
        retention: Duration,
    ) -> Result<Call<'_>, StoreError> {
        let p = self.prefix();
        let id = task.id.as_str();
        if task.steps.is_empty() {
            return Err(corrupt("a task needs at least one step"));
        }
        let graph = submit_fields(task);
        let idem = task.idempotency_key.as_deref();
        let mut invocation = SUBMIT.call(self);
        invocation
            .key(keys::task(p, id))
            .key(keys::idempotency(p, &task.client, idem.unwrap_or("-")))
            .key(keys::rate(p, &task.client))
            .key(keys::capabilities(p))
            .firehose(self)
            .arg(p)
            .arg(id)
            .arg(if limit.per_sec > 0.0 {
                limit.per_sec
            } else {
                0.0
            })
            .arg(limit.burst.max(1))
            .arg(ms(retention))
            .arg(if idem.is_some() { "1" } else { "0" })
            .arg(task.priority);
        // Inline steps may name capabilities no pipeline lists; remember them so every
        // replica watches their queues.
        if task.pipeline.is_none() {
            invocation.arg(graph.capabilities.len());
            for cap in &graph.capabilities {
                invocation.arg(cap.as_str());
            }
        } else {
            invocation.arg(0);
        }
        invocation.arg(graph.roots.len());
        for root in &graph.roots {
            invocation.arg(*root);
        }
        for (field, value) in &graph.fields {
            invocation.arg(field).arg(value);
        }
        Ok(invocation)
    }
}

#[async_trait]
impl TaskStore for RedisStore {
    async fn submit(
        &self,
        task: NewTask,
        limit: RateLimit,
        retention: Duration,
    ) -> Result<SubmitOutcome, StoreError> {
        let invocation = self.submit_call(&task, limit, retention)?;
        let mut conn = self.pool.get().await?;
        let value: Value = invocation.invoke_async(&mut conn).await?;
        Reply::parse(SUBMIT.file, value)?.submit()
    }

    async fn submit_many(
        &self,
        tasks: Vec<NewTask>,
        limit: RateLimit,
        retention: Duration,
    ) -> Result<Vec<Result<SubmitOutcome, StoreError>>, StoreError> {
        let calls: Vec<Result<Call<'_>, StoreError>> = tasks
            .iter()
            .map(|task| self.submit_call(task, limit, retention))
            .collect();
        let ready: Vec<&Call<'_>> = calls.iter().filter_map(|c| c.as_ref().ok()).collect();
        let mut replies = if ready.is_empty() {
            Vec::new()
        } else {
            let mut conn = self.pool.get().await?;
            Call::invoke_pipelined(&ready, &mut conn).await?
        }
        .into_iter();
        Ok(calls
            .into_iter()
            .map(|call| {
                call?;
                let reply = replies
                    .next()
                    .ok_or_else(|| corrupt("the pipeline answered fewer calls than it had"))?;
                Reply::parse(SUBMIT.file, reply?)?.submit()
            })
            .collect())
    }

    fn keeps_ledger(&self) -> bool {
        true
    }

    async fn usage(&self, id: &TaskId) -> Result<common::usage::TaskUsage, StoreError> {
        let mut conn = self.pool.get().await?;
        let fields: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(keys::usage(self.prefix(), id.as_str()))
            .query_async(&mut conn)
            .await?;
        Ok(common::usage::TaskUsage::from_fields(
            fields.iter().map(|(f, v)| (f.as_str(), v.as_str())),
        ))
    }

    async fn get(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let mut conn = self.pool.get().await?;
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys::task(self.prefix(), id.as_str()))
            .query_async(&mut conn)
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        reply::record(id, &fields).map(Some)
    }

    async fn claim(
        &self,
        capability: &Capability,
        workers: &[WorkerId],
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        if workers.is_empty() {
            return Ok(Vec::new());
        }
        let p = self.prefix();
        let mut invocation = CLAIM.call(self);
        invocation
            .key(keys::queue(p, capability.as_str()))
            .key(keys::leases(p, capability.as_str()))
            .key(keys::worker_load(p))
            .firehose(self)
            .arg(p)
            .arg(ms(lease));
        for w in workers {
            invocation.arg(w.as_str());
        }
        let mut conn = self.pool.get().await?;
        let value: Value = invocation.invoke_async(&mut conn).await?;
        Reply::rows(CLAIM.file, value)?
            .iter()
            .map(|row| row.claimed(capability))
            .collect()
    }

    async fn release(
        &self,
        step: &StepRef,
        why: ReleaseReason,
    ) -> Result<ReleaseOutcome, StoreError> {
        let p = self.prefix();
        let mut conn = self.pool.get().await?;
        let value: Value = RELEASE
            .call(self)
            .key(keys::task(p, step.task_id.as_str()))
            .firehose(self)
            .arg(p)
            .arg(step.task_id.as_str())
            .arg(step.step)
            .arg(step.attempt)
            .arg(match why {
                ReleaseReason::Capacity => "capacity",
                ReleaseReason::Failure => "failure",
            })
            .arg(MAX_FREE_DISPATCH_FAILURES)
            .invoke_async(&mut conn)
            .await?;
        Reply::parse(RELEASE.file, value)?.release()
    }

    async fn report(
        &self,
        report: &ResultReport,
        retry: RetryPolicy,
        jitter: f64,
        retention: Duration,
    ) -> Result<ReportOutcome, StoreError> {
        let p = self.prefix();
        let mut call = REPORT.call(self);
        call.key(keys::task(p, report.task_id.as_str()))
            .firehose(self)
            .arg(p);
        add_report_args(&mut call, report, retry, jitter, retention)?;
        let mut conn = self.pool.get().await?;
        let value: Value = call.invoke_async(&mut conn).await?;
        Reply::parse(REPORT.file, value)?.report()
    }

    async fn report_many(
        &self,
        reports: &[ResultReport],
        retry: RetryPolicy,
        retention: Duration,
    ) -> Result<Vec<ReportOutcome>, StoreError> {
        if reports.is_empty() {
            return Ok(Vec::new());
        }
        let p = self.prefix();
        let mut call = REPORT_MANY.call(self);
        for report in reports {
            call.key(keys::task(p, report.task_id.as_str()));
        }
        call.firehose(self)
            .arg(p)
            .arg(reports.len())
            .arg(REPORT_ARGS);
        for report in reports {
            add_report_args(&mut call, report, retry, rand::random(), retention)?;
        }
        let mut conn = self.pool.get().await?;
        let value: Value = call.invoke_async(&mut conn).await?;
        let replies = match value {
            Value::Array(replies) if replies.len() == reports.len() => replies,
            other => {
                return Err(corrupt(format!(
                    "{} (batch of {}) answered {other:?}",
                    REPORT_MANY.file,
                    reports.len()
                )));
            }
        };
        replies
            .into_iter()
            .map(|reply| Reply::parse(REPORT_MANY.file, reply)?.report())
            .collect()
    }

    async fn expired_leases(
        &self,
        capability: &Capability,
        limit: usize,
    ) -> Result<Vec<ExpiredLease>, StoreError> {
        let p = self.prefix();
        let mut conn = self.pool.get().await?;
        let value: Value = EXPIRED
            .call(self)
            .key(keys::leases(p, capability.as_str()))
            .arg(p)
            .arg(limit.max(1))
            .invoke_async(&mut conn)
            .await?;
        Reply::rows(EXPIRED.file, value)?
            .iter()
            .map(Reply::expired)
            .collect()
    }

    async fn extend_leases(
        &self,
        capability: &Capability,
        leases: &[(StepRef, u64)],
    ) -> Result<(), StoreError> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut invocation = EXTEND.call(self);
        invocation.key(keys::leases(self.prefix(), capability.as_str()));
        for (s, until) in leases {
            invocation
                .arg(*until)
                .arg(keys::member(s.task_id.as_str(), s.step));
        }
        let mut conn = self.pool.get().await?;
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn promote_due(&self, capability: &Capability) -> Result<usize, StoreError> {
        let p = self.prefix();
        let mut conn = self.pool.get().await?;
        let moved: usize = PROMOTE
            .call(self)
            .key(keys::delayed(p, capability.as_str()))
            .key(keys::queue(p, capability.as_str()))
            .arg(p)
            .arg(1000)
            .invoke_async(&mut conn)
            .await?;
        Ok(moved)
    }

    async fn claim_callbacks(
        &self,
        limit: usize,
        visibility: Duration,
        max_attempts: u32,
    ) -> Result<Vec<CallbackClaim>, StoreError> {
        let p = self.prefix();
        let mut conn = self.pool.get().await?;
        let value: Value = CALLBACK_CLAIM
            .call(self)
            .key(keys::callbacks(p))
            .arg(p)
            .arg(limit.max(1))
            .arg(ms(visibility))
            .arg(max_attempts.max(1))
            .arg(CALLBACK_ABANDONED)
            .invoke_async(&mut conn)
            .await?;
        Reply::rows(CALLBACK_CLAIM.file, value)?
            .iter()
            .map(Reply::callback_claim)
            .collect()
    }

    async fn finish_callback(
        &self,
        id: &TaskId,
        attempt: u32,
        result: &CallbackResult,
    ) -> Result<bool, StoreError> {
        let p = self.prefix();
        let (outcome, error, delay) = match result {
            CallbackResult::Delivered => ("delivered", "", 0),
            CallbackResult::Retry { error, delay } => ("retry", error.as_str(), ms(*delay)),
            CallbackResult::Failed { error } => ("failed", error.as_str(), 0),
        };
        let mut conn = self.pool.get().await?;
        let value: Value = CALLBACK_FINISH
            .call(self)
            .key(keys::task(p, id.as_str()))
            .key(keys::callbacks(p))
            .arg(id.as_str())
            .arg(attempt)
            .arg(outcome)
            .arg(error)
            .arg(delay)
            .invoke_async(&mut conn)
            .await?;
        Reply::parse(CALLBACK_FINISH.file, value)?.recorded()
    }

    async fn callbacks_pending(&self) -> Result<u64, StoreError> {
        let mut conn = self.pool.get().await?;
        let n: u64 = redis::cmd("ZCARD")
            .arg(keys::callbacks(self.prefix()))
            .query_async(&mut conn)
            .await?;
        Ok(n)
    }

    async fn cancel(&self, id: &TaskId, retention: Duration) -> Result<CancelOutcome, StoreError> {
        let p = self.prefix();
        let error = serde_json::to_string(&StepError::permanent("cancelled", "task cancelled"))
            .map_err(corrupt)?;
        let mut conn = self.pool.get().await?;
        let value: Value = CANCEL
            .call(self)
            .key(keys::task(p, id.as_str()))
            .firehose(self)
            .arg(p)
            .arg(id.as_str())
            .arg(ms(retention))
            .arg(error)
            .invoke_async(&mut conn)
            .await?;
        Reply::parse(CANCEL.file, value)?.cancel()
    }

    async fn redrive(
        &self,
        id: &TaskId,
        retention: Duration,
    ) -> Result<RedriveOutcome, StoreError> {
        let p = self.prefix();
        let mut conn = self.pool.get().await?;
        let value: Value = REDRIVE
            .call(self)
            .key(keys::task(p, id.as_str()))
            .firehose(self)
            .arg(p)
            .arg(id.as_str())
            .arg(ms(retention))
            .invoke_async(&mut conn)
            .await?;
        Reply::parse(REDRIVE.file, value)?.redrive()
    }

    async fn signal(
        &self,
        id: &TaskId,
        name: &str,
        payload: &str,
        retention: Duration,
    ) -> Result<SignalOutcome, StoreError> {
        let p = self.prefix();
        let mut conn = self.pool.get().await?;
        let value: Value = SIGNAL
            .call(self)
            .key(keys::task(p, id.as_str()))
            .firehose(self)
            .arg(p)
            .arg(id.as_str())
            .arg(name)
            .arg(payload)
            .arg(ms(retention))
            .invoke_async(&mut conn)
            .await?;
        Reply::parse(SIGNAL.file, value)?.signal()
    }

    async fn fire_timers(
        &self,
        limit: usize,
        retention: Duration,
    ) -> Result<Vec<FiredTimer>, StoreError> {
        let p = self.prefix();
        let mut conn = self.pool.get().await?;
        let value: Value = TIMERS
            .call(self)
            .key(keys::timers(p))
            .firehose(self)
            .arg(p)
            .arg(limit.max(1))
            .arg(ms(retention))
            .invoke_async(&mut conn)
            .await?;
        Reply::rows(TIMERS.file, value)?
            .iter()
            .map(Reply::fired_timer)
            .collect()
    }

    async fn dead_letters(
        &self,
        capability: &Capability,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        let mut conn = self.pool.get().await?;
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys::dead(self.prefix(), capability.as_str()))
            .arg(0)
            .arg(limit.max(1) as i64 - 1)
            .query_async(&mut conn)
            .await?;
        ids.into_iter()
            .map(|id| TaskId::new(id).map_err(corrupt))
            .collect()
    }

    async fn dead_letter_page(
        &self,
        capabilities: &[Capability],
        after: Option<&search::DeadLetterCursor>,
        limit: usize,
    ) -> Result<search::DeadLetterPage, StoreError> {
        search::dead_letters(self, capabilities, after, limit).await
    }

    async fn purge_dead_letters(
        &self,
        capability: &Capability,
        task: Option<&TaskId>,
    ) -> Result<u64, StoreError> {
        let key = keys::dead(self.prefix(), capability.as_str());
        let mut conn = self.pool.get().await?;
        let removed: u64 = match task {
            Some(id) => {
                redis::cmd("ZREM")
                    .arg(key)
                    .arg(id.as_str())
                    .query_async(&mut conn)
                    .await?
            }
            None => {
                redis::cmd("ZREMRANGEBYRANK")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await?
            }
        };
        Ok(removed)
    }

    async fn search_tasks(
        &self,
        query: &search::TaskQuery,
    ) -> Result<search::TaskPage, StoreError> {
        search::search(self, query).await
    }

    async fn sweep_task_index(
        &self,
        retention: Duration,
        budget: usize,
    ) -> Result<usize, StoreError> {
        let from = self
            .sweep_from
            .lock()
            .map_err(|_| StoreError::Backend("sweep position lock poisoned".into()))?
            .clone();
        let cutoff = common::wire::now_ms().saturating_sub(ms(retention));
        let (removed, next) = search::sweep(self, from.as_deref(), cutoff, budget).await?;
        if let Ok(mut at) = self.sweep_from.lock() {
            *at = next;
        }
        Ok(removed)
    }

    async fn stats(
        &self,
        capabilities: &[Capability],
        retention: Duration,
    ) -> Result<Vec<(Capability, QueueStats)>, StoreError> {
        if capabilities.is_empty() {
            return Ok(Vec::new());
        }
        let p = self.prefix();
        let mut invocation = STATS.call(self);
        invocation.arg(p).arg(ms(retention));
        for c in capabilities {
            invocation.arg(c.as_str());
        }
        let mut conn = self.pool.get().await?;
        let value: Value = invocation.invoke_async(&mut conn).await?;
        let rows = Reply::rows(STATS.file, value)?;
        capabilities
            .iter()
            .cloned()
            .zip(rows.iter().map(Reply::queue_stats))
            .map(|(cap, stats)| Ok((cap, stats?)))
            .collect()
    }

    async fn worker_loads(&self) -> Result<HashMap<String, u32>, StoreError> {
        let mut conn = self.pool.get().await?;
        let loads: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(keys::worker_load(self.prefix()))
            .query_async(&mut conn)
            .await?;
        Ok(loads
            .into_iter()
            .map(|(k, v)| (k, u32::try_from(v.max(0)).unwrap_or(0)))
            .collect())
    }

    async fn capabilities(&self) -> Result<Vec<Capability>, StoreError> {
        let mut conn = self.pool.get().await?;
        let caps: Vec<String> = redis::cmd("SMEMBERS")
            .arg(keys::capabilities(self.prefix()))
            .query_async(&mut conn)
            .await?;
        Ok(caps
            .into_iter()
            .filter_map(|c| Capability::new(c).ok())
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.pool.ping().await?)
    }

    async fn events(
        &self,
        id: &TaskId,
        after: Option<&EventCursor>,
        limit: usize,
    ) -> Result<Vec<common::wire::TaskEvent>, StoreError> {
        // Entries are numbered from 1; the cursor's own comes first (inclusive start).
        let mut from = after.map_or(1, |a| a.entry.seq.max(1));
        let count = events::range_count(after, limit) as u64;
        let key = keys::task(self.prefix(), id.as_str());
        let mut conn = self.pool.get().await?;
        // Twice at most: a cursor from before the kept window jumps to its start.
        for _ in 0..2 {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&key).arg(task_field::EVENT_COUNT);
            for n in from..from.saturating_add(count) {
                cmd.arg(schema::event_field(n));
            }
            let values: Vec<Option<String>> = cmd.query_async(&mut conn).await?;
            let made: u64 = values
                .first()
                .cloned()
                .flatten()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let mut out = Vec::new();
            for (n, text) in (from..).zip(values.iter().skip(1)) {
                if let Some(text) = text {
                    let (entry, list) = task_entry(n, text)?;
                    out.extend(events::expand(id, entry, list, after)?);
                }
            }
            let oldest_kept = made.saturating_sub(u64::from(super::MAX_TASK_EVENTS)) + 1;
            if !out.is_empty() || from >= oldest_kept || made < from {
                return Ok(out);
            }
            from = oldest_kept;
        }
        Ok(Vec::new())
    }

    async fn all_events(
        &self,
        after: Option<&EventCursor>,
        limit: usize,
    ) -> Result<Vec<common::wire::TaskEvent>, StoreError> {
        self.follow_firehose().await?;
        self.read_firehose(after, limit).await
    }

    async fn latest_event(&self) -> Result<Option<EventCursor>, StoreError> {
        self.follow_firehose().await?;
        let mut conn = self.pool.get().await?;
        let value: Value = redis::cmd("XREVRANGE")
            .arg(keys::firehose(self.prefix()))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await?;
        let Some((entry, fields)) = events::entries(value)?.into_iter().next() else {
            return Ok(None);
        };
        let id = TaskId::new(fields.get(keys::FIREHOSE_TASK).map_or("", String::as_str))
            .map_err(|e| corrupt(format!("operators' event entry {entry}: {e}")))?;
        let list = fields
            .get(keys::FIREHOSE_EVENTS)
            .map_or("[]", String::as_str);
        let last = events::expand(&id, entry, list, None)?.len();
        Ok(Some(EventCursor {
            entry,
            index: u32::try_from(last.saturating_sub(1)).unwrap_or(u32::MAX),
        }))
    }

    async fn wait_events(
        &self,
        id: Option<&TaskId>,
        after: Option<&EventCursor>,
        timeout: Duration,
    ) {
        let Some(tail) = &self.tail else {
            tokio::time::sleep(timeout.min(EVENT_POLL)).await;
            return;
        };
        let Some(id) = id else {
            if let Err(e) = self.follow_firehose().await {
                tracing::debug!(error = %e, "the operators' stream could not be marked followed");
            }
            tail.register(None, after.map(|a| a.entry))
                .until(timeout)
                .await;
            return;
        };
        // Followed tasks announce their transitions; the first wait marks it (and its
        // caller reads once more: a transition just before the mark was not announced).
        if tail.needs_mark(id.as_str()) {
            let until = common::wire::now_ms() + ms(events::WATCH_FOR);
            if let Ok(mut conn) = self.pool.get().await {
                let marked: Result<Value, _> = WATCH
                    .call(self)
                    .key(keys::task(self.prefix(), id.as_str()))
                    .arg(until)
                    .invoke_async(&mut conn)
                    .await;
                if let Err(e) = marked {
                    tracing::debug!(error = %e, "a followed task could not be marked");
                }
            }
            return;
        }
        let waiting = tail.register(Some(id.as_str()), after.map(|a| a.entry));
        // Registered before this look, so what is announced after it wakes the waiter.
        let seen = after.map_or(0, |a| a.entry.seq);
        if self.event_count(id).await.is_ok_and(|made| made > seen) {
            return;
        }
        waiting.until(timeout.min(events::FALLBACK_POLL)).await;
    }

    async fn progress(
        &self,
        progress: &common::wire::StepProgress,
    ) -> Result<ProgressOutcome, StoreError> {
        let p = self.prefix();
        let messages = serde_json::to_string(&progress.messages)
            .map_err(|e| StoreError::Corrupt(format!("progress messages: {e}")))?;
        let mut conn = self.pool.get().await?;
        let value: Value = PROGRESS
            .call(self)
            .key(keys::task(p, progress.task_id.as_str()))
            .arg(p)
            .arg(progress.task_id.as_str())
            .arg(progress.step)
            .arg(progress.attempt)
            .arg(progress.worker_id.as_str())
            .arg(messages)
            .invoke_async(&mut conn)
            .await?;
        Reply::parse(PROGRESS.file, value)?.progress()
    }
}

#[async_trait]
impl search::Lookup for RedisStore {
    async fn index_range(
        &self,
        lower: &str,
        upper: &str,
        rev: bool,
        count: usize,
    ) -> Result<Vec<String>, StoreError> {
        let (lower, upper) = (format!("[{lower}"), format!("({upper}"));
        // The old commands, not `ZRANGE … BYLEX REV`: a Redis older than 6.2 has them too.
        let mut cmd = if rev {
            let mut c = redis::cmd("ZREVRANGEBYLEX");
            c.arg(keys::task_index(self.prefix())).arg(upper).arg(lower);
            c
        } else {
            let mut c = redis::cmd("ZRANGEBYLEX");
            c.arg(keys::task_index(self.prefix())).arg(lower).arg(upper);
            c
        };
        cmd.arg("LIMIT").arg(0).arg(count.max(1));
        let mut conn = self.pool.get().await?;
        Ok(cmd.query_async(&mut conn).await?)
    }

    async fn indexed(&self, ids: &[TaskId]) -> Result<Vec<Option<search::Indexed>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET")
                .arg(keys::task(self.prefix(), id.as_str()))
                .arg(task_field::STATUS)
                .arg(task_field::CLIENT)
                .arg(task_field::PIPELINE)
                .arg(task_field::CREATED_AT)
                .arg(task_field::FINISHED_AT)
                .arg(task_field::DECLARED)
                .arg(task_field::STEP_COUNT);
        }
        let mut conn = self.pool.get().await?;
        let rows: Vec<[Option<String>; 7]> = pipe.query_async(&mut conn).await?;
        ids.iter()
            .zip(rows)
            .map(
                |(id, [status, client, pipeline, created, finished, declared, count])| {
                    let Some(status) = status else {
                        return Ok(None);
                    };
                    let number = |v: Option<String>| v.and_then(|v| v.parse::<u64>().ok());
                    Ok(Some(search::Indexed {
                        client: client.unwrap_or_default(),
                        status: reply::serde_text(&status)
                            .map_err(|e| corrupt(format!("task {id}: {e}")))?,
                        pipeline,
                        created_at: number(created).unwrap_or(0),
                        finished_at: number(finished),
                        steps: number(declared.or(count))
                            .and_then(|n| u32::try_from(n).ok())
                            .unwrap_or(0),
                    }))
                },
            )
            .collect()
    }

    async fn unindex(&self, members: &[String]) -> Result<(), StoreError> {
        if members.is_empty() {
            return Ok(());
        }
        let mut conn = self.pool.get().await?;
        let _: u64 = redis::cmd("ZREM")
            .arg(keys::task_index(self.prefix()))
            .arg(members)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn dead_range(
        &self,
        capability: &Capability,
        max: u64,
        offset: usize,
        count: usize,
    ) -> Result<Vec<(TaskId, u64)>, StoreError> {
        let max = if max >= 1 << 53 {
            "+inf".to_string()
        } else {
            max.to_string()
        };
        let mut conn = self.pool.get().await?;
        let entries: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
            .arg(keys::dead(self.prefix(), capability.as_str()))
            .arg(max)
            .arg("-inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(offset)
            .arg(count.max(1))
            .query_async(&mut conn)
            .await?;
        entries
            .into_iter()
            .map(|(id, at)| Ok((TaskId::new(id).map_err(corrupt)?, at.max(0.0) as u64)))
            .collect()
    }

    async fn failures(&self, ids: &[TaskId]) -> Result<Vec<Option<search::Failure>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET")
                .arg(keys::task(self.prefix(), id.as_str()))
                .arg(task_field::CLIENT)
                .arg(task_field::FAILED_STEP)
                .arg(task_field::ERROR);
        }
        let mut conn = self.pool.get().await?;
        let rows: Vec<[Option<String>; 3]> = pipe.query_async(&mut conn).await?;
        Ok(rows
            .into_iter()
            .map(|[client, step, error]| {
                Some(search::Failure {
                    client: client?,
                    step,
                    error: error.and_then(|e| serde_json::from_str(&e).ok()),
                })
            })
            .collect())
    }
}

/// What `submit.lua` writes for a task's graph: the hash's fields, the slots ready at
/// submit, and the capabilities its steps need.
struct SubmitFields {
    fields: Vec<(String, String)>,
    roots: Vec<usize>,
    capabilities: Vec<Capability>,
}

/// The task hash of a new task (`schema.rs`): its own fields, then each declared step's,
/// with the graph's edges both ways (`needs`, `dependants`) so a transition finds what a
/// finished step makes ready without reading the whole task.
fn submit_fields(task: &NewTask) -> SubmitFields {
    let n = task.steps.len();
    let mut dependants: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (i, step) in task.steps.iter().enumerate() {
        for &need in &step.needs {
            if let Some(d) = dependants.get_mut(need as usize) {
                d.push(i as u32);
            }
        }
    }
    let list = |slots: &[u32]| {
        slots
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let sinks: Vec<u32> = (0..n as u32)
        .filter(|&i| dependants[i as usize].is_empty())
        .collect();
    let mut fields: Vec<(String, String)> = vec![
        (task_field::CLIENT.into(), task.client.clone()),
        (task_field::PRIORITY.into(), task.priority.to_string()),
        (task_field::INPUT.into(), task.input.clone()),
        (task_field::STEP_COUNT.into(), n.to_string()),
        (task_field::DECLARED.into(), n.to_string()),
        (task_field::OPEN.into(), n.to_string()),
        (task_field::SINKS.into(), list(&sinks)),
        (task_field::REQUEST_ID.into(), task.request_id.clone()),
    ];
    if let Some(pipeline) = &task.pipeline {
        fields.push((task_field::PIPELINE.into(), pipeline.clone()));
    }
    if let Some(url) = &task.callback_url {
        fields.push((task_field::CALLBACK_URL.into(), url.clone()));
    }
    if let Some(traceparent) = &task.traceparent {
        fields.push((task_field::TRACEPARENT.into(), traceparent.clone()));
    }
    if let Some(budget) = &task.budget {
        if let Some(tokens) = budget.max_tokens {
            fields.push((task_field::BUDGET_TOKENS.into(), tokens.to_string()));
        }
        if let Some(usd) = budget.max_cost_usd {
            let nanos = common::usage::usd_to_nanos(usd);
            fields.push((task_field::BUDGET_COST_NANOS.into(), nanos.to_string()));
        }
    }
    let mut capabilities: Vec<Capability> = Vec::new();
    let mut listens = Vec::new();
    for (i, step) in task.steps.iter().enumerate() {
        let mut put = |field: &str, value: String| fields.push((at_step(i, field), value));
        put(step_field::ID, step.id.clone());
        put(step_field::STATUS, "pending".into());
        put(step_field::ATTEMPT, "0".into());
        put(step_field::TRIES, "0".into());
        if !step.needs.is_empty() {
            put(step_field::NEEDS, list(&step.needs));
            put(step_field::OPEN_NEEDS, step.needs.len().to_string());
        }
        if !dependants[i].is_empty() {
            put(step_field::DEPENDANTS, list(&dependants[i]));
        }
        if step.allow_failure {
            put(step_field::ALLOW_FAILURE, "1".into());
        }
        match &step.kind {
            PlannedKind::Work {
                capability,
                max_attempts,
                timeout_ms,
                map,
                router,
            } => {
                put(step_field::CAPABILITY, capability.to_string());
                put(step_field::MAX_ATTEMPTS, max_attempts.to_string());
                put(step_field::TIMEOUT_MS, timeout_ms.to_string());
                if *router {
                    put(step_field::ROUTER, "1".into());
                }
                if let Some(map) = map {
                    put(step_field::MAP_OVER, map.over.clone());
                    put(
                        step_field::MAP_FROM,
                        map.from.map_or_else(|| "i".to_string(), |s| s.to_string()),
                    );
                    put(
                        step_field::MAP_PATH,
                        serde_json::to_string(&map.path).unwrap_or_else(|_| "[]".into()),
                    );
                    put(step_field::MAP_CONCURRENCY, map.concurrency.to_string());
                }
                if !capabilities.contains(capability) {
                    capabilities.push(capability.clone());
                }
            }
            PlannedKind::Wait {
                signal,
                timeout_ms,
                on_timeout,
            } => {
                put(step_field::KIND, "wait".into());
                put(step_field::SIGNAL, signal.clone());
                put(step_field::WAIT_MS, timeout_ms.to_string());
                if *on_timeout == common::wire::OnTimeout::Continue {
                    put(step_field::ON_TIMEOUT, "continue".into());
                }
                listens.push((schema::signal_field(signal), i.to_string()));
            }
            PlannedKind::Sleep { ms } => {
                put(step_field::KIND, "sleep".into());
                put(step_field::WAIT_MS, ms.to_string());
            }
        }
    }
    fields.extend(listens);
    let roots = (0..n).filter(|&i| task.steps[i].needs.is_empty()).collect();
    SubmitFields {
        fields,
        roots,
        capabilities,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MAX_PRIORITY, PlannedStep, SCORE_EPOCH_MS, queue_score};

    async fn eval(pool: &RedisPool, lua: &str, args: &[String]) -> redis::RedisResult<Value> {
        let mut conn = pool.get().await.unwrap();
        redis::cmd("EVAL")
            .arg(source(lua))
            .arg(0)
            .arg(args)
            .query_async(&mut conn)
            .await
    }

    #[tokio::test]
    async fn the_lua_queue_score_is_the_rust_one() {
        let server = testkit::RedisServer::start();
        let pool = RedisPool::new(&server.settings()).unwrap();
        let now = common::wire::now_ms();
        let epoch = SCORE_EPOCH_MS as u64;
        let times = [
            0,
            epoch - 1,
            epoch,
            epoch + 1,
            now,
            now + 1,
            now + 86_400_000,
            now + 100 * 365 * 86_400_000,
        ];
        let priorities = [
            -MAX_PRIORITY,
            -MAX_PRIORITY + 1,
            -1,
            0,
            1,
            MAX_PRIORITY - 1,
            MAX_PRIORITY,
        ];
        let mut cases = Vec::new();
        for priority in priorities {
            for time in times {
                cases.push((priority, time));
            }
        }
        let args: Vec<String> = cases
            .iter()
            .flat_map(|(p, t)| [p.to_string(), t.to_string()])
            .collect();
        let lua = "local out = {}\n\
                   for i = 1, #ARGV, 2 do out[#out + 1] = score(ARGV[i], ARGV[i + 1]) end\n\
                   return out";
        let scores: Vec<String> =
            redis::from_redis_value(eval(&pool, lua, &args).await.unwrap()).unwrap();
        assert_eq!(scores.len(), cases.len());
        for ((priority, time), lua) in cases.iter().zip(&scores) {
            assert_eq!(
                lua.parse::<i64>().unwrap(),
                queue_score(*priority, *time),
                "priority {priority}, queued at {time}"
            );
        }
        // And the order they give: priority first, then time.
        let mut by_score = cases.clone();
        by_score.sort_by_key(|(p, t)| queue_score(*p, *t));
        let mut by_rule = cases;
        by_rule.sort_by_key(|(p, t)| (-p, *t));
        assert_eq!(by_score, by_rule);
    }

    /// `int`, `pad_ms` and `at_step` keep what they made (lib.lua): what they answer is
    /// still the Rust text, for a value seen before and after another, and for step names
    /// after the name cache has started over.
    #[tokio::test]
    async fn the_lua_number_and_name_helpers_agree_with_rust_when_cached() {
        let server = testkit::RedisServer::start();
        let pool = RedisPool::new(&server.settings()).unwrap();
        let now = common::wire::now_ms();
        let lua = "local out = {}
            local function add(x) out[#out + 1] = x end
            local now = tonumber(ARGV[1])
            add(int(now)); add(int(now + 1)); add(int(now)); add(int(-7)); add(int(2.75))
            add(int(1e16)); add(int('12'))
            add(pad_ms(0)); add(pad_ms(now)); add(pad_ms(now)); add(pad_ms(1e14))
            for i = 0, 25000 do
              local name = at_step(i, S.status)
              if name ~= tostring(i) .. ':' .. S.status then return 'wrong name for ' .. i end
            end
            add(at_step(3, S.output)); add(at_step('3', S.output)); add(at_step(25000, S.status))
            return out";
        let got: Vec<String> =
            redis::from_redis_value(eval(&pool, lua, &[now.to_string()]).await.unwrap()).unwrap();
        let pad = schema::index::pad_ms;
        let expected = [
            now.to_string(),
            (now + 1).to_string(),
            now.to_string(),
            "-7".into(),
            "3".into(),
            "10000000000000000".into(),
            "12".into(),
            pad(0),
            pad(now),
            pad(now),
            pad(schema::index::MAX_MS),
            at_step(3, step_field::OUTPUT),
            at_step(3, step_field::OUTPUT),
            at_step(25_000, step_field::STATUS),
        ];
        assert_eq!(got, expected);
    }

    /// A script's time is the one its call carries last (`call_begins`), taken off `ARGV`
    /// before the script reads its arguments; a snippet run without it reads Redis's clock.
    #[tokio::test]
    async fn a_script_runs_at_the_time_its_call_gives() {
        let server = testkit::RedisServer::start();
        let pool = RedisPool::new(&server.settings()).unwrap();
        let given = eval(
            &pool,
            "call_begins(ARGV) return {int(now_ms()), #ARGV, ARGV[1]}",
            &["first".into(), "1234567890123".into()],
        )
        .await
        .unwrap();
        assert_eq!(
            redis::from_redis_value::<(String, u64, String)>(given).unwrap(),
            ("1234567890123".into(), 1, "first".into())
        );
        let before = common::wire::now_ms();
        let own = eval(&pool, "return int(now_ms())", &[]).await.unwrap();
        let own: u64 = redis::from_redis_value::<String>(own)
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (before..before + 10_000).contains(&own),
            "{own} against {before}"
        );
    }

    #[tokio::test]
    async fn every_script_compiles_and_an_unknown_field_name_is_an_error() {
        let server = testkit::RedisServer::start();
        let pool = RedisPool::new(&server.settings()).unwrap();
        let mut conn = pool.get().await.unwrap();
        // The library as the store loads it: every script a function of it.
        load_library(&mut conn).await.unwrap();
        load_library(&mut conn)
            .await
            .expect("loading it again is fine");
        let functions: Value = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg(&LIBRARY.name)
            .query_async(&mut conn)
            .await
            .unwrap();
        for (file, _) in SCRIPTS {
            let function = Lua::new(file).function;
            assert!(format!("{functions:?}").contains(&function), "{function}");
        }
        for (file, lua) in crate::store::schema::tests::lua_files() {
            let loaded: redis::RedisResult<String> = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(graph_source(&lua))
                .query_async(&mut conn)
                .await;
            assert!(loaded.is_ok(), "{file}: {loaded:?}");
        }
        let known = eval(&pool, "return {F.status, step_fields(2).output}", &[]).await;
        assert_eq!(
            redis::from_redis_value::<Vec<String>>(known.unwrap()).unwrap(),
            [
                schema::task_field::STATUS.to_string(),
                at_step(2, step_field::OUTPUT)
            ]
        );
        for typo in ["return F.stauts", "return step_fields(0).outptu"] {
            let error = eval(&pool, typo, &[]).await.unwrap_err();
            assert!(error.to_string().contains("no field"), "{typo}: {error}");
        }
    }

    /// A Redis without Functions (older than 7.0; here `FCALL` renamed away) runs the same
    /// scripts with `EVALSHA`: a task goes through submit, claim and report.
    #[tokio::test]
    async fn a_redis_without_functions_runs_the_scripts_with_evalsha() {
        let server = testkit::RedisServer::with_args(&["--rename-command", "FCALL", ""]);
        let store = RedisStore::new(RedisPool::new(&server.settings()).unwrap());
        let cap = Capability::new("echo").unwrap();
        let worker = WorkerId::new("w1").unwrap();
        let task = one_step_task(&cap);
        let id = task.id.clone();
        let (limit, retention) = (NO_LIMIT, Duration::from_secs(60));
        assert_eq!(
            store.submit(task, limit, retention).await.unwrap(),
            SubmitOutcome::Created
        );
        let claimed = store
            .claim(&cap, std::slice::from_ref(&worker), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].work.input, serde_json::json!({"q": 1}));
        let report = ResultReport {
            task_id: id.clone(),
            step: 0,
            attempt: claimed[0].work.attempt,
            worker_id: worker,
            status: ReportStatus::Succeeded,
            output: Some(serde_json::json!("done")),
            error: None,
            duration_ms: None,
        };
        let retry = RetryPolicy {
            base: Duration::from_millis(10),
            max: Duration::from_millis(10),
        };
        let outcome = store.report(&report, retry, 0.5, retention).await.unwrap();
        assert!(
            matches!(
                outcome,
                ReportOutcome::Done {
                    status: common::wire::TaskStatus::Succeeded,
                    ..
                }
            ),
            "{outcome:?}"
        );
        let view = store.get(&id).await.unwrap().unwrap().view;
        assert_eq!(view.result, Some(serde_json::json!("done")));
        // The batch form too: a repeat of the report and a stale one.
        let stale = ResultReport {
            attempt: 7,
            ..report.clone()
        };
        let outcomes = store
            .report_many(&[report, stale], retry, retention)
            .await
            .unwrap();
        assert!(
            matches!(outcomes[0], ReportOutcome::Replayed(_)),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[1], ReportOutcome::Discarded);

        // A batch submit as the first call of a store: its pipeline of `FCALL`s fails, and
        // each task runs with `EVALSHA`, in order.
        let fresh = RedisStore::new(RedisPool::new(&server.settings()).unwrap());
        let keyed = |key: &str| NewTask {
            id: TaskId::generate(),
            idempotency_key: Some(key.into()),
            ..one_step_task(&cap)
        };
        let (first, again) = (keyed("k"), keyed("k"));
        let first_id = first.id.clone();
        let outcomes: Vec<SubmitOutcome> = fresh
            .submit_many(vec![first, again], limit, retention)
            .await
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            outcomes,
            [SubmitOutcome::Created, SubmitOutcome::Existing(first_id)]
        );
    }

    /// No rate limit.
    const NO_LIMIT: RateLimit = RateLimit {
        per_sec: 0.0,
        burst: 1,
    };

    /// A one-step task for `cap`, with a fresh id and no key.
    fn one_step_task(cap: &Capability) -> NewTask {
        NewTask {
            id: TaskId::generate(),
            client: "alice".into(),
            pipeline: None,
            steps: vec![PlannedStep::chain_link(0, "echo", cap.clone(), 3, 1_000)],
            input: "{\"q\":1}".into(),
            priority: 0,
            idempotency_key: None,
            callback_url: None,
            request_id: "r".into(),
            budget: None,
            traceparent: None,
        }
    }

    /// A Redis that lost the library (`FUNCTION FLUSH`, or a failover to a server that never
    /// had it) between two batch submits: the second loads it again and stores every task,
    /// once.
    #[tokio::test]
    async fn a_batch_submit_loads_the_library_again_when_redis_lost_it() {
        let server = testkit::RedisServer::start();
        let pool = RedisPool::new(&server.settings()).unwrap();
        let store = RedisStore::new(pool.clone());
        let cap = Capability::new("echo").unwrap();
        let (limit, retention) = (NO_LIMIT, Duration::from_secs(60));
        for round in 0..2 {
            if round == 1 {
                let mut conn = pool.get().await.unwrap();
                let _: () = redis::cmd("FUNCTION")
                    .arg("FLUSH")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            let tasks: Vec<NewTask> = (0..3).map(|_| one_step_task(&cap)).collect();
            let ids: Vec<TaskId> = tasks.iter().map(|t| t.id.clone()).collect();
            let outcomes = store.submit_many(tasks, limit, retention).await.unwrap();
            for (id, outcome) in ids.iter().zip(outcomes) {
                assert_eq!(outcome.unwrap(), SubmitOutcome::Created, "round {round}");
                assert!(store.get(id).await.unwrap().is_some(), "round {round}");
            }
        }
        let claimed = store
            .claim(
                &cap,
                &vec![WorkerId::new("w1").unwrap(); 10],
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(claimed.len(), 6, "each task queued once");
    }

    /// Commands Redis has run, those inside scripts included (what the benchmark counts),
    /// `INFO` itself excluded.
    async fn commands_run(pool: &RedisPool) -> u64 {
        let mut conn = pool.get().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    /// What one task costs in Redis commands (DESIGN §11 counts them per task): submit 4
    /// (with the task index's one `ZADD` of its `A:`, `C:` and `P:` members), claim 6,
    /// report 9 (with the worker-load `HDEL` and the index's `ZADD` of its `S:` member),
    /// the result's `HGETALL` 1. No script asks Redis for the time (`TIME`): the master
    /// passes it (lib.lua: `call_begins`). Reading
    /// replies by name must not add any. The task's events cost none: they are fields of
    /// the hash each transition writes anyway; a task nobody follows announces nothing (no
    /// `PUBLISH`), and with nobody following the operators' stream nothing is added to it
    /// (each transition adds one `XADD` while someone does). A traced task costs the same:
    /// its `traceparent` is one more field of submit's `HSET` and claim's `HMGET`. Lower
    /// the budget when it drops.
    #[tokio::test]
    async fn a_one_step_task_runs_a_fixed_budget_of_redis_commands() {
        const BUDGET: u64 = 20;
        const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let server = testkit::RedisServer::start();
        let store = RedisStore::new(RedisPool::new(&server.settings()).unwrap());
        let cap = Capability::new("echo").unwrap();
        let worker = WorkerId::new("w1").unwrap();
        let retry = RetryPolicy {
            base: Duration::from_millis(10),
            max: Duration::from_millis(10),
        };
        let no_limit = RateLimit {
            per_sec: 0.0,
            burst: 1,
        };
        let retention = Duration::from_secs(60);
        let mut spent = Vec::new();
        // The first task loads the scripts; the second one is what a task costs.
        for _ in 0..2 {
            let before = commands_run(&store.pool).await;
            let id = TaskId::generate();
            let task = NewTask {
                id: id.clone(),
                client: "alice".into(),
                pipeline: Some("bench".into()),
                steps: vec![PlannedStep::chain_link(0, "bench", cap.clone(), 3, 1_000)],
                input: "{}".into(),
                priority: 0,
                idempotency_key: None,
                callback_url: None,
                request_id: "r".into(),
                budget: None,
                traceparent: Some(TRACEPARENT.into()),
            };
            let submitted = store.submit(task, no_limit, retention).await.unwrap();
            assert_eq!(submitted, SubmitOutcome::Created);
            let claimed = store
                .claim(&cap, std::slice::from_ref(&worker), Duration::from_secs(10))
                .await
                .unwrap();
            assert_eq!(claimed.len(), 1);
            assert_eq!(claimed[0].traceparent.as_deref(), Some(TRACEPARENT));
            let report = ResultReport {
                task_id: id.clone(),
                step: 0,
                attempt: claimed[0].work.attempt,
                worker_id: worker.clone(),
                status: ReportStatus::Succeeded,
                output: Some(serde_json::json!({})),
                error: None,
                duration_ms: None,
            };
            let outcome = store.report(&report, retry, 0.5, retention).await.unwrap();
            assert!(matches!(outcome, ReportOutcome::Done { .. }), "{outcome:?}");
            assert!(store.get(&id).await.unwrap().is_some());
            spent.push(commands_run(&store.pool).await - before);
        }
        assert!(spent[1] <= BUDGET, "a task ran {} commands", spent[1]);
    }
}

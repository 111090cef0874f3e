//! The layout of the master's data in Redis, in one place: every key template and every
//! field of a task's hash, each with what it means and which transition writes it.
//!
//! The Lua scripts do not spell these names themselves: [`lua_prelude`] turns the
//! constants and key builders below into Lua (`F.status`, `S.output`, `task_key(…)`),
//! prepended to every script ahead of `lua/lib.lua`, so the two languages cannot drift.
//!
//! A task is one hash. Task-level fields have short names ([`task_field`]); step `i`'s
//! fields are `i:<name>` ([`step_field`], built by [`at_step`]). The names are short because
//! a task with many steps carries each one per step.

/// Every Redis key the master writes. A task's hash carries its id as a hash tag
/// (`{id}`), so one task's keys could live in one Redis Cluster slot. Queues, leases and
/// dead letters are per capability. The scripts touch a task and its capability's queues
/// together, which needs cluster mode disabled (what the ElastiCache deployment uses).
pub mod keys {
    use std::fmt::Display;

    /// A task's hash (fields in [`super::task_field`] and [`super::step_field`]).
    pub fn task(prefix: &str, id: &str) -> String {
        format!("{prefix}:task:{{{id}}}")
    }

    /// A capability's ready queue: sorted set of [`member`]s by
    /// [`queue_score`](crate::store::queue_score) (priority, then time queued).
    pub fn queue(prefix: &str, capability: &str) -> String {
        format!("{prefix}:q:{capability}")
    }

    /// A capability's steps waiting out a retry backoff: sorted set of [`member`]s by due
    /// time.
    pub fn delayed(prefix: &str, capability: &str) -> String {
        format!("{prefix}:delayed:{capability}")
    }

    /// A capability's leased steps: sorted set of [`member`]s by lease expiry.
    pub fn leases(prefix: &str, capability: &str) -> String {
        format!("{prefix}:lease:{capability}")
    }

    /// A capability's dead-lettered tasks: sorted set of task ids by failure time.
    pub fn dead(prefix: &str, capability: &str) -> String {
        format!("{prefix}:dead:{capability}")
    }

    /// The task search index (`GET /tasks`): one sorted set whose members all score 0, so
    /// Redis keeps them in byte order and `ZRANGE … BYLEX` walks any one part of it in time
    /// order. Each member starts with what it indexes ([`index`] builds them):
    ///
    /// | member | written by | for |
    /// |---|---|---|
    /// | `A:<ms>:<id>:<client>:<pipeline>` | submit | every task |
    /// | `C:<client>:<ms>:<id>` | submit | one client's tasks |
    /// | `P:<pipeline>:<ms>:<id>` | submit (named pipelines only) | one pipeline's tasks |
    /// | `S:<status>:<ms>:<id>` | the transition that ends the task (graph.lua's `g_end`, cancel); redrive removes it | finished tasks by status |
    ///
    /// `<ms>` is the submit time ([`task_field::CREATED_AT`](super::task_field::CREATED_AT)),
    /// zero-padded to 13 digits ([`index::pad_ms`]), so byte order is time order. One key,
    /// so submit writes its two or three members with one `ZADD` and a finished task adds one
    /// more: two commands per task in all.
    ///
    /// Members do not expire with their task. A search drops the members it meets whose hash
    /// is gone, and the master's periodic sweep (`TaskStore::sweep_task_index`) walks the
    /// `A:` members submitted more than a retention ago, oldest first, and removes every
    /// member of a task whose hash is gone: the `A:` member carries the client and pipeline
    /// so the others can be named. Client ids cannot contain `:` (`auth.rs`); a pipeline name
    /// may, so it comes last.
    pub fn task_index(prefix: &str) -> String {
        format!("{prefix}:ix")
    }

    /// Steps in flight per worker: hash of worker id to count.
    pub fn worker_load(prefix: &str) -> String {
        format!("{prefix}:wload")
    }

    /// Capabilities seen in inline steps (set), so every replica watches their queues.
    pub fn capabilities(prefix: &str) -> String {
        format!("{prefix}:caps")
    }

    /// The completion-callback outbox: task ids by when their delivery is due (sorted
    /// set). The delivery's state lives in the task's hash (`CALLBACK_*` in
    /// [`super::task_field`]).
    pub fn callbacks(prefix: &str) -> String {
        format!("{prefix}:callbacks")
    }

    /// A client's idempotency key: the id of the task it created.
    pub fn idempotency(prefix: &str, client: &str, key: &str) -> String {
        format!("{prefix}:idem:{client}:{key}")
    }

    /// A client's rate-limit state (GCRA theoretical arrival time).
    pub fn rate(prefix: &str, client: &str) -> String {
        format!("{prefix}:rate:{client}")
    }

    /// Wait and sleep timers: sorted set of [`member`]s by when they fire.
    pub fn timers(prefix: &str) -> String {
        format!("{prefix}:timers")
    }

    /// A task's model usage, written by the llm-gateway ([`common::usage`]); submit puts a
    /// budget in it, and a task with a budget gives it its retention when it ends.
    pub fn usage(prefix: &str, id: &str) -> String {
        common::usage::task_usage_key(prefix, id)
    }

    /// Every task's events but partial output, for operators (`GET /events`): a stream
    /// capped at [`FIREHOSE_EVENTS`](crate::store::FIREHOSE_EVENTS) entries, `t` the task
    /// id and `e` as in [`events`].
    pub fn firehose(prefix: &str) -> String {
        format!("{prefix}:evlog")
    }

    /// Set (with an expiry) while a master serves the operators' stream: transitions add
    /// to [`firehose`] only then (the key is passed to their scripts as their last key).
    pub fn firehose_watched(prefix: &str) -> String {
        format!("{prefix}:evlog:watched")
    }

    /// What a transition of a followed task publishes on the events channel.
    pub fn announcement(task: &str) -> String {
        format!("{ANNOUNCEMENT_PREFIX}{task}")
    }

    /// The start of an [`announcement`], before the task id.
    pub const ANNOUNCEMENT_PREFIX: &str = "ev:";

    /// The field of a [`firehose`] entry naming its task.
    pub const FIREHOSE_TASK: &str = "t";

    /// The field of a [`firehose`] entry holding its events (a JSON array).
    pub const FIREHOSE_EVENTS: &str = "e";

    /// What separates a [`member`]'s task id from its step. Task ids cannot contain it.
    pub const MEMBER_SEPARATOR: char = ':';

    /// A step in a queue, delayed or lease set: `task_id:step`.
    pub fn member(task_id: &str, step: impl Display) -> String {
        format!("{task_id}{MEMBER_SEPARATOR}{step}")
    }
}

/// The members of [`keys::task_index`]. `ms` is always [`index::pad_ms`]'s 13 digits.
pub mod index {
    /// Every task: the client and pipeline ride along so the sweep can name the task's
    /// other members once its hash is gone.
    pub fn all(ms: &str, id: &str, client: &str, pipeline: &str) -> String {
        format!("{ALL}{ms}:{id}:{client}:{pipeline}")
    }

    /// One client's tasks.
    pub fn client(client: &str, ms: &str, id: &str) -> String {
        format!("{CLIENT}{client}:{ms}:{id}")
    }

    /// One named pipeline's tasks.
    pub fn pipeline(pipeline: &str, ms: &str, id: &str) -> String {
        format!("{PIPELINE}{pipeline}:{ms}:{id}")
    }

    /// Finished tasks with one final status (`succeeded`, `failed`, `cancelled`).
    pub fn status(status: &str, ms: &str, id: &str) -> String {
        format!("{STATUS}{status}:{ms}:{id}")
    }

    /// Where [`all`] members start.
    pub const ALL: &str = "A:";
    /// Where [`client`] members start (then the client and `:`).
    pub const CLIENT: &str = "C:";
    /// Where [`pipeline`] members start.
    pub const PIPELINE: &str = "P:";
    /// Where [`status`] members start.
    pub const STATUS: &str = "S:";

    // Upper-case, so no script's text (`'%s:%s'`) looks like one of them.

    /// Digits of a padded time: milliseconds since the epoch have 13 until the year 2286.
    pub const MS_DIGITS: usize = 13;

    /// The largest time a member can hold.
    pub const MAX_MS: u64 = 9_999_999_999_999;

    /// `ms` zero-padded to [`MS_DIGITS`] (capped at [`MAX_MS`]), so that byte order is
    /// time order; `lib.lua`'s `pad_ms` is the same.
    pub fn pad_ms(ms: u64) -> String {
        format!("{:013}", ms.min(MAX_MS))
    }
}

/// Defines a module of field-name constants and `ALL`, the list of (constant name,
/// stored name) that the Lua prelude and the tests read.
macro_rules! fields {
    ($(#[$outer:meta])* $module:ident { $($(#[$doc:meta])* $name:ident = $value:literal,)* }) => {
        $(#[$outer])*
        pub mod $module {
            $($(#[$doc])* pub const $name: &str = $value;)*

            /// Every field: (constant name, name in the hash).
            pub(crate) const ALL: &[(&str, &str)] = &[$((stringify!($name), $value),)*];
        }
    };
}

fields! {
    /// Fields of a task's hash that belong to the whole task.
    task_field {
        /// The task's status (`queued`, `running`, `succeeded`, `failed`, `cancelled`):
        /// set by submit, claim (`running`), report, cancel and redrive.
        STATUS = "st",
        /// When it was submitted (ms since the epoch): submit.
        CREATED_AT = "ca",
        /// When its first step was first dispatched: claim. Redrive reads it to go back to
        /// `running` rather than `queued`.
        STARTED_AT = "sa",
        /// When it finished: report, cancel; removed by redrive.
        FINISHED_AT = "fa",
        /// The failed step's error (JSON `StepError`): report; removed by redrive.
        ERROR = "er",
        /// The client that owns it: submit.
        CLIENT = "cl",
        /// The capability whose dead-letter set ([`keys::dead`](super::keys::dead)) holds
        /// the task, written when it fails for good with a worker step; removed by redrive.
        /// Redrive refuses a task that has it but is no longer in that set: an operator
        /// purged it (`DELETE /deadletters/{capability}`).
        DEAD_CAPABILITY = "dlc",
        /// The id of the step whose failure failed the task (a map instance's `map[i]`),
        /// shown by `GET /deadletters`: written with [`ERROR`]; removed by redrive.
        FAILED_STEP = "fst",
        /// Its priority, read to score every queueing of its steps: submit.
        PRIORITY = "pr",
        /// The task input (JSON text): submit.
        INPUT = "in",
        /// How many steps it has: submit.
        STEP_COUNT = "n",
        /// Its steps' capabilities, comma-separated, so report finds the next step's queue
        /// with the fields it already reads: submit.
        CAPABILITIES = "caps",
        /// The submitting request's id, passed on to workers: submit.
        REQUEST_ID = "rq",
        /// The W3C `traceparent` of the submit's span, when traces are exported: submit.
        /// Claim reads it (with the fields it reads anyway) so each step attempt's span
        /// joins the client's trace across the queue.
        TRACEPARENT = "tp",
        /// Its pipeline's name, when it has one: submit.
        PIPELINE = "pl",
        /// Where to POST the final view, when set: submit.
        CALLBACK_URL = "cb",
        /// The callback's delivery status (`pending`, `delivered`, `failed`): set to
        /// `pending` when the task finishes (report, cancel), then by callback_claim and
        /// callback_finish; removed by redrive.
        CALLBACK_STATUS = "cbs",
        /// Delivery attempts claimed, finished or not: the fencing token of
        /// callback_finish. Raised by callback_claim.
        CALLBACK_ATTEMPTS = "cbn",
        /// The last delivery error: callback_claim, callback_finish.
        CALLBACK_ERROR = "cbe",
        /// The task's token budget (`budget.max_tokens`), also written to its usage hash
        /// for the gateway: submit.
        BUDGET_TOKENS = "bt",
        /// The task's cost budget in nano-dollars (`budget.max_cost_usd`), likewise: submit.
        BUDGET_COST_NANOS = "bcn",
        /// How many steps were declared (slots before the map instances): submit.
        DECLARED = "dn",
        /// Declared steps not finished yet; the task has succeeded when it reaches 0:
        /// submit, then every transition that finishes a step (graph.lua), redrive.
        OPEN = "op",
        /// The declared steps no other step needs (the result's steps), comma-separated
        /// slots: submit.
        SINKS = "sk",
        /// `step.progress` events recorded for the task, held under
        /// [`MAX_PROGRESS_EVENTS`](common::wire::MAX_PROGRESS_EVENTS): progress.
        PROGRESS_EVENTS = "pge",
        /// Entries in the task's events ([`event_field`](super::event_field) 1 to this):
        /// every transition that made events.
        EVENT_COUNT = "evn",
        /// Until when (ms since the epoch) someone follows the task's events: set by a
        /// master serving its stream, refreshed while it does. A transition announces its
        /// events (`ev:<id>` on the events channel) only before then, so tasks nobody
        /// watches pay nothing for live streams.
        WATCHED_UNTIL = "evw",
    }
}

fields! {
    /// Fields of one step, stored as `i:<name>` ([`at_step`](super::at_step)).
    step_field {
        /// The step's status (`pending`, `queued`, `dispatched`, `succeeded`, `failed`):
        /// submit, claim, release, report, cancel, redrive.
        STATUS = "s",
        /// What it needs: submit.
        CAPABILITY = "c",
        /// Attempts before it fails for good: submit.
        MAX_ATTEMPTS = "m",
        /// How long one attempt may run (ms): submit.
        TIMEOUT_MS = "to",
        /// The current attempt number, the fencing token of release and report: raised
        /// by every claim, never lowered.
        ATTEMPT = "a",
        /// Attempts spent: raised by claim, given back by release, reset by redrive.
        TRIES = "t",
        /// The worker the current attempt is leased to: claim.
        WORKER = "w",
        /// Its output (JSON): report.
        OUTPUT = "o",
        /// Its last error (JSON `StepError`): report, cancel.
        ERROR = "e",
        /// When it was (or, waiting out a backoff, will be) queued: submit, report,
        /// redrive. Release reads it to put the step back at its place.
        QUEUED_AT = "q",
        /// When the current attempt was dispatched: claim.
        DISPATCHED_AT = "d",
        /// When it finished: report, cancel.
        FINISHED_AT = "f",
        /// Failed dispatches that cost no attempt since the last one that did: release.
        FREE_FAILURES = "x",
        /// Who reported what for the last recorded report (`attempt|worker|status`), to
        /// tell a replay from a stale report: report.
        REPORT_KEY = "rk",
        /// The reply to that report, given again to a replay: report.
        REPORT_REPLY = "rr",
        /// The worker the last attempt was lost on, so claim prefers another: report.
        AVOID_WORKER = "av",
        /// The step's id in the task: submit (a map instance's: expansion).
        ID = "nm",
        /// `wait` or `sleep`; absent for a worker step: submit.
        KIND = "k",
        /// The slots it needs, comma-separated (a map instance: its map step's): submit,
        /// expansion.
        NEEDS = "nd",
        /// The slots that need it, comma-separated: submit.
        DEPENDANTS = "dp",
        /// Needs not finished yet: submit, then lowered as they finish.
        OPEN_NEEDS = "on",
        /// Needs that were skipped: raised as they are.
        SKIPPED_NEEDS = "sn",
        /// `1` when a router it needs did not pick it: report (the router's).
        ROUTED_OUT = "ro",
        /// `1` for a router: submit.
        ROUTER = "rt",
        /// `1` when its failure does not fail the task: submit.
        ALLOW_FAILURE = "af",
        /// A map step's `over` as written: submit.
        MAP_OVER = "mo",
        /// Where its array is: `i` (the task input) or the slot of a step it needs: submit.
        MAP_FROM = "mf",
        /// The path from there to the array (JSON array of keys and indices): submit.
        MAP_PATH = "mp",
        /// Most of its instances queued or running at once: submit.
        MAP_CONCURRENCY = "mc",
        /// Its first instance's slot: expansion.
        MAP_BASE = "mb",
        /// How many instances it has: expansion.
        MAP_COUNT = "mn",
        /// The next instance to queue (element index): expansion, then as instances finish.
        MAP_NEXT = "mx",
        /// Instances finished: raised as they finish.
        MAP_DONE = "md",
        /// A map instance's map step (slot): expansion.
        PARENT = "pa",
        /// A map instance's element (JSON text, as written): expansion.
        ELEMENT = "el",
        /// A map instance's element index: expansion.
        ELEMENT_INDEX = "ei",
        /// A wait step's signal name: submit.
        SIGNAL = "sg",
        /// A wait step's timeout, or a sleep step's delay (ms): submit.
        WAIT_MS = "wm",
        /// `continue` when a wait's timeout succeeds it (else it fails): submit.
        ON_TIMEOUT = "ot",
        /// When a waiting step's timer fires: when it starts waiting.
        WAKES_AT = "wa",
    }
}

/// The task field naming the slot of the wait step that listens for signal `name`.
pub fn signal_field(name: &str) -> String {
    format!("g:{name}")
}

/// The task field holding the `n`-th entry of its events (from 1): `<ms> <JSON array of the
/// events of one transition>` (docs/events.md). Written in the transition's own `HSET`,
/// so a task's events cost no command of their own and expire with it.
pub fn event_field(n: impl std::fmt::Display) -> String {
    format!("ev:{n}")
}

/// The task field keeping a signal's payload that arrived before its wait step was reached.
pub fn buffered_field(name: &str) -> String {
    format!("b:{name}")
}

/// Where step `step`'s `field` (one of [`step_field`]) lives in its task's hash.
pub fn at_step(step: impl std::fmt::Display, field: &str) -> String {
    format!("{step}:{field}")
}

/// The Lua that every script starts with: the field names as tables (`F` for
/// [`task_field`], `S` for [`step_field`], lower-case; reading a name that is not there is
/// an error, not a silent `nil`), the key builders, the queue-score constants and
/// `at_step`, all derived from the Rust above.
///
/// `guarded`: the tables answer an unknown name with an error (needs `setmetatable`, which
/// a script run by `EVAL` has and a Redis Functions library does not; there, a misspelt
/// name is a `nil` that fails the script at its first use).
pub(super) fn lua_prelude(guarded: bool) -> String {
    let mut lua =
        String::from("-- Generated from store/schema.rs: names of the task hash and keys.\n");
    lua += &lua_table("F", task_field::ALL, guarded);
    lua += &lua_table("S", step_field::ALL, guarded);
    lua += &format!("local GUARDED = {guarded}\n");
    for (name, params, build) in lua_builders() {
        lua += &lua_function(name, params, build);
    }
    lua += &format!(
        "local USAGE_BUDGET_TOKENS = {}\nlocal USAGE_BUDGET_COST_NANOS = {}\n",
        lua_string(common::usage::BUDGET_TOKENS),
        lua_string(common::usage::BUDGET_COST_NANOS)
    );
    lua += &format!(
        "local FIREHOSE_TASK = {}\nlocal FIREHOSE_FIELD = {}\n",
        lua_string(keys::FIREHOSE_TASK),
        lua_string(keys::FIREHOSE_EVENTS)
    );
    lua += &format!(
        "local MEMBER_SEPARATOR = {}\n",
        lua_string(&keys::MEMBER_SEPARATOR.to_string())
    );
    lua += &format!(
        "local PRIORITY_WEIGHT = {}\nlocal SCORE_EPOCH_MS = {}\nlocal MAX_MAP_WIDTH = {}\n\
         local MAX_MAP_OUTPUT_BYTES = {}\nlocal MAX_TASK_EVENTS = {}\nlocal FIREHOSE_EVENTS = {}\n\
         local MAX_EVENT_VALUE_BYTES = {}\nlocal MAX_PROGRESS_EVENTS = {}\n",
        super::PRIORITY_WEIGHT,
        super::SCORE_EPOCH_MS,
        super::MAX_MAP_WIDTH,
        super::MAX_MAP_OUTPUT_BYTES,
        super::MAX_TASK_EVENTS,
        super::FIREHOSE_EVENTS,
        common::wire::MAX_EVENT_VALUE_BYTES,
        common::wire::MAX_PROGRESS_EVENTS
    );
    lua
}

/// A Rust builder of a name, called with one string per parameter.
type Builder = fn(&[String]) -> String;

/// The key (and field) builders the scripts use, with their Lua names and parameters.
fn lua_builders() -> [(&'static str, &'static [&'static str], Builder); 21] {
    [
        ("task_key", &["prefix", "id"], |a| keys::task(&a[0], &a[1])),
        ("queue_key", &["prefix", "cap"], |a| {
            keys::queue(&a[0], &a[1])
        }),
        ("delayed_key", &["prefix", "cap"], |a| {
            keys::delayed(&a[0], &a[1])
        }),
        ("lease_key", &["prefix", "cap"], |a| {
            keys::leases(&a[0], &a[1])
        }),
        ("dead_key", &["prefix", "cap"], |a| keys::dead(&a[0], &a[1])),
        ("load_key", &["prefix"], |a| keys::worker_load(&a[0])),
        ("callbacks_key", &["prefix"], |a| keys::callbacks(&a[0])),
        ("events_channel", &["prefix"], |a| {
            common::registry::keys::events(&a[0])
        }),
        ("timers_key", &["prefix"], |a| keys::timers(&a[0])),
        ("announcement", &["id"], |a| keys::announcement(&a[0])),
        ("usage_key", &["prefix", "id"], |a| {
            keys::usage(&a[0], &a[1])
        }),
        ("signal_field", &["name"], |a| signal_field(&a[0])),
        ("buffered_field", &["name"], |a| buffered_field(&a[0])),
        ("event_field", &["n"], |a| event_field(&a[0])),
        ("member", &["id", "step"], |a| keys::member(&a[0], &a[1])),
        ("index_key", &["prefix"], |a| keys::task_index(&a[0])),
        ("ix_all", &["ms", "id", "client", "pipeline"], |a| {
            index::all(&a[0], &a[1], &a[2], &a[3])
        }),
        ("ix_client", &["client", "ms", "id"], |a| {
            index::client(&a[0], &a[1], &a[2])
        }),
        ("ix_pipeline", &["pipeline", "ms", "id"], |a| {
            index::pipeline(&a[0], &a[1], &a[2])
        }),
        ("ix_status", &["status", "ms", "id"], |a| {
            index::status(&a[0], &a[1], &a[2])
        }),
        ("at_step", &["step", "field"], |a| at_step(&a[0], &a[1])),
    ]
}

/// Marks where a parameter goes in a builder's output; no key template contains it.
const MARK: char = '\u{1}';

/// A piece of what a builder builds.
#[derive(Debug, PartialEq)]
enum Piece {
    /// Text the template always has (`:task:{`).
    Text(String),
    /// Where a parameter goes, by its name.
    Param(String),
}

/// What `build` builds, in pieces: it is called with a marked placeholder for each
/// parameter, and the marks show where each one went.
fn pieces(params: &[&str], build: Builder) -> Vec<Piece> {
    let marked: Vec<String> = params.iter().map(|p| format!("{MARK}{p}{MARK}")).collect();
    build(&marked)
        .split(MARK)
        .enumerate()
        .filter(|(_, part)| !part.is_empty())
        // Between marks (odd places) are parameter names; the rest is literal text.
        .map(|(i, part)| {
            if i % 2 == 1 {
                Piece::Param(part.to_string())
            } else {
                Piece::Text(part.to_string())
            }
        })
        .collect()
}

/// A Lua function that builds what `build` builds, out of the same pieces.
fn lua_function(name: &str, params: &[&str], build: Builder) -> String {
    let parts: Vec<String> = pieces(params, build)
        .into_iter()
        .map(|piece| match piece {
            Piece::Text(text) => lua_string(&text),
            Piece::Param(name) => name,
        })
        .collect();
    format!(
        "local function {name}({}) return {} end\n",
        params.join(", "),
        parts.join(" .. ")
    )
}

/// `local NAME = setmetatable({ lower_name = 'stored', ... }, <error on unknown names>)`,
/// or the plain table when not `guarded`.
fn lua_table(name: &str, fields: &[(&str, &str)], guarded: bool) -> String {
    let entries: Vec<String> = fields
        .iter()
        .map(|(rust, stored)| format!("{} = {}", rust.to_ascii_lowercase(), lua_string(stored)))
        .collect();
    if !guarded {
        return format!("local {name} = {{{}}}\n", entries.join(", "));
    }
    format!(
        "local {name} = setmetatable({{{}}}, {{__index = function(_, k) \
         error('no field ' .. tostring(k) .. ' in {name}') end}})\n",
        entries.join(", ")
    )
}

/// A Lua string literal.
fn lua_string(text: &str) -> String {
    let mut out = String::from("'");
    for c in text.chars() {
        match c {
            '\\' | '\'' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Every file in `lua/` (lib.lua and the scripts): (file name, source).
    pub(in crate::store) fn lua_files() -> Vec<(String, String)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/store/lua");
        let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&path).unwrap())
            })
            .collect();
        files.sort();
        assert_eq!(
            files.len(),
            18,
            "lib.lua, graph.lua and the sixteen scripts"
        );
        files
    }

    #[test]
    fn a_builder_becomes_lua_that_concatenates_the_same_parts() {
        assert_eq!(
            lua_function("task_key", &["prefix", "id"], |a| keys::task(&a[0], &a[1])),
            "local function task_key(prefix, id) return prefix .. ':task:{' .. id .. '}' end\n"
        );
        assert_eq!(lua_string(r"it's a \ "), r"'it\'s a \\ '");
    }

    #[test]
    fn field_names_are_unique() {
        for all in [task_field::ALL, step_field::ALL] {
            let mut stored: Vec<&str> = all.iter().map(|(_, s)| *s).collect();
            stored.sort_unstable();
            stored.dedup();
            assert_eq!(stored.len(), all.len(), "{all:?}");
        }
    }

    /// The string literals of a Lua source, comments skipped.
    fn literals(lua: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut chars = lua.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '-' if chars.peek() == Some(&'-') => {
                    chars.by_ref().find(|&c| c == '\n');
                }
                '\'' | '"' => {
                    let mut text = String::new();
                    while let Some(d) = chars.next() {
                        match d {
                            '\\' => text.extend(chars.next()),
                            _ if d == c => break,
                            _ => text.push(d),
                        }
                    }
                    out.push(text);
                }
                _ => {}
            }
        }
        out
    }

    #[test]
    fn literals_are_read_from_code_not_comments() {
        let lua = "-- 'st' in a comment\nlocal x = {'a', \"b\\\"c\"} -- 'd'\n";
        assert_eq!(literals(lua), ["a", "b\"c"]);
    }

    /// The scripts take every hash field and key name from the prelude: none spells one.
    #[test]
    fn no_script_spells_a_field_or_key_name_itself() {
        let fields: Vec<&str> = task_field::ALL
            .iter()
            .chain(step_field::ALL)
            .map(|(_, stored)| *stored)
            .collect();
        // The literal text of every key template (`:task:{`, `:q:`, …) and the separators.
        let fragments: Vec<String> = lua_builders()
            .into_iter()
            .flat_map(|(_, params, build)| pieces(params, build))
            .filter_map(|piece| match piece {
                Piece::Text(text) if text.len() > 1 => Some(text),
                _ => None,
            })
            .collect();
        assert!(fragments.contains(&":task:{".to_string()), "{fragments:?}");
        for (file, lua) in lua_files() {
            for literal in literals(&lua) {
                let bare = literal.strip_prefix(':').unwrap_or(&literal);
                assert!(
                    !fields.contains(&bare) && literal != ":",
                    "{file} spells the field name {literal:?}; use F, S, at_step or member"
                );
                for fragment in &fragments {
                    assert!(
                        !literal.contains(fragment.as_str()),
                        "{file} spells the key fragment {fragment:?}; use the key builders"
                    );
                }
            }
        }
    }
}

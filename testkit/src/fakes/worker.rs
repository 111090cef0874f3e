//! A fake worker whose behaviour is scripted per capability: it registers in Redis and
//! heartbeats like a real worker (`common::registry`), takes `POST /work` with the worker
//! token, and reports to the master's `POST /result` on time, late, twice, never, with
//! garbage first, or with a failure; or it refuses steps with `429` or `400`; or it dies.
//! Or it answers what a closure says ([`Answer`]), after a delay, optionally holding chosen
//! steps until the test opens a [`Gate`]. Everything it received, every answer the master
//! gave and the most steps it ran at once are kept in a [`Journal`]; its master may be
//! replaced ([`FakeWorker::set_master`]). Started with [`FakeWorker::start_batching`], it
//! advertises `max_batch` and takes arrays of steps on `POST /work`, answering each as it
//! would have answered it alone (the sizes are in [`Journal::batches`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use common::redis::{RedisPool, RedisSettings};
use common::registry::Registry;
use common::wire::{
    Capability, ReportStatus, ResultReport, StepError, StepRef, TaskId, WorkBatchAnswer,
    WorkItemAnswer, WorkRequest, WorkerId, WorkerRecord,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::server::header;

/// The token between masters and workers that fake workers expect and send.
pub const WORKER_TOKEN: &str = "worker-token-123";

/// How often the fake beats, and how long its record lives without a beat: a master
/// configured with `WORKER_HEARTBEAT_MS` = [`HEARTBEAT`] sees it as a live worker.
pub const HEARTBEAT: Duration = Duration::from_millis(300);
const RECORD_TTL: Duration = Duration::from_millis(900);

/// What a fake worker does with a step of one capability.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Reports `{"capability", "input", "previous": n, "task_input", "worker"}` after
    /// `delay`.
    Succeed { delay: Duration },
    /// Reports a failure.
    Fail { retryable: bool },
    /// Accepts, keeps the step in its heartbeat (so its lease holds) and never reports.
    Hang,
    /// Answers `429` to everything.
    Busy,
    /// Answers `400` to a step whose input has `"poison": true` (as a worker answers a step
    /// it cannot parse); succeeds with the others like `Succeed` after `delay`.
    RefusePoison { delay: Duration },
    /// Takes a step's first attempt and goes quiet: no report, not in its heartbeat, so
    /// the lease lapses. Later attempts are echoed (the input reported as the output).
    SilentOnce,
    /// Sits on a step's first attempt until the second arrives, then reports the first
    /// late (output `{"stale": true}`, which fencing must discard; its answer goes to
    /// [`Journal::late_acks`]) and echoes the second.
    LateOnce,
    /// Before echoing a step's first attempt, sends the master [`GARBAGE_REPORTS`]
    /// malformed, forged or unauthenticated reports (answers in [`Journal::garbage`]).
    GarbageOnce,
    /// Echoes every step and delivers the report three times: twice at once, then once
    /// more.
    Duplicate,
    /// Reports what the [`Answer`] says, after its delay (and its gate, if it holds the
    /// step).
    Answer(Answer),
}

/// What a step's answer is: its output or its failure.
type Script = Arc<dyn Fn(&WorkRequest) -> Result<Value, StepError> + Send + Sync>;

/// Which steps wait at a gate.
type Holds = Arc<dyn Fn(&WorkRequest) -> bool + Send + Sync>;

/// A scripted answer for [`Behavior::Answer`]: a closure of the step, called when the
/// step has waited its delay (so flags it reads are read then), listed in the heartbeat
/// meanwhile.
#[derive(Clone)]
pub struct Answer {
    script: Script,
    delay: Duration,
    gate: Option<(Gate, Holds)>,
}

impl Answer {
    /// Answers `script(step)` at once.
    pub fn new(
        script: impl Fn(&WorkRequest) -> Result<Value, StepError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            script: Arc::new(script),
            delay: Duration::ZERO,
            gate: None,
        }
    }

    /// Answers after `delay` (long enough, say, for steps that run together to be seen
    /// together).
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Steps for which `holds` is true wait at `gate` until the test lets one through
    /// ([`Gate::release`]); the others do not.
    pub fn held(
        mut self,
        gate: &Gate,
        holds: impl Fn(&WorkRequest) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.gate = Some((gate.clone(), Arc::new(holds)));
        self
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("delay", &self.delay)
            .field("held", &self.gate.is_some())
            .finish_non_exhaustive()
    }
}

impl From<Answer> for Behavior {
    fn from(answer: Answer) -> Self {
        Behavior::Answer(answer)
    }
}

/// Where held steps wait (see [`Answer::held`]): closed until the test releases steps,
/// one per permit.
#[derive(Clone, Debug)]
pub struct Gate(Arc<Semaphore>);

impl Gate {
    /// A closed gate.
    pub fn new() -> Self {
        Self(Arc::new(Semaphore::new(0)))
    }

    /// Lets `steps` more held steps through (now, or when they arrive).
    pub fn release(&self, steps: usize) {
        self.0.add_permits(steps);
    }

    /// Waits for a permit and uses it up.
    async fn pass(&self) {
        if let Ok(permit) = self.0.acquire().await {
            permit.forget();
        }
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

/// How many garbage reports [`Behavior::GarbageOnce`] sends per step.
pub const GARBAGE_REPORTS: usize = 15;

/// What a fake worker saw and was told.
#[derive(Default)]
pub struct Journal {
    /// Every step that reached `POST /work` with the right token, in order.
    pub received: Vec<StepRef>,
    /// The same steps in full, as the master sent them.
    pub requests: Vec<WorkRequest>,
    /// Steps accepted and not reported yet, per capability (a step never reported stays
    /// counted).
    pub running: HashMap<String, usize>,
    /// The most steps of a capability that were running at once, per capability.
    pub peak: HashMap<String, usize>,
    /// The master's answers to on-time reports, per (task, step): the `status` of a `200`
    /// (`recorded`, `discarded`), `http NNN`, or `undelivered`.
    pub acks: HashMap<(String, u32), Vec<String>>,
    /// The master's answer to a [`Behavior::LateOnce`] late report, per task.
    pub late_acks: HashMap<String, String>,
    /// (variant, status, body) of every garbage report.
    pub garbage: Vec<(String, u16, String)>,
    /// Steps the [`Behavior::LateOnce`] worker sits on, per task.
    held: HashMap<String, WorkRequest>,
    /// How many steps each array sent to `POST /work` held, in order (a worker started
    /// with [`FakeWorker::start_batching`]).
    pub batches: Vec<usize>,
}

struct Shared {
    id: WorkerId,
    behaviors: HashMap<String, Behavior>,
    /// Changed by [`FakeWorker::set_master`] (a replacement master).
    master_url: Mutex<String>,
    http: reqwest::Client,
    /// What the heartbeat lists, so the master renews these leases.
    in_flight: Mutex<Vec<StepRef>>,
    journal: Mutex<Journal>,
    /// Cancelled by [`FakeWorker::kill`]: a dead worker serves, beats and reports no
    /// more.
    stop: CancellationToken,
}

/// A protocol-following worker for tests, scripted by [`Behavior`].
pub struct FakeWorker {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FakeWorker {
    /// Starts a worker `name` serving `capabilities` alike, at most `max` at once,
    /// registered in `redis`, reporting to `master_url`.
    pub async fn start(
        name: &str,
        capabilities: &[&str],
        max: u32,
        behavior: Behavior,
        redis: &RedisSettings,
        master_url: &str,
    ) -> Self {
        Self::start_batching(name, capabilities, max, 0, behavior, redis, master_url).await
    }

    /// Like [`FakeWorker::start`], taking up to `max_batch` steps in one `POST /work` (`0`:
    /// one step per request).
    pub async fn start_batching(
        name: &str,
        capabilities: &[&str],
        max: u32,
        max_batch: u32,
        behavior: Behavior,
        redis: &RedisSettings,
        master_url: &str,
    ) -> Self {
        let behaviors: Vec<(&str, Behavior)> = capabilities
            .iter()
            .map(|c| (*c, behavior.clone()))
            .collect();
        Self::launch(name, &behaviors, max, max_batch, redis, master_url).await
    }

    /// Like [`FakeWorker::start`], with a behaviour per capability.
    pub async fn start_mixed(
        name: &str,
        behaviors: &[(&str, Behavior)],
        max: u32,
        redis: &RedisSettings,
        master_url: &str,
    ) -> Self {
        Self::launch(name, behaviors, max, 0, redis, master_url).await
    }

    async fn launch(
        name: &str,
        behaviors: &[(&str, Behavior)],
        max: u32,
        max_batch: u32,
        redis: &RedisSettings,
        master_url: &str,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            id: WorkerId::new(name).unwrap(),
            behaviors: behaviors
                .iter()
                .map(|(c, b)| (c.to_string(), b.clone()))
                .collect(),
            master_url: Mutex::new(master_url.to_string()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            in_flight: Mutex::default(),
            journal: Mutex::default(),
            stop: CancellationToken::new(),
        });
        let app = Router::new()
            .route("/work", post(work))
            .with_state(shared.clone());
        let server_stop = shared.stop.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(server_stop.cancelled_owned())
                .await;
        });
        let registry = Registry::new(RedisPool::new(redis).unwrap());
        let mut record = WorkerRecord {
            version: "fake".into(),
            max_batch,
            ..WorkerRecord::starting(
                shared.id.clone(),
                format!("http://{addr}"),
                behaviors
                    .iter()
                    .map(|(c, _)| Capability::new(*c).unwrap())
                    .collect(),
                max,
            )
        };
        registry.heartbeat(&record, RECORD_TTL).await.unwrap();
        let beating = shared.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                record.in_flight = beating.in_flight.lock().unwrap().clone();
                let _ = registry.heartbeat(&record, RECORD_TTL).await;
                tokio::select! {
                    () = tokio::time::sleep(HEARTBEAT) => {}
                    () = beating.stop.cancelled() => return,
                }
            }
        });
        Self {
            shared,
            tasks: vec![server, heartbeat],
        }
    }

    /// Dies at once: no more heartbeats, no reports, connections refused.
    pub fn kill(&mut self) {
        self.shared.stop.cancel();
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    /// Every step it received so far: (task, step, attempt).
    pub fn received(&self) -> Vec<StepRef> {
        self.journal().received.clone()
    }

    /// The steps of `capability` of task `task` it received, in full, in arrival order.
    pub fn requests(&self, task: &str, capability: &str) -> Vec<WorkRequest> {
        self.journal()
            .requests
            .iter()
            .filter(|r| r.task_id.as_str() == task && r.capability.as_str() == capability)
            .cloned()
            .collect()
    }

    /// The most steps of `capability` it ever ran at once.
    pub fn peak(&self, capability: &str) -> usize {
        self.journal().peak.get(capability).copied().unwrap_or(0)
    }

    /// Reports go to `url` from now on (a master replaced by one on another port).
    pub fn set_master(&self, url: &str) {
        *self.shared.master_url.lock().unwrap() = url.to_string();
    }

    /// What it saw and was told; hold the guard briefly, the worker writes to it.
    pub fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.shared.journal.lock().unwrap()
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn work(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if header(&headers, "authorization") != Some(&format!("Bearer {WORKER_TOKEN}")) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if body.first() == Some(&b'[') {
        let Ok(steps) = serde_json::from_slice::<Vec<WorkRequest>>(&body) else {
            return StatusCode::UNPROCESSABLE_ENTITY.into_response();
        };
        shared.journal.lock().unwrap().batches.push(steps.len());
        let steps = steps
            .into_iter()
            .map(|step| WorkItemAnswer {
                status: take(&shared, step).as_u16(),
                duplicate: false,
                error: None,
            })
            .collect();
        return Json(WorkBatchAnswer { steps }).into_response();
    }
    match serde_json::from_slice::<WorkRequest>(&body) {
        Ok(step) => take(&shared, step).into_response(),
        Err(_) => StatusCode::UNPROCESSABLE_ENTITY.into_response(),
    }
}

/// Takes one step (or refuses it), as its behaviour says: the status of the answer.
fn take(shared: &Arc<Shared>, step: WorkRequest) -> StatusCode {
    // A step meant for another worker is refused, as a worker does.
    if step.worker_id.as_ref().is_some_and(|w| *w != shared.id) {
        return StatusCode::MISDIRECTED_REQUEST;
    }
    {
        let mut journal = shared.journal.lock().unwrap();
        journal.received.push(step.step_ref());
        journal.requests.push(step.clone());
    }
    let Some(behavior) = shared.behaviors.get(step.capability.as_str()).cloned() else {
        return StatusCode::BAD_REQUEST;
    };
    match behavior {
        Behavior::Busy => return StatusCode::TOO_MANY_REQUESTS,
        Behavior::RefusePoison { .. } if step.input["poison"] == true => {
            return StatusCode::BAD_REQUEST;
        }
        _ => {}
    }
    // Counted as running from before the master hears it was accepted.
    {
        let mut journal = shared.journal.lock().unwrap();
        let capability = step.capability.to_string();
        let running = journal.running.entry(capability.clone()).or_default();
        *running += 1;
        let now = *running;
        let peak = journal.peak.entry(capability).or_default();
        *peak = (*peak).max(now);
    }
    let worker = shared.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = worker.handle(behavior, step) => {}
            () = worker.stop.cancelled() => {}
        }
    });
    StatusCode::ACCEPTED
}

impl Shared {
    async fn handle(&self, behavior: Behavior, step: WorkRequest) {
        let first = step.attempt == 1;
        let task = step.task_id.to_string();
        match behavior {
            Behavior::Succeed { delay } | Behavior::RefusePoison { delay } => {
                let output = json!({
                    "capability": step.capability,
                    "input": step.input,
                    "previous": step.context.previous.len(),
                    "task_input": step.context.task_input,
                    "worker": self.id,
                });
                self.run(&step, None, delay, || Ok(output), 1).await;
            }
            Behavior::Fail { retryable } => {
                let error = StepError {
                    message: "test failure".into(),
                    retryable,
                    kind: Some("test".into()),
                };
                self.run(&step, None, Duration::ZERO, || Err(error), 1)
                    .await;
            }
            Behavior::Hang => self.in_flight.lock().unwrap().push(step.step_ref()),
            // Refused with `429` before it got here.
            Behavior::Busy => {}
            Behavior::SilentOnce if first => {}
            Behavior::LateOnce if first => {
                self.journal.lock().unwrap().held.insert(task, step);
            }
            Behavior::LateOnce => {
                let held = self.journal.lock().unwrap().held.remove(&task);
                if let Some(old) = held {
                    self.reported(&old);
                    let stale = report(&self.id, &old, Ok(json!({"stale": true})));
                    let ack = self.send(&stale).await;
                    self.journal.lock().unwrap().late_acks.insert(task, ack);
                }
                self.echo(&step, 1).await;
            }
            Behavior::GarbageOnce if first => {
                self.send_garbage(&step).await;
                self.echo(&step, 1).await;
            }
            Behavior::Duplicate => self.echo(&step, 3).await,
            Behavior::SilentOnce | Behavior::GarbageOnce => {
                self.echo(&step, 1).await;
            }
            Behavior::Answer(answer) => {
                let gate = answer
                    .gate
                    .as_ref()
                    .filter(|(_, holds)| holds(&step))
                    .map(|(gate, _)| gate);
                let script = &answer.script;
                self.run(&step, gate, answer.delay, || script(&step), 1)
                    .await;
            }
        }
    }

    /// The step's report is about to go out: it no longer counts as running (the report
    /// lets the master queue what follows, which must not be counted alongside).
    fn reported(&self, step: &WorkRequest) {
        let mut journal = self.journal.lock().unwrap();
        if let Some(n) = journal.running.get_mut(step.capability.as_str()) {
            *n = n.saturating_sub(1);
        }
    }

    /// Where reports go now.
    fn master_url(&self) -> String {
        self.master_url.lock().unwrap().clone()
    }

    /// Reports the input as the output after 10 ms, `times` times.
    async fn echo(&self, step: &WorkRequest, times: usize) {
        let output = step.input.clone();
        self.run(step, None, Duration::from_millis(10), || Ok(output), times)
            .await;
    }

    /// Works on the step, listed in flight: passes `gate` if given, waits `delay`, then
    /// delivers the report of `outcome()` `times` times: twice at once, then one by one.
    async fn run(
        &self,
        step: &WorkRequest,
        gate: Option<&Gate>,
        delay: Duration,
        outcome: impl FnOnce() -> Result<Value, StepError>,
        times: usize,
    ) {
        let r = step.step_ref();
        self.in_flight.lock().unwrap().push(r.clone());
        if let Some(gate) = gate {
            gate.pass().await;
        }
        tokio::time::sleep(delay).await;
        let report = report(&self.id, step, outcome());
        self.reported(step);
        let mut acks = Vec::new();
        if times >= 2 {
            let (a, b) = tokio::join!(self.send(&report), self.send(&report));
            acks.extend([a, b]);
        }
        for _ in acks.len()..times {
            acks.push(self.send(&report).await);
        }
        self.journal
            .lock()
            .unwrap()
            .acks
            .entry((step.task_id.to_string(), step.step))
            .or_default()
            .extend(acks);
        self.in_flight.lock().unwrap().retain(|s| *s != r);
    }

    /// Delivers a report until the master answers, as a worker does: again after a
    /// `5xx`, a `429` or no answer, for up to 20 s.
    async fn send(&self, report: &ResultReport) -> String {
        for _ in 0..200 {
            let sent = self
                .http
                .post(format!("{}/result", self.master_url()))
                .bearer_auth(WORKER_TOKEN)
                .json(report)
                .send()
                .await;
            match sent {
                Ok(r) if r.status() == StatusCode::OK => {
                    let body: Value = r.json().await.unwrap_or_default();
                    return body["status"].as_str().unwrap_or("unreadable").to_string();
                }
                Ok(r)
                    if !r.status().is_server_error()
                        && r.status() != StatusCode::TOO_MANY_REQUESTS =>
                {
                    return format!("http {}", r.status());
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        "undelivered".into()
    }

    async fn send_garbage(&self, step: &WorkRequest) {
        // Listed in flight meanwhile, so the lease holds while the garbage goes out.
        self.in_flight.lock().unwrap().push(step.step_ref());
        let good = report(&self.id, step, Ok(json!({"garbage": true})));
        let with = |f: &dyn Fn(&mut Value)| {
            let mut v = serde_json::to_value(&good).unwrap();
            f(&mut v);
            v.to_string()
        };
        let token = Some(WORKER_TOKEN);
        let variants: [(&str, Option<&str>, String); GARBAGE_REPORTS] = [
            ("not json", token, "{\"task_id\": ".into()),
            ("not a report", token, "{\"hello\": \"world\"}".into()),
            ("an array", token, "[1, 2, 3]".into()),
            (
                "succeeded with an error",
                token,
                with(&|v| v["error"] = json!({"message": "x", "retryable": false})),
            ),
            (
                "failed without an error",
                token,
                with(&|v| v["status"] = json!("failed")),
            ),
            ("attempt 0", token, with(&|v| v["attempt"] = json!(0))),
            ("negative step", token, with(&|v| v["step"] = json!(-1))),
            (
                "unknown status",
                token,
                with(&|v| v["status"] = json!("maybe")),
            ),
            (
                "bad task id",
                token,
                with(&|v| v["task_id"] = json!("../../etc/passwd")),
            ),
            (
                "unknown task",
                token,
                with(&|v| v["task_id"] = json!(TaskId::generate().to_string())),
            ),
            ("step out of range", token, with(&|v| v["step"] = json!(7))),
            ("future attempt", token, with(&|v| v["attempt"] = json!(99))),
            ("wrong token", Some("not-the-token"), with(&|_| {})),
            ("no token", None, with(&|_| {})),
            (
                "error of the wrong type",
                token,
                with(&|v| {
                    v["status"] = json!("failed");
                    v["output"] = Value::Null;
                    v["error"] = json!({"message": 5});
                }),
            ),
        ];
        for (name, token, body) in variants {
            let mut request = self
                .http
                .post(format!("{}/result", self.master_url()))
                .header("content-type", "application/json")
                .body(body);
            if let Some(t) = token {
                request = request.bearer_auth(t);
            }
            let (status, text) = match request.send().await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            };
            self.journal
                .lock()
                .unwrap()
                .garbage
                .push((name.to_string(), status, text));
        }
    }
}

/// A well-formed report of `outcome` for `step`.
pub fn report(
    worker: &WorkerId,
    step: &WorkRequest,
    outcome: Result<Value, StepError>,
) -> ResultReport {
    let (status, output, error) = match outcome {
        Ok(v) => (ReportStatus::Succeeded, Some(v), None),
        Err(e) => (ReportStatus::Failed, None, Some(e)),
    };
    ResultReport {
        task_id: step.task_id.clone(),
        step: step.step,
        attempt: step.attempt,
        worker_id: worker.clone(),
        status,
        output,
        error,
        duration_ms: Some(1),
    }
}

//! The dispatcher: for each capability with queued steps, claims steps for live workers
//! with free slots and `POST`s them to `{worker}/work`; a reaper re-queues steps whose
//! lease lapsed and moves retries whose backoff is over; a metrics loop publishes queue
//! gauges (and CloudWatch EMF lines). Every replica runs all of it: the store's scripts
//! make the races harmless.

pub mod select;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::registry::Registry;
use common::wire::{
    Capability, ReportStatus, ResultReport, StepRef, WorkerId, WorkerRecord, now_ms,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::hub::Hub;
use crate::metrics;
use crate::store::{
    Claimed, ReportOutcome, RetryPolicy, StoreError, TaskStore, lease_expired_error,
};

/// Where the dispatcher learns which workers are alive.
#[async_trait]
pub trait WorkerSource: Send + Sync + 'static {
    /// The live workers' records.
    async fn live(&self) -> Result<Vec<WorkerRecord>, StoreError>;
}

#[async_trait]
impl WorkerSource for Registry {
    async fn live(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        Ok(Registry::live(self).await?)
    }
}

/// Most steps claimed in one round trip.
const BATCH: usize = 64;
/// How often the worker view is refreshed from the registry.
const REFRESH: Duration = Duration::from_millis(250);
/// How often leases and retry backoffs are checked.
const REAP: Duration = Duration::from_millis(250);

/// What the dispatcher knows about workers, refreshed every [`REFRESH`].
#[derive(Default)]
struct View {
    workers: Vec<WorkerRecord>,
    /// Steps in flight per worker: the store's count, plus what this replica claimed since.
    load: HashMap<String, u32>,
    capabilities: Vec<Capability>,
}

/// The dispatcher of one master replica.
pub struct Dispatcher {
    config: Arc<Config>,
    store: Arc<dyn TaskStore>,
    workers: Arc<dyn WorkerSource>,
    hub: Arc<Hub>,
    http: reqwest::Client,
    view: RwLock<View>,
    /// Workers not to use until the instant (they refused or failed a dispatch).
    skip: Mutex<HashMap<String, Instant>>,
    /// Capabilities that have a dispatch loop.
    loops: Mutex<HashSet<String>>,
    configured: Vec<Capability>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Whether the last store call failed (to log an outage once, not per call).
    store_down: std::sync::atomic::AtomicBool,
}

impl Dispatcher {
    /// A dispatcher; call [`Dispatcher::start`] to run it.
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn TaskStore>,
        workers: Arc<dyn WorkerSource>,
        hub: Arc<Hub>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let mut configured: Vec<Capability> = config
            .all_pipelines()
            .values()
            .flat_map(|p| p.steps.iter().map(|s| s.capability().clone()))
            .collect();
        configured.sort();
        configured.dedup();
        Arc::new(Self {
            http: common::http::client(Duration::from_millis(config.dispatch_timeout_ms)),
            config,
            store,
            workers,
            hub,
            view: RwLock::new(View::default()),
            skip: Mutex::new(HashMap::new()),
            loops: Mutex::new(HashSet::new()),
            configured,
            tracker,
            shutdown,
            store_down: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Starts the refresher, the reaper, the metrics loop and a dispatch loop per
    /// capability (more start as capabilities appear).
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        self.tracker.spawn(async move { me.refresh_loop().await });
        let me = self.clone();
        self.tracker.spawn(async move { me.reap_loop().await });
        let me = self.clone();
        self.tracker.spawn(async move { me.metrics_loop().await });
        for cap in self.configured.clone() {
            self.ensure_loop(&cap);
        }
    }

    /// The capabilities this replica dispatches.
    pub fn capabilities(&self) -> Vec<Capability> {
        self.read_view().capabilities.clone()
    }

    /// The live workers and their loads, as last seen.
    pub fn workers(&self) -> (Vec<WorkerRecord>, HashMap<String, u32>) {
        let v = self.read_view();
        (v.workers.clone(), v.load.clone())
    }

    /// Whether a capability is known (configured, served by a live worker, or seen before).
    pub fn knows(&self, capability: &Capability) -> bool {
        self.configured.contains(capability) || self.read_view().capabilities.contains(capability)
    }

    /// Starts a dispatch loop for a capability if it has none.
    pub fn ensure_loop(self: &Arc<Self>, capability: &Capability) {
        let new = self
            .loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(capability.to_string());
        if new {
            let me = self.clone();
            let cap = capability.clone();
            self.tracker
                .spawn(async move { me.dispatch_loop(cap).await });
        }
    }

    /// A step this replica recorded finished: its worker has a free slot again.
    pub fn step_done(&self, worker: &WorkerId) {
        let mut v = self.write_view();
        if let Some(n) = v.load.get_mut(worker.as_str()) {
            *n = n.saturating_sub(1);
        }
    }

    fn read_view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_view(&self) -> std::sync::RwLockWriteGuard<'_, View> {
        self.view.write().unwrap_or_else(|p| p.into_inner())
    }

    fn skipped(&self) -> HashSet<String> {
        let now = Instant::now();
        let mut skip = self.skip.lock().unwrap_or_else(|p| p.into_inner());
        skip.retain(|_, until| *until > now);
        skip.keys().cloned().collect()
    }

    fn skip_worker(&self, worker: &WorkerId, for_how_long: Duration) {
        self.skip
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(worker.to_string(), Instant::now() + for_how_long);
    }

    fn store_result<T>(&self, what: &str, r: Result<T, StoreError>) -> Option<T> {
        use std::sync::atomic::Ordering;
        match r {
            Ok(v) => {
                if self.store_down.swap(false, Ordering::Relaxed) {
                    tracing::info!("task store reachable again");
                }
                Some(v)
            }
            Err(e) => {
                if !self.store_down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, during = what, "task store unavailable; retrying");
                }
                None
            }
        }
    }

    async fn refresh(self: &Arc<Self>) {
        let workers = self.workers.live().await;
        let Some(workers) = self.store_result("listing workers", workers) else {
            return;
        };
        let loads = self.store.worker_loads().await;
        let Some(load) = self.store_result("reading worker loads", loads) else {
            return;
        };
        let stored = self.store.capabilities().await.unwrap_or_default();
        let mut caps: Vec<Capability> = self.configured.clone();
        caps.extend(workers.iter().flat_map(|w| w.capabilities.iter().cloned()));
        caps.extend(stored);
        caps.sort();
        caps.dedup();
        let appeared = {
            let v = self.read_view();
            workers
                .iter()
                .any(|w| !v.workers.iter().any(|o| o.id == w.id))
        };
        for cap in &caps {
            self.ensure_loop(cap);
        }
        *self.write_view() = View {
            workers,
            load,
            capabilities: caps,
        };
        if appeared {
            self.hub.wake_all_dispatchers();
        }
    }

    async fn refresh_loop(self: Arc<Self>) {
        loop {
            self.refresh().await;
            tokio::select! {
                () = tokio::time::sleep(REFRESH) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn dispatch_loop(self: Arc<Self>, cap: Capability) {
        let notify = self.hub.capability(cap.as_str());
        let poll = Duration::from_millis(self.config.dispatch_poll_ms);
        loop {
            while self.dispatch_batch(&cap).await {
                if self.shutdown.is_cancelled() {
                    return;
                }
            }
            tokio::select! {
                () = notify.notified() => {}
                () = tokio::time::sleep(poll) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Claims and sends one batch. Returns whether there may be more to do right away.
    async fn dispatch_batch(self: &Arc<Self>, cap: &Capability) -> bool {
        let skipped = self.skipped();
        let skip = |w: &WorkerId| skipped.contains(w.as_str());
        let assigned = {
            let v = self.read_view();
            let free = select::free_slots(cap, &v.workers, &v.load, &skip);
            select::assign(cap, &v.workers, &v.load, &skip, free.min(BATCH))
        };
        if assigned.is_empty() {
            return false;
        }
        let lease = self.config.lease();
        let claimed = self.store.claim(cap, &assigned, lease).await;
        let Some(claimed) = self.store_result("claiming steps", claimed) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return false;
        };
        let more = claimed.len() == assigned.len();
        {
            let mut v = self.write_view();
            for c in &claimed {
                *v.load.entry(c.worker.to_string()).or_insert(0) += 1;
            }
        }
        for c in claimed {
            let me = self.clone();
            self.tracker.spawn(async move { me.send(c).await });
        }
        more
    }

    async fn send(self: Arc<Self>, claimed: Claimed) {
        let url = {
            let v = self.read_view();
            v.workers
                .iter()
                .find(|w| w.id == claimed.worker)
                .map(|w| w.url.trim_end_matches('/').to_string())
        };
        let cap = claimed.work.capability.clone();
        let step = claimed.work.step_ref();
        let outcome = match url {
            None => Err((Duration::from_secs(1), "worker is gone".to_string())),
            Some(url) => {
                let sent = self
                    .http
                    .post(format!("{url}/work"))
                    .bearer_auth(self.config.worker_token.expose())
                    .header(&common::telemetry::REQUEST_ID, &claimed.request_id)
                    .json(&claimed.work)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                        // Full: no attempt spent, try the others; its slots look taken
                        // until the next refresh.
                        let mut v = self.write_view();
                        let max = v
                            .workers
                            .iter()
                            .find(|w| w.id == claimed.worker)
                            .map_or(0, |w| w.max_concurrency);
                        v.load.insert(claimed.worker.to_string(), max);
                        Err((Duration::ZERO, "worker at capacity (429)".into()))
                    }
                    Ok(r) => Err((
                        Duration::from_secs(if r.status().is_client_error() { 10 } else { 2 }),
                        format!("worker answered {}", r.status()),
                    )),
                    Err(e) => Err((Duration::from_secs(2), format!("dispatch failed: {e}"))),
                }
            }
        };
        match outcome {
            Ok(()) => {
                metrics::step_dispatched(&cap);
                tracing::debug!(task_id = %step.task_id, step = step.step, attempt = step.attempt,
                    worker = %claimed.worker, "step dispatched");
            }
            Err((skip, why)) => {
                if !skip.is_zero() {
                    tracing::warn!(task_id = %step.task_id, worker = %claimed.worker, reason = %why,
                        "dispatch refused; step goes back to the queue");
                    self.skip_worker(&claimed.worker, skip);
                }
                self.step_done(&claimed.worker);
                let released = self.store.release(&step).await;
                if self.store_result("releasing a step", released).is_some() {
                    self.hub.work_queued(cap.as_str());
                }
            }
        }
    }

    async fn reap_loop(self: Arc<Self>) {
        loop {
            for cap in self.capabilities() {
                self.reap(&cap).await;
            }
            tokio::select! {
                () = tokio::time::sleep(REAP) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn reap(&self, cap: &Capability) {
        let promoted = self.store.promote_due(cap).await;
        if self
            .store_result("promoting retries", promoted)
            .is_some_and(|n| n > 0)
        {
            self.hub.work_queued(cap.as_str());
        }
        let expired = self.store.expired_leases(cap, 500).await;
        let Some(expired) = self.store_result("reading leases", expired) else {
            return;
        };
        if expired.is_empty() {
            return;
        }
        let now = now_ms();
        let lease_ms = self.config.lease_ms;
        let (extend, lapse): (Vec<_>, Vec<_>) = {
            let v = self.read_view();
            expired.into_iter().partition(|l| {
                let overdue = now > l.dispatched_at_ms + l.timeout_ms + lease_ms;
                !overdue
                    && v.workers
                        .iter()
                        .any(|w| w.id == l.worker && w.in_flight.contains(&l.step))
            })
        };
        let steps: Vec<StepRef> = extend.into_iter().map(|l| l.step).collect();
        let extended = self
            .store
            .extend_leases(cap, &steps, self.config.lease())
            .await;
        self.store_result("extending leases", extended);
        for l in lapse {
            let report = ResultReport {
                task_id: l.step.task_id.clone(),
                step: l.step.step,
                attempt: l.step.attempt,
                worker_id: l.worker.clone(),
                status: ReportStatus::Failed,
                output: None,
                error: Some(lease_expired_error(&l.worker)),
                duration_ms: None,
            };
            let recorded = self
                .store
                .report(
                    &report,
                    self.retry_policy(),
                    rand::random(),
                    self.config.retention(),
                )
                .await;
            if let Some(outcome) = self.store_result("re-queueing a lapsed step", recorded) {
                if outcome != ReportOutcome::Discarded {
                    tracing::warn!(task_id = %l.step.task_id, step = l.step.step,
                        attempt = l.step.attempt, worker = %l.worker,
                        "lease lapsed; step re-queued");
                    metrics::lease_expired(cap);
                    self.step_done(&l.worker);
                }
                self.after_report(&report, &outcome);
            }
        }
    }

    /// The retry policy from the config.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(self.config.retry_base_ms),
            max: Duration::from_millis(self.config.retry_max_ms),
        }
    }

    /// Wake-ups and metrics after a report (or lapse) was recorded.
    pub fn after_report(&self, report: &ResultReport, outcome: &ReportOutcome) {
        match outcome {
            ReportOutcome::Discarded => {}
            // Every recorded outcome frees a worker slot of the finished step's capability:
            // wake its dispatcher so a backlog does not wait for the next poll.
            ReportOutcome::Next { finished, next } => {
                metrics::step_finished(finished, true);
                self.hub.work_queued(next.as_str());
                self.hub.work_queued(finished.capability.as_str());
            }
            ReportOutcome::Retry { finished, .. } => {
                metrics::step_finished(finished, false);
                metrics::step_retried(&finished.capability);
                self.hub.work_queued(finished.capability.as_str());
            }
            ReportOutcome::Done {
                finished, status, ..
            } => {
                self.hub.work_queued(finished.capability.as_str());
                metrics::step_finished(finished, *status == common::wire::TaskStatus::Succeeded);
                metrics::task_finished(*status);
                // The last report's outcome is the task's: hand it to local long polls.
                let succeeded = *status == common::wire::TaskStatus::Succeeded;
                self.hub.task_finished_with(common::wire::TaskResult {
                    task_id: report.task_id.clone(),
                    status: *status,
                    result: succeeded.then(|| report.output.clone().unwrap_or_default()),
                    error: (!succeeded).then(|| report.error.clone()).flatten(),
                });
            }
        }
    }

    async fn metrics_loop(self: Arc<Self>) {
        let every = Duration::from_millis(self.config.metrics_interval_ms);
        let mut emf = crate::emf::EmfState::default();
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.shutdown.cancelled() => return,
            }
            let caps = self.capabilities();
            let stats = self.store.stats(&caps, self.config.retention()).await;
            let Some(stats) = self.store_result("reading queue stats", stats) else {
                metrics::redis_error();
                continue;
            };
            let workers = self.read_view().workers.clone();
            let rows = metrics::publish_queue_gauges(&stats, &workers, now_ms());
            if self.config.metrics_emf {
                for line in emf.lines(&rows, now_ms()) {
                    println!("{line}");
                }
            }
        }
    }
}

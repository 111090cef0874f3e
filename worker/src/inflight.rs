//! The steps this worker holds: admitted on `POST /work`, released once their result is
//! delivered or given up. The heartbeat lists them, so the master keeps their leases alive;
//! admission enforces `MAX_CONCURRENCY`, drops duplicates, and refuses work while draining,
//! degraded (results cannot reach the master) or unavailable (an `http` agent's service
//! fails its health check).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use common::wire::StepRef;

/// What [`InFlight::admit`] decided.
#[derive(Debug)]
pub enum Admission {
    /// A new step: run it, and drop the guard when its result is settled.
    New(InFlightGuard),
    /// This attempt is already held; do not run it twice.
    Duplicate,
    /// `MAX_CONCURRENCY` steps are held.
    Full,
    /// The worker is draining.
    Draining,
    /// The worker cannot deliver results (the reason): a step taken now would only sit
    /// here until its lease lapsed.
    Degraded(String),
    /// An agent service this worker forwards steps to is down (the reason): a step taken
    /// now would only fail.
    Unavailable(String),
}

/// The in-flight table.
#[derive(Debug)]
pub struct InFlight {
    state: Mutex<State>,
    /// The most steps held at once.
    max: usize,
    /// The worker's id, as the in-flight gauge's label (several workers share a process in
    /// the all-in-one launcher and in tests).
    worker: String,
}

#[derive(Debug, Default)]
struct State {
    steps: HashSet<StepRef>,
    draining: bool,
    /// Why results cannot reach the master, while they cannot. Kept here, beside
    /// `draining`, so that admission checks it under the same lock.
    degraded: Option<String>,
    /// Why an agent service is down, while it is. Unlike `degraded`, the master keeps the
    /// leases of the steps held: their results can still be delivered.
    unavailable: Option<String>,
}

impl InFlight {
    /// An empty table for at most `max` steps.
    pub fn new(max: usize, worker: &str) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            max,
            worker: worker.to_string(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves consistent data (every critical section
        // is one insert, remove or copy), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a step attempt, atomically with the capacity, duplicate and drain checks.
    pub fn admit(self: &Arc<Self>, step: StepRef) -> Admission {
        let mut state = self.lock();
        if state.draining {
            return Admission::Draining;
        }
        if state.steps.contains(&step) {
            return Admission::Duplicate;
        }
        if let Some(reason) = &state.degraded {
            return Admission::Degraded(reason.clone());
        }
        if let Some(reason) = &state.unavailable {
            return Admission::Unavailable(reason.clone());
        }
        if state.steps.len() >= self.max {
            return Admission::Full;
        }
        state.steps.insert(step.clone());
        self.set_gauge(state.steps.len());
        Admission::New(InFlightGuard {
            table: self.clone(),
            step,
        })
    }

    /// Refuses new work from now on.
    pub fn start_draining(&self) {
        self.lock().draining = true;
    }

    /// Whether the worker is draining.
    pub fn is_draining(&self) -> bool {
        self.lock().draining
    }

    /// Marks the worker degraded (`Some(reason)`: it takes no new steps) or healthy again
    /// (`None`). Returns whether that changed anything.
    pub fn set_degraded(&self, reason: Option<String>) -> bool {
        let healthy = reason.is_none();
        let changed = {
            let mut state = self.lock();
            let changed = state.degraded.is_none() != healthy;
            state.degraded = reason;
            changed
        };
        metrics::gauge!(crate::metrics::DEGRADED, "worker" => self.worker.clone())
            .set(if healthy { 0.0 } else { 1.0 });
        changed
    }

    /// Why the worker is degraded, if it is.
    pub fn degraded(&self) -> Option<String> {
        self.lock().degraded.clone()
    }

    /// Marks the worker unavailable (`Some(reason)`: an agent service is down, so it takes
    /// no new steps) or available again (`None`). Returns whether that changed anything; a
    /// new reason while already unavailable replaces the old one but is no change.
    pub fn set_unavailable(&self, reason: Option<String>) -> bool {
        let available = reason.is_none();
        let changed = {
            let mut state = self.lock();
            let changed = state.unavailable.is_none() != available;
            state.unavailable = reason;
            changed
        };
        metrics::gauge!(crate::metrics::AGENT_UNAVAILABLE, "worker" => self.worker.clone())
            .set(if available { 0.0 } else { 1.0 });
        changed
    }

    /// Why the worker is unavailable, if it is.
    pub fn unavailable(&self) -> Option<String> {
        self.lock().unavailable.clone()
    }

    /// The steps held now, for the heartbeat record.
    pub fn snapshot(&self) -> Vec<StepRef> {
        let mut steps: Vec<StepRef> = self.lock().steps.iter().cloned().collect();
        steps.sort_by(|a, b| {
            (a.task_id.as_str(), a.step, a.attempt).cmp(&(b.task_id.as_str(), b.step, b.attempt))
        });
        steps
    }

    /// How many steps are held.
    pub fn len(&self) -> usize {
        self.lock().steps.len()
    }

    /// Whether no step is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn release(&self, step: &StepRef) {
        let len = {
            let mut state = self.lock();
            state.steps.remove(step);
            state.steps.len()
        };
        self.set_gauge(len);
    }

    fn set_gauge(&self, len: usize) {
        metrics::gauge!(crate::metrics::IN_FLIGHT, "worker" => self.worker.clone()).set(len as f64);
    }
}

/// Holds a step in the table; dropping it releases the step, however the step ends
/// (delivered, given up, aborted at the end of a drain, or a panic).
#[derive(Debug)]
pub struct InFlightGuard {
    table: Arc<InFlight>,
    step: StepRef,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.table.release(&self.step);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use common::wire::TaskId;

    use super::*;

    fn step(n: u32) -> StepRef {
        StepRef {
            task_id: TaskId::new("t").unwrap(),
            step: n,
            attempt: 1,
        }
    }

    #[test]
    fn admission_checks_duplicates_capacity_and_drain() {
        let table = InFlight::new(2, "w");
        let a = table.admit(step(0));
        assert!(matches!(a, Admission::New(_)));
        assert!(matches!(table.admit(step(0)), Admission::Duplicate));
        let b = table.admit(step(1));
        assert!(matches!(b, Admission::New(_)));
        assert!(matches!(table.admit(step(2)), Admission::Full));
        drop(a);
        assert_eq!(table.snapshot(), vec![step(1)]);
        table.start_draining();
        assert!(matches!(table.admit(step(3)), Admission::Draining));
        drop(b);
        assert!(table.is_empty());
    }

    #[test]
    fn a_degraded_worker_admits_nothing_new_until_it_recovers() {
        let table = InFlight::new(2, "w");
        let held = table.admit(step(0));
        assert!(table.set_degraded(Some("cannot deliver".into())));
        assert!(
            !table.set_degraded(Some("still cannot".into())),
            "only a change of state counts"
        );
        assert_eq!(table.degraded().as_deref(), Some("still cannot"));
        assert!(matches!(table.admit(step(1)), Admission::Degraded(r) if r == "still cannot"));
        assert!(
            matches!(table.admit(step(0)), Admission::Duplicate),
            "a step already held is still acknowledged"
        );
        assert!(table.set_degraded(None));
        assert!(matches!(table.admit(step(1)), Admission::New(_)));
        drop(held);
    }

    #[test]
    fn an_unavailable_worker_admits_nothing_new_but_keeps_what_it_holds() {
        let table = InFlight::new(2, "w");
        let held = table.admit(step(0));
        assert!(table.set_unavailable(Some("agent down".into())));
        assert!(!table.set_unavailable(Some("agent still down".into())));
        assert_eq!(table.unavailable().as_deref(), Some("agent still down"));
        assert!(
            matches!(table.admit(step(1)), Admission::Unavailable(r) if r == "agent still down")
        );
        assert!(matches!(table.admit(step(0)), Admission::Duplicate));
        assert_eq!(table.snapshot(), vec![step(0)], "still held");
        assert!(table.set_unavailable(None));
        assert!(!table.set_unavailable(None));
        assert!(matches!(table.admit(step(1)), Admission::New(_)));
        drop(held);
    }
}

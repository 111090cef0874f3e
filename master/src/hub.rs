//! Wake-ups inside one master process: dispatchers wait for "work queued for capability X",
//! long-polling clients wait for "task Y finished". Other replicas' events arrive through
//! Redis pub/sub (see `dispatch::listen`) and land here too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::wire::TaskResult;
use tokio::sync::Notify;

/// Per-capability and per-task notifications.
#[derive(Default, Debug)]
pub struct Hub {
    capabilities: Mutex<HashMap<String, Arc<Notify>>>,
    tasks: Mutex<HashMap<String, Arc<TaskWaiter>>>,
}

/// Long-polls waiting for one task.
#[derive(Default, Debug)]
pub struct TaskWaiter {
    /// Woken when the task finishes (or may have).
    pub notify: Notify,
    /// The final result, when this replica recorded it: waiters answer without reading the
    /// store again.
    pub outcome: Mutex<Option<TaskResult>>,
}

impl TaskWaiter {
    /// The final result, if this replica recorded it.
    pub fn outcome(&self) -> Option<TaskResult> {
        self.outcome
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl Hub {
    /// The notifier of a capability's queue (created on first use).
    pub fn capability(&self, capability: &str) -> Arc<Notify> {
        let mut map = self
            .capabilities
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.entry(capability.to_string()).or_default().clone()
    }

    /// Work was queued for a capability: wake its dispatcher.
    pub fn work_queued(&self, capability: &str) {
        // notify_one stores a permit, so a dispatcher that is busy sees it on its next wait.
        self.capability(capability).notify_one();
    }

    /// Wakes every dispatcher (a worker appeared, or events may have been missed).
    pub fn wake_all_dispatchers(&self) {
        let map = self
            .capabilities
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for n in map.values() {
            n.notify_one();
        }
    }

    /// A waiter for a task's end. Call [`Self::release_waiter`] when done with it.
    pub fn task_waiter(&self, task_id: &str) -> Arc<TaskWaiter> {
        let mut map = self
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.entry(task_id.to_string()).or_default().clone()
    }

    /// Drops the entry of a task nobody waits for any more.
    pub fn release_waiter(&self, task_id: &str, waiter: Arc<TaskWaiter>) {
        let mut map = self
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        drop(waiter);
        if map.get(task_id).is_some_and(|n| Arc::strong_count(n) == 1) {
            map.remove(task_id);
        }
    }

    /// A task finished (or changed in a way a waiter should look at).
    pub fn task_finished(&self, task_id: &str) {
        self.finish(task_id, None);
    }

    /// A task finished with this result, recorded by this replica.
    pub fn task_finished_with(&self, result: TaskResult) {
        let id = result.task_id.to_string();
        self.finish(&id, Some(result));
    }

    fn finish(&self, task_id: &str, result: Option<TaskResult>) {
        let map = self
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(w) = map.get(task_id) {
            if result.is_some() {
                *w.outcome.lock().unwrap_or_else(|p| p.into_inner()) = result;
            }
            w.notify.notify_waiters();
        }
    }

    /// Wakes every long-poll waiter so it re-reads (after a pub/sub reconnect).
    pub fn wake_all_waiters(&self) {
        let map = self
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for w in map.values() {
            w.notify.notify_waiters();
        }
    }
}

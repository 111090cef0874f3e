//! Wake-ups inside one master process: dispatchers wait for "work queued for capability X",
//! long-polling clients wait for "task Y finished". Other replicas' events arrive through
//! Redis pub/sub (see `dispatch::events`) and land here too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::wire::TaskResult;
use tokio::sync::Notify;

/// Per-capability and per-task notifications.
#[derive(Default, Debug)]
pub struct Hub {
    /// One notifier per capability, woken when its queue may have work: its dispatch loop
    /// claims at once instead of at its next poll.
    capabilities: Mutex<HashMap<String, Arc<Notify>>>,
    /// Waiters per task id, only while someone long-polls it (see [`WaiterGuard`]), so the
    /// map stays as small as the number of polled tasks.
    tasks: Mutex<HashMap<String, Arc<TaskWaiter>>>,
}

/// One holder of a task's waiter; releases it when dropped.
#[derive(Debug)]
pub struct WaiterGuard<'a> {
    /// Whose map the waiter is removed from when the last holder leaves.
    hub: &'a Hub,
    /// The map's key for it.
    task_id: String,
    /// Shared by everyone polling this task; counted to know who leaves last.
    waiter: Arc<TaskWaiter>,
}

impl std::ops::Deref for WaiterGuard<'_> {
    type Target = TaskWaiter;

    fn deref(&self) -> &TaskWaiter {
        &self.waiter
    }
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        let mut map = self
            .hub
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Held by the map and this guard alone: the last waiter is leaving. New holders
        // need this lock to clone it, so none can appear meanwhile.
        if map
            .get(&self.task_id)
            .is_some_and(|w| Arc::ptr_eq(w, &self.waiter) && Arc::strong_count(w) == 2)
        {
            map.remove(&self.task_id);
        }
    }
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

    /// A waiter for a task's end, shared by everyone waiting for it on this replica. The
    /// entry goes when the last holder's guard drops, however its request ended (a
    /// client that hangs up mid-poll included), so the map does not grow.
    pub fn task_waiter(&self, task_id: &str) -> WaiterGuard<'_> {
        let mut map = self
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let waiter = map.entry(task_id.to_string()).or_default().clone();
        WaiterGuard {
            hub: self,
            task_id: task_id.to_string(),
            waiter,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// How many tasks have waiters.
    fn waiting_tasks(hub: &Hub) -> usize {
        hub.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    #[tokio::test]
    async fn a_waiter_is_dropped_with_its_last_holder_even_when_a_poll_is_abandoned() {
        let hub = Arc::new(Hub::default());
        let first = hub.task_waiter("t");
        let second = hub.task_waiter("t");
        assert_eq!(waiting_tasks(&hub), 1);
        drop(first);
        assert_eq!(waiting_tasks(&hub), 1, "still held by the second");
        drop(second);
        assert_eq!(waiting_tasks(&hub), 0);
        // A long poll whose client hangs up: its future is dropped mid-wait.
        let poll = {
            let hub = hub.clone();
            tokio::spawn(async move {
                let waiter = hub.task_waiter("t");
                waiter.notify.notified().await;
            })
        };
        while waiting_tasks(&hub) == 0 {
            tokio::task::yield_now().await;
        }
        poll.abort();
        let _ = poll.await;
        assert_eq!(
            waiting_tasks(&hub),
            0,
            "the abandoned poll left nothing behind"
        );
    }
}

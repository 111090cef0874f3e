//! Completions as the store announces them: the `done:{task}` messages on the events
//! channel, counted per task. A test that must show something finished exactly once counts
//! these rather than a metric: metrics are process-wide, shared by every test in the binary.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;

/// Counts `done:{task}` messages on the events channel: the store publishes one in the
/// same script that moves a task to a terminal state, so a task finished twice shows up as
/// two. Reconnects on its own; during a Redis outage it can miss messages (it can only
/// under-count, so a count above one is always real).
pub struct DoneEvents {
    counts: Arc<Mutex<HashMap<String, u32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DoneEvents {
    /// Subscribes to the events channel of the Redis at `redis_url` under `prefix`, and
    /// returns once subscribed, so no completion after this call is missed.
    pub async fn subscribe(redis_url: &str, prefix: &str) -> Self {
        let client = redis::Client::open(redis_url).expect("redis url");
        let channel = common::registry::keys::events(prefix);
        let counts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let c = counts.clone();
        let task = tokio::spawn(async move {
            loop {
                let subscribed = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                };
                if let Ok(Ok(pubsub)) =
                    tokio::time::timeout(Duration::from_secs(2), subscribed).await
                {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        let Ok(payload) = msg.get_payload::<String>() else {
                            continue;
                        };
                        if let Some(id) = payload.strip_prefix("done:") {
                            *c.lock().unwrap().entry(id.to_string()).or_default() += 1;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("subscribed to the events channel")
            .expect("subscriber alive");
        Self { counts, task }
    }

    /// How many times task `id` finished.
    pub fn count(&self, id: &str) -> u32 {
        self.counts.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    /// How many distinct tasks finished so far.
    pub fn finished(&self) -> usize {
        self.counts.lock().unwrap().len()
    }

    /// Waits (bounded) until at least `n` tasks finished.
    pub async fn wait_finished(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.finished() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            self.finished() >= n,
            "only {} tasks finished in {within:?}",
            self.finished()
        );
    }
}

impl Drop for DoneEvents {
    fn drop(&mut self) {
        self.task.abort();
    }
}

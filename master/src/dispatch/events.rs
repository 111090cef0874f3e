//! The events subscription: what other replicas publish on the Redis events channel
//! (tasks they finished, workers that appeared) wakes this replica's long polls and
//! dispatch loops through the [`Hub`].

use std::sync::Arc;
use std::time::Duration;

use common::redis::RedisSettings;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;

/// Subscribes to the events channel: `done:{task}` wakes long-polls on this replica,
/// `worker:{id}` wakes the dispatchers. Reconnects on its own; after a reconnect everyone
/// re-reads, since messages may have been missed.
pub(crate) async fn listen(settings: RedisSettings, hub: Arc<Hub>, shutdown: CancellationToken) {
    let channel = common::registry::keys::events(&settings.key_prefix);
    let mut backoff = Duration::from_millis(100);
    loop {
        let client = match common::redis::dedicated_client(&settings).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "events subscription cannot be configured");
                return;
            }
        };
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(5), subscribed) => r,
            () = shutdown.cancelled() => return,
        };
        match pubsub {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(100);
                hub.wake_all_waiters();
                hub.wake_all_dispatchers();
                let mut messages = pubsub.into_on_message();
                loop {
                    let msg = tokio::select! {
                        m = messages.next() => m,
                        () = shutdown.cancelled() => return,
                    };
                    let Some(msg) = msg else { break };
                    let Ok(payload) = msg.get_payload::<String>() else {
                        continue;
                    };
                    if let Some(task) = payload.strip_prefix("done:") {
                        hub.task_finished(task);
                    } else if payload.starts_with("worker:") {
                        hub.wake_all_dispatchers();
                    }
                }
                tracing::warn!("events subscription lost; reconnecting");
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %common::redis::describe(&e), "events subscription failed")
            }
            Err(_) => tracing::debug!("events subscription timed out"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

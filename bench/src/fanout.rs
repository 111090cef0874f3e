//! F1, the fan-out benchmark: one task maps a no-op (`echo`) step over a wide array
//! (1,000 elements by default, the most a map may have), then one join step takes the
//! instances' outputs. It measures how long the whole graph takes, submit to result, and
//! what it costs Redis per element: the cost of the map's bookkeeping (an instance slot
//! each, queued `concurrency` at a time, counted into the join) on top of a plain step's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::client::{MasterClient, Outcome};
use crate::cluster::{CAPABILITY, QueueCluster};

/// Elements of the warm-up task, which loads the scripts and opens the connections.
const WARM_UP_WIDTH: usize = 10;

/// One F1 run.
#[derive(Clone, Debug)]
pub struct FanOutRun {
    /// Elements mapped over.
    pub width: usize,
    /// Submit to the result read.
    pub elapsed: Duration,
    /// Redis calls per command during the task (empty without a Redis URL).
    pub commands: BTreeMap<String, u64>,
}

impl FanOutRun {
    /// Steps run per second: every instance and the join.
    pub fn steps_per_sec(&self) -> f64 {
        (self.width + 1) as f64 / self.elapsed.as_secs_f64()
    }

    /// Redis commands per element (`None` without a Redis URL).
    pub fn commands_per_element(&self) -> Option<f64> {
        if self.commands.is_empty() {
            return None;
        }
        Some(self.commands.values().sum::<u64>() as f64 / self.width as f64)
    }
}

/// The body of a fan-out task: `fan` maps `echo` over `width` numbers, `concurrency` at a
/// time; `join` echoes the array of their outputs.
pub fn body(width: usize, concurrency: usize) -> Bytes {
    let items: Vec<usize> = (0..width).collect();
    Bytes::from(
        json!({
            "steps": [
                {"id": "fan", "capability": CAPABILITY, "needs": [],
                 "map": {"over": "input.items", "concurrency": concurrency}},
                {"id": "join", "capability": CAPABILITY, "needs": ["fan"]},
            ],
            "input": {"items": items},
        })
        .to_string(),
    )
}

/// Runs one fan-out of `width` elements through `cluster` (started, with workers), after
/// a small one to warm up, and reads what Redis spent on it.
pub async fn fan_out(
    cluster: &QueueCluster,
    width: usize,
    concurrency: usize,
) -> anyhow::Result<FanOutRun> {
    ensure!(
        (1..=master::store::MAX_MAP_WIDTH).contains(&width),
        "--fanout-width must be 1 to {}: a map over more elements fails",
        master::store::MAX_MAP_WIDTH
    );
    ensure!(
        (1..=master::store::MAX_MAP_WIDTH).contains(&concurrency),
        "--fanout-concurrency must be 1 to {}",
        master::store::MAX_MAP_WIDTH
    );
    let client = MasterClient::new(&cluster.master_url, &cluster.pipeline, 4);
    run_one(&client, WARM_UP_WIDTH.min(width), concurrency)
        .await
        .context("warm-up failed")?;
    let before = cluster.redis_stats().await?;
    let started = Instant::now();
    run_one(&client, width, concurrency).await?;
    let elapsed = started.elapsed();
    let after = cluster.redis_stats().await?;
    let commands = match (&before, &after) {
        (Some(b), Some(a)) => a.since(b),
        _ => BTreeMap::new(),
    };
    Ok(FanOutRun {
        width,
        elapsed,
        commands,
    })
}

/// Submits one fan-out task, waits for it, and checks that the join's result is every
/// element in order.
async fn run_one(client: &MasterClient, width: usize, concurrency: usize) -> anyhow::Result<()> {
    let id = client.submit(body(width, concurrency)).await?;
    if client.wait(&id).await? != Outcome::Succeeded {
        let detail = client.result(&id).await.unwrap_or_default();
        bail!("the fan-out task {id} did not succeed: {detail}");
    }
    let result = client.result(&id).await?;
    let expected: Vec<Value> = (0..width).map(|i| json!(i)).collect();
    if result["result"] != Value::Array(expected) {
        bail!(
            "the fan-out task {id} succeeded with the wrong result: {}",
            truncated(&result["result"])
        );
    }
    Ok(())
}

/// A value's JSON, cut to 200 characters for an error message.
fn truncated(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_maps_echo_over_the_numbers_then_joins() {
        let body: Value = serde_json::from_slice(&body(3, 2)).unwrap();
        assert_eq!(body["input"]["items"], json!([0, 1, 2]));
        assert_eq!(body["steps"][0]["map"]["concurrency"], 2);
        assert_eq!(body["steps"][1]["needs"], json!(["fan"]));
    }

    #[test]
    fn figures_per_step_and_per_element() {
        let run = FanOutRun {
            width: 999,
            elapsed: Duration::from_secs(2),
            commands: BTreeMap::from([("evalsha".into(), 3_000), ("publish".into(), 996)]),
        };
        assert_eq!(run.steps_per_sec(), 500.0);
        assert_eq!(run.commands_per_element(), Some(4.0));
        let none = FanOutRun {
            commands: BTreeMap::new(),
            ..run
        };
        assert_eq!(none.commands_per_element(), None);
    }
}

//! An ElastiCache Multi-AZ style failover under load: the replica is promoted, the old
//! primary becomes its replica, and the endpoint's name (a forwarder here) moves to the new
//! primary while connections already open stay on the old node. The services must notice
//! by themselves (`READONLY` retires their pooled connections), `/ready` must fail while
//! the name still points at a replica, serving must resume within seconds of the name
//! moving, and no accepted task may be lost.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::{RedisOptions, RedisServer, Service};

use crate::helpers::{
    Cluster, Options, Submit, Survivors, Via, conclude, scaled, serial, task_input,
};

async fn redis_cmd(port: u16, args: &[&str]) -> redis::Value {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

async fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    let info = match redis_cmd(port, &["INFO", section]).await {
        redis::Value::BulkString(b) => String::from_utf8(b).ok()?,
        redis::Value::VerbatimString { text, .. } => text,
        _ => return None,
    };
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

/// Waits (bounded) until `replica` has everything `primary` wrote: what ElastiCache waits
/// for before it promotes a replica in a planned failover.
async fn wait_caught_up(primary: u16, replica: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let link = info_field(replica, "replication", "master_link_status").await;
        let want = info_field(primary, "replication", "master_repl_offset").await;
        let have = info_field(replica, "replication", "slave_repl_offset").await;
        if link.as_deref() == Some("up") && want.is_some() && want == have {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never caught up: link {link:?}, offsets {want:?} / {have:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `/ready` of a node: the status and the JSON reason.
async fn ready(http: &reqwest::Client, node: &Service) -> (u16, Value) {
    match http.get(format!("{}/ready", node.url())).send().await {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or_default()),
        Err(e) => (0, Value::String(e.to_string())),
    }
}

/// Polls until every node's `/ready` answers `status` (bounded); returns how long it took.
async fn wait_ready_status(cluster: &Cluster, nodes: &[&Service], status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    for node in nodes {
        loop {
            let (got, body) = ready(&cluster.http, node).await;
            if got == status {
                // A worker may also say `degraded` (it cannot deliver results to the
                // masters, which answer 503 now); the masters only see Redis.
                if status == 503 && node.name().starts_with("master") {
                    assert_eq!(body["reason"], "read_only", "{}: {body}", node.name());
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} /ready answered {got} {body}, not {status}, for {within:?}\n{}",
                node.name(),
                cluster.logs_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failover_recovers_by_itself_and_loses_nothing() {
    let _serial = serial().await;
    let mut cluster = Cluster::start(Options {
        workers: 2,
        redis_via_proxy: Via::Everyone,
        ..Options::default()
    })
    .await;
    let old = cluster.redis.port();
    let old_text = old.to_string();
    // The replica: AOF as the primary has, and no 5 s wait before the first full sync.
    let mut replica = RedisServer::start_with(RedisOptions {
        aof: true,
        extra_args: vec!["--repl-diskless-sync-delay".into(), "0".into()],
        ..Default::default()
    });
    let new = replica.port();
    let new_text = new.to_string();
    redis_cmd(old, &["CONFIG", "SET", "repl-diskless-sync-delay", "0"]).await;
    redis_cmd(new, &["REPLICAOF", "127.0.0.1", &old_text]).await;
    wait_caught_up(old, new).await;

    let done = cluster.done_events().await;
    let client = cluster.client();
    let n = scaled(400);
    let inputs: Vec<_> = (0..n)
        .map(|i| task_input(i, 50 + (i as u64 * 37) % 250))
        .collect();
    let submitter = client.spawn_submit_all("chaos", inputs, 16);
    done.wait_finished(n / 4, Duration::from_secs(60)).await;

    // The failover, as ElastiCache stages it: hold writes on the primary, let the replica
    // catch up, promote it, demote the old primary to its replica, release the held writes
    // (they now meet READONLY: refused, never acknowledged, so never lost).
    redis_cmd(old, &["CLIENT", "PAUSE", "10000", "WRITE"]).await;
    wait_caught_up(old, new).await;
    redis_cmd(new, &["REPLICAOF", "NO", "ONE"]).await;
    redis_cmd(old, &["REPLICAOF", "127.0.0.1", &new_text]).await;
    redis_cmd(old, &["CLIENT", "UNPAUSE"]).await;
    let promoted = Instant::now();

    // The name still points at the old node, now a replica: PING works there, but no
    // service may call itself ready, and a write is a 503 (retry), never a 500.
    let nodes: Vec<&Service> = cluster
        .system
        .masters
        .iter()
        .chain(&cluster.system.workers)
        .collect();
    wait_ready_status(&cluster, &nodes, 503, Duration::from_secs(10)).await;
    // Hold it there for two seconds (DNS takes a while to move), probing every master.
    let mut refused = 0;
    while promoted.elapsed() < Duration::from_secs(2) || refused < cluster.system.masters.len() {
        let master = &cluster.system.masters[refused % cluster.system.masters.len()];
        match cluster
            .client_of(master)
            .submit_once("chaos", &task_input(n + refused, 0))
            .await
        {
            Submit::Refused(503, Some(_)) => refused += 1,
            other => panic!(
                "POST /task to {} while Redis is a replica: {}",
                master.name(),
                other.describe()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_ready_status(&cluster, &nodes, 503, Duration::from_secs(1)).await;
    let read_only_for = promoted.elapsed();

    // The name moves to the new primary. Nothing restarts; connections open to the old
    // node stay open.
    cluster
        .redis_proxy
        .as_ref()
        .unwrap()
        .retarget(vec![SocketAddr::from(([127, 0, 0, 1], new))]);
    let moved = Instant::now();
    wait_ready_status(&cluster, &nodes, 200, Duration::from_secs(10)).await;
    let ready_after = moved.elapsed();
    let probe = task_input(n + 100, 0);
    let first = cluster
        .client()
        .submit("chaos", &probe, Duration::from_secs(10))
        .await;
    assert!(first.is_some(), "no task accepted after the failover");
    let serving_after = moved.elapsed();
    assert!(
        serving_after < Duration::from_secs(10),
        "serving resumed only {serving_after:?} after the endpoint moved"
    );

    let mut accepted = submitter.await.unwrap();
    accepted.push(crate::helpers::Accepted {
        task_id: first.unwrap(),
        input: probe,
    });
    // From here on the cluster's Redis is the new primary.
    std::mem::swap(&mut cluster.redis, &mut replica);
    let (tally, _) = conclude(
        (&cluster, &done),
        &accepted,
        n + 1,
        (Duration::from_secs(90), Survivors::ALL),
        "redis-failover",
    )
    .await;
    let line = format!(
        "failover redis-failover: {} of {} services answered /ready 503 (read_only) while the endpoint named a replica ({:.1} s), {refused} submits answered 503, ready {:.1} s and serving {:.1} s after the endpoint moved; lost {}",
        nodes.len(),
        nodes.len(),
        read_only_for.as_secs_f64(),
        ready_after.as_secs_f64(),
        serving_after.as_secs_f64(),
        tally.lost
    );
    crate::helpers::report_line(&line);
}

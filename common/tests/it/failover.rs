//! The pool through a failover and a full store, against real redis-servers: a connection
//! that meets `READONLY` makes the whole pool reconnect (through a forwarder standing in for
//! the endpoint's DNS name), `check_writable` says why Redis cannot take writes, and the
//! `maxmemory-policy` check reports a policy that can evict Ensemble's keys.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::redis::{Failure, RedisPool, classify, eviction_warning};
use testkit::{RedisServer, eventually};
use tokio::net::{TcpListener, TcpStream};

/// The endpoint's DNS name: new connections go to the current target, connections already
/// open stay where they are (as with ElastiCache, whose failover moves the name only).
struct Forwarder {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(SocketAddr::from(([127, 0, 0, 1], target))));
        let current = target.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = *current.lock().unwrap();
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { addr, target, task }
    }

    fn retarget(&self, port: u16) {
        *self.target.lock().unwrap() = SocketAddr::from(([127, 0, 0, 1], port));
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn command(port: u16, args: &[&str]) -> redis::Value {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

async fn set(pool: &RedisPool, key: &str) -> Result<(), redis::RedisError> {
    let mut conn = pool.get().await.expect("a connection");
    redis::cmd("SET")
        .arg(key)
        .arg("v")
        .query_async::<()>(&mut conn)
        .await
}

#[tokio::test]
async fn a_pool_whose_connection_hits_readonly_reconnects_to_the_new_primary() {
    // No 5 s wait for more replicas before the first full sync.
    let old = RedisServer::with_args(&["--repl-diskless-sync-delay", "0"]);
    let new = RedisServer::with_args(&["--repl-diskless-sync-delay", "0"]);
    let new_port = new.port().to_string();
    let old_port = old.port().to_string();
    command(new.port(), &["REPLICAOF", "127.0.0.1", &old_port]).await;
    let endpoint = Forwarder::start(old.port()).await;
    let mut settings = old.settings();
    settings.url = Some(common::config::Secret::new(format!(
        "redis://{}",
        endpoint.addr
    )));
    let pool = RedisPool::new(&settings).unwrap();
    // Several pooled connections, all open to the old primary.
    let writes = (0..4).map(|i| {
        let pool = pool.clone();
        async move { set(&pool, &format!("before-{i}")).await }
    });
    for w in futures::future::join_all(writes).await {
        w.unwrap();
    }
    pool.check_writable().await.unwrap();
    // A planned failover waits for the replica to catch up.
    let caught_up = eventually(Duration::from_secs(10), || async {
        let n = command(
            new.port(),
            &["EXISTS", "before-0", "before-1", "before-2", "before-3"],
        )
        .await;
        (n == redis::Value::Int(4)).then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "the replica never caught up");

    // The failover: promote the replica, demote the old primary, move the name.
    command(new.port(), &["REPLICAOF", "NO", "ONE"]).await;
    command(old.port(), &["REPLICAOF", "127.0.0.1", &new_port]).await;
    endpoint.retarget(new.port());

    // The first write on an old connection meets READONLY: a 503, not a 500...
    let err = set(&pool, "during").await.unwrap_err();
    assert_eq!(classify(&err), Failure::Unavailable, "{err}");
    // ...and every connection made before it goes: the next writes, as many at once as the
    // pool held, reach the new primary.
    let writes = (0..4).map(|i| {
        let pool = pool.clone();
        async move { set(&pool, &format!("after-{i}")).await }
    });
    for w in futures::future::join_all(writes).await {
        w.unwrap();
    }
    pool.check_writable().await.unwrap();
    let on_new = command(new.port(), &["EXISTS", "after-0", "before-3"]).await;
    assert_eq!(on_new, redis::Value::Int(2));
}

#[tokio::test]
async fn check_writable_reports_a_replica_and_the_pool_moves_on_by_itself() {
    let primary = RedisServer::start();
    let replica = RedisServer::start();
    let primary_port = primary.port().to_string();
    command(replica.port(), &["REPLICAOF", "127.0.0.1", &primary_port]).await;
    let endpoint = Forwarder::start(replica.port()).await;
    let mut settings = primary.settings();
    settings.url = Some(common::config::Secret::new(format!(
        "redis://{}",
        endpoint.addr
    )));
    let pool = RedisPool::new(&settings).unwrap();
    // PING works on a replica; readiness must not.
    let err = pool.check_writable().await.unwrap_err();
    assert_eq!(err.reason, "read_only", "{err}");
    assert!(err.message.contains("replica") || err.message.contains("slave"));

    // The name moves; with no write traffic at all, the next readiness checks recover.
    endpoint.retarget(primary.port());
    let ready = eventually(Duration::from_secs(5), || async {
        pool.check_writable().await.ok()
    })
    .await;
    assert!(ready.is_some(), "the pool stayed on the replica");
    set(&pool, "k").await.unwrap();
}

#[tokio::test]
async fn oom_is_storage_full_and_readiness_says_so() {
    let server =
        RedisServer::with_args(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let pool = RedisPool::new(&server.settings()).unwrap();
    pool.check_writable().await.unwrap();
    let value = "x".repeat(64 * 1024);
    let mut full = None;
    for i in 0..200 {
        let mut conn = pool.get().await.unwrap();
        if let Err(e) = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg(&value)
            .query_async::<()>(&mut conn)
            .await
        {
            full = Some(e);
            break;
        }
    }
    let err = full.expect("2 MB never filled up");
    assert_eq!(classify(&err), Failure::StorageFull, "{err}");
    let not_ready = pool.check_writable().await.unwrap_err();
    assert_eq!(not_ready.reason, "storage_full", "{not_ready}");
    assert!(not_ready.message.contains("maxmemory"), "{not_ready}");
    assert!(!not_ready.message.contains("retry shortly"));

    // A script error or a key of the wrong type is neither an outage nor a full store, and
    // leaves the connection usable.
    let mut conn = pool.get().await.unwrap();
    let wrong = redis::cmd("HGET")
        .arg("k0")
        .arg("f")
        .query_async::<Option<String>>(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(classify(&wrong), Failure::Other, "{wrong}");
    let script = redis::Script::new("return redis.call('HGET', KEYS[1], 'f')")
        .key("k0")
        .invoke_async::<Option<String>>(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(classify(&script), Failure::Other, "{script}");
    let _: String = redis::cmd("GET")
        .arg("k0")
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_evicting_policy_is_reported_at_first_connection() {
    let server =
        RedisServer::with_args(&["--maxmemory", "2mb", "--maxmemory-policy", "volatile-lru"]);
    let pool = RedisPool::new(&server.settings()).unwrap();
    assert_eq!(
        pool.checked_maxmemory_policy(),
        None,
        "nothing connected yet"
    );
    pool.check_writable().await.unwrap();
    let seen = eventually(Duration::from_secs(5), || async {
        pool.checked_maxmemory_policy()
    })
    .await;
    assert_eq!(seen.as_deref(), Some("volatile-lru"));
    let warning = eviction_warning("volatile-lru").expect("a warning for volatile-lru");
    assert!(
        warning.contains("volatile-lru") && warning.contains("noeviction"),
        "{warning}"
    );
    assert_eq!(
        pool.maxmemory_policy().await.unwrap().as_deref(),
        Some("volatile-lru")
    );

    let safe = RedisServer::with_args(&["--maxmemory-policy", "noeviction"]);
    let pool = RedisPool::new(&safe.settings()).unwrap();
    let policy = pool.maxmemory_policy().await.unwrap().unwrap();
    assert_eq!(policy, "noeviction");
    assert_eq!(eviction_warning(&policy), None);
}

#[tokio::test]
async fn a_pool_starts_while_redis_is_down_and_checks_the_policy_once_it_is_up() {
    let mut server = RedisServer::with_args(&["--maxmemory-policy", "allkeys-lru"]);
    let settings = server.settings();
    server.kill();
    let pool = RedisPool::new(&settings).unwrap();
    assert!(pool.check_writable().await.is_err());
    server.restart();
    let seen = eventually(Duration::from_secs(10), || async {
        pool.check_writable().await.ok()?;
        pool.checked_maxmemory_policy()
    })
    .await;
    assert_eq!(seen.as_deref(), Some("allkeys-lru"));
}

//! `RedisServer::try_start`: ready when it returns, and each way of failing is its own error
//! with the end of the server's log.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use testkit::{RedisOptions, RedisServer, RedisStartError};

/// `PING` over a plain connection.
fn ping(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

#[test]
fn a_started_server_answers_and_stops_on_request() {
    let mut redis = RedisServer::try_start(RedisOptions::default()).unwrap();
    assert!(ping(redis.port()));
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    assert!(redis.log().contains("Ready to accept connections"));
    assert!(redis.log_path().starts_with(redis.dir()));
    redis.stop();
    assert!(!redis.is_running());
    assert!(!ping(redis.port()));
}

#[test]
fn a_missing_program_is_reported_with_install_instructions() {
    let err = RedisServer::try_start(RedisOptions {
        program: Some("/nonexistent/redis-server".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(err, RedisStartError::NotOnPath { .. }), "{err:?}");
    assert!(err.to_string().contains("apt-get install"), "{err}");
}

#[test]
fn a_server_that_exits_at_start_up_is_reported_with_its_log() {
    let err = RedisServer::try_start(RedisOptions {
        extra_args: vec!["--no-such-directive".into(), "1".into()],
        ..Default::default()
    })
    .unwrap_err();
    let RedisStartError::Exited { log_tail, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(log_tail.contains("no-such-directive"), "{log_tail}");
}

#[test]
fn a_server_that_never_gets_ready_is_killed_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("silent-redis");
    std::fs::write(
        &script,
        "#!/bin/sh\necho starting but never ready\nexec sleep 30\n",
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let started = Instant::now();
    let err = RedisServer::try_start(RedisOptions {
        program: Some(script),
        ready_within: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .unwrap_err();
    let RedisStartError::NotReady { within, log_tail } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*within, Duration::from_millis(300));
    assert!(log_tail.contains("never ready"), "{log_tail}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_killed_aof_server_restarts_on_its_port() {
    let mut redis = RedisServer::with_aof();
    let port = redis.port();
    redis.kill();
    assert!(!ping(port));
    redis.try_restart().unwrap();
    assert_eq!(redis.port(), port);
    assert!(ping(port));
}

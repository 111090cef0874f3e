//! The pool against real redis-server: TLS + AUTH, ACL users, bad credentials, untrusted
//! CAs, and recovery after Redis restarts.

use std::time::Duration;

use common::config::Secret;
use common::redis::{RedisPool, RedisSettings};
use testkit::{RedisOptions, RedisServer, eventually};

fn tls_with_password(password: &str) -> RedisServer {
    RedisServer::start_with(RedisOptions {
        tls: true,
        password: Some(password.into()),
        ..Default::default()
    })
}

#[tokio::test]
async fn tls_and_auth_ping() {
    let server = tls_with_password("s3cret-pw");
    let pool = RedisPool::new(&server.settings()).unwrap();
    pool.ping().await.unwrap();
    assert!(server.settings().uses_tls());

    // The same server through separate settings rather than a URL.
    let settings = RedisSettings {
        host: "localhost".into(),
        port: server.port(),
        tls: true,
        password: Some(Secret::new("s3cret-pw")),
        ca_file: Some(server.tls_files().unwrap().ca_cert.clone()),
        ..RedisSettings::default()
    };
    RedisPool::new(&settings).unwrap().ping().await.unwrap();
}

#[tokio::test]
async fn wrong_password_says_authentication_failed() {
    let server = RedisServer::with_password("right-password");
    let mut settings = server.settings();
    settings.url = Some(Secret::new(format!(
        "redis://:wrong-password@127.0.0.1:{}",
        server.port()
    )));
    let err = RedisPool::new(&settings).unwrap().ping().await.unwrap_err();
    assert!(
        err.message.contains("authentication failed"),
        "unclear error: {}",
        err.message
    );
    assert!(!err.message.contains("wrong-password"), "{}", err.message);

    let mut settings = server.settings();
    settings.url = Some(Secret::new(format!("redis://127.0.0.1:{}", server.port())));
    let err = RedisPool::new(&settings).unwrap().ping().await.unwrap_err();
    assert!(
        err.message.contains("authentication failed"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn acl_user_and_password() {
    let server = RedisServer::start_with(RedisOptions {
        acl_user: Some(("app".into(), "app-password".into())),
        ..Default::default()
    });
    RedisPool::new(&server.settings())
        .unwrap()
        .ping()
        .await
        .unwrap();

    let settings = RedisSettings {
        port: server.port(),
        username: Some("app".into()),
        password: Some(Secret::new("not-it")),
        ..RedisSettings::default()
    };
    let err = RedisPool::new(&settings).unwrap().ping().await.unwrap_err();
    assert!(
        err.message.contains("authentication failed"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn untrusted_ca_gives_a_tls_error() {
    let server = tls_with_password("pw-pw-pw");
    let mut settings = server.settings();
    settings.ca_file = Some(server.tls_files().unwrap().other_ca_cert.clone());
    let err = RedisPool::new(&settings).unwrap().ping().await.unwrap_err();
    assert!(
        err.message.contains("TLS"),
        "unclear error: {}",
        err.message
    );

    // Without a CA file only the public roots are trusted: the test CA is not among them.
    settings.ca_file = None;
    let err = RedisPool::new(&settings).unwrap().ping().await.unwrap_err();
    assert!(
        err.message.contains("TLS"),
        "unclear error: {}",
        err.message
    );
}

#[tokio::test]
async fn pool_recovers_after_redis_restarts() {
    let mut server = RedisServer::with_aof();
    let pool = RedisPool::new(&server.settings()).unwrap();
    {
        let mut conn = pool.get().await.unwrap();
        redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    server.kill();
    assert!(
        pool.ping().await.is_err(),
        "ping must fail while Redis is down"
    );
    server.restart();
    let back = eventually(Duration::from_secs(5), || async { pool.ping().await.ok() }).await;
    assert!(back.is_some(), "pool did not recover within 5 s");
    let mut conn = pool.get().await.unwrap();
    let v: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, "v", "AOF kept the write across the restart");
}

#[tokio::test]
async fn outage_answers_within_the_command_timeout() {
    let mut server = RedisServer::start();
    let mut settings = server.settings();
    settings.connect_timeout_ms = 300;
    settings.command_timeout_ms = 500;
    let pool = RedisPool::new(&settings).unwrap();
    pool.ping().await.unwrap();
    server.kill();
    let started = std::time::Instant::now();
    assert!(pool.ping().await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "an outage must fail fast, took {:?}",
        started.elapsed()
    );
}

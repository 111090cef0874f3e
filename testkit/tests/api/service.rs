//! The service handle: in-process and child services stop in order (asked first, forced
//! after the grace period), logs are captured, readiness is bounded.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;
use testkit::{Exit, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

fn shell(script: &str) -> Command {
    let mut command = Command::new("sh");
    command.arg("-c").arg(script);
    command
}

/// Answers every connection `200 OK` until cancelled.
async fn serve_ok(listener: TcpListener, stop: CancellationToken) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            accepted = listener.accept() => {
                let (mut socket, _) = accepted?;
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await?;
                socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await?;
            }
        }
    }
}

#[tokio::test]
async fn an_in_process_service_is_ready_and_stops_when_asked() {
    let mut service = Service::in_process("ok", listener().await, serve_ok).unwrap();
    assert!(service.url().starts_with("http://127.0.0.1:"));
    assert_eq!(service.pid(), None);
    service
        .wait_ready("/health", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(service.is_running());
    assert_eq!(service.stop().await, Exit::Clean);
    assert_eq!(service.log(), "serve returned Ok");
}

#[tokio::test]
async fn an_in_process_service_that_ignores_the_stop_is_aborted_after_the_grace() {
    let mut service = Service::in_process("stubborn", listener().await, |_, _| {
        std::future::pending::<anyhow::Result<()>>()
    })
    .unwrap()
    .with_grace(Duration::from_millis(200));
    let started = Instant::now();
    assert_eq!(service.stop().await, Exit::Killed);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn an_in_process_failure_ends_the_readiness_wait_with_the_error() {
    let mut service = Service::in_process("broken", listener().await, |_, _| async {
        bail!("no store configured")
    })
    .unwrap();
    let err = service
        .wait_ready("/health", Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no store configured"), "{err}");
    assert_eq!(
        service.try_exit(),
        Some(Exit::Failed("no store configured".into()))
    );
    assert_eq!(service.log(), "serve failed: no store configured");
}

#[tokio::test]
async fn a_child_that_stops_on_sigterm_exits_cleanly_with_its_output_logged() {
    let mut service = Service::child(
        "polite",
        "http://127.0.0.1:1",
        shell("trap 'echo bye; exit 0' TERM; echo hello; while :; do sleep 0.05; done"),
        None,
    )
    .unwrap();
    assert!(service.pid().is_some());
    service
        .wait_for_log("hello", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(service.stop().await, Exit::Clean);
    assert!(service.log().contains("bye"), "{}", service.log());
    assert!(service.log_path().unwrap().is_file());
}

#[tokio::test]
async fn a_child_that_ignores_sigterm_is_killed_after_the_grace() {
    let mut service = Service::child(
        "stubborn",
        "http://127.0.0.1:1",
        shell("trap '' TERM; echo up; while :; do sleep 0.05; done"),
        None,
    )
    .unwrap()
    .with_grace(Duration::from_millis(300));
    service
        .wait_for_log("up", Duration::from_secs(5))
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(service.stop().await, Exit::Killed);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!service.is_running());
}

#[tokio::test]
async fn kill_is_immediate_and_a_failed_readiness_wait_shows_the_log() {
    let mut service = Service::child(
        "victim",
        "http://127.0.0.1:1",
        shell("echo about to sit here; exec sleep 30"),
        None,
    )
    .unwrap();
    let err = service
        .wait_ready("/ready", Duration::from_millis(300))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("about to sit here"), "{err}");
    service.kill().await;
    let exit = service.wait_exit(Duration::from_secs(1)).await;
    assert!(
        matches!(&exit, Some(Exit::Failed(status)) if status.contains("9")),
        "{exit:?}"
    );
}

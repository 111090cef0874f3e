//! A throwaway `redis-server` for `ensemble up`: loopback only, a free port, a temp dir,
//! no persistence (`--save ""`, `--appendonly no`), killed when dropped.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How long a fresh redis-server may take to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running redis-server of our own.
pub struct RedisProcess {
    /// Killed on drop (`kill_on_drop`), so an early return never leaves it behind.
    child: Child,
    /// Its working directory; removed on drop, after the child is gone.
    _dir: tempfile::TempDir,
    /// The port it listens on, on 127.0.0.1.
    port: u16,
}

impl RedisProcess {
    /// Whether `redis-server` can be run from PATH.
    pub async fn available() -> bool {
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    }

    /// Starts one on a free port and waits until it answers `PING`. A port taken between
    /// choosing and binding it costs a retry on another.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ensemble-redis-")
            .tempdir()
            .context("cannot create a temp dir for redis-server")?;
        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port().await?;
            let mut child = spawn(dir.path(), port)?;
            match wait_ready(&mut child, port, dir.path()).await {
                Ok(()) => {
                    return Ok(Self {
                        child,
                        _dir: dir,
                        port,
                    });
                }
                Err(e) => {
                    let _ = child.kill().await;
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops it (nothing to save: persistence is off).
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn spawn(dir: &Path, port: u16) -> anyhow::Result<Child> {
    Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run redis-server")
}

/// Waits until the server answers `PING` with `+PONG`, or fails with its log.
async fn wait_ready(child: &mut Child, port: u16, dir: &Path) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            bail!("redis-server exited with {status}: {}", log.trim());
        }
        if ping(port).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("redis-server did not answer PING within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(&reply == b"+PONG\r\n")
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Ok(true))
    )
}

/// A port nothing listens on right now (bound and released).
pub async fn free_port() -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

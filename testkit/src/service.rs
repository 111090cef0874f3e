//! One running service, in this process or as a child process, behind one handle: its name
//! and base URL, a bounded readiness wait, its log, and an ordered stop (ask, then force
//! after a bound). Chaos tests also get `kill -9`, signals and a wait for the exit; the
//! benchmark gets the pid for its RSS and CPU readings.
//!
//! - [`Service::in_process`]: `serve(listener, stop)` as a tokio task. Stopping cancels its
//!   token; past the grace period the task is aborted. Its "log" is how `serve` ended (the
//!   process's own tracing output is the rest).
//! - [`Service::child`]: a prepared [`Command`] with stdout and stderr in a log file.
//!   Stopping sends SIGTERM; past the grace period, SIGKILL.
//!
//! A handle dropped while its test panics prints the service's log; a handle dropped
//! otherwise stops the service the same ordered way (blocking, for a child).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::FutureExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a service may take to stop gracefully unless told otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// How a service ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `serve` returned `Ok`, or the process exited with status 0.
    Clean,
    /// `serve` returned an error or panicked, or the process exited otherwise (a signal
    /// included); the text says how.
    Failed(String),
    /// It did not stop within its grace period and was aborted or SIGKILLed.
    Killed,
}

/// A running service (see the module docs).
pub struct Service {
    /// For messages: `master`, `worker-2`, `llm-gateway`.
    name: String,
    /// `http://127.0.0.1:PORT`.
    url: String,
    /// How long a graceful stop may take before it is forced.
    grace: Duration,
    run: Run,
    /// Once known, how it ended (a process's status can be collected only once).
    exit: Option<Exit>,
}

enum Run {
    Task {
        /// Asks `serve` to stop.
        stop: CancellationToken,
        handle: JoinHandle<()>,
        /// How `serve` ended, written by the task itself so it can be read without awaiting
        /// the handle (in `Drop`, say).
        ended: Arc<Mutex<Option<Result<(), String>>>>,
    },
    Child {
        child: Child,
        /// Its stdout and stderr.
        log: PathBuf,
        /// Holds the log unless the caller chose where it goes.
        _dir: Option<tempfile::TempDir>,
    },
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("pid", &self.pid())
            .finish()
    }
}

impl Service {
    /// Runs `serve(listener, stop)` as a task of this process. The URL is the listener's.
    pub fn in_process<F, Fut>(
        name: impl Into<String>,
        listener: TcpListener,
        serve: F,
    ) -> anyhow::Result<Self>
    where
        F: FnOnce(TcpListener, CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let url = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let served = serve(listener, stop.clone());
        let ended = Arc::new(Mutex::new(None));
        let slot = ended.clone();
        let handle = tokio::spawn(async move {
            let outcome = served.await.map_err(|e| format!("{e:#}"));
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
        });
        Ok(Self {
            name: name.into(),
            url,
            grace: DEFAULT_GRACE,
            run: Run::Task {
                stop,
                handle,
                ended,
            },
            exit: None,
        })
    }

    /// The one-line start of a test suite: `serve` in this process on a free loopback port,
    /// returned once it answers `GET /health`.
    pub async fn start_local<F, Fut>(name: impl Into<String>, serve: F) -> anyhow::Result<Self>
    where
        F: FnOnce(TcpListener, CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let mut service = Self::in_process(name, listener, serve)?;
        service
            .wait_ready("/health", Duration::from_secs(10))
            .await?;
        Ok(service)
    }

    /// Starts `command` with stdin closed and stdout and stderr in `{log_dir}/{name}.log`
    /// (a temp dir of its own when `log_dir` is `None`). `url` is where it will serve.
    pub fn child(
        name: impl Into<String>,
        url: impl Into<String>,
        mut command: Command,
        log_dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let name = name.into();
        let dir = match log_dir {
            Some(_) => None,
            None => Some(
                tempfile::Builder::new()
                    .prefix("ensemble-service-")
                    .tempdir()
                    .context("cannot create a temp dir for a service's log")?,
            ),
        };
        let log_dir = log_dir.or(dir.as_ref().map(tempfile::TempDir::path));
        let log = log_dir
            .map(|d| d.join(format!("{name}.log")))
            .context("no log directory")?;
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start the {name} ({:?})", command.get_program()))?;
        Ok(Self {
            name,
            url: url.into(),
            grace: DEFAULT_GRACE,
            run: Run::Child {
                child,
                log,
                _dir: dir,
            },
            exit: None,
        })
    }

    /// How long a graceful stop may take before it is forced ([`DEFAULT_GRACE`] unless
    /// set).
    #[must_use]
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Its name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The child's process id; `None` in-process (the benchmark then reads this process's
    /// figures).
    pub fn pid(&self) -> Option<u32> {
        match &self.run {
            Run::Child { child, .. } => Some(child.id()),
            Run::Task { .. } => None,
        }
    }

    /// A child's log file.
    pub fn log_path(&self) -> Option<&Path> {
        match &self.run {
            Run::Child { log, .. } => Some(log),
            Run::Task { .. } => None,
        }
    }

    /// What it printed so far (a child), or how `serve` ended (in-process).
    pub fn log(&self) -> String {
        match &self.run {
            Run::Child { log, .. } => std::fs::read_to_string(log).unwrap_or_default(),
            Run::Task { ended, handle, .. } => {
                match &*ended.lock().unwrap_or_else(|p| p.into_inner()) {
                    Some(Ok(())) => "serve returned Ok".into(),
                    Some(Err(e)) => format!("serve failed: {e}"),
                    None if handle.is_finished() => "serve panicked".into(),
                    None => "serving (its tracing output is this process's)".into(),
                }
            }
        }
    }

    /// How it ended, if it has (without waiting).
    pub fn try_exit(&mut self) -> Option<Exit> {
        if self.exit.is_none() {
            self.exit = match &mut self.run {
                Run::Task { handle, ended, .. } => {
                    let joined = handle.now_or_never()?;
                    Some(task_exit(joined, ended))
                }
                Run::Child { child, .. } => child.try_wait().ok()?.map(status_exit),
            };
        }
        self.exit.clone()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Fails, with its log, if it has ended.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.try_exit() {
            None => Ok(()),
            Some(Exit::Clean) => bail!("the {} stopped unexpectedly", self.name),
            Some(exit) => bail!("the {} ended ({exit:?}):\n{}", self.name, self.log()),
        }
    }

    /// Waits until it ends, however long that takes.
    pub async fn exited(&mut self) -> Exit {
        loop {
            if let Some(exit) = self.try_exit() {
                return exit;
            }
            match &mut self.run {
                Run::Task { handle, ended, .. } => {
                    let exit = task_exit(handle.await, ended);
                    self.exit = Some(exit.clone());
                    return exit;
                }
                Run::Child { .. } => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    }

    /// Waits up to `within` for it to end.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<Exit> {
        tokio::time::timeout(within, self.exited()).await.ok()
    }

    /// Waits until `GET {url}{path}` answers 2xx; fails early, with the log, if it ends,
    /// and after `within`.
    pub async fn wait_ready(&mut self, path: &str, within: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let url = format!("{}{path}", self.url);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.check_running()?;
            let answer = http.get(&url).timeout(Duration::from_secs(1)).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the {} did not answer {url} within {within:?}; its log:\n{}",
                    self.name,
                    tail(&self.log())
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until its log contains `needle` (a child); fails with the log if it ends first
    /// or after `within`. Returns the log.
    pub async fn wait_for_log(&mut self, needle: &str, within: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return Ok(log);
            }
            if let Some(exit) = self.try_exit() {
                bail!(
                    "the {} ended ({exit:?}) before logging {needle:?}:\n{log}",
                    self.name
                );
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the {} did not log {needle:?} within {within:?}:\n{log}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, `STOP`, …) to a child; in-process, `TERM`
    /// and `INT` cancel its token and any other is an error.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        match &self.run {
            Run::Child { child, .. } => signal(child.id(), name),
            Run::Task { stop, .. } if matches!(name, "TERM" | "INT") => {
                stop.cancel();
                Ok(())
            }
            Run::Task { .. } => bail!("cannot send SIG{name} to the in-process {}", self.name),
        }
    }

    /// `kill -9` (a child) or abort (in-process): no drain, no goodbye.
    pub async fn kill(&mut self) {
        match &mut self.run {
            Run::Child { child, .. } => {
                let _ = child.kill();
            }
            Run::Task { handle, .. } => handle.abort(),
        }
        self.exited().await;
    }

    /// Stops it in order: SIGTERM or cancel, then, past the grace period, SIGKILL or
    /// abort. Says how it ended.
    pub async fn stop(&mut self) -> Exit {
        if let Some(exit) = self.try_exit() {
            return exit;
        }
        if let Err(e) = self.signal("TERM") {
            tracing::warn!(service = %self.name, error = %format!("{e:#}"), "cannot send SIGTERM");
        }
        match self.wait_exit(self.grace).await {
            Some(exit) => exit,
            None => {
                tracing::warn!(service = %self.name, "did not stop in time; killing it");
                self.kill().await;
                self.exit = Some(Exit::Killed);
                Exit::Killed
            }
        }
    }

    /// [`Self::stop`] without a runtime (for `Drop`): blocks for up to the grace period.
    fn stop_blocking(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        match &mut self.run {
            Run::Task { stop, handle, .. } => {
                // Nothing can wait here; the task stops on its own or with the runtime.
                stop.cancel();
                if std::thread::panicking() {
                    handle.abort();
                }
            }
            Run::Child { child, .. } => stop_child(child, self.grace),
        }
    }
}

impl Drop for Service {
    /// Prints the log when a test is failing, then stops the service.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} ({}):\n{}", self.name, self.url, tail(&self.log()));
        }
        self.stop_blocking();
    }
}

fn task_exit(
    joined: Result<(), tokio::task::JoinError>,
    ended: &Mutex<Option<Result<(), String>>>,
) -> Exit {
    match joined {
        Err(e) if e.is_cancelled() => Exit::Killed,
        Err(e) => Exit::Failed(format!("panicked: {e}")),
        Ok(()) => match ended.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some(Ok(())) => Exit::Clean,
            Some(Err(e)) => Exit::Failed(e),
            None => Exit::Failed("ended without a result".into()),
        },
    }
}

fn status_exit(status: ExitStatus) -> Exit {
    if status.success() {
        Exit::Clean
    } else {
        Exit::Failed(status.to_string())
    }
}

/// Stops a child without a runtime: SIGTERM, then SIGKILL if it is still running after
/// `grace`. Blocks until it has exited.
pub(crate) fn stop_child(child: &mut Child, grace: Duration) {
    if signal(child.id(), "TERM").is_ok() {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `kill -{name} {pid}`: the `kill` command, since the workspace forbids `unsafe`.
pub fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .context("cannot run `kill`")?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed ({status})");
    Ok(())
}

/// The last 40 lines of a log, enough to see why something failed.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

//! What every fake server shares: a script of replies, the requests it saw, a delay, and a
//! listener on a free loopback port that hands every request to one handler and can be
//! stopped and started again on the same port.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running fake answering scripted replies `R` and recording requests `Q`.
pub struct Fake<R, Q> {
    /// Where it listens (`http://127.0.0.1:PORT`, plus a path prefix for some).
    pub url: String,
    addr: SocketAddr,
    script: Arc<Script<R, Q>>,
    /// Kept to serve again after [`Fake::stop`].
    router: Router,
    running: Option<(CancellationToken, JoinHandle<()>)>,
}

/// Replies to hand out and requests seen, shared with the handler.
pub struct Script<R, Q> {
    queue: Mutex<VecDeque<R>>,
    fallback: Mutex<Option<R>>,
    seen: Mutex<Vec<Q>>,
    /// Off under a benchmark's load, whose requests would fill memory.
    recording: AtomicBool,
    delay: Mutex<Duration>,
}

impl<R: Clone, Q: Clone> Script<R, Q> {
    /// Records a request.
    pub fn record(&self, request: Q) {
        if self.recording.load(Ordering::Relaxed) {
            self.seen.lock().unwrap().push(request);
        }
    }

    /// The next queued reply, else the standing one.
    pub fn next(&self) -> Option<R> {
        let queued = self.queue.lock().unwrap().pop_front();
        queued.or_else(|| self.fallback.lock().unwrap().clone())
    }
}

impl<R, Q> Fake<R, Q>
where
    R: Clone + Send + 'static,
    Q: Clone + Send + 'static,
{
    /// Serves `handler` on `127.0.0.1:port` (0: a free port); `prefix` is appended to the
    /// URL. The handler
    /// records what it wants and answers; the answer leaves after the delay set with
    /// [`Fake::set_delay`], so a slow upstream is seen to have received the request.
    pub async fn serve<F, Fut>(port: u16, prefix: &str, handler: F) -> std::io::Result<Self>
    where
        F: Fn(Arc<Script<R, Q>>, Method, Uri, HeaderMap, Bytes) -> Fut
            + Clone
            + Send
            + Sync
            + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        let script = Arc::new(Script {
            queue: Mutex::new(VecDeque::new()),
            fallback: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
            recording: AtomicBool::new(true),
            delay: Mutex::new(Duration::ZERO),
        });
        let shared = script.clone();
        let router = Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let (handler, script) = (handler.clone(), shared.clone());
                async move {
                    let response = handler(script.clone(), method, uri, headers, body).await;
                    let delay = *script.delay.lock().unwrap();
                    tokio::time::sleep(delay).await;
                    response
                }
            },
        );
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let mut fake = Self {
            url: format!("http://{addr}{prefix}"),
            addr,
            script,
            router,
            running: None,
        };
        fake.listen(listener);
        Ok(fake)
    }

    fn listen(&mut self, listener: TcpListener) {
        let stop = CancellationToken::new();
        let serving = axum::serve(listener, self.router.clone())
            .with_graceful_shutdown(stop.clone().cancelled_owned());
        let task = tokio::spawn(async move {
            let _ = serving.await;
        });
        self.running = Some((stop, task));
    }

    /// Queues a reply for the next request.
    pub fn push(&self, reply: R) -> &Self {
        self.script.queue.lock().unwrap().push_back(reply);
        self
    }

    /// The reply once the queue is empty.
    pub fn always(&self, reply: R) -> &Self {
        *self.script.fallback.lock().unwrap() = Some(reply);
        self
    }

    /// Makes every answer take this long.
    pub fn set_delay(&self, delay: Duration) {
        *self.script.delay.lock().unwrap() = delay;
    }

    /// Stops keeping the requests it sees.
    pub fn stop_recording(&self) {
        self.script.recording.store(false, Ordering::Relaxed);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Q> {
        self.script.seen.lock().unwrap().clone()
    }

    /// Stops listening and closes every connection once its answer is out.
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            stop.cancel();
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("the fake did not stop")
                .expect("the fake panicked");
        }
    }

    /// Listens again on the same port (a restarted upstream).
    pub async fn restart(&mut self) {
        self.stop().await;
        let addr = self.addr;
        let listener = crate::eventually(Duration::from_secs(15), || async {
            TcpListener::bind(addr).await.ok()
        })
        .await
        .expect("could not bind the fake's port again");
        self.listen(listener);
    }
}

impl<R, Q> Drop for Fake<R, Q> {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.running {
            stop.cancel();
        }
    }
}

/// One JSON request a fake received, with the headers a client must send.
#[derive(Clone, Debug)]
pub struct Received<T> {
    pub body: T,
    pub authorization: Option<String>,
    pub request_id: Option<String>,
    /// Every header, for the ones a test checks by name ([`Received::header`]).
    pub headers: HeaderMap,
}

impl<T> Received<T> {
    pub(crate) fn new(headers: &HeaderMap, body: T) -> Self {
        Self {
            body,
            authorization: header(headers, "authorization").map(String::from),
            request_id: header(headers, "x-request-id").map(String::from),
            headers: headers.clone(),
        }
    }

    /// A header's value, if it was sent as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// A request header's value, if it is text.
pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// How long a fake's `wait_for_*` waits for what should happen promptly.
pub(crate) const WAIT: Duration = Duration::from_secs(15);

/// Polls `what` until it holds `n` items or [`WAIT`] passes; `describe` says what was
/// seen when it did not.
pub(crate) async fn wait_for<T>(
    n: usize,
    what: impl Fn() -> Vec<T>,
    describe: impl FnOnce(Vec<T>) -> String,
) -> Vec<T> {
    match crate::eventually(WAIT, || async {
        let seen = what();
        (seen.len() >= n).then_some(seen)
    })
    .await
    {
        Some(seen) => seen,
        None => panic!("expected {n}, {}", describe(what())),
    }
}

/// What a provider fake's automatic answer says after tool results: `{"text": "Results:
/// name=result; …"}`, so a test sees each result reached the model.
pub(crate) fn results_text<'a>(results: impl Iterator<Item = (&'a str, String)>) -> Value {
    let quoted: Vec<String> = results
        .map(|(name, result)| format!("{name}={result}"))
        .collect();
    json!({"text": format!("Results: {}", quoted.join("; "))})
}

//! What the fake upstreams share: a script of replies, the requests they saw, and a server
//! on a free loopback port that hands every request to one handler.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;

/// A running fake upstream answering scripted replies `R` and recording requests `Q`.
pub struct Fake<R, Q> {
    /// Where it listens (`http://127.0.0.1:PORT`, plus a path prefix for some).
    pub url: String,
    script: Arc<Script<R, Q>>,
}

/// Replies to hand out and requests seen.
pub struct Script<R, Q> {
    queue: Mutex<VecDeque<R>>,
    fallback: Mutex<Option<R>>,
    seen: Mutex<Vec<Q>>,
}

impl<R: Clone, Q: Clone> Script<R, Q> {
    /// Records a request.
    pub fn record(&self, request: Q) {
        self.seen.lock().unwrap().push(request);
    }

    /// The next queued reply, else the standing one.
    pub fn next(&self) -> Option<R> {
        let queued = self.queue.lock().unwrap().pop_front();
        queued.or_else(|| self.fallback.lock().unwrap().clone())
    }
}

impl<R: Clone, Q: Clone> Fake<R, Q> {
    /// Serves `handler` on a free port; `prefix` is appended to the URL.
    pub async fn serve<F, Fut>(prefix: &str, handler: F) -> Self
    where
        F: Fn(Arc<Script<R, Q>>, Method, Uri, HeaderMap, Bytes) -> Fut
            + Clone
            + Send
            + Sync
            + 'static,
        Fut: Future<Output = Response> + Send + 'static,
        R: Send + 'static,
        Q: Send + 'static,
    {
        let script = Arc::new(Script {
            queue: Mutex::new(VecDeque::new()),
            fallback: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
        });
        let shared = script.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                handler.clone()(shared.clone(), method, uri, headers, body)
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}{prefix}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, script }
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

    /// Every request so far.
    pub fn requests(&self) -> Vec<Q> {
        self.script.seen.lock().unwrap().clone()
    }
}

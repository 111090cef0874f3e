//! A tiny TCP proxy on loopback. In front of the masters it is the load balancer: round
//! robin over the backends, skipping one whose connect fails (a dead replica). In front of
//! Redis it can black-hole the traffic: during an outage it forwards nothing, holds every
//! open connection silent and accepts new ones without answering (a network partition,
//! where commands hang rather than fail fast); when the outage ends it drops them all. It
//! can also be retargeted: new connections go to the new backends while open ones stay
//! where they are, as when a failover moves a DNS name.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    addr: SocketAddr,
    outage: watch::Sender<bool>,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(backends: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (outage, watch) = watch::channel(false);
        let backends = Arc::new(Mutex::new(backends));
        let current = backends.clone();
        let next = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let backends = current.lock().unwrap().clone();
                let next = next.clone();
                let watch = watch.clone();
                tokio::spawn(async move {
                    relay(client, &backends, &next, watch).await;
                });
            }
        });
        Self {
            addr,
            outage,
            backends,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends new connections to `backends`; connections already open stay where they are.
    pub fn retarget(&self, backends: Vec<SocketAddr>) {
        *self.backends.lock().unwrap() = backends;
    }

    /// Starts or ends a black-hole outage.
    pub fn set_outage(&self, on: bool) {
        self.outage.send_replace(on);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut client: TcpStream,
    backends: &[SocketAddr],
    next: &AtomicUsize,
    mut outage: watch::Receiver<bool>,
) {
    if *outage.borrow() {
        // Accepted, never answered; closed when the outage ends.
        let _ = outage.wait_for(|on| !*on).await;
        return;
    }
    let start = next.fetch_add(1, Ordering::Relaxed);
    let mut backend = None;
    for i in 0..backends.len() {
        let addr = backends[(start + i) % backends.len()];
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
        {
            backend = Some(stream);
            break;
        }
    }
    let Some(mut backend) = backend else {
        let _ = client.shutdown().await;
        return;
    };
    let _ = backend.set_nodelay(true);
    let outage_began = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut backend) => false,
        r = outage.wait_for(|on| *on) => r.is_ok(),
    };
    if outage_began {
        // Hold both ends silent until the outage ends, then drop them.
        let _ = outage.wait_for(|on| !*on).await;
    }
}

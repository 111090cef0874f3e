//! Completion callbacks: when a task submitted with a `callback_url` finishes, the master
//! POSTs its final view there, signed with `CALLBACK_SECRET`.
//!
//! Delivery is durable and at least once: the store script that records the task's end also
//! puts the task in a callback outbox (`TaskStore::claim_callbacks`). Every replica runs
//! `spawn`'s loop, which claims due entries (hiding each from the other replicas for
//! `CALLBACK_VISIBILITY_MS`, so one that dies mid-delivery is replaced), POSTs, and records
//! the outcome on the task: delivered, retried after a backoff, or failed after
//! `CALLBACK_MAX_ATTEMPTS`.
//!
//! A `callback_url` is the client's choice of where the master connects, so it must not
//! reach the master's own network (SSRF): internal IP literals are refused at submit
//! (`check_url`) and again before each attempt, names are resolved by `PublicOnly`,
//! which drops internal addresses (so DNS rebinding does not help), redirects are never
//! followed and no proxy is used. `CALLBACK_ALLOW_PRIVATE=true` lifts the address checks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::hmac;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::CONTENT_TYPE;
use reqwest::redirect;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Config;
use crate::store::{CallbackClaim, CallbackResult, TaskStore};

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "{t}.{body}">`.
pub const SIGNATURE_HEADER: &str = "ensemble-signature";
/// One id per task finish, the same on every attempt: receivers deduplicate on it.
pub const DELIVERY_HEADER: &str = "ensemble-delivery";
/// `task.succeeded`, `task.failed` or `task.cancelled`.
pub const EVENT_HEADER: &str = "ensemble-event";
/// The delivery attempt, from 1.
pub const ATTEMPT_HEADER: &str = "ensemble-attempt";
/// Longest `callback_url`.
pub const MAX_URL_LEN: usize = 2048;
/// Callback attempts one replica runs at once.
const MAX_IN_FLIGHT: usize = 32;
/// Longest wait between claims while the store fails.
const MAX_ERROR_WAIT: Duration = Duration::from_secs(5);

/// Checks a `callback_url` at submit (and again before each attempt, for IP literals,
/// which reqwest connects to without asking the resolver). The error says what is wrong.
pub(crate) fn check_url(text: &str, allow_private: bool) -> Result<reqwest::Url, String> {
    if text.len() > MAX_URL_LEN {
        return Err(format!("must be at most {MAX_URL_LEN} characters"));
    }
    let url = reqwest::Url::parse(text).map_err(|e| format!("is not a valid URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http(s) URL".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not carry credentials (`user:password@`); receivers check the \
             `Ensemble-Signature` header instead"
                .into(),
        );
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err("must name a host".into());
    };
    // The URL parser has already turned every IPv4 spelling (`0x7f.1`, `2130706433`) into
    // dotted decimal; IPv6 literals come bracketed.
    let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    else {
        return Ok(url);
    };
    if !allow_private && is_blocked(ip) {
        return Err(format!(
            "`{ip}` is a loopback, private, link-local or otherwise internal address, which \
             callbacks may not reach (CALLBACK_ALLOW_PRIVATE=true allows it for local use)"
        ));
    }
    Ok(url)
}

/// Whether callbacks must not connect to `ip` (unless `CALLBACK_ALLOW_PRIVATE`): anything
/// that is not a public unicast address, IPv6 forms that embed such an IPv4 address, and
/// the cloud metadata endpoints (169.254.169.254 and fd00:ec2::254 are link-local and
/// unique-local; Alibaba's 100.100.100.200 is CGNAT; Oracle's 192.0.0.192 is IETF-reserved).
pub fn is_blocked(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => blocked_v6(v6),
    }
}

fn blocked_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0 // "this network", 0.0.0.0 included
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64.0.0/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments 192.0.0.0/24
        || (a == 198 && (b == 18 || b == 19)) // benchmarking 198.18.0.0/15
        || a >= 240 // reserved 240.0.0.0/4
}

fn blocked_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return blocked_v4(v4);
    }
    let s = ip.segments();
    let embedded = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || s[..6] == [0; 6] // IPv4-compatible ::a.b.c.d (deprecated)
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
        || (s[0] & 0xfe00) == 0xfc00 // unique-local fc00::/7 (AWS metadata fd00:ec2::254)
        || (s[0] == 0x0064 && s[1] == 0xff9b && s[2..6] == [0; 4] && blocked_v4(embedded())) // NAT64
        || (s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 0x0001) // local-use NAT64 64:ff9b:1::/48
        || (s[0] == 0x2002 // 6to4: the IPv4 address is in segments 1 and 2
            && blocked_v4(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8)))
        || (s[0] == 0x2001 && s[1] == 0) // Teredo 2001::/32 (an obfuscated IPv4 inside)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation 2001:db8::/32
        || (s[0] == 0x0100 && s[1..4] == [0; 3]) // discard 100::/64
}

/// The callback client's resolver: the system's, minus every address [`is_blocked`]
/// refuses. It runs at connect time, so a name that resolved to a public address at
/// submit and to an internal one now (DNS rebinding) is still refused; a name left with
/// no address fails the attempt.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all.into_iter().filter(|a| !is_blocked(a.ip())).collect();
            if public.is_empty() {
                return Err(format!(
                    "`{host}` resolves only to loopback, private, link-local or other internal \
                     addresses, which callbacks may not reach (CALLBACK_ALLOW_PRIVATE=true \
                     allows them)"
                )
                .into());
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}

/// The HTTP client for callbacks: no redirects (a `3xx` is a failed attempt), no proxy
/// (it would connect on our behalf, past the address checks), and [`PublicOnly`] unless
/// private targets are allowed.
pub(crate) fn client(config: &Config) -> anyhow::Result<reqwest::Client> {
    common::install_crypto_provider();
    let timeout = Duration::from_millis(config.callback_timeout_ms);
    let mut builder = reqwest::Client::builder()
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .timeout(timeout)
        .redirect(redirect::Policy::none())
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!("ensemble-callbacks/", env!("CARGO_PKG_VERSION")));
    if !config.callback_allow_private {
        builder = builder.dns_resolver(PublicOnly);
    }
    Ok(builder.build()?)
}

/// `t={timestamp},v1={hex HMAC-SHA256 over "{timestamp}.{body}"}`, the value of
/// [`SIGNATURE_HEADER`] (the scheme of Stripe's webhooks: the timestamp is signed too, so
/// a receiver can refuse old replays).
pub(crate) fn signature(key: &hmac::Key, timestamp: u64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

/// Starts this replica's delivery loop, unless `CALLBACK_SECRET` is unset (then no task
/// can have been given a callback through this replica, and it sends nothing unsigned).
pub(crate) fn spawn(
    config: Arc<Config>,
    store: Arc<dyn TaskStore>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if config.callback_secret.is_empty() {
        tracing::info!(
            "CALLBACK_SECRET is not set: `callback_url` is refused and no callbacks are sent"
        );
        return Ok(());
    }
    if config.callback_allow_private {
        tracing::warn!(
            "CALLBACK_ALLOW_PRIVATE=true: callbacks may reach loopback and internal addresses; \
             never do this where clients are not trusted"
        );
    }
    let sender = Arc::new(Sender {
        client: client(&config)?,
        key: hmac::Key::new(
            hmac::HMAC_SHA256,
            config.callback_secret.expose().as_bytes(),
        ),
        store,
        config,
    });
    let inner = tracker.clone();
    tracker.spawn(async move { sender.run(inner, shutdown).await });
    Ok(())
}

/// Delivers claimed callbacks.
struct Sender {
    /// See [`client`].
    client: reqwest::Client,
    /// `CALLBACK_SECRET`, ready to sign.
    key: hmac::Key,
    /// Where the outbox is.
    store: Arc<dyn TaskStore>,
    /// Attempts, backoff, visibility, poll interval.
    config: Arc<Config>,
}

impl Sender {
    /// Claims what is due while there are free slots, delivers each claim in its own task,
    /// and sleeps a poll interval when nothing is due (or the store is down).
    async fn run(self: Arc<Self>, tracker: TaskTracker, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let poll = Duration::from_millis(self.config.callback_poll_ms);
        let visibility = Duration::from_millis(self.config.callback_visibility_ms);
        let mut failures = 0u32;
        loop {
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => p,
                () = shutdown.cancelled() => return,
            };
            let Ok(first) = first else { return };
            let free = slots.available_permits() + 1;
            let claimed = self
                .store
                .claim_callbacks(free, visibility, self.config.callback_max_attempts)
                .await;
            let claims = match claimed {
                Ok(claims) => {
                    failures = 0;
                    claims
                }
                Err(e) => {
                    // Logged once per outage (and then every 20th try), not every poll.
                    if failures.is_multiple_of(20) {
                        tracing::warn!(error = %e, "cannot claim completion callbacks");
                    }
                    failures = failures.saturating_add(1);
                    Vec::new()
                }
            };
            if claims.is_empty() {
                drop(first);
                // Nothing due: wait a poll. The store failing: back off up to 5 s.
                let wait = poll
                    .saturating_mul(1 << failures.min(5))
                    .min(poll.max(MAX_ERROR_WAIT));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.cancelled() => return,
                }
                continue;
            }
            let mut first = Some(first);
            for claim in claims {
                let permit = match first.take() {
                    Some(p) => p,
                    None => match slots.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                let this = self.clone();
                tracker.spawn(async move {
                    this.deliver(claim).await;
                    drop(permit);
                });
            }
        }
    }

    /// One attempt, and its outcome recorded (if the claim is still ours).
    async fn deliver(&self, claim: CallbackClaim) {
        let id = claim.record.view.task_id.clone();
        let sent = self.post(&claim).await;
        let (result, outcome) = match sent {
            Ok(()) => (CallbackResult::Delivered, "delivered"),
            Err(error) if claim.attempt >= self.config.callback_max_attempts => {
                (CallbackResult::Failed { error }, "failed")
            }
            Err(error) => {
                let delay = self
                    .config
                    .callback_backoff()
                    .delay(claim.attempt.saturating_sub(1));
                (CallbackResult::Retry { error, delay }, "retried")
            }
        };
        match self
            .store
            .finish_callback(&id, claim.attempt, &result)
            .await
        {
            Ok(true) => {
                crate::metrics::callback_attempt(outcome);
                match &result {
                    CallbackResult::Delivered => {
                        tracing::info!(task_id = %id, attempt = claim.attempt, "callback delivered")
                    }
                    CallbackResult::Retry { error, delay } => tracing::warn!(task_id = %id,
                        attempt = claim.attempt, error = %error,
                        retry_in_ms = delay.as_millis() as u64, "callback failed; will retry"),
                    CallbackResult::Failed { error } => tracing::warn!(task_id = %id,
                        attempt = claim.attempt, error = %error, "callback failed; giving up"),
                }
            }
            Ok(false) => {
                crate::metrics::callback_attempt("stale");
                tracing::info!(task_id = %id, attempt = claim.attempt,
                    "callback attempt outlived its claim; another replica owns the callback now");
            }
            // The claim becomes visible again after CALLBACK_VISIBILITY_MS and is retried.
            Err(e) => tracing::warn!(task_id = %id, error = %e,
                "cannot record the callback's outcome; it will be tried again"),
        }
    }

    /// POSTs the task's final view, signed. `Err` says why the attempt failed.
    async fn post(&self, claim: &CallbackClaim) -> Result<(), String> {
        let url = check_url(&claim.url, self.config.callback_allow_private)?;
        let mut view = claim.record.view.clone();
        // The delivery state is the master's bookkeeping, stale once sent.
        view.callback = None;
        let body = serde_json::to_vec(&view).map_err(|e| e.to_string())?;
        let timestamp = common::wire::now_ms() / 1000;
        let response = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature(&self.key, timestamp, &body))
            .header(
                DELIVERY_HEADER,
                format!("{}.{}", view.task_id, view.finished_at_ms.unwrap_or(0)),
            )
            .header(EVENT_HEADER, format!("task.{}", view.status.as_str()))
            .header(ATTEMPT_HEADER, claim.attempt.to_string())
            .header(&common::telemetry::REQUEST_ID, &claim.record.request_id)
            .body(body)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else if status.is_redirection() {
            Err(format!(
                "the receiver answered {status}; redirects are not followed"
            ))
        } else {
            Err(format!("the receiver answered {status}"))
        }
    }
}

/// An error with its causes (reqwest's own message rarely says what went wrong).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_blocked_and_public_ones_are_not() {
        let blocked = [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.100.100.200",
            "192.0.0.192",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "fc00::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::1",
        ];
        for ip in blocked {
            assert!(is_blocked(ip.parse().unwrap()), "{ip} should be blocked");
        }
        let public = [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ];
        for ip in public {
            assert!(!is_blocked(ip.parse().unwrap()), "{ip} should be allowed");
        }
    }

    #[test]
    fn urls_are_checked_at_submit() {
        let refused = [
            ("ftp://example.com/x", "http(s)"),
            ("http://user:pw@example.com/", "credentials"),
            ("http://user@example.com/", "credentials"),
            ("http://127.0.0.1:6379/", "internal"),
            ("http://[::1]/", "internal"),
            ("http://169.254.169.254/latest/meta-data/", "internal"),
            ("http://[fd00:ec2::254]/", "internal"),
            ("http://[::ffff:7f00:1]/", "internal"),
            ("http://0x7f.1/", "internal"),
            ("http://2130706433/", "internal"),
            ("not a url", "valid URL"),
        ];
        for (url, why) in refused {
            let err = check_url(url, false).expect_err(url);
            assert!(err.contains(why), "{url}: {err}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(check_url(&long, false).unwrap_err().contains("2048"));
        assert!(check_url("https://hooks.example.com/done?x=1", false).is_ok());
        // Names are checked when the callback connects, not here.
        assert!(check_url("http://localhost:9/", false).is_ok());
        assert!(check_url("http://127.0.0.1:9/", true).is_ok());
    }

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(b"what do ya want for nothing?");
        let expected: String = ctx
            .sign()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            expected,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let sig = signature(&key, 1_733_100_000, b"{}");
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(b"1733100000.{}");
        let v1: String = ctx
            .sign()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sig, format!("t=1733100000,v1={v1}"));
    }
}

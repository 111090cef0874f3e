//! Dashboard sessions. An operator signs in at `/ui` with an operator key and gets a cookie
//! that stands for that key on the operator routes, so the browser never holds the key
//! itself and `EventSource` (which cannot send headers) can follow the event streams.
//!
//! - The cookie (`ensemble_session`) is `HttpOnly` (page scripts cannot read it) and
//!   `SameSite=Strict` (no other site's page makes the browser send it), and `Secure` when
//!   the request came over HTTPS (`X-Forwarded-Proto: https` from the load balancer).
//! - Its value is `v1.<expiry, unix s>.<nonce>.<HMAC-SHA256>`, signed with a key derived
//!   from the operator key that signed in: nothing is stored, every replica checks it, and
//!   removing an operator key from `OPERATOR_API_KEYS` ends its sessions. A session lasts
//!   [`SESSION_LIFE`]; signing out clears the cookie in the browser (a copied cookie stays
//!   valid until it expires, like a signed session cookie in any framework).
//! - Every request that changes something (any method but `GET`/`HEAD`) also needs the
//!   session's CSRF token in `X-CSRF-Token`: a second HMAC of the cookie, which the page
//!   gets from `POST /ui/login` or `GET /ui/session` and keeps in memory. A forged
//!   cross-site request can neither read the token nor send the header without a CORS
//!   preflight, which the master never grants.

use std::time::Duration;

use aws_lc_rs::hmac;
use axum::http::{HeaderMap, Method, header};
use common::auth::{KeyRing, constant_time_eq};
use common::http::ApiError;

/// The cookie's name.
pub const COOKIE: &str = "ensemble_session";

/// The header that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// How long a session lasts from sign-in.
pub const SESSION_LIFE: Duration = Duration::from_secs(12 * 3600);

/// The signing keys, one per operator key, in the ring's order.
pub(crate) struct Sessions {
    keys: Vec<hmac::Key>,
}

/// A session just opened or checked: what the page needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Session {
    /// The cookie's value.
    pub(crate) token: String,
    /// What the page sends in [`CSRF_HEADER`].
    pub(crate) csrf: String,
    /// When it ends (unix seconds).
    pub(crate) expires_at: u64,
}

impl Sessions {
    /// One signing key per operator key: HMAC-SHA256 of a fixed label under the operator
    /// key, so the session key is not the operator key itself.
    pub(crate) fn new(operators: &KeyRing) -> Self {
        let keys = operators
            .keys()
            .map(|secret| {
                let root = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
                let derived = hmac::sign(&root, b"ensemble dashboard session v1");
                hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
            })
            .collect();
        Self { keys }
    }

    /// Opens a session for the operator key at `index` of the ring.
    pub(crate) fn open(&self, index: usize, now: u64) -> Session {
        let expires_at = now + SESSION_LIFE.as_secs();
        let nonce: [u8; 16] = rand::random();
        let body = format!("v1.{expires_at}.{}", hex(&nonce));
        let key = &self.keys[index];
        let token = format!("{body}.{}", hex(hmac::sign(key, body.as_bytes()).as_ref()));
        Session {
            csrf: csrf(key, &token),
            token,
            expires_at,
        }
    }

    /// The session a cookie value stands for, if it is one of ours and has not expired.
    pub(crate) fn check(&self, token: &str, now: u64) -> Option<Session> {
        let (body, mac) = token.rsplit_once('.')?;
        let mut parts = body.split('.');
        let (Some("v1"), Some(expiry), Some(nonce), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let expires_at: u64 = expiry.parse().ok()?;
        if nonce.len() != 32 || expires_at <= now || expires_at > now + SESSION_LIFE.as_secs() {
            return None;
        }
        // Every key is tried, so the time taken does not say which one signed it.
        let mut found = None;
        for key in &self.keys {
            let expected = hex(hmac::sign(key, body.as_bytes()).as_ref());
            if constant_time_eq(expected.as_bytes(), mac.as_bytes()) {
                found = Some(key);
            }
        }
        found.map(|key| Session {
            csrf: csrf(key, token),
            token: token.to_string(),
            expires_at,
        })
    }

    /// Checks the session cookie of a request: `Ok(None)` when there is no cookie, an
    /// error when there is one that is not (or no longer) valid, or when a request that
    /// changes something lacks the CSRF token.
    pub(crate) fn authorize(
        &self,
        method: &Method,
        headers: &HeaderMap,
        now: u64,
    ) -> Result<Option<Session>, ApiError> {
        let Some(token) = cookie(headers) else {
            return Ok(None);
        };
        let session = self.check(token, now).ok_or_else(|| {
            ApiError::unauthorized(
                "the dashboard session has expired or is not valid: sign in again",
            )
        })?;
        if !matches!(*method, Method::GET | Method::HEAD) {
            let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            if !sent.is_some_and(|t| constant_time_eq(t.as_bytes(), session.csrf.as_bytes())) {
                return Err(ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "csrf",
                    "a dashboard request that changes something needs the session's `X-CSRF-Token`",
                ));
            }
        }
        Ok(Some(session))
    }
}

/// The session cookie's value, from any `Cookie` header of the request.
pub(crate) fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
}

/// The `Set-Cookie` value that stores a session (or, with `None`, clears it).
pub(crate) fn set_cookie(session: Option<&Session>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match session {
        Some(s) => format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            s.token,
            SESSION_LIFE.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

/// Whether the client reached us over HTTPS, by the load balancer's word.
pub(crate) fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

fn csrf(key: &hmac::Key, token: &str) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(b"csrf.");
    ctx.update(token.as_bytes());
    hex(ctx.sign().as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn ring(text: &str) -> Sessions {
        Sessions::new(&KeyRing::parse("OPERATOR_API_KEYS", text).unwrap())
    }

    fn with_cookie(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("theme=dark; {COOKIE}={token}; other=1")).unwrap(),
        );
        h
    }

    #[test]
    fn a_session_is_valid_until_it_expires_and_only_for_its_keys() {
        let sessions = ring("ops:ops-key-111111,oncall:ops-key-222222");
        let now = 1_800_000_000;
        let s = sessions.open(1, now);
        assert_eq!(sessions.check(&s.token, now + 10), Some(s.clone()));
        assert_eq!(sessions.check(&s.token, s.expires_at), None, "expired");
        // The same token under a ring without that key (rotated out) is refused.
        assert_eq!(ring("ops:ops-key-111111").check(&s.token, now), None);
        // A changed expiry or nonce breaks the signature.
        let longer = s.token.replacen(
            &s.expires_at.to_string(),
            &(s.expires_at - 1).to_string(),
            1,
        );
        assert_eq!(sessions.check(&longer, now), None);
        for bad in ["", "v1", "v1...", "v2.1.2.3", &format!("{}x", s.token)] {
            assert_eq!(sessions.check(bad, now), None, "{bad:?}");
        }
        assert_ne!(sessions.open(1, now).token, s.token, "each sign-in is new");
    }

    #[test]
    fn a_change_needs_the_csrf_token_and_a_read_does_not() {
        let sessions = ring("ops:ops-key-111111");
        let now = 1_800_000_000;
        let s = sessions.open(0, now);
        let mut headers = with_cookie(&s.token);
        assert!(
            sessions
                .authorize(&Method::GET, &headers, now)
                .unwrap()
                .is_some()
        );
        let refused = sessions
            .authorize(&Method::POST, &headers, now)
            .unwrap_err();
        assert_eq!(refused.status, 403);
        headers.insert(CSRF_HEADER, HeaderValue::from_static("0000"));
        assert!(sessions.authorize(&Method::DELETE, &headers, now).is_err());
        headers.insert(CSRF_HEADER, HeaderValue::from_str(&s.csrf).unwrap());
        assert!(sessions.authorize(&Method::DELETE, &headers, now).is_ok());
        // Another session's token does not fit this cookie.
        let other = sessions.open(0, now);
        headers.insert(CSRF_HEADER, HeaderValue::from_str(&other.csrf).unwrap());
        assert!(sessions.authorize(&Method::POST, &headers, now).is_err());
        // No cookie: no session, and no error (other credentials may follow).
        assert!(
            sessions
                .authorize(&Method::POST, &HeaderMap::new(), now)
                .unwrap()
                .is_none()
        );
        // A stale cookie is an error that says to sign in again.
        let stale = sessions.authorize(&Method::GET, &with_cookie(&s.token), s.expires_at);
        assert_eq!(stale.unwrap_err().status, 401);
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_behind_https() {
        let s = ring("ops:ops-key-111111").open(0, 1);
        let set = set_cookie(Some(&s), true);
        for part in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
            assert!(set.contains(part), "{set}");
        }
        assert!(!set_cookie(Some(&s), false).contains("Secure"));
        assert!(set_cookie(None, false).contains("Max-Age=0"));
    }
}

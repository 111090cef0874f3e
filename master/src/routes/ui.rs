//! The dashboard (`/ui`, docs/dashboard.md): one page, its script and its style, built
//! into the binary (no CDN, no build step), and sign-in and sign-out. Everything the page
//! shows it reads from the operator routes (`/queues`, `/workers`, `/tasks`, `/task/{id}`,
//! `/events`, `/deadletters`) with the session cookie of `session.rs`, so there is no
//! second source of truth and nothing the API cannot do.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use common::http::{ApiError, JsonBody};
use serde::{Deserialize, Serialize};

use crate::auth::Auth;
use crate::session::{self, Session};

const PAGE: &str = include_str!("../../ui/index.html");
const SCRIPT: &str = include_str!("../../ui/app.js");
const STYLE: &str = include_str!("../../ui/app.css");

/// What the page may load and where it may connect: itself only. No inline script, so an
/// injected `<script>` would not run; no framing, so no clickjacking.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The binary is the version: a new master serves new assets, so always revalidate.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `GET /ui`: the page (sign-in form until there is a session).
pub(super) async fn page() -> Response {
    let mut response = asset("text/html; charset=utf-8", PAGE);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// `GET /ui/app.js`.
pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /ui/app.css`.
pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// `POST /ui/login` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Login {
    /// An operator key (`OPERATOR_API_KEYS`).
    key: String,
}

/// What the page learns about its session.
#[derive(Serialize)]
pub(super) struct SessionView {
    /// Whether the master checks credentials at all (`false` with `AUTH_DISABLED`).
    auth: bool,
    /// Sent back in `X-CSRF-Token` on every change.
    csrf: String,
    /// When the session ends (ms since the epoch).
    expires_at_ms: Option<u64>,
}

impl From<&Session> for SessionView {
    fn from(s: &Session) -> Self {
        Self {
            auth: true,
            csrf: s.csrf.clone(),
            expires_at_ms: Some(s.expires_at.saturating_mul(1000)),
        }
    }
}

/// `POST /ui/login` `{"key"}`: an operator key opens a session (the cookie) and answers
/// its CSRF token. A client key is refused (`403`), like on every operator route.
pub(super) async fn login(
    State(auth): State<Arc<Auth>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Login>,
) -> Result<Response, ApiError> {
    if auth.disabled() {
        return Ok(Json(disabled()).into_response());
    }
    let session = auth.sign_in(body.key.trim())?;
    let cookie = session::set_cookie(Some(&session), session::over_https(&headers));
    Ok(with_cookie(Json(SessionView::from(&session)), &cookie))
}

/// `GET /ui/session`: the current session's CSRF token and expiry, or `401`.
pub(super) async fn current(
    State(auth): State<Arc<Auth>>,
    method: Method,
    headers: HeaderMap,
) -> Result<Json<SessionView>, ApiError> {
    if auth.disabled() {
        return Ok(Json(disabled()));
    }
    match auth.session(&method, &headers)? {
        Some(session) => Ok(Json(SessionView::from(&session))),
        None => Err(ApiError::unauthorized("not signed in")),
    }
}

/// `POST /ui/logout`: clears the cookie.
pub(super) async fn logout(headers: HeaderMap) -> Response {
    let cookie = session::set_cookie(None, session::over_https(&headers));
    with_cookie(StatusCode::NO_CONTENT, &cookie)
}

fn disabled() -> SessionView {
    SessionView {
        auth: false,
        csrf: String::new(),
        expires_at_ms: None,
    }
}

fn with_cookie(answer: impl IntoResponse, cookie: &str) -> Response {
    let mut response = answer.into_response();
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

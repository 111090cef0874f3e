//! Who is calling: clients (API keys from `API_KEYS`, or bearer JWTs — HS256 with
//! `JWT_SECRET` or RS256 with `JWT_PUBLIC_KEY_FILE`, `sub` = client id, `exp` required,
//! algorithm pinned), operators (`OPERATOR_API_KEYS`, or the dashboard's session cookie:
//! `session.rs`), workers (`WORKER_TOKEN`). Keys are compared in constant time; a credential
//! of one kind never works as another.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use common::auth::{KeyRing, bearer, matches};
use common::config::{ConfigError, Secret};
use common::http::ApiError;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

use crate::Config;
use crate::session::{Session, Sessions};

/// The client id used for every caller when auth is disabled.
pub const ANONYMOUS: &str = "anonymous";

/// The master's credentials.
pub struct Auth {
    /// `AUTH_DISABLED`: for a laptop; every caller is [`ANONYMOUS`] and may do everything.
    disabled: bool,
    /// `API_KEYS`: key → client id; the id decides whose tasks a caller sees.
    clients: KeyRing,
    /// `OPERATOR_API_KEYS`: a separate ring, so a client key never opens operator routes.
    operators: KeyRing,
    /// The dashboard's sessions, signed with keys derived from `operators`.
    sessions: Sessions,
    /// Failed sign-ins on this master ([`SignInGate`]).
    sign_ins: SignInGate,
    /// `WORKER_TOKEN`: only workers may report results.
    worker_token: Secret,
    /// `JWT_SECRET`, for clients whose identity provider signs HS256 tokens.
    hs256: Option<(DecodingKey, Validation)>,
    /// `JWT_PUBLIC_KEY_FILE`, for clients whose identity provider signs RS256 tokens.
    rs256: Option<(DecodingKey, Validation)>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("disabled", &self.disabled)
            .finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

fn validation(alg: Algorithm, config: &Config) -> Validation {
    let mut v = Validation::new(alg);
    // jsonwebtoken checks `iss`/`aud` only when the token carries them: a configured issuer
    // or audience must also make the claim required, or a token without it gets in.
    let mut required = vec!["exp", "sub"];
    v.leeway = 5;
    if let Some(iss) = &config.jwt_issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    if let Some(aud) = &config.jwt_audience {
        v.set_audience(&[aud]);
        required.push("aud");
    } else {
        v.validate_aud = false;
    }
    v.set_required_spec_claims(&required);
    v
}

impl Auth {
    /// Builds the credentials from the config. Errors name the setting.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let hs256 = (!config.jwt_secret.is_empty()).then(|| {
            (
                DecodingKey::from_secret(config.jwt_secret.expose().as_bytes()),
                validation(Algorithm::HS256, config),
            )
        });
        let rs256 = match &config.jwt_public_key_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    ConfigError::invalid("JWT_PUBLIC_KEY_FILE", format!("{path}: {e}"))
                })?;
                let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                    ConfigError::invalid(
                        "JWT_PUBLIC_KEY_FILE",
                        format!("not an RSA public key PEM: {e}"),
                    )
                })?;
                Some((key, validation(Algorithm::RS256, config)))
            }
            None => None,
        };
        let operators = KeyRing::parse("OPERATOR_API_KEYS", config.operator_api_keys.expose())?;
        Ok(Self {
            disabled: config.auth_disabled,
            clients: KeyRing::parse("API_KEYS", config.api_keys.expose())?,
            sessions: Sessions::new(&operators),
            sign_ins: SignInGate::default(),
            operators,
            worker_token: config.worker_token.clone(),
            hs256,
            rs256,
        })
    }

    /// Whether auth is off (local use).
    pub fn disabled(&self) -> bool {
        self.disabled
    }

    /// The calling client's id. This check and the two below are private: a handler takes
    /// the extractor ([`Client`], [`Operator`], [`Worker`], [`Caller`]) and never checks by
    /// hand.
    fn client(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        if self.disabled {
            return Ok(ANONYMOUS.to_string());
        }
        let token = bearer(headers)
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "missing credentials: send `Authorization: Bearer <API key or JWT>`",
                )
            })?;
        if let Some(client) = self.clients.client_for(token) {
            return Ok(client.to_string());
        }
        if token.split('.').count() == 3 {
            return self.jwt_client(token);
        }
        Err(ApiError::unauthorized("invalid API key"))
    }

    fn jwt_client(&self, token: &str) -> Result<String, ApiError> {
        let bad = |why: &str| ApiError::unauthorized(format!("invalid token: {why}"));
        // `alg` is pinned: only the algorithm configured for a key is accepted with it, and
        // `none` never (jsonwebtoken has no such algorithm).
        let header = decode_header(token).map_err(|_| bad("malformed"))?;
        let (key, validation) = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rs256.as_ref(),
            _ => None,
        }
        .ok_or_else(|| bad("algorithm not accepted"))?;
        let data = decode::<Claims>(token, key, validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => bad("expired"),
                ErrorKind::InvalidSignature => bad("bad signature"),
                ErrorKind::MissingRequiredClaim(c) => bad(&format!("missing claim `{c}`")),
                ErrorKind::InvalidIssuer => bad("wrong issuer"),
                ErrorKind::InvalidAudience => bad("wrong audience"),
                _ => bad("rejected"),
            }
        })?;
        let sub = data.claims.sub.trim();
        if sub.is_empty() || sub.len() > 128 || sub.contains(':') {
            return Err(bad("`sub` must be a client id (1-128 characters, no `:`)"));
        }
        Ok(sub.to_string())
    }

    /// Signs a dashboard user in: an operator key gets a session (`POST /ui/login`).
    /// Past [`SIGN_IN_FAILURES`] recent failures, every sign-in gets `429` for a while.
    pub(crate) fn sign_in(&self, key: &str) -> Result<Session, ApiError> {
        self.sign_ins.admit()?;
        let refused = match self.operators.position(key) {
            Some(index) => return Ok(self.sessions.open(index, common::wire::now_ms() / 1000)),
            None if self.clients.client_for(key).is_some() => {
                ApiError::forbidden("the dashboard needs an operator key, not a client key")
            }
            None => ApiError::unauthorized("invalid operator key"),
        };
        self.sign_ins.failed();
        Err(refused)
    }

    /// The dashboard session of a request (`Ok(None)` without a session cookie); see
    /// [`Sessions::authorize`].
    pub(crate) fn session(
        &self,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<Option<Session>, ApiError> {
        self.sessions
            .authorize(method, headers, common::wire::now_ms() / 1000)
    }

    /// Checks an operator credential: an operator key as a bearer token, or else a dashboard
    /// session.
    fn operator(&self, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.disabled {
            return Ok(());
        }
        let Some(token) = bearer(headers) else {
            return match self.session(method, headers)? {
                Some(_) => Ok(()),
                None => Err(ApiError::unauthorized(
                    "missing credentials: send `Authorization: Bearer <operator key>`",
                )),
            };
        };
        if self.operators.client_for(token).is_some() {
            Ok(())
        } else if self.clients.client_for(token).is_some() {
            Err(ApiError::forbidden("this endpoint needs an operator key"))
        } else {
            Err(ApiError::unauthorized("invalid operator key"))
        }
    }

    /// Checks the worker token.
    fn worker(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.disabled {
            return Ok(());
        }
        match bearer(headers) {
            Some(token) if matches(&self.worker_token, token) => Ok(()),
            Some(_) => Err(ApiError::unauthorized("invalid worker token")),
            None => Err(ApiError::unauthorized(
                "missing credentials: send `Authorization: Bearer <WORKER_TOKEN>`",
            )),
        }
    }
}

/// The calling client's id, checked from the headers before the body is read: a caller
/// without credentials costs the master no body parsing and learns nothing from it.
#[derive(Debug, Clone)]
pub struct Client(pub String);

/// An operator credential (`OPERATOR_API_KEYS`).
#[derive(Debug, Clone, Copy)]
pub struct Operator;

/// The worker token (`WORKER_TOKEN`).
#[derive(Debug, Clone, Copy)]
pub struct Worker;

/// A client, or an operator acting on any client's task (`DELETE /task/{id}`).
#[derive(Debug, Clone)]
pub enum Caller {
    /// May act on its own tasks only.
    Client(String),
    /// May act on every task.
    Operator,
}

impl<S: Send + Sync> FromRequestParts<S> for Client
where
    Arc<Auth>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Arc::<Auth>::from_ref(state)
            .client(&parts.headers)
            .map(Self)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Operator
where
    Arc<Auth>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Arc::<Auth>::from_ref(state)
            .operator(&parts.method, &parts.headers)
            .map(|()| Self)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Worker
where
    Arc<Auth>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Arc::<Auth>::from_ref(state)
            .worker(&parts.headers)
            .map(|()| Self)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller
where
    Arc<Auth>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let auth = Arc::<Auth>::from_ref(state);
        if !auth.disabled() {
            let operator = match bearer(&parts.headers) {
                Some(t) => auth.operators.client_for(t).is_some(),
                // No bearer token or API key header: a dashboard session acts as an operator.
                None if !parts.headers.contains_key("x-api-key") => {
                    auth.session(&parts.method, &parts.headers)?.is_some()
                }
                None => false,
            };
            if operator {
                return Ok(Self::Operator);
            }
        }
        auth.client(&parts.headers).map(Self::Client)
    }
}

/// Failed dashboard sign-ins one master allows in a burst; one more is allowed every
/// [`SIGN_IN_REFILL`].
pub(crate) const SIGN_IN_FAILURES: f64 = 10.0;
/// How often one more failed sign-in is allowed: 10 a minute once the burst is spent.
pub(crate) const SIGN_IN_REFILL: Duration = Duration::from_secs(6);

/// Guesses at operator keys through `POST /ui/login`, slowed down: a bucket of failures
/// per master (not per address, which a guesser can change or forge behind the load
/// balancer). While it is empty every sign-in is refused with `429`, the right key too,
/// so the answers tell a guesser nothing faster than the bucket refills. An operator
/// locked out meanwhile still reaches every operator route with the key as a bearer token.
#[derive(Debug)]
struct SignInGate {
    /// Failures still allowed now, and when that was worked out.
    bucket: Mutex<(f64, Instant)>,
}

impl Default for SignInGate {
    fn default() -> Self {
        Self {
            bucket: Mutex::new((SIGN_IN_FAILURES, Instant::now())),
        }
    }
}

impl SignInGate {
    /// Refills the bucket for the time gone by; returns what it holds.
    fn refill(&self) -> std::sync::MutexGuard<'_, (f64, Instant)> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let earned = now.duration_since(bucket.1).as_secs_f64() / SIGN_IN_REFILL.as_secs_f64();
        *bucket = ((bucket.0 + earned).min(SIGN_IN_FAILURES), now);
        bucket
    }

    /// `429` with `Retry-After` while no failure is allowed.
    fn admit(&self) -> Result<(), ApiError> {
        let bucket = self.refill();
        if bucket.0 >= 1.0 {
            return Ok(());
        }
        let wait = (1.0 - bucket.0) * SIGN_IN_REFILL.as_secs_f64();
        Err(ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_sign_ins",
            "too many failed sign-ins on this master; wait, or use the key as a bearer token",
        )
        .retry_after(wait.ceil() as u64))
    }

    fn failed(&self) {
        let mut bucket = self.refill();
        bucket.0 = (bucket.0 - 1.0).max(0.0);
    }
}

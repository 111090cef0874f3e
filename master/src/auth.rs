//! Who is calling: clients (API keys from `API_KEYS`, or bearer JWTs — HS256 with
//! `JWT_SECRET` or RS256 with `JWT_PUBLIC_KEY_FILE`, `sub` = client id, `exp` required,
//! algorithm pinned), operators (`OPERATOR_API_KEYS`), workers (`WORKER_TOKEN`). Keys are
//! compared in constant time; a credential of one kind never works as another.

use axum::http::HeaderMap;
use common::auth::{KeyRing, bearer, matches};
use common::config::{ConfigError, Secret};
use common::http::ApiError;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

use crate::Config;

/// The client id used for every caller when auth is disabled.
pub const ANONYMOUS: &str = "anonymous";

/// The master's credentials.
pub struct Auth {
    disabled: bool,
    clients: KeyRing,
    operators: KeyRing,
    worker_token: Secret,
    hs256: Option<(DecodingKey, Validation)>,
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
    v.set_required_spec_claims(&["exp", "sub"]);
    v.leeway = 5;
    if let Some(iss) = &config.jwt_issuer {
        v.set_issuer(&[iss]);
    }
    if let Some(aud) = &config.jwt_audience {
        v.set_audience(&[aud]);
    } else {
        v.validate_aud = false;
    }
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
        Ok(Self {
            disabled: config.auth_disabled,
            clients: KeyRing::parse("API_KEYS", config.api_keys.expose())?,
            operators: KeyRing::parse("OPERATOR_API_KEYS", config.operator_api_keys.expose())?,
            worker_token: config.worker_token.clone(),
            hs256,
            rs256,
        })
    }

    /// Whether auth is off (local use).
    pub fn disabled(&self) -> bool {
        self.disabled
    }

    /// The calling client's id.
    pub fn client(&self, headers: &HeaderMap) -> Result<String, ApiError> {
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

    /// Checks an operator credential.
    pub fn operator(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.disabled {
            return Ok(());
        }
        let token = bearer(headers).ok_or_else(|| {
            ApiError::unauthorized(
                "missing credentials: send `Authorization: Bearer <operator key>`",
            )
        })?;
        if self.operators.client_for(token).is_some() {
            Ok(())
        } else if self.clients.client_for(token).is_some() {
            Err(ApiError::forbidden("this endpoint needs an operator key"))
        } else {
            Err(ApiError::unauthorized("invalid operator key"))
        }
    }

    /// Checks the worker token.
    pub fn worker(&self, headers: &HeaderMap) -> Result<(), ApiError> {
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

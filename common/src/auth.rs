//! Credential helpers: constant-time comparison, bearer tokens, and key rings that map
//! API keys to client ids.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use subtle::ConstantTimeEq;

use crate::config::{ConfigError, Secret};

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether `presented` equals the configured secret (never true for an empty secret).
pub fn matches(secret: &Secret, presented: &str) -> bool {
    !secret.is_empty() && constant_time_eq(secret.expose().as_bytes(), presented.as_bytes())
}

/// API keys and the client each belongs to, from `client_id:key,client_id:key`.
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: Vec<(String, Secret)>,
}

impl KeyRing {
    /// Parses `client_id:key,client_id:key`; `setting` names the variable in errors.
    pub fn parse(setting: &str, text: &str) -> Result<Self, ConfigError> {
        let mut keys = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((client, key)) = entry.split_once(':') else {
                return Err(ConfigError::invalid(
                    setting,
                    "each entry must be client_id:key (the entry has no `:`)",
                ));
            };
            let (client, key) = (client.trim(), key.trim());
            if client.is_empty() || key.is_empty() {
                return Err(ConfigError::invalid(
                    setting,
                    "each entry must be client_id:key with both parts non-empty",
                ));
            }
            if key.len() < 8 {
                return Err(ConfigError::invalid(
                    setting,
                    format!("the key for client `{client}` is shorter than 8 characters"),
                ));
            }
            keys.push((client.to_string(), Secret::new(key)));
        }
        Ok(Self { keys })
    }

    /// Whether no keys are configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The client a presented key belongs to. Every configured key is compared, so the time
    /// taken does not reveal which one matched.
    pub fn client_for(&self, presented: &str) -> Option<&str> {
        self.position(presented).map(|i| self.keys[i].0.as_str())
    }

    /// Where a presented key is in the ring (the order of the setting), compared like
    /// [`KeyRing::client_for`].
    pub fn position(&self, presented: &str) -> Option<usize> {
        let mut found = None;
        for (i, (_, key)) in self.keys.iter().enumerate() {
            if constant_time_eq(key.expose().as_bytes(), presented.as_bytes()) {
                found = Some(i);
            }
        }
        found
    }

    /// The keys, in the order of the setting (to derive other secrets from them).
    pub fn keys(&self) -> impl Iterator<Item = &Secret> {
        self.keys.iter().map(|(_, key)| key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ring_finds_clients_and_rejects_bad_entries() {
        let ring = KeyRing::parse("API_KEYS", "alice:key-aaaaaaaa, bob:key-bbbbbbbb").unwrap();
        assert_eq!(ring.client_for("key-aaaaaaaa"), Some("alice"));
        assert_eq!(ring.client_for("key-bbbbbbbb"), Some("bob"));
        assert_eq!(ring.client_for("key-cccccccc"), None);
        assert_eq!(ring.client_for(""), None);
        let err = KeyRing::parse("API_KEYS", "nocolon")
            .unwrap_err()
            .to_string();
        assert!(err.contains("API_KEYS"), "{err}");
        assert!(KeyRing::parse("API_KEYS", "a:short").is_err());
    }

    #[test]
    fn bearer_is_parsed_case_insensitively() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn empty_secret_never_matches() {
        assert!(!matches(&Secret::new(""), ""));
        assert!(matches(&Secret::new("t0ken"), "t0ken"));
        assert!(!matches(&Secret::new("t0ken"), "t0ke"));
    }
}

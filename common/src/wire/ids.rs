//! Identifiers checked once, at the edge, so the rest of the code can trust them (and use
//! them inside Redis keys without escaping).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// An identifier failed its check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{value}`: {why}")]
pub struct IdError {
    what: &'static str,
    value: String,
    why: &'static str,
}

fn check(
    what: &'static str,
    value: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
    why: &'static str,
) -> Result<(), IdError> {
    let shown: String = value.chars().take(80).collect();
    if value.is_empty() {
        return Err(IdError {
            what,
            value: shown,
            why: "must not be empty",
        });
    }
    if value.len() > max {
        return Err(IdError {
            what,
            value: shown,
            why: "is too long",
        });
    }
    if !value.chars().all(allowed) {
        return Err(IdError {
            what,
            value: shown,
            why,
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $allowed:expr, $why:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Checks and wraps a value.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check($what, &value, $max, $allowed, $why)?;
                Ok(Self(value))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A task id: a UUIDv7 when the master makes it (sortable by creation time); at most 64
    /// characters of `A-Z a-z 0-9 - _`.
    TaskId,
    "task id",
    64,
    |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_',
    "only letters, digits, `-` and `_` are allowed"
);

id_type!(
    /// A capability a step needs and a worker advertises (`plan`, `retrieve`, …): at most 64
    /// characters of lower-case letters, digits, `-`, `_` and `.`.
    Capability,
    "capability",
    64,
    |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.',
    "only lower-case letters, digits, `-`, `_` and `.` are allowed"
);

id_type!(
    /// A worker's id (`AGENT_ID`): at most 128 characters of letters, digits and `-_.:`.
    WorkerId,
    "worker id",
    128,
    |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'),
    "only letters, digits, `-`, `_`, `.` and `:` are allowed"
);

/// Hand-written JSON Schemas for the ids: their `Deserialize` checks the value, so the
/// schema states the same rule (every allowed character is ASCII, so the schema's length in
/// code points is the check's length in bytes). `checks/tests/protocol_schemas.rs` holds the
/// two together over every ASCII character and the length limits.
#[cfg(feature = "schema")]
macro_rules! id_schema {
    ($name:ident, $pattern:literal, $max:literal, $description:literal) => {
        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                let serde_json::Value::Object(map) = serde_json::json!({
                    "type": "string",
                    "description": $description,
                    "pattern": $pattern,
                    "minLength": 1,
                    "maxLength": $max,
                }) else {
                    unreachable!("a JSON object literal is an object")
                };
                schemars::Schema::from(map)
            }
        }
    };
}

#[cfg(feature = "schema")]
id_schema!(
    TaskId,
    "^[A-Za-z0-9_-]{1,64}$",
    64,
    "A task id: 1 to 64 of `A-Z a-z 0-9 - _` (a UUIDv7 when the master makes it)."
);
#[cfg(feature = "schema")]
id_schema!(
    Capability,
    "^[a-z0-9._-]{1,64}$",
    64,
    "A capability (`plan`, `retrieve`, …): 1 to 64 of lower-case letters, digits, `-`, `_` and `.`."
);
#[cfg(feature = "schema")]
id_schema!(
    WorkerId,
    "^[A-Za-z0-9_.:-]{1,128}$",
    128,
    "A worker's id (`AGENT_ID`): 1 to 128 of letters, digits and `-`, `_`, `.`, `:`."
);

impl TaskId {
    /// A new, time-ordered task id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }
}

impl WorkerId {
    /// A new worker id, unique per process, for workers started without `AGENT_ID`.
    pub fn generate(prefix: &str) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let prefix: String = prefix
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
            .take(64)
            .collect();
        if prefix.is_empty() {
            Self(format!("worker-{}", &suffix[..12]))
        } else {
            Self(format!("{prefix}-{}", &suffix[..12]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_what_could_break_a_key() {
        assert!(TaskId::new("abc-123_X").is_ok());
        assert!(TaskId::new("").is_err());
        assert!(TaskId::new("a:b").is_err());
        assert!(TaskId::new("a{b}").is_err());
        assert!(TaskId::new("x".repeat(65)).is_err());
        assert!(Capability::new("plan").is_ok());
        assert!(Capability::new("Plan").is_err());
        assert!(Capability::new("web search").is_err());
        assert!(WorkerId::new("worker-a:1").is_ok());
        assert!(WorkerId::new("w/1").is_err());
    }

    #[test]
    fn ids_validate_when_deserialized() {
        let err = serde_json::from_str::<Capability>("\"NOT OK\"").unwrap_err();
        assert!(err.to_string().contains("invalid capability"), "{err}");
        let ok: Capability = serde_json::from_str("\"retrieve\"").unwrap();
        assert_eq!(ok.as_str(), "retrieve");
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = TaskId::generate();
        let b = TaskId::generate();
        assert_ne!(a, b);
        assert!(TaskId::new(a.as_str()).is_ok());
        let w = WorkerId::generate("worker-a");
        assert!(w.as_str().starts_with("worker-a-"));
        assert!(WorkerId::new(w.as_str()).is_ok());
        assert_ne!(w, WorkerId::generate("worker-a"));
    }
}

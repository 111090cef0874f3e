//! Layered configuration: built-in defaults, then an optional TOML file, then environment
//! variables, with the deployment documents' variable names (`PORT`, `REDIS_HOST`, …).
//!
//! Every service has one typed config struct that implements [`Settings`]. The struct's
//! `Default` holds the built-in defaults; a TOML file named by `--config PATH` or
//! `ENSEMBLE_CONFIG` comes next; the environment variables the service lists in
//! [`Settings::env_vars`] come last. `REDIS_*` variables land in the `[redis]` table
//! (`REDIS_PORT` → `redis.port`); every other variable maps to the top-level key of the same
//! name in lower case (`MAX_CONCURRENCY` → `max_concurrency`). A bad value stops the service
//! at start with an error that names the variable.
//!
//! Every duration setting is a whole number of milliseconds named `*_MS` (env) / `*_ms`
//! (TOML key and field), as in BullMQ: `LEASE_MS=10000`, `heartbeat_interval_ms = 2000`.
//! One convention means nobody has to remember which setting takes seconds or a unit; a
//! value with a unit (`2s`) is refused, not guessed at. A config struct keeps the `u64`
//! and offers a `Duration` accessor for the code that waits on it.
//!
//! A key in the TOML file that the service does not have is refused, named with its table
//! path and the nearest known key (`unknown key pipelines.x.stepz in the config file: did
//! you mean steps?`): a mistyped key would otherwise leave its setting at the default
//! without a word. The file's tables are compared with the service's defaults serialized;
//! tables of free-form names (`[pipelines.NAME]`, `[models.ALIAS]`) are empty in the
//! defaults, so their entries are checked by their own types (`#[serde(deny_unknown_fields)]`),
//! whose unknown-field errors get the same wording. The environment cannot be checked this
//! way: it holds every other program's variables too.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::error::Kind;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use serde::de::{self, DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The environment variable that names a TOML configuration file.
pub const CONFIG_FILE_ENV: &str = "ENSEMBLE_CONFIG";

/// A typed service configuration.
pub trait Settings: Serialize + DeserializeOwned + Default {
    /// Every environment variable the service reads, upper case, as operators write them.
    /// The compose and Terraform checks hold the deployment files against this list.
    fn env_vars() -> Vec<&'static str>;

    /// The variables a production deployment must set (the compose and Terraform checks
    /// require them in every container definition of the service).
    fn required_env_vars() -> Vec<&'static str> {
        Vec::new()
    }

    /// Environment variables the service no longer reads, with the ones that replaced them.
    /// A deployment still setting an old name is refused at start rather than left at the
    /// default without a word.
    fn renamed_env_vars() -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }

    /// Checks that cannot be expressed in types (for example "one of A or B must be set").
    /// The error names the setting.
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// A configuration error, naming the setting that caused it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    /// An invalid value for the named setting.
    pub fn invalid(setting: &str, why: impl fmt::Display) -> Self {
        Self(format!("invalid setting {setting}: {why}"))
    }
}

/// Loads `T` from defaults, the TOML file named by `--config` or `ENSEMBLE_CONFIG`, and the
/// process environment.
pub fn load<T: Settings>() -> Result<T, ConfigError> {
    let file = config_file_from_args(std::env::args()).or_else(|| {
        std::env::var_os(CONFIG_FILE_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    load_from(file.as_deref())
}

/// Loads `T` from defaults, an optional TOML file and the process environment.
pub fn load_from<T: Settings>(file: Option<&Path>) -> Result<T, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError(format!(
                "configuration file {} (from --config or {CONFIG_FILE_ENV}) does not exist",
                path.display()
            )));
        }
        let toml = Figment::from(Toml::file_exact(path));
        check_keys(&known_keys::<T>()?, &table(toml.clone())?, "")?;
        figment = figment.merge(toml);
    }
    if let Some((old, new)) = T::renamed_env_vars()
        .into_iter()
        .find(|(old, _)| std::env::var_os(old).is_some())
    {
        return Err(ConfigError(format!(
            "{old} is no longer read: set {new} instead (durations are whole milliseconds)"
        )));
    }
    figment = figment.merge(env_provider(T::env_vars()));
    extract(figment)
}

/// The environment provider for a list of variable names.
pub fn env_provider(vars: Vec<&'static str>) -> Env {
    Env::raw()
        .filter(move |key| vars.iter().any(|v| v.eq_ignore_ascii_case(key.as_str())))
        .map(|key| env_to_key(key.as_str()).into())
}

/// Extracts and validates `T`, turning figment's errors into ones that name the variable.
pub fn extract<T: Settings>(figment: Figment) -> Result<T, ConfigError> {
    let config: T = figment
        .extract()
        .map_err(|errors| ConfigError(describe_all(errors)))?;
    config.validate()?;
    Ok(config)
}

/// The keys `T` has: its defaults, serialized.
fn known_keys<T: Settings>() -> Result<Dict, ConfigError> {
    table(Figment::from(Serialized::defaults(T::default())))
}

/// A provider's data as one table.
fn table(figment: Figment) -> Result<Dict, ConfigError> {
    figment
        .extract()
        .map_err(|errors| ConfigError(describe_all(errors)))
}

/// Refuses the first key of `file` that `known` does not have, descending into the tables
/// both have. An empty known table holds free-form names, which are not checked here.
fn check_keys(known: &Dict, file: &Dict, prefix: &str) -> Result<(), ConfigError> {
    for (key, value) in file {
        let path = format!("{prefix}{key}");
        match (known.get(key), value) {
            (None, _) => return Err(unknown_key(&path, key, known.keys().map(String::as_str))),
            (Some(Value::Dict(_, known)), Value::Dict(_, file)) if !known.is_empty() => {
                check_keys(known, file, &format!("{path}."))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The error for an unknown key, suggesting the nearest of the known ones.
fn unknown_key<'a>(path: &str, key: &str, known: impl Iterator<Item = &'a str>) -> ConfigError {
    let nearest = known
        .map(|k| (edit_distance(key, k), k))
        .min()
        .filter(|&(distance, _)| distance <= key.len().div_ceil(2));
    match nearest {
        Some((_, k)) => ConfigError(format!(
            "unknown key {path} in the config file: did you mean {k}?"
        )),
        None => ConfigError(format!("unknown key {path} in the config file")),
    }
}

/// Levenshtein distance: edits (insert, delete, replace) that turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// `REDIS_PORT` → `redis.port`, `MAX_CONCURRENCY` → `max_concurrency`.
fn env_to_key(var: &str) -> String {
    let lower = var.to_ascii_lowercase();
    match lower.strip_prefix("redis_") {
        Some(rest) => format!("redis.{rest}"),
        None => lower,
    }
}

/// `redis.port` → `REDIS_PORT`: the inverse of [`env_to_key`].
fn key_to_env(path: &[String]) -> String {
    path.join("_").to_ascii_uppercase()
}

fn describe_all(errors: figment::Error) -> String {
    let lines: Vec<String> = errors.into_iter().map(|e| describe(&e)).collect();
    lines.join("; ")
}

fn describe(error: &figment::Error) -> String {
    if let Kind::UnknownField(field, expected) = &error.kind {
        // figment's path already ends with the unknown field.
        return unknown_key(&error.path.join("."), field, expected.iter().copied()).0;
    }
    let from_env = error
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.contains("environment"));
    let key = error.path.join(".");
    let setting = if error.path.is_empty() {
        "configuration".to_string()
    } else if from_env {
        key_to_env(&error.path)
    } else {
        format!("{} (`{key}` in the config file)", key_to_env(&error.path))
    };
    if is_millis(error) {
        return format!(
            "invalid setting {setting}: {}: durations are a whole number of milliseconds, \
             without a unit (2000, not 2s)",
            error.kind
        );
    }
    format!("invalid setting {setting}: {}", error.kind)
}

/// Whether the error is a non-number in a `*_ms` setting, the likeliest cause of which is a
/// duration written with a unit.
fn is_millis(error: &figment::Error) -> bool {
    error.path.last().is_some_and(|key| key.ends_with("_ms"))
        && matches!(error.kind, Kind::InvalidType(..) | Kind::InvalidValue(..))
}

/// `--config PATH` or `--config=PATH` among the process arguments.
fn config_file_from_args(args: impl Iterator<Item = String>) -> Option<PathBuf> {
    let mut args = args.skip(1);
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    None
}

/// A secret setting (password, token, API key). `Debug` and `Display` print `[redacted]`,
/// so a config struct can be logged whole. Serializing yields the real value: that is only
/// used to hand defaults to figment, never for output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it (a header, an AUTH command).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether no secret was configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_string(d).map(Secret)
    }
}

/// Deserializes a string, also accepting a number or a boolean as its text. Figment parses
/// `REDIS_PASSWORD=12345` as a number; a password is still a string.
pub fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

/// Like [`lenient_string`] for an optional value.
pub fn lenient_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "lenient_string")] String);
    Ok(Option::<Wrap>::deserialize(d)?
        .map(|w| w.0)
        .filter(|s| !s.is_empty()))
}

/// A list setting given either as a list (TOML, `CAPABILITIES=["plan","retrieve"]`) or as
/// one comma-separated string (`CAPABILITIES=plan,retrieve`).
pub fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        One(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(list) => list,
        Either::One(text) => {
            let text = text.trim();
            if text.starts_with('[') {
                serde_json::from_str::<Vec<String>>(text).map_err(|e| {
                    de::Error::custom(format!("not a JSON list of strings ({e}): {text}"))
                })?
            } else {
                text.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            }
        }
    }
    .into_iter()
    .map(|s| s.trim().to_string())
    .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_map_to_keys_and_back() {
        assert_eq!(env_to_key("REDIS_PORT"), "redis.port");
        assert_eq!(env_to_key("REDIS_CA_FILE"), "redis.ca_file");
        assert_eq!(env_to_key("MAX_CONCURRENCY"), "max_concurrency");
        assert_eq!(
            key_to_env(&["redis".into(), "ca_file".into()]),
            "REDIS_CA_FILE"
        );
    }

    #[test]
    fn config_flag_is_found() {
        let args = ["bin", "--config", "a.toml"].map(String::from);
        assert_eq!(
            config_file_from_args(args.into_iter()),
            Some(PathBuf::from("a.toml"))
        );
        let args = ["bin", "--config=b.toml"].map(String::from);
        assert_eq!(
            config_file_from_args(args.into_iter()),
            Some(PathBuf::from("b.toml"))
        );
        let args = ["bin", "up"].map(String::from);
        assert_eq!(config_file_from_args(args.into_iter()), None);
    }

    #[test]
    fn a_duration_with_a_unit_is_refused_with_the_convention() {
        #[derive(Debug, Default, Serialize, Deserialize)]
        #[serde(default)]
        struct Timed {
            grace_ms: u64,
        }
        impl Settings for Timed {
            fn env_vars() -> Vec<&'static str> {
                vec!["GRACE_MS"]
            }
        }
        let figment = Figment::from(Serialized::defaults(Timed::default()))
            .merge(Toml::string("grace_ms = \"2s\""));
        let err = extract::<Timed>(figment).unwrap_err().to_string();
        assert!(
            err.contains("GRACE_MS (`grace_ms` in the config file)"),
            "{err}"
        );
        assert!(err.contains("2000, not 2s"), "{err}");
        let figment = Figment::from(Serialized::defaults(Timed::default()))
            .merge(Toml::string("grace_ms = 2000"));
        assert_eq!(extract::<Timed>(figment).unwrap().grace_ms, 2000);
    }

    /// A service's shape in small: a top-level key, a table of known keys, and a table of
    /// free-form names whose entries have a type of their own.
    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct Shaped {
        max_attempts: u32,
        redis: Inner,
        pipelines: std::collections::BTreeMap<String, Pipeline>,
        temperature: Option<f64>,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct Inner {
        port: u16,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Pipeline {
        steps: Vec<String>,
    }

    impl Settings for Shaped {
        fn env_vars() -> Vec<&'static str> {
            Vec::new()
        }
    }

    fn load_toml(text: &str) -> Result<Shaped, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        load_from(Some(&path))
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path_and_the_nearest_key() {
        for (toml, expected) in [
            (
                "max_attempt = 3",
                "unknown key max_attempt in the config file: did you mean max_attempts?",
            ),
            (
                "[redis]\nprot = 1",
                "unknown key redis.prot in the config file: did you mean port?",
            ),
            (
                "[pipelines.x]\nstepz = [\"plan\"]",
                "unknown key pipelines.x.stepz in the config file: did you mean steps?",
            ),
            (
                "completely_unrelated = 1",
                "unknown key completely_unrelated in the config file",
            ),
        ] {
            let err = load_toml(toml).unwrap_err().to_string();
            assert_eq!(err, expected, "for {toml:?}");
        }
    }

    #[test]
    fn a_file_of_known_keys_loads() {
        let config = load_toml(
            "max_attempts = 5\ntemperature = 0.5\n[redis]\nport = 7\n\
             [pipelines.fast]\nsteps = [\"plan\"]\n",
        )
        .unwrap();
        assert_eq!(config.max_attempts, 5);
        assert_eq!(config.temperature, Some(0.5));
        assert_eq!(config.redis.port, 7);
        assert_eq!(config.pipelines["fast"].steps, ["plan"]);
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("steps", "steps"), 0);
        assert_eq!(edit_distance("stepz", "steps"), 1);
        assert_eq!(edit_distance("prot", "port"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(s.expose(), "hunter2");
    }
}

//! Configuration layering (defaults < TOML < environment) and errors that name the setting.

use common::config::{ConfigError, Secret, Settings, load_from};
use common::redis::{REDIS_ENV_VARS, RedisSettings};
use figment::Jail;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(default)]
struct Demo {
    port: u16,
    name: String,
    api_key: Secret,
    #[serde(deserialize_with = "common::config::string_list")]
    capabilities: Vec<String>,
    redis: RedisSettings,
}

impl Default for Demo {
    fn default() -> Self {
        Self {
            port: 8000,
            name: "default-name".into(),
            api_key: Secret::default(),
            capabilities: vec![],
            redis: RedisSettings::default(),
        }
    }
}

impl Settings for Demo {
    fn env_vars() -> Vec<&'static str> {
        let mut v = vec!["PORT", "NAME", "API_KEY", "CAPABILITIES"];
        v.extend_from_slice(REDIS_ENV_VARS);
        v
    }
    fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()
    }
}

fn load(jail: &Jail, with_file: bool) -> Result<Demo, ConfigError> {
    let path = jail.directory().join("ensemble.toml");
    load_from::<Demo>(with_file.then_some(path.as_path()))
}

#[test]
fn defaults_then_toml_then_env() {
    Jail::expect_with(|jail| {
        let d = load(jail, false).unwrap();
        assert_eq!(d.port, 8000);
        assert_eq!(d.redis.port, 6379);

        jail.create_file(
            "ensemble.toml",
            r#"
            port = 8100
            name = "from-toml"
            capabilities = ["plan", "retrieve"]
            [redis]
            host = "cache.internal"
            port = 6380
            "#,
        )?;
        let d = load(jail, true).unwrap();
        assert_eq!((d.port, d.name.as_str()), (8100, "from-toml"));
        assert_eq!(d.capabilities, ["plan", "retrieve"]);
        assert_eq!(
            (d.redis.host.as_str(), d.redis.port),
            ("cache.internal", 6380)
        );

        jail.set_env("PORT", "8200");
        jail.set_env("REDIS_PORT", "6390");
        jail.set_env("REDIS_TLS", "true");
        jail.set_env("REDIS_PASSWORD", "12345678");
        jail.set_env("CAPABILITIES", r#"["evaluate"]"#);
        let d = load(jail, true).unwrap();
        assert_eq!(d.port, 8200, "env wins over TOML");
        assert_eq!(d.name, "from-toml", "TOML wins over defaults");
        assert_eq!(d.redis.host, "cache.internal");
        assert_eq!(d.redis.port, 6390);
        assert!(d.redis.tls);
        assert_eq!(d.redis.password.as_ref().unwrap().expose(), "12345678");
        assert_eq!(d.capabilities, ["evaluate"]);

        jail.set_env("CAPABILITIES", "plan, finalize");
        assert_eq!(load(jail, true).unwrap().capabilities, ["plan", "finalize"]);
        Ok(())
    });
}

#[test]
fn unrelated_environment_is_ignored() {
    Jail::expect_with(|jail| {
        jail.set_env("HOSTNAME", "box");
        jail.set_env("REDIS_SOMETHING_ELSE", "x");
        assert_eq!(load(jail, false).unwrap().port, 8000);
        Ok(())
    });
}

#[test]
fn bad_value_names_the_setting() {
    Jail::expect_with(|jail| {
        jail.set_env("REDIS_PORT", "abc");
        let err = load(jail, false).unwrap_err().to_string();
        assert!(
            err.contains("REDIS_PORT"),
            "error must name REDIS_PORT: {err}"
        );

        jail.set_env("REDIS_PORT", "6379");
        jail.set_env("PORT", "99999");
        let err = load(jail, false).unwrap_err().to_string();
        assert!(err.contains("PORT"), "{err}");

        jail.set_env("PORT", "8000");
        jail.set_env("REDIS_URL", "http://example.com");
        let err = load(jail, false).unwrap_err().to_string();
        assert!(err.contains("REDIS_URL"), "{err}");
        Ok(())
    });
}

#[test]
fn bad_toml_value_names_the_key() {
    Jail::expect_with(|jail| {
        jail.create_file("ensemble.toml", "[redis]\nport = \"six\"\n")?;
        let err = load(jail, true).unwrap_err().to_string();
        assert!(
            err.contains("REDIS_PORT") && err.contains("redis.port"),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn secrets_never_show_in_debug() {
    Jail::expect_with(|jail| {
        jail.set_env("API_KEY", "key-that-must-not-leak");
        jail.set_env("REDIS_PASSWORD", "pw-that-must-not-leak");
        jail.set_env("REDIS_URL", "redis://:url-pw-must-not-leak@127.0.0.1:6379");
        let d = load(jail, false).unwrap();
        let printed = format!("{d:?}");
        assert!(!printed.contains("must-not-leak"), "{printed}");
        assert!(printed.contains("[redacted]"));
        Ok(())
    });
}

#[test]
fn missing_config_file_is_an_error() {
    Jail::expect_with(|jail| {
        let err = load(jail, true).unwrap_err().to_string();
        assert!(err.contains("ensemble.toml"), "{err}");
        Ok(())
    });
}

//! Reliability scenarios against real Ensemble processes (see `tests/api/`), and the
//! `ensemble-node` launcher they spawn: a master or a worker, started exactly as their own
//! `main.rs` starts them.

use anyhow::{Context, bail};

/// Which service an `ensemble-node` process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `ensemble-node master`: `master::serve`.
    Master,
    /// `ensemble-node worker`: `worker::serve`.
    Worker,
}

impl Role {
    /// Parses the first command-line argument.
    pub fn parse(arg: Option<&str>) -> anyhow::Result<Self> {
        match arg {
            Some("master") => Ok(Self::Master),
            Some("worker") => Ok(Self::Worker),
            other => bail!("usage: ensemble-node master|worker (got {other:?})"),
        }
    }
}

/// Loads the role's settings (defaults, `ENSEMBLE_CONFIG` TOML, environment), binds, and
/// serves until SIGTERM or ctrl-c, like `master/src/main.rs` and `worker/src/main.rs`.
pub async fn run(role: Role) -> anyhow::Result<()> {
    common::telemetry::init_tracing(match role {
        Role::Master => "master",
        Role::Worker => "worker",
    });
    let shutdown = common::shutdown::on_signal();
    let served = match role {
        Role::Master => {
            let config: master::Config =
                common::config::load().context("the master's configuration is invalid")?;
            let listener = common::http::bind(&format!("{}:{}", config.host, config.port)).await?;
            master::serve(config, listener, shutdown).await
        }
        Role::Worker => {
            let config: worker::Config =
                common::config::load().context("the worker's configuration is invalid")?;
            let listener = common::http::bind(&format!("{}:{}", config.host, config.port)).await?;
            worker::serve(config, listener, shutdown).await
        }
    };
    common::traces::shutdown().await;
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse() {
        assert_eq!(Role::parse(Some("master")).ok(), Some(Role::Master));
        assert_eq!(Role::parse(Some("worker")).ok(), Some(Role::Worker));
        assert!(Role::parse(Some("gateway")).is_err());
        assert!(Role::parse(None).is_err());
    }
}

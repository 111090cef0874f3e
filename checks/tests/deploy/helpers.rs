//! What the services expect (from their `Config` types) and the one container check that
//! both the compose and the Terraform tests apply.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use common::config::Settings;
use serde::Serialize;

/// Read by every service outside its `Config`: logging (`common::telemetry`) and the
/// configuration file (`common::config`).
const READ_BY_EVERY_SERVICE: &[&str] = &["LOG_FORMAT", "RUST_LOG", "ENSEMBLE_CONFIG"];

/// Read by the gateway's AWS SDK (the Bedrock provider), not by its `Config`.
const READ_BY_AWS_SDK: &[&str] = &["AWS_REGION", "AWS_DEFAULT_REGION"];

/// One service as its code describes it.
pub struct ServiceSpec {
    /// The crate, image (`SERVICE` build argument) and container name.
    pub name: &'static str,
    /// Every variable the service reads.
    pub reads: BTreeSet<String>,
    /// The variables a deployment must set.
    pub required: Vec<String>,
    /// The port it listens on when `PORT` is not set.
    pub default_port: u16,
}

impl ServiceSpec {
    fn of<C: Settings>(name: &'static str, extra: &[&str]) -> Self {
        let reads = C::env_vars()
            .into_iter()
            .chain(READ_BY_EVERY_SERVICE.iter().copied())
            .chain(extra.iter().copied())
            .map(String::from)
            .collect();
        Self {
            name,
            reads,
            required: C::required_env_vars()
                .into_iter()
                .map(String::from)
                .collect(),
            default_port: default_port(&C::default()),
        }
    }

    /// Whether the service talks to Redis (and so needs `REDIS_URL` or `REDIS_HOST`).
    fn uses_redis(&self) -> bool {
        self.reads.contains("REDIS_HOST")
    }
}

/// The services, from their own `Config` types.
pub fn services() -> Vec<ServiceSpec> {
    vec![
        ServiceSpec::of::<master::Config>("master", &[]),
        ServiceSpec::of::<worker::Config>("worker", &[]),
        ServiceSpec::of::<llm_gateway::Config>("llm-gateway", READ_BY_AWS_SDK),
    ]
}

/// Whether `host` (from a URL) is this container's own network namespace: a sidecar's.
pub fn is_loopback(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost")
}

/// The `port` of a config's defaults, read through serde so no field name is assumed beyond
/// the `PORT` setting's key.
fn default_port<C: Serialize>(config: &C) -> u16 {
    let value = serde_json::to_value(config).expect("a config serializes");
    let port = value
        .get("port")
        .and_then(serde_json::Value::as_u64)
        .expect("every service config has a numeric `port` (PORT)");
    u16::try_from(port).expect("a port fits in u16")
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("checks/ sits in the repository")
        .to_path_buf()
}

/// Mismatches found, each naming the file, the service or container, and the setting.
#[derive(Default)]
pub struct Problems(Vec<String>);

impl Problems {
    pub fn add(&mut self, file: &str, who: &str, what: impl AsRef<str>) {
        self.0.push(format!("{file}: {who}: {}", what.as_ref()));
    }

    /// Fails the test with every problem, one a line.
    pub fn assert_none(self, what: &str) {
        if self.0.is_empty() {
            return;
        }
        let mut message = format!("{} problem(s) with {what}:\n", self.0.len());
        for p in &self.0 {
            let _ = writeln!(message, "  - {p}");
        }
        panic!("{message}");
    }
}

/// A container as a deployment file defines it.
pub struct Container {
    /// The file it comes from, relative to the repository root.
    pub file: String,
    /// Where in the file (compose service or Terraform resource and container).
    pub who: String,
    /// Which service's image it runs.
    pub service: String,
    /// Plain environment variables, with their (possibly unresolved) values.
    pub env: BTreeMap<String, String>,
    /// Variables injected from a secret store (Terraform `secrets`).
    pub secrets: BTreeSet<String>,
    /// Container ports it declares.
    pub ports: Vec<u16>,
    /// The health check command, one word an element.
    pub health: Vec<String>,
}

impl Container {
    fn sets(&self, var: &str) -> bool {
        self.env.contains_key(var) || self.secrets.contains(var)
    }

    /// The port the service listens on: `PORT` when set, else its default.
    pub fn listen_port(&self, spec: &ServiceSpec) -> Option<u16> {
        match self.env.get("PORT") {
            Some(value) => value.parse().ok(),
            None => Some(spec.default_port),
        }
    }
}

/// The spec of the service a container runs, or a problem saying it is unknown.
pub fn spec_for<'a>(
    specs: &'a [ServiceSpec],
    c: &Container,
    problems: &mut Problems,
) -> Option<&'a ServiceSpec> {
    let spec = specs.iter().find(|s| s.name == c.service);
    if spec.is_none() {
        let known: Vec<&str> = specs.iter().map(|s| s.name).collect();
        problems.add(
            &c.file,
            &c.who,
            format!("runs unknown service `{}` (known: {known:?})", c.service),
        );
    }
    spec
}

/// The checks every container gets: each variable it sets is one the service reads, the
/// required ones are set, the declared port is the one the service listens on, and the
/// health check asks that port for `/health`.
pub fn check_container(spec: &ServiceSpec, c: &Container, problems: &mut Problems) {
    for var in c.env.keys().chain(c.secrets.iter()) {
        if !spec.reads.contains(var) {
            problems.add(
                &c.file,
                &c.who,
                format!("sets {var}, which {} does not read", spec.name),
            );
        }
    }
    for var in &spec.required {
        if !c.sets(var) {
            problems.add(
                &c.file,
                &c.who,
                format!("does not set {var}, which {} requires", spec.name),
            );
        }
    }
    if spec.uses_redis() && !c.sets("REDIS_URL") && !c.sets("REDIS_HOST") {
        problems.add(&c.file, &c.who, "sets neither REDIS_URL nor REDIS_HOST");
    }

    let Some(port) = c.listen_port(spec) else {
        problems.add(&c.file, &c.who, "PORT is not a port number");
        return;
    };
    if !c.ports.contains(&port) {
        problems.add(
            &c.file,
            &c.who,
            format!(
                "{} listens on {port} but the container declares ports {:?}",
                spec.name, c.ports
            ),
        );
    }
    let wanted = [
        format!("http://127.0.0.1:{port}/health"),
        format!("http://localhost:{port}/health"),
    ];
    if !c.health.iter().any(|word| wanted.contains(word)) {
        problems.add(
            &c.file,
            &c.who,
            format!(
                "health check {:?} does not ask {} for /health",
                c.health, wanted[0]
            ),
        );
    }
}

/// `http://host:port/path` → (`host`, `port`), the port defaulting to 80.
pub fn url_host_port(url: &str) -> Option<(&str, u16)> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host, port.parse().ok()?)),
        None => Some((authority, 80)),
    }
}

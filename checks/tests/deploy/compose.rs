//! `docker-compose.yml` against the services: variables, required settings, ports, health
//! checks, start order and the URLs services use to reach each other.

use std::collections::BTreeMap;

use serde_yaml::Value;

use crate::helpers::{
    Container, Problems, check_container, is_loopback, repo_root, services, spec_for, url_host_port,
};

const FILE: &str = "docker-compose.yml";

/// The compose file with YAML merge keys (`<<: *anchor`) applied.
fn compose() -> Value {
    let path = repo_root().join(FILE);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut value: Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{FILE}: {e}"));
    value
        .apply_merge()
        .unwrap_or_else(|e| panic!("{FILE}: {e}"));
    value
}

fn compose_services(doc: &Value) -> BTreeMap<String, Value> {
    doc.get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has a services mapping")
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().expect("service names are strings").to_string(),
                v.clone(),
            )
        })
        .collect()
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The `SERVICE` build argument: which Ensemble image the compose service runs.
fn image_service(def: &Value) -> Option<String> {
    def.get("build")?
        .get("args")?
        .get("SERVICE")
        .and_then(scalar)
}

/// `environment:` as a mapping or as a `KEY=value` list.
fn environment(def: &Value) -> BTreeMap<String, String> {
    match def.get("environment") {
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(k, v)| (scalar(k).unwrap_or_default(), scalar(v).unwrap_or_default()))
            .collect(),
        Some(Value::Sequence(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .map(|item| match item.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (item.to_string(), String::new()),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// Container ports from `expose:` and from the container side of `ports:`.
fn ports(def: &Value) -> Vec<u16> {
    let mut out = Vec::new();
    for key in ["expose", "ports"] {
        for item in def
            .get(key)
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let text = match item {
                Value::Mapping(_) => item.get("target").and_then(scalar),
                other => scalar(other),
            };
            let Some(text) = text else { continue };
            let container = text.rsplit(':').next().unwrap_or(&text);
            let container = container.split('/').next().unwrap_or(container);
            if let Ok(port) = container.parse() {
                out.push(port);
            }
        }
    }
    out
}

/// The health check command, one word an element (`CMD-SHELL` strings split on spaces).
fn health(def: &Value) -> Vec<String> {
    match def.get("healthcheck").and_then(|h| h.get("test")) {
        Some(Value::Sequence(words)) => words
            .iter()
            .filter_map(scalar)
            .flat_map(|w| w.split_whitespace().map(String::from).collect::<Vec<_>>())
            .collect(),
        Some(Value::String(s)) => s.split_whitespace().map(String::from).collect(),
        _ => Vec::new(),
    }
}

fn containers(doc: &Value) -> Vec<Container> {
    compose_services(doc)
        .into_iter()
        .filter_map(|(name, def)| {
            let service = image_service(&def)?;
            Some(Container {
                file: FILE.into(),
                who: format!("service {name}"),
                service,
                env: environment(&def),
                secrets: Default::default(),
                ports: ports(&def),
                health: health(&def),
            })
        })
        .collect()
}

/// Sidecars: services that join another service's network namespace
/// (`network_mode: service:NAME`), as an agent beside its worker does. `(name, definition,
/// NAME)`.
fn sidecars(doc: &Value) -> Vec<(String, Value, String)> {
    compose_services(doc)
        .into_iter()
        .filter_map(|(name, def)| {
            let host = def
                .get("network_mode")
                .and_then(Value::as_str)?
                .strip_prefix("service:")?
                .to_string();
            Some((name, def, host))
        })
        .collect()
}

/// The port a sidecar listens on: its `PORT`.
fn sidecar_port(def: &Value) -> Option<u16> {
    environment(def).get("PORT")?.parse().ok()
}

#[test]
fn every_container_sets_only_what_its_service_reads_and_all_it_requires() {
    let specs = services();
    let mut problems = Problems::default();
    let containers = containers(&compose());
    for c in &containers {
        if let Some(spec) = spec_for(&specs, c, &mut problems) {
            check_container(spec, c, &mut problems);
        }
    }
    for spec in &specs {
        if !containers.iter().any(|c| c.service == spec.name) {
            problems.add(FILE, spec.name, "no compose service runs it");
        }
    }
    problems.assert_none("docker-compose.yml against the services' settings");
}

#[test]
fn a_worker_runs_for_every_capability() {
    let containers = containers(&compose());
    let mut problems = Problems::default();
    for capability in ["plan", "retrieve", "evaluate", "finalize"] {
        let wanted = format!("[\"{capability}\"]");
        let found = containers.iter().any(|c| {
            c.service == "worker"
                && c.env.get("CAPABILITIES").map(|v| v.replace(' ', "")) == Some(wanted.clone())
        });
        if !found {
            problems.add(
                FILE,
                "workers",
                format!("no worker has CAPABILITIES={wanted}"),
            );
        }
    }
    problems.assert_none("the workers in docker-compose.yml");
}

#[test]
fn services_start_after_their_dependencies_are_healthy() {
    let all = compose_services(&compose());
    let mut problems = Problems::default();
    for (name, def) in &all {
        let who = format!("service {name}");
        let Some(deps) = def.get("depends_on") else {
            continue;
        };
        let Some(deps) = deps.as_mapping() else {
            problems.add(
                FILE,
                &who,
                "depends_on must be a mapping with `condition: service_healthy`",
            );
            continue;
        };
        for (dep, how) in deps {
            let dep = dep.as_str().unwrap_or_default();
            if how.get("condition").and_then(Value::as_str) != Some("service_healthy") {
                problems.add(
                    FILE,
                    &who,
                    format!("depends on {dep} without `condition: service_healthy`"),
                );
            }
            match all.get(dep) {
                None => problems.add(
                    FILE,
                    &who,
                    format!("depends on {dep}, which is not a service"),
                ),
                Some(d) if d.get("healthcheck").is_none() => problems.add(
                    FILE,
                    &who,
                    format!("depends on {dep}, which has no healthcheck"),
                ),
                Some(_) => {}
            }
        }
    }
    problems.assert_none("start order in docker-compose.yml");
}

#[test]
fn urls_between_services_name_a_service_and_its_port() {
    let specs = services();
    let containers = containers(&compose());
    let mut problems = Problems::default();
    // compose service name → the port its container listens on.
    let listening: BTreeMap<&str, u16> = containers
        .iter()
        .filter_map(|c| {
            let spec = specs.iter().find(|s| s.name == c.service)?;
            Some((c.who.strip_prefix("service ")?, c.listen_port(spec)?))
        })
        .collect();
    let doc = compose();
    let sidecars = sidecars(&doc);
    // Every container's URLs, the sidecars' too: (service name, variable, value).
    let mut urls: Vec<(String, String, String)> = Vec::new();
    for c in &containers {
        let name = c.who.strip_prefix("service ").unwrap_or(&c.who);
        for (var, value) in &c.env {
            urls.push((name.to_string(), var.clone(), value.clone()));
        }
    }
    for (name, def, _) in &sidecars {
        for (var, value) in environment(def) {
            urls.push((name.clone(), var, value));
        }
    }
    for (name, var, value) in urls {
        let who = format!("service {name}");
        let Some((host, port)) = url_host_port(&value) else {
            continue;
        };
        // 127.0.0.1 is the container's own network namespace: a sidecar that joins it
        // (network_mode: service:<this one>) must listen on that port.
        if is_loopback(host) {
            let reached = sidecars
                .iter()
                .any(|(_, def, joins)| *joins == name && sidecar_port(def) == Some(port));
            if !reached {
                problems.add(
                    FILE,
                    &who,
                    format!(
                        "{var}={value}: no service with network_mode service:{name} sets PORT={port}"
                    ),
                );
            }
            continue;
        }
        match listening.get(host) {
            None => problems.add(
                FILE,
                &who,
                format!("{var}={value}: `{host}` is not an Ensemble compose service"),
            ),
            Some(&p) if p != port => problems.add(
                FILE,
                &who,
                format!("{var}={value}: `{host}` listens on {p}, not {port}"),
            ),
            Some(_) => {}
        }
    }
    problems.assert_none("service URLs in docker-compose.yml");
}

#[test]
fn redis_requires_a_password_and_syncs_its_append_only_file_on_every_write() {
    let all = compose_services(&compose());
    let redis = all
        .get("redis")
        .expect("docker-compose.yml has a redis service");
    let command: Vec<String> = redis
        .get("command")
        .and_then(Value::as_sequence)
        .expect("redis has a command list")
        .iter()
        .filter_map(scalar)
        .collect();
    let after = |flag: &str| {
        command
            .iter()
            .position(|w| w == flag)
            .and_then(|i| command.get(i + 1))
            .cloned()
    };
    assert!(
        after("--requirepass").is_some_and(|p| p.contains("REDIS_PASSWORD")),
        "{FILE}: redis: --requirepass must take ${{REDIS_PASSWORD}}; command is {command:?}"
    );
    assert_eq!(
        after("--appendonly").as_deref(),
        Some("yes"),
        "{FILE}: redis: --appendonly yes"
    );
    // The README's first guarantee (an accepted task survives a Redis restart) needs every
    // write on disk before the 202; Redis's default, everysec, can lose the last second.
    assert_eq!(
        after("--appendfsync").as_deref(),
        Some("always"),
        "{FILE}: redis: --appendfsync always, as README.md's Guarantees say"
    );
    // A queued task's hash stays a listpack with its input in it (the scale figures in
    // BENCHMARKS.md), as the ElastiCache parameter group sets it.
    assert_eq!(
        after("--hash-max-ziplist-value").as_deref(),
        Some("1024"),
        "{FILE}: redis: --hash-max-ziplist-value 1024, as deploy/terraform/elasticache.tf sets it"
    );
    let health = health(redis).join(" ");
    assert!(
        health.contains("redis-cli") && health.contains("ping"),
        "{FILE}: redis health check must be `redis-cli ping`, is {health}"
    );
}

/// `NAME=value` lines of `.env.example`, the file users copy to `.env`.
fn env_example() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo_root().join(".env.example")).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn the_example_env_keeps_json_logs() {
    // Text logs carry colour codes into `docker logs`; json is the containers' default.
    let format = env_example().get("LOG_FORMAT").cloned();
    assert!(
        format.as_deref().is_none_or(|f| f == "json"),
        ".env.example sets LOG_FORMAT={format:?}: leave it json (the documented default)"
    );
}

#[test]
fn published_ports_bind_loopback_by_default() {
    // The example keys are `change-me`: a port on every interface would offer them to the
    // network. `127.0.0.1:…` or `${VAR:-127.0.0.1}:…` (with `.env.example` keeping it).
    let example = env_example();
    let mut problems = Vec::new();
    for (name, def) in compose_services(&compose()) {
        for item in def
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let text = match item {
                Value::Mapping(_) => item
                    .get("host_ip")
                    .and_then(scalar)
                    .map(|ip| format!("{ip}:")),
                other => scalar(other),
            }
            .unwrap_or_default();
            let host_ip = if let Some(rest) = text.strip_prefix("${") {
                rest.split_once('}').and_then(|(var, _)| {
                    let (var, default) = var.split_once(":-")?;
                    Some(
                        example
                            .get(var)
                            .cloned()
                            .unwrap_or_else(|| default.to_string()),
                    )
                    .filter(|_| default == "127.0.0.1")
                })
            } else {
                text.split_once(':').map(|(ip, _)| ip.to_string())
            };
            if host_ip.as_deref() != Some("127.0.0.1") {
                problems.push(format!("{name}: `{text}` is not bound to 127.0.0.1"));
            }
        }
    }
    assert!(problems.is_empty(), "{FILE}: {problems:#?}");
}

/// The non-comment lines of an ignore file at `path` (from the repository root).
fn ignore_lines(path: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

#[test]
fn local_secrets_stay_out_of_git_and_the_build_context() {
    // The root file is the one every builder reads (Kaniko and the legacy builder ignore
    // deploy/Dockerfile.dockerignore); a Dockerfile-specific one would override it for
    // BuildKit, so there must not be one that forgets what the root one keeps out.
    let root = ignore_lines(".dockerignore");
    for needed in [".env", "target", ".git"] {
        assert!(
            root.iter().any(|l| l == needed),
            ".dockerignore must ignore {needed}; it has {root:?}"
        );
    }
    assert!(
        !repo_root().join("deploy/Dockerfile.dockerignore").exists(),
        "deploy/Dockerfile.dockerignore would replace .dockerignore under BuildKit: keep one file"
    );
    assert!(
        ignore_lines(".gitignore")
            .iter()
            .any(|l| l == ".env" || l == "/.env"),
        ".gitignore must ignore .env (local secrets)"
    );
}

#[test]
fn the_ag2_profile_runs_a_critique_worker_beside_its_agent() {
    // `docker-compose --profile ag2 up` adds a worker whose steps an AG2 agent serves over
    // its localhost, as an ECS task's sidecar; plain `docker-compose up` is left unchanged.
    let doc = compose();
    let all = compose_services(&doc);
    let profiles = |def: &Value| -> Vec<String> {
        def.get("profiles")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(scalar)
            .collect()
    };
    let in_profiles: Vec<(&String, Vec<String>)> = all
        .iter()
        .map(|(name, def)| (name, profiles(def)))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    assert_eq!(
        in_profiles,
        [
            (&"agent-critique".to_string(), vec!["ag2".to_string()]),
            (&"worker-critique".to_string(), vec!["ag2".to_string()]),
        ],
        "{FILE}: only the ag2 pair is in a profile, so plain `up` starts what it did before"
    );

    let worker = &all["worker-critique"];
    let agent = &all["agent-critique"];
    let (worker_env, agent_env) = (environment(worker), environment(agent));
    assert_eq!(image_service(worker).as_deref(), Some("worker"));
    assert_eq!(
        worker_env
            .get("CAPABILITIES")
            .map(|v| v.replace(' ', ""))
            .as_deref(),
        Some(r#"["critique"]"#)
    );
    assert_eq!(
        worker_env.get("AGENT_KIND").map(String::as_str),
        Some("http")
    );
    assert_eq!(
        worker_env.get("AGENT_URL").map(String::as_str),
        Some("http://127.0.0.1:9000/step"),
        "examples/ag2-agent serves POST /step on PORT 9000"
    );

    assert_eq!(
        agent.get("network_mode").and_then(Value::as_str),
        Some("service:worker-critique"),
        "{FILE}: agent-critique must share worker-critique's localhost"
    );
    assert_eq!(
        agent
            .get("build")
            .and_then(|b| b.get("context"))
            .and_then(scalar)
            .as_deref(),
        Some("examples/ag2-agent")
    );
    let gateway = worker_env
        .get("LLM_GATEWAY_URL")
        .expect("workers reach the gateway");
    assert_eq!(
        agent_env.get("OPENAI_BASE_URL"),
        Some(&format!("{gateway}/v1")),
        "the agent calls the gateway the workers call, at its OpenAI-compatible /v1"
    );
    assert_eq!(
        agent_env.get("OPENAI_API_KEY"),
        worker_env.get("GATEWAY_TOKEN"),
        "the agent's key is the workers' GATEWAY_TOKEN"
    );
    let health = health(agent).join(" ");
    assert!(
        health.contains("http://127.0.0.1:9000/health"),
        "{FILE}: agent-critique's health check must ask its /health: {health}"
    );
    assert!(
        agent
            .get("depends_on")
            .and_then(|d| d.get("worker-critique"))
            .is_some(),
        "{FILE}: agent-critique starts after the worker whose namespace it joins"
    );
    // The same hardening as the Ensemble containers (x-service).
    for (name, def) in [("worker-critique", worker), ("agent-critique", agent)] {
        for key in ["read_only", "init"] {
            assert_eq!(
                def.get(key).and_then(Value::as_bool),
                Some(true),
                "{FILE}: {name}: {key}: true"
            );
        }
    }
}

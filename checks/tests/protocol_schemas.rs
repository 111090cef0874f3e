//! Holds the worker protocol's documents to the Rust types: the generated files must be
//! what `protocol-schemas` would write now, the ids' patterns must accept exactly what
//! their validation accepts, and each schema's `required` list must be what serde really
//! requires.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use checks::protocol::{self, REGENERATE};
use common::wire::{Capability, ResultReport, TaskId, WorkRequest, WorkerId, WorkerRecord};
use serde_json::{Value, json};

/// The generated schema of `name`, as written to `docs/schemas/`.
fn schema(name: &str) -> Value {
    let root = protocol::workspace_root();
    let output = protocol::generate(&root)
        .unwrap()
        .into_iter()
        .find(|o| o.path.ends_with(format!("{name}.json")))
        .unwrap_or_else(|| panic!("no generated schema for {name}"));
    serde_json::from_str(&output.contents).unwrap()
}

#[test]
fn generated_protocol_files_are_up_to_date() {
    let root = protocol::workspace_root();
    let mut stale = Vec::new();
    for output in protocol::generate(&root).unwrap() {
        let current = std::fs::read_to_string(root.join(&output.path)).unwrap_or_default();
        if current != output.contents {
            let line = current
                .lines()
                .zip(output.contents.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| current.lines().count().min(output.contents.lines().count()));
            stale.push(format!(
                "{} (first difference at line {})",
                output.path.display(),
                line + 1
            ));
        }
    }
    assert!(
        stale.is_empty(),
        "the worker protocol's generated files differ from the Rust types:\n  {}\nregenerate them with `{REGENERATE}` and commit the result",
        stale.join("\n  ")
    );
}

#[test]
fn every_protocol_type_has_a_schema_file_and_a_document_block() {
    let root = protocol::workspace_root();
    let doc = std::fs::read_to_string(root.join(protocol::PROTOCOL_DOC)).unwrap();
    for name in protocol::schema_names() {
        assert!(
            root.join(protocol::SCHEMA_DIR)
                .join(format!("{name}.json"))
                .exists(),
            "docs/schemas/{name}.json is missing; run `{REGENERATE}`"
        );
        assert!(
            doc.contains(&format!("<!-- schema:{name}:begin")),
            "docs/worker-protocol.md has no block for {name}"
        );
    }
}

/// Every single ASCII character, a non-ASCII one, and lengths around the limit.
fn samples(max: usize) -> Vec<String> {
    let mut samples: Vec<String> = (0u8..128).map(|b| char::from(b).to_string()).collect();
    samples.extend(["é".to_string(), "ab".into(), "a b".into(), "a\n".into()]);
    samples.extend([String::new(), "a".repeat(max), "a".repeat(max + 1)]);
    samples
}

fn assert_pattern_matches_validation(name: &str, max: usize, valid: impl Fn(&str) -> bool) {
    let schema = schema(name);
    let pattern = schema["pattern"].as_str().unwrap();
    let regex = regex_lite::Regex::new(pattern).unwrap();
    assert_eq!(schema["maxLength"], json!(max), "{name}");
    for sample in samples(max) {
        assert_eq!(
            // JSON Schema's `$` is the end of the string (ECMA-262); regex-lite's too.
            regex.is_match(&sample),
            valid(&sample),
            "{name}: the schema's pattern {pattern} and the validation disagree on {sample:?}"
        );
    }
}

#[test]
fn id_patterns_accept_exactly_what_their_validation_accepts() {
    assert_pattern_matches_validation("TaskId", 64, |s| TaskId::new(s).is_ok());
    assert_pattern_matches_validation("Capability", 64, |s| Capability::new(s).is_ok());
    assert_pattern_matches_validation("WorkerId", 128, |s| WorkerId::new(s).is_ok());
}

/// For each key in `full`: dropping it must fail to parse exactly when the schema lists it
/// as required.
fn assert_required_is_what_serde_requires<T: serde::de::DeserializeOwned + std::fmt::Debug>(
    name: &str,
    full: Value,
) {
    let schema = schema(name);
    let required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    serde_json::from_value::<T>(full.clone()).unwrap();
    for key in full.as_object().unwrap().keys() {
        let mut without = full.clone();
        without.as_object_mut().unwrap().remove(key);
        let parsed = serde_json::from_value::<T>(without);
        assert_eq!(
            parsed.is_err(),
            required.contains(&key.as_str()),
            "{name}.{key}: the schema says required={}, serde says {parsed:?}",
            required.contains(&key.as_str())
        );
        assert!(
            schema["properties"].get(key).is_some(),
            "{name}.{key} is not in the schema"
        );
    }
}

#[test]
fn required_fields_are_the_ones_the_services_require() {
    assert_required_is_what_serde_requires::<WorkerRecord>(
        "WorkerRecord",
        json!({
            "id": "w-1", "url": "http://10.0.0.1:5000", "capabilities": ["echo"],
            "max_concurrency": 4, "in_flight": [{"task_id": "t", "step": 0, "attempt": 1}],
            "version": "0.1.0", "started_at_ms": 1, "draining": false, "heartbeat_at_ms": 2,
            "degraded": "cannot deliver", "unavailable": "agent down"
        }),
    );
    assert_required_is_what_serde_requires::<WorkRequest>(
        "WorkRequest",
        json!({
            "task_id": "t", "step": 0, "attempt": 1, "capability": "echo", "input": {"a": 1},
            "context": {"task_input": {"a": 1}, "previous": [], "total_steps": 1},
            "deadline_ms": 1, "worker_id": "w-1"
        }),
    );
    assert_required_is_what_serde_requires::<ResultReport>(
        "ResultReport",
        json!({
            "task_id": "t", "step": 0, "attempt": 1, "worker_id": "w-1", "status": "succeeded",
            "output": 1, "duration_ms": 2.5
        }),
    );
}

#[test]
fn duration_ms_is_any_non_negative_number() {
    let schema = schema("ResultReport");
    let duration = &schema["properties"]["duration_ms"];
    assert!(
        duration["type"]
            .as_array()
            .unwrap()
            .contains(&json!("number")),
        "{duration}"
    );
    assert_eq!(duration["minimum"], json!(0));
    let report: ResultReport = serde_json::from_value(json!({
        "task_id": "t", "step": 0, "attempt": 1, "worker_id": "w", "status": "succeeded",
        "duration_ms": 12.6
    }))
    .unwrap();
    assert_eq!(report.duration_ms, Some(13));
}

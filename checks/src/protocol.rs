//! The worker protocol's JSON Schemas, made from the Rust types themselves (`common::wire`
//! with the `schema` feature), and the three places they are written to:
//! `docs/schemas/<Type>.json`, the blocks between markers in `docs/worker-protocol.md`, and
//! the protocol's components in `master/openapi.json`. The `protocol-schemas` binary writes
//! them; `tests/protocol_schemas.rs` fails when a file differs from what it would write, so
//! the documentation cannot drift from the code.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use common::http::{ErrorBody, ErrorDetail};
use common::wire::{
    AckStatus, Capability, PriorOutput, ReportStatus, ResultAck, ResultBatchAnswer,
    ResultItemAnswer, ResultReport, StepContext, StepError, StepProgress, StepRef, StepStatus,
    TaskId, WorkAccepted, WorkBatchAnswer, WorkItemAnswer, WorkRequest, WorkerId, WorkerRecord,
};
use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::Value;

/// The command that rewrites every generated file, for messages that ask for it.
pub const REGENERATE: &str = "cargo run -p checks --bin protocol-schemas";

/// Where each generated schema lives, relative to the workspace root.
pub const SCHEMA_DIR: &str = "docs/schemas";
/// The protocol document with embedded schema blocks.
pub const PROTOCOL_DOC: &str = "docs/worker-protocol.md";
/// The master's API description.
pub const OPENAPI: &str = "master/openapi.json";

/// One type's schema, by the name it has everywhere (file, doc block, OpenAPI component).
struct Entry {
    /// `WorkRequest`, …: the Rust type's name.
    name: &'static str,
    /// Its schema as a root document (draft 2020-12, with its own `$defs`).
    root: fn(&mut SchemaGenerator) -> Schema,
    /// Adds it (and what it refers to) to an OpenAPI generator's definitions.
    component: fn(&mut SchemaGenerator) -> Schema,
}

fn entry<T: JsonSchema>(name: &'static str) -> Entry {
    Entry {
        name,
        root: |g| g.root_schema_for::<T>(),
        component: |g| g.subschema_for::<T>(),
    }
}

/// Every type of the worker protocol, in the order the document presents them.
fn entries() -> Vec<Entry> {
    vec![
        entry::<WorkerRecord>("WorkerRecord"),
        entry::<StepRef>("StepRef"),
        entry::<WorkRequest>("WorkRequest"),
        entry::<StepContext>("StepContext"),
        entry::<PriorOutput>("PriorOutput"),
        entry::<StepStatus>("StepStatus"),
        entry::<WorkAccepted>("WorkAccepted"),
        entry::<WorkBatchAnswer>("WorkBatchAnswer"),
        entry::<WorkItemAnswer>("WorkItemAnswer"),
        entry::<ResultReport>("ResultReport"),
        entry::<ReportStatus>("ReportStatus"),
        entry::<StepError>("StepError"),
        entry::<StepProgress>("StepProgress"),
        entry::<ResultAck>("ResultAck"),
        entry::<AckStatus>("AckStatus"),
        entry::<ResultBatchAnswer>("ResultBatchAnswer"),
        entry::<ResultItemAnswer>("ResultItemAnswer"),
        entry::<ErrorBody>("ErrorBody"),
        entry::<ErrorDetail>("ErrorDetail"),
        entry::<TaskId>("TaskId"),
        entry::<WorkerId>("WorkerId"),
        entry::<Capability>("Capability"),
    ]
}

/// The names of every generated schema, in document order.
pub fn schema_names() -> Vec<&'static str> {
    entries().iter().map(|e| e.name).collect()
}

/// One generated file: where it goes and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Relative to the workspace root.
    pub path: PathBuf,
    /// The whole file.
    pub contents: String,
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Everything the generator writes, computed from the types and the current document and
/// OpenAPI file under `root` (their hand-written parts are kept as they are).
pub fn generate(root: &Path) -> Result<Vec<Output>> {
    let mut outputs = Vec::new();
    let mut roots = Vec::new();
    for e in entries() {
        let mut generator = SchemaSettings::draft2020_12().into_generator();
        let mut schema = (e.root)(&mut generator).to_value();
        tidy(&mut schema);
        if let Some(object) = schema.as_object_mut() {
            // Name each file's schema after its type, whatever its doc comment starts with.
            object.insert("title".into(), Value::String(e.name.into()));
        }
        outputs.push(Output {
            path: Path::new(SCHEMA_DIR).join(format!("{}.json", e.name)),
            contents: pretty(&schema)?,
        });
        roots.push((e.name, schema));
    }

    let doc_path = root.join(PROTOCOL_DOC);
    let doc = std::fs::read_to_string(&doc_path)
        .with_context(|| format!("could not read {}", doc_path.display()))?;
    outputs.push(Output {
        path: PROTOCOL_DOC.into(),
        contents: embed_blocks(&doc, &roots)?,
    });

    let openapi_path = root.join(OPENAPI);
    let openapi = std::fs::read_to_string(&openapi_path)
        .with_context(|| format!("could not read {}", openapi_path.display()))?;
    outputs.push(Output {
        path: OPENAPI.into(),
        contents: openapi_with_components(&openapi)?,
    });
    Ok(outputs)
}

/// JSON as the repository keeps it: two-space indents, a newline at the end.
fn pretty(value: &Value) -> Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

/// Rustdoc wraps lines at 100 columns; a description reads better unwrapped. A blank line
/// (a paragraph break) is kept.
fn tidy(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "description"
                    && let Value::String(text) = v
                {
                    *text = text
                        .split("\n\n")
                        .map(|paragraph| paragraph.split('\n').collect::<Vec<_>>().join(" "))
                        .collect::<Vec<_>>()
                        .join("\n\n");
                } else {
                    tidy(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(tidy),
        _ => {}
    }
}

/// The marker lines around a type's embedded schema in the protocol document.
fn markers(name: &str) -> (String, String) {
    (
        format!("<!-- schema:{name}:begin (generated by `{REGENERATE}`; do not edit) -->"),
        format!("<!-- schema:{name}:end -->"),
    )
}

/// The document with each type's block refreshed: the schema without its `$defs` (each
/// `#/$defs/X` is the block of the same name in the document, and `docs/schemas/X.json`).
/// Every type must have its markers: a missing block is an error, not a silent gap.
fn embed_blocks(doc: &str, roots: &[(&str, Value)]) -> Result<String> {
    let mut doc = doc.to_string();
    for (name, schema) in roots {
        let (begin, end) = markers(name);
        let mut shown = schema.clone();
        if let Some(object) = shown.as_object_mut() {
            object.remove("$defs");
            object.remove("$schema");
        }
        let block = format!("{begin}\n```json\n{}```\n{end}", pretty(&shown)?);
        let Some(start) = doc.find(&begin) else {
            bail!("{PROTOCOL_DOC} has no block for `{name}`: add the line\n{begin}\n{end}");
        };
        let Some(stop) = doc[start..].find(&end).map(|i| start + i + end.len()) else {
            bail!("{PROTOCOL_DOC}: the block for `{name}` has no end marker `{end}`");
        };
        doc.replace_range(start..stop, &block);
    }
    Ok(doc)
}

/// `master/openapi.json` with the protocol's schemas (and the ones they refer to) replaced
/// by the generated ones under `#/components/schemas/`, added at the end when new. OpenAPI
/// 3.1's schema objects are JSON Schema 2020-12, so they are the same schemas with their
/// `$ref`s pointing there. The file is edited as text: every other part keeps its own order
/// and layout, so the hand-written rest of the file and its history stay readable.
fn openapi_with_components(openapi: &str) -> Result<String> {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    for e in entries() {
        (e.component)(&mut generator);
    }
    let mut generated = Value::Object(generator.take_definitions(true));
    tidy(&mut generated);
    let Value::Object(generated) = generated else {
        bail!("the generated definitions are not an object");
    };

    let mut text = openapi.to_string();
    for (name, schema) in &generated {
        let schemas = object_at(&text, &["components", "schemas"])?;
        let rendered = indent(&serde_json::to_string_pretty(schema)?, "      ");
        match member(&text, schemas, name)? {
            Some(span) => text.replace_range(span.value, &rendered),
            None => {
                let close = object_end(&text, schemas)? - 1;
                let before = text[..close].trim_end_matches(char::is_whitespace).len();
                let comma = if text[..before].ends_with('{') {
                    ""
                } else {
                    ","
                };
                text.replace_range(
                    before..close,
                    &format!(
                        "{comma}\n      {}: {rendered}\n    ",
                        Value::from(name.as_str())
                    ),
                );
            }
        }
    }
    let parsed: Value = serde_json::from_str(&text)
        .with_context(|| format!("{OPENAPI} is not JSON after the schemas were replaced"))?;
    for (name, schema) in &generated {
        if parsed.pointer(&format!("/components/schemas/{name}")) != Some(schema) {
            bail!("{OPENAPI}: the schema `{name}` was not written where it belongs");
        }
    }
    Ok(text)
}

/// Every line after the first of `text`, indented by `prefix` (a pretty-printed value
/// placed at that depth).
fn indent(text: &str, prefix: &str) -> String {
    text.replace('\n', &format!("\n{prefix}"))
}

/// A member's place in the text.
struct Span {
    /// Where its value starts and ends.
    value: std::ops::Range<usize>,
}

/// Where the object at `path` (keys from the top) starts: the index of its `{`.
fn object_at(text: &str, path: &[&str]) -> Result<usize> {
    let mut at = skip_ws(text, 0);
    for key in path {
        let Some(span) = member(text, at, key)? else {
            bail!("{OPENAPI} has no `{}`", path.join("."));
        };
        at = span.value.start;
    }
    if !text[at..].starts_with('{') {
        bail!("{OPENAPI}: `{}` is not an object", path.join("."));
    }
    Ok(at)
}

/// The member `key` of the object whose `{` is at `start`, if it has one.
fn member(text: &str, start: usize, key: &str) -> Result<Option<Span>> {
    let bytes = text.as_bytes();
    if bytes.get(start) != Some(&b'{') {
        bail!("{OPENAPI}: expected an object at byte {start}");
    }
    let mut at = skip_ws(text, start + 1);
    while bytes.get(at) == Some(&b'"') {
        let key_end = value_end(text, at)?;
        let name: String = serde_json::from_str(&text[at..key_end])?;
        at = skip_ws(text, key_end);
        if bytes.get(at) != Some(&b':') {
            bail!("{OPENAPI}: expected `:` at byte {at}");
        }
        let value_start = skip_ws(text, at + 1);
        let end = value_end(text, value_start)?;
        if name == key {
            return Ok(Some(Span {
                value: value_start..end,
            }));
        }
        at = skip_ws(text, end);
        if bytes.get(at) == Some(&b',') {
            at = skip_ws(text, at + 1);
        }
    }
    Ok(None)
}

/// One past the `}` of the object whose `{` is at `start`.
fn object_end(text: &str, start: usize) -> Result<usize> {
    value_end(text, start)
}

/// One past the end of the JSON value (or string) starting at `start`.
fn value_end(text: &str, start: usize) -> Result<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut at = start;
    while at < bytes.len() {
        match bytes[at] {
            b'"' => {
                at += 1;
                while at < bytes.len() && bytes[at] != b'"' {
                    at += if bytes[at] == b'\\' { 2 } else { 1 };
                }
                if depth == 0 {
                    return Ok(at + 1);
                }
            }
            b'{' | b'[' => depth += 1,
            // A scalar ends where its container goes on.
            b'}' | b']' | b',' | b'\n' | b' ' | b'\t' | b'\r' if depth == 0 => return Ok(at),
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(at + 1);
                }
            }
            _ => {}
        }
        at += 1;
    }
    if depth == 0 {
        Ok(at)
    } else {
        bail!("{OPENAPI}: a value starting at byte {start} never ends")
    }
}

/// The first byte at or after `at` that is not JSON whitespace.
fn skip_ws(text: &str, at: usize) -> usize {
    at + text[at..].len() - text[at..].trim_start_matches([' ', '\n', '\r', '\t']).len()
}

//! JSON schemas as callers write them (OpenAI's `tools[].function.parameters` and
//! `response_format.json_schema.schema`), turned into what a provider accepts: Gemini's
//! OpenAPI subset, converting what has an equivalent and refusing the rest by keyword,
//! and the mock's deterministic example values.

use serde_json::{Map, Value, json};

/// How deep `$ref`s may nest before a schema counts as recursive.
const MAX_REF_DEPTH: usize = 16;

/// A keyword Gemini cannot express, and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported {
    /// The JSON-schema keyword.
    pub keyword: String,
    /// A JSON pointer to the schema that holds it.
    pub at: String,
    /// Why it cannot be converted.
    pub why: &'static str,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.at.is_empty() { "/" } else { &self.at };
        write!(
            f,
            "Gemini does not accept the JSON-schema keyword `{}` (at `{at}`): {}",
            self.keyword, self.why
        )
    }
}

/// Converts a JSON schema to Gemini's `Schema`: `$ref`s are inlined, `type: [T, "null"]`
/// and `anyOf: [.., {"type": "null"}]` become `nullable`, `oneOf` becomes `anyOf`, `const`
/// a one-value `enum`, `examples` an `example`, unknown `format`s move into the
/// description, and `additionalProperties: false` is left out (Gemini never produces
/// undeclared properties). Anything else Gemini lacks is refused, by keyword.
pub fn to_gemini(schema: &Value) -> Result<Value, Unsupported> {
    Converter { root: schema }.convert(schema, "", 0)
}

struct Converter<'a> {
    root: &'a Value,
}

impl Converter<'_> {
    fn convert(&self, schema: &Value, at: &str, depth: usize) -> Result<Value, Unsupported> {
        let refuse = |keyword: &str, why: &'static str| Unsupported {
            keyword: keyword.to_string(),
            at: at.to_string(),
            why,
        };
        let Some(object) = schema.as_object() else {
            // `true` (anything) has no Gemini form; `false` cannot be satisfied.
            return Err(refuse("(boolean schema)", "a schema must be an object"));
        };
        // A `$ref` is replaced by its target; sibling keywords (a description) still apply.
        if let Some(reference) = object.get("$ref") {
            if depth >= MAX_REF_DEPTH {
                return Err(refuse("$ref", "recursive schemas cannot be inlined"));
            }
            let target = reference
                .as_str()
                .and_then(|r| r.strip_prefix('#'))
                .and_then(|pointer| self.root.pointer(pointer))
                .ok_or_else(|| refuse("$ref", "only local references (`#/$defs/…`) resolve"))?;
            let mut merged = target.as_object().cloned().unwrap_or_default();
            for (key, value) in object {
                if key != "$ref" {
                    merged.insert(key.clone(), value.clone());
                }
            }
            return self.convert(&Value::Object(merged), at, depth + 1);
        }
        // `allOf` of one schema is that schema.
        if let Some(all) = object.get("allOf") {
            let [only] = all.as_array().map(Vec::as_slice).unwrap_or_default() else {
                return Err(refuse(
                    "allOf",
                    "only an `allOf` of one schema can be converted",
                ));
            };
            let mut merged = only.as_object().cloned().unwrap_or_default();
            for (key, value) in object {
                if key != "allOf" {
                    merged.insert(key.clone(), value.clone());
                }
            }
            return self.convert(&Value::Object(merged), at, depth + 1);
        }

        let mut out = Map::new();
        let mut nullable = false;
        let mut description_extra: Option<String> = None;
        for (key, value) in object {
            let here = format!("{at}/{key}");
            match key.as_str() {
                "type" => match value {
                    Value::String(t) => {
                        out.insert("type".into(), json!(t));
                    }
                    Value::Array(types) => {
                        let real: Vec<&Value> = types.iter().filter(|t| *t != "null").collect();
                        nullable |= real.len() < types.len();
                        match real.as_slice() {
                            [one] => {
                                out.insert("type".into(), (*one).clone());
                            }
                            _ => {
                                return Err(refuse(
                                    "type",
                                    "a list of several types has no Gemini form",
                                ));
                            }
                        }
                    }
                    _ => return Err(refuse("type", "`type` must be a string or a list")),
                },
                "properties" => {
                    let mut properties = Map::new();
                    for (name, property) in value.as_object().into_iter().flatten() {
                        let converted = self.convert(property, &format!("{here}/{name}"), depth)?;
                        properties.insert(name.clone(), converted);
                    }
                    out.insert("properties".into(), Value::Object(properties));
                }
                "items" => {
                    if value.is_array() {
                        return Err(refuse("items", "tuple `items` (a list) has no Gemini form"));
                    }
                    out.insert("items".into(), self.convert(value, &here, depth)?);
                }
                "anyOf" | "oneOf" => {
                    let mut options = Vec::new();
                    for (i, option) in value.as_array().into_iter().flatten().enumerate() {
                        if option.get("type") == Some(&json!("null"))
                            && option.as_object().is_some_and(|o| o.len() == 1)
                        {
                            nullable = true;
                            continue;
                        }
                        options.push(self.convert(option, &format!("{here}/{i}"), depth)?);
                    }
                    if let [only] = options.as_slice() {
                        // One real option: it is the schema.
                        for (k, v) in only.as_object().into_iter().flatten() {
                            out.entry(k.clone()).or_insert_with(|| v.clone());
                        }
                    } else {
                        out.insert("anyOf".into(), Value::Array(options));
                    }
                }
                "const" => match value {
                    Value::String(s) => {
                        out.insert("enum".into(), json!([s]));
                        out.entry("type").or_insert_with(|| json!("string"));
                    }
                    _ => return Err(refuse("const", "Gemini's enums hold strings only")),
                },
                "enum" => {
                    let values = value.as_array().map(Vec::as_slice).unwrap_or_default();
                    if !values.iter().all(Value::is_string) {
                        return Err(refuse("enum", "Gemini's enums hold strings only"));
                    }
                    out.insert("enum".into(), value.clone());
                }
                "format" => {
                    let known = ["enum", "date-time", "int32", "int64", "float", "double"];
                    match value.as_str() {
                        Some(f) if known.contains(&f) => {
                            out.insert("format".into(), value.clone());
                        }
                        Some(f) => description_extra = Some(format!("(format: {f})")),
                        None => return Err(refuse("format", "`format` must be a string")),
                    }
                }
                "examples" => {
                    if let Some(first) = value.as_array().and_then(|v| v.first()) {
                        out.insert("example".into(), first.clone());
                    }
                }
                "additionalProperties" => {
                    if value != &Value::Bool(false) {
                        return Err(refuse(
                            "additionalProperties",
                            "only `additionalProperties: false` can be converted (Gemini produces declared properties only)",
                        ));
                    }
                }
                "nullable" => nullable |= value == &Value::Bool(true),
                // Annotations and definitions (already inlined through `$ref`).
                "$schema" | "$id" | "$comment" | "$defs" | "definitions" | "strict" => {}
                "description" | "title" | "required" | "minItems" | "maxItems"
                | "minProperties" | "maxProperties" | "minLength" | "maxLength" | "pattern"
                | "minimum" | "maximum" | "default" | "example" | "propertyOrdering" => {
                    out.insert(key.clone(), value.clone());
                }
                other => {
                    return Err(refuse(other, "it has no equivalent in Gemini's schema"));
                }
            }
        }
        if let Some(extra) = description_extra {
            let description = match out.get("description").and_then(Value::as_str) {
                Some(d) => format!("{d} {extra}"),
                None => extra,
            };
            out.insert("description".into(), json!(description));
        }
        if nullable {
            out.insert("nullable".into(), json!(true));
        }
        Ok(Value::Object(out))
    }
}

/// A deterministic value matching `schema`, built from `text` (the mock's tool arguments
/// and structured answers): strings are `text` (or the first enum value), numbers its word
/// count, booleans `true`, arrays one element, objects every property.
pub fn example(schema: &Value, text: &str) -> Value {
    example_at(schema, schema, text, 0)
}

fn example_at(root: &Value, schema: &Value, text: &str, depth: usize) -> Value {
    if depth > MAX_REF_DEPTH {
        return Value::Null;
    }
    let resolved = schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix('#'))
        .and_then(|p| root.pointer(p));
    if let Some(target) = resolved {
        return example_at(root, target, text, depth + 1);
    }
    if let Some(first) = ["anyOf", "oneOf", "allOf"].iter().find_map(|k| {
        schema
            .get(*k)
            .and_then(|v| v.as_array())
            .and_then(|v| v.first())
    }) {
        return example_at(root, first, text, depth + 1);
    }
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(|e| e.as_array())
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    let kind = match schema.get("type") {
        Some(Value::Array(types)) => types.iter().find(|t| *t != "null").and_then(Value::as_str),
        Some(t) => t.as_str(),
        None if schema.get("properties").is_some() => Some("object"),
        None => Some("string"),
    };
    let words = text.split_whitespace().count();
    match kind {
        Some("object") => {
            let mut out = Map::new();
            for (name, property) in schema
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                out.insert(name.clone(), example_at(root, property, text, depth + 1));
            }
            Value::Object(out)
        }
        Some("array") => match schema.get("items") {
            Some(items) => json!([example_at(root, items, text, depth + 1)]),
            None => json!([]),
        },
        Some("integer") => json!(words),
        Some("number") => json!(words as f64),
        Some("boolean") => json!(true),
        Some("null") => Value::Null,
        _ => json!(text),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pydantic_style_schemas_convert() {
        let schema = json!({
            "$defs": {"Unit": {"type": "string", "enum": ["c", "f"]}},
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "city": {"type": "string", "format": "email", "description": "where"},
                "unit": {"$ref": "#/$defs/Unit"},
                "days": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "tags": {"type": ["array", "null"], "items": {"const": "x"}}
            },
            "required": ["city"]
        });
        assert_eq!(
            to_gemini(&schema).unwrap(),
            json!({
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "where (format: email)"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                    "days": {"type": "integer", "nullable": true},
                    "tags": {"type": "array", "nullable": true,
                             "items": {"type": "string", "enum": ["x"]}}
                },
                "required": ["city"]
            })
        );
    }

    #[test]
    fn keywords_without_an_equivalent_are_refused_by_name() {
        let cases = [
            (
                json!({"type": "object", "properties": {"a": {"not": {}}}}),
                "not",
                "/properties/a",
            ),
            (
                json!({"type": "object", "additionalProperties": {"type": "string"}}),
                "additionalProperties",
                "",
            ),
            (json!({"type": "integer", "enum": [1, 2]}), "enum", ""),
            (
                json!({"$defs": {"N": {"properties": {"n": {"$ref": "#/$defs/N"}}}}, "$ref": "#/$defs/N"}),
                "$ref",
                "(deep)",
            ),
            (json!({"type": "number", "multipleOf": 2}), "multipleOf", ""),
        ];
        for (schema, keyword, at) in cases {
            let error = to_gemini(&schema).unwrap_err();
            assert_eq!(error.keyword, keyword, "{schema}");
            if at != "(deep)" {
                assert_eq!(error.at, at, "{schema}");
            }
            assert!(error.to_string().contains(&format!("`{keyword}`")));
        }
    }

    #[test]
    fn examples_follow_the_schema() {
        let schema = json!({"type": "object", "properties": {
            "city": {"type": "string"}, "n": {"type": "integer"},
            "unit": {"enum": ["c", "f"]}, "ok": {"type": "boolean"},
            "list": {"type": "array", "items": {"type": "number"}}}});
        assert_eq!(
            example(&schema, "weather in Paris"),
            json!({"city": "weather in Paris", "n": 3, "unit": "c", "ok": true, "list": [3.0]})
        );
    }
}

//! `deploy/terraform` against the services: every ECS container definition's variables and
//! secrets, required settings, ports and health checks, and the ALB and Cloud Map wiring.
//!
//! Container definitions are `jsonencode([...])` expressions; [`Resolver`] evaluates the
//! small part of HCL they use (literals, `local.*`, `concat`, `merge`, `for` expressions over known
//! collections, `tostring`, conditionals, `==`, `+`, string templates) and leaves the rest
//! (resource attributes, and `var.*` unless a test gives it a value) as opaque `${...}` text,
//! which is all the names and ports need. Task definitions with `for_each` are read once per
//! key, with `each` bound; `var.worker_groups` always has a value (its default plus
//! [`AGENT_GROUP`]), so every check also covers a worker task with an agent sidecar.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use hcl::expr::{BinaryOperator, Operation};
use hcl::template::{Element, Template};
use hcl::{Block, Body, Expression, ObjectKey, Traversal, TraversalOperator};
use serde_json::{Map, Value};

use crate::helpers::{
    Container, Problems, ServiceSpec, check_container, is_loopback, repo_root, services, spec_for,
    url_host_port,
};

const DIR: &str = "deploy/terraform";

/// A worker group with an agent sidecar, the example deploy/README.md gives, added to
/// `var.worker_groups`' default for every check: a sidecar must pass what every container
/// passes (hardening, credentials from Secrets Manager, URLs that reach something).
const AGENT_GROUP: &str = r#"{
  cpu = 256, memory = 512, min_count = 1, max_count = 2, max_concurrency = 4
  agent = {
    image       = "123456789012.dkr.ecr.us-west-2.amazonaws.com/team/ag2-agent:3f2a9c1b7d4e"
    environment = { AG2_MODEL = "default" }
  }
}"#;

/// The name of the agent sidecar's container in a worker task.
const AGENT_CONTAINER: &str = "agent";

/// A Terraform file, parsed.
struct TfFile {
    name: String,
    body: Body,
}

fn files() -> Vec<TfFile> {
    let dir = repo_root().join(DIR);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "tf"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "{DIR} has no .tf files");
    paths.iter().map(|p| parse(p)).collect()
}

fn parse(path: &Path) -> TfFile {
    let name = format!("{DIR}/{}", path.file_name().unwrap().to_string_lossy());
    let text = std::fs::read_to_string(path).unwrap();
    let body: Body = hcl::from_str(&text).unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
    TfFile { name, body }
}

/// `resource "TYPE" "NAME" { ... }` blocks of one type, with their file.
fn resources<'a>(files: &'a [TfFile], kind: &str) -> Vec<(&'a str, String, &'a Block)> {
    files
        .iter()
        .flat_map(|f| f.body.blocks().map(move |b| (f.name.as_str(), b)))
        .filter(|(_, b)| {
            b.identifier.as_str() == "resource"
                && b.labels.first().map(|l| l.as_str()) == Some(kind)
        })
        .map(|(file, b)| {
            let name = b
                .labels
                .get(1)
                .map(|l| l.as_str().to_string())
                .unwrap_or_default();
            (file, format!("{kind}.{name}"), b)
        })
        .collect()
}

fn attr<'a>(body: &'a Body, key: &str) -> Option<&'a Expression> {
    body.attributes()
        .find(|a| a.key.as_str() == key)
        .map(|a| &a.expr)
}

fn block<'a>(body: &'a Body, ident: &str) -> Option<&'a Block> {
    body.blocks().find(|b| b.identifier.as_str() == ident)
}

/// Evaluates the literal part of HCL expressions, with every `locals` block in scope.
struct Resolver {
    locals: BTreeMap<String, Expression>,
    /// `var.NAME` → its value, as Terraform would see it after applying the variable's type
    /// (optional attributes filled in): every default in [`Resolver::with_defaults`], what a
    /// plan without `-var` sees; otherwise only what [`Resolver::with_var`] sets, so the
    /// rest of `var.*` stays opaque.
    vars: BTreeMap<String, Value>,
    /// `var.NAME` → its `type` expression, to fill in optional attributes.
    types: BTreeMap<String, Expression>,
}

impl Resolver {
    /// A resolver with `var.worker_groups` set to its default plus [`AGENT_GROUP`] as
    /// `critique`, and every other variable opaque.
    fn new(files: &[TfFile]) -> Self {
        let groups = variable_default(files, "worker_groups");
        let groups = format!("merge({groups}, {{ critique = {AGENT_GROUP} }})");
        Self::bare(files).with_var("worker_groups", &groups)
    }

    /// A resolver that knows the locals and no variable.
    fn bare(files: &[TfFile]) -> Self {
        let variables = || {
            files
                .iter()
                .flat_map(|f| f.body.blocks())
                .filter(|b| b.identifier.as_str() == "variable")
                .filter_map(|b| Some((b.labels.first()?.as_str().to_string(), &b.body)))
        };
        let locals = files
            .iter()
            .flat_map(|f| f.body.blocks())
            .filter(|b| b.identifier.as_str() == "locals")
            .flat_map(|b| b.body.attributes())
            .map(|a| (a.key.to_string(), a.expr.clone()))
            .collect();
        let types = variables()
            .filter_map(|(name, body)| Some((name, attr(body, "type")?.clone())))
            .collect();
        Self {
            locals,
            vars: BTreeMap::new(),
            types,
        }
    }

    /// A resolver that reads `var.NAME` as the variable's default, where it has one.
    fn with_defaults(files: &[TfFile]) -> Self {
        let mut resolver = Self::bare(files);
        for b in files
            .iter()
            .flat_map(|f| f.body.blocks())
            .filter(|b| b.identifier.as_str() == "variable")
        {
            let (Some(name), Some(default)) = (b.labels.first(), attr(&b.body, "default")) else {
                continue;
            };
            let value = resolver.resolve(default);
            resolver.set(name.as_str(), value);
        }
        resolver
    }

    /// This resolver with `var.NAME` set to `value`, an HCL expression (as in a `.tfvars`
    /// file), converted through the variable's type as Terraform does.
    fn with_var(mut self, name: &str, value: &str) -> Self {
        let value = self.resolve(&expression(value));
        self.set(name, value);
        self
    }

    fn set(&mut self, name: &str, value: Value) {
        let value = match self.types.get(name) {
            Some(ty) => self.conform(ty, value),
            None => value,
        };
        self.vars.insert(name.to_string(), value);
    }

    /// `value` as a variable of type `ty` holds it: `optional(T, default)` attributes that
    /// are missing or null take their default (null without one), recursively, through
    /// `map`, `list`, `set` and `object`.
    fn conform(&self, ty: &Expression, value: Value) -> Value {
        let Expression::FuncCall(call) = ty else {
            return value;
        };
        match (call.name.name.as_str(), call.args.first(), value) {
            ("map", Some(inner), Value::Object(map)) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| (k, self.conform(inner, v)))
                    .collect(),
            ),
            ("list" | "set", Some(inner), Value::Array(items)) => {
                Value::Array(items.into_iter().map(|v| self.conform(inner, v)).collect())
            }
            ("object", Some(Expression::Object(attributes)), Value::Object(mut map)) => {
                let mut out = Map::new();
                for (key, attribute_type) in attributes {
                    let key = match key {
                        ObjectKey::Identifier(id) => id.to_string(),
                        ObjectKey::Expression(e) => text(&self.resolve(e)),
                        other => format!("{other:?}"),
                    };
                    let given = map.remove(&key).unwrap_or(Value::Null);
                    let value = match attribute_type {
                        Expression::FuncCall(o) if o.name.name.as_str() == "optional" => {
                            let given = if given.is_null() {
                                o.args.get(1).map_or(Value::Null, |d| self.resolve(d))
                            } else {
                                given
                            };
                            match (given, o.args.first()) {
                                (Value::Null, _) => Value::Null,
                                (given, Some(inner)) => self.conform(inner, given),
                                (given, None) => given,
                            }
                        }
                        other => self.conform(other, given),
                    };
                    out.insert(key, value);
                }
                Value::Object(out)
            }
            (_, _, value) => value,
        }
    }

    fn resolve(&self, expr: &Expression) -> Value {
        self.eval(expr, &BTreeMap::new(), 0)
    }

    fn eval(&self, expr: &Expression, scope: &BTreeMap<String, Value>, depth: usize) -> Value {
        assert!(depth < 64, "locals refer to each other in a loop");
        let next = depth + 1;
        match expr {
            Expression::Null => Value::Null,
            Expression::Bool(b) => Value::Bool(*b),
            Expression::Number(n) => serde_json::to_value(n).unwrap_or(Value::Null),
            Expression::String(s) => Value::String(s.clone()),
            Expression::Array(items) => {
                Value::Array(items.iter().map(|e| self.eval(e, scope, next)).collect())
            }
            Expression::Object(object) => {
                let mut out = Map::new();
                for (key, value) in object {
                    let key = match key {
                        ObjectKey::Identifier(id) => id.to_string(),
                        ObjectKey::Expression(e) => text(&self.eval(e, scope, next)),
                        other => format!("{other:?}"),
                    };
                    out.insert(key, self.eval(value, scope, next));
                }
                Value::Object(out)
            }
            Expression::Parenthesis(inner) => self.eval(inner, scope, next),
            Expression::Variable(v) => scope
                .get(v.as_str())
                .cloned()
                .unwrap_or_else(|| opaque(expr)),
            Expression::Traversal(t) => {
                let (mut value, rest) = match &t.expr {
                    Expression::Variable(root) if root.as_str() == "var" => {
                        match t.operators.first() {
                            Some(TraversalOperator::GetAttr(name)) => {
                                match self.vars.get(name.as_str()) {
                                    Some(value) => (value.clone(), &t.operators[1..]),
                                    None => return opaque(expr),
                                }
                            }
                            _ => return opaque(expr),
                        }
                    }
                    Expression::Variable(root) if root.as_str() == "local" => {
                        match t.operators.first() {
                            Some(TraversalOperator::GetAttr(name)) => {
                                match self.locals.get(name.as_str()) {
                                    Some(local) => (
                                        self.eval(local, &BTreeMap::new(), next),
                                        &t.operators[1..],
                                    ),
                                    None => return opaque(expr),
                                }
                            }
                            _ => return opaque(expr),
                        }
                    }
                    Expression::Variable(root) => match scope.get(root.as_str()) {
                        Some(v) => (v.clone(), &t.operators[..]),
                        None => return opaque(expr),
                    },
                    _ => return opaque(expr),
                };
                for op in rest {
                    match self.apply(&value, op, scope, next) {
                        Some(v) => value = v,
                        None => return opaque(&self.with_known_indexes(t, scope, next)),
                    }
                }
                value
            }
            Expression::FuncCall(call) => {
                let args: Vec<Value> = call
                    .args
                    .iter()
                    .map(|a| self.eval(a, scope, next))
                    .collect();
                match (call.name.name.as_str(), args.as_slice()) {
                    ("concat", _) if args.iter().all(Value::is_array) => Value::Array(
                        args.into_iter()
                            .flat_map(|a| a.as_array().cloned().unwrap_or_default())
                            .collect(),
                    ),
                    ("merge", _) if args.iter().all(Value::is_object) => {
                        let mut merged = Map::new();
                        for arg in args {
                            merged.extend(arg.as_object().cloned().unwrap_or_default());
                        }
                        Value::Object(merged)
                    }
                    ("toset", [Value::Array(items)]) => Value::Array(items.clone()),
                    ("tostring", [Value::String(s)]) => Value::String(s.clone()),
                    ("tostring", [Value::Number(n)]) => Value::String(n.to_string()),
                    ("jsonencode", [v]) if !contains_opaque(v) => Value::String(v.to_string()),
                    _ => opaque(expr),
                }
            }
            Expression::ForExpr(f) => {
                let collection = self.eval(&f.collection_expr, scope, next);
                let pairs: Vec<(Value, Value)> = match collection {
                    Value::Array(items) => items
                        .into_iter()
                        .enumerate()
                        .map(|(i, v)| (Value::from(i), v))
                        .collect(),
                    Value::Object(map) => map
                        .into_iter()
                        .map(|(k, v)| (Value::String(k), v))
                        .collect(),
                    _ => return opaque(expr),
                };
                let mut array = Vec::new();
                let mut object = Map::new();
                for (key, value) in pairs {
                    let mut inner = scope.clone();
                    if let Some(k) = &f.key_var {
                        inner.insert(k.to_string(), key);
                    }
                    inner.insert(f.value_var.to_string(), value);
                    if let Some(cond) = &f.cond_expr
                        && self.eval(cond, &inner, next) == Value::Bool(false)
                    {
                        continue;
                    }
                    let value = self.eval(&f.value_expr, &inner, next);
                    match &f.key_expr {
                        Some(k) => {
                            object.insert(text(&self.eval(k, &inner, next)), value);
                        }
                        None => array.push(value),
                    }
                }
                if f.key_expr.is_some() {
                    Value::Object(object)
                } else {
                    Value::Array(array)
                }
            }
            // `==` and `!=` between known values, as in a `for` expression's `if`, and `+`
            // between known numbers, as in a task's size.
            Expression::Operation(op) => match op.as_ref() {
                Operation::Binary(b)
                    if matches!(
                        b.operator,
                        BinaryOperator::Eq | BinaryOperator::NotEq | BinaryOperator::Plus
                    ) =>
                {
                    let lhs = self.eval(&b.lhs_expr, scope, next);
                    let rhs = self.eval(&b.rhs_expr, scope, next);
                    if contains_opaque(&lhs) || contains_opaque(&rhs) {
                        return opaque(expr);
                    }
                    match b.operator {
                        BinaryOperator::Plus => match (lhs.as_i64(), rhs.as_i64()) {
                            (Some(l), Some(r)) => Value::from(l + r),
                            _ => opaque(expr),
                        },
                        operator => Value::Bool((lhs == rhs) == (operator == BinaryOperator::Eq)),
                    }
                }
                _ => opaque(expr),
            },
            Expression::Conditional(c) => match self.eval(&c.cond_expr, scope, next) {
                Value::Bool(true) => self.eval(&c.true_expr, scope, next),
                Value::Bool(false) => self.eval(&c.false_expr, scope, next),
                _ => opaque(expr),
            },
            // Interpolations of known strings and numbers are filled in; the rest keep their
            // source text: `http://master.${var.name}.local:8000` without a value for var.name.
            Expression::TemplateExpr(t) => {
                let Ok(template) = Template::from_expr(t) else {
                    return Value::String(t.to_string());
                };
                let mut out = String::new();
                for element in template.elements() {
                    match element {
                        Element::Literal(literal) => out.push_str(literal),
                        Element::Interpolation(i) => match self.eval(&i.expr, scope, next) {
                            Value::String(s) => out.push_str(&s),
                            Value::Number(n) => out.push_str(&n.to_string()),
                            Value::Bool(b) => out.push_str(&b.to_string()),
                            _ => out.push_str(&text(&opaque(&i.expr))),
                        },
                        Element::Directive(_) => return Value::String(t.to_string()),
                    }
                }
                Value::String(out)
            }
            _ => opaque(expr),
        }
    }

    /// `t` with each `[index]` that evaluates to a string or a number written as that
    /// literal: `local.secret_arns[name]` with `name` bound reads
    /// `local.secret_arns["GATEWAY_TOKEN"]`, so two opaque values compare by what they name.
    fn with_known_indexes(
        &self,
        t: &Traversal,
        scope: &BTreeMap<String, Value>,
        depth: usize,
    ) -> Expression {
        let operators = t
            .operators
            .iter()
            .map(|op| match op {
                TraversalOperator::Index(index) => match self.eval(index, scope, depth) {
                    Value::String(key) if !key.contains("${") => {
                        TraversalOperator::Index(Expression::String(key))
                    }
                    Value::Number(n) => TraversalOperator::Index(Expression::Number(
                        hcl::Number::from(n.as_u64().unwrap_or_default()),
                    )),
                    _ => op.clone(),
                },
                other => other.clone(),
            })
            .collect::<Vec<_>>();
        Expression::Traversal(Box::new(Traversal::new(t.expr.clone(), operators)))
    }

    /// One `.name` or `[index]` step; `None` when it does not apply (a missing key, or a
    /// value that is opaque or null).
    fn apply(
        &self,
        value: &Value,
        op: &TraversalOperator,
        scope: &BTreeMap<String, Value>,
        depth: usize,
    ) -> Option<Value> {
        match op {
            TraversalOperator::GetAttr(name) => value.get(name.as_str()).cloned(),
            TraversalOperator::Index(index) => match self.eval(index, scope, depth) {
                Value::String(key) => value.get(&key).cloned(),
                Value::Number(n) => value.get(usize::try_from(n.as_u64()?).ok()?).cloned(),
                _ => None,
            },
            _ => None,
        }
    }
}

/// An expression this resolver does not evaluate, as `${source}`.
fn opaque(expr: &Expression) -> Value {
    let source = hcl::format::to_string(expr).unwrap_or_else(|_| "?".into());
    Value::String(format!("${{{source}}}"))
}

/// An HCL expression from its source text, e.g. a variable's value.
fn expression(source: &str) -> Expression {
    let body: Body = hcl::from_str(&format!("value = {source}"))
        .unwrap_or_else(|e| panic!("not an HCL expression: {e}\n{source}"));
    attr(&body, "value").cloned().expect("one attribute")
}

/// A variable's default, as source text.
fn variable_default(files: &[TfFile], name: &str) -> String {
    let variable = files
        .iter()
        .flat_map(|f| f.body.blocks())
        .find(|b| {
            b.identifier.as_str() == "variable"
                && b.labels.first().map(|l| l.as_str()) == Some(name)
        })
        .unwrap_or_else(|| panic!("{DIR} declares no variable {name}"));
    attr(&variable.body, "default")
        .map(source)
        .unwrap_or_else(|| panic!("variable {name} has no default"))
}

fn contains_opaque(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains("${"),
        Value::Array(a) => a.iter().any(contains_opaque),
        Value::Object(o) => o.values().any(contains_opaque),
        _ => false,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A container definition, resolved, with where it comes from.
struct Definition {
    file: String,
    /// The task definition, with its `for_each` key: containers with the same `task` share
    /// a network namespace (awsvpc), so they reach each other on 127.0.0.1.
    task: String,
    who: String,
    json: Value,
}

fn definitions(files: &[TfFile]) -> Vec<Definition> {
    definitions_with(files, &Resolver::new(files))
}

/// The container definitions, as `resolver` reads them: a task definition with `for_each`
/// once per key of its collection, with `each.key` and `each.value` bound.
fn definitions_with(files: &[TfFile], resolver: &Resolver) -> Vec<Definition> {
    let mut out = Vec::new();
    for (file, address, block) in resources(files, "aws_ecs_task_definition") {
        for (task, scope) in instances(resolver, &address, &block.body) {
            let Some(expr) = attr(&block.body, "container_definitions") else {
                panic!("{file}: {address} has no container_definitions");
            };
            let Expression::FuncCall(call) = expr else {
                panic!(
                    "{file}: {address}: container_definitions must be jsonencode([...]) so it can be checked"
                );
            };
            assert_eq!(
                call.name.name.as_str(),
                "jsonencode",
                "{file}: {address}: container_definitions must be jsonencode([...])"
            );
            let list = resolver.eval(&call.args[0], &scope, 0);
            let list = list.as_array().unwrap_or_else(|| {
                panic!("{file}: {task}: container_definitions is not a list: {list}")
            });
            for json in list {
                let name = json.get("name").and_then(Value::as_str).unwrap_or_else(|| {
                    panic!("{file}: {task}: a container has no literal name: {json}")
                });
                out.push(Definition {
                    file: file.to_string(),
                    task: task.clone(),
                    who: format!("{task}, container {name}"),
                    json: json.clone(),
                });
            }
        }
    }
    assert!(!out.is_empty(), "{DIR} defines no ECS task definitions");
    out
}

/// The instances of a resource: `(address, scope)`, one per key of its `for_each` with
/// `each` bound (`address["key"]`), or the resource alone.
fn instances(
    resolver: &Resolver,
    address: &str,
    body: &Body,
) -> Vec<(String, BTreeMap<String, Value>)> {
    let Some(for_each) = attr(body, "for_each") else {
        return vec![(address.to_string(), BTreeMap::new())];
    };
    match resolver.resolve(for_each) {
        Value::Object(map) => map
            .into_iter()
            .map(|(key, value)| {
                let each = serde_json::json!({ "key": key, "value": value });
                (
                    format!("{address}[\"{key}\"]"),
                    BTreeMap::from([("each".to_string(), each)]),
                )
            })
            .collect(),
        Value::Array(keys) => keys
            .into_iter()
            .map(|key| {
                let each = serde_json::json!({ "key": key, "value": key });
                (
                    format!("{address}[\"{}\"]", text(&key)),
                    BTreeMap::from([("each".to_string(), each)]),
                )
            })
            .collect(),
        _ => vec![(address.to_string(), BTreeMap::new())],
    }
}

fn named(list: Option<&Value>, value_key: &str) -> BTreeMap<String, String> {
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|item| {
            let name = item.get("name").map(text).unwrap_or_default();
            let value = item.get(value_key).map(text).unwrap_or_default();
            (name, value)
        })
        .collect()
}

fn container(d: &Definition) -> Container {
    let json = &d.json;
    Container {
        file: d.file.clone(),
        who: d.who.clone(),
        service: json.get("name").map(text).unwrap_or_default(),
        env: named(json.get("environment"), "value"),
        secrets: named(json.get("secrets"), "valueFrom")
            .into_keys()
            .collect(),
        ports: json
            .get("portMappings")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| m.get("containerPort")?.as_u64())
            .filter_map(|p| u16::try_from(p).ok())
            .collect(),
        health: json
            .get("healthCheck")
            .and_then(|h| h.get("command"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(text)
            .flat_map(|w| w.split_whitespace().map(String::from).collect::<Vec<_>>())
            .collect(),
    }
}

#[test]
fn every_container_sets_only_what_its_service_reads_and_all_it_requires() {
    let files = files();
    let specs = services();
    let mut problems = Problems::default();
    let containers: Vec<Container> = definitions(&files).iter().map(container).collect();
    // An agent sidecar runs someone else's image: a_worker_group_with_an_agent_runs_it_beside_the_worker checks it.
    for c in containers.iter().filter(|c| c.service != AGENT_CONTAINER) {
        if let Some(spec) = spec_for(&specs, c, &mut problems) {
            check_container(spec, c, &mut problems);
        }
    }
    for spec in &specs {
        if !containers.iter().any(|c| c.service == spec.name) {
            problems.add(DIR, spec.name, "no ECS container definition runs it");
        }
    }
    problems.assert_none("the ECS container definitions against the services' settings");
}

/// Settings that hold a credential: these must come from Secrets Manager, never a plain
/// environment value that shows in the task definition.
fn is_credential(var: &str) -> bool {
    ["_PASSWORD", "_TOKEN", "_KEY", "_KEYS", "_SECRET"]
        .iter()
        .any(|s| var.ends_with(s))
}

#[test]
fn credentials_come_from_secrets_manager() {
    let files = files();
    let mut problems = Problems::default();
    for d in definitions(&files) {
        let c = container(&d);
        for var in c.env.keys().filter(|v| is_credential(v)) {
            problems.add(
                &c.file,
                &c.who,
                format!("{var} is a plain environment value; inject it with `secrets`"),
            );
        }
        let secrets = d
            .json
            .get("secrets")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for s in secrets {
            let name = s.get("name").map(text).unwrap_or_default();
            if s.get("valueFrom").is_none_or(|v| text(v).is_empty()) {
                problems.add(&c.file, &c.who, format!("secret {name} has no valueFrom"));
            }
        }
    }
    problems.assert_none("credentials in the ECS container definitions");
}

#[test]
fn containers_are_hardened_and_drain_before_sigkill() {
    let files = files();
    let mut problems = Problems::default();
    for d in definitions(&files) {
        let (j, file, who) = (&d.json, &d.file, &d.who);
        if j.get("readonlyRootFilesystem") != Some(&Value::Bool(true)) {
            problems.add(file, who, "readonlyRootFilesystem must be true");
        }
        let user = j.get("user").map(text).unwrap_or_default();
        if user.is_empty() || user == "root" || user.starts_with("0:") || user == "0" {
            problems.add(
                file,
                who,
                format!("must run as a non-root user (user = {user:?})"),
            );
        }
        if j.pointer("/linuxParameters/initProcessEnabled") != Some(&Value::Bool(true)) {
            problems.add(file, who, "linuxParameters.initProcessEnabled must be true");
        }
        // Above the worker's default SHUTDOWN_GRACE_MS of 25 s, with room to deliver results.
        let stop = j.get("stopTimeout").and_then(Value::as_u64).unwrap_or(0);
        if stop < 30 {
            problems.add(
                file,
                who,
                format!("stopTimeout {stop} s is not above the 25 s drain grace (use 30+)"),
            );
        }
        if j.pointer("/logConfiguration/logDriver")
            .and_then(Value::as_str)
            != Some("awslogs")
        {
            problems.add(file, who, "logs must go to awslogs");
        }
    }
    problems.assert_none("container hardening in the ECS task definitions");
}

fn spec<'a>(specs: &'a [ServiceSpec], name: &str) -> &'a ServiceSpec {
    specs.iter().find(|s| s.name == name).unwrap()
}

#[test]
fn the_alb_reaches_the_master_port_and_checks_ready() {
    let files = files();
    let specs = services();
    let master_port = u64::from(spec(&specs, "master").default_port);
    let resolver = Resolver::new(&files);
    let mut problems = Problems::default();

    let groups = resources(&files, "aws_lb_target_group");
    assert!(!groups.is_empty(), "{DIR} has no ALB target group");
    for (file, address, b) in groups {
        let port = attr(&b.body, "port").map(|e| resolver.resolve(e));
        if port.as_ref().and_then(Value::as_u64) != Some(master_port) {
            problems.add(
                file,
                &address,
                format!("port is {port:?}, the master listens on {master_port}"),
            );
        }
        let path = block(&b.body, "health_check")
            .and_then(|h| attr(&h.body, "path"))
            .map(|e| resolver.resolve(e));
        if path.as_ref().and_then(Value::as_str) != Some("/ready") {
            problems.add(
                file,
                &address,
                format!("health check path is {path:?}, should be /ready"),
            );
        }
    }
    for (file, address, b) in resources(&files, "aws_ecs_service") {
        for lb in b
            .body
            .blocks()
            .filter(|x| x.identifier.as_str() == "load_balancer")
        {
            let name = attr(&lb.body, "container_name").map(|e| text(&resolver.resolve(e)));
            let port = attr(&lb.body, "container_port").and_then(|e| resolver.resolve(e).as_u64());
            if name.as_deref() != Some("master") || port != Some(master_port) {
                problems.add(
                    file,
                    &address,
                    format!(
                        "load_balancer targets {name:?}:{port:?}, should be master:{master_port}"
                    ),
                );
            }
        }
    }
    problems.assert_none("the ALB wiring");
}

#[test]
fn service_urls_name_a_cloud_map_service_and_its_port() {
    let files = files();
    let specs = services();
    let mut problems = Problems::default();
    let registered: BTreeSet<String> = resources(&files, "aws_service_discovery_service")
        .into_iter()
        .flat_map(|(_, _, b)| {
            let resolver = Resolver::new(&files);
            match attr(&b.body, "for_each").map(|e| resolver.resolve(e)) {
                Some(Value::Array(names)) => names.iter().map(text).collect::<Vec<_>>(),
                _ => attr(&b.body, "name")
                    .map(|e| text(&resolver.resolve(e)))
                    .into_iter()
                    .collect(),
            }
        })
        .collect();
    let defs = definitions(&files);
    let containers: Vec<Container> = defs.iter().map(container).collect();
    // service → the port its containers listen on.
    let listening: BTreeMap<&str, u16> = containers
        .iter()
        .filter_map(|c| {
            let spec = specs.iter().find(|s| s.name == c.service)?;
            Some((spec.name, c.listen_port(spec)?))
        })
        .collect();
    for (d, c) in defs.iter().zip(&containers) {
        for (var, value) in &c.env {
            let Some((host, port)) = url_host_port(value) else {
                continue;
            };
            // 127.0.0.1 is the task's own network namespace (awsvpc): another container of
            // the same task, a sidecar, must listen on that port (its PORT).
            if is_loopback(host) {
                let sidecar = defs.iter().zip(&containers).any(|(other, o)| {
                    other.task == d.task
                        && other.who != d.who
                        && o.env.get("PORT").and_then(|p| p.parse().ok()) == Some(port)
                });
                if !sidecar {
                    problems.add(
                        &c.file,
                        &c.who,
                        format!(
                            "{var}={value}: no other container of {} listens on {port}",
                            d.task
                        ),
                    );
                }
                continue;
            }
            let name = host.split('.').next().unwrap_or(host);
            if !registered.contains(name) {
                problems.add(
                    &c.file,
                    &c.who,
                    format!("{var}={value}: `{name}` is not a Cloud Map service ({registered:?})"),
                );
            }
            match listening.get(name) {
                Some(&p) if p != port => problems.add(
                    &c.file,
                    &c.who,
                    format!("{var}={value}: {name} listens on {p}, not {port}"),
                ),
                Some(_) => {}
                None => problems.add(
                    &c.file,
                    &c.who,
                    format!("{var}={value}: `{name}` is not an Ensemble container here"),
                ),
            }
        }
    }
    problems.assert_none("service URLs in the ECS container definitions");
}

/// An expression as its source text, e.g. `[aws_lb_listener_rule.client_paths]`, to find
/// the resource addresses it names.
fn source(expr: &Expression) -> String {
    hcl::format::to_string(expr).unwrap_or_default()
}

#[test]
fn a_service_behind_the_alb_waits_for_the_rule_that_attaches_its_target_group() {
    let files = files();
    let mut problems = Problems::default();
    // target group address → the listener rules that forward to it.
    let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, address, b) in resources(&files, "aws_lb_listener_rule") {
        for action in b
            .body
            .blocks()
            .filter(|x| x.identifier.as_str() == "action")
        {
            if let Some(tg) = attr(&action.body, "target_group_arn") {
                let tg = source(tg).trim_end_matches(".arn").to_string();
                rules.entry(tg).or_default().push(address.clone());
            }
        }
    }
    for (file, address, b) in resources(&files, "aws_ecs_service") {
        let depends_on = attr(&b.body, "depends_on").map(source).unwrap_or_default();
        for lb in b
            .body
            .blocks()
            .filter(|x| x.identifier.as_str() == "load_balancer")
        {
            let Some(tg) = attr(&lb.body, "target_group_arn") else {
                continue;
            };
            let tg = source(tg).trim_end_matches(".arn").to_string();
            let attaching = rules.get(&tg).cloned().unwrap_or_default();
            if attaching.is_empty() {
                problems.add(file, &address, format!("no listener rule forwards to {tg}"));
            } else if !attaching.iter().any(|r| depends_on.contains(r.as_str())) {
                problems.add(
                    file,
                    &address,
                    format!(
                        "depends_on is `{depends_on}`: it must name {attaching:?}, which attach \
                         {tg} to the ALB (ECS fails on a target group with no load balancer)"
                    ),
                );
            }
        }
    }
    problems.assert_none("ECS services and the listener rules they need");
}

#[test]
fn no_container_environment_entry_is_empty_with_the_defaults() {
    // The AWS provider drops empty environment values when it reads a task definition
    // back, so an entry like `LLM_MODEL=""` shows as a change on every plan.
    let files = files();
    let mut problems = Problems::default();
    for d in definitions_with(&files, &Resolver::with_defaults(&files)) {
        for (name, value) in named(d.json.get("environment"), "value") {
            if value.is_empty() {
                problems.add(
                    &d.file,
                    &d.who,
                    format!("{name} is \"\" with the variables' defaults: leave empty values out"),
                );
            }
        }
    }
    problems.assert_none("empty environment values (a perpetual diff)");
}

#[test]
fn image_tags_are_required_and_the_buildspec_prints_and_keeps_them() {
    // The ECR repositories are immutable and nothing pushes a moving tag, so a default tag
    // names an image that does not exist.
    let files = files();
    let variable = files
        .iter()
        .flat_map(|f| f.body.blocks())
        .find(|b| {
            b.identifier.as_str() == "variable"
                && b.labels.first().map(|l| l.as_str()) == Some("image_tags")
        })
        .expect("variables.tf declares image_tags");
    assert!(
        attr(&variable.body, "default").is_none(),
        "variable image_tags has a default: make it required (ECR tags are immutable and \
         deploy/buildspec.yml pushes only the commit's tag)"
    );

    let path = repo_root().join("deploy/buildspec.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let commands: Vec<&str> = ["pre_build", "build", "post_build"]
        .iter()
        .filter_map(|phase| doc["phases"][phase]["commands"].as_sequence())
        .flatten()
        .filter_map(serde_yaml::Value::as_str)
        .collect();
    assert!(
        commands
            .iter()
            .any(|c| c.starts_with("echo") && c.contains("IMAGE_TAG=$IMAGE_TAG")),
        "deploy/buildspec.yml must print IMAGE_TAG=<tag> for terraform's image_tags"
    );
    // A rebuild of the same commit: the tag is already in ECR, and pushing it again fails.
    let pushes_every_time = commands.iter().any(|c| c.contains("docker push"))
        && !commands
            .iter()
            .any(|c| c.contains("aws ecr describe-images"));
    assert!(
        !pushes_every_time,
        "deploy/buildspec.yml pushes without looking whether the tag is already in ECR \
         (immutable: a rebuild of the same commit would fail)"
    );
    assert!(
        !text.contains(":latest") && !text.contains("-manual}"),
        "deploy/buildspec.yml names a fixed tag, which an immutable repository takes only once"
    );
}

#[test]
fn elasticache_notifies_a_topic_it_can_publish_to() {
    // ElastiCache cannot publish to an encrypted SNS topic (any key), and needs a topic
    // policy with aws:SourceOwner: otherwise its events are dropped without an error.
    let files = files();
    let mut problems = Problems::default();
    let topics = resources(&files, "aws_sns_topic");
    let policies = resources(&files, "aws_sns_topic_policy");
    let groups = resources(&files, "aws_elasticache_replication_group");
    assert!(
        !groups.is_empty(),
        "{DIR} has no ElastiCache replication group"
    );
    for (file, address, b) in groups {
        let Some(arn) = attr(&b.body, "notification_topic_arn").map(source) else {
            problems.add(
                file,
                &address,
                "no notification_topic_arn: failovers go unseen",
            );
            continue;
        };
        let topic = arn.trim_end_matches(".arn");
        let Some((_, _, t)) = topics.iter().find(|(_, a, _)| a == topic) else {
            problems.add(
                file,
                &address,
                format!("{arn} is not a topic of this stack"),
            );
            continue;
        };
        if attr(&t.body, "kms_master_key_id").is_some() {
            problems.add(
                file,
                &address,
                format!("{topic} is KMS-encrypted: ElastiCache cannot publish to it"),
            );
        }
        let allowed = policies.iter().any(|(_, _, p)| {
            attr(&p.body, "arn").map(source).as_deref() == Some(arn.as_str())
                && attr(&p.body, "policy").is_some_and(|e| source(e).contains("AWS:SourceOwner"))
        });
        if !allowed {
            problems.add(
                file,
                &address,
                format!(
                    "{topic} has no topic policy letting AWS:SourceOwner (this account) publish"
                ),
            );
        }
    }
    problems.assert_none("ElastiCache notifications");
}

#[test]
fn the_redis_errors_alarm_matches_the_message_the_services_log() {
    let files = files();
    let expected = format!("{{ $.message = \"{}\" }}", common::redis::UNAVAILABLE_LOG);
    let filters = resources(&files, "aws_cloudwatch_log_metric_filter");
    let (file, address, filter) = filters
        .iter()
        .find(|(_, a, _)| a.ends_with(".redis_errors"))
        .expect("alarms.tf has the redis_errors log metric filter");
    let pattern = attr(&filter.body, "pattern").map(|e| text(&Resolver::new(&files).resolve(e)));
    assert_eq!(
        pattern.as_deref(),
        Some(expected.as_str()),
        "{file}: {address}: the pattern must match common::redis::UNAVAILABLE_LOG, the message \
         the master and the workers log for a Redis outage"
    );
    // Where the services log an outage: each must log the constant, not words of its own.
    for path in [
        "common/src/http.rs",
        "master/src/error.rs",
        "master/src/dispatch/mod.rs",
        "worker/src/heartbeat.rs",
    ] {
        let code = std::fs::read_to_string(repo_root().join(path)).unwrap();
        assert!(
            code.contains("redis::UNAVAILABLE_LOG"),
            "{path} no longer logs common::redis::UNAVAILABLE_LOG: the Redis errors alarm \
             would not see its outages"
        );
    }
}

/// Whether an ALB path pattern (`*` any characters, `?` one) matches `path`.
fn glob(pattern: &[u8], path: &[u8]) -> bool {
    match (pattern.split_first(), path.split_first()) {
        (None, None) => true,
        (Some((b'*', rest)), _) => {
            glob(rest, path) || (!path.is_empty() && glob(pattern, &path[1..]))
        }
        (Some((b'?', rest)), Some((_, tail))) => glob(rest, tail),
        (Some((p, rest)), Some((c, tail))) if p == c => glob(rest, tail),
        _ => false,
    }
}

/// The master's routes, `(method, path, handler module)`, read from its router, with
/// `{id}` as `x`: the public listener must follow that file as it changes.
fn master_routes() -> Vec<(String, String, String)> {
    let path = repo_root().join("master/src/routes/mod.rs");
    let code = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    for line in code.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix(".route(\"") else {
            continue;
        };
        let Some((route, handlers)) = rest.split_once('"') else {
            continue;
        };
        let route = route.replace("{id}", "x");
        for part in handlers.split(['.', ',', ' ']) {
            let Some((method, handler)) = part.split_once('(') else {
                continue;
            };
            let module = handler
                .split("::")
                .next()
                .unwrap_or_default()
                .trim_end_matches(')');
            out.push((method.to_uppercase(), route.clone(), module.to_string()));
        }
    }
    assert!(
        out.len() >= 5,
        "could not read the routes in {}",
        path.display()
    );
    out
}

#[test]
fn the_public_listener_forwards_client_routes_only() {
    let files = files();
    let resolver = Resolver::new(&files);
    // (path patterns, methods or none for any) of each rule that forwards from the HTTPS listener.
    let mut rules = Vec::new();
    for (_, address, b) in resources(&files, "aws_lb_listener_rule") {
        let forwards = b.body.blocks().any(|a| {
            a.identifier.as_str() == "action"
                && attr(&a.body, "type")
                    .map(|e| text(&resolver.resolve(e)))
                    .as_deref()
                    == Some("forward")
        });
        if !forwards {
            continue;
        }
        let mut paths: Option<Vec<String>> = None;
        let mut methods: Option<Vec<String>> = None;
        for c in b
            .body
            .blocks()
            .filter(|x| x.identifier.as_str() == "condition")
        {
            for (kind, slot) in [
                ("path_pattern", &mut paths),
                ("http_request_method", &mut methods),
            ] {
                if let Some(values) = block(&c.body, kind)
                    .and_then(|k| attr(&k.body, "values"))
                    .map(|e| resolver.resolve(e))
                {
                    *slot = Some(values.as_array().into_iter().flatten().map(text).collect());
                }
            }
        }
        rules.push((address, paths.unwrap_or_else(|| vec!["*".into()]), methods));
    }
    let forwarded = |method: &str, path: &str| -> Option<String> {
        rules.iter().find_map(|(address, paths, methods)| {
            let path_ok = paths.iter().any(|p| glob(p.as_bytes(), path.as_bytes()));
            let method_ok = methods
                .as_ref()
                .is_none_or(|m| m.iter().any(|x| x == method));
            (path_ok && method_ok).then(|| address.clone())
        })
    };

    let mut routes = master_routes();
    // Served outside the router (common::http): liveness is public, metrics are not.
    routes.push(("GET".into(), "/health".into(), "client".into()));
    routes.push(("GET".into(), "/metrics".into(), "operator".into()));
    let mut problems = Problems::default();
    for (method, path, module) in routes {
        let public = module == "client" || path == "/openapi.json";
        match (public, forwarded(&method, &path)) {
            (true, None) => problems.add(
                "deploy/terraform/alb.tf",
                "aws_lb_listener_rule",
                format!("no rule forwards the client route {method} {path}"),
            ),
            (false, Some(rule)) => problems.add(
                "deploy/terraform/alb.tf",
                &rule,
                format!(
                    "forwards {method} {path} ({module} route) to the internet: workers and \
                     operators reach the master inside the VPC"
                ),
            ),
            _ => {}
        }
    }
    problems.assert_none("the public ALB's routes");
}

#[test]
fn ecs_exec_is_either_off_or_able_to_work() {
    // Half-configured ECS Exec fails only when an operator needs it: the cluster's
    // settings alone open no session.
    let files = files();
    let mut problems = Problems::default();
    let configured: Vec<String> = resources(&files, "aws_ecs_cluster")
        .into_iter()
        .filter(|(_, _, b)| {
            block(&b.body, "configuration")
                .and_then(|c| block(&c.body, "execute_command_configuration"))
                .is_some()
        })
        .map(|(_, address, _)| address)
        .collect();
    let enabled: Vec<String> = resources(&files, "aws_ecs_service")
        .into_iter()
        .filter(|(_, _, b)| {
            attr(&b.body, "enable_execute_command").is_some_and(|e| source(e) == "true")
        })
        .map(|(_, address, _)| address)
        .collect();
    if configured.is_empty() && enabled.is_empty() {
        return;
    }
    for (file, address, _) in resources(&files, "aws_ecs_service") {
        if !enabled.contains(&address) {
            problems.add(
                file,
                &address,
                format!(
                    "ECS Exec is configured ({configured:?}) but this service does not enable it"
                ),
            );
        }
    }
    for d in definitions(&files) {
        if d.json.get("readonlyRootFilesystem") == Some(&Value::Bool(true)) {
            problems.add(
                &d.file,
                &d.who,
                "ECS Exec's agent cannot run on a read-only root filesystem",
            );
        }
    }
    let grants_channels = files.iter().any(|f| {
        hcl::to_string(&f.body).is_ok_and(|t| t.contains("ssmmessages:CreateControlChannel"))
    });
    if !grants_channels {
        problems.add(
            DIR,
            "task roles",
            "ECS Exec needs ssmmessages:*Channel permissions on the task role",
        );
    }
    problems.assert_none("ECS Exec: configure it completely, or remove it");
}

#[test]
fn the_ecs_containers_turn_on_what_production_relies_on() {
    // Names alone pass with these dropped, and each would fail quietly: plain TCP to a TLS
    // Redis never connects, no EMF leaves autoscaling and alarms without data, no client
    // credentials or one half of a shared token turns authentication off or breaks it.
    let files = files();
    let resolver = Resolver::new(&files);
    let containers: Vec<Container> = definitions(&files).iter().map(container).collect();
    let mut problems = Problems::default();
    let tls = resources(&files, "aws_elasticache_replication_group")
        .iter()
        .any(|(_, _, b)| {
            attr(&b.body, "transit_encryption_enabled").map(|e| resolver.resolve(e))
                == Some(Value::Bool(true))
        });
    let has = |c: &Container, var: &str| c.env.contains_key(var) || c.secrets.contains(var);
    let of = |service: &'static str| containers.iter().filter(move |c| c.service == service);
    for c in &containers {
        if tls
            && c.env.contains_key("REDIS_HOST")
            && c.env.get("REDIS_TLS").map(String::as_str) != Some("true")
        {
            problems.add(
                &c.file,
                &c.who,
                "ElastiCache requires TLS: set REDIS_TLS=true",
            );
        }
    }
    for c in of("master") {
        if c.env.get("METRICS_EMF").map(String::as_str) != Some("true") {
            problems.add(
                &c.file,
                &c.who,
                "METRICS_EMF=true: autoscaling and the alarms read the master's EMF metrics",
            );
        }
        if !["API_KEYS", "JWT_SECRET", "JWT_PUBLIC_KEY_FILE"]
            .iter()
            .any(|v| has(c, v))
        {
            problems.add(
                &c.file,
                &c.who,
                "no client credentials (API_KEYS or a JWT setting)",
            );
        }
    }
    // Shared tokens: both ends, or requests are refused (one end) or unauthenticated.
    for (token, ends) in [
        ("WORKER_TOKEN", ["master", "worker"]),
        ("GATEWAY_TOKEN", ["worker", "llm-gateway"]),
    ] {
        for service in ends {
            for c in of(service) {
                if !c.secrets.contains(token) {
                    problems.add(
                        &c.file,
                        &c.who,
                        format!("{token} must come from Secrets Manager on both {ends:?}"),
                    );
                }
            }
        }
    }
    problems.assert_none("what the ECS containers must turn on");
}

/// A worker service under target tracking, one tick a minute: the load, the queue and the
/// task count, scaled as Application Auto Scaling does (desired = ceil(tasks × metric ÷
/// target), out after a 1-minute cooldown, in after 5). Steps take one minute.
struct Simulation {
    max_concurrency: f64,
    min: u32,
    max: u32,
}

impl Simulation {
    /// Task counts minute by minute for `arrivals` (steps a minute), with `metric(queued,
    /// in_flight, tasks)` as the scaling metric and `target` its target.
    fn run(
        &self,
        arrivals: &[f64],
        target: f64,
        metric: impl Fn(f64, f64, f64) -> f64,
    ) -> Vec<u32> {
        let (mut tasks, mut queued) = (self.min, 0.0_f64);
        let (mut since_out, mut since_in) = (u32::MAX, u32::MAX);
        let mut counts = Vec::new();
        for &arriving in arrivals {
            let capacity = f64::from(tasks) * self.max_concurrency;
            let in_flight = (queued + arriving).min(capacity);
            queued = queued + arriving - in_flight;
            let value = metric(queued, in_flight, f64::from(tasks));
            let desired =
                ((f64::from(tasks) * value / target).ceil() as u32).clamp(self.min, self.max);
            since_out = since_out.saturating_add(1);
            since_in = since_in.saturating_add(1);
            if desired > tasks && since_out >= 1 {
                tasks = desired;
                since_out = 0;
                since_in = 0;
            } else if desired < tasks && since_in >= 5 && since_out >= 5 {
                tasks = desired;
                since_in = 0;
            }
            counts.push(tasks);
        }
        counts
    }
}

/// How often the task count changes direction (out then in, or in then out).
fn reversals(counts: &[u32]) -> usize {
    let steps: Vec<i64> = counts
        .windows(2)
        .map(|w| i64::from(w[1]) - i64::from(w[0]))
        .filter(|d| *d != 0)
        .collect();
    steps
        .windows(2)
        .filter(|w| w[0].signum() != w[1].signum())
        .count()
}

#[test]
fn worker_autoscaling_counts_in_flight_steps_and_does_not_flap() {
    let files = files();
    let policies = resources(&files, "aws_appautoscaling_policy");
    let (_, _, policy) = policies
        .iter()
        .find(|(_, a, _)| a.ends_with(".worker_backlog"))
        .expect("autoscaling.tf has the worker_backlog policy");
    let config = block(&policy.body, "target_tracking_scaling_policy_configuration").unwrap();
    let target = attr(&config.body, "target_value")
        .map(source)
        .unwrap_or_default();
    assert_eq!(
        target, "each.value.max_concurrency",
        "the worker target must be MAX_CONCURRENCY (a full task)"
    );
    let spec = block(&config.body, "customized_metric_specification").unwrap();
    // id → metric name, and the expression that returns data.
    let mut names = BTreeMap::new();
    let mut expression = String::new();
    for m in spec
        .body
        .blocks()
        .filter(|b| b.identifier.as_str() == "metrics")
    {
        let id = attr(&m.body, "id").map(|e| text(&Resolver::new(&files).resolve(e)));
        if let Some(e) = attr(&m.body, "expression") {
            expression = text(&Resolver::new(&files).resolve(e));
        }
        let name = block(&m.body, "metric_stat")
            .and_then(|s| block(&s.body, "metric"))
            .and_then(|x| attr(&x.body, "metric_name"))
            .map(|e| text(&Resolver::new(&files).resolve(e)));
        if let (Some(id), Some(name)) = (id, name) {
            names.insert(id, name);
        }
    }
    // The expression, as `(a + b) / c` over metric names: the numerator must be the
    // backlog (QueueDepth and InFlight), the denominator the running tasks.
    let (numerator, denominator) = expression
        .split_once('/')
        .unwrap_or_else(|| panic!("backlog per worker is `{expression}`, not a ratio"));
    let summed: BTreeSet<&str> = numerator
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split('+')
        .filter_map(|id| names.get(id.trim()).map(String::as_str))
        .collect();
    assert_eq!(
        names.get(denominator.trim()).map(String::as_str),
        Some("RunningTaskCount"),
        "`{expression}` must divide by the running tasks"
    );
    assert!(
        summed.contains("QueueDepth") && summed.contains("InFlight"),
        "`{expression}` sums {summed:?}: the backlog is QueueDepth + InFlight (saturated \
         workers with an empty queue would otherwise read 0 and scale in)"
    );

    let sim = Simulation {
        max_concurrency: 8.0,
        min: 1,
        max: 4,
    };
    let policy = |q: f64, f: f64, tasks: f64| (q + f) / tasks;
    let queue_only = |q: f64, _f: f64, tasks: f64| q / tasks;
    // Three hours at 20 steps a minute: 2.5 tasks' worth, so the queue stays empty at 3.
    let steady = vec![20.0; 180];
    let ours = sim.run(&steady, 8.0, policy);
    let before = sim.run(&steady, 8.0, queue_only);
    assert_eq!(
        reversals(&ours[10..]),
        0,
        "the policy flaps under steady load: {ours:?}"
    );
    assert!(
        ours[10..].iter().all(|&n| n == 3),
        "steady load needs 3 tasks: {ours:?}"
    );
    assert!(
        reversals(&before[10..]) >= 4,
        "the simulation should show the queue-only metric flapping: {before:?}"
    );
    // A burst and its end: out within minutes, back in once the load is gone.
    let burst: Vec<f64> = [vec![4.0; 30], vec![30.0; 60], vec![4.0; 60]].concat();
    let counts = sim.run(&burst, 8.0, policy);
    assert_eq!(
        counts[35], 4,
        "a 30 steps/min burst needs 4 tasks: {counts:?}"
    );
    assert_eq!(
        *counts.last().unwrap(),
        1,
        "back to 1 task after the burst: {counts:?}"
    );
    assert!(
        reversals(&counts) <= 1,
        "one way out, one way back: {counts:?}"
    );
}

/// The containers of one worker task, by container name, for `worker_groups` set to
/// `groups` (HCL).
fn worker_task(files: &[TfFile], groups: &str, group: &str) -> BTreeMap<String, Value> {
    let resolver = Resolver::bare(files).with_var("worker_groups", groups);
    let task = format!("aws_ecs_task_definition.worker[\"{group}\"]");
    definitions_with(files, &resolver)
        .into_iter()
        .filter(|d| d.task == task)
        .map(|d| (d.json["name"].as_str().unwrap().to_string(), d.json))
        .collect()
}

/// A task definition attribute (`cpu`, `memory`) of one worker group's task.
fn worker_task_size(files: &[TfFile], groups: &str, group: &str, key: &str) -> Value {
    let resolver = Resolver::bare(files).with_var("worker_groups", groups);
    let (_, address, block) = resources(files, "aws_ecs_task_definition")
        .into_iter()
        .find(|(_, a, _)| a == "aws_ecs_task_definition.worker")
        .expect("ecs.tf has the worker task definition");
    let (_, scope) = instances(&resolver, &address, &block.body)
        .into_iter()
        .find(|(task, _)| task.ends_with(&format!("[\"{group}\"]")))
        .unwrap_or_else(|| panic!("no worker task for {group}"));
    resolver.eval(attr(&block.body, key).unwrap(), &scope, 0)
}

#[test]
fn a_worker_group_with_an_agent_runs_it_beside_the_worker() {
    // What the sidecar pattern rests on: the worker reaches its agent on 127.0.0.1 at the
    // configured port and paths, waits for it to be healthy, and the agent reaches the
    // gateway with the workers' own token; a group without an agent is left as it was.
    let files = files();
    let groups = r#"{
      plan = { cpu = 256, memory = 512, min_count = 1, max_count = 4, max_concurrency = 8 }
      critique = {
        cpu = 256, memory = 512, min_count = 1, max_count = 2, max_concurrency = 4
        agent = {
          image       = "123456789012.dkr.ecr.us-west-2.amazonaws.com/team/ag2-agent:3f2a9c1b7d4e"
          port        = 9100
          path        = "/v1/step"
          health_path = "/healthz"
          cpu         = 768
          memory      = 1536
          environment = { AG2_MODEL = "critic" }
          secrets     = { SEARCH_API_KEY = "arn:aws:secretsmanager:us-west-2:123456789012:secret:search-AbCdEf" }
        }
      }
    }"#;
    let task = worker_task(&files, groups, "critique");
    assert_eq!(
        task.keys().collect::<Vec<_>>(),
        ["agent", "worker"],
        "a group with an agent runs two containers"
    );
    let (worker, agent) = (&task["worker"], &task[AGENT_CONTAINER]);
    let env = |c: &Value| named(c.get("environment"), "value");
    let secrets = |c: &Value| named(c.get("secrets"), "valueFrom");
    let (worker_env, agent_env) = (env(worker), env(agent));

    // The worker: the names the worker's http agent reads (AGENT_URL and AGENT_HEALTH_URL
    // are held against worker::Config by the check of every container, once it reads them).
    for (name, value) in [
        ("AGENT_KIND", "http"),
        ("AGENT_URL", "http://127.0.0.1:9100/v1/step"),
        ("AGENT_HEALTH_URL", "http://127.0.0.1:9100/healthz"),
    ] {
        assert_eq!(
            worker_env.get(name).map(String::as_str),
            Some(value),
            "worker env: {worker_env:?}"
        );
    }
    assert_eq!(
        worker["dependsOn"],
        serde_json::json!([{ "containerName": "agent", "condition": "HEALTHY" }]),
        "the worker starts once its agent is healthy, and stops before it"
    );

    // The agent: essential, reachable only inside the task, on the port the worker calls.
    assert_eq!(
        agent["essential"],
        Value::Bool(true),
        "the agent is essential"
    );
    assert!(
        agent.get("portMappings").is_none(),
        "the agent maps no ports: only the worker, in its task, reaches it"
    );
    assert_eq!(agent_env.get("PORT").map(String::as_str), Some("9100"));
    assert_eq!(
        agent_env.get("AG2_MODEL").map(String::as_str),
        Some("critic")
    );
    let gateway = worker_env
        .get("LLM_GATEWAY_URL")
        .expect("workers reach the gateway");
    assert_eq!(
        agent_env.get("OPENAI_BASE_URL"),
        Some(&format!("{gateway}/v1")),
        "the agent calls the gateway the workers call, at its OpenAI-compatible /v1"
    );
    let (worker_secrets, agent_secrets) = (secrets(worker), secrets(agent));
    assert_eq!(
        agent_secrets.get("OPENAI_API_KEY"),
        worker_secrets.get("GATEWAY_TOKEN"),
        "the agent's OPENAI_API_KEY is the workers' GATEWAY_TOKEN secret"
    );
    assert_eq!(
        agent_secrets.get("SEARCH_API_KEY").map(String::as_str),
        Some("arn:aws:secretsmanager:us-west-2:123456789012:secret:search-AbCdEf")
    );
    let health = agent["healthCheck"]["command"].to_string();
    assert!(
        health.contains("http://127.0.0.1:9100/healthz"),
        "the agent's health check asks its health_path: {health}"
    );
    assert_eq!(
        agent["logConfiguration"]["options"]["awslogs-group"],
        worker["logConfiguration"]["options"]["awslogs-group"],
        "the agent logs to its group's log group"
    );
    assert_eq!(
        agent["logConfiguration"]["options"]["awslogs-stream-prefix"],
        "agent"
    );
    assert_eq!(
        (agent["cpu"].as_u64(), agent["memory"].as_u64()),
        (Some(768), Some(1536))
    );
    // Fargate sizes the task: the worker's share plus the agent's.
    assert_eq!(worker_task_size(&files, groups, "critique", "cpu"), 1024);
    assert_eq!(worker_task_size(&files, groups, "critique", "memory"), 2048);

    // A group without an agent: one container, the llm agent, no dependency, as before.
    let plain = worker_task(&files, groups, "plan");
    assert_eq!(plain.keys().collect::<Vec<_>>(), ["worker"]);
    let plain_env = env(&plain["worker"]);
    assert_eq!(plain_env.get("AGENT_KIND").map(String::as_str), Some("llm"));
    assert!(!plain_env.contains_key("AGENT_URL"), "{plain_env:?}");
    assert!(
        plain["worker"].get("dependsOn").is_none(),
        "no dependsOn (not even null) without an agent: {}",
        plain["worker"]
    );
    assert_eq!(worker_task_size(&files, groups, "plan", "cpu"), 256);
}

#[test]
fn an_agent_left_at_its_defaults_listens_on_9000_and_serves_step() {
    // The defaults are what examples/ag2-agent serves (PORT 9000, POST /step, GET /health).
    let files = files();
    let groups = format!("{{ critique = {AGENT_GROUP} }}");
    let task = worker_task(&files, &groups, "critique");
    let worker_env = named(task["worker"].get("environment"), "value");
    let agent_env = named(task[AGENT_CONTAINER].get("environment"), "value");
    assert_eq!(
        worker_env.get("AGENT_URL").map(String::as_str),
        Some("http://127.0.0.1:9000/step")
    );
    assert_eq!(
        worker_env.get("AGENT_HEALTH_URL").map(String::as_str),
        Some("http://127.0.0.1:9000/health")
    );
    assert_eq!(agent_env.get("PORT").map(String::as_str), Some("9000"));
    assert_eq!(worker_task_size(&files, &groups, "critique", "cpu"), 512);
    assert_eq!(
        worker_task_size(&files, &groups, "critique", "memory"),
        1024
    );
}

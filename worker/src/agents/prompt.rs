//! Prompt templates for the `llm` agent: `{{ name }}` placeholders filled from the step.
//!
//! Placeholders:
//! - `{{input}}`: the step's input. In a chain, the previous step's output; for a root step,
//!   the task input; for a map instance, its element; for a step that needs several steps,
//!   their outputs, each under a `[step N: id]` line as in `{{previous}}`;
//! - `{{task_input}}`: the task's original input;
//! - `{{previous}}`: the outputs of the steps this one needs, in `needs` order, each under a
//!   `[step N: capability]` line (`[step N: id (capability)]` when the id is not the
//!   capability); a skipped need reads `(skipped)`, one that failed under `allow_failure`
//!   `(failed: message)`;
//! - `{{needs.ID}}`: the output of the needed step with id `ID` (empty when this step does
//!   not need it, or it was skipped);
//! - `{{step_id}}`: the step's id; `{{element_index}}`: a map instance's element index
//!   (empty otherwise);
//! - `{{capability}}`, `{{pipeline}}`, `{{task_id}}`, `{{step}}`, `{{attempt}}`,
//!   `{{total_steps}}`.
//!
//! A JSON string is inserted as it is; an object with a string `text` field (what the `llm`
//! agent outputs) as that text; a failed map instance's `{"error": {...}}` as
//! `(failed: message)`; an array of such values (a map step's output) as a numbered list,
//! `[1] …`, one element after the other; anything else as pretty-printed JSON. An unknown
//! name or an unclosed `{{` is an error: at start-up for configured templates, and a
//! permanent step failure if one ever reaches a step.

use common::wire::{PriorOutput, StepStatus, WorkRequest};
use serde_json::{Value, json};

/// The placeholders a template may use (and `needs.ID` for any step id).
pub const PLACEHOLDERS: &[&str] = &[
    "input",
    "task_input",
    "previous",
    "needs.ID",
    "step_id",
    "element_index",
    "capability",
    "pipeline",
    "task_id",
    "step",
    "attempt",
    "total_steps",
];

/// The prefix of a placeholder naming a needed step's output.
const NEEDS_PREFIX: &str = "needs.";

/// The name of the JSON schema the `llm` agent asks a `plan` step's answer to match (see
/// [`default_schema`]). The llm-gateway's mock provider answers a schema of this name with
/// sub-queries derived from the task, so the default pipeline fans out without a model.
pub const PLAN_SCHEMA: &str = "ensemble_plan";

/// The built-in template for a capability, and a generic one for any other.
///
/// The `plan` template asks for a JSON object `{"text": plan, "queries": [...]}`: the
/// default pipeline maps `retrieve` over `plan.queries`. It ends with the task, after a
/// `Task:` line.
pub fn default_template(capability: &str) -> &'static str {
    match capability {
        "plan" => {
            "You are the planning step of a multi-agent pipeline.\n\n\
             Break the task below into 2 to 4 focused research questions that together \
             cover it, and write a short numbered plan: what must be found out and how the \
             result should be checked.\n\n\
             Answer with a JSON object only: \
             {\"text\": \"<the numbered plan>\", \"queries\": [\"<question>\", ...]}\n\n\
             Task:\n{{task_input}}"
        }
        "retrieve" => {
            "You are the research step of a multi-agent pipeline.\n\n\
             Task:\n{{task_input}}\n\n\
             What to research now:\n{{input}}\n\n\
             Gather the facts, figures and sources it calls for. \
             List each finding on its own line, with where it comes from."
        }
        "evaluate" => {
            "You are the review step of a multi-agent pipeline.\n\n\
             Task:\n{{task_input}}\n\n\
             Material to review:\n{{input}}\n\n\
             Check it for errors, gaps and unsupported claims. \
             List the problems, then say what the final answer must include."
        }
        "finalize" => {
            "You are the final step of a multi-agent pipeline.\n\n\
             Task:\n{{task_input}}\n\n\
             Work so far:\n{{previous}}\n\n\
             Write the final answer to the task, complete and self-contained, \
             taking the review into account."
        }
        _ => {
            "You are the `{{capability}}` step of a multi-agent pipeline.\n\n\
             Task:\n{{task_input}}\n\n\
             Input:\n{{input}}\n\n\
             Do your part of the task and answer with the result only."
        }
    }
}

/// The JSON schema (name, schema) a built-in template's answer must match, when it asks
/// for JSON: `plan`'s `{"text": string, "queries": [string, ...]}`. The `llm` agent sends it
/// as `response_format` only with the built-in template (a configured template says itself
/// what it wants).
pub fn default_schema(capability: &str) -> Option<(&'static str, Value)> {
    match capability {
        "plan" => Some((
            PLAN_SCHEMA,
            json!({
                "type": "object",
                "properties": {
                    "text": {"type": "string", "description": "the numbered plan"},
                    "queries": {
                        "type": "array",
                        "items": {"type": "string"},
                        "minItems": 1,
                        "maxItems": 8,
                        "description": "focused research questions that together cover the task"
                    }
                },
                "required": ["text", "queries"],
                "additionalProperties": false
            }),
        )),
        _ => None,
    }
}

/// Checks a template without a step: every placeholder is known and closed.
pub fn check(template: &str) -> Result<(), String> {
    parse(template).map(|_| ())
}

/// Fills a template from a step.
pub fn render(template: &str, step: &WorkRequest) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 256);
    for piece in parse(template)? {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Var(name) => out.push_str(&value_of(name, step)),
        }
    }
    Ok(out)
}

enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

/// Whether `name` is a placeholder: one of [`PLACEHOLDERS`], or `needs.` and a step id.
fn known(name: &str) -> bool {
    match name.strip_prefix(NEEDS_PREFIX) {
        Some(id) => {
            !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        }
        None => PLACEHOLDERS.contains(&name),
    }
}

fn parse(template: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        pieces.push(Piece::Text(&rest[..open]));
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| {
            let at = template.len() - rest.len() + open;
            format!("the `{{{{` at byte {at} is never closed with `}}}}`")
        })?;
        let name = after[..close].trim();
        if !known(name) {
            return Err(format!(
                "unknown placeholder `{{{{{name}}}}}`; known: {} (ID: a step id)",
                PLACEHOLDERS.join(", ")
            ));
        }
        pieces.push(Piece::Var(name));
        rest = &after[close + 2..];
    }
    pieces.push(Piece::Text(rest));
    Ok(pieces)
}

fn value_of(name: &str, step: &WorkRequest) -> String {
    if let Some(id) = name.strip_prefix(NEEDS_PREFIX) {
        return step
            .context
            .previous
            .iter()
            .find(|p| p.id == id)
            .map(|p| show(&p.output))
            .unwrap_or_default();
    }
    match name {
        "input" if joins(step) => previous(&step.context.previous),
        "input" => show(&step.input),
        "task_input" => show(&step.context.task_input),
        "previous" => previous(&step.context.previous),
        "step_id" => step.context.step_id.clone().unwrap_or_default(),
        "element_index" => step
            .context
            .element_index
            .map(|i| i.to_string())
            .unwrap_or_default(),
        "capability" => step.capability.to_string(),
        "pipeline" => step.context.pipeline.clone().unwrap_or_default(),
        "task_id" => step.task_id.to_string(),
        "step" => step.step.to_string(),
        "attempt" => step.attempt.to_string(),
        "total_steps" => step.context.total_steps.to_string(),
        _ => String::new(),
    }
}

/// Whether the step's input is its several needs' outputs by id (a join: an object whose
/// keys are exactly the needs' ids), which reads better as `{{previous}}` does than as one
/// JSON object.
fn joins(step: &WorkRequest) -> bool {
    let needs = &step.context.previous;
    match &step.input {
        Value::Object(map) if needs.len() > 1 && step.context.element_index.is_none() => {
            map.len() == needs.len()
                && needs
                    .iter()
                    .all(|p| !p.id.is_empty() && map.contains_key(&p.id))
        }
        _ => false,
    }
}

/// The needed steps' outcomes, each under a `[step N: …]` line.
fn previous(needs: &[PriorOutput]) -> String {
    needs
        .iter()
        .map(|p| format!("{}\n{}", heading(p), outcome(p)))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// `[step N: capability]`, or `[step N: id (capability)]` when the id says more.
fn heading(p: &PriorOutput) -> String {
    let what = p.capability.as_ref().map_or("wait", |c| c.as_str());
    if p.id.is_empty() || p.id == what {
        format!("[step {}: {what}]", p.step)
    } else {
        format!("[step {}: {} ({what})]", p.step, p.id)
    }
}

/// A need's output, or what became of it.
fn outcome(p: &PriorOutput) -> String {
    match p.status {
        StepStatus::Skipped => "(skipped)".to_string(),
        StepStatus::Failed => format!(
            "(failed: {})",
            p.error
                .as_ref()
                .map_or("no error given", |e| e.message.as_str())
        ),
        _ => show(&p.output),
    }
}

/// Whether a value reads as text in a prompt: a string, an object with a string `text`, or
/// a failed map instance's `{"error": {...}}`.
fn textual(value: &Value) -> bool {
    match value {
        Value::String(_) => true,
        Value::Object(map) => {
            map.get("text").is_some_and(Value::is_string) || failed_element(value).is_some()
        }
        _ => false,
    }
}

/// A failed map instance's entry in its map step's output: `{"error": {"message": …}}`.
fn failed_element(value: &Value) -> Option<&str> {
    let map = value.as_object()?;
    if map.len() != 1 {
        return None;
    }
    map.get("error")?.get("message")?.as_str()
}

/// How a JSON value reads inside a prompt.
fn show(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Object(map) => match (map.get("text"), failed_element(value)) {
            (Some(Value::String(text)), _) => text.clone(),
            (_, Some(message)) => format!("(failed: {message})"),
            _ => serde_json::to_string_pretty(value).unwrap_or_default(),
        },
        Value::Array(items) if !items.is_empty() && items.iter().all(textual) => items
            .iter()
            .enumerate()
            .map(|(i, item)| format!("[{}] {}", i + 1, show(item)))
            .collect::<Vec<_>>()
            .join("\n\n"),
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use common::wire::{Capability, PriorOutput, StepContext, StepError, TaskId};
    use serde_json::json;

    use super::*;

    fn prior(step: u32, id: &str, capability: &str, output: Value) -> PriorOutput {
        PriorOutput {
            step,
            id: id.into(),
            capability: Some(Capability::new(capability).unwrap()),
            status: StepStatus::Succeeded,
            output,
            error: None,
        }
    }

    /// A chain's step: `finalize` after `plan` and `evaluate` (as an old master sends it:
    /// no ids).
    fn step() -> WorkRequest {
        WorkRequest {
            task_id: TaskId::new("t-1").unwrap(),
            step: 2,
            attempt: 1,
            capability: Capability::new("finalize").unwrap(),
            input: json!({"text": "looks fine", "model": "m", "usage": {}}),
            context: StepContext {
                task_input: json!("Why is the sky blue?"),
                previous: vec![
                    prior(0, "", "plan", json!({"text": "1. look up"})),
                    prior(1, "", "evaluate", json!({"score": 3})),
                ],
                pipeline: Some("research".into()),
                total_steps: 3,
                step_id: None,
                element_index: None,
            },
            deadline_ms: 0,
            worker_id: None,
            request_id: None,
        }
    }

    /// A join: `report` needs `web` (a retrieve step) and `review`, which was skipped, and
    /// `extra`, which failed under `allow_failure`; its input is their outputs by id.
    fn join() -> WorkRequest {
        let mut review = prior(2, "review", "evaluate", Value::Null);
        review.status = StepStatus::Skipped;
        let mut extra = prior(3, "extra", "retrieve", Value::Null);
        extra.status = StepStatus::Failed;
        extra.error = Some(StepError::permanent("upstream", "gateway said no"));
        let web = prior(1, "web", "retrieve", json!({"text": "found it"}));
        WorkRequest {
            capability: Capability::new("report").unwrap(),
            input: json!({"web": {"text": "found it"}, "review": null, "extra": null}),
            context: StepContext {
                previous: vec![web, review, extra],
                step_id: Some("report".into()),
                ..step().context
            },
            ..step()
        }
    }

    #[test]
    fn placeholders_are_filled_from_the_step() {
        let out = render(
            "{{ task_input }}|{{input}}|{{capability}}|{{pipeline}}|{{step}}/{{total_steps}}",
            &step(),
        )
        .unwrap();
        assert_eq!(out, "Why is the sky blue?|looks fine|finalize|research|2/3");
        let previous = render("{{previous}}", &step()).unwrap();
        assert!(
            previous.contains("[step 0: plan]\n1. look up"),
            "{previous}"
        );
        assert!(
            previous.contains("[step 1: evaluate]\n{\n  \"score\": 3\n}"),
            "{previous}"
        );
        // Without ids and a map, the new placeholders are empty.
        assert_eq!(
            render("<{{step_id}}|{{element_index}}>", &step()).unwrap(),
            "<|>"
        );
    }

    #[test]
    fn a_join_reads_its_needs_by_id() {
        let step = join();
        let previous = render("{{previous}}", &step).unwrap();
        assert_eq!(
            previous,
            "[step 1: web (retrieve)]\nfound it\n\n\
             [step 2: review (evaluate)]\n(skipped)\n\n\
             [step 3: extra (retrieve)]\n(failed: gateway said no)"
        );
        // The input (an object by need id) reads the same way, not as JSON.
        assert_eq!(render("{{input}}", &step).unwrap(), previous);
        assert_eq!(
            render(
                "{{needs.web}}|{{ needs.review }}|{{needs.nope}}|{{step_id}}",
                &step
            )
            .unwrap(),
            "found it|||report"
        );
    }

    #[test]
    fn a_map_instance_reads_its_element_and_a_map_output_is_a_numbered_list() {
        let mut instance = step();
        instance.capability = Capability::new("retrieve").unwrap();
        instance.input = json!("how does scattering depend on wavelength?");
        instance.context.previous = vec![prior(
            0,
            "plan",
            "plan",
            json!({"text": "1. scattering", "queries": ["a", "b"]}),
        )];
        instance.context.step_id = Some("retrieve[1]".into());
        instance.context.element_index = Some(1);
        assert_eq!(
            render("{{input}}|{{step_id}}|{{element_index}}", &instance).unwrap(),
            "how does scattering depend on wavelength?|retrieve[1]|1"
        );
        let mut after = step();
        after.input = json!([
            {"text": "blue scatters more", "model": "m"},
            "plain",
            {"error": {"message": "timed out", "retryable": true}}
        ]);
        assert_eq!(
            render("{{input}}", &after).unwrap(),
            "[1] blue scatters more\n\n[2] plain\n\n[3] (failed: timed out)"
        );
        // Arrays of anything else stay JSON.
        after.input = json!([1, 2]);
        assert_eq!(render("{{input}}", &after).unwrap(), "[\n  1,\n  2\n]");
    }

    #[test]
    fn bad_templates_are_errors() {
        assert!(check("no placeholders at all").is_ok());
        assert!(check("{{needs.plan}} {{ needs.web-2 }} {{needs.a_b}}").is_ok());
        let err = check("hello {{ who }}").unwrap_err();
        assert!(err.contains("unknown placeholder `{{who}}`"), "{err}");
        for bad in ["{{needs.}}", "{{needs.ID}}", "{{needs.a b}}", "{{needs}}"] {
            assert!(check(bad).is_err(), "{bad}");
        }
        let err = check("hello {{ input").unwrap_err();
        assert!(err.contains("never closed"), "{err}");
    }

    #[test]
    fn built_in_templates_are_valid() {
        for capability in ["plan", "retrieve", "evaluate", "finalize", "other"] {
            check(default_template(capability)).unwrap();
            assert!(
                !render(default_template(capability), &step())
                    .unwrap()
                    .is_empty()
            );
        }
    }

    #[test]
    fn the_plan_template_asks_for_queries_and_ends_with_the_task() {
        let mut plan = step();
        plan.capability = Capability::new("plan").unwrap();
        let prompt = render(default_template("plan"), &plan).unwrap();
        assert!(prompt.contains("\"queries\""), "{prompt}");
        assert!(
            prompt.ends_with("\nTask:\nWhy is the sky blue?"),
            "{prompt}"
        );
        let (name, schema) = default_schema("plan").unwrap();
        assert_eq!(name, PLAN_SCHEMA);
        assert_eq!(schema["properties"]["queries"]["type"], "array");
        assert!(default_schema("retrieve").is_none());
    }
}

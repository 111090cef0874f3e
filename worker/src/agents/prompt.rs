//! Prompt templates for the `llm` agent: `{{ name }}` placeholders filled from the step.
//!
//! Placeholders:
//! - `{{input}}`: the step's input (the previous step's output, or the task input);
//! - `{{task_input}}`: the task's original input;
//! - `{{previous}}`: the outputs of the steps this one needs (in a chain, the step before),
//!   each under a `[step N: capability]` line;
//! - `{{capability}}`, `{{pipeline}}`, `{{task_id}}`, `{{step}}`, `{{attempt}}`,
//!   `{{total_steps}}`.
//!
//! A JSON string is inserted as it is; an object with a string `text` field (what the `llm`
//! agent outputs) as that text; anything else as pretty-printed JSON. An unknown name or an
//! unclosed `{{` is an error: at start-up for configured templates, and a permanent step
//! failure if one ever reaches a step.

use common::wire::WorkRequest;
use serde_json::Value;

/// The placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "input",
    "task_input",
    "previous",
    "capability",
    "pipeline",
    "task_id",
    "step",
    "attempt",
    "total_steps",
];

/// The built-in template for a capability, and a generic one for any other.
pub fn default_template(capability: &str) -> &'static str {
    match capability {
        "plan" => {
            "You are the planning step of a multi-agent pipeline.\n\n\
             Task:\n{{task_input}}\n\n\
             Write a short numbered plan of the steps needed to complete the task. \
             Name what information must be gathered and how the result should be checked."
        }
        "retrieve" => {
            "You are the research step of a multi-agent pipeline.\n\n\
             Task:\n{{task_input}}\n\n\
             Plan so far:\n{{input}}\n\n\
             Gather the facts, figures and sources the plan calls for. \
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
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "unknown placeholder `{{{{{name}}}}}`; known: {}",
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
    match name {
        "input" => show(&step.input),
        "task_input" => show(&step.context.task_input),
        "previous" => step
            .context
            .previous
            .iter()
            .map(|p| format!("[step {}: {}]\n{}", p.step, p.capability, show(&p.output)))
            .collect::<Vec<_>>()
            .join("\n\n"),
        "capability" => step.capability.to_string(),
        "pipeline" => step.context.pipeline.clone().unwrap_or_default(),
        "task_id" => step.task_id.to_string(),
        "step" => step.step.to_string(),
        "attempt" => step.attempt.to_string(),
        "total_steps" => step.context.total_steps.to_string(),
        _ => String::new(),
    }
}

/// How a JSON value reads inside a prompt.
fn show(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Object(map) => match map.get("text") {
            Some(Value::String(text)) => text.clone(),
            _ => serde_json::to_string_pretty(value).unwrap_or_default(),
        },
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use common::wire::{Capability, PriorOutput, StepContext, TaskId};
    use serde_json::json;

    use super::*;

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
                    PriorOutput {
                        step: 0,
                        capability: Capability::new("plan").unwrap(),
                        output: json!({"text": "1. look up"}),
                    },
                    PriorOutput {
                        step: 1,
                        capability: Capability::new("evaluate").unwrap(),
                        output: json!({"score": 3}),
                    },
                ],
                pipeline: Some("research".into()),
                total_steps: 3,
            },
            deadline_ms: 0,
            worker_id: None,
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
    }

    #[test]
    fn bad_templates_are_errors() {
        assert!(check("no placeholders at all").is_ok());
        let err = check("hello {{ who }}").unwrap_err();
        assert!(err.contains("unknown placeholder `{{who}}`"), "{err}");
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
}

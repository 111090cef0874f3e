//! The mock provider: deterministic and offline. The reply derives from the prompt, so the
//! whole system runs and tests without keys; latency and failures can be injected, by
//! setting (`MOCK_LATENCY_MS`, `MOCK_FAIL_RATE`) or by a marker in the last user message:
//! `[mock:fail=503]` (any status) fails the call, `[mock:fail-mid-stream]` breaks a stream
//! after its first chunk.
//!
//! With `tools` (and `tool_choice` not `none`) and a user message last, it calls the named
//! tool, or the first one (every one with `[mock:parallel]` in the prompt), with arguments
//! built from the tool's schema and the prompt. After `tool` messages it answers text
//! quoting their results.
//!
//! A `response_format` `json_schema` named [`PLAN_SCHEMA`] (`ensemble_plan`: what the
//! worker's `llm` agent asks of a `plan` step with the built-in template) is answered with
//! a plan for the task: `{"text": numbered plan, "queries": [2 to 4 questions]}`. The task
//! is the text after the prompt's last `Task:` line (the built-in plan template ends with
//! it), or the whole prompt; a task that is JSON counts by its strings. How many questions
//! and which aspects they ask about follow from a hash of the task, so the same task always
//! gets the same plan and the default pipeline's `retrieve` really fans out.
//!
//! Embeddings are unit vectors seeded from a hash of each text: equal texts get equal
//! vectors, different texts different ones; `dimensions` is honoured (default
//! [`DEFAULT_DIMENSIONS`]).

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::{
    ChatRequest, Completion, EmbeddingRequest, Embeddings, ErrorKind, EventStream, FinishReason,
    Part, Provider, ProviderError, StreamEvent, ToolCall, ToolChoice, ToolSpec, TurnRole,
    estimate_tokens, normalize, schema,
};
use crate::config::ProviderKind;
use crate::openai::Usage;

/// The length of the mock's vectors when the caller asks for none.
pub const DEFAULT_DIMENSIONS: u32 = 256;

/// How many words of the prompt the reply quotes.
const QUOTED_WORDS: usize = 8;

/// The `json_schema` name the mock answers with a plan (`{"text", "queries"}`); the
/// worker's `llm` agent sends it for a `plan` step.
pub const PLAN_SCHEMA: &str = "ensemble_plan";

/// How many words of the task a plan's question quotes.
const TOPIC_WORDS: usize = 16;

/// What a plan's questions ask about the task, in turn from a hash-chosen start.
const ASPECTS: &[&str] = &[
    "background and key facts",
    "options and trade-offs",
    "risks and common mistakes",
    "costs and figures",
    "recent examples",
    "how to check the result",
];

/// The deterministic provider.
#[derive(Debug, Clone)]
pub struct MockProvider {
    /// Delay before answering: simulates a model's time to first token.
    latency: Duration,
    /// Share of calls that fail with a retryable `503`.
    fail_rate: f64,
}

impl MockProvider {
    /// A mock with the given latency and failure rate.
    pub fn new(latency: Duration, fail_rate: f64) -> Self {
        Self { latency, fail_rate }
    }

    /// Waits the configured latency, then fails when told to.
    async fn begin(&self, prompt: &str) -> Result<(), ProviderError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if let Some(status) = injected_status(prompt) {
            return Err(ProviderError::from_status(
                ProviderKind::Mock,
                status,
                format!("injected failure {status}"),
            ));
        }
        if self.fail_rate > 0.0 && rand::random::<f64>() < self.fail_rate {
            return Err(ProviderError::from_status(
                ProviderKind::Mock,
                503,
                "injected failure (MOCK_FAIL_RATE)",
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for MockProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Mock
    }

    async fn complete(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<Completion, ProviderError> {
        self.begin(request.last_user_text()).await?;
        Ok(reply(model, request))
    }

    async fn stream(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<EventStream, ProviderError> {
        self.begin(request.last_user_text()).await?;
        let break_mid_stream = request.last_user_text().contains("[mock:fail-mid-stream]");
        let completion = reply(model, request);
        let mut events: Vec<Result<StreamEvent, ProviderError>> = Vec::new();
        for (index, call) in (0u32..).zip(&completion.tool_calls) {
            events.push(Ok(StreamEvent::ToolCallStart {
                index,
                id: call.id.clone(),
                name: call.name.clone(),
            }));
            // Two fragments, as a real model streams arguments piecewise.
            let mut middle = call.arguments.len() / 2;
            while !call.arguments.is_char_boundary(middle) {
                middle -= 1;
            }
            let (head, tail) = call.arguments.split_at(middle);
            for fragment in [head, tail] {
                events.push(Ok(StreamEvent::ToolCallArguments {
                    index,
                    fragment: fragment.to_string(),
                }));
            }
        }
        for (i, piece) in completion.text.split_inclusive(' ').enumerate() {
            if i == 1 && break_mid_stream {
                events.push(Err(ProviderError::new(
                    ProviderKind::Mock,
                    ErrorKind::Unavailable,
                    "injected mid-stream failure",
                )));
                return Ok(futures::stream::iter(events).boxed());
            }
            events.push(Ok(StreamEvent::Delta(piece.to_string())));
        }
        events.push(Ok(StreamEvent::Finish(completion.finish)));
        events.push(Ok(StreamEvent::Usage(completion.usage)));
        Ok(futures::stream::iter(events).boxed())
    }

    async fn embed(
        &self,
        _model: &str,
        request: &EmbeddingRequest,
    ) -> Result<Embeddings, ProviderError> {
        // A marker in any input fails the call, as in a chat prompt.
        self.begin(&request.inputs.join("\n")).await?;
        let dimensions = request.dimensions.unwrap_or(DEFAULT_DIMENSIONS);
        Ok(Embeddings {
            vectors: request
                .inputs
                .iter()
                .map(|text| embedding(text, dimensions))
                .collect(),
            prompt_tokens: request
                .inputs
                .iter()
                .map(|t| estimate_tokens(t))
                .fold(0, u32::saturating_add),
        })
    }
}

/// The mock's vector for `text`: `dimensions` pseudo-random values (splitmix64 seeded with
/// the text's FNV-1a hash), scaled to unit length.
pub fn embedding(text: &str, dimensions: u32) -> Vec<f32> {
    let mut state = fnv1a_bytes(text.as_bytes());
    let mut vector: Vec<f32> = (0..dimensions)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // The top 24 bits as a value in [-1, 1).
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    normalize(&mut vector);
    vector
}

fn fnv1a_bytes(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `[mock:fail=503]` in the prompt.
fn injected_status(prompt: &str) -> Option<u16> {
    let start = prompt.find("[mock:fail=")? + "[mock:fail=".len();
    let end = start + prompt[start..].find(']')?;
    prompt[start..end]
        .trim()
        .parse()
        .ok()
        .filter(|s| (400..600).contains(s))
}

/// The deterministic reply to `request`: it quotes the start of the last user message and
/// carries a hash of the whole conversation, so different prompts get different replies.
pub fn reply(model: &str, request: &ChatRequest) -> Completion {
    let prompt = request.last_user_text();
    let reference = fnv1a(request);
    let quoted: Vec<&str> = prompt.split_whitespace().take(QUOTED_WORDS).collect();
    let words = prompt.split_whitespace().count();
    let input = request.system.as_deref().map_or(0, estimate_tokens)
        + request
            .turns
            .iter()
            .flat_map(|t| &t.parts)
            .map(|p| match p {
                Part::Text(text) => estimate_tokens(text),
                Part::ToolCall(call) => estimate_tokens(&call.arguments),
                Part::ToolResult(result) => estimate_tokens(&result.content),
            })
            .sum::<u32>();
    let results = request.trailing_tool_results();
    if results.is_empty() && !request.tools.is_empty() && request.tool_choice != ToolChoice::None {
        let chosen: Vec<&ToolSpec> = match &request.tool_choice {
            ToolChoice::Named(name) => request.tools.iter().filter(|t| &t.name == name).collect(),
            _ if prompt.contains("[mock:parallel]") && !request.single_tool_call => {
                request.tools.iter().collect()
            }
            _ => request.tools.iter().take(1).collect(),
        };
        let tool_calls: Vec<ToolCall> = chosen
            .into_iter()
            .enumerate()
            .map(|(i, tool)| {
                let arguments = tool
                    .parameters
                    .as_ref()
                    .map_or_else(|| serde_json::json!({}), |p| schema::example(p, prompt));
                ToolCall {
                    id: format!("call_mock_{reference:016x}_{i}"),
                    name: tool.name.clone(),
                    arguments: arguments.to_string(),
                }
            })
            .collect();
        let output = tool_calls
            .iter()
            .map(|c| estimate_tokens(&c.arguments))
            .sum();
        return Completion {
            text: String::new(),
            tool_calls,
            finish: FinishReason::ToolCalls,
            usage: Usage::new(input, output),
        };
    }
    let mut text = if let Some(named) = &request.json_schema {
        if named.name == PLAN_SCHEMA {
            plan(model, prompt, reference).to_string()
        } else {
            schema::example(&named.schema, prompt).to_string()
        }
    } else if !results.is_empty() {
        let quoted: Vec<String> = results
            .iter()
            .map(|r| format!("{} returned {}", r.name, r.content))
            .collect();
        format!(
            "Mock reply from {model} using the tool results: {} (ref {reference:016x}).",
            quoted.join("; ")
        )
    } else if request.json {
        serde_json::json!({
            "reply": format!("mock answer about: {}", quoted.join(" ")),
            "model": model,
            "ref": format!("{reference:016x}"),
            "prompt_words": words,
        })
        .to_string()
    } else {
        format!(
            "Mock reply from {model} to \"{}\" ({words} words, ref {reference:016x}).",
            quoted.join(" ")
        )
    };
    let mut finish = FinishReason::Stop;
    if let Some(cut) = request
        .stop
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min()
    {
        text.truncate(cut);
    }
    if let Some(max) = request.max_tokens.and_then(|m| usize::try_from(m).ok())
        && !request.json
        && text.split_whitespace().count() > max
    {
        text = text
            .split_inclusive(' ')
            .take(max)
            .collect::<String>()
            .trim_end()
            .to_string();
        finish = FinishReason::Length;
    }
    let output = estimate_tokens(&text);
    Completion {
        text,
        tool_calls: Vec::new(),
        finish,
        usage: Usage::new(input, output),
    }
}

/// A plan for the task in `prompt` (see the module's doc): `{"text", "queries"}` with 2 to
/// 4 questions, each the task's first words and an aspect.
pub fn plan(model: &str, prompt: &str, reference: u64) -> serde_json::Value {
    let task = task_of(prompt);
    let hash = fnv1a_bytes(task.as_bytes());
    let words: Vec<&str> = task.split_whitespace().collect();
    let cut = words.len() > TOPIC_WORDS;
    let mut topic = words
        .iter()
        .take(TOPIC_WORDS)
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches(['?', '.', '!', ':', ';', ','])
        .to_string();
    if topic.is_empty() {
        topic = "the task".to_string();
    } else if cut {
        topic.push_str(" ...");
    }
    // 2, 3 or 4 questions; aspects in turn from a start the hash picks.
    let count = 2 + (hash % 3) as usize;
    let start = ((hash >> 8) % ASPECTS.len() as u64) as usize;
    let queries: Vec<String> = (0..count)
        .map(|i| format!("{topic} ({})", ASPECTS[(start + i) % ASPECTS.len()]))
        .collect();
    let steps: Vec<String> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| format!("{}. {q}", i + 1))
        .collect();
    serde_json::json!({
        "text": format!(
            "Mock plan from {model} ({count} questions, ref {reference:016x}):\n{}",
            steps.join("\n")
        ),
        "queries": queries,
    })
}

/// The task a plan prompt is about: what follows its last `Task:` line, else all of it; a
/// task that is JSON is read as its strings, in order.
fn task_of(prompt: &str) -> String {
    let task = prompt
        .rfind("Task:\n")
        .map_or(prompt, |at| &prompt[at + "Task:\n".len()..])
        .trim();
    match serde_json::from_str::<serde_json::Value>(task) {
        Ok(value) => {
            let mut strings = Vec::new();
            collect_strings(&value, &mut strings);
            if strings.is_empty() {
                task.to_string()
            } else {
                strings.join(" ")
            }
        }
        Err(_) => task.to_string(),
    }
}

fn collect_strings<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

/// FNV-1a over the conversation: stable across runs and platforms, unlike `DefaultHasher`.
fn fnv1a(request: &ChatRequest) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    if let Some(system) = &request.system {
        feed(system.as_bytes());
    }
    for turn in &request.turns {
        feed(match turn.role {
            TurnRole::User => b"\x01",
            TurnRole::Assistant => b"\x02",
        });
        for part in &turn.parts {
            match part {
                Part::Text(text) => feed(text.as_bytes()),
                Part::ToolCall(call) => {
                    for field in [&call.id, &call.name, &call.arguments] {
                        feed(b"\x03");
                        feed(field.as_bytes());
                    }
                }
                Part::ToolResult(result) => {
                    for field in [&result.id, &result.content] {
                        feed(b"\x04");
                        feed(field.as_bytes());
                    }
                }
            }
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::providers::Turn;

    fn ask(text: &str) -> ChatRequest {
        ChatRequest {
            turns: vec![Turn {
                role: TurnRole::User,
                parts: vec![Part::Text(text.into())],
            }],
            ..ChatRequest::default()
        }
    }

    #[test]
    fn replies_are_deterministic_and_differ_by_prompt() {
        let a = reply("m", &ask("hello there"));
        assert_eq!(a, reply("m", &ask("hello there")));
        assert_ne!(a.text, reply("m", &ask("hello world")).text);
        assert!(a.text.contains("hello there"), "{}", a.text);
        assert_eq!(a.finish, FinishReason::Stop);
        assert!(a.usage.prompt_tokens > 0 && a.usage.completion_tokens > 0);
    }

    #[test]
    fn json_mode_answers_a_json_object() {
        let mut r = ask("list three colours");
        r.json = true;
        let v: serde_json::Value = serde_json::from_str(&reply("m", &r).text).unwrap();
        assert!(v.is_object());
        assert_eq!(v["prompt_words"], 3);
    }

    fn plan_request(prompt: &str) -> ChatRequest {
        let mut r = ask(prompt);
        r.json = true;
        r.json_schema = Some(super::super::NamedSchema {
            name: PLAN_SCHEMA.into(),
            description: None,
            schema: serde_json::json!({"type": "object"}),
        });
        r
    }

    fn queries(c: &Completion) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&c.text).unwrap();
        assert!(
            v["text"].as_str().unwrap().starts_with("Mock plan from m"),
            "{v}"
        );
        serde_json::from_value(v["queries"].clone()).unwrap()
    }

    #[test]
    fn a_plan_schema_gets_two_to_four_queries_about_the_task() {
        let prompt = "You plan.\n\nTask:\n{\n  \"question\": \"Why is the sky blue?\"\n}";
        let a = reply("m", &plan_request(prompt));
        assert_eq!(a, reply("m", &plan_request(prompt)), "deterministic");
        let q = queries(&a);
        assert!((2..=4).contains(&q.len()), "{q:?}");
        for query in &q {
            // The task's words, out of the JSON and without the question mark.
            assert!(query.starts_with("Why is the sky blue ("), "{query}");
        }
        let unique: std::collections::BTreeSet<&String> = q.iter().collect();
        assert_eq!(unique.len(), q.len(), "{q:?}");
        // Different tasks get different plans, and every count occurs.
        let mut counts = std::collections::BTreeSet::new();
        for n in 0..40 {
            let q = queries(&reply("m", &plan_request(&format!("Task:\ntopic {n}"))));
            assert!(q[0].starts_with(&format!("topic {n} (")), "{q:?}");
            counts.insert(q.len());
        }
        assert_eq!(counts, [2, 3, 4].into_iter().collect());
        // Without a `Task:` line the whole prompt is the task; a long one is cut.
        let long = (1..=30)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let q = queries(&reply("m", &plan_request(&long)));
        assert!(
            q[0].starts_with("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 ... ("),
            "{q:?}"
        );
        // Other schemas still get an example.
        let mut other = plan_request("Task:\nx");
        if let Some(s) = other.json_schema.as_mut() {
            s.name = "weather".into();
        }
        assert_eq!(reply("m", &other).text, "{}");
    }

    #[test]
    fn max_tokens_and_stop_cut_the_reply() {
        let mut r = ask("one two three four five");
        r.max_tokens = Some(2);
        let c = reply("m", &r);
        assert_eq!(c.finish, FinishReason::Length);
        assert_eq!(c.text.split_whitespace().count(), 2);
        let mut r = ask("one two");
        r.stop = vec!["to".into()];
        assert_eq!(reply("m", &r).text, "Mock reply from m ");
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embedding("hello", 64);
        assert_eq!(a.len(), 64);
        assert_eq!(a, embedding("hello", 64));
        assert_ne!(a, embedding("hello!", 64));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }

    #[test]
    fn failures_are_injected_by_marker() {
        assert_eq!(injected_status("x [mock:fail=429] y"), Some(429));
        assert_eq!(injected_status("x [mock:fail=abc]"), None);
        assert_eq!(injected_status("plain"), None);
    }

    #[tokio::test]
    async fn streams_break_mid_way_when_told() {
        let mock = MockProvider::new(Duration::ZERO, 0.0);
        let events: Vec<_> = mock
            .stream("m", &ask("go [mock:fail-mid-stream]"))
            .await
            .unwrap()
            .collect()
            .await;
        assert!(matches!(events[0], Ok(StreamEvent::Delta(_))));
        assert!(events[1].is_err());
        assert_eq!(events.len(), 2);
    }
}

//! A local fake of Google's Generative Language API: it records every request, checks it
//! the way Google documents it (path, `x-goog-api-key` header, no key in the URL), and
//! answers scripted replies in Google's JSON and SSE formats. `:batchEmbedContents` is
//! checked as Google documents it too, and answered with deterministic vectors.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};

use super::server::{Fake, Script, header, results_text};

/// The `x-goog-api-key` the fake accepts: give it to the gateway under test.
pub const GEMINI_KEY: &str = "fake-gemini-key";

/// One scripted answer.
#[derive(Clone)]
pub enum Reply {
    /// A JSON body with a status.
    Json(u16, Value),
    /// SSE events (`data: {json}\r\n\r\n` each).
    Sse(Vec<Value>),
    /// SSE events, then the connection breaks.
    SseThenAbort(Vec<Value>),
    /// No answer for this long.
    Hang(Duration),
    /// An answer derived from the request, as a model would: with function declarations
    /// and a user turn last, calls the allowed function (or the first; every one when the
    /// prompt holds `[mock:parallel]`), the first call signed with a thought signature;
    /// after function responses, text quoting them; else text quoting the prompt.
    Auto,
}

/// A request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    pub query: Option<String>,
    pub api_key: Option<String>,
    pub content_type: Option<String>,
    /// The W3C `traceparent` the gateway sent, when it exports traces.
    pub traceparent: Option<String>,
    pub body: Value,
    pub at: Instant,
}

/// The running fake; `url` is what `GEMINI_BASE_URL` should be.
pub type FakeGemini = Fake<Reply, Recorded>;

impl FakeGemini {
    pub async fn start() -> Self {
        Self::start_on(0).await.expect("bind a free loopback port")
    }

    /// Listens on `127.0.0.1:port` (0: a free port), for a gateway configured elsewhere.
    pub async fn start_on(port: u16) -> std::io::Result<Self> {
        Fake::serve(
            port,
            "/v1beta",
            |script, method, uri, headers, body| async move {
                handle(&script, method, uri, headers, body).await
            },
        )
        .await
    }
}

async fn handle(
    script: &Script<Reply, Recorded>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name| header(&headers, name).map(String::from);
    let recorded = Recorded {
        path: uri.path().to_string(),
        query: uri.query().map(String::from),
        api_key: header("x-goog-api-key"),
        content_type: header("content-type"),
        traceparent: header("traceparent"),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at: Instant::now(),
    };
    script.record(recorded.clone());

    // What Google requires; anything else is answered as Google would.
    if recorded.api_key.as_deref() != Some(GEMINI_KEY) {
        return google_error(
            403,
            "PERMISSION_DENIED",
            "missing or wrong x-goog-api-key",
            vec![],
        );
    }
    if recorded
        .query
        .as_deref()
        .is_some_and(|q| q.contains("key="))
    {
        return google_error(
            400,
            "INVALID_ARGUMENT",
            "key must not be in the URL",
            vec![],
        );
    }
    if recorded.path.ends_with(":batchEmbedContents") {
        return batch_embed(script, &method, &recorded).await;
    }
    let streaming = recorded.path.ends_with(":streamGenerateContent");
    let well_formed = method == Method::POST
        && recorded.path.starts_with("/v1beta/models/")
        && (recorded.path.ends_with(":generateContent") || streaming)
        && (!streaming || recorded.query.as_deref() == Some("alt=sse"))
        && recorded.content_type.as_deref() == Some("application/json")
        && recorded.body["contents"].is_array();
    if !well_formed {
        return google_error(404, "NOT_FOUND", "not a generateContent request", vec![]);
    }
    if let Err(why) = check_contents(&recorded.body) {
        return google_error(400, "INVALID_ARGUMENT", &why, vec![]);
    }

    let reply = script.next().unwrap_or_else(|| match streaming {
        true => Reply::Sse(vec![chunk_json(
            "default reply",
            Some("STOP"),
            Some((1, 2)),
        )]),
        false => Reply::Json(200, reply_json("default reply", "STOP", 1, 2)),
    });
    match reply {
        Reply::Json(status, body) => (
            StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/json; charset=UTF-8")],
            body.to_string(),
        )
            .into_response(),
        Reply::Sse(events) => sse_response(events, false),
        Reply::SseThenAbort(events) => sse_response(events, true),
        Reply::Hang(time) => {
            tokio::time::sleep(time).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Reply::Auto => {
            let parts = auto_parts(&recorded.body);
            if streaming {
                // Text in two pieces; function calls whole, as Gemini streams them.
                let mut events = Vec::new();
                for part in &parts {
                    match part["text"].as_str() {
                        Some(text) => {
                            let middle = text.len() / 2;
                            for piece in [&text[..middle], &text[middle..]] {
                                events.push(json!({"candidates": [{"content": {"role": "model", "parts": [{"text": piece}]}, "index": 0}], "responseId": "auto"}));
                            }
                        }
                        None => events.push(json!({"candidates": [{"content": {"role": "model", "parts": [part]}, "index": 0}], "responseId": "auto"})),
                    }
                }
                events.push(json!({
                    "candidates": [{"content": {"role": "model", "parts": [{"text": ""}]}, "finishReason": auto_finish(&recorded.body), "index": 0}],
                    "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 5, "totalTokenCount": 12},
                    "responseId": "auto"
                }));
                sse_response(events, false)
            } else {
                let body = json!({
                    "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": auto_finish(&recorded.body), "index": 0}],
                    "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 5, "totalTokenCount": 12},
                    "responseId": "auto"
                });
                (
                    [("content-type", "application/json; charset=UTF-8")],
                    body.to_string(),
                )
                    .into_response()
            }
        }
    }
}

/// The thought signature the fake attaches to the first call of a turn, and requires back.
pub fn signature_for(name: &str) -> String {
    format!("c2lnOg+/{name}==")
}

/// What Gemini checks of `contents` (and `tools`): a user turn first, turns alternating,
/// no empty text parts, each turn's first function call carrying the thought signature
/// issued for it, function responses answering the calls of the turn before, and only the
/// schema keywords Gemini's `Schema` has.
pub fn check_contents(body: &Value) -> Result<(), String> {
    let contents = body["contents"]
        .as_array()
        .ok_or("contents must be a list")?;
    let mut previous_role = "";
    let mut previous_calls: Vec<String> = Vec::new();
    for (i, content) in contents.iter().enumerate() {
        let role = content["role"].as_str().unwrap_or_default();
        if i == 0 && role != "user" {
            return Err("Please ensure that multiturn requests alternate between user and model, starting with a user turn.".into());
        }
        if role == previous_role {
            return Err(format!("contents[{i}]: consecutive {role} turns"));
        }
        let parts = content["parts"].as_array().ok_or("parts must be a list")?;
        if parts.is_empty() {
            return Err(format!("contents[{i}].parts must not be empty"));
        }
        let mut calls = Vec::new();
        for (j, part) in parts.iter().enumerate() {
            if part.get("text").is_some_and(|t| t.as_str() == Some("")) {
                return Err(format!(
                    "contents[{i}].parts[{j}]: Unable to submit request because it has an empty text parameter."
                ));
            }
            if let Some(call) = part.get("functionCall") {
                let name = call["name"].as_str().unwrap_or_default().to_string();
                // Google's documented value for calls Gemini did not make.
                let foreign = part["thoughtSignature"] == "skip_thought_signature_validator";
                if calls.is_empty()
                    && !foreign
                    && part["thoughtSignature"] != json!(signature_for(&name))
                {
                    return Err(format!(
                        "contents[{i}].parts[{j}]: Function call is missing a thought_signature"
                    ));
                }
                if !call["args"].is_object() {
                    return Err(format!(
                        "contents[{i}].parts[{j}].functionCall.args must be an object"
                    ));
                }
                calls.push(name);
            }
            if let Some(response) = part.get("functionResponse") {
                let name = response["name"].as_str().unwrap_or_default();
                if !previous_calls.iter().any(|c| c == name) {
                    return Err(format!(
                        "contents[{i}].parts[{j}]: functionResponse `{name}` answers no function call of the turn before"
                    ));
                }
                if !response["response"].is_object() {
                    return Err(format!(
                        "contents[{i}].parts[{j}].functionResponse.response must be an object"
                    ));
                }
            }
        }
        let responses = parts
            .iter()
            .filter(|p| p.get("functionResponse").is_some())
            .count();
        if !previous_calls.is_empty() && responses != previous_calls.len() {
            return Err("Please ensure that the number of function response parts is equal to the number of function call parts of the function call turn.".into());
        }
        previous_role = if role == "user" { "user" } else { "model" };
        previous_calls = calls;
    }
    if contents.last().is_some_and(|c| c["role"] != "user") {
        return Err(
            "Please ensure that multiturn requests end with a user role or a function response."
                .into(),
        );
    }
    for declaration in body["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["functionDeclarations"].as_array().into_iter().flatten())
    {
        check_schema(&declaration["parameters"])?;
    }
    check_schema(&body["generationConfig"]["responseSchema"])
}

/// Refuses keywords Gemini's `Schema` does not have, as Gemini does.
fn check_schema(schema: &Value) -> Result<(), String> {
    const KNOWN: &[&str] = &[
        "type",
        "format",
        "title",
        "description",
        "nullable",
        "enum",
        "maxItems",
        "minItems",
        "properties",
        "required",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "pattern",
        "example",
        "anyOf",
        "propertyOrdering",
        "default",
        "items",
        "minimum",
        "maximum",
    ];
    let Some(object) = schema.as_object() else {
        return Ok(());
    };
    for (key, value) in object {
        if !KNOWN.contains(&key.as_str()) {
            return Err(format!(
                "Invalid JSON payload received. Unknown name \"{key}\""
            ));
        }
        match key.as_str() {
            "properties" => {
                for property in value.as_object().into_iter().flatten().map(|(_, v)| v) {
                    check_schema(property)?;
                }
            }
            "items" => check_schema(value)?,
            "anyOf" => {
                for option in value.as_array().into_iter().flatten() {
                    check_schema(option)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// [`Reply::Auto`]'s `finishReason`: `STOP`, or what the last user text names with
/// `[fake:finish=REASON]` (`SAFETY`, `MAX_TOKENS`, `MALFORMED_FUNCTION_CALL`, …).
fn auto_finish(body: &Value) -> String {
    let last = &body["contents"][body["contents"]
        .as_array()
        .map_or(0, |c| c.len().max(1) - 1)];
    last["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["text"].as_str())
        .find_map(|t| {
            let start = t.find("[fake:finish=")? + "[fake:finish=".len();
            let end = start + t[start..].find(']')?;
            Some(t[start..end].to_string())
        })
        .unwrap_or_else(|| "STOP".into())
}

/// The parts of [`Reply::Auto`]'s answer to `body`.
fn auto_parts(body: &Value) -> Vec<Value> {
    let contents = body["contents"].as_array().cloned().unwrap_or_default();
    let last = contents.last().cloned().unwrap_or(Value::Null);
    let last_parts = last["parts"].as_array().cloned().unwrap_or_default();
    let responses: Vec<&Value> = last_parts
        .iter()
        .filter_map(|p| p.get("functionResponse"))
        .collect();
    if !responses.is_empty() {
        let quoted = responses.iter().map(|r| {
            (
                r["name"].as_str().unwrap_or_default(),
                r["response"].to_string(),
            )
        });
        return vec![results_text(quoted)];
    }
    let prompt: String = last_parts
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let declarations: Vec<Value> = body["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| {
            t["functionDeclarations"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    let config = &body["toolConfig"]["functionCallingConfig"];
    if let Some(schema) = body["generationConfig"].get("responseSchema") {
        let answer = llm_gateway::providers::schema::example(schema, &prompt);
        return vec![json!({"text": answer.to_string()})];
    }
    if declarations.is_empty() || config["mode"] == "NONE" {
        return vec![json!({"text": format!("fake gemini answers: {prompt}")})];
    }
    let allowed: Vec<&str> = config["allowedFunctionNames"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let chosen: Vec<&Value> = declarations
        .iter()
        .filter(|d| allowed.is_empty() || allowed.contains(&d["name"].as_str().unwrap_or_default()))
        .take(if prompt.contains("[mock:parallel]") {
            usize::MAX
        } else {
            1
        })
        .collect();
    chosen
        .iter()
        .enumerate()
        .map(|(i, declaration)| {
            let name = declaration["name"].as_str().unwrap_or_default();
            let args = match declaration.get("parameters") {
                Some(schema) => llm_gateway::providers::schema::example(schema, &prompt),
                None => json!({}),
            };
            let mut part = json!({"functionCall": {"name": name, "args": args}});
            if i == 0 {
                part["thoughtSignature"] = json!(signature_for(name));
            }
            part
        })
        .collect()
}

fn sse_response(events: Vec<Value>, abort: bool) -> Response {
    let mut items: Vec<Result<Bytes, std::io::Error>> = events
        .into_iter()
        .map(|e| Ok(Bytes::from(format!("data: {e}\r\n\r\n"))))
        .collect();
    if abort {
        items.push(Err(std::io::Error::other("connection reset")));
    }
    // A pause before each item lets what came before reach the client first.
    let body = Body::from_stream(futures::stream::iter(items).then(|item| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        item
    }));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

/// Google's error answer.
pub fn google_error(code: u16, status: &str, message: &str, details: Vec<Value>) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json; charset=UTF-8")],
        error_json(code, status, message, details).to_string(),
    )
        .into_response()
}

/// `{"error": {"code", "message", "status", "details"}}`.
pub fn error_json(code: u16, status: &str, message: &str, details: Vec<Value>) -> Value {
    json!({"error": {"code": code, "message": message, "status": status, "details": details}})
}

/// A `GenerateContentResponse` with one candidate.
pub fn reply_json(text: &str, finish: &str, prompt_tokens: u32, output_tokens: u32) -> Value {
    json!({
        "candidates": [{
            "content": {"parts": [{"text": text}], "role": "model"},
            "finishReason": finish,
            "index": 0
        }],
        "usageMetadata": {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": prompt_tokens + output_tokens
        },
        "modelVersion": "gemini-2.5-flash",
        "responseId": "fake-response"
    })
}

/// A `GenerateContentResponse` whose candidate calls functions: `(name, args, signature)`.
pub fn function_call_json(calls: &[(&str, Value, Option<&str>)], finish: &str) -> Value {
    let parts: Vec<Value> = calls
        .iter()
        .map(|(name, args, signature)| {
            let mut part = json!({"functionCall": {"name": name, "args": args}});
            if let Some(signature) = signature {
                part["thoughtSignature"] = json!(signature);
            }
            part
        })
        .collect();
    json!({
        "candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": finish, "index": 0}],
        "usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 8, "totalTokenCount": 28},
        "modelVersion": "gemini-2.5-flash",
        "responseId": "fake-tools"
    })
}

/// A streamed chunk: text, optionally a finish reason and usage (Google sends running
/// usage on chunks; the last one is the total).
pub fn chunk_json(text: &str, finish: Option<&str>, usage: Option<(u32, u32)>) -> Value {
    let mut candidate =
        json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
    if let Some(finish) = finish {
        candidate["finishReason"] = json!(finish);
    }
    let mut chunk = json!({"candidates": [candidate], "modelVersion": "gemini-2.5-flash"});
    if let Some((p, o)) = usage {
        chunk["usageMetadata"] =
            json!({"promptTokenCount": p, "candidatesTokenCount": o, "totalTokenCount": p + o});
    }
    chunk
}

/// Gemini's default vector length for a model (`gemini-embedding-001`: 3072).
pub fn default_dimensions(model: &str) -> u32 {
    if model.starts_with("gemini-embedding") {
        3072
    } else {
        768
    }
}

/// The fake's vector for `text`: deterministic, unit length, and unlike the mock's.
pub fn fake_embedding(text: &str, dimensions: u32) -> Vec<f32> {
    llm_gateway::providers::mock::embedding(&format!("gemini:{text}"), dimensions)
}

/// `POST /v1beta/models/{model}:batchEmbedContents`: `{"requests": [{"model":
/// "models/{model}", "content": {"parts": [{"text"}]}, "outputDimensionality"?}]}`, at most
/// 100 requests, each naming the URL's model; answers `{"embeddings": [{"values"}]}`. A
/// text holding `[fake:fail=503]` (any status) fails the batch.
async fn batch_embed(
    script: &Script<Reply, Recorded>,
    method: &Method,
    recorded: &Recorded,
) -> Response {
    let model = recorded
        .path
        .strip_prefix("/v1beta/models/")
        .and_then(|p| p.strip_suffix(":batchEmbedContents"))
        .unwrap_or_default();
    if *method != Method::POST
        || model.is_empty()
        || recorded.content_type.as_deref() != Some("application/json")
    {
        return google_error(404, "NOT_FOUND", "not a batchEmbedContents request", vec![]);
    }
    let Some(requests) = recorded.body["requests"].as_array() else {
        return google_error(400, "INVALID_ARGUMENT", "requests is required", vec![]);
    };
    if requests.is_empty() || requests.len() > 100 {
        return google_error(
            400,
            "INVALID_ARGUMENT",
            "* BatchEmbedContentsRequest.requests: at most 100 requests can be in one batch",
            vec![],
        );
    }
    let mut texts = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let keys: Vec<&String> = request
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        if let Some(key) = keys.iter().find(|k| {
            ![
                "model",
                "content",
                "taskType",
                "title",
                "outputDimensionality",
            ]
            .contains(&k.as_str())
        }) {
            return google_error(
                400,
                "INVALID_ARGUMENT",
                &format!(
                    "Invalid JSON payload received. Unknown name \"{key}\" at 'requests[{i}]'"
                ),
                vec![],
            );
        }
        if request["model"] != json!(format!("models/{model}")) {
            return google_error(
                400,
                "INVALID_ARGUMENT",
                &format!(
                    "* BatchEmbedContentsRequest.requests[{i}].model: the model must match the batch's"
                ),
                vec![],
            );
        }
        let parts = request["content"]["parts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let text: String = parts.iter().filter_map(|p| p["text"].as_str()).collect();
        if parts.is_empty() || text.is_empty() {
            return google_error(
                400,
                "INVALID_ARGUMENT",
                &format!(
                    "* BatchEmbedContentsRequest.requests[{i}].content.parts: contents must not be empty"
                ),
                vec![],
            );
        }
        if let Some(d) = request.get("outputDimensionality")
            && !d.as_u64().is_some_and(|d| (1..=3072).contains(&d))
        {
            return google_error(
                400,
                "INVALID_ARGUMENT",
                "outputDimensionality must be 1 to 3072",
                vec![],
            );
        }
        texts.push((text, request["outputDimensionality"].as_u64()));
    }
    let reply = script.next();
    match reply {
        Some(Reply::Json(status, body)) => {
            return (
                StatusCode::from_u16(status).unwrap(),
                [("content-type", "application/json; charset=UTF-8")],
                body.to_string(),
            )
                .into_response();
        }
        Some(Reply::Hang(time)) => {
            tokio::time::sleep(time).await;
            return StatusCode::GATEWAY_TIMEOUT.into_response();
        }
        _ => {}
    }
    if let Some(status) = texts.iter().find_map(|(t, _)| {
        let start = t.find("[fake:fail=")? + "[fake:fail=".len();
        t[start..].split(']').next()?.parse::<u16>().ok()
    }) {
        return google_error(status, "UNAVAILABLE", "injected failure", vec![]);
    }
    let embeddings: Vec<Value> = texts
        .iter()
        .map(|(text, d)| {
            let d = d.map_or(default_dimensions(model), |d| d as u32);
            json!({"values": fake_embedding(text, d)})
        })
        .collect();
    (
        [("content-type", "application/json; charset=UTF-8")],
        json!({"embeddings": embeddings}).to_string(),
    )
        .into_response()
}

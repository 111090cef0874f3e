//! A local fake of the Bedrock runtime: Converse answers JSON, ConverseStream answers
//! `application/vnd.amazon.eventstream` frames built with `aws-smithy-eventstream`,
//! InvokeModel answers Titan Text Embeddings and Cohere Embed bodies, errors carry
//! `x-amzn-errortype`. It records every request and refuses any that is not SigV4
//! signed for service `bedrock` with the test credentials.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_bedrockruntime::config::Credentials;

use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::server::{Fake, Script, header, results_text};

/// The credentials requests must be signed with: give them to the gateway under test.
pub const AWS_ACCESS_KEY: &str = "AKIDTESTGATEWAY";
pub const AWS_SECRET_KEY: &str = "test-secret-key";
pub const AWS_REGION: &str = "us-east-1";

/// One scripted answer.
#[derive(Clone)]
pub enum Reply {
    /// A Converse JSON body (or, to InvokeModel, any JSON body).
    Converse(Value),
    /// An error: status, `x-amzn-errortype`, message.
    Error(u16, &'static str, &'static str),
    /// ConverseStream frames.
    Stream(Vec<Frame>),
    /// An answer derived from the request, as a model would: with `toolConfig` and a user
    /// message last, uses the chosen tool (or the first; every one when the prompt holds
    /// `[mock:parallel]`); after tool results, text quoting them; else text quoting the
    /// prompt. Converse or ConverseStream, whichever was called.
    Auto,
}

/// One event-stream frame.
#[derive(Clone)]
pub enum Frame {
    /// `:message-type: event` with an `:event-type`.
    Event(&'static str, Value),
    /// `:message-type: exception` with an `:exception-type`.
    Exception(&'static str, Value),
}

/// A request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    pub authorization: String,
    pub body: Value,
}

/// The running fake; `url` is what `BEDROCK_ENDPOINT_URL` should be.
pub type FakeBedrock = Fake<Reply, Recorded>;

impl FakeBedrock {
    pub async fn start() -> Self {
        Fake::serve(0, "", |script, method, uri, headers, body| async move {
            handle(&script, method, uri, headers, body)
        })
        .await
        .expect("bind a free loopback port")
    }
}

/// Checks `Authorization: AWS4-HMAC-SHA256 Credential=<key>/<date>/<region>/bedrock/aws4_request,
/// SignedHeaders=…, Signature=…` and recomputes the signature with the test secret.
pub fn check_sigv4(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    let auth = header(headers, "authorization").ok_or("no Authorization header")?;
    let amz_date = header(headers, "x-amz-date").ok_or("no x-amz-date header")?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not AWS4-HMAC-SHA256")?;
    let mut credential = None;
    let mut signed_headers = None;
    let mut signature = None;
    for part in rest.split(',').map(str::trim) {
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed_headers = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let credential = credential.ok_or("no Credential")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let date = amz_date.get(..8).ok_or("bad x-amz-date")?;
    if scope != [AWS_ACCESS_KEY, date, AWS_REGION, "bedrock", "aws4_request"] {
        return Err(format!("wrong credential scope {credential}"));
    }
    let signed: Vec<&str> = signed_headers
        .ok_or("no SignedHeaders")?
        .split(';')
        .collect();
    if !signed.contains(&"host") || !signed.contains(&"x-amz-date") {
        return Err(format!("host and x-amz-date must be signed: {signed:?}"));
    }
    let signature = signature.ok_or("no Signature")?;
    let expected = expected_signature(method, uri, headers, &signed, amz_date, body)?;
    if signature != expected {
        return Err(format!("bad signature {signature}, expected {expected}"));
    }
    Ok(())
}

/// Recomputes the SigV4 signature over the signed headers, the way Bedrock would.
fn expected_signature(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    signed: &[&str],
    amz_date: &str,
    body: &[u8],
) -> Result<String, String> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let host = header(headers, "host").ok_or("no host header")?;
    let url = format!(
        "http://{host}{}",
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut pairs = Vec::new();
    for name in signed {
        let value = header(headers, name).ok_or(format!("signed header {name} is missing"))?;
        pairs.push((*name, value));
    }
    let identity = Credentials::new(AWS_ACCESS_KEY, AWS_SECRET_KEY, None, None, "fake").into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(AWS_REGION)
        .name("bedrock")
        .time(parse_amz_date(amz_date)?)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let request = SignableRequest::new(
        method.as_str(),
        url,
        pairs.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| e.to_string())?;
    let (_, signature) = sign(request, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    Ok(signature)
}

/// `20261124T032643Z` as a time.
fn parse_amz_date(text: &str) -> Result<SystemTime, String> {
    let bad = || format!("bad x-amz-date {text}");
    let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
        text.get(range).and_then(|s| s.parse().ok()).ok_or_else(bad)
    };
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3_600 + mm * 60 + ss;
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).map_err(|_| bad())?))
}

fn handle(
    script: &Script<Reply, Recorded>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let recorded = Recorded {
        path: uri.path().to_string(),
        authorization: header(&headers, "authorization")
            .unwrap_or_default()
            .to_string(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    script.record(recorded.clone());
    if let Err(why) = check_sigv4(&method, &uri, &headers, &body) {
        return error(403, "InvalidSignatureException", &why);
    }
    if method == Method::POST && recorded.path.ends_with("/invoke") {
        return invoke(script, &headers, &recorded);
    }
    let streaming = recorded.path.ends_with("/converse-stream");
    if method != Method::POST
        || !recorded.path.starts_with("/model/")
        || !(streaming || recorded.path.ends_with("/converse"))
        || !recorded.body["messages"].is_array()
    {
        return error(404, "UnknownOperationException", "not a Converse request");
    }
    if let Err(why) = check_messages(&recorded.body) {
        return error(400, "ValidationException", &why);
    }
    let reply = script
        .next()
        .unwrap_or_else(|| Reply::Converse(converse_json("default reply", "end_turn", 1, 2)));
    let reply = match reply {
        Reply::Auto => {
            let (content, stop) = auto_content(&recorded.body);
            if streaming {
                Reply::Stream(content_frames(&content, stop))
            } else {
                Reply::Converse(json!({
                    "output": {"message": {"role": "assistant", "content": content}},
                    "stopReason": stop,
                    "usage": {"inputTokens": 9, "outputTokens": 4, "totalTokens": 13},
                    "metrics": {"latencyMs": 5}
                }))
            }
        }
        other => other,
    };
    match reply {
        Reply::Auto => unreachable!("resolved above"),
        Reply::Converse(body) => {
            ([("content-type", "application/json")], body.to_string()).into_response()
        }
        Reply::Error(status, kind, message) => error(status, kind, message),
        Reply::Stream(frames) => {
            let mut bytes = Vec::new();
            for frame in frames {
                let message = match frame {
                    Frame::Event(kind, payload) => Message::new(payload.to_string().into_bytes())
                        .add_header(frame_header(":message-type", "event"))
                        .add_header(frame_header(":event-type", kind))
                        .add_header(frame_header(":content-type", "application/json")),
                    Frame::Exception(kind, payload) => {
                        Message::new(payload.to_string().into_bytes())
                            .add_header(frame_header(":message-type", "exception"))
                            .add_header(frame_header(":exception-type", kind))
                            .add_header(frame_header(":content-type", "application/json"))
                    }
                };
                aws_smithy_eventstream::frame::write_message_to(&message, &mut bytes).unwrap();
            }
            Response::builder()
                .header("content-type", "application/vnd.amazon.eventstream")
                .body(Body::from(bytes))
                .unwrap()
        }
    }
}

/// What Converse checks of `messages`: a user message first, roles alternating, no empty
/// text blocks, `toolConfig` present when tool blocks are, and every `toolResult`
/// answering a `toolUse` of the assistant message before.
pub fn check_messages(body: &Value) -> Result<(), String> {
    let messages = body["messages"]
        .as_array()
        .ok_or("messages must be a list")?;
    let mut previous_role = "";
    let mut previous_uses: Vec<String> = Vec::new();
    let mut has_tool_blocks = false;
    for (i, message) in messages.iter().enumerate() {
        let role = message["role"].as_str().unwrap_or_default();
        if i == 0 && role != "user" {
            return Err("A conversation must start with a user message. Try again with a conversation that starts with a user message.".into());
        }
        if role == previous_role {
            return Err("A conversation must alternate between user and assistant roles.".into());
        }
        let content = message["content"]
            .as_array()
            .ok_or("content must be a list")?;
        if content.is_empty() {
            return Err(format!("messages.{i}.content: must not be empty"));
        }
        let mut uses = Vec::new();
        for block in content {
            if block
                .get("text")
                .is_some_and(|t| t.as_str().is_some_and(|t| t.trim().is_empty()))
            {
                return Err("The text field in the ContentBlock object is blank. Add text to the text field, and try again.".into());
            }
            for id in [
                &block["toolUse"]["toolUseId"],
                &block["toolResult"]["toolUseId"],
            ] {
                if let Some(id) = id.as_str()
                    && !id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    return Err(format!(
                        "1 validation error detected: Value '{id}' at 'toolUseId' failed to satisfy constraint: Member must satisfy regular expression pattern: ^[a-zA-Z0-9_-]+$"
                    ));
                }
            }
            if let Some(tool_use) = block.get("toolUse") {
                has_tool_blocks = true;
                uses.push(
                    tool_use["toolUseId"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
                if !tool_use["input"].is_object() {
                    return Err("toolUse.input must be an object".into());
                }
            }
            if let Some(result) = block.get("toolResult") {
                has_tool_blocks = true;
                let id = result["toolUseId"].as_str().unwrap_or_default();
                if !previous_uses.iter().any(|u| u == id) {
                    return Err(format!(
                        "The toolResult blocks at messages.{i}.content contain toolUseId {id} that doesn't match a toolUse of the previous turn"
                    ));
                }
            }
        }
        let results: Vec<&str> = content
            .iter()
            .filter_map(|b| b["toolResult"]["toolUseId"].as_str())
            .collect();
        if let Some(missing) = previous_uses
            .iter()
            .find(|u| !results.contains(&u.as_str()))
        {
            return Err(format!(
                "Expected toolResult blocks at messages.{i}.content for the following Ids: {missing}"
            ));
        }
        let first_text = content.iter().position(|b| b.get("toolResult").is_none());
        let last_result = content.iter().rposition(|b| b.get("toolResult").is_some());
        if let (Some(text), Some(result)) = (first_text, last_result)
            && text < result
        {
            return Err(format!(
                "messages.{i}.content: toolResult blocks must come before any other content"
            ));
        }
        previous_role = if role == "user" { "user" } else { "assistant" };
        previous_uses = uses;
    }
    if has_tool_blocks && body.get("toolConfig").is_none() {
        return Err("The toolConfig field must be defined when using toolUse and toolResult content blocks.".into());
    }
    Ok(())
}

/// The content blocks and stop reason of [`Reply::Auto`]'s answer to `body`.
fn auto_content(body: &Value) -> (Vec<Value>, &'static str) {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let last = messages.last().cloned().unwrap_or(Value::Null);
    let blocks = last["content"].as_array().cloned().unwrap_or_default();
    let results: Vec<&Value> = blocks.iter().filter_map(|b| b.get("toolResult")).collect();
    if !results.is_empty() {
        let quoted = results.iter().map(|r| {
            (
                r["toolUseId"].as_str().unwrap_or_default(),
                r["content"][0]["text"].as_str().unwrap_or_default().into(),
            )
        });
        return (vec![results_text(quoted)], "end_turn");
    }
    let prompt: String = blocks
        .iter()
        .filter_map(|b| b["text"].as_str())
        .collect::<Vec<_>>()
        .join(" ");
    // `[fake:stop=REASON]` in the prompt: a partial answer that stopped for that reason.
    for reason in [
        "max_tokens",
        "guardrail_intervened",
        "content_filtered",
        "malformed_tool_use",
    ] {
        if prompt.contains(&format!("[fake:stop={reason}]")) {
            return (vec![json!({"text": "Partial"})], reason);
        }
    }
    let tools: Vec<Value> = body["toolConfig"]["tools"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if tools.is_empty() {
        return (
            vec![json!({"text": format!("fake bedrock answers: {prompt}")})],
            "end_turn",
        );
    }
    let forced = body["toolConfig"]["toolChoice"]["tool"]["name"].as_str();
    let chosen: Vec<&Value> = tools
        .iter()
        .filter(|t| forced.is_none_or(|f| t["toolSpec"]["name"] == f))
        .take(if prompt.contains("[mock:parallel]") {
            usize::MAX
        } else {
            1
        })
        .collect();
    let content = chosen
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let spec = &tool["toolSpec"];
            json!({"toolUse": {
                "toolUseId": format!("tooluse_fake{i}_{}", messages.len()),
                "name": spec["name"],
                "input": llm_gateway::providers::schema::example(&spec["inputSchema"]["json"], &prompt)
            }})
        })
        .collect();
    (content, "tool_use")
}

/// The ConverseStream frames of an answer of `content` blocks: text and tool uses, the
/// latter as `contentBlockStart` then input fragments.
pub fn content_frames(content: &[Value], stop_reason: &str) -> Vec<Frame> {
    let mut frames = vec![Frame::Event("messageStart", json!({"role": "assistant"}))];
    for (index, block) in content.iter().enumerate() {
        if let Some(text) = block["text"].as_str() {
            frames.push(Frame::Event(
                "contentBlockDelta",
                json!({"contentBlockIndex": index, "delta": {"text": text}}),
            ));
        }
        if let Some(tool_use) = block.get("toolUse") {
            frames.push(Frame::Event(
                "contentBlockStart",
                json!({"contentBlockIndex": index, "start": {"toolUse": {"toolUseId": tool_use["toolUseId"], "name": tool_use["name"]}}}),
            ));
            let input = tool_use["input"].to_string();
            let middle = input.len() / 2;
            for piece in [&input[..middle], &input[middle..]] {
                frames.push(Frame::Event(
                    "contentBlockDelta",
                    json!({"contentBlockIndex": index, "delta": {"toolUse": {"input": piece}}}),
                ));
            }
        }
        frames.push(Frame::Event(
            "contentBlockStop",
            json!({"contentBlockIndex": index}),
        ));
    }
    finish(frames, stop_reason, 9, 4)
}

/// `frames` closed as ConverseStream closes a message: the stop reason, then usage.
fn finish(mut frames: Vec<Frame>, stop_reason: &str, input: u32, output: u32) -> Vec<Frame> {
    frames.push(Frame::Event(
        "messageStop",
        json!({"stopReason": stop_reason}),
    ));
    frames.push(Frame::Event(
        "metadata",
        json!({
            "usage": {"inputTokens": input, "outputTokens": output, "totalTokens": input + output},
            "metrics": {"latencyMs": 7}
        }),
    ));
    frames
}

/// A Converse answer of `content` blocks.
pub fn converse_content_json(content: Value, stop_reason: &str) -> Value {
    json!({
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": stop_reason,
        "usage": {"inputTokens": 30, "outputTokens": 10, "totalTokens": 40},
        "metrics": {"latencyMs": 12}
    })
}

/// An event-stream frame header.
fn frame_header(name: &'static str, value: &'static str) -> Header {
    Header::new(name, HeaderValue::String(value.into()))
}

fn error(status: u16, kind: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [
            ("content-type", "application/json"),
            ("x-amzn-errortype", kind),
        ],
        json!({"message": message}).to_string(),
    )
        .into_response()
}

/// A Converse answer.
pub fn converse_json(text: &str, stop_reason: &str, input: u32, output: u32) -> Value {
    json!({
        "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
        "stopReason": stop_reason,
        "usage": {"inputTokens": input, "outputTokens": output, "totalTokens": input + output},
        "metrics": {"latencyMs": 12}
    })
}

/// The frames of a streamed reply of `pieces`.
pub fn stream_frames(pieces: &[&str], stop_reason: &str, input: u32, output: u32) -> Vec<Frame> {
    let mut frames = vec![Frame::Event("messageStart", json!({"role": "assistant"}))];
    for piece in pieces {
        frames.push(Frame::Event(
            "contentBlockDelta",
            json!({"contentBlockIndex": 0, "delta": {"text": piece}}),
        ));
    }
    frames.push(Frame::Event(
        "contentBlockStop",
        json!({"contentBlockIndex": 0}),
    ));
    finish(frames, stop_reason, input, output)
}

/// The fake's vector for `text` from `model`: deterministic, unit length, and unlike the
/// mock's and Gemini's.
pub fn fake_embedding(model: &str, text: &str, dimensions: u32) -> Vec<f32> {
    llm_gateway::providers::mock::embedding(&format!("bedrock:{model}:{text}"), dimensions)
}

/// InvokeModel (`POST /model/{modelId}/invoke`) for the embedding models: the body is
/// checked as each model documents it, and answered with deterministic vectors. A text
/// holding `[fake:fail]` answers `ServiceUnavailableException`.
fn invoke(script: &Script<Reply, Recorded>, headers: &HeaderMap, recorded: &Recorded) -> Response {
    let model = recorded
        .path
        .strip_prefix("/model/")
        .and_then(|p| p.strip_suffix("/invoke"))
        .unwrap_or_default()
        .replace("%3A", ":");
    if header(headers, "content-type") != Some("application/json") {
        return error(
            400,
            "ValidationException",
            "content-type must be application/json",
        );
    }
    match script.next() {
        Some(Reply::Error(status, kind, message)) => return error(status, kind, message),
        Some(Reply::Converse(body)) => {
            return ([("content-type", "application/json")], body.to_string()).into_response();
        }
        _ => {}
    }
    let body = &recorded.body;
    let keys: Vec<&str> = body
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let fail = |texts: &[&str]| texts.iter().any(|t| t.contains("[fake:fail]"));
    if model.starts_with("amazon.titan-embed-text-v2") {
        if let Some(key) = keys
            .iter()
            .find(|k| !["inputText", "dimensions", "normalize", "embeddingTypes"].contains(k))
        {
            return error(
                400,
                "ValidationException",
                &format!("Malformed input request: extraneous key [{key}] is not permitted"),
            );
        }
        let Some(text) = body["inputText"].as_str().filter(|t| !t.is_empty()) else {
            return error(
                400,
                "ValidationException",
                "Malformed input request: required key [inputText] not found",
            );
        };
        let dimensions = match body.get("dimensions") {
            None => 1024,
            Some(d) => match d.as_u64() {
                Some(d @ (256 | 512 | 1024)) => d as u32,
                _ => {
                    return error(
                        400,
                        "ValidationException",
                        "Malformed input request: dimensions: 256, 512 or 1024",
                    );
                }
            },
        };
        if fail(&[text]) {
            return error(503, "ServiceUnavailableException", "injected failure");
        }
        let vector = fake_embedding(&model, text, dimensions);
        let tokens = text.split_whitespace().count();
        return (
            [("content-type", "application/json")],
            json!({"embedding": vector, "inputTextTokenCount": tokens, "embeddingsByType": {"float": vector}}).to_string(),
        )
            .into_response();
    }
    if model.starts_with("cohere.embed-") {
        if let Some(key) = keys.iter().find(|k| {
            ![
                "texts",
                "images",
                "input_type",
                "truncate",
                "embedding_types",
            ]
            .contains(k)
        }) {
            return error(
                400,
                "ValidationException",
                &format!("Malformed input request: extraneous key [{key}] is not permitted"),
            );
        }
        let texts: Vec<&str> = body["texts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if texts.is_empty()
            || texts.len() > 96
            || texts.len() != body["texts"].as_array().map_or(0, Vec::len)
        {
            return error(
                400,
                "ValidationException",
                "Malformed input request: texts: 1 to 96 strings",
            );
        }
        if ![
            "search_document",
            "search_query",
            "classification",
            "clustering",
        ]
        .contains(&body["input_type"].as_str().unwrap_or_default())
        {
            return error(
                400,
                "ValidationException",
                "Malformed input request: required key [input_type] not found",
            );
        }
        if fail(&texts) {
            return error(503, "ServiceUnavailableException", "injected failure");
        }
        let vectors: Vec<Vec<f32>> = texts
            .iter()
            .map(|t| fake_embedding(&model, t, 1024))
            .collect();
        let reply = if body.get("embedding_types").is_some() {
            json!({"id": "fake-cohere", "texts": texts, "embeddings": {"float": vectors}, "response_type": "embeddings_by_type"})
        } else {
            json!({"id": "fake-cohere", "texts": texts, "embeddings": vectors, "response_type": "embeddings_floats"})
        };
        return ([("content-type", "application/json")], reply.to_string()).into_response();
    }
    error(
        400,
        "ValidationException",
        &format!("The provided model identifier is invalid: {model}"),
    )
}

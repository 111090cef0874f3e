//! Tool calling, structured output and agent-shaped histories, on all three providers,
//! streamed and not: what the provider received and what the client got.

use llm_gateway::config::ProviderKind;
use serde_json::{Value, json};
use testkit::fakes::bedrock::{
    self as fake_bedrock, FakeBedrock, Frame, converse_content_json, converse_json,
};
use testkit::fakes::gemini::{
    self as fake_gemini, FakeGemini, GEMINI_KEY, chunk_json, function_call_json, reply_json,
    signature_for,
};

use crate::helpers::{TestApp, openai_error, spawn_app, test_config, with_alias};

const BEDROCK_MODEL: &str = "anthropic.claude-3-5-haiku-20241022-v1:0";

async fn mock_app() -> TestApp {
    spawn_app(test_config()).await
}

async fn gemini_app(fake: &FakeGemini) -> TestApp {
    let mut config = test_config();
    config.llm_provider = ProviderKind::Gemini;
    config.llm_model = "gemini-2.5-flash".into();
    config.gemini_api_key = common::config::Secret::new(GEMINI_KEY);
    config.gemini_base_url = fake.url.clone();
    spawn_app(config).await
}

async fn bedrock_app(fake: &FakeBedrock) -> TestApp {
    let mut config = test_config();
    config.llm_provider = ProviderKind::Bedrock;
    config.llm_model = BEDROCK_MODEL.into();
    config.bedrock_endpoint_url = Some(fake.url.clone());
    spawn_app(config).await
}

/// The schema as callers (OpenAI strict mode, pydantic) write it.
fn weather_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "the city"},
            "unit": {"type": "string", "enum": ["c", "f"]}
        },
        "required": ["city", "unit"],
        "additionalProperties": false
    })
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "Weather for a city",
            "parameters": weather_schema(), "strict": true}},
        {"type": "function", "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
    ])
}

fn ask_with_tools(prompt: &str) -> Value {
    json!({
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "tools": tools()
    })
}

/// The tool calls of a non-streamed answer: `(id, name, arguments parsed)`.
fn calls_of(body: &Value) -> Vec<(String, String, Value)> {
    body["choices"][0]["message"]["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|call| {
            assert_eq!(call["type"], "function", "{call}");
            let arguments = call["function"]["arguments"].as_str().unwrap();
            (
                call["id"].as_str().unwrap().to_string(),
                call["function"]["name"].as_str().unwrap().to_string(),
                serde_json::from_str(arguments).unwrap(),
            )
        })
        .collect()
}

/// The tool calls of a streamed answer, accumulated as OpenAI clients do, checking the
/// delta shapes: the first piece of each index carries id, type and name, later pieces
/// only argument fragments.
fn streamed_calls(events: &[String]) -> Vec<(String, String, Value)> {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for event in events.iter().filter(|e| e.as_str() != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        for delta in chunk["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let index = delta["index"].as_u64().unwrap() as usize;
            let fragment = delta["function"]["arguments"].as_str().unwrap();
            if index == calls.len() {
                assert_eq!(delta["type"], "function", "{delta}");
                assert_eq!(fragment, "", "the first piece names the call: {delta}");
                calls.push((
                    delta["id"].as_str().unwrap().to_string(),
                    delta["function"]["name"].as_str().unwrap().to_string(),
                    String::new(),
                ));
            } else {
                assert!(index < calls.len(), "indexes count up: {delta}");
                assert!(delta.get("id").is_none(), "{delta}");
                assert!(delta["function"].get("name").is_none(), "{delta}");
                calls[index].2.push_str(fragment);
            }
        }
    }
    calls
        .into_iter()
        .map(|(id, name, args)| (id, name, serde_json::from_str(&args).unwrap()))
        .collect()
}

fn finish_of(body: &Value) -> &str {
    body["choices"][0]["finish_reason"].as_str().unwrap()
}

/// The history after the model called `calls`, with each tool's result.
fn round_trip(calls: &[(String, String, Value)], results: &[&str]) -> Value {
    let mut messages = vec![
        json!({"role": "user", "content": "weather and time in Paris"}),
        json!({"role": "assistant", "content": null, "tool_calls": calls.iter().map(|(id, name, args)| json!({
            "id": id, "type": "function",
            "function": {"name": name, "arguments": args.to_string()}
        })).collect::<Vec<_>>()}),
    ];
    for ((id, _, _), result) in calls.iter().zip(results) {
        messages.push(json!({"role": "tool", "tool_call_id": id, "content": result}));
    }
    json!({"model": "default", "messages": messages, "tools": tools()})
}

// ---- mock ----

#[tokio::test]
async fn mock_calls_the_first_tool_with_schema_arguments_then_uses_the_result() {
    let app = mock_app().await;
    let body = app.chat_json(ask_with_tools("weather in Paris")).await;
    assert_eq!(finish_of(&body), "tool_calls");
    assert!(body["choices"][0]["message"]["content"].is_null(), "{body}");
    let calls = calls_of(&body);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].1, "get_weather");
    assert_eq!(calls[0].2, json!({"city": "weather in Paris", "unit": "c"}));
    // The same conversation gets the same id.
    let again = app.chat_json(ask_with_tools("weather in Paris")).await;
    assert_eq!(calls_of(&again)[0].0, calls[0].0);

    let answer = app.chat_json(round_trip(&calls, &["18C and sunny"])).await;
    assert_eq!(finish_of(&answer), "stop");
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        text.contains("get_weather returned 18C and sunny"),
        "{text}"
    );
}

#[tokio::test]
async fn mock_honours_tool_choice_and_parallel_tool_calls() {
    let app = mock_app().await;
    let mut named = ask_with_tools("time please");
    named["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    let calls = calls_of(&app.chat_json(named).await);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].1, "get_time");
    assert_eq!(calls[0].2, json!({"zone": "time please"}));

    let parallel = ask_with_tools("both [mock:parallel]");
    let calls = calls_of(&app.chat_json(parallel.clone()).await);
    let names: Vec<&str> = calls.iter().map(|c| c.1.as_str()).collect();
    assert_eq!(names, ["get_weather", "get_time"]);
    assert_ne!(calls[0].0, calls[1].0);

    let mut single = parallel;
    single["parallel_tool_calls"] = json!(false);
    assert_eq!(calls_of(&app.chat_json(single).await).len(), 1);

    let mut none = ask_with_tools("weather in Paris");
    none["tool_choice"] = json!("none");
    let body = app.chat_json(none).await;
    assert_eq!(finish_of(&body), "stop");
    assert!(calls_of(&body).is_empty());
}

#[tokio::test]
async fn mock_streams_tool_calls_as_openai_deltas() {
    let app = mock_app().await;
    let mut request = ask_with_tools("both [mock:parallel]");
    let plain = calls_of(&app.chat_json(request.clone()).await);
    request["stream"] = json!(true);
    let reply = app.chat_stream(request).await;
    assert_eq!(reply.status, 200);
    let last: Value = serde_json::from_str(&reply.events[reply.events.len() - 2]).unwrap();
    assert_eq!(finish_of(&last), "tool_calls");
    assert_eq!(streamed_calls(&reply.events), plain);
    // Argument fragments: more than one piece per call.
    let pieces = reply
        .events
        .iter()
        .filter(|e| e.contains("\"tool_calls\""))
        .count();
    assert!(pieces >= 6, "{:?}", reply.events);
}

// ---- Gemini ----

#[tokio::test]
async fn gemini_tools_are_declared_and_calls_round_trip_with_thought_signatures() {
    let fake = FakeGemini::start().await;
    let signature = signature_for("get_weather");
    fake.push(fake_gemini::Reply::Json(
        200,
        function_call_json(
            &[
                (
                    "get_weather",
                    json!({"city": "Paris", "unit": "c"}),
                    Some(&signature),
                ),
                ("get_time", json!({"zone": "CET"}), None),
            ],
            "STOP",
        ),
    ));
    let app = gemini_app(&fake).await;
    let mut request = ask_with_tools("weather and time in Paris");
    request["tool_choice"] = json!("required");
    let body = app.chat_json(request).await;
    assert_eq!(finish_of(&body), "tool_calls");
    let calls = calls_of(&body);
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].1, "get_weather");
    assert_eq!(calls[0].2, json!({"city": "Paris", "unit": "c"}));
    assert_eq!(calls[1].1, "get_time");
    assert!(calls[0].0.starts_with("call_") && calls[0].0.ends_with(&signature));
    assert_ne!(calls[0].0, calls[1].0);

    let sent = &fake.requests()[0].body;
    assert_eq!(
        sent["tools"],
        json!([{"functionDeclarations": [
            {"name": "get_weather", "description": "Weather for a city", "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "the city"},
                    "unit": {"type": "string", "enum": ["c", "f"]}
                },
                "required": ["city", "unit"]
            }},
            {"name": "get_time", "parameters": {
                "type": "object", "properties": {"zone": {"type": "string"}}}}
        ]}])
    );
    assert_eq!(
        sent["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY"}})
    );

    // The next turn: the calls go back with the signature, results by function name.
    fake.push(fake_gemini::Reply::Json(
        200,
        reply_json("18C at 10:00", "STOP", 40, 5),
    ));
    let answer = app
        .chat_json(round_trip(&calls, &[r#"{"temp": 18}"#, "10:00"]))
        .await;
    assert_eq!(answer["choices"][0]["message"]["content"], "18C at 10:00");
    assert_eq!(finish_of(&answer), "stop");
    let sent = &fake.requests()[1].body;
    assert_eq!(
        sent["contents"],
        json!([
            {"role": "user", "parts": [{"text": "weather and time in Paris"}]},
            {"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris", "unit": "c"}},
                 "thoughtSignature": signature},
                {"functionCall": {"name": "get_time", "args": {"zone": "CET"}}}
            ]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp": 18}}},
                {"functionResponse": {"name": "get_time", "response": {"result": "10:00"}}}
            ]}
        ])
    );
}

#[tokio::test]
async fn gemini_streamed_function_calls_become_openai_deltas() {
    let fake = FakeGemini::start().await;
    fake.always(fake_gemini::Reply::Auto);
    let app = gemini_app(&fake).await;
    let mut request = ask_with_tools("Paris [mock:parallel]");
    let plain = calls_of(&app.chat_json(request.clone()).await);
    request["stream"] = json!(true);
    let reply = app.chat_stream(request).await;
    reply.assert_finished("tool_calls", crate::helpers::usage(7, 5));
    let streamed = streamed_calls(&reply.events);
    assert_eq!(streamed, plain, "the same answer gets the same ids");
    assert_eq!(streamed.len(), 2);
    assert!(streamed[0].0.ends_with(&signature_for("get_weather")));

    // The streamed ids carry the signature back, as the fake requires.
    let answer = app
        .chat_json(round_trip(&streamed, &["18C", "10:00"]))
        .await;
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("get_time="), "{text}");
}

#[tokio::test]
async fn gemini_tool_choice_modes_map_to_function_calling_config() {
    let fake = FakeGemini::start().await;
    fake.always(fake_gemini::Reply::Auto);
    let app = gemini_app(&fake).await;
    let cases = [
        (json!("auto"), json!({"mode": "AUTO"})),
        (json!("none"), json!({"mode": "NONE"})),
        (
            json!({"type": "function", "function": {"name": "get_time"}}),
            json!({"mode": "ANY", "allowedFunctionNames": ["get_time"]}),
        ),
    ];
    for (i, (choice, config)) in cases.into_iter().enumerate() {
        let mut request = ask_with_tools("hi");
        request["tool_choice"] = choice;
        let body = app.chat_json(request).await;
        let sent = &fake.requests()[i].body;
        assert_eq!(sent["toolConfig"]["functionCallingConfig"], config);
        if i == 2 {
            assert_eq!(calls_of(&body)[0].1, "get_time");
        }
    }
}

#[tokio::test]
async fn gemini_refusals_never_become_a_normal_stop() {
    let fake = FakeGemini::start().await;
    fake.push(fake_gemini::Reply::Json(
        200,
        reply_json("", "SAFETY", 4, 0),
    ));
    let app = gemini_app(&fake).await;
    let body = app.chat_json(ask_with_tools("hi")).await;
    assert_eq!(finish_of(&body), "content_filter");

    fake.always(fake_gemini::Reply::Json(
        200,
        reply_json("", "MALFORMED_FUNCTION_CALL", 4, 0),
    ));
    let error = openai_error(app.chat(ask_with_tools("hi")).await, 502).await;
    assert_eq!(error["error"]["code"], "upstream_malformed_output");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MALFORMED_FUNCTION_CALL")
    );
    // Retried like any model failure (1 + MAX_RETRIES attempts), then reported.
    assert_eq!(fake.requests().len(), 1 + 3);

    fake.always(fake_gemini::Reply::Sse(vec![chunk_json(
        "",
        Some("MALFORMED_FUNCTION_CALL"),
        Some((4, 0)),
    )]));
    let mut request = ask_with_tools("hi");
    request["stream"] = json!(true);
    let error = openai_error(app.chat(request).await, 502).await;
    assert_eq!(error["error"]["code"], "upstream_malformed_output");
}

#[tokio::test]
async fn gemini_schema_keywords_it_lacks_are_refused_by_name_before_sending() {
    let fake = FakeGemini::start().await;
    let app = gemini_app(&fake).await;
    let mut request = ask_with_tools("hi");
    request["tools"][1]["function"]["parameters"]["properties"]["zone"] =
        json!({"type": "string", "not": {"const": "UTC"}});
    let error = openai_error(app.chat(request.clone()).await, 400).await;
    assert_eq!(error["error"]["param"], "tools[1].function.parameters");
    assert_eq!(error["error"]["code"], "invalid_request");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("`not`"), "{message}");
    assert!(message.contains("/properties/zone"), "{message}");
    assert!(fake.requests().is_empty());

    // A provider that cannot express the request is fallen back from, not retried.
    let mut config = test_config();
    config.gemini_api_key = common::config::Secret::new(GEMINI_KEY);
    config.gemini_base_url = fake.url.clone();
    let config = with_alias(
        config,
        "default",
        &[
            (ProviderKind::Gemini, "gemini-2.5-flash"),
            (ProviderKind::Mock, "mock-1"),
        ],
    );
    let app = spawn_app(config).await;
    let response = app.chat(request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ensemble-provider"], "mock");
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn gemini_json_schema_becomes_a_response_schema() {
    let fake = FakeGemini::start().await;
    fake.push(fake_gemini::Reply::Json(
        200,
        reply_json(r#"{"city":"Paris","unit":"c"}"#, "STOP", 5, 5),
    ));
    let app = gemini_app(&fake).await;
    let body = app
        .chat_json(json!({
            "model": "default",
            "messages": [{"role": "user", "content": "weather"}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "weather", "strict": true, "schema": weather_schema()}}
        }))
        .await;
    assert_eq!(
        body["choices"][0]["message"]["content"],
        r#"{"city":"Paris","unit":"c"}"#
    );
    let config = &fake.requests()[0].body["generationConfig"];
    assert_eq!(config["responseMimeType"], "application/json");
    assert_eq!(
        config["responseSchema"]["properties"]["unit"],
        json!({"type": "string", "enum": ["c", "f"]})
    );
    assert!(
        config["responseSchema"]
            .get("additionalProperties")
            .is_none()
    );
}

// ---- Bedrock ----

#[tokio::test]
async fn bedrock_tools_are_declared_and_tool_blocks_round_trip() {
    let fake = FakeBedrock::start().await;
    fake.push(fake_bedrock::Reply::Converse(converse_content_json(
        json!([
            {"text": "Let me check."},
            {"toolUse": {"toolUseId": "tooluse_a1", "name": "get_weather", "input": {"city": "Paris", "unit": "c"}}},
            {"toolUse": {"toolUseId": "tooluse_b2", "name": "get_time", "input": {"zone": "CET"}}}
        ]),
        "tool_use",
    )));
    let app = bedrock_app(&fake).await;
    let body = app.chat_json(ask_with_tools("weather and time")).await;
    assert_eq!(finish_of(&body), "tool_calls");
    assert_eq!(body["choices"][0]["message"]["content"], "Let me check.");
    let calls = calls_of(&body);
    assert_eq!(
        calls,
        vec![
            (
                "tooluse_a1".to_string(),
                "get_weather".to_string(),
                json!({"city": "Paris", "unit": "c"})
            ),
            (
                "tooluse_b2".to_string(),
                "get_time".to_string(),
                json!({"zone": "CET"})
            ),
        ]
    );
    let sent = &fake.requests()[0].body;
    assert_eq!(
        sent["toolConfig"]["tools"][0],
        json!({"toolSpec": {"name": "get_weather", "description": "Weather for a city",
                            "inputSchema": {"json": weather_schema()}}})
    );
    assert_eq!(sent["toolConfig"]["toolChoice"], json!({"auto": {}}));

    fake.push(fake_bedrock::Reply::Converse(converse_json(
        "18C at 10:00",
        "end_turn",
        50,
        5,
    )));
    let answer = app.chat_json(round_trip(&calls, &["18C", "10:00"])).await;
    assert_eq!(answer["choices"][0]["message"]["content"], "18C at 10:00");
    let sent = &fake.requests()[1].body;
    assert_eq!(
        sent["messages"][1],
        json!({"role": "assistant", "content": [
            {"toolUse": {"toolUseId": "tooluse_a1", "name": "get_weather", "input": {"city": "Paris", "unit": "c"}}},
            {"toolUse": {"toolUseId": "tooluse_b2", "name": "get_time", "input": {"zone": "CET"}}}
        ]})
    );
    assert_eq!(
        sent["messages"][2],
        json!({"role": "user", "content": [
            {"toolResult": {"toolUseId": "tooluse_a1", "content": [{"text": "18C"}]}},
            {"toolResult": {"toolUseId": "tooluse_b2", "content": [{"text": "10:00"}]}}
        ]})
    );
}

#[tokio::test]
async fn bedrock_streamed_tool_use_becomes_openai_deltas() {
    let fake = FakeBedrock::start().await;
    fake.always(fake_bedrock::Reply::Auto);
    let app = bedrock_app(&fake).await;
    let mut request = ask_with_tools("Paris [mock:parallel]");
    request["tool_choice"] = json!("required");
    let plain = calls_of(&app.chat_json(request.clone()).await);
    assert_eq!(plain.len(), 2);
    request["stream"] = json!(true);
    let reply = app.chat_stream(request).await;
    reply.assert_finished("tool_calls", crate::helpers::usage(9, 4));
    assert_eq!(streamed_calls(&reply.events), plain);
    let sent = &fake.requests()[1].body;
    assert_eq!(sent["toolConfig"]["toolChoice"], json!({"any": {}}));

    let mut named = ask_with_tools("time");
    named["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    let calls = calls_of(&app.chat_json(named).await);
    assert_eq!(calls[0].1, "get_time");
    assert_eq!(
        fake.requests()[2].body["toolConfig"]["toolChoice"],
        json!({"tool": {"name": "get_time"}})
    );
}

#[tokio::test]
async fn bedrock_refusals_never_become_a_normal_stop() {
    let fake = FakeBedrock::start().await;
    let app = bedrock_app(&fake).await;
    for (reason, finish) in [
        ("guardrail_intervened", "content_filter"),
        ("content_filtered", "content_filter"),
        ("max_tokens", "length"),
    ] {
        fake.push(fake_bedrock::Reply::Converse(converse_json(
            "", reason, 3, 0,
        )));
        let body = app.chat_json(ask_with_tools("hi")).await;
        assert_eq!(finish_of(&body), finish, "{reason}");
        fake.push(fake_bedrock::Reply::Stream(vec![
            Frame::Event("messageStart", json!({"role": "assistant"})),
            Frame::Event("messageStop", json!({"stopReason": reason})),
        ]));
        let mut request = ask_with_tools("hi");
        request["stream"] = json!(true);
        let reply = app.chat_stream(request).await;
        reply.assert_finished(finish, crate::helpers::usage(0, 0));
    }
    fake.always(fake_bedrock::Reply::Converse(converse_json(
        "",
        "malformed_tool_use",
        3,
        0,
    )));
    let error = openai_error(app.chat(ask_with_tools("hi")).await, 502).await;
    assert_eq!(error["error"]["code"], "upstream_malformed_output");
}

#[tokio::test]
async fn bedrock_json_output_is_a_forced_tool_whose_input_is_the_answer() {
    let fake = FakeBedrock::start().await;
    fake.always(fake_bedrock::Reply::Auto);
    let app = bedrock_app(&fake).await;
    let mut request = json!({
        "model": "default",
        "messages": [{"role": "user", "content": "weather in Paris"}],
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "weather", "schema": weather_schema()}}
    });
    let body = app.chat_json(request.clone()).await;
    assert_eq!(finish_of(&body), "stop");
    let content: Value =
        serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(content, json!({"city": "weather in Paris", "unit": "c"}));
    let sent = &fake.requests()[0].body;
    assert_eq!(
        sent["toolConfig"]["toolChoice"],
        json!({"tool": {"name": "weather"}})
    );
    assert_eq!(
        sent["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"]["json"],
        weather_schema()
    );

    request["stream"] = json!(true);
    let reply = app.chat_stream(request.clone()).await;
    reply.assert_finished("stop", crate::helpers::usage(9, 4));
    let streamed: Value = serde_json::from_str(&reply.content()).unwrap();
    assert_eq!(streamed, content);

    // With tools too, the forced tool cannot work: refused, naming the field.
    request["stream"] = json!(false);
    request["tools"] = tools();
    let error = openai_error(app.chat(request).await, 400).await;
    assert_eq!(error["error"]["param"], "response_format");
}

// ---- conversations as agent frameworks send them ----

/// AG2's two-agent chat opens with the model's turn; executors send empty replies.
fn agent_history() -> Value {
    json!({
        "model": "default",
        "messages": [
            {"role": "system", "content": "You are a helpful AI assistant."},
            {"role": "assistant", "content": "What should I do?"},
            {"role": "user", "content": ""},
            {"role": "user", "content": "Plan a trip."},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": [{"type": "text", "text": ""}]},
            {"role": "user", "content": "Go on."}
        ]
    })
}

#[tokio::test]
async fn agent_histories_are_accepted_by_every_provider() {
    let gemini = FakeGemini::start().await;
    gemini.always(fake_gemini::Reply::Auto);
    let app = gemini_app(&gemini).await;
    let body = app.chat_json(agent_history()).await;
    assert_eq!(finish_of(&body), "stop");
    assert_eq!(
        gemini.requests()[0].body["contents"],
        json!([
            {"role": "user", "parts": [{"text": "(conversation start)"}]},
            {"role": "model", "parts": [{"text": "What should I do?"}]},
            {"role": "user", "parts": [{"text": "Plan a trip."}, {"text": "Go on."}]}
        ])
    );

    // A history ending with the model's turn: Gemini has no prefill, the user asks on.
    let mut ending = agent_history();
    ending["messages"]
        .as_array_mut()
        .unwrap()
        .push(json!({"role": "assistant", "content": "Day 1: Lyon."}));
    app.chat_json(ending.clone()).await;
    let contents = gemini.requests()[1].body["contents"].clone();
    assert_eq!(
        contents[contents.as_array().unwrap().len() - 1],
        json!({"role": "user", "parts": [{"text": "Continue."}]})
    );

    let bedrock = FakeBedrock::start().await;
    bedrock.always(fake_bedrock::Reply::Auto);
    let app = bedrock_app(&bedrock).await;
    app.chat_json(agent_history()).await;
    // Converse keeps a last assistant turn (a prefill, which Claude continues).
    app.chat_json(ending).await;
    assert_eq!(
        bedrock.requests()[1].body["messages"][3]["role"],
        "assistant"
    );
    let sent = &bedrock.requests()[0].body;
    assert_eq!(sent["messages"][0]["role"], "user");
    assert_eq!(sent["messages"].as_array().unwrap().len(), 3);

    let app = mock_app().await;
    let body = app.chat_json(agent_history()).await;
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Go on."), "{text}");
}

#[tokio::test]
async fn histories_with_tool_calls_but_no_tools_still_reach_bedrock() {
    // Converse refuses tool blocks without a toolConfig: the history's functions are
    // declared for it.
    let fake = FakeBedrock::start().await;
    fake.always(fake_bedrock::Reply::Auto);
    let app = bedrock_app(&fake).await;
    let calls = vec![(
        "tooluse_x".to_string(),
        "get_weather".to_string(),
        json!({"city": "Paris"}),
    )];
    let mut request = round_trip(&calls, &["18C"]);
    request.as_object_mut().unwrap().remove("tools");
    let body = app.chat_json(request).await;
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("tooluse_x=18C"), "{text}");
    let sent = &fake.requests()[0].body;
    assert_eq!(
        sent["toolConfig"]["tools"][0]["toolSpec"]["name"],
        "get_weather"
    );
}

#[tokio::test]
async fn fields_that_change_the_meaning_are_refused_by_name() {
    let app = mock_app().await;
    let base = || json!({"model": "default", "messages": [{"role": "user", "content": "hi"}]});
    let cases = [
        ("n", json!(2)),
        ("functions", json!([{"name": "f", "parameters": {}}])),
        ("function_call", json!("auto")),
        ("logprobs", json!(true)),
        ("logit_bias", json!({"50256": -100})),
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("frobnicate", json!(1)),
        ("tool_choice", json!("required")),
    ];
    for (field, value) in cases {
        let mut request = base();
        request[field] = value;
        let error = openai_error(app.chat(request).await, 400).await;
        assert_eq!(error["error"]["param"], field, "{error}");
    }
    // Safe to ignore: the answer means the same.
    let mut request = base();
    for (field, value) in [
        ("seed", json!(7)),
        ("user", json!("u1")),
        ("n", json!(1)),
        ("logprobs", json!(false)),
        ("stream_options", json!({"include_usage": true})),
        ("metadata", json!({"k": "v"})),
    ] {
        request[field] = value;
    }
    app.chat_json(request).await;

    let mut unknown_id = round_trip(
        &[("call_1".to_string(), "get_time".to_string(), json!({}))],
        &["x"],
    );
    unknown_id["messages"][2]["tool_call_id"] = json!("call_2");
    let error = openai_error(app.chat(unknown_id).await, 400).await;
    assert_eq!(error["error"]["param"], "messages[2].tool_call_id");
}

#[tokio::test]
async fn a_conversation_with_tool_calls_moves_between_providers() {
    let gemini = FakeGemini::start().await;
    gemini.always(fake_gemini::Reply::Auto);
    let bedrock = FakeBedrock::start().await;
    bedrock.always(fake_bedrock::Reply::Auto);
    let mut config = test_config();
    config.gemini_api_key = common::config::Secret::new(GEMINI_KEY);
    config.gemini_base_url = gemini.url.clone();
    config.bedrock_endpoint_url = Some(bedrock.url.clone());
    let config = with_alias(
        config,
        "g",
        &[(ProviderKind::Gemini, "gemini-3-pro-preview")],
    );
    let config = with_alias(config, "b", &[(ProviderKind::Bedrock, BEDROCK_MODEL)]);
    let app = spawn_app(config).await;
    let on = |mut request: Value, alias: &str| {
        request["model"] = json!(alias);
        request
    };

    // Gemini's ids (carrying thought signatures) go on to Bedrock as valid toolUseIds.
    let calls = calls_of(
        &app.chat_json(on(ask_with_tools("Paris [mock:parallel]"), "g"))
            .await,
    );
    assert!(calls[0].0.contains('.'), "{calls:?}");
    let body = app
        .chat_json(on(round_trip(&calls, &["18C", "10:00"]), "b"))
        .await;
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("=18C") && text.contains("=10:00"), "{text}");

    // Bedrock's calls carry no signature; Gemini 3 gets Google's placeholder for them.
    let calls = calls_of(
        &app.chat_json(on(ask_with_tools("Paris [mock:parallel]"), "b"))
            .await,
    );
    let body = app
        .chat_json(on(round_trip(&calls, &["18C", "10:00"]), "g"))
        .await;
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        text.contains("get_weather=") && text.contains("get_time="),
        "{text}"
    );
}

#[tokio::test]
async fn unanswered_calls_and_results_after_text_are_normalised_for_every_provider() {
    // A framework dropped one result and put the user's text before the other.
    let request = json!({
        "model": "default",
        "tools": tools(),
        "messages": [
            {"role": "user", "content": "weather and time"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "tooluse_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "tooluse_2", "type": "function",
                 "function": {"name": "get_time", "arguments": "{}"}}]},
            {"role": "user", "content": "Only the time, please."},
            {"role": "tool", "tool_call_id": "tooluse_2", "content": "10:00"}
        ]
    });
    let bedrock = FakeBedrock::start().await;
    bedrock.always(fake_bedrock::Reply::Auto);
    let app = bedrock_app(&bedrock).await;
    app.chat_json(request.clone()).await;
    assert_eq!(
        bedrock.requests()[0].body["messages"][2]["content"],
        json!([
            {"toolResult": {"toolUseId": "tooluse_1",
                            "content": [{"text": "(no result was returned for this call)"}]}},
            {"toolResult": {"toolUseId": "tooluse_2", "content": [{"text": "10:00"}]}},
            {"text": "Only the time, please."}
        ])
    );

    let gemini = FakeGemini::start().await;
    gemini.always(fake_gemini::Reply::Auto);
    let mut config = test_config();
    config.gemini_api_key = common::config::Secret::new(GEMINI_KEY);
    config.gemini_base_url = gemini.url.clone();
    let config = with_alias(
        config,
        "default",
        &[(ProviderKind::Gemini, "gemini-3-flash")],
    );
    let app = spawn_app(config).await;
    app.chat_json(request.clone()).await;
    let parts = &gemini.requests()[0].body["contents"][2]["parts"];
    assert_eq!(parts.as_array().unwrap().len(), 3, "{parts}");

    let app = mock_app().await;
    app.chat_json(request).await;
}

//! A real OpenAI client library (`async-openai`) talking to the gateway over the mock.

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    CreateChatCompletionRequestArgs, FinishReason, ResponseFormat,
};
use futures::StreamExt;
use llm_gateway::config::ProviderKind;
use testkit::fakes::gemini::{FakeGemini, GEMINI_KEY, Reply, reply_json};

use crate::helpers::{TOKEN, TestApp, spawn_app, test_config, with_alias};

fn client(app: &TestApp) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", app.address))
            .with_api_key(TOKEN),
    )
}

#[tokio::test]
async fn non_streaming_completion() {
    let app = spawn_app(test_config()).await;
    let request = CreateChatCompletionRequestArgs::default()
        .model("default")
        .messages([
            ChatCompletionRequestSystemMessage::from("You are terse.").into(),
            ChatCompletionRequestUserMessage::from("What is the capital of France?").into(),
        ])
        .max_tokens(200u32)
        .temperature(0.1)
        .build()
        .unwrap();
    let response = client(&app).chat().create(request).await.unwrap();
    assert_eq!(response.object, "chat.completion");
    assert_eq!(response.model, "default");
    let choice = &response.choices[0];
    let content = choice.message.content.as_deref().unwrap();
    assert!(
        content.contains("What is the capital of France?"),
        "{content}"
    );
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
    let usage = response.usage.unwrap();
    assert!(usage.prompt_tokens > 0 && usage.completion_tokens > 0);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );

    // The same prompt gets the same reply from the mock.
    let again = CreateChatCompletionRequestArgs::default()
        .model("default")
        .messages([
            ChatCompletionRequestSystemMessage::from("You are terse.").into(),
            ChatCompletionRequestUserMessage::from("What is the capital of France?").into(),
        ])
        .build()
        .unwrap();
    let again = client(&app).chat().create(again).await.unwrap();
    assert_eq!(again.choices[0].message.content.as_deref(), Some(content));
}

#[tokio::test]
async fn json_response_format_gives_a_json_object() {
    let app = spawn_app(test_config()).await;
    let request = CreateChatCompletionRequestArgs::default()
        .model("default")
        .messages([ChatCompletionRequestUserMessage::from("three colours").into()])
        .response_format(ResponseFormat::JsonObject)
        .build()
        .unwrap();
    let response = client(&app).chat().create(request).await.unwrap();
    let content = response.choices[0].message.content.clone().unwrap();
    let value: serde_json::Value = serde_json::from_str(&content).unwrap();
    assert!(value.is_object(), "{content}");
}

#[tokio::test]
async fn streaming_completion() {
    let app = spawn_app(test_config()).await;
    let request = CreateChatCompletionRequestArgs::default()
        .model("default")
        .messages([ChatCompletionRequestUserMessage::from("Tell me a short story").into()])
        .stream(true)
        .build()
        .unwrap();
    let mut stream = client(&app).chat().create_stream(request).await.unwrap();
    let mut text = String::new();
    let mut chunks = 0;
    let mut finish = None;
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert_eq!(chunk.object, "chat.completion.chunk");
        chunks += 1;
        if let Some(choice) = chunk.choices.first() {
            if let Some(content) = &choice.delta.content {
                text.push_str(content);
            }
            if choice.finish_reason.is_some() {
                finish = choice.finish_reason;
            }
        }
        if chunk.usage.is_some() {
            usage = chunk.usage;
        }
    }
    assert!(chunks > 3, "{chunks} chunks");
    assert!(text.contains("Tell me a short story"), "{text}");
    assert_eq!(finish, Some(FinishReason::Stop));
    assert!(usage.unwrap().completion_tokens > 0);

    // The streamed text is the non-streamed reply.
    let whole = CreateChatCompletionRequestArgs::default()
        .model("default")
        .messages([ChatCompletionRequestUserMessage::from("Tell me a short story").into()])
        .build()
        .unwrap();
    let whole = client(&app).chat().create(whole).await.unwrap();
    assert_eq!(
        whole.choices[0].message.content.as_deref(),
        Some(text.as_str())
    );
}

#[tokio::test]
async fn models_lists_the_aliases() {
    let config = with_alias(test_config(), "fast", &[(ProviderKind::Mock, "mock-fast")]);
    let app = spawn_app(config).await;
    let models = client(&app).models().list().await.unwrap();
    let ids: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["default", "fast"]);
    let one = client(&app).models().retrieve("fast").await.unwrap();
    assert_eq!(one.owned_by, "mock");
}

#[tokio::test]
async fn client_errors_surface_as_api_errors() {
    let app = spawn_app(test_config()).await;
    let request = CreateChatCompletionRequestArgs::default()
        .model("no-such-model")
        .messages([ChatCompletionRequestUserMessage::from("hi").into()])
        .build()
        .unwrap();
    match client(&app).chat().create(request).await {
        Err(async_openai::error::OpenAIError::ApiError(e)) => {
            assert_eq!(e.api_error.code.as_deref(), Some("model_not_found"));
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn tool_calls_round_trip_plain_and_streamed() {
    use async_openai::types::chat::{
        ChatCompletionMessageToolCalls, ChatCompletionRequestAssistantMessageArgs,
        ChatCompletionRequestMessage, ChatCompletionRequestToolMessageArgs, ChatCompletionTool,
        ChatCompletionTools, FunctionObject,
    };
    let app = spawn_app(test_config()).await;
    let tools = vec![
        ChatCompletionTools::Function(ChatCompletionTool {
            function: FunctionObject {
                name: "get_weather".into(),
                description: Some("Weather for a city".into()),
                parameters: Some(serde_json::json!({
                    "type": "object", "properties": {"city": {"type": "string"}}})),
                strict: None,
            },
        }),
        ChatCompletionTools::Function(ChatCompletionTool {
            function: FunctionObject {
                name: "get_time".into(),
                description: None,
                parameters: None,
                strict: None,
            },
        }),
    ];
    let mut messages: Vec<ChatCompletionRequestMessage> =
        vec![ChatCompletionRequestUserMessage::from("Paris [mock:parallel]").into()];
    let request = |messages: &[ChatCompletionRequestMessage], stream: bool| {
        CreateChatCompletionRequestArgs::default()
            .model("default")
            .messages(messages.to_vec())
            .tools(tools.clone())
            .stream(stream)
            .build()
            .unwrap()
    };
    let response = client(&app)
        .chat()
        .create(request(&messages, false))
        .await
        .unwrap();
    let choice = &response.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls));
    let calls: Vec<_> = choice
        .message
        .tool_calls
        .clone()
        .unwrap()
        .into_iter()
        .map(|c| match c {
            ChatCompletionMessageToolCalls::Function(call) => call,
            other => panic!("{other:?}"),
        })
        .collect();
    let names: Vec<&str> = calls.iter().map(|c| c.function.name.as_str()).collect();
    assert_eq!(names, ["get_weather", "get_time"]);
    assert_eq!(calls[1].function.arguments, "{}");

    // Streamed: the deltas accumulate to the same calls.
    let mut stream = client(&app)
        .chat()
        .create_stream(request(&messages, true))
        .await
        .unwrap();
    let mut streamed: Vec<(String, String, String)> = Vec::new();
    let mut finish = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        let Some(choice) = chunk.choices.first() else {
            continue;
        };
        for delta in choice.delta.tool_calls.iter().flatten() {
            let index = delta.index as usize;
            if index == streamed.len() {
                streamed.push(Default::default());
            }
            let function = delta.function.clone().unwrap_or_default();
            if let Some(id) = &delta.id {
                streamed[index].0 = id.clone();
            }
            if let Some(name) = function.name {
                streamed[index].1 = name;
            }
            streamed[index].2 += &function.arguments.unwrap_or_default();
        }
        finish = choice.finish_reason.or(finish);
    }
    assert_eq!(finish, Some(FinishReason::ToolCalls));
    let plain: Vec<(String, String, String)> = calls
        .iter()
        .map(|c| {
            (
                c.id.clone(),
                c.function.name.clone(),
                c.function.arguments.clone(),
            )
        })
        .collect();
    assert_eq!(streamed, plain);

    // The results go back as tool messages; the answer uses them.
    messages.push(
        ChatCompletionRequestAssistantMessageArgs::default()
            .tool_calls(choice.message.tool_calls.clone().unwrap())
            .build()
            .unwrap()
            .into(),
    );
    for (call, result) in calls.iter().zip(["18C", "10:00"]) {
        messages.push(
            ChatCompletionRequestToolMessageArgs::default()
                .tool_call_id(call.id.clone())
                .content(result)
                .build()
                .unwrap()
                .into(),
        );
    }
    let answer = client(&app)
        .chat()
        .create(request(&messages, false))
        .await
        .unwrap();
    let text = answer.choices[0].message.content.clone().unwrap();
    assert!(text.contains("get_weather returned 18C"), "{text}");
    assert!(text.contains("get_time returned 10:00"), "{text}");
    assert_eq!(answer.choices[0].finish_reason, Some(FinishReason::Stop));
}

#[tokio::test]
async fn embeddings_plain_base64_and_refused() {
    use async_openai::types::embeddings::{CreateEmbeddingRequestArgs, EncodingFormat};
    let app = spawn_app(with_alias(
        test_config(),
        "embed",
        &[(ProviderKind::Mock, "mock-embed")],
    ))
    .await;
    let client = client(&app);
    let request = CreateEmbeddingRequestArgs::default()
        .model("embed")
        .input(vec!["alpha", "beta", "alpha"])
        .dimensions(48u32)
        .build()
        .unwrap();
    let reply = client.embeddings().create(request).await.unwrap();
    assert_eq!(reply.model, "embed");
    assert_eq!(reply.data.len(), 3);
    assert!(reply.data.iter().all(|d| d.embedding.len() == 48));
    assert_eq!(reply.data[0].embedding, reply.data[2].embedding);
    assert_ne!(reply.data[0].embedding, reply.data[1].embedding);
    assert!(reply.usage.prompt_tokens > 0);

    let request = CreateEmbeddingRequestArgs::default()
        .model("embed")
        .input(vec!["alpha", "beta", "alpha"])
        .dimensions(48u32)
        .encoding_format(EncodingFormat::Base64)
        .build()
        .unwrap();
    let encoded = client.embeddings().create_base64(request).await.unwrap();
    for (data, plain) in encoded.data.into_iter().zip(&reply.data) {
        let decoded: Vec<f32> = data.embedding.into();
        assert_eq!(&decoded, &plain.embedding);
    }

    let request = CreateEmbeddingRequestArgs::default()
        .model("embed")
        .input(vec![vec![1u32, 2, 3]])
        .build()
        .unwrap();
    match client.embeddings().create(request).await {
        Err(async_openai::error::OpenAIError::ApiError(e)) => {
            assert_eq!(e.api_error.param.as_deref(), Some("input"));
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A client that names an Ensemble task and step and keys its calls, as the worker's `llm`
/// agent does, through `async-openai`'s extra headers.
fn keyed_client(app: &TestApp, task: &str, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", app.address))
            .with_api_key(TOKEN)
            .with_header("x-ensemble-task-id", task)
            .unwrap()
            .with_header("x-ensemble-step-id", "plan")
            .unwrap()
            .with_header("idempotency-key", key)
            .unwrap(),
    )
}

#[tokio::test]
async fn replay_ledger_and_a_task_budget_through_async_openai() {
    use common::redis::client as redis;
    let server = testkit::RedisServer::start();
    let fake = FakeGemini::start().await;
    fake.push(Reply::Json(200, reply_json("Paris.", "STOP", 12, 3)));
    let settings = server.settings();
    let mut config = test_config();
    config.llm_provider = ProviderKind::Gemini;
    config.llm_model = "gemini-2.5-flash".into();
    config.gemini_api_key = common::config::Secret::new(GEMINI_KEY);
    config.gemini_base_url = fake.url.clone();
    config.use_redis = true;
    config.redis = settings.clone();
    let app = spawn_app(config).await;
    let request = || {
        CreateChatCompletionRequestArgs::default()
            .model("default")
            .messages([ChatCompletionRequestUserMessage::from("Capital of France?").into()])
            .build()
            .unwrap()
    };

    // The same key twice: one provider call, the same answer, one call in the ledger.
    let client = keyed_client(&app, "task-a", "task-a/plan");
    let first = client.chat().create(request()).await.unwrap();
    let again = client.chat().create(request()).await.unwrap();
    assert_eq!(again.choices[0].message.content.as_deref(), Some("Paris."));
    assert_eq!(
        first.choices[0].message.content,
        again.choices[0].message.content
    );
    assert_eq!(fake.requests().len(), 1, "the replay called the provider");
    let pool = common::redis::RedisPool::new(&settings).unwrap();
    let mut conn = pool.get().await.unwrap();
    let usage_key = common::usage::task_usage_key(&settings.key_prefix, "task-a");
    let calls: Option<u64> = redis::cmd("HGET")
        .arg(&usage_key)
        .arg("step:plan:calls")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(calls, Some(1), "a replay is not spent again");

    // A task whose budget is spent: the SDK sees a 429 with code `budget_exceeded`.
    let _: () = redis::cmd("HSET")
        .arg(common::usage::task_usage_key(
            &settings.key_prefix,
            "task-b",
        ))
        .arg(common::usage::BUDGET_TOKENS)
        .arg(10)
        .arg(common::usage::IN)
        .arg(15)
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = keyed_client(&app, "task-b", "task-b/plan")
        .chat()
        .create(request())
        .await
        .unwrap_err();
    match err {
        async_openai::error::OpenAIError::ApiError(e) => {
            assert_eq!(
                e.api_error.code.as_deref(),
                Some("budget_exceeded"),
                "{e:?}"
            );
        }
        other => panic!("expected the gateway's 429: {other:?}"),
    }
    assert_eq!(
        fake.requests().len(),
        1,
        "a refused call reaches no provider"
    );
}

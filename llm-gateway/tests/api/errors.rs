//! Bad input, auth, unknown models and routes: every error in OpenAI's shape.

use serde_json::{Value, json};

use crate::helpers::{TOKEN, ask, openai_error, spawn_app, test_config};

#[tokio::test]
async fn malformed_json_is_a_400() {
    let app = spawn_app(test_config()).await;
    let response = app
        .http
        .post(format!("{}/v1/chat/completions", app.address))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(r#"{"model": "default", "messages": [}"#)
        .send()
        .await
        .unwrap();
    let body = openai_error(response, 400).await;
    assert_eq!(body["error"]["code"], "invalid_json");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn a_wrong_field_is_a_400_naming_it() {
    let app = spawn_app(test_config()).await;
    let body = openai_error(
        app.chat(json!({"model": "default", "messages": [{"role": "wizard", "content": "x"}]}))
            .await,
        400,
    )
    .await;
    assert_eq!(body["error"]["param"], "messages[0].role", "{body}");

    let body = openai_error(
        app.chat(json!({"model": "default", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}))
            .await,
        400,
    )
    .await;
    assert_eq!(body["error"]["param"], "temperature", "{body}");

    let body = openai_error(app.chat(json!({"messages": []})).await, 400).await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("model"),
        "{body}"
    );
}

#[tokio::test]
async fn an_unknown_model_is_a_404() {
    let app = spawn_app(test_config()).await;
    let body = openai_error(app.chat(ask("gpt-17", "hi")).await, 404).await;
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gpt-17")
    );
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_a_401() {
    let app = spawn_app(test_config()).await;
    let url = format!("{}/v1/chat/completions", app.address);
    let wrong = app
        .http
        .post(&url)
        .bearer_auth("not-the-token")
        .json(&ask("default", "hi"))
        .send()
        .await
        .unwrap();
    let body = openai_error(wrong, 401).await;
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let missing = app
        .http
        .post(&url)
        .json(&ask("default", "hi"))
        .send()
        .await
        .unwrap();
    openai_error(missing, 401).await;
    let models = app
        .http
        .get(format!("{}/v1/models", app.address))
        .send()
        .await
        .unwrap();
    openai_error(models, 401).await;
}

#[tokio::test]
async fn auth_can_be_disabled_for_local_use() {
    let mut config = test_config();
    config.gateway_token = common::config::Secret::default();
    config.auth_disabled = true;
    let app = spawn_app(config).await;
    let response = app
        .http
        .post(format!("{}/v1/chat/completions", app.address))
        .json(&ask("default", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn the_gateway_refuses_to_start_without_a_token() {
    let mut config = test_config();
    config.gateway_token = common::config::Secret::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = llm_gateway::serve(config, listener, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("GATEWAY_TOKEN"), "{err:#}");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_openai_shape() {
    let app = spawn_app(test_config()).await;
    let response = app
        .http
        .get(format!("{}/v1/nothing", app.address))
        .send()
        .await
        .unwrap();
    openai_error(response, 404).await;
    let response = app
        .http
        .get(format!("{}/v1/chat/completions", app.address))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    openai_error(response, 405).await;
}

#[tokio::test]
async fn health_ready_and_metrics_are_open() {
    let app = spawn_app(test_config()).await;
    for path in ["/health", "/ready"] {
        let response = app
            .http
            .get(format!("{}{path}", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["service"], "llm-gateway");
    }
    assert!(app.metrics().await.contains("ensemble_http_requests_total"));
}

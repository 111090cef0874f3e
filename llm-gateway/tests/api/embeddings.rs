//! `POST /v1/embeddings` on the mock, on the real Gemini and Bedrock providers against the
//! fakes (which check each provider's wire format), with fallback, base64 and the 400s.

use common::config::Secret;
use llm_gateway::config::ProviderKind;
use serde_json::{Value, json};
use testkit::fakes::bedrock::{self as fake_bedrock, FakeBedrock};
use testkit::fakes::gemini::{self as fake_gemini, FakeGemini, GEMINI_KEY, error_json};

use crate::helpers::{TOKEN, TestApp, openai_error, spawn_app, test_config, with_alias};

const TITAN: &str = "amazon.titan-embed-text-v2:0";
const COHERE: &str = "cohere.embed-english-v3";
const GEMINI: &str = "gemini-embedding-001";

/// A gateway with `mock`, `gemini`, `titan`, `cohere` and a `chain` alias (gemini →
/// titan → mock) over fresh fakes.
async fn gateway() -> (FakeGemini, FakeBedrock, TestApp) {
    let gemini = FakeGemini::start().await;
    let bedrock = FakeBedrock::start().await;
    let mut config = test_config();
    config = with_alias(config, "mock", &[(ProviderKind::Mock, "mock-embed")]);
    config = with_alias(config, "gemini", &[(ProviderKind::Gemini, GEMINI)]);
    config = with_alias(config, "titan", &[(ProviderKind::Bedrock, TITAN)]);
    config = with_alias(config, "cohere", &[(ProviderKind::Bedrock, COHERE)]);
    config = with_alias(
        config,
        "chain",
        &[
            (ProviderKind::Gemini, GEMINI),
            (ProviderKind::Bedrock, TITAN),
            (ProviderKind::Mock, "mock-embed"),
        ],
    );
    config = with_alias(
        config,
        "titan-first",
        &[
            (ProviderKind::Bedrock, TITAN),
            (ProviderKind::Mock, "mock-embed"),
        ],
    );
    config = with_alias(
        config,
        "chat-model",
        &[(ProviderKind::Gemini, "gemini-2.5-flash")],
    );
    config.gemini_api_key = Secret::new(GEMINI_KEY);
    config.gemini_base_url = gemini.url.clone();
    config.bedrock_endpoint_url = Some(bedrock.url.clone());
    config.max_retries = 1;
    let app = spawn_app(config).await;
    (gemini, bedrock, app)
}

/// The vectors of an answer, as `f32`.
fn vectors(body: &Value) -> Vec<Vec<f32>> {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["object"], "embedding");
            assert_eq!(d["index"], i);
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Standard base64 with padding, decoded.
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|c| *c != b'=') {
        let value = ALPHABET.iter().position(|a| *a == c).unwrap() as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}

#[tokio::test]
async fn the_mock_embeds_deterministically_in_openais_shape() {
    let (_gemini, _bedrock, app) = gateway().await;
    let response = app
        .embed(json!({"model": "mock", "input": "hello world"}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ensemble-provider"], "mock");
    assert_eq!(response.headers()["x-ensemble-model"], "mock-embed");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "mock");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 3})
    );
    let [one] = vectors(&body).try_into().unwrap();
    assert_eq!(one.len(), 256, "the mock's default length");
    assert!((norm(&one) - 1.0).abs() < 1e-4);

    let body = app
        .embed_json(json!({"model": "mock", "input": ["hello world", "other", "hello world"], "user": "u1"}))
        .await;
    let many = vectors(&body);
    assert_eq!(many.len(), 3);
    assert_eq!(
        many[0], one,
        "equal inputs, equal vectors (across requests too)"
    );
    assert_eq!(many[0], many[2]);
    assert_ne!(many[0], many[1]);

    let body = app
        .embed_json(json!({"model": "mock", "input": "hello world", "dimensions": 32}))
        .await;
    assert_eq!(vectors(&body)[0].len(), 32);
}

#[tokio::test]
async fn base64_is_the_float_vector_as_little_endian_f32() {
    let (_gemini, _bedrock, app) = gateway().await;
    for model in ["mock", "gemini", "titan", "cohere"] {
        let request = json!({"model": model, "input": ["round", "trip"]});
        let floats = vectors(&app.embed_json(request.clone()).await);
        let mut explicit = request.clone();
        explicit["encoding_format"] = json!("float");
        assert_eq!(vectors(&app.embed_json(explicit).await), floats, "{model}");
        let mut encoded = request;
        encoded["encoding_format"] = json!("base64");
        let body = app.embed_json(encoded).await;
        for (i, data) in body["data"].as_array().unwrap().iter().enumerate() {
            let bytes = base64_decode(data["embedding"].as_str().unwrap());
            let decoded: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(decoded, floats[i], "{model} input {i}: bit for bit");
        }
    }
}

#[tokio::test]
async fn gemini_gets_batch_embed_contents_in_batches_of_100() {
    let (gemini, _bedrock, app) = gateway().await;
    let inputs: Vec<String> = (0..150).map(|i| format!("text number {i}")).collect();
    let response = app
        .embed(json!({"model": "gemini", "input": inputs, "dimensions": 768}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ensemble-provider"], "gemini");
    let body: Value = response.json().await.unwrap();
    let got = vectors(&body);
    assert_eq!(got.len(), 150);
    for (i, vector) in got.iter().enumerate() {
        let mut expected = fake_gemini::fake_embedding(&inputs[i], 768);
        llm_gateway::providers::normalize(&mut expected);
        assert_eq!(vector, &expected, "input {i} in order");
    }
    // Gemini reports no token counts: estimated (a quarter of 13 to 15 characters each).
    assert_eq!(body["usage"]["prompt_tokens"], 600);

    let mut requests = gemini.requests();
    requests.sort_by_key(|r| r.body["requests"].as_array().unwrap().len());
    assert_eq!(requests.len(), 2);
    for sent in &requests {
        assert_eq!(
            sent.path,
            "/v1beta/models/gemini-embedding-001:batchEmbedContents"
        );
        assert_eq!(sent.api_key.as_deref(), Some(GEMINI_KEY));
        assert_eq!(sent.query, None, "no key in the URL");
    }
    assert_eq!(requests[0].body["requests"].as_array().unwrap().len(), 50);
    assert_eq!(requests[1].body["requests"].as_array().unwrap().len(), 100);
    assert_eq!(
        requests[1].body["requests"][0],
        json!({
            "model": "models/gemini-embedding-001",
            "content": {"parts": [{"text": "text number 0"}]},
            "outputDimensionality": 768
        })
    );

    // Without `dimensions`, none is sent and the model's full length comes back.
    let body = app
        .embed_json(json!({"model": "gemini", "input": "x"}))
        .await;
    assert_eq!(vectors(&body)[0].len(), 3072);
    let last = gemini.requests().pop().unwrap();
    assert!(
        last.body["requests"][0]
            .get("outputDimensionality")
            .is_none()
    );
}

#[tokio::test]
async fn titan_v2_is_invoked_once_per_text() {
    let (_gemini, bedrock, app) = gateway().await;
    let inputs = ["one", "two words", "three words here"];
    let response = app
        .embed(json!({"model": "titan", "input": inputs, "dimensions": 256}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ensemble-provider"], "bedrock");
    let body: Value = response.json().await.unwrap();
    let got = vectors(&body);
    for (i, text) in inputs.iter().enumerate() {
        assert_eq!(
            got[i],
            fake_bedrock::fake_embedding(TITAN, text, 256),
            "{text}"
        );
    }
    // Titan's own inputTextTokenCount (the fake counts words), summed.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 6, "total_tokens": 6})
    );

    let mut requests = bedrock.requests();
    assert_eq!(requests.len(), 3);
    requests.sort_by_key(|r| r.body["inputText"].as_str().unwrap().len());
    for (sent, text) in requests.iter().zip(inputs) {
        assert_eq!(sent.path, "/model/amazon.titan-embed-text-v2%3A0/invoke");
        assert!(
            sent.authorization
                .contains("/us-east-1/bedrock/aws4_request")
        );
        assert_eq!(
            sent.body,
            json!({"inputText": text, "dimensions": 256, "normalize": true})
        );
    }

    let body = app
        .embed_json(json!({"model": "titan", "input": "x"}))
        .await;
    assert_eq!(vectors(&body)[0].len(), 1024, "Titan v2's default");
    assert_eq!(
        bedrock.requests().pop().unwrap().body,
        json!({"inputText": "x", "normalize": true})
    );

    // A length Titan lacks: refused before anything is sent, naming the field.
    let before = bedrock.requests().len();
    let response = app
        .embed(json!({"model": "titan", "input": "x", "dimensions": 300}))
        .await;
    let body = openai_error(response, 400).await;
    assert_eq!(body["error"]["param"], "dimensions");
    assert_eq!(bedrock.requests().len(), before);
}

#[tokio::test]
async fn cohere_is_invoked_in_batches_of_96() {
    let (_gemini, bedrock, app) = gateway().await;
    let inputs: Vec<String> = (0..100).map(|i| format!("doc {i}")).collect();
    let body = app
        .embed_json(json!({"model": "cohere", "input": inputs}))
        .await;
    let got = vectors(&body);
    assert_eq!(got.len(), 100);
    for (i, vector) in got.iter().enumerate() {
        assert_eq!(
            vector,
            &fake_bedrock::fake_embedding(COHERE, &inputs[i], 1024)
        );
    }
    let mut requests = bedrock.requests();
    requests.sort_by_key(|r| r.body["texts"].as_array().unwrap().len());
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].path, "/model/cohere.embed-english-v3/invoke");
    assert_eq!(
        requests[0].body,
        json!({"texts": ["doc 96", "doc 97", "doc 98", "doc 99"],
               "input_type": "search_document", "embedding_types": ["float"]})
    );
    assert_eq!(requests[1].body["texts"].as_array().unwrap().len(), 96);

    // Cohere's other reply shape, a bare list of vectors.
    bedrock.push(fake_bedrock::Reply::Converse(json!({
        "id": "x", "texts": ["a"], "embeddings": [[3.0, 4.0]], "response_type": "embeddings_floats"
    })));
    let body = app
        .embed_json(json!({"model": "cohere", "input": "a"}))
        .await;
    assert_eq!(
        vectors(&body),
        vec![vec![0.6, 0.8]],
        "scaled to unit length"
    );

    // Cohere v3 has one length: `dimensions` is refused, naming it.
    let response = app
        .embed(json!({"model": "cohere", "input": "a", "dimensions": 256}))
        .await;
    let body = openai_error(response, 400).await;
    assert_eq!(body["error"]["param"], "dimensions");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cohere.embed-english-v3"),
        "{body}"
    );
}

#[tokio::test]
async fn failing_targets_fall_back_to_the_next() {
    let (gemini, bedrock, app) = gateway().await;
    gemini.always(fake_gemini::Reply::Json(
        503,
        error_json(503, "UNAVAILABLE", "overloaded", vec![]),
    ));
    let response = app
        .embed(json!({"model": "chain", "input": ["a", "b"]}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ensemble-provider"], "bedrock");
    assert_eq!(gemini.requests().len(), 2, "one try and one retry");

    bedrock.always(fake_bedrock::Reply::Error(
        503,
        "ServiceUnavailableException",
        "unavailable",
    ));
    let response = app
        .embed(json!({"model": "chain", "input": ["a", "b"]}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ensemble-provider"], "mock");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model"], "chain");
    assert_eq!(vectors(&body).len(), 2);

    // A target that cannot take the request (Titan lacks 64) is skipped, not retried.
    let before = bedrock.requests().len();
    let response = app
        .embed(json!({"model": "titan-first", "input": "a", "dimensions": 64}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ensemble-provider"], "mock");
    assert_eq!(bedrock.requests().len(), before, "nothing sent to Titan");

    // A request the provider itself rejects goes back at once: another would refuse it too.
    gemini.push(fake_gemini::Reply::Json(
        400,
        error_json(400, "INVALID_ARGUMENT", "bad", vec![]),
    ));
    let response = app.embed(json!({"model": "chain", "input": "a"})).await;
    let body = openai_error(response, 400).await;
    assert_eq!(body["error"]["code"], "upstream_rejected_request");
    assert_eq!(bedrock.requests().len(), before);

    let metrics = app.metrics().await;
    for wanted in [
        "ensemble_gateway_requests_total{provider=\"mock\",model=\"mock-embed\",outcome=\"ok\",endpoint=\"embeddings\"}",
        "ensemble_gateway_fallbacks_total{provider=\"mock\",model=\"mock-embed\",endpoint=\"embeddings\"}",
        "ensemble_gateway_errors_total{provider=\"gemini\",model=\"gemini-embedding-001\",kind=\"unavailable\",endpoint=\"embeddings\"}",
        "ensemble_gateway_tokens_total{provider=\"mock\",model=\"mock-embed\",direction=\"in\",endpoint=\"embeddings\"}",
        "ensemble_gateway_request_duration_seconds_count{provider=\"bedrock\",model=\"amazon.titan-embed-text-v2:0\",endpoint=\"embeddings\"}",
    ] {
        assert!(metrics.contains(wanted), "{wanted} in\n{metrics}");
    }
}

#[tokio::test]
async fn a_chat_model_is_not_an_embedding_model() {
    let (gemini, _bedrock, app) = gateway().await;
    let response = app
        .embed(json!({"model": "chat-model", "input": "a"}))
        .await;
    let body = openai_error(response, 400).await;
    assert_eq!(body["error"]["param"], "model");
    assert!(gemini.requests().is_empty());
}

#[tokio::test]
async fn bad_input_is_a_400_naming_the_field() {
    let (_gemini, _bedrock, app) = gateway().await;
    let too_many: Vec<&str> = vec!["x"; 2049];
    let too_long = "a".repeat(1_300_000);
    let cases = [
        (json!({"model": "mock", "input": ""}), "input"),
        (json!({"model": "mock", "input": []}), "input"),
        (json!({"model": "mock", "input": ["a", " "]}), "input"),
        (json!({"model": "mock", "input": [1, 2, 3]}), "input"),
        (json!({"model": "mock", "input": [[1, 2], [3]]}), "input"),
        (json!({"model": "mock", "input": too_many}), "input"),
        (json!({"model": "mock", "input": too_long}), "input"),
        (json!({"model": "mock", "input": {"text": "a"}}), "input"),
        (json!({"model": "mock"}), "."),
        (
            json!({"model": "mock", "input": "a", "dimensions": 0}),
            "dimensions",
        ),
        (
            json!({"model": "mock", "input": "a", "dimensions": -1}),
            "dimensions",
        ),
        (
            json!({"model": "mock", "input": "a", "encoding_format": "hex"}),
            "encoding_format",
        ),
        (
            json!({"model": "mock", "input": "a", "input_type": "query"}),
            "input_type",
        ),
    ];
    for (request, param) in cases {
        let response = app.embed(request.clone()).await;
        let body = openai_error(response, 400).await;
        let shown = &request.to_string()[..request.to_string().len().min(120)];
        if param == "." {
            assert!(body["error"]["param"].is_null(), "{shown}: {body}");
        } else {
            assert_eq!(body["error"]["param"], param, "{shown}: {body}");
        }
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    let response = app.embed(json!({"model": "nope", "input": "a"})).await;
    let body = openai_error(response, 404).await;
    assert_eq!(body["error"]["code"], "model_not_found");

    let unauthorised = app
        .http
        .post(format!("{}/v1/embeddings", app.address))
        .bearer_auth(format!("{TOKEN}-wrong"))
        .json(&json!({"model": "mock", "input": "a"}))
        .send()
        .await
        .unwrap();
    let body = openai_error(unauthorised, 401).await;
    assert_eq!(body["error"]["code"], "invalid_api_key");
}

#[tokio::test]
async fn embedding_aliases_are_listed() {
    let (_gemini, _bedrock, app) = gateway().await;
    let models: Value = app
        .http
        .get(format!("{}/v1/models", app.address))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for alias in ["titan", "cohere", "gemini", "chain"] {
        assert!(ids.contains(&alias), "{ids:?}");
    }
}

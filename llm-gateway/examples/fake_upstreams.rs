//! The test fakes of Gemini and Bedrock as a program, for clients outside the Rust tests
//! (the OpenAI Python SDK tests in `tests/python/`): both answer from the request
//! (`Reply::Auto`), one JSON line on stdout says where they listen and with which
//! credentials, and the program exits when its stdin closes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/api/fake.rs"]
mod fake;
#[path = "../tests/api/fake_bedrock.rs"]
mod fake_bedrock;
#[path = "../tests/api/fake_gemini.rs"]
mod fake_gemini;
#[path = "../tests/api/helpers.rs"]
mod helpers;

use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() {
    let gemini = fake_gemini::FakeGemini::start().await;
    gemini.always(fake_gemini::Reply::Auto);
    let bedrock = fake_bedrock::FakeBedrock::start().await;
    bedrock.always(fake_bedrock::Reply::Auto);
    let ready = serde_json::json!({
        "gemini_base_url": gemini.url,
        "gemini_api_key": fake_gemini::GEMINI_KEY,
        "bedrock_endpoint_url": bedrock.url,
        "aws_access_key_id": helpers::AWS_ACCESS_KEY,
        "aws_secret_access_key": helpers::AWS_SECRET_KEY,
        "aws_region": helpers::AWS_REGION,
    });
    println!("{ready}");
    // Until the parent goes away.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
}

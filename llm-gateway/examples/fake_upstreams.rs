//! The fakes of Gemini and Bedrock (`testkit::fakes`) as a program, for clients outside the
//! Rust tests (the OpenAI Python SDK tests in `tests/python/`): both answer from the
//! request (`Reply::Auto`), one JSON line on stdout says where they listen and with which
//! credentials, and the program exits when its stdin closes.

use testkit::fakes::{FakeBedrock, FakeGemini, bedrock, gemini};
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() {
    let fake_gemini = FakeGemini::start().await;
    fake_gemini.always(gemini::Reply::Auto);
    let fake_bedrock = FakeBedrock::start().await;
    fake_bedrock.always(bedrock::Reply::Auto);
    let ready = serde_json::json!({
        "gemini_base_url": fake_gemini.url,
        "gemini_api_key": gemini::GEMINI_KEY,
        "bedrock_endpoint_url": fake_bedrock.url,
        "aws_access_key_id": bedrock::AWS_ACCESS_KEY,
        "aws_secret_access_key": bedrock::AWS_SECRET_KEY,
        "aws_region": bedrock::AWS_REGION,
    });
    println!("{ready}");
    // Until the parent goes away.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
}

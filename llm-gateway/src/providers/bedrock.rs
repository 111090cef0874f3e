//! AWS Bedrock through the official SDK's Converse and ConverseStream APIs. Credentials come
//! from the default chain (the ECS task role in production); the SDK's own retries are off
//! so the gateway's router owns retries and fallback.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_bedrockruntime as bedrock;
use aws_sdk_bedrockruntime::config::retry::RetryConfig;
use aws_sdk_bedrockruntime::config::timeout::TimeoutConfig;
use aws_sdk_bedrockruntime::config::{Region, StalledStreamProtectionConfig};
use aws_sdk_bedrockruntime::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::types::{
    ContentBlock, ContentBlockDelta, ConversationRole, ConverseOutput, ConverseStreamOutput,
    InferenceConfiguration, Message, StopReason, SystemContentBlock, TokenUsage,
};
use futures::StreamExt;

use super::{
    ChatRequest, Completion, ErrorKind, EventStream, FinishReason, Provider, ProviderError,
    StreamEvent, TurnRole,
};
use crate::config::{Config, ProviderKind};
use crate::openai::Usage;

const PROVIDER: ProviderKind = ProviderKind::Bedrock;

/// Converse has no JSON mode; the instruction goes into the system prompt instead.
const JSON_INSTRUCTION: &str =
    "Answer with one valid JSON object and nothing else: no prose, no code fences.";

/// The Bedrock provider: one SDK client (one connection pool, one credentials cache).
#[derive(Debug, Clone)]
pub struct BedrockProvider {
    client: bedrock::Client,
}

impl BedrockProvider {
    /// A provider for `AWS_REGION` with credentials from the default chain, or from
    /// `aws` when given (tests pass static credentials this way).
    pub async fn new(config: &Config, aws: Option<aws_config::SdkConfig>) -> Self {
        let sdk = match aws {
            Some(sdk) => sdk,
            None => {
                let mut loader = aws_config::defaults(BehaviorVersion::latest())
                    .retry_config(RetryConfig::disabled());
                if let Some(region) = &config.aws_region {
                    loader = loader.region(Region::new(region.clone()));
                }
                loader.load().await
            }
        };
        let mut builder = bedrock::config::Builder::from(&sdk)
            .retry_config(RetryConfig::disabled())
            // A model may think longer than the SDK's 5 s stall grace before its first token;
            // the router bounds every wait with REQUEST_TIMEOUT instead.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .build(),
            );
        if let Some(region) = &config.aws_region {
            builder = builder.region(Region::new(region.clone()));
        }
        if let Some(url) = &config.bedrock_endpoint_url {
            builder = builder.endpoint_url(url);
        }
        Self {
            client: bedrock::Client::from_conf(builder.build()),
        }
    }
}

/// Converse and ConverseStream take the same input through two different builder types.
macro_rules! send_converse {
    ($builder:expr, $model:expr, $request:expr) => {
        $builder
            .model_id($model)
            .set_system(system($request))
            .set_messages(Some(messages($request)?))
            .inference_config(inference_config($request))
            .send()
            .await
            .map_err(sdk_error)?
    };
}

#[async_trait]
impl Provider for BedrockProvider {
    fn kind(&self) -> ProviderKind {
        PROVIDER
    }

    async fn complete(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<Completion, ProviderError> {
        let output = send_converse!(self.client.converse(), model, request);
        let text = match output.output() {
            Some(ConverseOutput::Message(message)) => message
                .content()
                .iter()
                .filter_map(|block| block.as_text().ok())
                .map(String::as_str)
                .collect(),
            _ => String::new(),
        };
        Ok(Completion {
            text,
            finish: map_stop_reason(output.stop_reason()),
            usage: output.usage().map(map_usage).unwrap_or_default(),
        })
    }

    async fn stream(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<EventStream, ProviderError> {
        let output = send_converse!(self.client.converse_stream(), model, request);
        let events = futures::stream::unfold(Some(output.stream), |receiver| async move {
            let mut receiver = receiver?;
            loop {
                match receiver.recv().await {
                    Ok(Some(event)) => {
                        if let Some(event) = map_event(event) {
                            return Some((Ok(event), Some(receiver)));
                        }
                    }
                    Ok(None) => return None,
                    // An error ends the stream.
                    Err(e) => return Some((Err(sdk_error(e)), None)),
                }
            }
        });
        Ok(events.boxed())
    }
}

fn system(request: &ChatRequest) -> Option<Vec<SystemContentBlock>> {
    let mut blocks: Vec<SystemContentBlock> = request
        .system
        .iter()
        .map(|s| SystemContentBlock::Text(s.clone()))
        .collect();
    if request.json {
        blocks.push(SystemContentBlock::Text(JSON_INSTRUCTION.into()));
    }
    (!blocks.is_empty()).then_some(blocks)
}

fn messages(request: &ChatRequest) -> Result<Vec<Message>, ProviderError> {
    request
        .turns
        .iter()
        .map(|turn| {
            Message::builder()
                .role(match turn.role {
                    TurnRole::User => ConversationRole::User,
                    TurnRole::Assistant => ConversationRole::Assistant,
                })
                .set_content(Some(
                    turn.parts
                        .iter()
                        .map(|p| ContentBlock::Text(p.clone()))
                        .collect(),
                ))
                .build()
                .map_err(|e| ProviderError::new(PROVIDER, ErrorKind::Protocol, e.to_string()))
        })
        .collect()
}

fn inference_config(request: &ChatRequest) -> InferenceConfiguration {
    InferenceConfiguration::builder()
        .set_max_tokens(
            request
                .max_tokens
                .map(|m| i32::try_from(m).unwrap_or(i32::MAX)),
        )
        .set_temperature(request.temperature)
        .set_top_p(request.top_p)
        .set_stop_sequences((!request.stop.is_empty()).then(|| request.stop.clone()))
        .build()
}

fn map_event(event: ConverseStreamOutput) -> Option<StreamEvent> {
    match event {
        ConverseStreamOutput::ContentBlockDelta(e) => match e.delta {
            Some(ContentBlockDelta::Text(text)) if !text.is_empty() => {
                Some(StreamEvent::Delta(text))
            }
            _ => None,
        },
        ConverseStreamOutput::MessageStop(e) => {
            Some(StreamEvent::Finish(map_stop_reason(&e.stop_reason)))
        }
        ConverseStreamOutput::Metadata(e) => {
            e.usage.as_ref().map(|u| StreamEvent::Usage(map_usage(u)))
        }
        _ => None,
    }
}

fn map_usage(usage: &TokenUsage) -> Usage {
    let count = |n: i32| u32::try_from(n).unwrap_or(0);
    Usage::new(count(usage.input_tokens), count(usage.output_tokens))
}

/// Bedrock's `stopReason` in OpenAI's terms.
fn map_stop_reason(reason: &StopReason) -> FinishReason {
    match reason {
        StopReason::MaxTokens | StopReason::ModelContextWindowExceeded => FinishReason::Length,
        StopReason::ContentFiltered | StopReason::GuardrailIntervened => {
            FinishReason::ContentFilter
        }
        _ => FinishReason::Stop,
    }
}

/// Sorts an SDK failure: throttling, model-not-ready, service-unavailable, internal errors,
/// timeouts and broken connections are retryable; validation is the client's; access and
/// unknown-model errors fall back without retry.
fn sdk_error<E, R>(error: SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HttpStatus,
{
    // A service error's code and message say it all; the SDK's full context would add a
    // debug dump of the raw response to every log line.
    let message = match (error.code(), error.message()) {
        (Some(code), message) => format!("{code}: {}", message.unwrap_or("no message")),
        (None, _) => DisplayErrorContext(&error).to_string(),
    };
    let (kind, status) = match &error {
        SdkError::TimeoutError(_) => (ErrorKind::Timeout, None),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => (ErrorKind::Timeout, None),
        SdkError::DispatchFailure(_) => (ErrorKind::Connection, None),
        SdkError::ResponseError(_) => (ErrorKind::Protocol, None),
        SdkError::ServiceError(service) => {
            let status = service.raw().status();
            // Event-stream exceptions spell codes in camel case (`throttlingException`).
            let code = service.err().code().map(str::to_ascii_lowercase);
            let kind = match code.as_deref() {
                Some("throttlingexception" | "toomanyrequestsexception") => ErrorKind::RateLimited,
                Some(
                    "modelnotreadyexception"
                    | "serviceunavailableexception"
                    | "internalserverexception"
                    | "modelstreamerrorexception",
                ) => ErrorKind::Unavailable,
                Some("modeltimeoutexception") => ErrorKind::Timeout,
                Some("validationexception") => ErrorKind::InvalidRequest,
                Some(
                    "accessdeniedexception"
                    | "unrecognizedclientexception"
                    | "expiredtokenexception"
                    | "invalidsignatureexception",
                ) => ErrorKind::Auth,
                Some("resourcenotfoundexception") => ErrorKind::NotFound,
                _ => status.map_or(ErrorKind::Unavailable, ErrorKind::from_status),
            };
            (kind, status)
        }
        // Construction failures and anything new: the gateway's fault, not retryable.
        _ => (ErrorKind::Protocol, None),
    };
    ProviderError {
        status,
        ..ProviderError::new(PROVIDER, kind, message)
    }
}

/// The HTTP status of the raw response behind an SDK error, where there is one (an
/// event-stream message has none).
trait HttpStatus {
    fn status(&self) -> Option<u16>;
}

impl HttpStatus for aws_smithy_types::event_stream::RawMessage {
    fn status(&self) -> Option<u16> {
        None
    }
}

impl HttpStatus for bedrock::config::http::HttpResponse {
    fn status(&self) -> Option<u16> {
        Some(self.status().as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_reasons_map() {
        assert_eq!(map_stop_reason(&StopReason::EndTurn), FinishReason::Stop);
        assert_eq!(
            map_stop_reason(&StopReason::MaxTokens),
            FinishReason::Length
        );
        assert_eq!(
            map_stop_reason(&StopReason::GuardrailIntervened),
            FinishReason::ContentFilter
        );
    }

    #[test]
    fn json_mode_adds_a_system_instruction() {
        let request = ChatRequest {
            json: true,
            ..ChatRequest::default()
        };
        assert_eq!(system(&request).map(|b| b.len()), Some(1));
        assert!(system(&ChatRequest::default()).is_none());
    }
}

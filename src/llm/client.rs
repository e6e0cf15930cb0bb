//! Calls to the endpoint through `async-openai`: one request with a time limit, retries with
//! backoff, the circuit breaker, usage and cost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tracing::Instrument;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::ReqwestService;
use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestUserMessage, CreateChatCompletionRequest, ResponseFormat,
    ResponseFormatJsonSchema,
};
use serde_json::Value;
use tokio::sync::Semaphore;

use super::breaker::Breaker;
use super::config::{LlmConfig, StructuredOutput};
use super::prompt::{self, truncate};
use crate::envelope::{LlmRecord, Usage};
use crate::metrics::LlmMetrics;

/// Why one request gave no usable answer.
#[derive(Debug, Clone, PartialEq)]
pub struct CallError {
    /// `timeout`, `http_error`, `invalid_response`, `invalid_json`, `unknown_agent` or
    /// `circuit_open`.
    pub reason: &'static str,
    /// What happened.
    pub message: String,
}

/// One completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The model that answered.
    pub model: String,
    /// The answer's text.
    pub text: String,
    /// Tokens, and their cost at the configured price of the model asked for.
    pub usage: Usage,
}

/// A question for the decider: the prompt and the answers it may give.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    /// System message.
    pub system: String,
    /// User message.
    pub user: String,
    /// The allowed answers.
    pub allowed: Vec<String>,
}

/// A client of one OpenAI-compatible endpoint.
pub struct LlmClient {
    config: LlmConfig,
    client: async_openai::Client<OpenAIConfig>,
    breaker: Breaker,
    limit: Semaphore,
    json_object: AtomicBool,
    metrics: LlmMetrics,
}

impl std::fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmClient")
            .field("base_url", &self.config.base_url)
            .field("model", &self.config.model)
            .finish_non_exhaustive()
    }
}

impl LlmClient {
    /// A client for `config`; the API key comes from the environment variable it names.
    pub fn new(config: LlmConfig, metrics: LlmMetrics) -> Result<Self, String> {
        config.validate()?;
        let mut openai = OpenAIConfig::new().with_api_base(&config.base_url);
        openai = match std::env::var(&config.api_key_env) {
            Ok(key) if !key.is_empty() => openai.with_api_key(key),
            _ => openai.with_api_key(""),
        };
        let json_object = config.structured_output == StructuredOutput::JsonObject;
        // async-openai's default transport retries 429 and 5xx responses by itself; switchyard
        // retries with its own policy (counted, backed off, seen by the circuit breaker), so the
        // transport is the plain reqwest service.
        let http = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            client: async_openai::Client::with_config(openai)
                .with_http_service(ReqwestService::new(http)),
            breaker: Breaker::new(config.breaker.clone()),
            limit: Semaphore::new(config.concurrency),
            json_object: AtomicBool::new(json_object),
            metrics,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    /// Asks which agent acts next. Invalid answers, time-outs and errors are retried with
    /// backoff; the result is always a record: with `agent` set when an allowed answer came
    /// back, else with `error` (the last failure's reason). Never panics, never routes.
    pub async fn decide(&self, ask: &Ask) -> LlmRecord {
        let _permit = self.limit.acquire().await;
        let started = Instant::now();
        let mut record = LlmRecord {
            model: self.config.model.clone(),
            ..LlmRecord::default()
        };
        let schema = prompt::answer_schema(&ask.allowed);
        let mut last: Option<CallError> = None;
        for attempt in 0..=self.config.retries {
            self.pause(attempt).await;
            if !self.breaker.admit(Instant::now()) {
                last = Some(CallError {
                    reason: "circuit_open",
                    message: format!(
                        "the circuit breaker on {} is open after repeated failures",
                        self.config.base_url
                    ),
                });
                break;
            }
            record.attempts += 1;
            let answer = self
                .request(&self.config.model, &ask.system, &ask.user, Some(&schema))
                .await;
            let result = answer.and_then(|c| {
                record.model = c.model.clone();
                record.raw = Some(truncate(&c.text, 2000));
                record.usage.add(&c.usage);
                prompt::parse_answer(&c.text, &ask.allowed).map_err(|r| CallError {
                    reason: r.reason,
                    message: r.message,
                })
            });
            // Only transport failures count against the endpoint; a bad answer is the model's.
            let endpoint_ok = !matches!(&result, Err(e) if matches!(e.reason, "timeout" | "http_error" | "invalid_response"));
            self.breaker.record(endpoint_ok, Instant::now());
            match result {
                Ok(choice) => {
                    record.agent = Some(choice.agent);
                    record.reason = Some(choice.reason);
                    record.confidence = choice.confidence;
                    last = None;
                    break;
                }
                Err(e) => {
                    tracing::warn!(reason = e.reason, message = %e.message, attempt = attempt + 1, "LLM decision attempt failed");
                    self.metrics.errors.with_label_values(&[e.reason]).inc();
                    last = Some(e);
                }
            }
        }
        if let Some(e) = last {
            record.error = Some(e.reason.to_string());
            record.message = Some(e.message);
        }
        record.latency_ms = started.elapsed().as_millis() as u64;
        self.metrics
            .breaker_open
            .set(i64::from(self.breaker.is_open(Instant::now())));
        record
    }

    /// A completion of `model` for an agent: retried on time-outs and errors (and on text that is
    /// not JSON when `schema` is given), without the decider's validation.
    pub async fn complete(
        &self,
        model: &str,
        system: &str,
        user: &str,
        schema: Option<&Value>,
    ) -> Result<Completion, CallError> {
        let mut last = None;
        for attempt in 0..=self.config.retries {
            self.pause(attempt).await;
            let result = self
                .request(model, system, user, schema)
                .await
                .and_then(|c| {
                    if schema.is_some() && serde_json::from_str::<Value>(&c.text).is_err() {
                        return Err(CallError {
                            reason: "invalid_json",
                            message: format!(
                                "the completion is not JSON: {}",
                                truncate(&c.text, 200)
                            ),
                        });
                    }
                    Ok(c)
                });
            match result {
                Ok(c) => return Ok(c),
                Err(e) => {
                    self.metrics.errors.with_label_values(&[e.reason]).inc();
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(CallError {
            reason: "http_error",
            message: "no request was made".into(),
        }))
    }

    /// Waits before attempt `attempt` (from 0): not before the first, then `backoff`, doubled for
    /// each further one.
    async fn pause(&self, attempt: u32) {
        if attempt > 0 {
            tokio::time::sleep(self.config.backoff * 2u32.saturating_pow(attempt - 1)).await;
        }
    }

    /// One request with the configured time limit; counts calls, latency and tokens.
    async fn request(
        &self,
        model: &str,
        system: &str,
        user: &str,
        schema: Option<&Value>,
    ) -> Result<Completion, CallError> {
        let json_object = self.json_object.load(Ordering::Relaxed);
        let response_format = schema.map(|schema| {
            if json_object {
                ResponseFormat::JsonObject
            } else {
                ResponseFormat::JsonSchema {
                    json_schema: ResponseFormatJsonSchema {
                        description: None,
                        name: "answer".into(),
                        schema: schema.clone(),
                        strict: Some(true),
                    },
                }
            }
        });
        let request = CreateChatCompletionRequest {
            model: model.to_string(),
            messages: vec![
                ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage::from(
                    system.to_string(),
                )),
                ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage::from(
                    user.to_string(),
                )),
            ],
            temperature: Some(self.config.temperature),
            max_completion_tokens: Some(self.config.max_tokens),
            response_format,
            ..Default::default()
        };
        // OpenTelemetry's GenAI semantic conventions; the span continues the caller's (a
        // decision, an agent's step).
        let span = tracing::info_span!(
            "chat",
            otel.name = format!("chat {model}"),
            gen_ai.operation.name = "chat",
            gen_ai.provider.name = "openai",
            gen_ai.request.model = model,
            gen_ai.response.model = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
        );
        let started = Instant::now();
        let result = tokio::time::timeout(self.config.timeout, self.client.chat().create(request))
            .instrument(span.clone())
            .await;
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        let outcome = match result {
            Err(_) => Err(CallError {
                reason: "timeout",
                message: format!(
                    "no answer within {}",
                    humantime::format_duration(self.config.timeout)
                ),
            }),
            Ok(Err(OpenAIError::ApiError(e))) => {
                if e.status_code.as_u16() == 400 && !json_object && schema.is_some() {
                    tracing::warn!(error = %e, "the endpoint refused json_schema; using json_object from now on");
                    self.json_object.store(true, Ordering::Relaxed);
                }
                Err(CallError {
                    reason: "http_error",
                    message: format!(
                        "HTTP {}: {}",
                        e.status_code,
                        truncate(&e.api_error.message, 300)
                    ),
                })
            }
            Ok(Err(OpenAIError::JSONDeserialize(e, body))) => Err(CallError {
                reason: "invalid_response",
                message: format!(
                    "the response is not a chat completion ({e}): {}",
                    truncate(&body, 200)
                ),
            }),
            Ok(Err(e)) => Err(CallError {
                reason: "http_error",
                message: truncate(&e.to_string(), 300),
            }),
            Ok(Ok(response)) => {
                let text = response
                    .choices
                    .into_iter()
                    .next()
                    .and_then(|c| c.message.content)
                    .unwrap_or_default();
                let (tokens_in, tokens_out) = response.usage.map_or((0, 0), |u| {
                    (u64::from(u.prompt_tokens), u64::from(u.completion_tokens))
                });
                span.record("gen_ai.usage.input_tokens", tokens_in);
                span.record("gen_ai.usage.output_tokens", tokens_out);
                span.record("gen_ai.response.model", response.model.as_str());
                self.metrics
                    .tokens
                    .with_label_values(&["prompt"])
                    .inc_by(tokens_in);
                self.metrics
                    .tokens
                    .with_label_values(&["completion"])
                    .inc_by(tokens_out);
                let usage = self.config.usage(model, tokens_in, tokens_out);
                self.metrics.cost.inc_by(usage.cost);
                // Some servers (llama.cpp) name no model; record the one asked for.
                let model = match response.model.as_str() {
                    "" | "-" => model.to_string(),
                    named => named.to_string(),
                };
                Ok(Completion { model, text, usage })
            }
        };
        let label = match &outcome {
            Ok(_) => "ok",
            Err(e) => e.reason,
        };
        self.metrics.calls.with_label_values(&[label]).inc();
        outcome
    }
}

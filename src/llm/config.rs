//! Configuration of the LLM client: the `llm:` section of the config file.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::envelope::Usage;

/// How switchyard talks to an OpenAI-compatible chat-completions endpoint (the router's LLM
/// decider and `llm` agents). The API key is read from the environment, never from this file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// Base URL up to and including `/v1`, e.g. `https://api.openai.com/v1`. Default: the local
    /// server of `scripts/start-llm`, `http://127.0.0.1:8089/v1`.
    pub base_url: String,
    /// Environment variable holding the API key. When it is unset no key is sent (local servers
    /// need none). Default `OPENAI_API_KEY`.
    pub api_key_env: String,
    /// The model. Default `qwen2.5-coder-1.5b-instruct` (the local server's alias).
    pub model: String,
    /// Sampling temperature, 0 to 2. Default 0: routing should be repeatable.
    pub temperature: f32,
    /// Most completion tokens per request. Default 200.
    pub max_tokens: u32,
    /// Time limit of one request, e.g. `30s`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub timeout: Duration,
    /// Requests after the first when an answer is invalid, times out or fails. Default 2.
    pub retries: u32,
    /// Wait before the first retry, doubled for each further one. Default `200ms`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub backoff: Duration,
    /// Most LLM decisions in flight at once in one router instance. Default 8.
    pub concurrency: usize,
    /// How answers are constrained: `json_schema` (the agent is an enum of the allowed answers) or
    /// `json_object` for endpoints without structured outputs (the answer is validated all the
    /// same). Default `json_schema`.
    pub structured_output: StructuredOutput,
    /// The circuit breaker on the endpoint.
    pub breaker: BreakerConfig,
    /// Prices per million tokens, by model name; models not listed cost 0.
    pub prices: BTreeMap<String, Price>,
    /// How many of the task's latest steps the decider's prompt summarises. Default 8.
    pub history_steps: usize,
    /// Longest text (payload, each output) shown in a prompt, in characters. Default 2000.
    pub max_text_chars: usize,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8089/v1".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            model: "qwen2.5-coder-1.5b-instruct".into(),
            temperature: 0.0,
            max_tokens: 200,
            timeout: Duration::from_secs(30),
            retries: 2,
            backoff: Duration::from_millis(200),
            concurrency: 8,
            structured_output: StructuredOutput::JsonSchema,
            breaker: BreakerConfig::default(),
            prices: BTreeMap::new(),
            history_steps: 8,
            max_text_chars: 2000,
        }
    }
}

impl LlmConfig {
    /// Checks the values; the message names the field and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            return Err(format!(
                "field `llm.base_url`: `{}` must start with http:// or https://",
                self.base_url
            ));
        }
        if self.model.is_empty() {
            return Err("field `llm.model`: must not be empty".into());
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err("field `llm.temperature`: must be between 0 and 2".into());
        }
        if self.max_tokens == 0 || self.concurrency == 0 || self.timeout.is_zero() {
            return Err(
                "fields `llm.max_tokens`, `llm.concurrency`, `llm.timeout`: must be more than 0"
                    .into(),
            );
        }
        if self.breaker.failures == 0 {
            return Err("field `llm.breaker.failures`: must be at least 1".into());
        }
        for (model, price) in &self.prices {
            if !(price.input >= 0.0 && price.output >= 0.0) {
                return Err(format!(
                    "field `llm.prices.{model}`: prices must be numbers >= 0"
                ));
            }
        }
        Ok(())
    }

    /// `tokens_in` prompt and `tokens_out` completion tokens of `model`, with their cost at the
    /// model's price (0 for models not listed).
    pub fn usage(&self, model: &str, tokens_in: u64, tokens_out: u64) -> Usage {
        let cost = self.prices.get(model).map_or(0.0, |p| {
            (tokens_in as f64 * p.input + tokens_out as f64 * p.output) / 1_000_000.0
        });
        Usage {
            tokens_in,
            tokens_out,
            cost,
        }
    }
}

/// How answers are constrained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StructuredOutput {
    /// `response_format: {type: json_schema}` with the allowed answers as an enum.
    JsonSchema,
    /// `response_format: {type: json_object}`; the answer is validated after the fact.
    JsonObject,
}

/// The circuit breaker: after `failures` failed calls in a row the endpoint is not asked for
/// `open_for`; decisions go straight to their fallback (reason `circuit_open`). Then one call is
/// let through; its success closes the breaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Failed calls in a row (after their retries) that open the breaker. Default 5.
    pub failures: u32,
    /// How long it stays open, e.g. `30s`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 5,
            open_for: Duration::from_secs(30),
        }
    }
}

/// Price of a model per million tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Per million prompt tokens.
    pub input: f64,
    /// Per million completion tokens.
    pub output: f64,
}

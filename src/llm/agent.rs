//! The `llm` agent runtime: a card whose work is one chat completion.

use std::sync::Arc;

use serde_json::{json, Value};

use super::client::LlmClient;
use super::prompt::truncate;
use crate::agent::{self, Failure, Reply};
use crate::cards::{Card, Runtime};
use crate::envelope::WorkItem;

/// Runs a card with `runtime: {kind: llm}`: the card's system prompt, the work item's input and
/// context as the user message, the primary model then the fallback model.
#[derive(Debug, Clone)]
pub struct LlmHandler {
    client: Arc<LlmClient>,
    system_prompt: String,
    models: Vec<String>,
    output_schema: Option<Value>,
}

impl LlmHandler {
    /// The handler for `card` through `client`.
    pub fn new(card: &Card, client: Arc<LlmClient>) -> crate::error::Result<Self> {
        let Runtime::Llm {
            system_prompt,
            model,
            fallback_model,
            output_schema,
        } = &card.runtime
        else {
            return Err(agent::not_runnable(card));
        };
        let primary = model
            .clone()
            .unwrap_or_else(|| client.config().model.clone());
        Ok(Self {
            models: std::iter::once(primary)
                .chain(fallback_model.clone())
                .collect(),
            system_prompt: system_prompt.clone(),
            output_schema: output_schema.clone(),
            client,
        })
    }

    async fn answer(&self, item: &WorkItem) -> Result<Reply, Failure> {
        let max = self.client.config().max_text_chars;
        let mut user = format!("Task input:\n{}\n", truncate(&item.input.to_string(), max));
        if !item.context.is_empty() {
            user.push_str("\nOutputs of earlier agents:\n");
            for (card, output) in &item.context {
                user.push_str(&format!("{card}: {}\n", truncate(&output.to_string(), max)));
            }
        }
        let mut failures = Vec::new();
        for model in &self.models {
            let schema = self.output_schema.as_ref();
            match self
                .client
                .complete(model, &self.system_prompt, &user, schema)
                .await
            {
                Ok(c) => {
                    let payload = match schema {
                        Some(_) => serde_json::from_str(&c.text).map_err(|e| e.to_string())?,
                        None => json!({"text": c.text, "model": c.model}),
                    };
                    return Ok(Reply {
                        payload,
                        confidence: None,
                        usage: Some(c.usage),
                    });
                }
                Err(e) => failures.push(format!("{model}: {} ({})", e.reason, e.message)),
            }
        }
        Err(format!("every model failed: {}", failures.join("; ")).into())
    }
}

impl crate::runtime::Runner for LlmHandler {
    async fn run(&self, item: &WorkItem) -> Result<Reply, Failure> {
        self.answer(item).await
    }
}

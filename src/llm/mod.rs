//! The LLM side of switchyard: the router's decider and the `llm` agent runtime, both through
//! `async-openai` against any OpenAI-compatible endpoint.
//!
//! The decider is asked only where a rule says `llm`; its answer is validated against exactly the
//! rule's candidates, recorded on the state topic with the decision, and never asked again on
//! restore or replay.

mod agent;
mod breaker;
mod client;
mod config;
pub mod prompt;

pub use agent::LlmHandler;
pub use breaker::Breaker;
pub use client::{Ask, CallError, Completion, LlmClient};
pub use config::{BreakerConfig, LlmConfig, Price, StructuredOutput};

use crate::cards::Cards;
use crate::rules::LlmRoute;
use crate::state::TaskState;

/// The question for the decider about `task`, which waits on `route`.
pub fn ask_for(cards: &Cards, route: &LlmRoute, task: &TaskState, config: &LlmConfig) -> Ask {
    let candidates: Vec<_> = route
        .candidates
        .iter()
        .filter_map(|name| cards.get(name))
        .collect();
    let payload = task
        .awaiting
        .as_ref()
        .map_or(&task.input, |a| &a.event.payload);
    let allowed = route.allowed();
    Ask {
        system: prompt::system_prompt(&candidates, &allowed, route.instructions.as_deref()),
        user: prompt::user_prompt(task, payload, config.history_steps, config.max_text_chars),
        allowed,
    }
}

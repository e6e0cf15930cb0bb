//! switchyard: a Kafka-native router for multi-agent AI systems.
//!
//! Agents are microservices that consume work items from Kafka topics and publish results back as
//! task events. The [`router`] reads every task event, folds it into the task's [`state`], decides
//! with the [`rules`] which agent [`cards`] act next, records the decision on the event-sourced
//! state topic and sends work items to the agents' topics. See the README for a walk-through.

pub mod agent;
pub mod allocator;
pub mod by_task;
pub mod cards;
pub mod cli;
pub mod codec;
pub mod commit;
pub mod console;
pub mod dlq;
pub mod envelope;
pub mod error;
pub mod files;
pub mod http;
pub mod journey;
pub mod kafka;
pub mod llm;
pub mod metrics;
pub mod publish;
pub mod registry;
pub mod replay;
pub mod router;
pub mod rules;
pub mod runtime;
pub mod schema;
pub mod signing;
pub mod state;
pub mod state_record;
pub mod steps;
pub mod topics;
pub mod trace;
pub mod workflow;

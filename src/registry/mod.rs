//! `switchyard registry`: a Confluent-Schema-Registry-compatible server for local use and tests.
//!
//! It answers the endpoints Confluent's serializers and `schema_registry_converter` call, with
//! Confluent's status codes and `{"error_code", "message"}` bodies. Every change is written to a
//! Kafka topic (like Confluent's `_schemas`) before it takes effect, and the topic is replayed on
//! start, so ids and versions survive restarts. Run one instance per topic. In production, point
//! switchyard at Confluent Schema Registry, Karapace, Redpanda or Apicurio instead: nothing in
//! switchyard depends on anything only this registry does.

pub mod client;
pub mod server;
pub mod store;

pub use server::serve;
pub use store::{ApiError, Change, Level, Store};

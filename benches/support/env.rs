//! What every benchmark reads from its environment. Include it with
//! `#[path = "support/env.rs"] mod env;`. Not every benchmark uses all of it.
#![allow(dead_code)]

use std::time::Duration;

use switchyard::kafka::KafkaConfig;

/// The number in the environment variable `name`, or `default`.
pub fn number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The broker at `SWITCHYARD_TEST_BOOTSTRAP` (default 127.0.0.1:9092) with a topic prefix of
/// this run's own, `bench-<name>-<random>`; fails saying how to start the broker.
pub fn kafka(name: &str) -> KafkaConfig {
    let kafka = KafkaConfig {
        bootstrap_servers: std::env::var("SWITCHYARD_TEST_BOOTSTRAP")
            .unwrap_or_else(|_| "127.0.0.1:9092".into()),
        topic_prefix: format!(
            "bench-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
        options: Default::default(),
    };
    kafka
        .wait_for_broker(Duration::from_secs(10))
        .expect("start the broker with scripts/start-broker");
    kafka
}

//! Follows the state and dead-letter topics into the index, from the positions the index holds.
//! It runs on a thread of its own (SQLite and librdkafka's poll both block) until told to stop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::index::Index;
use crate::dlq::DeadLetter;
use crate::error::Result;
use crate::kafka::KafkaConfig;
use crate::state_record;

/// How many records one index transaction takes at most.
const BATCH: usize = 5_000;

/// Assigns every partition of the state and dead-letter topics at the index's positions, and
/// returns the thread that follows them until `stop` is set.
pub fn start(
    kafka: &KafkaConfig,
    index: Arc<Index>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let topics = kafka.topics();
    let (state, dlq) = (topics.state(), topics.dlq());
    let mut config = kafka.client_config();
    config
        .set("group.id", format!("{}.console", kafka.topic_prefix))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50");
    let consumer: BaseConsumer = config.create()?;
    let mut tpl = TopicPartitionList::new();
    for topic in [&state, &dlq] {
        let read: HashMap<i32, i64> = index.positions(topic)?.into_iter().collect();
        for p in 0..kafka.partition_count(topic)? {
            let at = read
                .get(&p)
                .map_or(Offset::Beginning, |o| Offset::Offset(*o));
            tpl.add_partition_offset(topic, p, at)?;
        }
    }
    consumer.assign(&tpl)?;
    Ok(std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let (mut states, mut letters) = (Vec::new(), Vec::new());
            let started = Instant::now();
            while states.len() + letters.len() < BATCH
                && started.elapsed() < Duration::from_millis(200)
            {
                match consumer.poll(Duration::from_millis(50)) {
                    Some(Ok(m)) if m.topic() == dlq => letters.push(DeadLetter::from_message(&m)),
                    Some(Ok(m)) => {
                        let events = m.payload().and_then(|b| state_record::decode(b).ok());
                        states.push((m.partition(), m.offset(), events.unwrap_or_default()));
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "console: reading the topics"),
                    None if states.is_empty() && letters.is_empty() => break,
                    None => {}
                }
            }
            if states.is_empty() && letters.is_empty() {
                continue;
            }
            let written = index
                .add_state(&state, &states)
                .and_then(|()| index.add_dead_letters(&dlq, &letters));
            if let Err(e) = written {
                tracing::error!(error = %e, "console: the index refused a batch; stopping the follower");
                return;
            }
        }
    }))
}

//! Effectively-once writes in flight, so that the router decides the next batch while the
//! previous ones are being acknowledged.
//!
//! A batch's state records are handed to the producer as soon as it is decided, in decision order
//! (so each state partition holds them in the order they were folded); its work items follow once
//! its own state records are acknowledged (a decision is on the state topic before what it sends).
//! Batches land in the order they were launched. At most [`MAX_BATCHES`] batches and
//! [`MAX_BYTES`] bytes are in flight. Batches with dead letters, and every batch in exactly-once
//! mode, are not pipelined (see the router's `commit`).

use std::collections::VecDeque;
use std::time::Instant;

use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::TopicPartitionList;
use tokio::task::JoinHandle;

use super::service::{state_refused, Sent};
use crate::commit::{self, Outgoing};
use crate::error::{Error, Result};
use crate::kafka;
use crate::state_record::Batched;

/// Most batches in flight. Each batch waits two produce round trips (its state records, then its
/// work items) while the router decides the next ones; with 4, `scripts/bench-routing` measured
/// the router 10-20 % slower than with 8, 16 or 32 (between which it could not tell).
pub const MAX_BATCHES: usize = 16;

/// Most bytes (state records and work items) in flight.
pub const MAX_BYTES: usize = 64 << 20;

/// What the router keeps of a batch until it lands.
pub struct Flight {
    /// The input positions once the batch is decided: safe to commit once it lands.
    pub positions: TopicPartitionList,
    /// Events decided.
    pub decided: u64,
    /// Tasks that started waiting for the LLM: asked once their decisions are written.
    pub asks: Vec<(i32, String)>,
    /// When the batch was launched.
    pub started: Instant,
}

/// A batch whose state records and work items are acknowledged.
pub struct Landed {
    /// What the router kept of it.
    pub flight: Flight,
    /// Where its state records landed (partition, offset) and how many decisions each holds.
    pub states: Vec<(i32, i64, usize)>,
    /// Work items the broker refused for good, with the record and the error.
    pub refused: Vec<(Sent, Outgoing, KafkaError)>,
}

/// The batches in flight, oldest first: each one's landing runs as a task of its own.
#[derive(Default)]
pub struct Pipeline {
    flights: VecDeque<(JoinHandle<Result<Landed>>, usize)>,
    bytes: usize,
    /// The positions of the latest batch that landed while others were in flight.
    landed: Option<TopicPartitionList>,
}

impl Pipeline {
    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.flights.is_empty()
    }

    /// Whether the next batch must wait for one to land.
    pub fn is_full(&self) -> bool {
        self.flights.len() >= MAX_BATCHES || self.bytes >= MAX_BYTES
    }

    /// Hands the batch's `states` to `producer` now, and puts in flight the wait for them,
    /// then the writing of `works` (for `items`) and the wait for those.
    pub async fn launch(
        &mut self,
        producer: &FutureProducer,
        states: Batched,
        works: Vec<Outgoing>,
        items: Vec<Sent>,
        flight: Flight,
    ) -> Result<()> {
        let Batched {
            records: states,
            events,
        } = states;
        let mut acks = Vec::with_capacity(states.len());
        for record in &states {
            match commit::enqueue(producer, record).await {
                Ok(ack) => acks.push(ack),
                Err(e) if commit::refuses_record(&e) => return Err(state_refused(record, e)),
                Err(source) => {
                    let topic = record.topic.clone();
                    return Err(kafka::Error::Produce { topic, source }.into());
                }
            }
        }
        let size = states.iter().chain(&works).map(Outgoing::size).sum();
        let producer = producer.clone();
        let landing = async move {
            let mut landed = Vec::with_capacity(acks.len());
            for ((record, ack), events) in states.iter().zip(acks).zip(events) {
                let delivery = ack.await.map_err(|_| {
                    let source = KafkaError::Canceled;
                    let topic = record.topic.clone();
                    Error::from(kafka::Error::Produce { topic, source })
                })?;
                match delivery {
                    Ok(d) => landed.push((d.partition, d.offset, events)),
                    Err((e, _)) if commit::refuses_record(&e) => {
                        return Err(state_refused(record, e))
                    }
                    Err((source, _)) => {
                        let topic = record.topic.clone();
                        return Err(kafka::Error::Produce { topic, source }.into());
                    }
                }
            }
            let sent = commit::send_each(&producer, &works).await?;
            let refused = works
                .into_iter()
                .zip(items)
                .zip(sent)
                .filter_map(|((record, item), sent)| sent.err().map(|e| (item, record, e)))
                .collect();
            Ok(Landed {
                flight,
                states: landed,
                refused,
            })
        };
        self.flights.push_back((tokio::spawn(landing), size));
        self.bytes += size;
        Ok(())
    }

    /// The oldest batch, once it lands; `None` when nothing is in flight. Cancel-safe: a batch
    /// leaves the pipeline only when its landing is returned.
    pub async fn next(&mut self) -> Option<Result<Landed>> {
        let (landing, _) = self.flights.front_mut()?;
        let landed = landing.await.expect("a landing does not panic");
        let (_, size) = self.flights.pop_front()?;
        self.bytes -= size;
        if let Ok(l) = &landed {
            self.landed = (!self.flights.is_empty()).then(|| l.flight.positions.clone());
        }
        Some(landed)
    }

    /// The input positions safe to commit: `decided` (every decision so far) when nothing is in
    /// flight, else those of the latest batch that landed, if any.
    pub fn committable(&self, decided: TopicPartitionList) -> Option<TopicPartitionList> {
        match self.is_empty() {
            true => Some(decided),
            false => self.landed.clone(),
        }
    }
}

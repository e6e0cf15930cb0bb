//! Reading and writing snapshots: the snapshot topic, and the state topic where a snapshot's
//! writer is checked.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::encoder::Encoder;
use super::{Due, Ended, Gathered, Header, Skipped, Snapshot};
use crate::kafka::{self, KafkaConfig, Result};
use crate::state::PartitionState;
use crate::state_record;

/// How many snapshot records a load reads back from the end first; it reads four times further
/// back each time it finds no usable snapshot, down to the partition's start.
const FIRST_WINDOW: i64 = 256;

/// How long a read waits for the next record before it gives up.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The snapshot topic and the state topic of one deployment.
#[derive(Clone)]
pub struct Store {
    kafka: KafkaConfig,
    snapshots: String,
    state: String,
    producer: FutureProducer,
    encoder: Encoder,
}

/// What a load found.
pub struct Loaded {
    /// The newest usable snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// Snapshots and records passed over, newest first, and why.
    pub skipped: Vec<Skipped>,
    /// Snapshot records read.
    pub read: u64,
}

impl Store {
    /// A store for `kafka`'s topics (its own producer, compressing: snapshots are JSON).
    pub fn new(kafka: &KafkaConfig) -> Result<Self> {
        let topics = kafka.topics();
        let mut config = kafka.client_config();
        kafka::set_default(&mut config, "compression.type", "lz4");
        Ok(Self {
            kafka: kafka.clone(),
            snapshots: topics.snapshots(),
            state: topics.state(),
            producer: KafkaConfig::producer_from(config)?,
            encoder: Encoder::start(),
        })
    }

    /// The newest usable snapshot of `partition` covering less than `below`. A candidate whose
    /// writer did not own the partition at the epoch it claims is skipped as `fenced`.
    pub async fn load(&self, partition: i32, below: i64) -> Result<Loaded> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.load_blocking(partition, below))
            .await
            .expect("the snapshot reader does not panic")
    }

    fn load_blocking(&self, partition: i32, below: i64) -> Result<Loaded> {
        let reader = reader(&self.kafka)?;
        let (low, high) =
            reader.fetch_watermarks(&self.snapshots, partition, Duration::from_secs(10))?;
        let (mut window, mut read, mut skipped) = (FIRST_WINDOW, 0, Vec::new());
        loop {
            let start = (high - window).max(low);
            let mut gathered = Gathered::default();
            read += read_range(&reader, &self.snapshots, partition, start, high, |m| {
                gathered.add(m.offset(), m.payload());
            })?;
            let mut passed = Vec::new();
            loop {
                let (candidate, mut why) = gathered.newest(below);
                passed.append(&mut why);
                let Some(candidate) = candidate else {
                    break;
                };
                match self.owner_check(&candidate.header)? {
                    Ok(()) => {
                        skipped.append(&mut passed);
                        return Ok(Loaded {
                            snapshot: Some(candidate),
                            skipped,
                            read,
                        });
                    }
                    Err(detail) => passed.push(Skipped {
                        offset: candidate.offset,
                        covers: Some(candidate.header.covers),
                        reason: "fenced",
                        detail,
                    }),
                }
            }
            if start <= low {
                skipped.append(&mut passed);
                return Ok(Loaded {
                    snapshot: None,
                    skipped,
                    read,
                });
            }
            window *= 4;
        }
    }

    /// Whether the record at the snapshot's epoch is its writer's ownership record.
    fn owner_check(&self, header: &Header) -> Result<Result<(), String>> {
        let Some(record) =
            kafka::read_at(&self.kafka, &self.state, header.partition, header.epoch)?
        else {
            return Ok(Err(format!(
                "its epoch {} is not in the state partition any more",
                header.epoch
            )));
        };
        let owner = record.payload().and_then(state_record::owner);
        Ok(match owner {
            Some(instance) if instance == header.instance => Ok(()),
            Some(instance) => Err(format!(
                "the ownership record at its epoch {} names `{instance}`, not its writer `{}`",
                header.epoch, header.instance
            )),
            None => Err(format!(
                "state offset {} (its epoch) is not an ownership record",
                header.epoch
            )),
        })
    }

    /// The offset of an ownership record other than `own_epoch` in `(after, to]` of state
    /// partition `partition`, if there is one: then another instance took the partition over and
    /// the caller may not write a snapshot covering `to`.
    pub async fn foreign_owner(
        &self,
        partition: i32,
        after: i64,
        to: i64,
        own_epoch: i64,
    ) -> Result<Option<i64>> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let reader = reader(&store.kafka)?;
            let mut found = None;
            read_range(&reader, &store.state, partition, after + 1, to + 1, |m| {
                let offset = m.offset();
                let owned = m
                    .payload()
                    .is_some_and(|b| memchr_owned(b) && state_record::owner(b).is_some());
                if owned && offset != own_epoch && found.is_none() {
                    found = Some(offset);
                }
            })?;
            Ok(found)
        })
        .await
        .expect("the state reader does not panic")
    }

    /// Takes the snapshot `due` of `state` (owned by `instance`): checks the state partition for
    /// a foreign ownership record where `due` says so, encodes (on the [`Encoder`]'s thread),
    /// writes.
    pub async fn take(
        &self,
        due: &Due,
        state: PartitionState,
        instance: String,
        at: i64,
        chunk_bytes: usize,
    ) -> Ended {
        let epoch = state.epoch.unwrap_or(-1);
        if let Some(from) = due.verify_from {
            match self
                .foreign_owner(due.partition, from, due.covers, epoch)
                .await
            {
                Ok(Some(offset)) => return Ended::Fenced(offset),
                Ok(None) => {}
                Err(e) => return Ended::Failed(e.to_string()),
            }
        }
        let (p, covers) = (due.partition, due.covers);
        // The copy is dropped there too: freeing its tables is work of the same kind.
        let records = (self.encoder)
            .run(move || super::encode(&state, p, covers, &instance, at, chunk_bytes))
            .await;
        let chunks = records.len() as u32;
        match self.write(p, &records, due.previous).await {
            Ok(bytes) => Ended::Written { chunks, bytes },
            Err(e) => Ended::Failed(e.to_string()),
        }
    }

    /// Writes a snapshot's records to `partition`, one after the other, then tombstones the
    /// chunks of the snapshot it replaces (`previous`: its covers and chunk count). Returns the
    /// bytes written.
    pub async fn write(
        &self,
        partition: i32,
        records: &[(String, Vec<u8>)],
        previous: Option<(i64, u32)>,
    ) -> Result<usize> {
        let mut bytes = 0;
        for (key, value) in records {
            let record = FutureRecord::to(&self.snapshots)
                .partition(partition)
                .key(key.as_bytes())
                .payload(value.as_slice());
            self.producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)?;
            bytes += key.len() + value.len();
        }
        if let Some((covers, chunks)) = previous {
            for chunk in 0..chunks {
                let key = super::key(partition, covers, chunk);
                let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.snapshots)
                    .partition(partition)
                    .key(key.as_bytes());
                self.producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| e)?;
            }
        }
        Ok(bytes)
    }
}

/// Whether `bytes` mention an ownership record at all (most state records do not: the full
/// parse is skipped for them).
fn memchr_owned(bytes: &[u8]) -> bool {
    bytes.windows(7).any(|w| w == b"\"OWNED\"")
}

/// A reader of assigned partitions that commits nothing and sees committed records only.
fn reader(kafka: &KafkaConfig) -> Result<BaseConsumer> {
    let mut config = kafka.client_config();
    config
        .set("group.id", format!("{}.snapshots", kafka.topic_prefix))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10");
    Ok(config.create()?)
}

/// Reads `topic`'s `partition` from `from` up to (not including) `until` or its end, calling `on`
/// for each record; returns how many it read.
fn read_range(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    until: i64,
    mut on: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<u64> {
    if from >= until {
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))?;
    reader.assign(&tpl)?;
    let mut read = 0;
    loop {
        let message = match kafka::next_record(reader, READ_TIMEOUT) {
            Err(KafkaError::PartitionEOF(_)) => return Ok(read),
            other => other?,
        };
        let offset = message.offset();
        read += 1;
        on(&message);
        if offset + 1 >= until {
            return Ok(read);
        }
    }
}

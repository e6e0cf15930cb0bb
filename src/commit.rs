//! The delivery seam: how records become durable, for the router and the agents alike.
//!
//! [`ConsistencyMode::EffectivelyOnce`] writes dead letters, then state events, then work items,
//! waiting for each phase to be acknowledged; no transactions are needed.
//! [`ConsistencyMode::ExactlyOnce`] writes the whole batch and the consumed offsets in one Kafka
//! transaction (`send_offsets_to_transaction` with the consumer's group metadata, KIP-447).
//!
//! Errors come in two kinds. Some belong to one record ([`refuses_record`]): the record is too
//! large for the producer or the topic, invalid, or its topic does not exist or may not be
//! written. [`Writer::send_each`] reports those per record, so that the caller turns that one
//! record's decision into a dead letter and goes on. Every other error (the connection, the
//! producer as a whole, a fenced transaction) stops the writer's user.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;

use crate::kafka::{Error, KafkaConfig, Result};
use crate::trace;

/// The processing guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConsistencyMode {
    /// No transactions: decisions are recorded before their work items, the position is
    /// recovered from the state topic, work items may repeat and are deduped by step id.
    #[default]
    EffectivelyOnce,
    /// Kafka transactions: decisions, work items, dead letters and offsets commit atomically.
    ExactlyOnce,
}

impl ConsistencyMode {
    /// Whether the consumed offsets commit inside each batch's transaction (exactly-once);
    /// otherwise the state topic holds the input position and the group's offsets are only
    /// informational.
    pub fn offsets_in_transaction(self) -> bool {
        self == ConsistencyMode::ExactlyOnce
    }

    /// Whether a decision's state record and its work items become visible together (one
    /// transaction), so that a restored decision has its work items.
    pub fn writes_atomically(self) -> bool {
        self == ConsistencyMode::ExactlyOnce
    }

    /// How long a batch waits for more events after its first: a transaction per batch is worth
    /// the commit interval (exactly-once); without one, a batch is what is already fetched.
    pub fn gather_window(self, commit_interval: Duration) -> Option<Duration> {
        self.offsets_in_transaction().then_some(commit_interval)
    }

    /// Whether a decision keeps what undoes it until its batch is durable: only a transaction
    /// can be aborted after its decisions were folded.
    pub fn keeps_undo(self) -> bool {
        self == ConsistencyMode::ExactlyOnce
    }

    /// Whether a batch's writes may be in flight while the next batch is decided: without a
    /// transaction, each partition's records keep their order on the producer; a transaction
    /// holds one batch at a time.
    pub fn pipelines(self) -> bool {
        self == ConsistencyMode::EffectivelyOnce
    }

    /// Whether the router fetches a hole in a tasks partition again before accepting it. A
    /// broker without transactions may show a record before a lower one it has not stored yet
    /// (nisshi's memory engine); with transactions, commit markers leave holes everywhere.
    pub fn refetches_holes(self) -> bool {
        self == ConsistencyMode::EffectivelyOnce
    }

    /// Whether the router starts over in process after its producer failed fatally (a new
    /// producer, every owned partition taken over again, as after a crash). Without transactions
    /// a fatal error is the broker's fault (nisshi sometimes handles one connection's produce
    /// requests out of order) and a take-over repairs whatever was lost; with them it means a
    /// newer instance fenced this one, which must stop.
    pub fn starts_over_after_fatal(self) -> bool {
        self == ConsistencyMode::EffectivelyOnce
    }
}

impl fmt::Display for ConsistencyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConsistencyMode::EffectivelyOnce => "effectively-once",
            ConsistencyMode::ExactlyOnce => "exactly-once",
        })
    }
}

impl FromStr for ConsistencyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "effectively-once" => Ok(ConsistencyMode::EffectivelyOnce),
            "exactly-once" => Ok(ConsistencyMode::ExactlyOnce),
            other => Err(format!(
                "`{other}` is not a consistency mode; use exactly-once or effectively-once"
            )),
        }
    }
}

/// One record to write.
#[derive(Clone)]
pub struct Outgoing {
    /// Topic.
    pub topic: String,
    /// Explicit partition, else the key's.
    pub partition: Option<i32>,
    /// Key.
    pub key: Vec<u8>,
    /// Value (`None`: a tombstone).
    pub payload: Option<Vec<u8>>,
    /// Headers.
    pub headers: Option<OwnedHeaders>,
    /// A W3C trace context, written as a `traceparent` header after `headers`. Kept as text
    /// until the record is handed to the producer: a header list built with the record would be
    /// copied for the producer and then freed, for every record.
    pub traceparent: Option<String>,
}

impl Outgoing {
    /// A JSON record.
    pub fn json<T: serde::Serialize>(
        topic: String,
        partition: Option<i32>,
        key: &str,
        value: &T,
    ) -> Self {
        let payload = serde_json::to_vec(value).expect("records serialize to JSON");
        Self::bytes(topic, partition, key, payload)
    }

    /// A record whose value is already encoded.
    pub fn bytes(topic: String, partition: Option<i32>, key: &str, payload: Vec<u8>) -> Self {
        Self {
            topic,
            partition,
            key: key.as_bytes().to_vec(),
            payload: Some(payload),
            headers: None,
            traceparent: None,
        }
    }

    /// The value of header `name`, if the record has one.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        use rdkafka::message::Headers;
        if let Some(t) = self
            .traceparent
            .as_ref()
            .filter(|_| name == trace::TRACEPARENT)
        {
            return Some(t.as_bytes());
        }
        self.headers
            .as_ref()?
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
    }

    /// Key and value size in bytes.
    pub fn size(&self) -> usize {
        self.key.len() + self.payload.as_ref().map_or(0, Vec::len)
    }

    fn record(&self) -> FutureRecord<'_, [u8], [u8]> {
        let mut record = FutureRecord::to(&self.topic).key(self.key.as_slice());
        if let Some(payload) = &self.payload {
            record = record.payload(payload.as_slice());
        }
        if let Some(p) = self.partition {
            record = record.partition(p);
        }
        let headers = match &self.traceparent {
            Some(t) => Some(trace::add(self.headers.clone(), t)),
            None => self.headers.clone(),
        };
        if let Some(h) = headers {
            record = record.headers(h);
        }
        record
    }
}

/// What became of a batch.
pub enum Written {
    /// Durable; the offsets of the records, phase by phase, in order.
    Committed(Vec<i64>),
    /// The transaction was aborted: nothing of the batch is visible; restore and re-read.
    Aborted(KafkaError),
    /// Exactly-once: the broker refused these records (see [`refuses_record`]), each with its
    /// index over all phases in order and the error; the transaction was aborted, so nothing of
    /// the batch is visible. The caller decides the batch again without them.
    Refused(Vec<(usize, Outgoing, KafkaError)>),
}

/// Writes batches in the chosen mode.
pub struct Writer {
    mode: ConsistencyMode,
    producer: FutureProducer,
}

const TXN_TIMEOUT: Duration = Duration::from_secs(10);

impl Writer {
    /// A writer; in exactly-once mode this initialises transactions (fencing older producers
    /// with the same `transactional_id`) and fails if the broker refuses them.
    pub async fn new(
        kafka: &KafkaConfig,
        mode: ConsistencyMode,
        transactional_id: &str,
    ) -> Result<Self> {
        let mut config = kafka.client_config();
        if mode == ConsistencyMode::ExactlyOnce {
            config.set("transactional.id", transactional_id);
            // A fenced or stuck transaction surfaces within this, not the 60 s default.
            crate::kafka::set_default(&mut config, "transaction.timeout.ms", "10000");
            crate::kafka::set_default(&mut config, "message.timeout.ms", "10000");
        }
        let producer: FutureProducer =
            KafkaConfig::producer_from(config).map_err(|source| Error::Produce {
                topic: String::new(),
                source,
            })?;
        if mode == ConsistencyMode::ExactlyOnce {
            let p = producer.clone();
            blocking(move || p.init_transactions(TXN_TIMEOUT))
                .await
                .map_err(|source| Error::TransactionsUnsupported {
                    bootstrap: kafka.bootstrap_servers.clone(),
                    source,
                })?;
        }
        Ok(Self { mode, producer })
    }

    /// The mode.
    pub fn mode(&self) -> ConsistencyMode {
        self.mode
    }

    /// The underlying producer.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Writes `phases` (and, in exactly-once mode, commits `offsets` for `group`) durably.
    pub async fn write(
        &self,
        phases: Vec<Vec<Outgoing>>,
        offsets: Option<(TopicPartitionList, ConsumerGroupMetadata)>,
    ) -> Result<Written> {
        match self.mode {
            ConsistencyMode::EffectivelyOnce => {
                let mut out = Vec::new();
                for phase in &phases {
                    out.extend(self.send(phase).await?);
                }
                Ok(Written::Committed(out))
            }
            ConsistencyMode::ExactlyOnce => self.transaction(phases, offsets).await,
        }
    }

    /// Writes `records` (effectively-once) and waits for each: its offset, or the error that
    /// refused that one record. Any other error fails the whole call.
    pub async fn send_each(&self, records: &[Outgoing]) -> Result<Vec<Result<i64, KafkaError>>> {
        send_each(&self.producer, records).await
    }

    async fn send(&self, records: &[Outgoing]) -> Result<Vec<i64>> {
        let sent = self.send_each(records).await?;
        let produced = |(r, sent): (&Outgoing, Result<i64, KafkaError>)| {
            sent.map_err(|source| Error::Produce {
                topic: r.topic.clone(),
                source,
            })
        };
        records.iter().zip(sent).map(produced).collect()
    }

    async fn transaction(
        &self,
        phases: Vec<Vec<Outgoing>>,
        offsets: Option<(TopicPartitionList, ConsumerGroupMetadata)>,
    ) -> Result<Written> {
        let p = self.producer.clone();
        blocking(move || p.begin_transaction())
            .await
            .map_err(Error::Fatal)?;
        let records: Vec<Outgoing> = phases.into_iter().flatten().collect();
        let results = match self.send_each(&records).await {
            Ok(results) => results,
            Err(Error::Produce { source, .. }) => return self.abort(source).await,
            Err(e) => return Err(e),
        };
        let mut sent = Vec::with_capacity(results.len());
        let mut refused = Vec::new();
        for ((i, record), result) in records.into_iter().enumerate().zip(results) {
            match result {
                Ok(offset) => sent.push(offset),
                Err(e) => refused.push((i, record, e)),
            }
        }
        if let Some((_, _, cause)) = refused.first() {
            return match self.abort(cause.clone()).await? {
                Written::Aborted(_) => Ok(Written::Refused(refused)),
                other => Ok(other),
            };
        }
        if let Some((tpl, group)) = offsets {
            let p = self.producer.clone();
            if let Err(e) =
                blocking(move || p.send_offsets_to_transaction(&tpl, &group, TXN_TIMEOUT)).await
            {
                return self.abort(e).await;
            }
        }
        let mut tries = 0;
        loop {
            let p = self.producer.clone();
            match blocking(move || p.commit_transaction(TXN_TIMEOUT)).await {
                Ok(()) => return Ok(Written::Committed(sent)),
                Err(e) if is_fatal(&e) => return Err(Error::Fatal(e)),
                Err(e) if is_retriable(&e) && tries < 3 => tries += 1,
                Err(e) => return self.abort(e).await,
            }
        }
    }

    async fn abort(&self, cause: KafkaError) -> Result<Written> {
        if is_fatal(&cause) {
            return Err(Error::Fatal(cause));
        }
        let p = self.producer.clone();
        blocking(move || p.abort_transaction(TXN_TIMEOUT))
            .await
            .map_err(Error::Fatal)?;
        Ok(Written::Aborted(cause))
    }
}

/// Whether a produce error belongs to one record rather than to the connection or the producer:
/// the record is too large (for librdkafka's `message.max.bytes` or the topic's
/// `max.message.bytes`), invalid or corrupt, has a bad timestamp, breaks a broker policy, or its
/// topic does not exist, is not a valid name, or may not be written. Another record may well
/// succeed, so the router dead-letters this one's decision and goes on.
pub fn refuses_record(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        e,
        KafkaError::MessageProduction(
            Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::InvalidMessage
                | Code::MessageBatchTooLarge
                | Code::InvalidRecord
                | Code::InvalidTimestamp
                | Code::PolicyViolation
                | Code::UnknownTopicOrPartition
                | Code::UnknownTopic
                | Code::UnknownPartition
                | Code::InvalidTopic
                | Code::TopicAuthorizationFailed
        )
    )
}

/// Whether a produce error says the record is too large.
pub fn too_large(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        e,
        KafkaError::MessageProduction(
            Code::MessageSizeTooLarge | Code::InvalidMessageSize | Code::MessageBatchTooLarge
        )
    )
}

fn is_fatal(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_fatal())
}

fn is_retriable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_retriable())
}

/// Writes `records` through `producer` and waits for each: its offset, or the error that refused
/// that one record (see [`refuses_record`]). Any other error fails the whole call. The records are
/// handed to the producer one after the other, in order (waiting while its queue is full), and
/// their acknowledgements awaited in that order. A `try_join_all` of one send future per record
/// did the same at more cost: alternated three times in `scripts/bench-routing` (one work item
/// per event), the router's CPU per event went from 15.4, 13.7, 14.5 µs with it to 12.9, 12.2,
/// 13.0 µs with this.
pub async fn send_each(
    producer: &FutureProducer,
    records: &[Outgoing],
) -> Result<Vec<Result<i64, KafkaError>>> {
    let produced = |record: &Outgoing, source| match refuses_record(&source) {
        true => Ok(Err(source)),
        false => Err(Error::Produce {
            topic: record.topic.clone(),
            source,
        }),
    };
    let mut acks = Vec::with_capacity(records.len());
    for record in records {
        acks.push(enqueue(producer, record).await);
    }
    let mut sent = Vec::with_capacity(records.len());
    for (record, ack) in records.iter().zip(acks) {
        sent.push(match ack {
            Ok(ack) => match ack.await {
                Ok(Ok(delivery)) => Ok(delivery.offset),
                Ok(Err((source, _))) => produced(record, source)?,
                Err(_) => produced(record, KafkaError::Canceled)?,
            },
            Err(source) => produced(record, source)?,
        });
    }
    Ok(sent)
}

/// Hands `record` to `producer` now, without waiting for its acknowledgement: records enqueued
/// one after the other keep that order in their partition. Waits while the producer's queue is
/// full. The error is the producer's, for the caller to judge with [`refuses_record`].
pub async fn enqueue(
    producer: &FutureProducer,
    record: &Outgoing,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(record.record()) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err((e, _)) => return Err(e),
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking producer calls do not panic")
}

//! Kafka client settings, topic names and partitioning shared by every switchyard process.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Errors talking to Kafka: client calls, topics, reads and writes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A client call failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// No broker answered.
    #[error("no Kafka broker answered at {bootstrap} within {timeout:?} ({last_error}); start one with `scripts/start-broker` or point --bootstrap-servers at yours")]
    Unreachable {
        /// The bootstrap servers tried.
        bootstrap: String,
        /// How long we waited.
        timeout: Duration,
        /// The last error (not a `source`: the message says it all in one line).
        last_error: KafkaError,
    },
    /// A topic is missing from the cluster.
    #[error("topic `{0}` does not exist; create it with `switchyard topics apply`")]
    MissingTopic(String),
    /// Creating a topic failed.
    #[error("cannot create `{topic}`: {code}")]
    Create {
        /// The topic.
        topic: String,
        /// The broker's error.
        code: rdkafka::types::RDKafkaErrorCode,
    },
    /// No record at a position that was asked for.
    #[error("no record at {topic}[{partition}]@{offset}")]
    NoRecord {
        /// The topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
    },
    /// The broker does not do transactions.
    #[error(
        "the broker at {bootstrap} refused transactions ({source}); exactly-once needs Apache Kafka, Confluent or \
         Redpanda. Use `--consistency effectively-once`, which needs no transactions"
    )]
    TransactionsUnsupported {
        /// The bootstrap servers.
        bootstrap: String,
        /// The broker's answer to InitProducerId.
        source: KafkaError,
    },
    /// A fatal producer error: fenced by a newer instance with the same transactional id, or
    /// another error after which the producer cannot go on. The instance must restart.
    #[error("fatal producer error, restart this instance: {0}")]
    Fatal(KafkaError),
    /// A write was not acknowledged.
    #[error("write to `{topic}` failed: {source}")]
    Produce {
        /// The topic.
        topic: String,
        /// The error.
        source: KafkaError,
    },
    /// Exactly-once: an agent's transaction publishing a result was aborted.
    #[error("the transaction publishing a result was aborted ({0}); restart to receive the work item again")]
    Aborted(KafkaError),
    /// The broker refused a state event. State events are bounded by the rule table's
    /// `max_event_bytes` (plus a small envelope), so this means the state topic accepts less
    /// than that; no input record can cause it.
    #[error("the broker refused a state event of {bytes} bytes on `{topic}` ({source}); the state topic must accept records of `max_event_bytes` plus 64 KiB: raise its max.message.bytes, or lower `max_event_bytes` in the rule table")]
    StateRefused {
        /// The state topic.
        topic: String,
        /// The record's size.
        bytes: usize,
        /// The broker's answer.
        source: KafkaError,
    },
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to reach Kafka.
#[derive(Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list of brokers.
    #[serde(default = "default_bootstrap")]
    pub bootstrap_servers: String,
    /// Prefix of every topic name (`<prefix>.tasks`, `<prefix>.state`, ...).
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// librdkafka properties passed through unchanged, e.g. `security.protocol`, `sasl.mechanism`,
    /// `sasl.username`, `sasl.password`, `ssl.ca.location`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// The default bootstrap servers.
pub const DEFAULT_BOOTSTRAP: &str = "127.0.0.1:9092";

fn default_bootstrap() -> String {
    DEFAULT_BOOTSTRAP.into()
}

fn default_prefix() -> String {
    "switchyard".into()
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: default_bootstrap(),
            topic_prefix: default_prefix(),
            options: BTreeMap::new(),
        }
    }
}

/// Whether a librdkafka property holds a secret that must never be printed.
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "key.pem", "private"]
        .iter()
        .any(|s| key.contains(s))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options: BTreeMap<&str, &str> = self
            .options
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if is_secret(k) {
                        "<redacted>"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_prefix", &self.topic_prefix)
            .field("options", &options)
            .finish()
    }
}

impl KafkaConfig {
    /// The topic names under this config's prefix.
    pub fn topics(&self) -> Topics {
        Topics::new(&self.topic_prefix)
    }

    /// A client config with the bootstrap servers and the pass-through options.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        for (k, v) in &self.options {
            config.set(k, v);
        }
        config
    }

    /// An idempotent producer that partitions keys like the Java client (murmur2).
    pub fn producer(&self) -> Result<FutureProducer> {
        Ok(Self::producer_from(self.client_config())?)
    }

    /// A producer from `config` with switchyard's defaults where it sets nothing else.
    pub fn producer_from(mut config: ClientConfig) -> Result<FutureProducer, KafkaError> {
        set_default(&mut config, "enable.idempotence", "true");
        set_default(&mut config, "acks", "all");
        set_default(&mut config, "linger.ms", "2");
        set_default(&mut config, "partitioner", "murmur2_random");
        set_default(&mut config, "message.timeout.ms", "30000");
        config.create()
    }

    /// Waits until a broker answers a metadata request.
    pub fn wait_for_broker(&self, timeout: Duration) -> Result<()> {
        let client: BaseConsumer = self.client_config().create()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match client.fetch_metadata(None, Duration::from_secs(2)) {
                Ok(_) => return Ok(()),
                Err(last_error) if std::time::Instant::now() >= deadline => {
                    return Err(Error::Unreachable {
                        bootstrap: self.bootstrap_servers.clone(),
                        timeout,
                        last_error,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// The partition count of `topic`.
    pub fn partition_count(&self, topic: &str) -> Result<i32> {
        let client: BaseConsumer = self.client_config().create()?;
        let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        match metadata.topics().first() {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                Ok(t.partitions().len() as i32)
            }
            _ => Err(Error::MissingTopic(topic.to_string())),
        }
    }
}

/// Reads every record of `topic` (the given partitions, or all) from the beginning up to the
/// high watermarks at the time of the call, calling `on` for each in partition order.
pub fn read_topic(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: Option<&[i32]>,
    mut on: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<()> {
    use rdkafka::{Offset, TopicPartitionList};
    let consumer = reader(kafka)?;
    let all: Vec<i32> = (0..kafka.partition_count(topic)?).collect();
    for &p in partitions.unwrap_or(&all) {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        loop {
            let message = next_record(&consumer, Duration::from_secs(10))?;
            use rdkafka::Message;
            let offset = message.offset();
            on(&message);
            if offset + 1 >= high {
                break;
            }
        }
    }
    Ok(())
}

/// The value of header `name` of `message`, if it has one.
pub fn header<'m, M: rdkafka::Message>(message: &'m M, name: &str) -> Option<&'m [u8]> {
    use rdkafka::message::Headers;
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
}

/// A consumer that reads assigned partitions and commits nothing.
fn reader(kafka: &KafkaConfig) -> Result<BaseConsumer> {
    let mut config = kafka.client_config();
    config
        .set("group.id", "switchyard-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10");
    Ok(config.create()?)
}

/// The record of `topic` at `partition`/`offset`, or `None` when there is none there any more
/// (retention removed it, or the offset is past the end).
pub fn read_at(
    kafka: &KafkaConfig,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<rdkafka::message::OwnedMessage>> {
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer = reader(kafka)?;
    let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    if offset < low || offset >= high {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let message = next_record(&consumer, Duration::from_secs(10))?;
    Ok((message.offset() == offset).then(|| message.detach()))
}

/// Whether `e` is a connection error librdkafka reports to a consumer and recovers from by itself
/// (a broker connection dropped, all of them for a moment, a name that did not resolve): a reader
/// logs it and keeps polling rather than failing.
fn is_transient(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::{AllBrokersDown, BrokerTransportFailure, Resolve};
    matches!(
        e,
        KafkaError::MessageConsumption(AllBrokersDown | BrokerTransportFailure | Resolve)
    )
}

/// The next record `consumer` delivers within `timeout`, waiting through transient connection
/// errors (a lost connection, an unresolved or unreachable broker); other errors, and no record
/// in time (`RequestTimedOut`), are errors.
pub fn next_record(
    consumer: &BaseConsumer,
    timeout: Duration,
) -> std::result::Result<rdkafka::message::BorrowedMessage<'_>, KafkaError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match consumer.poll(left) {
            Some(Err(e)) if is_transient(&e) && !left.is_zero() => {
                let reading = assigned(consumer);
                tracing::warn!(error = %e, reading, "reading: a broker connection failed; retrying");
            }
            Some(message) => return message,
            None => {
                return Err(KafkaError::MessageConsumption(
                    rdkafka::types::RDKafkaErrorCode::RequestTimedOut,
                ))
            }
        }
    }
}

/// The partitions `consumer` is assigned, as `topic/partition` separated by commas: what a
/// warning about its reads names.
fn assigned<C: ConsumerContext>(consumer: &impl Consumer<C>) -> String {
    let assignment = consumer.assignment().unwrap_or_default();
    let parts: Vec<String> = assignment
        .elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect();
    parts.join(",")
}

/// The next record `consumer` delivers within `timeout`, or `None` when none came, waiting
/// through transient connection errors as [`next_record`] does.
pub async fn recv_within(
    consumer: &rdkafka::consumer::StreamConsumer,
    timeout: Duration,
) -> Option<std::result::Result<rdkafka::message::BorrowedMessage<'_>, KafkaError>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Err(e)) if is_transient(&e) => {
                let reading = assigned(consumer);
                tracing::warn!(error = %e, reading, "reading: a broker connection failed; retrying");
            }
            Ok(message) => return Some(message),
            Err(_) => return None,
        }
    }
}

/// The sum of the high watermarks of `topic`'s partitions (its records written so far, when it
/// starts at offset 0), asked through `client`.
pub fn high_watermark_sum(client: &BaseConsumer, topic: &str, partitions: i32) -> Result<i64> {
    let mut sum = 0;
    for p in 0..partitions {
        sum += client
            .fetch_watermarks(topic, p, Duration::from_secs(10))?
            .1;
    }
    Ok(sum)
}

/// The default consumer session timeout of the router and the agents: how soon a crashed
/// instance's partitions move to another.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets the defaults of a service's consumer (router, agent) that the user did not set.
///
/// `fetch.wait.max.ms` is 10 ms instead of librdkafka's 500: a broker that holds a fetch for
/// that long even when records arrive meanwhile (nisshi does) adds up to that much to every hop;
/// measured with nisshi at 2,000 events/s, a router's p50 went from 148 ms to 16 ms. A broker that
/// answers a fetch as soon as records arrive (Apache Kafka) pays only idle fetches for it.
pub fn service_consumer_defaults(config: &mut ClientConfig) {
    set_default(config, "fetch.wait.max.ms", "10");
    set_default(config, "heartbeat.interval.ms", "1000");
    set_default(config, "auto.offset.reset", "earliest");
}

/// How long a stopping router or agent waits for its Kafka clients to close.
pub const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Drops `clients` (a consumer's close commits and leaves its group; a producer's flushes) on a
/// thread of its own and waits at most [`CLOSE_WAIT`]. librdkafka's close waits without bound
/// while no broker answers, and a service told to stop must stop, without holding a runtime
/// thread meanwhile: a close not done in time is left to finish, or to end with the process.
/// `what` names the service in the warning.
pub async fn close(what: &str, clients: impl Send + 'static) {
    let (closed, done) = tokio::sync::oneshot::channel();
    let closing = std::thread::Builder::new()
        .name("kafka-close".into())
        .spawn(move || {
            drop(clients);
            let _ = closed.send(());
        });
    let waited = match closing {
        Ok(_) => tokio::time::timeout(CLOSE_WAIT, done).await.is_ok(),
        Err(e) => {
            tracing::warn!(what, error = %e, "no thread to close the Kafka clients on");
            return;
        }
    };
    if !waited {
        tracing::warn!(
            what,
            wait = ?CLOSE_WAIT,
            "the Kafka clients did not close in time (does the broker answer?); stopping \
             anyway: what was not committed is delivered again to the next owner"
        );
    }
}

/// Sets `key` unless the user set it through the pass-through options.
pub fn set_default(config: &mut ClientConfig, key: &str, value: &str) {
    if config.get(key).is_none() {
        config.set(key, value);
    }
}

/// The topic names of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
    /// The names the router asks for per batch or per decision, formatted once.
    tasks: String,
    state: String,
}

impl Topics {
    /// The topics under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            tasks: format!("{prefix}.tasks"),
            state: format!("{prefix}.state"),
        }
    }

    /// Task events: submissions, results, failures, human decisions.
    pub fn tasks(&self) -> String {
        self.tasks.clone()
    }

    /// The event-sourced decision log.
    pub fn state(&self) -> String {
        self.state.clone()
    }

    /// Snapshots of the state partitions (compacted, co-partitioned with `state`).
    pub fn snapshots(&self) -> String {
        format!("{}.snapshots", self.prefix)
    }

    /// Dead letters.
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.prefix)
    }

    /// The default consumer group of the router.
    pub fn router_group(&self) -> String {
        format!("{}.router", self.prefix)
    }
}

/// The partition the Java client's default partitioner (and librdkafka's `murmur2_random`) picks
/// for a non-empty key.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions as u32) as i32
}

/// Kafka's murmur2 hash (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_warning_names_the_partitions_read() {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "unit")
            .create()
            .unwrap();
        assert_eq!(assigned(&consumer), "");
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition("sy.state", 0);
        tpl.add_partition("sy.state", 3);
        consumer.assign(&tpl).unwrap();
        assert_eq!(assigned(&consumer), "sy.state/0,sy.state/3");
    }

    #[test]
    fn readers_wait_through_lost_connections_but_not_through_other_errors() {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let consuming = KafkaError::MessageConsumption;
        assert!(is_transient(&consuming(Code::AllBrokersDown)));
        assert!(is_transient(&consuming(Code::BrokerTransportFailure)));
        assert!(!is_transient(&consuming(Code::UnknownTopicOrPartition)));
        assert!(!is_transient(&consuming(Code::OffsetOutOfRange)));
        assert!(!is_transient(&KafkaError::PartitionEOF(0)));
    }

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values from Kafka's own UtilsTest / DefaultPartitionerTest.
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
        assert!((0..7).contains(&partition_for_key(b"task-1", 7)));
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let mut config = KafkaConfig::default();
        config
            .options
            .insert("sasl.password".into(), "hunter2".into());
        config
            .options
            .insert("sasl.username".into(), "alice".into());
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("alice") && printed.contains("<redacted>"),
            "{printed}"
        );
    }
}

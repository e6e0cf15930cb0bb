//! Agents: microservices that consume a card's work items and publish results.
//!
//! [`run`] drives any [`Handler`]; [`crate::runtime`] holds the handlers of the card runtimes. Offsets are
//! committed only up to the lowest work item not yet answered, so a crash re-delivers unanswered
//! work (at least once); results carry the step id and attempt, which the router dedupes on.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerGroupMetadata, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::cards::{Card, Runtime};
use crate::codec::{Codec, Encoding};
use crate::commit::{self, ConsistencyMode, Outgoing, Writer, Written};
use crate::envelope::{EventKind, TaskEvent, Usage, WorkItem};
use crate::error::{Error, Result};
use crate::kafka::{self, KafkaConfig};
use crate::metrics::AgentMetrics;
use crate::signing::Secret;
use crate::trace;

/// An agent's answer to one work item.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    /// The output payload.
    pub payload: Value,
    /// Confidence in the output, 0 to 1.
    pub confidence: Option<f64>,
    /// Tokens and cost spent.
    pub usage: Option<Usage>,
}

/// Why a work item failed, and whether another attempt may do better.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong (published as the FAILED event's `error`).
    pub reason: String,
    /// Whether the card's retry policy applies. A permanent failure (a request the agent
    /// refused as invalid, an HTTP 4xx) is published with `"retryable": false` and gets no
    /// further attempt; the card's fallback, if any, still acts.
    pub retryable: bool,
}

impl Failure {
    /// A failure another attempt will not mend.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            retryable: false,
        }
    }
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Self {
            reason,
            retryable: true,
        }
    }
}

impl From<&str> for Failure {
    fn from(reason: &str) -> Self {
        reason.to_string().into()
    }
}

/// Handles work items; implement it to write an agent in Rust.
pub trait Handler: Send + Sync + 'static {
    /// Handles one work item: `Ok` publishes a RESULT, `Err` a FAILED event.
    fn handle(&self, item: WorkItem) -> impl Future<Output = Result<Reply, Failure>> + Send;
}

/// The error for a card this handler cannot run.
pub fn not_runnable(card: &Card) -> Error {
    let (runtime, why) = match card.runtime {
        Runtime::Command { .. } | Runtime::Http { .. } | Runtime::A2a { .. } => {
            ("runnable", "is runnable")
        }
        Runtime::Handler => (
            "handler",
            "runs in your own Rust program through `switchyard::agent::run`",
        ),
        Runtime::Human => (
            "human",
            "is answered by people with `switchyard submit --kind HUMAN_DECISION`",
        ),
        Runtime::Llm { .. } => ("llm", "runs through `switchyard::llm::LlmHandler`"),
    };
    Error::Setup(format!(
        "card `{}` has runtime `{runtime}`, which {why}",
        card.name
    ))
}

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Kafka settings.
    pub kafka: KafkaConfig,
    /// The card.
    pub card: Card,
    /// Consumer group; replicas of one card share it. Default `<prefix>.agent.<card>`.
    pub group_id: String,
    /// Consumer session timeout.
    pub session_timeout: Duration,
    /// Where to serve `/metrics`, `/health` and `/ready`, if anywhere.
    pub http_addr: Option<SocketAddr>,
    /// `exactly-once`: each result is published and its work item's offset committed in one
    /// transaction; `effectively-once`: results are published, offsets committed after them.
    pub consistency: ConsistencyMode,
    /// This replica's id; with exactly-once it names the transactional id.
    pub instance_id: String,
    /// Wire encoding of work items and results.
    pub encoding: Encoding,
    /// Schema registry URL (Avro).
    pub registry_url: String,
    /// The card's signing secret (from its `secret_env`): every result is signed with it.
    pub secret: Option<Secret>,
}

impl AgentConfig {
    /// Defaults for `card` on `kafka`.
    pub fn new(kafka: KafkaConfig, card: Card) -> Self {
        let group_id = format!("{}.agent.{}", kafka.topic_prefix, card.name);
        let secret = card.secret_env.as_deref().and_then(Secret::from_env);
        Self {
            kafka,
            card,
            group_id,
            session_timeout: crate::kafka::DEFAULT_SESSION_TIMEOUT,
            http_addr: None,
            consistency: ConsistencyMode::default(),
            instance_id: format!("agent-{}", uuid::Uuid::new_v4().simple()),
            encoding: Encoding::Json,
            registry_url: "http://127.0.0.1:8081".into(),
            secret,
        }
    }
}

/// Offsets of one partition: in flight and the highest done.
#[derive(Debug, Default)]
struct PartitionOffsets {
    inflight: BTreeSet<i64>,
    next: Option<i64>,
}

impl PartitionOffsets {
    /// The offset to commit: the lowest in flight, else one past the highest done.
    fn committable(&self) -> Option<i64> {
        self.inflight.first().copied().or(self.next)
    }
}

/// Recently answered (task, step, attempt), to skip re-delivered work items.
#[derive(Debug, Default)]
struct Recent {
    seen: HashSet<(String, u32, u32)>,
    order: VecDeque<(String, u32, u32)>,
}

impl Recent {
    const CAPACITY: usize = 50_000;

    fn insert(&mut self, key: (String, u32, u32)) -> bool {
        if !self.seen.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// Runs an agent until `shutdown` turns true; then it stops fetching, finishes the work it holds,
/// commits and returns.
pub async fn run<H: Handler>(
    config: AgentConfig,
    handler: Arc<H>,
    metrics: AgentMetrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let card = config.card.clone();
    if let (Some(var), None) = (&card.secret_env, &config.secret) {
        return Err(Error::Setup(format!(
            "card `{}` signs its answers with the secret in `{var}`, which is not set; set it (the secret never goes in the card)",
            card.name
        )));
    }
    let topics = config.kafka.topics();
    let inbox = card.topic(&config.kafka.topic_prefix);
    config.kafka.partition_count(&inbox)?;
    let ready = Arc::new(AtomicBool::new(true));
    if let Some(addr) = config.http_addr {
        let bound = crate::metrics::serve(addr, metrics.registry.clone(), ready).await?;
        tracing::info!(%bound, "serving /metrics, /health, /ready");
    }
    let mut client = config.kafka.client_config();
    client
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        )
        .set_log_level(RDKafkaLogLevel::Warning);
    kafka::service_consumer_defaults(&mut client);
    let consumer: StreamConsumer = client.create()?;
    consumer.subscribe(&[&inbox])?;
    let transactional_id = format!("{}.{}", config.group_id, config.instance_id);
    let mut publisher = Publisher {
        writer: Writer::new(&config.kafka, config.consistency, &transactional_id).await?,
        kafka: &config.kafka,
        transactional_id: &transactional_id,
        codec: Codec::new(config.encoding, &config.registry_url),
        tasks_topic: topics.tasks(),
        card: &card.name,
        secret: config.secret.as_ref(),
        metrics: &metrics,
    };
    tracing::info!(card = %card.name, %inbox, group = %config.group_id, "agent started");

    let mut offsets: BTreeMap<i32, PartitionOffsets> = BTreeMap::new();
    let mut recent = Recent::default();
    let mut running: JoinSet<(i32, i64, Option<Outcome>)> = JoinSet::new();
    let mut commit_ticker = tokio::time::interval(Duration::from_millis(500));
    let mut stopping = false;
    loop {
        let room = running.len() < card.concurrency;
        tokio::select! {
            _ = shutdown.changed(), if !stopping => {
                tracing::info!(inflight = running.len(), "draining");
                stopping = true;
            }
            _ = commit_ticker.tick() => commit(&consumer, &inbox, &offsets, CommitMode::Async),
            Some(done) = running.join_next() => {
                let (partition, offset, outcome) = done.expect("work item tasks do not panic");
                let entry = offsets.entry(partition).or_default();
                entry.inflight.remove(&offset);
                entry.next = Some(entry.next.unwrap_or(0).max(offset + 1));
                if let Some(outcome) = outcome {
                    let next = entry.committable();
                    let commit = || match (next, consumer.group_metadata()) {
                        (Some(next), Some(group)) => {
                            let mut tpl = TopicPartitionList::new();
                            tpl.add_partition_offset(&inbox, partition, Offset::Offset(next)).ok()?;
                            Some((tpl, group))
                        }
                        _ => None,
                    };
                    publisher.publish(outcome, commit).await?;
                }
            }
            message = consumer.recv(), if room && !stopping => {
                let message = match message {
                    Ok(m) => m.detach(),
                    Err(e) => { tracing::warn!(error = %e, "consumer error"); continue; }
                };
                let (partition, offset) = (message.partition(), message.offset());
                let parent = trace::extract(message.headers());
                offsets.entry(partition).or_default().inflight.insert(offset);
                let item = match publisher.codec.decode_work_item(message.payload().unwrap_or_default()).await {
                    Ok(item) => Some(item),
                    Err(e) => {
                        tracing::warn!(partition, offset, error = %e, "skipping a record that is not a work item");
                        metrics.work_items.with_label_values(&[&card.name, "undecodable"]).inc();
                        None
                    }
                };
                let fresh = item.filter(|i| {
                    let new = recent.insert((i.task_id.clone(), i.step_id, i.attempt));
                    if !new {
                        metrics.work_items.with_label_values(&[&card.name, "duplicate"]).inc();
                    }
                    new
                });
                let handler = handler.clone();
                let metrics = metrics.clone();
                let name = card.name.clone();
                running.spawn(async move {
                    let Some(item) = fresh else { return (partition, offset, None) };
                    metrics.inflight.inc();
                    let started = Instant::now();
                    let span = tracing::info_span!(
                        "agent_step",
                        card = %name,
                        task_id = %item.task_id,
                        step_id = item.step_id,
                        attempt = item.attempt,
                    );
                    let trace = trace::hop(&span, parent);
                    let result = handler.handle(item.clone()).instrument(span.clone()).await;
                    metrics.handle_seconds.with_label_values(&[&name]).observe(started.elapsed().as_secs_f64());
                    metrics.inflight.dec();
                    (partition, offset, Some(Outcome { item, result, trace }))
                });
            }
            else => break,
        }
        if stopping && running.is_empty() {
            break;
        }
    }
    commit(&consumer, &inbox, &offsets, CommitMode::Async);
    kafka::close(&card.name, (consumer, publisher.writer)).await;
    tracing::info!(card = %card.name, "agent stopped");
    Ok(())
}

struct Outcome {
    item: WorkItem,
    result: Result<Reply, Failure>,
    /// The `traceparent` of the step, put on the answer.
    trace: String,
}

/// Publishes agents' answers.
struct Publisher<'a> {
    writer: Writer,
    kafka: &'a KafkaConfig,
    transactional_id: &'a str,
    codec: Codec,
    tasks_topic: String,
    card: &'a str,
    secret: Option<&'a Secret>,
    metrics: &'a AgentMetrics,
}

impl Publisher<'_> {
    /// Publishes the answer to a handled work item; in exactly-once mode with the offsets
    /// `commit` gives, in one transaction. A result the broker refuses as a record (too large,
    /// invalid) becomes a FAILED with the broker's error, so that the router's retry policy
    /// decides.
    async fn publish(
        &mut self,
        outcome: Outcome,
        commit: impl Fn() -> Option<(TopicPartitionList, ConsumerGroupMetadata)>,
    ) -> Result<()> {
        let (item, trace) = (outcome.item.clone(), outcome.trace.clone());
        let record = self.record(outcome).await?;
        let size = record.size();
        let Some(refused) = self.send(record, commit()).await? else {
            return Ok(());
        };
        let result = Err(format!("the broker refused the result ({size} bytes): {refused}").into());
        let record = self
            .record(Outcome {
                item,
                result,
                trace,
            })
            .await?;
        if let Some(refused) = self.send(record, commit()).await? {
            tracing::error!(error = %refused, "the broker refused the failure too; the work item waits for the router's timeout");
        }
        Ok(())
    }

    /// Sends one answer; returns the broker's error if it refused the record.
    async fn send(
        &mut self,
        record: Outgoing,
        commit: Option<(TopicPartitionList, ConsumerGroupMetadata)>,
    ) -> Result<Option<rdkafka::error::KafkaError>> {
        if self.writer.mode() == ConsistencyMode::EffectivelyOnce {
            return publish_again_on_failure(
                &mut self.writer,
                self.kafka,
                self.transactional_id,
                record,
            )
            .await;
        }
        match self.writer.write(vec![vec![record]], commit).await? {
            Written::Committed(_) => Ok(None),
            Written::Aborted(e) => Err(kafka::Error::Aborted(e).into()),
            Written::Refused(refused) => Ok(refused.into_iter().next().map(|(_, _, e)| e)),
        }
    }

    async fn record(&self, outcome: Outcome) -> Result<Outgoing> {
        result_record(
            &self.codec,
            &self.tasks_topic,
            self.card,
            self.secret,
            outcome,
            self.metrics,
        )
        .await
    }
}

/// How often an effectively-once agent rebuilds its producer to publish one result.
const PUBLISH_TRIES: u32 = 5;

/// Publishes a result without a transaction. A producer that fails for good (e.g. the broker
/// answers an idempotent write with OutOfOrderSequenceNumber, which librdkafka treats as fatal) is
/// replaced and the result sent again: results are at-least-once and the router drops the
/// duplicates by step id, so only the agent's own producer needs to survive. An error that
/// belongs to this one record (see [`commit::refuses_record`]) is returned instead.
async fn publish_again_on_failure(
    writer: &mut Writer,
    kafka: &KafkaConfig,
    transactional_id: &str,
    record: Outgoing,
) -> Result<Option<rdkafka::error::KafkaError>> {
    let mut tries = 1;
    loop {
        match writer.write(vec![vec![record.clone()]], None).await {
            Ok(_) => return Ok(None),
            Err(kafka::Error::Produce { source, .. }) if commit::refuses_record(&source) => {
                return Ok(Some(source))
            }
            Err(e) if tries < PUBLISH_TRIES => {
                tracing::warn!(error = %e, tries, "publishing a result failed; replacing the producer");
                *writer =
                    Writer::new(kafka, ConsistencyMode::EffectivelyOnce, transactional_id).await?;
                tries += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The RESULT or FAILED event for a handled work item, signed with `secret` if the card has one.
async fn result_record(
    codec: &Codec,
    tasks_topic: &str,
    card: &str,
    secret: Option<&Secret>,
    outcome: Outcome,
    metrics: &AgentMetrics,
) -> Result<Outgoing> {
    let Outcome {
        item,
        result,
        trace,
    } = outcome;
    let (kind, label) = if result.is_ok() {
        (EventKind::Result, "result")
    } else {
        (EventKind::Failed, "failed")
    };
    let mut event = TaskEvent::new(&item.task_id, kind, card);
    event.tenant = item.tenant.clone();
    event.step_id = Some(item.step_id);
    event.attempt = Some(item.attempt);
    match result {
        Ok(reply) => {
            event.payload = reply.payload;
            event.confidence = reply.confidence;
            event.usage = reply.usage;
        }
        Err(failure) => {
            let error = &failure.reason;
            tracing::warn!(task = %item.task_id, step = item.step_id, attempt = item.attempt, %error, retryable = failure.retryable, "work item failed");
            event.payload = match failure.retryable {
                true => serde_json::json!({ "error": error }),
                false => serde_json::json!({ "error": error, "retryable": false }),
            };
        }
    }
    metrics.work_items.with_label_values(&[card, label]).inc();
    let payload = codec.encode_task_event(tasks_topic, &event).await?;
    let signed = secret.map(|s| s.headers(&event.task_id, event.step_id, event.attempt, &payload));
    let headers = trace::add(signed, &trace);
    let mut record = Outgoing::bytes(
        tasks_topic.to_string(),
        Some(item.reply_partition),
        &item.task_id,
        payload,
    );
    record.headers = Some(headers);
    Ok(record)
}

fn commit(
    consumer: &StreamConsumer,
    topic: &str,
    offsets: &BTreeMap<i32, PartitionOffsets>,
    mode: CommitMode,
) {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        if let Some(next) = o.committable() {
            let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(next));
        }
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, mode) {
            tracing::debug!(error = %e, "offset commit failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committable_offset_is_the_lowest_unfinished() {
        let mut o = PartitionOffsets::default();
        o.inflight.extend([5, 6, 7]);
        o.inflight.remove(&6);
        o.next = Some(7);
        assert_eq!(o.committable(), Some(5));
        o.inflight.clear();
        assert_eq!(o.committable(), Some(7));
    }
}

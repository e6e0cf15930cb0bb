//! The router's Kafka loop (effectively-once, for brokers without transactions).
//!
//! For each batch of task events: decide every event against its partition's state, then write
//! (1) dead letters, (2) state events, (3) work items, waiting for each to be acknowledged before
//! the next. A decision is therefore on the state topic before any work item it sends; the input
//! position is recovered from the state topic. On assignment of a partition the router writes an
//! ownership record to the state partition, restores state up to that record, re-sends the work
//! items of pending steps (stable step ids: agents and the router dedupe), and only then reads the
//! tasks partition from the restored position. Records of a fenced (older) owner written after a
//! newer ownership record are ignored on restore.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use futures::FutureExt;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use super::engine::{work_item, Engine, Outcome};
use crate::envelope::{
    decode_task_event, dlq_headers, now_ms, Decision, InputRef, StateEvent, WorkItem,
};
use crate::kafka::{self, set_default, KafkaConfig, Topics};
use crate::metrics::RouterMetrics;
use crate::state::PartitionState;

/// Errors that stop the router.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kafka failed.
    #[error(transparent)]
    Kafka(#[from] kafka::Error),
    /// A client call failed.
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    /// A write was not acknowledged; the router stops so that a restart restores from the log.
    #[error("write to `{topic}` failed: {source}")]
    Produce {
        /// The topic.
        topic: String,
        /// The error.
        source: rdkafka::error::KafkaError,
    },
    /// Restoring a partition failed.
    #[error("restore of {topic}[{partition}] failed: {message}")]
    Restore {
        /// The state topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// What went wrong.
        message: String,
    },
    /// The tasks and state topics are not co-partitioned.
    #[error("`{tasks}` has {task_partitions} partitions but `{state}` has {state_partitions}; they must be equal (run `switchyard topics apply`)")]
    NotCoPartitioned {
        /// Tasks topic.
        tasks: String,
        /// Its partitions.
        task_partitions: i32,
        /// State topic.
        state: String,
        /// Its partitions.
        state_partitions: i32,
    },
    /// Metrics could not be served.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::Error),
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the router runs.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Kafka settings.
    pub kafka: KafkaConfig,
    /// This instance's id, written in ownership records and state events.
    pub instance_id: String,
    /// Consumer group of the router instances.
    pub group_id: String,
    /// Most events decided in one batch.
    pub max_batch: usize,
    /// Consumer session timeout: how soon a crashed instance's partitions move.
    pub session_timeout: Duration,
    /// Where to serve `/metrics`, `/health` and `/ready`, if anywhere.
    pub http_addr: Option<SocketAddr>,
}

impl RouterConfig {
    /// Defaults for `kafka`: a random instance id, the prefix's router group, batches of 500.
    pub fn new(kafka: KafkaConfig) -> Self {
        let group_id = kafka.topics().router_group();
        Self {
            kafka,
            instance_id: format!("router-{}", uuid::Uuid::new_v4().simple()),
            group_id,
            max_batch: 500,
            session_timeout: Duration::from_secs(10),
            http_addr: None,
        }
    }
}

enum RebalanceEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

struct RebalanceContext {
    events: mpsc::UnboundedSender<RebalanceEvent>,
}

impl ClientContext for RebalanceContext {}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let _ = self.events.send(RebalanceEvent::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Nothing is processed from a partition before its state is restored.
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error = %e, "could not pause newly assigned partitions");
            }
            let _ = self.events.send(RebalanceEvent::Assigned(partitions(tpl)));
        }
    }
}

/// One record to write.
struct Outgoing {
    topic: String,
    partition: Option<i32>,
    key: Vec<u8>,
    payload: Vec<u8>,
    headers: Option<OwnedHeaders>,
}

impl Outgoing {
    fn json<T: serde::Serialize>(
        topic: String,
        partition: Option<i32>,
        key: &str,
        value: &T,
    ) -> Self {
        let payload = serde_json::to_vec(value).expect("records serialize to JSON");
        Self {
            topic,
            partition,
            key: key.as_bytes().to_vec(),
            payload,
            headers: None,
        }
    }
}

/// A running router.
pub struct Router {
    config: RouterConfig,
    engine: Arc<Engine>,
    metrics: RouterMetrics,
    topics: Topics,
    producer: FutureProducer,
    card_topics: HashMap<String, String>,
    partitions: HashMap<i32, PartitionState>,
    gaps: HashMap<i32, Gap>,
    ready: Arc<AtomicBool>,
}

/// A hole in a tasks partition: records past `expected` arrived before `expected` itself.
///
/// Kafka never shows a record before the ones below it, but a broker that assigns offsets to
/// concurrent producers before it stores them (nisshi's memory engine) can; the router then seeks
/// back and fetches again. Holes that persist are real (compaction, transaction markers) and are
/// accepted after [`GAP_RETRIES`] fetches.
#[derive(Debug, Clone, Copy)]
struct Gap {
    expected: i64,
    retries: u32,
}

/// How many times the router fetches a hole again before it accepts it.
const GAP_RETRIES: u32 = 20;

impl Router {
    /// Prepares a router; checks that the topics exist and are co-partitioned.
    pub fn new(config: RouterConfig, engine: Engine, metrics: RouterMetrics) -> Result<Self> {
        let topics = config.kafka.topics();
        let (tasks, state) = (topics.tasks(), topics.state());
        let task_partitions = config.kafka.partition_count(&tasks)?;
        let state_partitions = config.kafka.partition_count(&state)?;
        if task_partitions != state_partitions {
            return Err(Error::NotCoPartitioned {
                tasks,
                task_partitions,
                state,
                state_partitions,
            });
        }
        let prefix = &config.kafka.topic_prefix;
        let card_topics = engine
            .cards
            .iter()
            .map(|c| (c.name.clone(), c.topic(prefix)))
            .collect();
        let producer = config.kafka.producer()?;
        // Connect now, so that the first ownership record does not pay for it.
        producer
            .client()
            .fetch_metadata(Some(&state), Duration::from_secs(10))?;
        Ok(Self {
            topics,
            producer,
            card_topics,
            engine: Arc::new(engine),
            metrics,
            partitions: HashMap::new(),
            gaps: HashMap::new(),
            ready: Arc::new(AtomicBool::new(false)),
            config,
        })
    }

    /// Runs until `shutdown` turns true or a write fails.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        if let Some(addr) = self.config.http_addr {
            let bound =
                crate::metrics::serve(addr, self.metrics.registry.clone(), self.ready.clone())
                    .await?;
            tracing::info!(%bound, "serving /metrics, /health, /ready");
        }
        let (tx, mut rebalances) = mpsc::unbounded_channel();
        let mut config = self.config.kafka.client_config();
        config
            .set("group.id", &self.config.group_id)
            .set("client.id", &self.config.instance_id)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set(
                "session.timeout.ms",
                self.config.session_timeout.as_millis().to_string(),
            )
            .set_log_level(RDKafkaLogLevel::Warning);
        set_default(&mut config, "auto.offset.reset", "earliest");
        set_default(&mut config, "isolation.level", "read_committed");
        set_default(&mut config, "heartbeat.interval.ms", "1000");
        let consumer: StreamConsumer<RebalanceContext> =
            config.create_with_context(RebalanceContext { events: tx })?;
        consumer.subscribe(&[&self.topics.tasks()])?;
        tracing::info!(instance = %self.config.instance_id, group = %self.config.group_id, "router started");
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        loop {
            while let Ok(event) = rebalances.try_recv() {
                self.rebalance(event, &consumer).await?;
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(event) = rebalances.recv() => self.rebalance(event, &consumer).await?,
                _ = ticker.tick() => {
                    let active = self.partitions.values().map(|p| p.tasks.len() as i64).sum();
                    self.metrics.inflight_tasks.set(active);
                }
                first = consumer.recv() => {
                    let mut batch = Vec::new();
                    match first {
                        Ok(m) => batch.push(m.detach()),
                        Err(e) => { tracing::warn!(error = %e, "consumer error"); continue; }
                    }
                    while batch.len() < self.config.max_batch {
                        match consumer.recv().now_or_never() {
                            Some(Ok(m)) => batch.push(m.detach()),
                            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                            None => break,
                        }
                    }
                    while let Ok(event) = rebalances.try_recv() {
                        self.rebalance(event, &consumer).await?;
                    }
                    let refetch = self.process(batch).await?;
                    self.refetch(&consumer, refetch)?;
                    self.commit_positions(&consumer);
                }
            }
        }
        self.commit_positions(&consumer);
        tracing::info!("router stopped");
        Ok(())
    }

    /// Commits the consumer group's offsets (informational: the state topic is authoritative).
    fn commit_positions(&self, consumer: &StreamConsumer<RebalanceContext>) {
        let mut tpl = TopicPartitionList::new();
        for (p, state) in &self.partitions {
            if let Some(next) = state.next_offset {
                let _ = tpl.add_partition_offset(&self.topics.tasks(), *p, Offset::Offset(next));
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "offset commit failed");
            }
        }
    }

    /// Seeks partitions with a hole back to the first offset not yet decided.
    fn refetch(
        &self,
        consumer: &StreamConsumer<RebalanceContext>,
        partitions: Vec<i32>,
    ) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            if let Some(next) = self.partitions.get(&p).and_then(|s| s.next_offset) {
                tpl.add_partition_offset(&self.topics.tasks(), p, Offset::Offset(next))?;
            }
        }
        if tpl.count() > 0 {
            consumer.seek_partitions(tpl, Duration::from_secs(10))?;
        }
        Ok(())
    }

    async fn rebalance(
        &mut self,
        event: RebalanceEvent,
        consumer: &StreamConsumer<RebalanceContext>,
    ) -> Result<()> {
        match event {
            RebalanceEvent::Revoked(parts) => {
                for p in parts {
                    self.partitions.remove(&p);
                    self.gaps.remove(&p);
                }
                tracing::info!(owned = ?self.owned(), "partitions revoked");
            }
            RebalanceEvent::Assigned(parts) => {
                self.ready.store(false, Ordering::Relaxed);
                let tasks = self.topics.tasks();
                let restored =
                    futures::future::try_join_all(parts.iter().map(|p| self.restore(*p))).await?;
                for (p, state) in parts.into_iter().zip(restored) {
                    let mut tpl = TopicPartitionList::new();
                    let position = state.next_offset.map_or(Offset::Beginning, Offset::Offset);
                    tpl.add_partition_offset(&tasks, p, position)?;
                    consumer.seek_partitions(tpl.clone(), Duration::from_secs(10))?;
                    consumer.resume(&tpl)?;
                    self.partitions.insert(p, state);
                }
                tracing::info!(owned = ?self.owned(), "partitions assigned and restored");
            }
        }
        self.metrics.partitions.set(self.partitions.len() as i64);
        self.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn owned(&self) -> Vec<i32> {
        let mut owned: Vec<i32> = self.partitions.keys().copied().collect();
        owned.sort_unstable();
        owned
    }

    /// Takes over state partition `p`: ownership record, fold up to it, re-send pending work.
    async fn restore(&self, p: i32) -> Result<PartitionState> {
        let started = Instant::now();
        let topic = self.topics.state();
        let owned = StateEvent {
            task_id: String::new(),
            seq: 0,
            epoch: -1,
            instance: self.config.instance_id.clone(),
            input: None,
            event: None,
            answers_step: None,
            decision: Decision::Owned {
                instance: self.config.instance_id.clone(),
            },
            at: now_ms(),
        };
        let record = Outgoing::json(topic.clone(), Some(p), "", &owned);
        let epoch = self
            .producer
            .send(to_record(&record), Duration::from_secs(30))
            .await
            .map_err(|(source, _)| Error::Produce {
                topic: topic.clone(),
                source,
            })?
            .offset;
        let restore_err = |message: String| Error::Restore {
            topic: topic.clone(),
            partition: p,
            message,
        };
        let mut config = self.config.kafka.client_config();
        config
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .set("group.id", format!("{}.restore", self.config.group_id));
        let reader: StreamConsumer = config.create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
        reader.assign(&tpl)?;
        let mut state = PartitionState::default();
        let (mut read, mut fenced) = (0u64, 0u64);
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), reader.recv())
                .await
                .map_err(|_| {
                    restore_err(format!(
                        "no record at or before offset {epoch} arrived within 30s"
                    ))
                })??;
            let offset = message.offset();
            let Some(bytes) = message.payload() else {
                continue;
            };
            let record: StateEvent = serde_json::from_slice(bytes)
                .map_err(|e| restore_err(format!("offset {offset} is not a state event: {e}")))?;
            read += 1;
            if !state.restore(&record, offset) {
                fenced += 1;
            }
            if offset >= epoch {
                break;
            }
        }
        let mut reemit = Vec::new();
        for task in state.tasks.values() {
            for step in task.pending() {
                self.metrics
                    .reemitted
                    .with_label_values(&[&step.card])
                    .inc();
                reemit.push(self.work_record(&work_item(task, &step, p)));
            }
        }
        let resent = reemit.len();
        self.send_all(reemit).await?;
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.restore_seconds.observe(seconds);
        tracing::info!(
            partition = p, epoch, read, fenced, active = state.tasks.len(), resent, next_offset = ?state.next_offset,
            seconds, "restored partition"
        );
        Ok(state)
    }

    fn work_record(&self, item: &WorkItem) -> Outgoing {
        let topic = self
            .card_topics
            .get(&item.card)
            .cloned()
            .unwrap_or_default();
        Outgoing::json(topic, None, &item.task_id, item)
    }

    /// Decides a batch and writes its records; returns the partitions to fetch again (holes).
    async fn process(&mut self, batch: Vec<OwnedMessage>) -> Result<Vec<i32>> {
        let started = Instant::now();
        let (mut dead, mut states, mut works) = (Vec::new(), Vec::new(), Vec::new());
        let tasks_topic = self.topics.tasks();
        let state_topic = self.topics.state();
        let mut decided = 0u64;
        let mut refetch = Vec::new();
        for message in &batch {
            let p = message.partition();
            let Some(partition) = self.partitions.get_mut(&p) else {
                continue;
            };
            if refetch.contains(&p) || message.offset() < partition.next_offset.unwrap_or(0) {
                continue;
            }
            if let Some(expected) = partition.next_offset.filter(|e| message.offset() > *e) {
                let gap = self.gaps.entry(p).or_insert(Gap {
                    expected,
                    retries: 0,
                });
                if gap.expected != expected {
                    *gap = Gap {
                        expected,
                        retries: 0,
                    };
                }
                if gap.retries < GAP_RETRIES {
                    gap.retries += 1;
                    refetch.push(p);
                    continue;
                }
                tracing::warn!(
                    partition = p,
                    expected,
                    got = message.offset(),
                    "accepting a gap in the tasks partition"
                );
                self.metrics.gaps.inc();
            }
            self.gaps.remove(&p);
            decided += 1;
            let bytes = message.payload().unwrap_or_default();
            let (event, outcome) = match decode_task_event(bytes) {
                Ok(event) => {
                    let outcome = self.engine.decide(partition, &event);
                    (Some(event), outcome)
                }
                Err(e) => {
                    let decision = Decision::DeadLettered {
                        reason: e.reason().into(),
                        message: e.to_string(),
                        ends_task: false,
                    };
                    (
                        None,
                        Outcome {
                            answers_step: None,
                            decision,
                        },
                    )
                }
            };
            let kind = event.as_ref().map_or("undecodable", |e| e.kind.as_str());
            self.metrics.events.with_label_values(&[kind]).inc();
            let task_id = event
                .as_ref()
                .map(|e| e.task_id.clone())
                .unwrap_or_default();
            let seq = partition.tasks.get(&task_id).map_or(1, |t| t.seq + 1);
            let record = StateEvent {
                task_id: task_id.clone(),
                seq,
                epoch: partition.epoch.unwrap_or(-1),
                instance: self.config.instance_id.clone(),
                input: Some(InputRef {
                    event_id: event.as_ref().map(|e| e.event_id.clone()),
                    topic: tasks_topic.clone(),
                    partition: p,
                    offset: message.offset(),
                }),
                event,
                answers_step: outcome.answers_step,
                decision: outcome.decision,
                at: now_ms(),
            };
            partition.apply(&record);
            count_decision(&self.metrics, &record.decision);
            match &record.decision {
                Decision::DeadLettered {
                    reason,
                    message: why,
                    ..
                } => {
                    dead.push(dead_letter(self.topics.dlq(), message, reason, why));
                }
                Decision::Dropped { reason } => {
                    self.metrics.dropped.with_label_values(&[reason]).inc()
                }
                _ => {}
            }
            if let Some(task) = partition.tasks.get(&task_id) {
                for item in self.engine.work_items(task, &record.decision, p) {
                    works.push(item);
                }
            }
            states.push(Outgoing::json(
                state_topic.clone(),
                Some(p),
                &task_id,
                &record,
            ));
        }
        if decided == 0 {
            return Ok(refetch);
        }
        let works: Vec<Outgoing> = works.iter().map(|w| self.work_record(w)).collect();
        self.send_all(dead).await?;
        self.send_all(states).await?;
        self.send_all(works).await?;
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.commit_latency.observe(elapsed);
        for _ in 0..decided {
            self.metrics.routing_latency.observe(elapsed);
        }
        Ok(refetch)
    }

    async fn send_all(&self, records: Vec<Outgoing>) -> Result<()> {
        let sends = records.iter().map(|r| {
            self.producer
                .send(to_record(r), Duration::from_secs(30))
                .map(move |res| {
                    res.map_err(|(source, _)| Error::Produce {
                        topic: r.topic.clone(),
                        source,
                    })
                })
        });
        try_join_all(sends).await?;
        Ok(())
    }
}

fn to_record(r: &Outgoing) -> FutureRecord<'_, [u8], [u8]> {
    let mut record = FutureRecord::to(&r.topic)
        .key(r.key.as_slice())
        .payload(r.payload.as_slice());
    if let Some(p) = r.partition {
        record = record.partition(p);
    }
    if let Some(h) = &r.headers {
        record = record.headers(h.clone());
    }
    record
}

fn count_decision(metrics: &RouterMetrics, decision: &Decision) {
    let name = decision.name();
    match decision {
        Decision::Routed { steps, decided_by } => {
            let source = match decided_by {
                crate::envelope::DecidedBy::Rule { .. } => "rule",
                crate::envelope::DecidedBy::Fallback { .. } => "fallback",
            };
            for step in steps {
                metrics
                    .decisions
                    .with_label_values(&[name, source, &step.card])
                    .inc();
            }
        }
        Decision::Escalated { step, .. } => metrics
            .decisions
            .with_label_values(&[name, "rule", &step.card])
            .inc(),
        Decision::RetryScheduled { step } => metrics
            .decisions
            .with_label_values(&[name, "policy", &step.card])
            .inc(),
        Decision::DeadLettered { reason, .. } => {
            metrics.dead_letters.with_label_values(&[reason]).inc();
            metrics
                .decisions
                .with_label_values(&[name, "router", ""])
                .inc();
        }
        _ => metrics
            .decisions
            .with_label_values(&[name, "router", ""])
            .inc(),
    }
}

/// The dead-letter record for `message`: its original key and bytes, with the reason in headers.
fn dead_letter(topic: String, message: &OwnedMessage, reason: &str, why: &str) -> Outgoing {
    let partition = message.partition().to_string();
    let offset = message.offset().to_string();
    let time = now_ms().to_string();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: dlq_headers::REASON,
            value: Some(reason),
        })
        .insert(Header {
            key: dlq_headers::MESSAGE,
            value: Some(why),
        })
        .insert(Header {
            key: dlq_headers::TOPIC,
            value: Some(message.topic()),
        })
        .insert(Header {
            key: dlq_headers::PARTITION,
            value: Some(&partition),
        })
        .insert(Header {
            key: dlq_headers::OFFSET,
            value: Some(&offset),
        })
        .insert(Header {
            key: dlq_headers::ROUTER_VERSION,
            value: Some(env!("CARGO_PKG_VERSION")),
        })
        .insert(Header {
            key: dlq_headers::TIME,
            value: Some(&time),
        });
    let redrives = message
        .headers()
        .and_then(|hs| {
            hs.iter()
                .find(|h| h.key == dlq_headers::REDRIVES)
                .and_then(|h| h.value)
        })
        .map(|v| String::from_utf8_lossy(v).into_owned());
    let headers = match &redrives {
        Some(count) => headers.insert(Header {
            key: dlq_headers::REDRIVES,
            value: Some(count),
        }),
        None => headers,
    };
    Outgoing {
        topic,
        partition: None,
        key: message.key().unwrap_or_default().to_vec(),
        payload: message.payload().unwrap_or_default().to_vec(),
        headers: Some(headers),
    }
}

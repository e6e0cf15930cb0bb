//! The router's Kafka loop: a `tokio::select!` over the consumer, rebalances, a ticker and the
//! shutdown signal.
//!
//! For each batch of task events the router decides every event against its partition's state and
//! hands the resulting dead letters, state events and work items to the [`Writer`], which makes
//! them durable in the configured [`ConsistencyMode`]. In effectively-once mode a decision is on
//! the state topic before any work item it sends and the input position is recovered from the state
//! topic; in exactly-once mode the batch and its offsets commit in one transaction.
//!
//! On assignment of partitions the router writes an ownership record to each state partition,
//! restores state up to that record (from the newest usable [`snapshot`] and the records after
//! it), re-sends the work items that may be missing (see [`resend`]), and only then reads the tasks
//! partitions from the restored positions. Records of a fenced (older) owner written after a newer
//! ownership record are ignored. Between batches, snapshots that are due are written in the
//! background.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerGroupMetadata, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use super::asking::{Answer, Question, Questions};
use super::engine::{work_item_ref, Engine, Outcome};
use super::guard::Raw;
use super::inbox::{Inbox, RebalanceContext, RebalanceEvent, TasksConsumer};
use super::partition::{Partition, Position, Step};
use super::pipeline::{Flight, Landed, Pipeline};
use super::resend;
use super::snapshot::{self, Due, Ended, Schedule, SnapshotConfig};
use super::timers::TimerIndex;
use crate::codec::{Codec, Encoding};
use crate::commit::{self, ConsistencyMode, Outgoing, Writer, Written};
use crate::dlq;
use crate::envelope::{
    now_ms, BreakerPhase, Decision, DecodeError, EventKind, InputRef, LlmRecord, Rejection,
    StateEvent, TaskEvent, TimerKind, WorkItemRef,
};
use crate::error::{Error, Result};
use crate::kafka::{self, set_default, KafkaConfig, Topics};
use crate::llm::{LlmClient, LlmConfig};
use crate::metrics::{CounterCache, RouterMetrics};
use crate::rules::Action;
use crate::signing::SIGNATURE_HEADER;
use crate::state::{PartitionState, TaskState, Undo};
use crate::state_record::{self, Batched};
use crate::trace;

/// The error for a state event the broker refused.
pub(super) fn state_refused(record: &Outgoing, source: KafkaError) -> Error {
    kafka::Error::StateRefused {
        topic: record.topic.clone(),
        bytes: record.size(),
        source,
    }
    .into()
}

/// How the router runs.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Kafka settings.
    pub kafka: KafkaConfig,
    /// This instance's id, written in ownership records and state events; with exactly-once it
    /// also names the transactional id, so a restarted instance with the same id fences its
    /// predecessor.
    pub instance_id: String,
    /// Consumer group of the router instances.
    pub group_id: String,
    /// Most events decided in one batch.
    pub max_batch: usize,
    /// Exactly-once: how long a batch may gather events before it commits.
    pub commit_interval: Duration,
    /// The processing guarantee.
    pub consistency: ConsistencyMode,
    /// Consumer session timeout: how soon a crashed instance's partitions move.
    pub session_timeout: Duration,
    /// Whether `instance_id` stays the same across restarts. It is then the consumer's
    /// `group.instance.id` (static membership): a restarted instance takes its partitions back
    /// at once, without a rebalance, instead of after the session timeout; an instance that
    /// stops for good gives them up after the session timeout.
    pub static_membership: bool,
    /// Where to serve `/metrics`, `/health` and `/ready`, if anywhere.
    pub http_addr: Option<SocketAddr>,
    /// Wire encoding of task events and work items.
    pub encoding: Encoding,
    /// Schema registry URL (Avro).
    pub registry_url: String,
    /// The LLM endpoint, needed when a rule says `llm`.
    pub llm: Option<LlmConfig>,
    /// When partition snapshots are written.
    pub snapshots: SnapshotConfig,
}

/// The default of [`RouterConfig::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 500;

/// The default of [`RouterConfig::commit_interval`].
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(100);

impl RouterConfig {
    /// The transactional id of this instance's producer (exactly-once): the group and the
    /// instance id.
    pub fn transactional_id(&self) -> String {
        format!("{}.{}", self.group_id, self.instance_id)
    }

    /// Defaults for `kafka`: a random instance id, the prefix's router group,
    /// [`DEFAULT_MAX_BATCH`], effectively-once, [`DEFAULT_COMMIT_INTERVAL`],
    /// [`crate::kafka::DEFAULT_SESSION_TIMEOUT`].
    pub fn new(kafka: KafkaConfig) -> Self {
        let group_id = kafka.topics().router_group();
        Self {
            kafka,
            instance_id: format!("router-{}", uuid::Uuid::new_v4().simple()),
            group_id,
            max_batch: DEFAULT_MAX_BATCH,
            commit_interval: DEFAULT_COMMIT_INTERVAL,
            consistency: ConsistencyMode::default(),
            session_timeout: crate::kafka::DEFAULT_SESSION_TIMEOUT,
            static_membership: false,
            http_addr: None,
            encoding: Encoding::Json,
            registry_url: "http://127.0.0.1:8081".into(),
            llm: None,
            snapshots: SnapshotConfig::default(),
        }
    }
}

/// A hole in a tasks partition: records past `expected` arrived before `expected` itself.
///
/// Kafka never shows a record before the ones below it, but a broker that assigns offsets to
/// concurrent producers before it stores them (nisshi's memory engine) can; the router then seeks
/// back and fetches again. Holes that persist are real (compaction, transaction markers) and are
/// accepted after [`GAP_RETRIES`] fetches. Only in effectively-once mode: brokers with
/// transactions have no such race, and their commit markers leave holes in every partition.
#[derive(Debug, Clone, Copy)]
struct Gap {
    expected: i64,
    retries: u32,
}

/// How many times the router fetches a hole again before it accepts it.
const GAP_RETRIES: u32 = 20;

/// Least time between two commits of the input positions (effectively-once). Each commit is a
/// request the broker answers (nisshi spends about 180 µs of CPU on one): a commit after every
/// batch that lands would cost one per 500 events at full speed and one per few dozen at low
/// rates. A take-over re-sends the work items decided after the committed positions
/// ([`resend`]), so waiting longer would re-send more after a crash.
const COMMIT_POSITIONS_EVERY: Duration = Duration::from_millis(20);

/// librdkafka's default `message.max.bytes`: the largest record a producer writes.
const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Decisions ready to be written, in this order: dead letters, state events, work items.
struct Decided {
    dead: Vec<Outgoing>,
    states: state_record::Records,
    /// Work items, encoded for their cards' topics.
    works: Vec<Outgoing>,
    /// What each work item is for (as many as `works`).
    sent: Vec<Sent>,
    /// Exactly-once: how to take the decisions back if their transaction aborts.
    undo: Vec<(i32, Undo)>,
    /// Tasks that started waiting for the LLM: asked once the decisions are written.
    asks: Vec<(i32, String)>,
}

impl Decided {
    /// Nothing yet; state records of at most `max_record` bytes (but for a larger decision).
    fn new(max_record: usize) -> Self {
        Self {
            dead: Vec::new(),
            states: state_record::Records::new(max_record),
            works: Vec::new(),
            sent: Vec::new(),
            undo: Vec::new(),
            asks: Vec::new(),
        }
    }

    /// Room for the decisions of `batch`: a work item each, and each partition's state record
    /// as large as its inputs and their decisions (a record that grows is copied each time), up
    /// to `max_record`.
    fn for_batch(batch: &[OwnedMessage], max_record: usize) -> Self {
        let mut out = Self {
            works: Vec::with_capacity(batch.len()),
            sent: Vec::with_capacity(batch.len()),
            ..Self::new(max_record)
        };
        let mut room: Vec<(i32, usize)> = Vec::new();
        for message in batch {
            let bytes = message.payload().map_or(0, <[u8]>::len) + state_record::ROOM_PER_DECISION;
            match room.iter_mut().find(|(p, _)| *p == message.partition()) {
                Some((_, total)) => *total += bytes,
                None => room.push((message.partition(), bytes)),
            }
        }
        for (p, bytes) in room {
            out.states.reserve(p, bytes);
        }
        out
    }
}

/// What the router keeps of a work item it writes: enough to end its task when the broker
/// refuses the record (whose key is the task's id; the task's state names the step's card).
pub struct Sent {
    /// The step.
    pub step_id: u32,
    /// The attempt.
    pub attempt: u32,
    /// The task's partition.
    pub partition: i32,
}

impl Sent {
    /// `(task, step, attempt)`: what identifies the work item `record`.
    fn key(&self, record: &Outgoing) -> (String, u32, u32) {
        (task_of(record), self.step_id, self.attempt)
    }
}

/// The task a work item is for: its key.
fn task_of(work: &Outgoing) -> String {
    String::from_utf8_lossy(&work.key).into_owned()
}

/// A decided input batch.
struct Batch {
    out: Decided,
    decided: u64,
    refetch: Vec<i32>,
}

/// Where the input of a decision came from, for its dead letter.
enum Origin<'a> {
    /// Read in this batch: the dead letter keeps the original bytes, and the state record copies
    /// them when they are the event's JSON text (see [`state_record::Records::push`]).
    Read {
        /// The record read.
        message: &'a OwnedMessage,
        /// Whether its value is the event's JSON text.
        is_json_text: bool,
    },
    /// Read earlier (an LLM answer, a queued event): the event is encoded again.
    Recorded(Option<InputRef>),
    /// A record the broker refused (a work item): the dead letter keeps its bytes.
    Refused(dlq::Source),
    /// A timer that ended a task: the dead letter holds the task's submission as the router
    /// knows it (id, tenant, labels, input, deadline), encoded again.
    Task(TaskEvent),
}

/// A running router.
pub struct Router {
    config: RouterConfig,
    engine: Arc<Engine>,
    metrics: RouterMetrics,
    /// The counters of events by kind and of decisions, resolved once.
    events_counted: CounterCache,
    decisions_counted: CounterCache,
    topics: Topics,
    writer: Writer,
    codec: Codec,
    card_topics: HashMap<String, String>,
    partitions: HashMap<i32, PartitionState>,
    /// The owned partitions' tasks by their next timer.
    timers: HashMap<i32, TimerIndex>,
    gaps: HashMap<i32, Gap>,
    ready: Arc<AtomicBool>,
    llm: Option<Arc<LlmClient>>,
    answers: mpsc::UnboundedSender<Answer>,
    answers_rx: Option<mpsc::UnboundedReceiver<Answer>>,
    /// LLM questions in flight, and answers held for partitions not owned now.
    questions: Questions,
    /// Largest record the producer writes (`message.max.bytes`): dead letters are cut to fit.
    max_record: usize,
    /// Exactly-once: records the broker refused in aborted transactions, to decide again.
    refused: Refusals,
    /// Where snapshots are read and written, when they are on.
    store: Option<snapshot::store::Store>,
    /// When each owned partition's next snapshot is due.
    schedule: Schedule,
    /// The owned tasks partitions' queues, read in turn.
    inbox: Inbox,
    /// Effectively-once batches whose writes are in flight.
    pipeline: Pipeline,
    /// A batch landed since the input positions were last committed.
    uncommitted: bool,
    /// When the input positions were last committed.
    committed_at: Option<Instant>,
    /// The input positions last committed: the same positions are not committed twice (each
    /// pipelined batch would otherwise commit those of the latest landed batch once more).
    committed: Option<TopicPartitionList>,
    /// Snapshots that ended, from their background tasks.
    snapshots_done: mpsc::UnboundedSender<(Due, Ended, Duration)>,
    snapshots_done_rx: Option<mpsc::UnboundedReceiver<(Due, Ended, Duration)>>,
}

/// Records the broker refused in an aborted transaction (exactly-once).
#[derive(Default)]
struct Refusals {
    /// Work items by (task, step, attempt), with the record and the broker's error.
    works: HashMap<(String, u32, u32), (Outgoing, KafkaError)>,
    /// Dead letters by the source position they name.
    dead: HashSet<(String, i32, i64)>,
}

impl Refusals {
    fn is_empty(&self) -> bool {
        self.works.is_empty() && self.dead.is_empty()
    }
}

impl Router {
    /// Prepares a router: checks that the topics exist and are co-partitioned, and in
    /// exactly-once mode that the broker does transactions.
    pub async fn new(config: RouterConfig, engine: Engine, metrics: RouterMetrics) -> Result<Self> {
        let missing = engine.secrets.missing();
        if !missing.is_empty() {
            let vars: Vec<String> = missing
                .iter()
                .filter_map(|c| engine.cards.get(c))
                .map(|c| {
                    format!(
                        "`{}` (card `{}`)",
                        c.secret_env.as_deref().unwrap_or_default(),
                        c.name
                    )
                })
                .collect();
            return Err(Error::Setup(format!(
                "the signing secret of {} is not set; the router checks every signed card's answers, so set the variable (the secret never goes in a card)",
                vars.join(", ")
            )));
        }
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
        let store = match config.snapshots.enabled() {
            true => {
                let snapshots = topics.snapshots();
                let snapshot_partitions = config.kafka.partition_count(&snapshots)?;
                if snapshot_partitions != state_partitions {
                    return Err(Error::NotCoPartitioned {
                        tasks: snapshots,
                        task_partitions: snapshot_partitions,
                        state,
                        state_partitions,
                    });
                }
                Some(snapshot::store::Store::new(&config.kafka)?)
            }
            false => None,
        };
        let prefix = &config.kafka.topic_prefix;
        let card_topics = engine
            .cards
            .iter()
            .map(|c| (c.name.clone(), c.topic(prefix)))
            .collect();
        let llm = match (&config.llm, engine.rules.uses_llm()) {
            (Some(llm), _) => Some(Arc::new(
                LlmClient::new(llm.clone(), metrics.llm.clone())
                    .map_err(|e| Error::Setup(format!("LLM decider: {e}")))?,
            )),
            (None, true) => {
                return Err(Error::Setup(
                    "LLM decider: the rule table has `llm` rules but no LLM endpoint is configured (`llm:` in the config file, or --llm-url)".into(),
                ))
            }
            (None, false) => None,
        };
        let (answers, answers_rx) = mpsc::unbounded_channel();
        let (snapshots_done, snapshots_done_rx) = mpsc::unbounded_channel();
        let writer = Writer::new(
            &config.kafka,
            config.consistency,
            &config.transactional_id(),
        )
        .await?;
        // Connect now, so that the first ownership record does not pay for it.
        writer
            .producer()
            .client()
            .fetch_metadata(Some(&state), Duration::from_secs(10))?;
        Ok(Self {
            codec: Codec::new(config.encoding, &config.registry_url),
            topics,
            writer,
            card_topics,
            engine: Arc::new(engine),
            events_counted: CounterCache::new(metrics.events.clone()),
            decisions_counted: CounterCache::new(metrics.decisions.clone()),
            metrics,
            partitions: HashMap::new(),
            timers: HashMap::new(),
            gaps: HashMap::new(),
            ready: Arc::new(AtomicBool::new(false)),
            llm,
            answers,
            answers_rx: Some(answers_rx),
            questions: Questions::default(),
            refused: Refusals::default(),
            store,
            schedule: Schedule::new(config.snapshots.clone()),
            inbox: Inbox::default(),
            pipeline: Pipeline::default(),
            uncommitted: false,
            committed_at: None,
            committed: None,
            snapshots_done,
            snapshots_done_rx: Some(snapshots_done_rx),
            max_record: config
                .kafka
                .options
                .get("message.max.bytes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(LIBRDKAFKA_MESSAGE_MAX_BYTES),
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
        kafka::service_consumer_defaults(&mut config);
        set_default(&mut config, "isolation.level", "read_committed");
        set_default(&mut config, "statistics.interval.ms", "5000");
        // Incremental rebalancing: a partition that stays with this instance is neither revoked
        // nor restored again.
        set_default(
            &mut config,
            "partition.assignment.strategy",
            "cooperative-sticky",
        );
        if self.config.static_membership {
            config.set("group.instance.id", &self.config.instance_id);
        }
        let consumer: Arc<TasksConsumer> =
            Arc::new(config.create_with_context(RebalanceContext {
                events: tx,
                lag: self.metrics.consumer_lag.clone(),
            })?);
        consumer.subscribe(&[&self.topics.tasks()])?;
        tracing::info!(
            instance = %self.config.instance_id, group = %self.config.group_id,
            consistency = %self.config.consistency, "router started"
        );
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        let mut answers = self.answers_rx.take().expect("run is called once");
        let mut snapshots = self.snapshots_done_rx.take().expect("run is called once");
        loop {
            let mut stepped = self.rebalances_waiting(&mut rebalances, &consumer).await;
            if stepped.is_ok() {
                if self.uncommitted {
                    self.commit_positions(&consumer);
                }
                stepped = tokio::select! {
                    _ = shutdown.changed() => break,
                    Some(event) = rebalances.recv() => self.rebalance(event, &consumer).await,
                    _ = ticker.tick() => self.tick().await,
                    // The positions may be committed again: the loop's start does.
                    _ = self.commit_due(), if self.uncommitted => Ok(()),
                    Some((due, ended, took)) = snapshots.recv() => {
                        self.snapshotted(&due, ended, took);
                        Ok(())
                    }
                    Some(landed) = self.pipeline.next(), if !self.pipeline.is_empty() => {
                        match landed {
                            Ok(landed) => self.landed(landed).await,
                            Err(e) => Err(e),
                        }
                    }
                    Some(first) = answers.recv() => {
                        let mut batch = vec![first];
                        while batch.len() < self.config.max_batch {
                            match answers.try_recv() {
                                Ok(answer) => batch.push(answer),
                                Err(_) => break,
                            }
                        }
                        self.resolve(batch).await
                    }
                    first = self.inbox.next(), if !self.inbox.is_empty() => match first {
                        Ok(m) => self.route(m, &mut rebalances, &consumer).await,
                        Err(e) => {
                            tracing::warn!(error = %e, "consumer error");
                            Ok(())
                        }
                    },
                    // Errors, and records of a partition whose queue could not be split.
                    first = consumer.recv() => match first {
                        Ok(m) => self.route(m.detach(), &mut rebalances, &consumer).await,
                        Err(e) => {
                            tracing::warn!(error = %e, "consumer error");
                            Ok(())
                        }
                    },
                };
            }
            if let Err(error) = stepped {
                self.start_over(error, &consumer).await?;
            }
        }
        self.drain().await?;
        self.commit_positions_now(&consumer);
        kafka::close("router", (self, consumer)).await;
        tracing::info!("router stopped");
        Ok(())
    }

    /// Routes a batch that starts with `first`: gathers it, takes in the rebalances that came
    /// meanwhile, decides it and writes it.
    async fn route(
        &mut self,
        first: OwnedMessage,
        rebalances: &mut mpsc::UnboundedReceiver<RebalanceEvent>,
        consumer: &Arc<TasksConsumer>,
    ) -> Result<()> {
        let batch = self.gather(first).await;
        self.rebalances_waiting(rebalances, consumer).await?;
        let batch = self.decide(batch).await?;
        self.commit(batch, consumer).await
    }

    /// Takes in the rebalances that came since the last look, in order.
    async fn rebalances_waiting(
        &mut self,
        rebalances: &mut mpsc::UnboundedReceiver<RebalanceEvent>,
        consumer: &Arc<TasksConsumer>,
    ) -> Result<()> {
        while let Ok(event) = rebalances.try_recv() {
            self.rebalance(event, consumer).await?;
        }
        Ok(())
    }

    /// Gathers a batch, one record of each owned partition in turn: what is already fetched
    /// (effectively-once), or what arrives within the commit interval (exactly-once, where each
    /// batch costs a transaction).
    async fn gather(&self, first: OwnedMessage) -> Vec<OwnedMessage> {
        let max = self.config.max_batch;
        // Room for a default batch up front (growing from one record took ~1 % of the route
        // task); a larger `--max-batch` grows it past that.
        let mut batch = Vec::with_capacity(max.min(DEFAULT_MAX_BATCH));
        batch.push(first);
        let window = self
            .config
            .consistency
            .gather_window(self.config.commit_interval);
        let deadline = tokio::time::Instant::now() + window.unwrap_or_default();
        loop {
            self.inbox.take_ready(&mut batch, max);
            if window.is_none() || batch.len() >= max || self.inbox.is_empty() {
                return batch;
            }
            match tokio::time::timeout_at(deadline, self.inbox.next()).await {
                Ok(Ok(m)) => batch.push(m),
                Ok(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                Err(_) => return batch,
            }
        }
    }

    /// The next offset of every owned partition.
    fn positions(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, state) in &self.partitions {
            if let Some(next) = state.next_offset {
                let _ = tpl.add_partition_offset(&self.topics.tasks(), *p, Offset::Offset(next));
            }
        }
        tpl
    }

    /// Commits the consumer group's offsets where no transaction does, unless they were
    /// committed less than [`COMMIT_POSITIONS_EVERY`] ago: then [`Self::commit_due`] says when.
    fn commit_positions(&mut self, consumer: &TasksConsumer) {
        let recent = |at: &Instant| at.elapsed() < COMMIT_POSITIONS_EVERY;
        if self.committed_at.as_ref().is_some_and(recent) {
            self.uncommitted = true;
            return;
        }
        self.commit_positions_now(consumer);
    }

    /// When the input positions may be committed again.
    fn commit_due(&self) -> tokio::time::Sleep {
        let at = self
            .committed_at
            .map_or_else(Instant::now, |at| at + COMMIT_POSITIONS_EVERY);
        tokio::time::sleep_until(at.into())
    }

    /// Commits the consumer group's offsets where no transaction does (informational for
    /// readers: the state topic is authoritative; a take-over re-sends what was decided after
    /// them).
    fn commit_positions_now(&mut self, consumer: &TasksConsumer) {
        self.uncommitted = false;
        if self.config.consistency.offsets_in_transaction() {
            return;
        }
        let Some(tpl) = self.pipeline.committable(self.positions()) else {
            return;
        };
        if tpl.count() > 0 && self.committed.as_ref() != Some(&tpl) {
            match consumer.commit(&tpl, CommitMode::Async) {
                Ok(()) => {
                    self.committed = Some(tpl);
                    self.committed_at = Some(Instant::now());
                }
                Err(e) => tracing::debug!(error = %e, "offset commit failed"),
            }
        }
    }

    /// Writes a decided batch; an aborted transaction takes the batch back and rewinds. In
    /// effectively-once mode a batch without dead letters is put in flight ([`Pipeline`]) and the
    /// router reads on; the others wait for what is in flight, then are written at once.
    async fn commit(&mut self, batch: Batch, consumer: &TasksConsumer) -> Result<()> {
        if batch.decided > 0 && self.pipelines(&batch.out) {
            self.seek(consumer, &batch.refetch)?;
            let Decided {
                states,
                works,
                sent,
                asks,
                ..
            } = batch.out;
            let flight = Flight {
                positions: self.positions(),
                decided: batch.decided,
                asks,
                started: Instant::now(),
            };
            let producer = self.writer.producer().clone();
            let states = self.state_records(states);
            self.pipeline
                .launch(&producer, states, works, sent, flight)
                .await?;
            while self.pipeline.is_full() {
                if let Some(landed) = self.pipeline.next().await {
                    self.landed(landed?).await?;
                }
            }
            self.commit_positions(consumer);
            return Ok(());
        }
        self.drain().await?;
        let started = Instant::now();
        if batch.decided > 0 {
            let offsets = match self.config.consistency.offsets_in_transaction() {
                true => consumer.group_metadata().map(|g| (self.positions(), g)),
                false => None,
            };
            if let Some(touched) = self.write(batch.out, offsets).await? {
                return self.seek(consumer, &touched);
            }
            self.observe_batch(started, batch.decided);
        }
        self.seek(consumer, &batch.refetch)?;
        self.commit_positions(consumer);
        self.take_snapshot();
        Ok(())
    }

    /// Whether a decided batch may be put in flight: the mode allows it, and no dead letters
    /// (they are written, and acknowledged, before the state records that name them).
    fn pipelines(&self, out: &Decided) -> bool {
        self.config.consistency.pipelines() && out.dead.is_empty()
    }

    /// A pipelined batch landed: its state offsets count towards snapshots, the LLM is asked
    /// for the tasks that started waiting, and a work item the broker refused ends its task.
    async fn landed(&mut self, landed: Landed) -> Result<()> {
        let Landed {
            flight,
            states,
            refused,
        } = landed;
        for (p, offset, events) in states {
            self.schedule.written(p, offset, events);
        }
        self.uncommitted = true;
        self.observe_batch(flight.started, flight.decided);
        for (p, id) in flight.asks {
            self.ask(p, id);
        }
        let mut follow = self.decided();
        for (item, record, error) in &refused {
            self.refuse_work(item, record, error, &mut follow).await?;
        }
        if !(follow.dead.is_empty() && follow.states.is_empty()) {
            self.write(follow, None).await?;
        }
        Ok(())
    }

    /// Counts a batch of `decided` events written in the time since `started`.
    fn observe_batch(&self, started: Instant, decided: u64) {
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.commit_latency.observe(elapsed);
        for _ in 0..decided {
            self.metrics.routing_latency.observe(elapsed);
        }
    }

    /// Waits until every batch in flight has landed.
    async fn drain(&mut self) -> Result<()> {
        while let Some(landed) = self.pipeline.next().await {
            self.landed(landed?).await?;
        }
        Ok(())
    }

    /// Writes decisions (with the consumed `offsets` in exactly-once mode) and asks the LLM for
    /// the tasks that started waiting. When the transaction aborts, the decisions are taken back
    /// in memory and the partitions they touched are returned.
    async fn write(
        &mut self,
        out: Decided,
        offsets: Option<(TopicPartitionList, ConsumerGroupMetadata)>,
    ) -> Result<Option<Vec<i32>>> {
        let mut out = out;
        if !self.refused.is_empty() {
            self.apply_refusals(&mut out).await?;
        }
        let Decided {
            dead,
            states,
            works,
            mut sent,
            undo,
            asks,
        } = out;
        let states = self.state_records(states);
        let (n_dead, n_states) = (dead.len(), states.records.len());
        let state_parts: Vec<(i32, usize)> = (states.records.iter())
            .filter_map(|r| r.partition)
            .zip(states.events.iter().copied())
            .collect();
        let written = match self.writer.mode() {
            ConsistencyMode::EffectivelyOnce => {
                self.deliver(dead, states, works, std::mem::take(&mut sent))
                    .await?;
                Written::Committed(Vec::new())
            }
            ConsistencyMode::ExactlyOnce => {
                self.writer
                    .write(vec![dead, states.records, works], offsets)
                    .await?
            }
        };
        match written {
            Written::Committed(offsets) => {
                let states = offsets.iter().skip(n_dead).take(n_states);
                for ((p, events), offset) in state_parts.into_iter().zip(states) {
                    self.schedule.written(p, *offset, events);
                }
                for (p, id) in asks {
                    self.ask(p, id);
                }
                Ok(None)
            }
            Written::Aborted(cause) => Ok(Some(self.take_back(undo, &cause))),
            Written::Refused(refused) => {
                let cause = refused[0].2.clone();
                for (i, record, error) in refused {
                    if i < n_dead {
                        self.refused.dead.extend(dlq::source_of(&record));
                    } else if i < n_dead + n_states {
                        return Err(state_refused(&record, error));
                    } else if let Some(item) = sent.get(i - n_dead - n_states) {
                        self.refused
                            .works
                            .insert(item.key(&record), (record, error));
                    }
                }
                Ok(Some(self.take_back(undo, &cause)))
            }
        }
    }

    /// Takes the decisions of an aborted transaction back; returns the partitions they touched.
    fn take_back(&mut self, undo: Vec<(i32, Undo)>, cause: &KafkaError) -> Vec<i32> {
        tracing::warn!(error = %cause, "transaction aborted; taking its decisions back");
        self.metrics.aborted.inc();
        let mut touched = Vec::new();
        for (p, undo) in undo.into_iter().rev() {
            if let Some(state) = self.partitions.get_mut(&p) {
                let task_id = state.undo(undo);
                if let Some(index) = self.timers.get_mut(&p) {
                    let task = state.tasks.get_key_value(&task_id);
                    index.refresh(&self.engine, &task_id, task.map(|(id, t)| (id, t.as_ref())));
                }
            }
            if !touched.contains(&p) {
                touched.push(p);
            }
        }
        touched
    }

    /// Exactly-once: decides again what the broker refused in an aborted transaction, the same
    /// way effectively-once does at once: a refused work item ends its task (a decision that
    /// carries the refusal), a refused dead letter is written without its value.
    async fn apply_refusals(&mut self, out: &mut Decided) -> Result<()> {
        let works = std::mem::take(&mut out.works);
        for (work, item) in works.into_iter().zip(std::mem::take(&mut out.sent)) {
            match self.refused.works.remove(&item.key(&work)) {
                Some((record, error)) => self.refuse_work(&item, &record, &error, out).await?,
                None => {
                    out.works.push(work);
                    out.sent.push(item);
                }
            }
        }
        for record in &mut out.dead {
            if dlq::source_of(record).is_some_and(|at| self.refused.dead.remove(&at)) {
                *record = dlq::stub(record);
            }
        }
        Ok(())
    }

    /// Effectively-once: writes dead letters, then state events, then work items, each phase
    /// acknowledged before the next. A record the broker refuses for good (see
    /// [`commit::refuses_record`]) stops nothing: a refused dead letter is written again without
    /// its value; a refused work item's task is dead-lettered by a decision recorded after it
    /// (carrying the refusal), whose own writes follow the same way. A refused state event stops
    /// the router ([`Error::StateRefused`]): no input can make one too large.
    async fn deliver(
        &mut self,
        mut dead: Vec<Outgoing>,
        mut states: Batched,
        mut works: Vec<Outgoing>,
        mut items: Vec<Sent>,
    ) -> Result<()> {
        loop {
            self.deliver_dead_letters(dead).await?;
            let sent = self.writer.send_each(&states.records).await?;
            for ((record, sent), events) in states.records.iter().zip(sent).zip(&states.events) {
                match sent {
                    Ok(offset) => {
                        let p = record.partition.unwrap_or(-1);
                        self.schedule.written(p, offset, *events)
                    }
                    Err(source) => return Err(state_refused(record, source)),
                }
            }
            let sent = self.writer.send_each(&works).await?;
            let mut follow = self.decided();
            for ((record, item), sent) in works.iter().zip(&items).zip(sent) {
                if let Err(error) = sent {
                    self.refuse_work(item, record, &error, &mut follow).await?;
                }
            }
            if follow.dead.is_empty() && follow.states.is_empty() {
                return Ok(());
            }
            states = self.state_records(follow.states);
            (dead, works, items) = (follow.dead, Vec::new(), Vec::new());
        }
    }

    /// Nothing decided yet, with state records as large as the rule table allows.
    fn decided(&self) -> Decided {
        Decided::new(self.engine.rules.max_event_bytes)
    }

    /// A batch's state records as the state topic holds them: a partition's decisions together,
    /// each record at most `max_event_bytes` (which the topic accepts).
    fn state_records(&self, states: state_record::Records) -> Batched {
        states.finish(&self.topics.state())
    }

    /// Writes dead letters; one the broker refuses is written again without its value (its
    /// headers keep the reason, the source position, the original size and hash).
    async fn deliver_dead_letters(&self, dead: Vec<Outgoing>) -> Result<()> {
        let sent = self.writer.send_each(&dead).await?;
        let mut stubs = Vec::new();
        for (record, sent) in dead.iter().zip(sent) {
            if let Err(error) = sent {
                tracing::warn!(bytes = record.size(), %error, "the broker refused a dead letter; writing it again without its value");
                self.metrics
                    .rejected_records
                    .with_label_values(&["dead_letter"])
                    .inc();
                stubs.push(dlq::stub(record));
            }
        }
        for (stub, sent) in stubs.iter().zip(self.writer.send_each(&stubs).await?) {
            if let Err(error) = sent {
                tracing::error!(key_bytes = stub.key.len(), %error, "the broker refused a dead letter even without its value; its record stays at its source position");
            }
        }
        Ok(())
    }

    /// Dead-letters the task whose work item `record` the broker refused (unless its step no
    /// longer waits for that attempt), with a decision that carries the refusal.
    async fn refuse_work(
        &mut self,
        item: &Sent,
        record: &Outgoing,
        error: &KafkaError,
        out: &mut Decided,
    ) -> Result<()> {
        self.metrics
            .rejected_records
            .with_label_values(&["work_item"])
            .inc();
        let task_id = task_of(record);
        tracing::warn!(task = %task_id, topic = %record.topic, step = item.step_id, bytes = record.size(), %error, "the broker refused a work item");
        let p = item.partition;
        let card = (self.partitions.get(&p))
            .and_then(|s| s.tasks.get(&task_id))
            .filter(|t| t.waits_for(item.step_id, item.attempt))
            .and_then(|t| t.steps.get(&item.step_id))
            .map(|step| step.card.clone());
        let Some(card) = card else {
            return Ok(());
        };
        let reason = if commit::too_large(error) {
            "too_large"
        } else {
            "work_item_rejected"
        };
        let message = format!(
            "the broker refused the work item for `{}` (step {}, {} bytes) on `{}`: {error}",
            card,
            item.step_id,
            record.size(),
            record.topic
        );
        let outcome = Outcome::dead_letter(reason, message, true);
        let rejection = Rejection {
            topic: record.topic.clone(),
            step_id: Some(item.step_id),
            bytes: record.size() as u64,
            error: error.to_string(),
        };
        let followed = self.follow_up(p, &task_id, "refused_write");
        let Some(mut partition) = self.partition(p, now_ms()) else {
            return Ok(());
        };
        partition.trace = followed;
        let step = partition.refuse(&task_id, rejection, outcome);
        let source = dlq::Source {
            topic: record.topic.clone(),
            partition: -1,
            offset: -1,
            key: record.key.clone(),
            value: record.payload.clone(),
            redrives: None,
        };
        self.emit(p, step, Origin::Refused(source), out).await
    }

    /// Seeks `partitions` to the first offset not yet decided.
    fn seek(&self, consumer: &TasksConsumer, partitions: &[i32]) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            let next = self.partitions.get(p).and_then(|s| s.next_offset);
            tpl.add_partition_offset(
                &self.topics.tasks(),
                *p,
                next.map_or(Offset::Beginning, Offset::Offset),
            )?;
        }
        if tpl.count() > 0 {
            consumer.seek_partitions(tpl.clone(), Duration::from_secs(10))?;
            consumer.resume(&tpl)?;
        }
        Ok(())
    }

    async fn rebalance(
        &mut self,
        event: RebalanceEvent,
        consumer: &Arc<TasksConsumer>,
    ) -> Result<()> {
        self.drain().await?;
        match event {
            RebalanceEvent::Revoked(parts) => {
                self.forget(&parts);
                tracing::info!(owned = ?self.owned(), "partitions revoked");
            }
            RebalanceEvent::Assigned(parts) => self.take_over(parts, consumer).await?,
        }
        self.metrics.partitions.set(self.partitions.len() as i64);
        self.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Drops what this instance holds of partitions `parts`: their state, timers, snapshot
    /// schedule and queued records. LLM questions in flight go on: their answers are used if
    /// the partitions come back (see [`super::asking`]).
    fn forget(&mut self, parts: &[i32]) {
        self.inbox.remove(parts);
        for p in parts {
            self.partitions.remove(p);
            self.timers.remove(p);
            self.schedule.revoked(*p);
            self.gaps.remove(p);
        }
    }

    /// Goes on after `error` when the producer failed fatally and the consistency mode allows
    /// it ([`ConsistencyMode::starts_over_after_fatal`]), as a restarted instance would: what
    /// is in flight and every owned partition's state are dropped, a new producer is made, and
    /// every owned partition is taken over again (new ownership records, restore, re-sending
    /// what may be missing). Any other error is returned.
    async fn start_over(&mut self, error: Error, consumer: &Arc<TasksConsumer>) -> Result<()> {
        let fatal = self.writer.producer().client().fatal_error();
        let Some((code, reason)) =
            fatal.filter(|_| self.config.consistency.starts_over_after_fatal())
        else {
            return Err(error);
        };
        tracing::error!(%error, ?code, reason, "the producer failed fatally; starting over with a new producer and taking every owned partition over again");
        self.metrics.producer_restarts.inc();
        self.pipeline = Pipeline::default();
        self.uncommitted = false;
        let owned = self.owned();
        self.forget(&owned);
        self.writer = Writer::new(
            &self.config.kafka,
            self.config.consistency,
            &self.config.transactional_id(),
        )
        .await?;
        if !owned.is_empty() {
            self.take_over(owned, consumer).await?;
        }
        self.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The producer the router writes with now (a fatal error replaces it in effectively-once
    /// mode, see [`ConsistencyMode::starts_over_after_fatal`]).
    pub fn producer(&self) -> &rdkafka::producer::FutureProducer {
        self.writer.producer()
    }

    fn owned(&self) -> Vec<i32> {
        let mut owned: Vec<i32> = self.partitions.keys().copied().collect();
        owned.sort_unstable();
        owned
    }

    /// Takes over partitions: ownership records, restore up to them, re-send pending work,
    /// then read the tasks partitions from the restored positions.
    async fn take_over(&mut self, parts: Vec<i32>, consumer: &Arc<TasksConsumer>) -> Result<()> {
        self.ready.store(false, Ordering::Relaxed);
        let started = Instant::now();
        let instance = &self.config.instance_id;
        let owned = StateEvent::owned(instance, now_ms());
        let records = parts
            .iter()
            .map(|p| Outgoing::json(self.topics.state(), Some(*p), "", &owned))
            .collect();
        let epochs = match self.writer.write(vec![records], None).await? {
            Written::Committed(epochs) => epochs,
            Written::Aborted(e) => return Err(e.into()),
            Written::Refused(refused) => {
                let (_, record, source) = refused.into_iter().next().expect("one at least");
                return Err(state_refused(&record, source));
            }
        };
        let restored = futures::future::try_join_all(
            parts.iter().zip(&epochs).map(|(p, e)| self.restore(*p, *e)),
        )
        .await?;
        let committed = self.committed(consumer, &parts);
        let mut reemit = self.decided();
        let now = Instant::now();
        for ((p, (state, previous)), epoch) in parts.iter().zip(restored).zip(&epochs) {
            self.schedule.owned(*p, *epoch, now, previous);
            let position = committed.get(p).copied();
            for (task, step) in resend::missing(&state, position, self.config.consistency) {
                self.metrics
                    .reemitted
                    .with_label_values(&[&step.card])
                    .inc();
                let item = work_item_ref(task, &step, *p);
                self.add_work(item, task.trace.as_deref(), &mut reemit)
                    .await?;
            }
            self.timers
                .insert(*p, TimerIndex::build(&self.engine, &state));
            self.partitions.insert(*p, state);
            self.gaps.remove(p);
        }
        let resent = reemit.works.len();
        if self.write(reemit, None).await?.is_some() {
            return Err(Error::Restore {
                topic: self.topics.state(),
                partition: parts[0],
                message: "the transaction re-sending pending work items aborted".into(),
            });
        }
        // Decisions recorded as asked but never answered are asked again; tasks whose answer is
        // recorded but whose queued events are not yet decided are drained. Nothing recorded is
        // asked twice.
        let (mut asks, mut drains) = (Vec::new(), Vec::new());
        for p in &parts {
            let Some(state) = self.partitions.get(p) else {
                continue;
            };
            for (id, task) in &state.tasks {
                if task.awaiting.is_some() {
                    asks.push((*p, id.to_string()));
                } else if !task.queue.is_empty() {
                    drains.push((*p, id.to_string()));
                }
            }
        }
        let mut drained = self.decided();
        for (p, id) in drains {
            let followed = self.follow_up(p, &id, "queued");
            let Some(mut partition) = self.partition(p, now_ms()) else {
                continue;
            };
            partition.trace = followed;
            let steps = partition.drain(&id);
            self.emit_all(p, steps, None, &mut drained).await?;
        }
        if !drained.states.is_empty() && self.write(drained, None).await?.is_some() {
            return Err(Error::Restore {
                topic: self.topics.state(),
                partition: parts[0],
                message: "the transaction deciding queued events aborted".into(),
            });
        }
        let awaiting = asks.len();
        let reasked = asks
            .into_iter()
            .filter(|(p, id)| self.ask(*p, id.clone()))
            .count();
        if awaiting > 0 {
            tracing::info!(
                awaiting,
                reasked,
                "decisions waiting for the LLM: asked again where no question was in flight or answered"
            );
        }
        self.inbox.split(consumer, &self.topics.tasks(), &parts);
        self.seek(consumer, &parts)?;
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.restore_seconds.observe(seconds);
        self.metrics.partitions_restored.inc_by(parts.len() as u64);
        tracing::info!(owned = ?self.owned(), resent, seconds, "partitions taken over and restored");
        Ok(())
    }

    /// The group's committed positions of tasks partitions `parts` (see [`resend`]); none when
    /// they cannot be read, and then every pending work item is sent again.
    fn committed(&self, consumer: &TasksConsumer, parts: &[i32]) -> HashMap<i32, i64> {
        let mut tpl = TopicPartitionList::new();
        for p in parts {
            tpl.add_partition(&self.topics.tasks(), *p);
        }
        match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
            Ok(committed) => committed
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the committed positions; re-sending every pending work item");
                HashMap::new()
            }
        }
    }

    /// Folds state partition `p` up to the ownership record at `epoch`, from the newest usable
    /// snapshot (returned as its covers and chunk count) or from the start.
    async fn restore(&self, p: i32, epoch: i64) -> Result<(PartitionState, Option<(i64, u32)>)> {
        let topic = self.topics.state();
        let restore_err = |message: String| Error::Restore {
            topic: topic.clone(),
            partition: p,
            message,
        };
        let (mut state, from, used) = match &self.store {
            Some(store) => {
                let loaded = store.load(p, epoch).await.map_err(|e| {
                    restore_err(format!("reading `{}`: {e}", self.topics.snapshots()))
                })?;
                for skipped in &loaded.skipped {
                    tracing::warn!(
                        partition = p, snapshot_offset = skipped.offset, covers = ?skipped.covers,
                        reason = skipped.reason, "snapshot skipped: {}", skipped.detail
                    );
                    self.metrics
                        .snapshots_skipped
                        .with_label_values(&[skipped.reason])
                        .inc();
                }
                match loaded.snapshot {
                    Some(s) => {
                        let (covers, chunks) = (s.header.covers, s.header.chunks);
                        tracing::info!(
                            partition = p,
                            covers,
                            chunks,
                            snapshot_records_read = loaded.read,
                            "restoring from snapshot"
                        );
                        (s.state, Offset::Offset(covers + 1), Some((covers, chunks)))
                    }
                    None => (PartitionState::default(), Offset::Beginning, None),
                }
            }
            None => (PartitionState::default(), Offset::Beginning, None),
        };
        let mut config = self.config.kafka.client_config();
        config
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .set("isolation.level", "read_committed")
            .set("group.id", format!("{}.restore", self.config.group_id));
        let reader: StreamConsumer = config.create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, p, from)?;
        reader.assign(&tpl)?;
        let (mut read, mut fenced) = (0u64, 0u64);
        loop {
            let message = kafka::recv_within(&reader, Duration::from_secs(30))
                .await
                .ok_or_else(|| {
                    restore_err(format!(
                        "no record at or before offset {epoch} arrived within 30s"
                    ))
                })??;
            let offset = message.offset();
            let Some(bytes) = message.payload() else {
                continue;
            };
            let records = state_record::decode(bytes)
                .map_err(|e| restore_err(format!("offset {offset} is not a state record: {e}")))?;
            read += 1;
            for record in &records {
                if !state.restore(record, offset) {
                    fenced += 1;
                }
            }
            if offset >= epoch {
                break;
            }
        }
        self.metrics.restore_records.inc_by(read);
        tracing::info!(
            partition = p, epoch, read, fenced, snapshot = ?used.map(|(covers, _)| covers),
            active = state.tasks.len(), next_offset = ?state.next_offset,
            "restored partition"
        );
        Ok((state, used))
    }

    /// Asks the LLM about `task_id`'s pending decision in the background; the answer comes back
    /// through the answers channel. A task already being asked about is not asked again before
    /// that answer comes back, and one whose answer came while its partition was away is
    /// answered with it. Returns whether the model is asked.
    fn ask(&mut self, p: i32, task_id: String) -> bool {
        let Some(state) = self.partitions.get(&p) else {
            return false;
        };
        let Some(awaiting) = state.tasks.get(&task_id).and_then(|t| t.awaiting.as_ref()) else {
            return false;
        };
        if !self.questions.start(p, &task_id) {
            return false;
        }
        if let Some(answer) = self.questions.parked(p, &task_id, awaiting, state.epoch) {
            tracing::debug!(partition = p, %task_id, "using the LLM answer that came while the partition was away");
            let _ = self.answers.send(answer);
            return false;
        }
        let task = &state.tasks[&task_id];
        let asked = match (self.engine.rules.rule(&awaiting.rule_id), &self.llm) {
            (Some(rule), Some(llm)) => match &rule.then {
                Action::Llm(route) => Some((
                    crate::llm::ask_for(&self.engine.cards, route, task, llm.config()),
                    llm.clone(),
                )),
                _ => None,
            },
            _ => None,
        };
        let (question, answers) = (Question::of(awaiting, state.epoch), self.answers.clone());
        self.metrics
            .llm_pending
            .set(self.questions.pending() as i64);
        // The LLM call continues the trace of the decision that asked.
        let span = tracing::info_span!("ask_llm", task_id = %task_id);
        if let Some(parent) = task.trace.as_deref() {
            trace::continue_in(&span, trace::context_of(parent));
        }
        let asking = async move {
            let call = match asked {
                Some((ask, llm)) => llm.decide(&ask).await,
                None => LlmRecord {
                    error: Some("not_configured".into()),
                    message: Some("no `llm` rule or no LLM endpoint for this decision".into()),
                    ..LlmRecord::default()
                },
            };
            let _ = answers.send(Answer {
                partition: p,
                task_id,
                question,
                call,
            });
        };
        tokio::spawn(asking.instrument(span));
        true
    }

    /// Records the LLM's answers as decisions, decides the events queued behind them, and writes
    /// it all. An answer is applied only while its task waits on the question it answers: an
    /// answer for a partition not owned now is kept for its return (see [`super::asking`]), and
    /// a task that waits on another question by now is asked that one.
    async fn resolve(&mut self, answers: Vec<Answer>) -> Result<()> {
        self.drain().await?;
        let mut out = self.decided();
        let mut taken = Vec::new();
        for answer in answers {
            let p = answer.partition;
            self.questions.answered(&answer);
            let Some(state) = self.partitions.get(&p) else {
                self.questions.park(answer, Instant::now());
                continue;
            };
            let current = state
                .tasks
                .get(&answer.task_id)
                .and_then(|t| t.awaiting.as_ref())
                .map(|awaiting| {
                    let asked = answer.question.asked_by(awaiting, state.epoch);
                    (asked, awaiting.input.clone())
                });
            let asked_at = match current {
                None => continue,
                Some((false, _)) => {
                    self.ask(p, answer.task_id);
                    continue;
                }
                Some((true, input)) => input,
            };
            let followed = self.follow_up(p, &answer.task_id, "llm_answer");
            let Some(mut partition) = self.partition(p, now_ms()) else {
                continue;
            };
            partition.trace = followed;
            let steps = partition.resolve(&answer.task_id, &answer.call);
            if steps.is_empty() {
                continue;
            }
            self.emit_all(p, steps, asked_at, &mut out).await?;
            taken.push(answer);
        }
        self.metrics
            .llm_pending
            .set(self.questions.pending() as i64);
        if out.states.is_empty() {
            return Ok(());
        }
        if self.write(out, None).await?.is_some() {
            for answer in taken {
                self.questions.start(answer.partition, &answer.task_id);
                let _ = self.answers.send(answer);
            }
        }
        Ok(())
    }

    /// Once a second: the gauges, and the timers that fell due.
    async fn tick(&mut self) -> Result<()> {
        let active = self.partitions.values().map(|p| p.tasks.len() as i64).sum();
        self.metrics.inflight_tasks.set(active);
        for card in self.engine.cards.iter().filter(|c| c.breaker.is_some()) {
            let open = self
                .partitions
                .values()
                .filter_map(|p| p.breakers.get(&card.name))
                .filter(|b| b.phase != BreakerPhase::Closed)
                .count();
            self.metrics
                .breaker_open
                .with_label_values(&[&card.name])
                .set(open as i64);
        }
        // Waiting for what is in flight stops the reading meanwhile: only a timer or a snapshot
        // that is due needs it (each tick's wait was the router's latency tail).
        let now = now_ms();
        let timers_due = self.timers.values().any(|index| index.any_due(now));
        let snapshot_due = self.store.is_some()
            && self
                .schedule
                .any_due(Instant::now(), open_tasks(&self.partitions));
        if timers_due || snapshot_due {
            self.drain().await?;
            self.fire_due().await?;
            self.take_snapshot();
        }
        let pending: usize = self.timers.values().map(TimerIndex::pending).sum();
        self.metrics.timers_pending.set(pending as i64);
        Ok(())
    }

    /// Starts the snapshot that is due, if any, in the background on a copy of its partition's
    /// state: every decision folded so far is written by now, so the copy is the fold of the
    /// state partition up to this instance's latest record there. One at a time
    /// ([`Schedule::due`]): the next starts after it ended, at a tick or after a batch written
    /// with nothing in flight.
    fn take_snapshot(&mut self) {
        let Some(store) = self.store.as_ref().filter(|_| self.pipeline.is_empty()) else {
            return;
        };
        let open = open_tasks(&self.partitions);
        let Some(due) = self.schedule.due(Instant::now(), open) else {
            return;
        };
        let Some(state) = self.partitions.get(&due.partition) else {
            // Not owned after all: its clock goes too, or it would stay busy.
            self.schedule.revoked(due.partition);
            return;
        };
        let (store, state, done) = (store.clone(), state.clone(), self.snapshots_done.clone());
        let instance = self.config.instance_id.clone();
        let chunk_bytes = self.config.snapshots.chunk_bytes;
        tracing::info!(
            partition = due.partition,
            covers = due.covers,
            "writing snapshot"
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let ended = store
                .take(&due, state, instance, now_ms(), chunk_bytes)
                .await;
            let _ = done.send((due, ended, started.elapsed()));
        });
    }

    /// A snapshot ended, `took` after it started.
    fn snapshotted(&mut self, due: &Due, ended: Ended, took: Duration) {
        let (p, covers) = (due.partition, due.covers);
        let seconds = took.as_secs_f64();
        self.metrics.snapshot_seconds.observe(seconds);
        let outcome = match &ended {
            Ended::Written { chunks, bytes } => {
                self.metrics.snapshot_bytes.observe(*bytes as f64);
                tracing::info!(
                    partition = p,
                    covers,
                    chunks,
                    bytes,
                    seconds,
                    "snapshot written"
                );
                "written"
            }
            Ended::Fenced(at) => {
                tracing::warn!(
                    partition = p,
                    covers,
                    owner_at = at,
                    "snapshot not written: another instance took the partition over"
                );
                "fenced"
            }
            Ended::Failed(error) => {
                tracing::warn!(partition = p, covers, %error, "snapshot not written");
                "failed"
            }
        };
        self.metrics.snapshots.with_label_values(&[outcome]).inc();
        self.schedule.done(due, &ended);
    }

    /// Fires the timers of the owned partitions that are due now. Each firing is recorded (the
    /// firing is an input, not a side effect) and decided like any other event; a firing whose
    /// write is lost is fired again after a restore, since its task is still active then.
    async fn fire_due(&mut self) -> Result<()> {
        let mut out = self.decided();
        let owned: Vec<i32> = self.partitions.keys().copied().collect();
        for p in owned {
            let Some(index) = self.timers.get(&p) else {
                continue;
            };
            let ids = index.due(now_ms());
            let followed: HashMap<String, Option<String>> = ids
                .iter()
                .map(|id| (id.clone(), self.follow_up(p, id, "timer")))
                .collect();
            let Some(mut partition) = self.partition(p, now_ms()) else {
                continue;
            };
            let mut fired = Vec::new();
            let due = partition.due_among(ids.iter().map(String::as_str));
            for (task_id, firing) in due {
                partition.trace = followed.get(&task_id).cloned().flatten();
                let task = partition.state.tasks.get(&task_id).map(Arc::as_ref);
                let submission = task.map(submission);
                let card = task
                    .zip(firing.step_id)
                    .filter(|_| firing.kind == TimerKind::StepTimeout)
                    .and_then(|(t, s)| t.steps.get(&s))
                    .map(|s| s.card.clone());
                if let (Some(step), Some(submission)) =
                    (partition.fire(&task_id, firing), submission)
                {
                    fired.push((step, submission, card));
                }
            }
            for (step, submission, card) in fired {
                if let Some(firing) = &step.record.timer {
                    self.metrics
                        .timers_fired
                        .with_label_values(&[firing.kind.as_str()])
                        .inc();
                }
                if let Some(card) = card {
                    self.metrics.step_timeouts.with_label_values(&[&card]).inc();
                }
                self.emit(p, step, Origin::Task(submission), &mut out)
                    .await?;
            }
        }
        if !out.states.is_empty() {
            // An aborted transaction takes the firings back; they fall due again next tick.
            self.write(out, None).await?;
        }
        Ok(())
    }

    /// The per-event step of owned partition `p`, stamping records with `now` (ms since the Unix
    /// epoch: the time now, or a batch's start).
    fn partition(&mut self, p: i32, now: i64) -> Option<Partition<'_>> {
        Some(Partition {
            engine: &self.engine,
            state: self.partitions.get_mut(&p)?,
            instance: &self.config.instance_id,
            now,
            keep_undo: self.config.consistency.keeps_undo(),
            trace: None,
        })
    }

    /// The span of a decision about `task_id` that has no input record of its own (`cause`: a
    /// timer, an LLM answer, a queued event, a refused write), continuing the task's trace; its
    /// `traceparent`, or `None` when the task carries no trace.
    fn follow_up(&self, p: i32, task_id: &str, cause: &'static str) -> Option<String> {
        let parent = self
            .partitions
            .get(&p)?
            .tasks
            .get(task_id)?
            .trace
            .as_deref()
            .map(trace::context_of)?;
        let span = tracing::info_span!(
            trace::DECISION_SPAN,
            task_id,
            cause,
            consistency = %self.config.consistency
        );
        Some(trace::hop(&span, parent))
    }

    /// Emits decisions about events read earlier (an LLM answer, queued events): their dead
    /// letters hold the event encoded again, with the position it was read at (for an LLM
    /// answer, `asked_at`: where the event that asked was read).
    async fn emit_all(
        &mut self,
        p: i32,
        steps: Vec<Step>,
        asked_at: Option<InputRef>,
        out: &mut Decided,
    ) -> Result<()> {
        for step in steps {
            let input = match step.record.resolves_llm() {
                true => asked_at.clone(),
                false => step.record.input.clone(),
            };
            self.emit(p, step, Origin::Recorded(input), out).await?;
        }
        Ok(())
    }

    /// Adds what a folded decision writes to `out`: its state event, its work items, its dead
    /// letter, the LLM question it starts waiting for (and, in exactly-once mode, its undo).
    async fn emit(
        &mut self,
        p: i32,
        step: Step,
        origin: Origin<'_>,
        out: &mut Decided,
    ) -> Result<()> {
        let Step { record, undo } = step;
        let text = match &origin {
            Origin::Read {
                message,
                is_json_text: true,
            } => Some(*message),
            _ => None,
        };
        let Some(state) = self.partitions.get(&p) else {
            return Ok(());
        };
        if let Some(index) = self.timers.get_mut(&p) {
            let task = state.tasks.get_key_value(&record.task_id);
            index.refresh(
                &self.engine,
                &record.task_id,
                task.map(|(id, t)| (id, t.as_ref())),
            );
        }
        if let Some(undo) = undo {
            out.undo.push((p, undo));
        }
        count_decision(&self.metrics, &mut self.decisions_counted, &record);
        if let Some(task) = state.tasks.get(&record.task_id) {
            for item in self.engine.work_items(task, &record.decision, p) {
                self.add_work(item, record.trace.as_deref(), out).await?;
            }
        }
        match &record.decision {
            Decision::AwaitingLlm { .. } => out.asks.push((p, record.task_id.clone())),
            Decision::Dropped { reason } => self.metrics.dropped.with_label_values(&[reason]).inc(),
            Decision::DeadLettered {
                reason, message, ..
            } => {
                let source = match (origin, &record.event) {
                    (Origin::Read { message, .. }, _) => Some(dlq::Source::of_message(message)),
                    (Origin::Recorded(input), Some(event)) => {
                        Some(self.re_encoded(p, event, input).await?)
                    }
                    (Origin::Recorded(_), None) => None,
                    (Origin::Refused(source), _) => Some(source),
                    (Origin::Task(event), _) => Some(self.re_encoded(p, &event, None).await?),
                };
                if let Some(source) = source {
                    let topic = self.topics.dlq();
                    out.dead.push(dlq::record(
                        topic,
                        &source,
                        reason,
                        message,
                        self.max_record,
                    ));
                }
            }
            _ => {}
        }
        let text = text.and_then(Message::payload);
        out.states.push(p, record, text);
        Ok(())
    }

    /// The source of a dead letter whose original bytes were consumed earlier: the event encoded
    /// again, with where it was read.
    async fn re_encoded(
        &self,
        p: i32,
        event: &TaskEvent,
        input: Option<InputRef>,
    ) -> Result<dlq::Source> {
        let tasks = self.topics.tasks();
        let payload = self.codec.encode_task_event(&tasks, event).await?;
        Ok(dlq::Source {
            partition: input.as_ref().map_or(p, |i| i.partition),
            offset: input.as_ref().map_or(-1, |i| i.offset),
            topic: input.map_or(tasks, |i| i.topic),
            key: event.task_id.as_bytes().to_vec(),
            value: Some(payload),
            redrives: None,
        })
    }

    /// Adds `item` to `out`, encoded for its card's topic, with the trace context of the
    /// decision that sends it.
    async fn add_work(
        &self,
        item: WorkItemRef<'_>,
        trace: Option<&str>,
        out: &mut Decided,
    ) -> Result<()> {
        let topic = self.card_topics.get(item.card).cloned().unwrap_or_default();
        let payload = self.codec.encode_work_item(&topic, item).await?;
        let mut record = Outgoing::bytes(topic, None, item.task_id, payload);
        record.traceparent = trace.map(str::to_string);
        out.works.push(record);
        out.sent.push(Sent {
            step_id: item.step_id,
            attempt: item.attempt,
            partition: item.reply_partition,
        });
        Ok(())
    }

    /// Decodes a record that will be decided (Avro may ask the registry for a schema), with
    /// whether its value is the event's JSON text as its state record may copy it; a record over
    /// `max_event_bytes` is not decoded at all, nor is one the batch skips.
    async fn decode(&self, message: &OwnedMessage) -> Result<(TaskEvent, bool), DecodeError> {
        let value = message.payload().unwrap_or_default();
        match self.engine.too_large(value.len()) {
            Some(too_large) => Err(too_large),
            None => self.codec.read_task_event(value).await,
        }
    }

    /// Decides a batch against the partitions' state; returns what to write.
    async fn decide(&mut self, batch: Vec<OwnedMessage>) -> Result<Batch> {
        let tasks_topic = self.topics.tasks();
        let guard_gaps = self.config.consistency.refetches_holes();
        let mut out = Decided::for_batch(&batch, self.engine.rules.max_event_bytes);
        let mut decided = 0u64;
        let mut refetch = Vec::new();
        // The batch's decisions are stamped with its start: the clock once, not per event.
        let now = now_ms();
        for message in &batch {
            let p = message.partition();
            let Some(partition) = self.partitions.get_mut(&p) else {
                continue;
            };
            if refetch.contains(&p) || message.offset() < partition.next_offset.unwrap_or(0) {
                continue;
            }
            if let Some(expected) = partition
                .next_offset
                .filter(|e| guard_gaps && message.offset() > *e)
            {
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
            let (decoded, text) = match self.decode(message).await {
                Ok((event, text)) => (Ok(event), text),
                Err(e) => (Err(e), false),
            };
            let mut raw = Raw::new(message.payload(), kafka::header(message, SIGNATURE_HEADER));
            raw.json = text;
            let at = Position {
                topic: &tasks_topic,
                partition: p,
                offset: message.offset(),
            };
            let span = tracing::info_span!(
                trace::DECISION_SPAN,
                task_id = tracing::field::Empty,
                kind = tracing::field::Empty,
                decision = tracing::field::Empty,
                decided_by = tracing::field::Empty,
                answers_step = tracing::field::Empty,
                cards = tracing::field::Empty,
                consistency = %self.config.consistency,
            );
            let trace = trace::hop(&span, trace::extract(message.headers()));
            let Some(mut partition) = self.partition(p, now) else {
                continue;
            };
            partition.trace = Some(trace);
            let step = partition.decide(at, raw, decoded);
            record_decision(&span, &step.record);
            let kind = step
                .record
                .event
                .as_ref()
                .map_or("undecodable", |e| e.kind.as_str());
            self.events_counted.get(&[kind]).inc();
            let origin = Origin::Read {
                message,
                is_json_text: text,
            };
            self.emit(p, step, origin, &mut out).await?;
        }
        Ok(Batch {
            out,
            decided,
            refetch,
        })
    }
}

/// What a decision span says about its decision: the task, the event's kind, the decision, the
/// rule or LLM that made it, the step it answers and the cards it sends work to.
fn record_decision(span: &tracing::Span, record: &StateEvent) {
    // Spans not exported are not built: nothing to describe.
    if span.is_disabled() {
        return;
    }
    span.record("task_id", record.task_id.as_str());
    if let Some(event) = &record.event {
        span.record("kind", event.kind.as_str());
    }
    span.record("decision", record.decision.name());
    let cards: Vec<&str> = match &record.decision {
        Decision::Routed { steps, decided_by } => {
            let by = format!("{}:{}", decided_by.source(), decided_by.subject());
            span.record("decided_by", by.as_str());
            steps.iter().map(|s| s.card.as_str()).collect()
        }
        Decision::Escalated { step, rule_id } => {
            span.record("decided_by", format!("rule:{rule_id}").as_str());
            vec![step.card.as_str()]
        }
        _ => Vec::new(),
    };
    if let Some(step) = record.answers_step {
        span.record("answers_step", step);
    }
    if !cards.is_empty() {
        span.record("cards", cards.join(",").as_str());
    }
}

fn count_decision(metrics: &RouterMetrics, decisions: &mut CounterCache, record: &StateEvent) {
    if let Some(reason) = record.llm.as_ref().and_then(|c| c.error.as_deref()) {
        metrics.llm.fallbacks.with_label_values(&[reason]).inc();
    }
    let spenders = [
        ("llm_decider", record.llm.as_ref().map(|c| &c.usage)),
        ("agents", record.event_usage()),
    ];
    for (by, usage) in spenders {
        if let (Some(usage), Some(event)) = (usage, &record.event) {
            if usage.tokens() > 0 || usage.cost > 0.0 {
                let labels = [event.tenant.as_str(), by];
                metrics
                    .tokens
                    .with_label_values(&labels)
                    .inc_by(usage.tokens());
                metrics.cost.with_label_values(&labels).inc_by(usage.cost);
            }
        }
    }
    let decision = &record.decision;
    let name = decision.name();
    match decision {
        Decision::Routed { steps, decided_by } => {
            let source = decided_by.source();
            for step in steps {
                decisions.get(&[name, source, &step.card]).inc();
            }
        }
        Decision::Escalated { step, .. } => decisions.get(&[name, "rule", &step.card]).inc(),
        Decision::RetryScheduled { step } => decisions.get(&[name, "policy", &step.card]).inc(),
        Decision::DeadLettered { reason, .. } => {
            metrics.dead_letters.with_label_values(&[reason]).inc();
            decisions.get(&[name, "router", ""]).inc();
        }
        _ => decisions.get(&[name, "router", ""]).inc(),
    }
}

/// How many open tasks each partition holds: what a snapshot of it costs.
fn open_tasks(partitions: &HashMap<i32, PartitionState>) -> impl Fn(i32) -> usize + '_ {
    |p| partitions.get(&p).map_or(0, |s| s.tasks.len())
}

/// A task's submission as the router knows it, for the dead letter of a task a timer ended.
fn submission(task: &TaskState) -> TaskEvent {
    let mut event = TaskEvent::new(&task.task_id, EventKind::Submitted, "client");
    event.event_id = task.submitted_event_id.clone();
    event.tenant = task.tenant.clone();
    event.labels = task.labels.clone();
    event.payload = task.input.clone();
    event.deadline = task.deadline;
    event
}

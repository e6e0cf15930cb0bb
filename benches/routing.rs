//! Routing throughput, in one invocation: (a) a bare rdkafka consume→produce passthrough over the
//! same records, the baseline, and (b) the router deciding with the example rule table (a state
//! event and two work items per event), and in effectively-once mode with a one-rule table too (a
//! state event and one work item per event, `benches/fixtures/one-work-item.yaml`), and (c) the
//! router's records alone: the same records (one state record per partition and batch, as large as
//! its events' state records together, acknowledged, then one or two work items per event) written
//! by a bare forwarder that decides nothing, what the broker and the client charge for the records
//! themselves, the most a router writing them could reach, and the same with a state record per
//! event instead (what the router wrote before a record could hold several decisions). Rates are
//! measured from the first record handled to the last one acknowledged (every writer's first write
//! is made and acknowledged before, see [`warm`]); the router's start-up is printed apart. Each run
//! also prints this process's CPU time per event (all threads): the figure to compare when changing
//! what the router does per event (a busy machine raises it too, though less than it lowers the
//! rates), and the fresh broker's (`/proc/<pid>/stat` of the PID its script wrote): both share the
//! machine's cores, so the two together are what an event costs the machine. Each run starts from a
//! fresh broker (a long-lived nisshi slows down as topics accumulate); the runs alternate,
//! [`ROUNDS`] times each; prints events/s, the medians and their ratios (the median: the machine's
//! load moves single runs). Then (d) the latency from a task event's send to the arrival of its
//! first work item at a consumer, both on this process's clock, at half the router's median rate,
//! through the router and, as baselines, through a bare forwarder and through a forwarder of a
//! state record per event, then its work items (state first), alternated [`LATENCY_ROUNDS`] times:
//! p50, p99, max, each split at the work item's timestamp, the share of the machine's CPU busy
//! meanwhile, and the median p99s.
//! Run with `scripts/bench-routing`.
//!
//! `BENCH_MODE=effectively-once` (default) starts a fresh nisshi for each throughput run on
//! `BENCH_PORT` (default 19092) through `scripts/start-broker`, and a fresh crabka for each latency
//! run (`BENCH_LATENCY_BROKER=crabka`, the default, port `BENCH_PORT` or 19392; `nisshi` runs them
//! on nisshi, where even the bare forwarder's p99 is tens of ms), or uses
//! `SWITCHYARD_TEST_BOOTSTRAP` for every run when set.
//! `BENCH_MODE=exactly-once` starts a fresh transactional broker (crabka, `scripts/start-txn-broker`)
//! for each run on `BENCH_PORT` (default 19392), or uses `SWITCHYARD_TXN_BOOTSTRAP`, and adds to
//! the two runs the router in exactly-once mode at commit intervals of 10, 100 and 1,000 ms, with
//! their ratios to the effectively-once router on the same broker.
//!
//! `BENCH_PROFILE=<file>` profiles instead of comparing: one run of the effectively-once router
//! with the one-rule table on a fresh broker, `perf record` sampling this process (every thread)
//! from the router's first decision to its last acknowledgement into `<file>` (see
//! [`Profiler`]); no baselines, no latency runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use switchyard::envelope::{EventKind, TaskEvent};
use switchyard::kafka::KafkaConfig;
use switchyard::metrics::RouterMetrics;
use switchyard::router::service::DEFAULT_MAX_BATCH;
use switchyard::router::{ConsistencyMode, Router, RouterConfig};
use switchyard::topics::{self, TopicSpecs};
use switchyard::workflow::Workflow;

/// The binary's allocator (`src/main.rs`, set up by `main` below), so that the router is measured
/// as it ships.
#[global_allocator]
static GLOBAL: switchyard::allocator::Allocator = switchyard::allocator::Allocator {};

#[path = "support/events.rs"]
mod events;
#[path = "support/router.rs"]
mod router;

/// Throughput runs of each kind.
const ROUNDS: usize = 3;

/// Latency runs through each carrier.
const LATENCY_ROUNDS: usize = 3;

fn config(bootstrap: &str, prefix: &str) -> KafkaConfig {
    let bootstrap = bootstrap.to_string();
    KafkaConfig {
        bootstrap_servers: bootstrap,
        topic_prefix: prefix.into(),
        options: Default::default(),
    }
}

async fn prepare(kafka: &KafkaConfig, workflow: &Workflow, events: usize) -> usize {
    let specs = TopicSpecs::load(Path::new("topics/switchyard.yaml")).unwrap();
    topics::apply(kafka, &specs, &workflow.cards).await.unwrap();
    let producer = kafka.producer().unwrap();
    let topic = kafka.topics().tasks();
    let payloads = events::submissions("bench", events);
    let size = payloads.first().map_or(0, |p| p.1.len());
    for chunk in payloads.chunks(5_000) {
        let sends = chunk.iter().map(|(k, p)| {
            producer.send(
                FutureRecord::to(&topic).key(k).payload(p),
                Duration::from_secs(30),
            )
        });
        for r in join_all(sends).await {
            r.map_err(|(e, _)| e).unwrap();
        }
    }
    size
}

/// Assigns `consumer` every partition of `topic` from its start: no group join in the middle of a
/// run.
fn assign_from_start(consumer: &StreamConsumer, kafka: &KafkaConfig, topic: &str) {
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..kafka.partition_count(topic).unwrap() {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
}

/// A consumer of the whole tasks topic from its start, in group `<prefix>.<name>`, with the
/// router's consumer defaults, so that it waits for fetches as the router does.
fn tasks_reader(kafka: &KafkaConfig, name: &str) -> StreamConsumer {
    let mut client = kafka.client_config();
    client.set("group.id", format!("{}.{name}", kafka.topic_prefix));
    switchyard::kafka::service_consumer_defaults(&mut client);
    let consumer: StreamConsumer = client.create().unwrap();
    assign_from_start(&consumer, kafka, &kafka.topics().tasks());
    consumer
}

async fn passthrough(kafka: &KafkaConfig, events: usize) -> Measured {
    let producer = kafka.producer().unwrap();
    let out = kafka.topics().dlq();
    warm(&producer, [&out]).await;
    forwarded(kafka, "passthrough", events, |m| {
        let (producer, out) = (producer.clone(), out.clone());
        let key = m.key().unwrap_or_default().to_vec();
        let payload = m.payload().unwrap_or_default().to_vec();
        async move {
            let record = FutureRecord::to(&out).key(&key).payload(&payload);
            let sent = producer.send(record, Duration::from_secs(30)).await;
            sent.map_err(|(e, _)| e).unwrap();
        }
    })
    .await
}

/// Reads `events` records of the tasks topic (as group `<prefix>.<name>`) and spawns what
/// `handle` makes of each; measured from the first record read until every handling ended.
async fn forwarded<F>(
    kafka: &KafkaConfig,
    name: &str,
    events: usize,
    handle: impl Fn(&BorrowedMessage<'_>) -> F,
) -> Measured
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let consumer = tasks_reader(kafka, name);
    let mut started = None;
    let mut pending = Vec::with_capacity(events);
    for _ in 0..events {
        let m = consumer.recv().await.unwrap();
        started.get_or_insert_with(Measure::start);
        pending.push(tokio::spawn(handle(&m)));
    }
    join_all(pending).await;
    started.unwrap().end(events)
}

/// Like [`forwarded`], a batch at a time: the records already read (up to the router's default
/// batch, [`DEFAULT_MAX_BATCH`]), given to `handle` as their partitions and keys.
async fn forwarded_in_batches<F>(
    kafka: &KafkaConfig,
    name: &str,
    events: usize,
    handle: impl Fn(Vec<(i32, Vec<u8>)>) -> F,
) -> Measured
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let consumer = tasks_reader(kafka, name);
    let of = |m: BorrowedMessage<'_>| (m.partition(), m.key().unwrap_or_default().to_vec());
    let mut started = None;
    let (mut read, mut pending) = (0, Vec::new());
    while read < events {
        let mut batch = vec![of(consumer.recv().await.unwrap())];
        started.get_or_insert_with(Measure::start);
        while batch.len() < DEFAULT_MAX_BATCH && read + batch.len() < events {
            match consumer.recv().now_or_never() {
                Some(m) => batch.push(of(m.unwrap())),
                None => break,
            }
        }
        read += batch.len();
        pending.push(tokio::spawn(handle(batch)));
    }
    join_all(pending).await;
    started.unwrap().end(events)
}

/// Sends one record to each of `topics` and waits for it: a fresh producer's first write
/// otherwise now and then waits about a second (its producer id, the topic's metadata), which a
/// run of 100,000 records would count.
async fn warm<'a>(producer: &FutureProducer, topics: impl IntoIterator<Item = &'a String>) {
    for topic in topics {
        let record = FutureRecord::to(topic).key("warm").payload("warm");
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// The PID of the fresh broker of the run under way (0: none, the caller's own broker).
static BROKER_PID: AtomicU32 = AtomicU32::new(0);

/// A process's CPU time so far, all threads, user and system (`/proc/<pid>/stat`), seconds.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command (in parentheses) come the state (field 3) ... utime (14), stime (15),
    // in clock ticks of 1/100 s.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// The fresh broker's CPU time so far, when the run has one.
fn broker_cpu_seconds() -> Option<f64> {
    match BROKER_PID.load(Ordering::Relaxed) {
        0 => None,
        pid => Some(cpu_seconds(&pid.to_string())),
    }
}

/// A run being measured from its first record on: the wall clock, this process's CPU time and
/// the fresh broker's.
struct Measure {
    wall: Instant,
    cpu: f64,
    broker: Option<f64>,
}

impl Measure {
    fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: cpu_seconds("self"),
            broker: broker_cpu_seconds(),
        }
    }

    /// The run's measure, `events` handled since the start.
    fn end(&self, events: usize) -> Measured {
        let per_event = |seconds: f64| seconds * 1e6 / events as f64;
        Measured {
            rate: events as f64 / self.wall.elapsed().as_secs_f64(),
            cpu_us: per_event(cpu_seconds("self") - self.cpu),
            broker_us: self
                .broker
                .zip(broker_cpu_seconds())
                .map(|(start, end)| per_event(end - start)),
        }
    }
}

/// CPU time per event as printed: this process's, and the broker's when it is measured.
fn cpu(process_us: f64, broker_us: Option<f64>) -> String {
    let broker = broker_us.map_or(String::new(), |b| format!(" + broker {b:>5.1} µs"));
    format!("{process_us:>6.1} µs CPU/event{broker}")
}

/// A run's throughput and what it cost this process and the broker.
#[derive(Clone, Copy)]
struct Measured {
    /// Events per second.
    rate: f64,
    /// Microseconds of this process's CPU time per event (the broker's not counted): the
    /// router's (or the baseline's) own cost.
    cpu_us: f64,
    /// Microseconds of the fresh broker's CPU time per event (`None` on a broker of the
    /// caller's): with `cpu_us`, what an event costs the machine, both sharing its cores.
    broker_us: Option<f64>,
}

/// The sizes of the router's records for these events on the example table (read back from a
/// run's topics): its state record and each work item.
const STATE_BYTES: usize = 835;
const WORK_BYTES: usize = 233;

/// The router's writes for an event without its decision: a [`STATE_BYTES`] record to the state
/// topic and, once it is acknowledged, up to two [`WORK_BYTES`] work items to the example
/// table's first agents (the state-first order of effectively-once).
#[derive(Clone)]
struct Records {
    producer: FutureProducer,
    state: String,
    agents: [String; 2],
}

impl Records {
    fn new(kafka: &KafkaConfig) -> Self {
        Self {
            producer: kafka.producer().unwrap(),
            state: kafka.topics().state(),
            agents: ["sentiment_analyzer", "intent_classifier"]
                .map(|card| format!("{}.agent.{card}", kafka.topic_prefix)),
        }
    }

    /// Records for `kafka`'s topics, each topic written once and acknowledged ([`warm`]).
    async fn warmed(kafka: &KafkaConfig) -> Self {
        let records = Self::new(kafka);
        let topics = [&records.state].into_iter().chain(&records.agents);
        warm(&records.producer, topics).await;
        records
    }

    /// Writes `works` work items keyed `key` after the state record; waits for their
    /// acknowledgements when `acked`.
    async fn write(self, key: Vec<u8>, works: usize, acked: bool) {
        let timeout = Duration::from_secs(30);
        let state = FutureRecord::to(&self.state)
            .key(&key)
            .payload(&[b's'; STATE_BYTES]);
        let sent = self.producer.send(state, timeout).await;
        sent.map_err(|(e, _)| e).unwrap();
        let mut deliveries = Vec::with_capacity(works);
        self.send_works(&key, works, &mut deliveries);
        if acked {
            acknowledged(deliveries).await;
        }
    }

    /// Writes one state record per partition of `batch`, as large as its events' state records
    /// together, then, once they are acknowledged, `works` work items per event, acknowledged.
    async fn write_batch(self, batch: Vec<(i32, Vec<u8>)>, works: usize) {
        let mut events: BTreeMap<i32, usize> = BTreeMap::new();
        for (p, _) in &batch {
            *events.entry(*p).or_default() += 1;
        }
        let states = events
            .iter()
            .map(|(p, n)| {
                let payload = vec![b's'; STATE_BYTES * n];
                let state = FutureRecord::to(&self.state)
                    .partition(*p)
                    .key("")
                    .payload(&payload);
                self.producer
                    .send_result(state)
                    .map_err(|(e, _)| e)
                    .unwrap()
            })
            .collect();
        acknowledged(states).await;
        let mut deliveries = Vec::with_capacity(batch.len() * works);
        for (_, key) in &batch {
            self.send_works(key, works, &mut deliveries);
        }
        acknowledged(deliveries).await;
    }

    /// Hands `works` work items keyed `key` to the producer, their deliveries added to `into`.
    fn send_works(&self, key: &[u8], works: usize, into: &mut Vec<DeliveryFuture>) {
        for topic in &self.agents[..works] {
            let work = FutureRecord::to(topic)
                .key(key)
                .payload(&[b'w'; WORK_BYTES]);
            into.push(self.producer.send_result(work).map_err(|(e, _)| e).unwrap());
        }
    }
}

/// Waits for `deliveries`; each must be acknowledged.
async fn acknowledged(deliveries: Vec<DeliveryFuture>) {
    for delivery in join_all(deliveries).await {
        delivery.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// The records of each event without its decisions ([`Records`]), a state record per event,
/// acknowledged: what the router wrote before a record could hold several decisions.
async fn records_alone(kafka: &KafkaConfig, events: usize, works: usize) -> Measured {
    let records = Records::warmed(kafka).await;
    forwarded(kafka, "records", events, |m| {
        let key = m.key().unwrap_or_default().to_vec();
        records.clone().write(key, works, true)
    })
    .await
}

/// [`records_alone`] with one state record per partition and batch instead of one per event
/// ([`Records::write_batch`]): the router's records, what the broker and the client charge for
/// them, the most a router that writes them could reach.
async fn records_batched(kafka: &KafkaConfig, events: usize, works: usize) -> Measured {
    let records = Records::warmed(kafka).await;
    forwarded_in_batches(kafka, "records-batched", events, |batch| {
        records.clone().write_batch(batch, works)
    })
    .await
}

/// Returns (start-up seconds until the first event is decided, the run from then on).
async fn route(
    kafka: &KafkaConfig,
    workflow: &Workflow,
    events: usize,
    mode: ConsistencyMode,
    commit_interval: Duration,
    profile: Option<&str>,
) -> (f64, Measured) {
    let metrics = RouterMetrics::new().unwrap();
    let spawned = Instant::now();
    let mut config = RouterConfig::new(kafka.clone());
    config.consistency = mode;
    config.commit_interval = commit_interval;
    let group = config.group_id.clone();
    let router = Router::new(config, workflow.engine(), metrics.clone())
        .await
        .unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let handle = tokio::spawn(router.run(rx));
    let decided = || metrics.events.with_label_values(&["SUBMITTED"]).get();
    while decided() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let profiler = profile.map(Profiler::start);
    let started = Measure::start();
    let startup = spawned.elapsed().as_secs_f64();
    let done = Done::new(kafka, mode, &group, &metrics);
    while !done.all(events) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let measured = started.end(events);
    if let Some(profiler) = profiler {
        profiler.stop();
    }
    let _ = stop.send(true);
    handle.await.unwrap().unwrap();
    (startup, measured)
}

/// `perf record` of this process, every thread, sampled 1,999 times a second, without call
/// graphs (the release build has no frame pointers; for them, build with
/// `CARGO_PROFILE_BENCH_DEBUG=line-tables-only` and record with `--call-graph dwarf` yourself).
/// Read it by thread (the router's own task is the busiest `tokio-rt-worker`), then by symbol:
/// `perf report -i <file> --sort pid` and `perf report -i <file> --no-children --sort sym`.
struct Profiler(std::process::Child);

impl Profiler {
    fn start(file: &str) -> Self {
        let pid = std::process::id().to_string();
        let args = ["record", "-F", "1999", "-o", file, "-p", &pid];
        match std::process::Command::new("perf").args(args).spawn() {
            Ok(child) => Self(child),
            Err(e) => panic!(
                "BENCH_PROFILE: could not start `perf record` ({e}); install perf (Debian: sudo apt-get install linux-perf)"
            ),
        }
    }

    /// Stops the recording (as Ctrl-C would) and waits until the file is written: perf writes
    /// it, then ends by the same signal.
    fn stop(mut self) {
        use std::os::unix::process::ExitStatusExt;
        let pid = self.0.id() as libc::pid_t;
        // SAFETY: `kill` with a child's PID, which is not reaped until the wait below.
        unsafe { libc::kill(pid, libc::SIGINT) };
        match self.0.wait() {
            Ok(status) if status.success() || status.signal() == Some(libc::SIGINT) => {}
            other => panic!("BENCH_PROFILE: `perf record` ended with {other:?}"),
        }
    }
}

/// When a router run is over. Effectively-once: every event's writes are acknowledged (the
/// router's `routing_latency` counts each event once its batch's state records and work items
/// are). Exactly-once: its transactions committed (the group's committed offsets reach the end of
/// the tasks topic).
enum Done {
    Landed(prometheus::Histogram),
    Committed {
        reader: BaseConsumer,
        tasks: String,
        partitions: i32,
    },
}

impl Done {
    fn new(
        kafka: &KafkaConfig,
        mode: ConsistencyMode,
        group: &str,
        metrics: &RouterMetrics,
    ) -> Self {
        if mode == ConsistencyMode::EffectivelyOnce {
            return Self::Landed(metrics.routing_latency.clone());
        }
        let mut config = kafka.client_config();
        config.set("group.id", group);
        let tasks = kafka.topics().tasks();
        Self::Committed {
            reader: config.create().unwrap(),
            partitions: kafka.partition_count(&tasks).unwrap(),
            tasks,
        }
    }

    fn all(&self, events: usize) -> bool {
        let written = match self {
            Self::Landed(landed) => landed.get_sample_count() as i64,
            Self::Committed {
                reader,
                tasks,
                partitions,
            } => {
                let mut tpl = rdkafka::TopicPartitionList::new();
                for p in 0..*partitions {
                    tpl.add_partition(tasks, p);
                }
                let committed = reader
                    .committed_offsets(tpl, Duration::from_secs(10))
                    .unwrap();
                committed
                    .elements()
                    .iter()
                    .filter_map(|e| e.offset().to_raw())
                    .filter(|o| *o > 0)
                    .sum()
            }
        };
        written >= events as i64
    }
}

/// A broker the project's scripts install and start.
#[derive(Clone, Copy)]
enum Kind {
    /// nisshi (`scripts/start-broker`).
    Nisshi,
    /// The transactional crabka (`scripts/start-txn-broker`).
    Crabka,
}

impl Kind {
    /// The scripts' suffix: `scripts/start-<suffix>`.
    fn scripts(self) -> &'static str {
        match self {
            Kind::Nisshi => "broker",
            Kind::Crabka => "txn-broker",
        }
    }

    /// Its name, for the report.
    fn name(self) -> &'static str {
        match self {
            Kind::Nisshi => "nisshi",
            Kind::Crabka => "crabka",
        }
    }

    /// Where the scripts start it for the tests.
    fn default_bootstrap(self) -> &'static str {
        match self {
            Kind::Nisshi => "127.0.0.1:9092",
            Kind::Crabka => "127.0.0.1:9392",
        }
    }

    /// The port of a fresh one per run, unless `BENCH_PORT` says.
    fn fresh_port(self) -> &'static str {
        match self {
            Kind::Nisshi => "19092",
            Kind::Crabka => "19392",
        }
    }
}

/// The broker each run starts afresh through the project's scripts, on `BENCH_PORT`, with its
/// own `SWITCHYARD_HOME`, the previous one stopped: nisshi, or the transactional crabka.
/// `None` when the caller names a broker of theirs (then every run shares it).
struct Fresh {
    home: tempfile::TempDir,
    port: String,
    kind: Kind,
}

impl Fresh {
    fn new(kind: Kind, shared_variable: &str) -> Option<Self> {
        if std::env::var(shared_variable).is_ok() {
            return None;
        }
        let port = std::env::var("BENCH_PORT").unwrap_or_else(|_| kind.fresh_port().into());
        Some(Self {
            home: tempfile::tempdir().unwrap(),
            port,
            kind,
        })
    }

    fn script(&self, verb: &str) {
        let name = format!("{verb}-{}", self.kind.scripts());
        let status = std::process::Command::new(format!("scripts/{name}"))
            .env("SWITCHYARD_HOME", self.home.path())
            .env("SWITCHYARD_BROKER_PORT", &self.port)
            .env("SWITCHYARD_TXN_BROKER_PORT", &self.port)
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        let hint = match self.kind {
            Kind::Crabka => " (a crabka's controller always takes 127.0.0.1:9093: stop another one with scripts/stop-txn-broker)",
            Kind::Nisshi => "",
        };
        assert!(status.success(), "scripts/{name} failed{hint}");
    }

    /// Stops the previous broker and starts a new one; returns its address.
    fn restart(&self) -> String {
        self.script("stop");
        // A new data directory each time: crabka keeps its log there.
        let _ = std::fs::remove_dir_all(self.home.path().join("txn-broker"));
        self.script("start");
        let pid = self
            .home
            .path()
            .join(format!("{}.pid", self.kind.scripts()));
        let pid = std::fs::read_to_string(&pid).unwrap_or_default();
        BROKER_PID.store(pid.trim().parse().unwrap_or(0), Ordering::Relaxed);
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        self.script("stop");
    }
}

/// Where runs find their broker: a fresh one per run ([`Fresh`]), or the one the caller names in
/// `variable`, shared by every run.
struct Brokers {
    fresh: Option<Fresh>,
    shared: String,
    variable: &'static str,
    kind: Kind,
}

impl Brokers {
    /// A fresh `kind` per run, unless `variable` names a shared broker.
    fn new(kind: Kind, variable: &'static str) -> Self {
        Self {
            fresh: Fresh::new(kind, variable),
            shared: std::env::var(variable).unwrap_or_else(|_| kind.default_bootstrap().into()),
            variable,
            kind,
        }
    }

    /// The broker for the next run (a fresh one restarted), once it answers; `probe` names the
    /// probe's topic prefix.
    fn next(&self, probe: &str) -> String {
        let bootstrap = self
            .fresh
            .as_ref()
            .map_or_else(|| self.shared.clone(), Fresh::restart);
        config(&bootstrap, probe)
            .wait_for_broker(Duration::from_secs(20))
            .unwrap_or_else(|e| {
                panic!(
                    "{e}: start the broker with scripts/start-{}",
                    self.kind.scripts()
                )
            });
        bootstrap
    }

    /// Which broker the runs use, for the report.
    fn describe(&self) -> String {
        let name = self.kind.name();
        match &self.fresh {
            Some(f) => format!("a fresh {name} per run on 127.0.0.1:{}", f.port),
            None => format!(
                "the broker at {} ({}), shared by every run",
                self.shared, self.variable
            ),
        }
    }
}

/// What carries task events to the agent's topic in a latency run.
#[derive(Clone, Copy)]
enum Carrier {
    /// A bare consume→produce forwarder (the tasks topic to the agent's): what the broker and
    /// the clients cost without the router, the baseline.
    Passthrough,
    /// Records without decisions: a state record per event, acknowledged, then the work items
    /// (the example table's two), as [`records_alone`] writes them: the floor that the
    /// state-first order sets.
    Records,
    /// The router, effectively-once, on the example rule table.
    Router,
}

impl Carrier {
    fn name(self) -> &'static str {
        match self {
            Carrier::Passthrough => "passthrough",
            Carrier::Records => "records",
            Carrier::Router => "router",
        }
    }
}

/// One latency run's samples, in ms: end to end (the task event's send → its first work item's
/// arrival at a consumer, this process's clock), and that split at the work item's timestamp
/// (librdkafka stamps it at `produce()`, in ms): send → produced (input fetch, deciding, the
/// state record's acknowledgement), produced → received (the work item's way through the broker).
#[derive(Default)]
struct Latencies {
    total: Vec<f64>,
    produced: Vec<f64>,
    received: Vec<f64>,
    /// The share of the machine's CPU time that was busy during the run (every process's).
    busy: f64,
}

impl Latencies {
    /// The run's report line, and its p99 end to end.
    fn line(mut self, carrier: Carrier) -> (String, f64) {
        let q = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
            (at(0.5), at(0.99), at(1.0))
        };
        let (p50, p99, max) = q(&mut self.total);
        let (produced50, produced99, _) = q(&mut self.produced);
        let (received50, received99, _) = q(&mut self.received);
        let line = format!(
            "  {:<12} p50 {p50:>6.1} ms, p99 {p99:>7.1} ms, max {max:>7.1} ms   \
             (send → produced p50 {produced50:.0} / p99 {produced99:.0} ms, \
             produced → received p50 {received50:.0} / p99 {received99:.0} ms), \
             machine {:.0} % busy",
            carrier.name(),
            self.busy * 100.0
        );
        (line, p99)
    }
}

/// The machine's CPU time so far, busy and in all, in clock ticks (`/proc/stat`'s `cpu` line;
/// zero where there is none).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let all: u64 = ticks.iter().sum();
    let idle = ticks.iter().skip(3).take(2).sum::<u64>();
    (all - idle, all)
}

/// The busy share of the machine's CPU time since `start` ([`machine_ticks`]).
fn busy_since(start: (u64, u64)) -> f64 {
    let (busy, all) = machine_ticks();
    (busy - start.0) as f64 / (all - start.1).max(1) as f64
}

fn epoch_ms() -> f64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.unwrap().as_secs_f64() * 1000.0
}

/// Forwards every record of the tasks topic to `to` until `stop` turns true; with `state_first`,
/// writes the router's records for it instead ([`Records`], two work items, the first to `to`).
/// Deliveries of what reaches `to` are not awaited: the consumer at the other end sees it arrive.
async fn relay(
    kafka: KafkaConfig,
    to: String,
    state_first: bool,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let consumer = tasks_reader(&kafka, "relay");
    let records = Records::new(&kafka);
    assert_eq!(
        records.agents[0], to,
        "the records' first work item goes to `to`"
    );
    loop {
        let m = tokio::select! {
            _ = stop.changed() => return,
            m = consumer.recv() => m.unwrap(),
        };
        let key = m.key().unwrap_or_default();
        if state_first {
            tokio::spawn(records.clone().write(key.to_vec(), 2, false));
            continue;
        }
        let record = FutureRecord::to(&to)
            .key(key)
            .payload(m.payload().unwrap_or_default());
        drop(
            records
                .producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .unwrap(),
        );
    }
}

/// Latency through `carrier`, with `rate` events/s for `seconds`.
async fn latency(
    kafka: &KafkaConfig,
    workflow: &Workflow,
    carrier: Carrier,
    rate: f64,
    seconds: f64,
) -> Latencies {
    prepare(kafka, workflow, 0).await;
    let inbox = format!("{}.agent.sentiment_analyzer", kafka.topic_prefix);
    let (stop_relay, stopped) = tokio::sync::watch::channel(false);
    let router = match carrier {
        Carrier::Router => {
            let router = router::Running::start(kafka, workflow).await;
            router.restored().await;
            Some(router)
        }
        Carrier::Passthrough | Carrier::Records => {
            let state_first = matches!(carrier, Carrier::Records);
            tokio::spawn(relay(kafka.clone(), inbox.clone(), state_first, stopped));
            None
        }
    };
    let mut client = kafka.client_config();
    client
        .set("group.id", format!("{}.latency", kafka.topic_prefix))
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "5");
    let consumer: StreamConsumer = client.create().unwrap();
    // Assigned, not subscribed: a group join would hold back the first second's work items.
    assign_from_start(&consumer, kafka, &inbox);
    let count = (rate * seconds) as usize;
    let producer = kafka.producer().unwrap();
    let topic = kafka.topics().tasks();
    // Warm up (metadata of every topic in every client, the first fetches): the first second
    // of a fresh run otherwise waits about a second, once.
    for i in 0..20 {
        let mut e = TaskEvent::new(format!("warm-{i}"), EventKind::Submitted, "bench");
        e.payload = serde_json::json!({ "customer_message": "warm up" });
        let bytes = serde_json::to_vec(&e).unwrap();
        let record = FutureRecord::to(&topic).key(&e.task_id).payload(&bytes);
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let mut warm = 0;
    while warm < 20 {
        let m = consumer.recv().await.unwrap();
        warm += usize::from(m.key().is_some_and(|k| k.starts_with(b"warm-")));
    }
    // The events are encoded before the clock starts; the sender only hands them over.
    let events = events::submissions("lat", count);
    let sent = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let started = Instant::now();
    let machine = machine_ticks();
    let sender = {
        let sent = sent.clone();
        tokio::spawn(async move {
            // Each millisecond's wake hands over every event due by then, each timed from its own
            // hand-over: a timer wake per event costs this process CPU the router, sharing the
            // machine, would otherwise have.
            let mut events = events.into_iter().enumerate().peekable();
            let mut ticks = tokio::time::interval(Duration::from_millis(1));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while events.peek().is_some() {
                ticks.tick().await;
                let elapsed = started.elapsed().as_secs_f64();
                while let Some((_, (key, bytes))) =
                    events.next_if(|(i, _)| *i as f64 / rate <= elapsed)
                {
                    sent.lock()
                        .unwrap()
                        .insert(key.clone(), (Instant::now(), epoch_ms()));
                    let record = FutureRecord::to(&topic).key(&key).payload(&bytes);
                    // Not awaited: the send must not wait for the previous one's acknowledgement.
                    drop(producer.send_result(record).map_err(|(e, _)| e).unwrap());
                }
            }
            // Kept until every work item arrived: dropping a producer drops what it holds.
            producer
        })
    };
    let mut samples = Latencies::default();
    while samples.total.len() < count {
        let m = consumer.recv().await.unwrap();
        let (arrived, arrived_ms) = (Instant::now(), epoch_ms());
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
        let Some((t0, t0_ms)) = sent.lock().unwrap().remove(&key) else {
            continue;
        };
        samples
            .total
            .push(arrived.duration_since(t0).as_secs_f64() * 1000.0);
        if let Some(produced) = m.timestamp().to_millis() {
            samples.produced.push(produced as f64 - t0_ms);
            samples.received.push(arrived_ms - produced as f64);
        }
    }
    samples.busy = busy_since(machine);
    drop(sender.await.unwrap());
    let _ = stop_relay.send(true);
    if let Some(router) = router {
        router.stop().await;
    }
    samples
}

/// One kind of run.
#[derive(Clone, Copy)]
enum Run {
    /// The bare consume→produce baseline.
    Passthrough,
    /// The router in a mode, with a commit interval (exactly-once only), on the example rule
    /// table: a state event and two work items per event.
    Router(ConsistencyMode, Duration),
    /// The router effectively-once on a one-rule table: a state event and one work item per
    /// event (`benches/fixtures/one-work-item.yaml`).
    OneItem,
    /// A state record per event, then this many work items, written without deciding:
    /// [`records_alone`].
    Records(usize),
    /// The router's records (one state record per partition and batch, then this many work
    /// items per event), written without deciding: [`records_batched`].
    RecordsBatched(usize),
}

impl Run {
    fn name(self) -> String {
        match self {
            Run::Passthrough => "passthrough".into(),
            Run::Router(ConsistencyMode::EffectivelyOnce, _) => "router effectively-once".into(),
            Run::Router(mode, interval) => format!("router {mode} {}ms", interval.as_millis()),
            Run::OneItem => "router effectively-once, 1 item".into(),
            Run::Records(works) => format!("records, state per event, 1 + {works}"),
            Run::RecordsBatched(works) => format!("its records alone, 1 + {works}"),
        }
    }

    /// The work items per event of an effectively-once router run.
    fn writes(self) -> Option<usize> {
        match self {
            Run::Router(ConsistencyMode::EffectivelyOnce, _) => Some(2),
            Run::OneItem => Some(1),
            _ => None,
        }
    }
}

fn main() {
    switchyard::allocator::configure();
    tokio::runtime::Runtime::new().unwrap().block_on(run());
}

/// Runs the benchmark (see the module's documentation).
async fn run() {
    // The binary's subscriber (log lines to stderr, spans for their trace context), so that the
    // router is measured as it ships; without librdkafka's lines, since on crabka it logs a
    // harmless protocol error for each fetch of an empty partition (thousands per second).
    let tracing = switchyard::trace::Tracing::init("bench", None).unwrap();
    tracing.install(tracing_subscriber::EnvFilter::new(
        "info,librdkafka=off,rdkafka=off",
    ));
    let events: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mode: ConsistencyMode = std::env::var("BENCH_MODE")
        .unwrap_or_else(|_| "effectively-once".into())
        .parse()
        .unwrap();
    let workflow = Workflow::load(Path::new("agents/customer-service"), None).unwrap();
    let one_item = Workflow::load(
        Path::new("agents/customer-service"),
        Some(Path::new("benches/fixtures/one-work-item.yaml")),
    )
    .unwrap();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let effectively = Run::Router(ConsistencyMode::EffectivelyOnce, Duration::ZERO);
    let (kind, variable) = match mode {
        ConsistencyMode::EffectivelyOnce => (Kind::Nisshi, "SWITCHYARD_TEST_BOOTSTRAP"),
        ConsistencyMode::ExactlyOnce => (Kind::Crabka, "SWITCHYARD_TXN_BOOTSTRAP"),
    };
    let profile = std::env::var("BENCH_PROFILE").ok();
    let mut runs = vec![Run::Passthrough, effectively];
    match mode {
        ConsistencyMode::EffectivelyOnce => runs.extend([
            Run::OneItem,
            Run::RecordsBatched(2),
            Run::RecordsBatched(1),
            Run::Records(2),
            Run::Records(1),
        ]),
        ConsistencyMode::ExactlyOnce => {
            for ms in [10, 100, 1000] {
                runs.push(Run::Router(mode, Duration::from_millis(ms)));
            }
        }
    }
    let rounds = match &profile {
        Some(_) => {
            runs = vec![Run::OneItem];
            1
        }
        None => ROUNDS,
    };
    let brokers = Brokers::new(kind, variable);
    let broker = |round: &str| brokers.next(&format!("bench-probe-{run_id}-{round}"));
    println!("{events} SUBMITTED events per run, {}", brokers.describe());
    let mut measures: Vec<Vec<Measured>> = vec![Vec::new(); runs.len()];
    for round in 1..=rounds {
        let mut line = format!("round {round}:");
        for (i, run) in runs.iter().enumerate() {
            let kafka = config(
                &broker(&format!("{round}-{i}")),
                &format!("bench-{run_id}-{round}-{i}"),
            );
            let size = prepare(&kafka, &workflow, events).await;
            let routed = match *run {
                Run::Passthrough | Run::Records(_) | Run::RecordsBatched(_) => None,
                Run::Router(mode, interval) => Some((&workflow, mode, interval)),
                Run::OneItem => Some((&one_item, ConsistencyMode::EffectivelyOnce, Duration::ZERO)),
            };
            let (measured, startup) = match (routed, *run) {
                (None, Run::Records(works)) => {
                    (records_alone(&kafka, events, works).await, String::new())
                }
                (None, Run::RecordsBatched(works)) => {
                    (records_batched(&kafka, events, works).await, String::new())
                }
                (None, _) => (passthrough(&kafka, events).await, String::new()),
                (Some((table, mode, interval)), _) => {
                    let (startup, measured) =
                        route(&kafka, table, events, mode, interval, profile.as_deref()).await;
                    (measured, format!(", start-up {startup:.2}s"))
                }
            };
            measures[i].push(measured);
            line.push_str(&format!(
                "\n  {:<32} {:>8.0} events/s {} ({size}-byte events{startup})",
                run.name(),
                measured.rate,
                cpu(measured.cpu_us, measured.broker_us),
            ));
        }
        println!("{line}");
    }
    if let Some(file) = profile {
        println!("profile: perf report -i {file} --sort pid; perf report -i {file} --no-children --sort sym");
        return;
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let of = |m: &[Measured], field: fn(&Measured) -> f64| {
        median(&m.iter().map(field).collect::<Vec<_>>())
    };
    let medians: Vec<f64> = measures.iter().map(|m| of(m, |m| m.rate)).collect();
    println!("medians of {ROUNDS} (router: rule decisions, a state event and 2 work items per event unless said; CPU: this process's, all threads, then the broker's):");
    for ((run, rate), measured) in runs.iter().zip(&medians).zip(&measures) {
        let mut ratios = format!("{:.2} of the passthrough", rate / medians[0]);
        if let Run::Router(ConsistencyMode::ExactlyOnce, _) = run {
            ratios.push_str(&format!(", {:.2} of effectively-once", rate / medians[1]));
        }
        let alone = run.writes().and_then(|works| {
            let i = runs
                .iter()
                .position(|r| matches!(r, Run::RecordsBatched(w) if *w == works))?;
            Some(rate / medians[i])
        });
        if let Some(alone) = alone {
            ratios.push_str(&format!(", {alone:.2} of its records alone"));
        }
        let broker = measured
            .iter()
            .all(|m| m.broker_us.is_some())
            .then(|| of(measured, |m| m.broker_us.unwrap_or_default()));
        println!(
            "  {:<32} {rate:>10.0} events/s {}   {ratios}",
            run.name(),
            cpu(of(measured, |m| m.cpu_us), broker)
        );
    }
    drop(brokers);
    if mode == ConsistencyMode::EffectivelyOnce {
        let seconds: f64 = std::env::var("BENCH_LATENCY_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10.0);
        let chosen: Option<f64> = std::env::var("BENCH_LATENCY_RATE")
            .ok()
            .and_then(|v| v.parse().ok());
        let half = chosen.unwrap_or(medians[1] / 2.0);
        let which = match chosen {
            Some(_) => "BENCH_LATENCY_RATE",
            None => "half the router's rate",
        };
        // nisshi re-reads a fetch's partitions on each poll round: even the bare forwarder's p99
        // is tens of ms there, so the latency runs default to crabka.
        let brokers = match std::env::var("BENCH_LATENCY_BROKER").as_deref() {
            Ok("nisshi") => Brokers::new(Kind::Nisshi, variable),
            Ok("crabka") | Err(_) => Brokers::new(Kind::Crabka, variable),
            Ok(other) => panic!("BENCH_LATENCY_BROKER is `{other}`; use crabka or nisshi"),
        };
        println!(
            "latency at {which} ({half:.0} events/s for {seconds}s each), event sent → first work item received, this process's clock, {}:",
            brokers.describe()
        );
        let carriers = [Carrier::Passthrough, Carrier::Records, Carrier::Router];
        let mut p99s = [Vec::new(), Vec::new(), Vec::new()];
        for round in 1..=LATENCY_ROUNDS {
            for (i, carrier) in carriers.into_iter().enumerate() {
                let name = format!("latency-{round}-{}", carrier.name());
                let kafka = config(
                    &brokers.next(&format!("bench-probe-{name}-{run_id}")),
                    &format!("bench-{name}-{run_id}"),
                );
                let samples = latency(&kafka, &workflow, carrier, half, seconds).await;
                let (line, p99) = samples.line(carrier);
                println!("{line}");
                p99s[i].push(p99);
            }
        }
        println!(
            "median p99 of {LATENCY_ROUNDS}: passthrough {:.1} ms, records {:.1} ms, router {:.1} ms (goal: router < 20 ms)",
            median(&p99s[0]),
            median(&p99s[1]),
            median(&p99s[2])
        );
    }
}

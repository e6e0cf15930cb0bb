//! Routing throughput, in one invocation:
//! (a) a bare rdkafka consume→produce passthrough over the same records, the baseline, and
//! (b) the router deciding with the example rule table (state event + work items per event).
//! Both rates are measured from the first record handled to the last one acknowledged; the
//! router's start-up is printed apart. Each run starts from a fresh broker (a long-lived nisshi
//! slows down as topics accumulate); the two alternate, twice each; prints events/s, the ratios
//! and their means. Then (c) the latency from a task event's send to the arrival of its first
//! work item at a consumer, both on this process's clock, at half the router's measured rate:
//! p50, p99, max. Run with `scripts/bench-routing`.
//!
//! `BENCH_MODE=effectively-once` (default) starts a fresh nisshi for each run on `BENCH_PORT`
//! (default 19092) through `scripts/start-broker`, or uses `SWITCHYARD_TEST_BOOTSTRAP` when set;
//! `BENCH_MODE=exactly-once` runs both against librdkafka's in-process mock cluster (the only
//! transactional broker here), with the router committing a transaction per batch.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::FutureRecord;
use switchyard::envelope::{EventKind, TaskEvent};
use switchyard::kafka::KafkaConfig;
use switchyard::metrics::RouterMetrics;
use switchyard::router::{ConsistencyMode, Router, RouterConfig};
use switchyard::topics::{self, TopicSpecs};
use switchyard::workflow::Workflow;

/// The binary's allocator (`src/main.rs`), so that the router is measured as it ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "support/router.rs"]
mod router;

fn config(bootstrap: &str, prefix: &str) -> KafkaConfig {
    let bootstrap = bootstrap.to_string();
    KafkaConfig {
        bootstrap_servers: bootstrap,
        topic_prefix: prefix.into(),
        options: Default::default(),
    }
}

async fn prepare(
    kafka: &KafkaConfig,
    workflow: &Workflow,
    events: usize,
    mock: Option<&MockCluster<'static, DefaultProducerContext>>,
) -> usize {
    let specs = TopicSpecs::load(Path::new("topics/switchyard.yaml")).unwrap();
    match mock {
        Some(cluster) => {
            for (name, spec) in specs.wanted(kafka, &workflow.cards) {
                cluster.create_topic(&name, spec.partitions, 1).unwrap();
            }
        }
        None => {
            topics::apply(kafka, &specs, &workflow.cards).await.unwrap();
        }
    }
    let producer = kafka.producer().unwrap();
    let topic = kafka.topics().tasks();
    let payloads: Vec<(String, Vec<u8>)> = (0..events)
        .map(|i| {
            let mut e = TaskEvent::new(format!("bench-{i}"), EventKind::Submitted, "bench");
            e.payload = serde_json::json!({ "customer_message": "where is my order? it should have arrived by now" });
            (e.task_id.clone(), serde_json::to_vec(&e).unwrap())
        })
        .collect();
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

async fn passthrough(kafka: &KafkaConfig, events: usize) -> f64 {
    let mut client = kafka.client_config();
    client
        .set("group.id", format!("{}.passthrough", kafka.topic_prefix))
        .set("auto.offset.reset", "earliest");
    // The router's consumer defaults, so that both wait for fetches alike.
    switchyard::kafka::service_consumer_defaults(&mut client);
    let consumer: StreamConsumer = client.create().unwrap();
    // Every partition from its start, without a group join in the middle of the run.
    let tasks = kafka.topics().tasks();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..kafka.partition_count(&tasks).unwrap() {
        tpl.add_partition_offset(&tasks, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let producer = kafka.producer().unwrap();
    let out = kafka.topics().dlq();
    let mut started = None;
    let mut pending = Vec::new();
    for _ in 0..events {
        let m = consumer.recv().await.unwrap().detach();
        started.get_or_insert_with(Instant::now);
        let key = m.key().unwrap_or_default().to_vec();
        let payload = m.payload().unwrap_or_default().to_vec();
        let producer = producer.clone();
        let out = out.clone();
        pending.push(tokio::spawn(async move {
            producer
                .send(
                    FutureRecord::to(&out).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }));
    }
    join_all(pending).await;
    events as f64 / started.unwrap().elapsed().as_secs_f64()
}

/// Returns (start-up seconds until the first event is decided, events/s from then on).
async fn route(
    kafka: &KafkaConfig,
    workflow: &Workflow,
    events: usize,
    mode: ConsistencyMode,
) -> (f64, f64) {
    let metrics = RouterMetrics::new().unwrap();
    let spawned = Instant::now();
    let mut config = RouterConfig::new(kafka.clone());
    config.consistency = mode;
    let router = Router::new(config, workflow.engine(), metrics.clone())
        .await
        .unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let handle = tokio::spawn(router.run(rx));
    let decided = || metrics.events.with_label_values(&["SUBMITTED"]).get();
    while decided() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let startup = spawned.elapsed().as_secs_f64();
    // A batch counts once its state events and work items are acknowledged.
    let state = kafka.topics().state();
    let watermarks: BaseConsumer = kafka.client_config().create().unwrap();
    let partitions = kafka.partition_count(&state).unwrap();
    let written =
        || switchyard::kafka::high_watermark_sum(&watermarks, &state, partitions).unwrap();
    while written() < (events as i64) + i64::from(partitions) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = events as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    handle.await.unwrap().unwrap();
    (startup, rate)
}

/// A fresh broker for the next run: `scripts/start-broker` on `BENCH_PORT` (default 19092) with
/// its own `SWITCHYARD_HOME`, the previous one stopped. `None` when `SWITCHYARD_TEST_BOOTSTRAP`
/// names a broker of the caller's (then every run shares it).
struct Fresh {
    home: tempfile::TempDir,
    port: String,
}

impl Fresh {
    fn new() -> Option<Self> {
        if std::env::var("SWITCHYARD_TEST_BOOTSTRAP").is_ok() {
            return None;
        }
        let port = std::env::var("BENCH_PORT").unwrap_or_else(|_| "19092".into());
        Some(Self {
            home: tempfile::tempdir().unwrap(),
            port,
        })
    }

    fn script(&self, name: &str) {
        let status = std::process::Command::new(format!("scripts/{name}"))
            .env("SWITCHYARD_HOME", self.home.path())
            .env("SWITCHYARD_BROKER_PORT", &self.port)
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "scripts/{name} failed");
    }

    /// Stops the previous broker and starts a new one; returns its address.
    fn restart(&self) -> String {
        self.script("stop-broker");
        self.script("start-broker");
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        self.script("stop-broker");
    }
}

/// Latency from a task event's send (this process's clock) to the arrival of its first work item
/// at a consumer (the same clock), with `rate` events/s for `seconds`: (p50, p99, max) in ms.
async fn latency(
    kafka: &KafkaConfig,
    workflow: &Workflow,
    rate: f64,
    seconds: f64,
) -> (f64, f64, f64) {
    prepare(kafka, workflow, 0, None).await;
    let router = router::Running::start(kafka, workflow).await;
    router.restored().await;
    let inbox = format!("{}.agent.sentiment_analyzer", kafka.topic_prefix);
    let mut client = kafka.client_config();
    client
        .set("group.id", format!("{}.latency", kafka.topic_prefix))
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "5");
    let consumer: StreamConsumer = client.create().unwrap();
    // Assigned, not subscribed: a group join would hold back the first second's work items.
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..kafka.partition_count(&inbox).unwrap() {
        tpl.add_partition_offset(&inbox, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
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
    let sent = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let started = Instant::now();
    let sender = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut pending = Vec::new();
            for i in 0..count {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let mut e = TaskEvent::new(format!("lat-{i}"), EventKind::Submitted, "bench");
                e.payload = serde_json::json!({ "customer_message": "where is my order? it should have arrived by now" });
                let bytes = serde_json::to_vec(&e).unwrap();
                sent.lock()
                    .unwrap()
                    .insert(e.task_id.clone(), Instant::now());
                let producer = producer.clone();
                let topic = topic.clone();
                pending.push(tokio::spawn(async move {
                    let record = FutureRecord::to(&topic).key(&e.task_id).payload(&bytes);
                    producer
                        .send(record, Duration::from_secs(30))
                        .await
                        .map_err(|(e, _)| e)
                        .unwrap();
                }));
            }
            join_all(pending).await;
        })
    };
    let mut latencies = Vec::with_capacity(count);
    while latencies.len() < count {
        let m = consumer.recv().await.unwrap();
        let arrived = Instant::now();
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
        if let Some(t0) = sent.lock().unwrap().remove(&key) {
            let ms = arrived.duration_since(t0).as_secs_f64() * 1000.0;
            latencies.push(ms);
        }
    }
    sender.await.unwrap();
    router.stop().await;
    latencies.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99), at(1.0))
}

#[tokio::main]
async fn main() {
    let events: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mode: ConsistencyMode = std::env::var("BENCH_MODE")
        .unwrap_or_else(|_| "effectively-once".into())
        .parse()
        .unwrap();
    let workflow = Workflow::load(Path::new("agents/customer-service"), None).unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let fresh = (mode == ConsistencyMode::EffectivelyOnce)
        .then(Fresh::new)
        .flatten();
    let shared =
        std::env::var("SWITCHYARD_TEST_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let broker = |round: &str| -> (String, Option<MockCluster<'static, DefaultProducerContext>>) {
        if mode == ConsistencyMode::ExactlyOnce {
            let cluster = MockCluster::new(1).unwrap();
            return (cluster.bootstrap_servers(), Some(cluster));
        }
        let bootstrap = fresh
            .as_ref()
            .map_or_else(|| shared.clone(), Fresh::restart);
        let probe = config(&bootstrap, &format!("bench-probe-{run}-{round}"));
        probe
            .wait_for_broker(Duration::from_secs(20))
            .expect("start the broker with scripts/start-broker");
        (bootstrap, None)
    };
    let where_ = match (mode, &fresh) {
        (ConsistencyMode::ExactlyOnce, _) => "a fresh librdkafka mock cluster per run".to_string(),
        (_, Some(f)) => format!("a fresh nisshi per run on 127.0.0.1:{}", f.port),
        (_, None) => {
            format!("the broker at {shared} (SWITCHYARD_TEST_BOOTSTRAP), shared by every run")
        }
    };
    println!("{events} SUBMITTED events per run, mode {mode}, {where_}");
    let (mut passes, mut routes) = (Vec::new(), Vec::new());
    for round in 1..=2 {
        let (bootstrap, mock) = broker(&format!("p{round}"));
        let base = config(&bootstrap, &format!("bench-pass-{run}-{round}"));
        let size = prepare(&base, &workflow, events, mock.as_ref()).await;
        let pass = passthrough(&base, events).await;
        drop(mock);
        let (bootstrap, mock) = broker(&format!("r{round}"));
        let routed = config(&bootstrap, &format!("bench-route-{run}-{round}"));
        prepare(&routed, &workflow, events, mock.as_ref()).await;
        let (startup, rate) = route(&routed, &workflow, events, mode).await;
        drop(mock);
        println!(
            "round {round}: (a) passthrough {pass:>8.0} events/s   (b) router {rate:>8.0} events/s   ratio {:.2}   ({size}-byte events; router start-up {startup:.2}s)",
            rate / pass
        );
        passes.push(pass);
        routes.push(rate);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (pass, rate) = (mean(&passes), mean(&routes));
    let interval = if mode == ConsistencyMode::ExactlyOnce {
        ", a transaction per batch, commit interval 100ms"
    } else {
        ""
    };
    println!("(a) bare consume→produce passthrough: {pass:>10.0} events/s (mean of 2)");
    println!("(b) router, rule decisions (state event + 2 work items each, {mode}{interval}): {rate:>10.0} events/s (mean of 2)");
    println!("ratio router / passthrough: {:.2}", rate / pass);
    if mode == ConsistencyMode::EffectivelyOnce {
        let seconds: f64 = std::env::var("BENCH_LATENCY_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10.0);
        let (bootstrap, _) = broker("latency");
        let kafka = config(&bootstrap, &format!("bench-latency-{run}"));
        let chosen: Option<f64> = std::env::var("BENCH_LATENCY_RATE")
            .ok()
            .and_then(|v| v.parse().ok());
        let half = chosen.unwrap_or(rate / 2.0);
        let which = match chosen {
            Some(_) => "BENCH_LATENCY_RATE",
            None => "half the router's rate",
        };
        let (p50, p99, max) = latency(&kafka, &workflow, half, seconds).await;
        println!(
            "latency at {which} ({half:.0} events/s for {seconds}s), event sent → first work item received, this process's clock: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
        );
    }
}

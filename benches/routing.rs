//! Routing throughput, in one invocation:
//! (a) a bare rdkafka consume→produce passthrough over the same records, the baseline, and
//! (b) the router deciding with the example rule table (state event + work items per event).
//! Both rates are measured from the first record handled to the last one acknowledged; the
//! router's start-up is printed apart. Prints events/s for both and their ratio. Run with
//! `scripts/bench-routing`.
//!
//! `BENCH_MODE=effectively-once` (default) runs against the broker on 127.0.0.1:9092;
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
    let size = payloads[0].1.len();
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
    let consumer: StreamConsumer = client.create().unwrap();
    consumer.subscribe(&[&kafka.topics().tasks()]).unwrap();
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

#[tokio::main]
async fn main() {
    let events: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mode: ConsistencyMode = std::env::var("BENCH_MODE")
        .unwrap_or_else(|_| "effectively-once".into())
        .parse()
        .unwrap();
    let workflow = Workflow::load(Path::new("agents/customer-service"), None).unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mock = (mode == ConsistencyMode::ExactlyOnce).then(|| MockCluster::new(1).unwrap());
    let bootstrap = match &mock {
        Some(cluster) => cluster.bootstrap_servers(),
        None => {
            std::env::var("SWITCHYARD_TEST_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
        }
    };
    let base = config(&bootstrap, &format!("bench-pass-{run}"));
    let routed = config(&bootstrap, &format!("bench-route-{run}"));
    base.wait_for_broker(Duration::from_secs(10))
        .expect("start the broker with scripts/start-broker");
    let size = prepare(&base, &workflow, events, mock.as_ref()).await;
    prepare(&routed, &workflow, events, mock.as_ref()).await;
    let broker = if mock.is_some() {
        "librdkafka mock cluster"
    } else {
        "local broker"
    };
    println!(
        "{events} SUBMITTED events of {size} bytes, {} partitions, {broker} at {}, mode {mode}",
        base.partition_count(&base.topics().tasks()).unwrap(),
        base.bootstrap_servers
    );
    let pass = passthrough(&base, events).await;
    println!("(a) bare consume→produce passthrough: {pass:>10.0} events/s");
    let (startup, rules) = route(&routed, &workflow, events, mode).await;
    let interval = if mode == ConsistencyMode::ExactlyOnce {
        ", a transaction per batch, commit interval 100ms"
    } else {
        ""
    };
    println!("(b) router, rule decisions (state event + 2 work items each, {mode}{interval}): {rules:>10.0} events/s");
    println!("    router start-up (group join, restore of 3 partitions) before the first decision: {startup:.2}s");
    println!("ratio router / passthrough: {:.2}", rules / pass);
}

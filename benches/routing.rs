//! Routing throughput against the local broker, in one invocation:
//! (a) a bare rdkafka consume→produce passthrough over the same records, the baseline, and
//! (b) the router deciding with the example rule table (state event + work items per event).
//! Prints events/s for both and their ratio. Run with `scripts/bench-routing`.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use switchyard::envelope::{EventKind, TaskEvent};
use switchyard::kafka::KafkaConfig;
use switchyard::metrics::RouterMetrics;
use switchyard::router::{Router, RouterConfig};
use switchyard::topics::{self, TopicSpecs};
use switchyard::workflow::Workflow;

fn config(prefix: &str) -> KafkaConfig {
    let bootstrap =
        std::env::var("SWITCHYARD_TEST_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
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

fn high_watermarks(kafka: &KafkaConfig, topic: &str) -> i64 {
    let consumer: BaseConsumer = kafka.client_config().create().unwrap();
    let partitions = kafka.partition_count(topic).unwrap();
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .sum()
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
    let started = Instant::now();
    let mut pending = Vec::new();
    for _ in 0..events {
        let m = consumer.recv().await.unwrap().detach();
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
    events as f64 / started.elapsed().as_secs_f64()
}

async fn route(kafka: &KafkaConfig, workflow: &Workflow, events: usize) -> f64 {
    let router = Router::new(
        RouterConfig::new(kafka.clone()),
        workflow.engine(),
        RouterMetrics::new().unwrap(),
    )
    .unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let handle = tokio::spawn(router.run(rx));
    let state = kafka.topics().state();
    let partitions = kafka.partition_count(&state).unwrap() as i64;
    while high_watermarks(kafka, &state) < events as i64 + partitions {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = events as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    handle.await.unwrap().unwrap();
    rate
}

#[tokio::main]
async fn main() {
    let events: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let workflow = Workflow::load(Path::new("agents/customer-service"), None).unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let base = config(&format!("bench-pass-{run}"));
    let routed = config(&format!("bench-route-{run}"));
    base.wait_for_broker(Duration::from_secs(10))
        .expect("start the broker with scripts/start-broker");
    let size = prepare(&base, &workflow, events).await;
    prepare(&routed, &workflow, events).await;
    println!(
        "{events} SUBMITTED events of {size} bytes, {} partitions, broker {}",
        base.partition_count(&base.topics().tasks()).unwrap(),
        base.bootstrap_servers
    );
    let pass = passthrough(&base, events).await;
    println!("(a) bare consume→produce passthrough: {pass:>10.0} events/s");
    let rules = route(&routed, &workflow, events).await;
    println!("(b) router, rule decisions (state event + 2 work items each, effectively-once): {rules:>10.0} events/s");
    println!("ratio router / passthrough: {:.2}", rules / pass);
}

//! Replay speed over recorded history, in one invocation against the local broker: records
//! `BENCH_EVENTS` (default 100,000) decisions by running the router over as many submissions, then
//! times (a) reading the tasks and state topics alone, the baseline, and (b) `replay --verify`
//! over the same topics. Prints events/s for both and their ratio. Run with `scripts/bench-replay`.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::FutureRecord;
use switchyard::envelope::{EventKind, TaskEvent};
use switchyard::kafka::read_topic;
use switchyard::metrics::RouterMetrics;
use switchyard::replay::{replay, Filter};
use switchyard::router::{Router, RouterConfig};
use switchyard::topics::{self, TopicSpecs};
use switchyard::workflow::Workflow;

#[path = "support/env.rs"]
mod env;

#[tokio::main]
async fn main() {
    let events = env::number("BENCH_EVENTS", 100_000);
    let kafka = env::kafka("replay");
    let workflow = Workflow::load(Path::new("agents/customer-service"), None).unwrap();
    let specs = TopicSpecs::load(Path::new("topics/switchyard.yaml")).unwrap();
    topics::apply(&kafka, &specs, &workflow.cards)
        .await
        .unwrap();

    let producer = kafka.producer().unwrap();
    let tasks = kafka.topics().tasks();
    for chunk in (0..events).collect::<Vec<_>>().chunks(5_000) {
        let records: Vec<(String, Vec<u8>)> = chunk
            .iter()
            .map(|i| {
                let mut e = TaskEvent::new(format!("replay-{i}"), EventKind::Submitted, "bench");
                e.payload = serde_json::json!({ "customer_message": "where is my order?" });
                (e.task_id.clone(), serde_json::to_vec(&e).unwrap())
            })
            .collect();
        let sends = records.iter().map(|(k, p)| {
            producer.send(
                FutureRecord::to(&tasks).key(k).payload(p),
                Duration::from_secs(30),
            )
        });
        for r in join_all(sends).await {
            r.map_err(|(e, _)| e).unwrap();
        }
    }
    let metrics = RouterMetrics::new().unwrap();
    let router = Router::new(
        RouterConfig::new(kafka.clone()),
        workflow.engine(),
        metrics.clone(),
    )
    .await
    .unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let handle = tokio::spawn(router.run(rx));
    let state = kafka.topics().state();
    let watermarks: BaseConsumer = kafka.client_config().create().unwrap();
    let partitions = kafka.partition_count(&state).unwrap();
    let written =
        || switchyard::kafka::high_watermark_sum(&watermarks, &state, partitions).unwrap();
    // Each event is counted once its batch's writes are acknowledged.
    while metrics.routing_latency.get_sample_count() < events as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(true);
    handle.await.unwrap().unwrap();
    println!(
        "recorded {events} decisions ({} state records) on {}",
        written(),
        kafka.bootstrap_servers
    );

    let started = Instant::now();
    let mut bytes = 0usize;
    for topic in [&tasks, &state] {
        read_topic(&kafka, topic, None, |m| bytes += m.payload_len()).unwrap();
    }
    let read = events as f64 / started.elapsed().as_secs_f64();
    println!(
        "(a) read the tasks and state topics:       {read:>10.0} events/s ({} MB)",
        bytes / 1_000_000
    );
    let started = Instant::now();
    let report = replay(
        &kafka,
        &switchyard::codec::Codec::Json,
        &workflow.engine(),
        &Filter::default(),
        |_| {},
    )
    .await
    .unwrap();
    let replayed = events as f64 / started.elapsed().as_secs_f64();
    assert!(report.divergences.is_empty());
    println!("(b) replay --verify (decode, decide, compare): {replayed:>10.0} events/s ({} decisions checked)", report.checked);
    println!("ratio replay / read: {:.2}", replayed / read);
}

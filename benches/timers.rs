//! Timer benchmark, in one invocation (run with `scripts/bench-timers`):
//!
//! (1) in process, no Kafka: 100,000 tasks each waiting for a step that times out (one pending
//!     timer per task) built through the partition's per-event step; the heap they take per
//!     pending timer (a counting allocator); the cost of one tick's scan that finds nothing due;
//!     the rate at which the partition step fires them once all are due (decide + fold).
//! (2) against the broker on 127.0.0.1:9092: the router restarted after `BENCH_TIMERS` step
//!     timeouts fell due while no router ran, firing them all (a state record each), against
//!     a bare producer writing as many records of the same size; both timed from the first
//!     record made (a firing's `at`, the first send) to the last one's arrival at a consumer,
//!     this machine's clock throughout; alternated twice, with their ratio.
//!
//! `BENCH_PENDING` sets the count of (1) (default 100,000), `BENCH_TIMERS` that of (2) (default
//! 20,000). Start from a fresh broker: a long-lived one slows down as topics accumulate.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use switchyard::envelope::{now_ms, EventKind, TaskEvent};
use switchyard::kafka::KafkaConfig;
use switchyard::router::{Engine, Partition, Position, Raw};
use switchyard::state::PartitionState;
use switchyard::state_record;
use switchyard::topics::{self, TopicSpecs};
use switchyard::workflow::Workflow;

#[path = "support/env.rs"]
mod env;
#[path = "support/heap.rs"]
mod heap;
#[path = "support/router.rs"]
mod router;

/// `mute` never answers and times out after 1 s; a timed-out task completes by rule.
fn workflow(dir: &Path) -> Workflow {
    std::fs::create_dir_all(dir.join("cards")).unwrap();
    let card = "name: mute\ntimeout: 1s\nretry: {max_attempts: 1}\nruntime: {kind: handler}\n";
    std::fs::write(dir.join("cards/mute.yaml"), card).unwrap();
    let rules = "rules:
  - { id: start, when: { kind: SUBMITTED }, then: { route: [mute] } }
  - { id: gave_up, when: { kind: TIMED_OUT }, then: complete }
  - { id: done, when: { source: mute }, then: complete }
";
    std::fs::write(dir.join("rules.yaml"), rules).unwrap();
    Workflow::load(dir, None).unwrap()
}

fn submission(i: usize) -> TaskEvent {
    let mut e = TaskEvent::new(format!("timer-{i:06}"), EventKind::Submitted, "bench");
    e.payload = serde_json::json!({ "customer_message": "where is my order? it should have arrived by now" });
    e
}

/// The per-event step of `state` at `now`.
fn partition<'a>(engine: &'a Engine, state: &'a mut PartitionState, now: i64) -> Partition<'a> {
    Partition {
        engine,
        state,
        instance: "bench",
        now,
        keep_undo: false,
        trace: None,
    }
}

/// Returns the size of a firing record as the router writes it.
fn in_process(workflow: &Workflow, pending: usize) -> usize {
    let engine = workflow.engine();
    let events: Vec<(TaskEvent, Vec<u8>)> = (0..pending)
        .map(|i| {
            let e = submission(i);
            let bytes = serde_json::to_vec(&e).unwrap();
            (e, bytes)
        })
        .collect();
    let before = heap::in_use();
    let mut state = PartitionState::default();
    for (offset, (event, bytes)) in events.iter().enumerate() {
        let at = Position {
            topic: "tasks",
            partition: 0,
            offset: offset as i64,
        };
        let raw = Raw::new(Some(bytes), None);
        partition(&engine, &mut state, 0).decide(at, raw, Ok(event.clone()));
    }
    let held = heap::in_use() - before;
    let timers: usize = state.tasks.values().map(|t| engine.timers(t).len()).sum();
    assert_eq!(timers, pending);
    println!(
        "(1) {pending} pending step timeouts ({} bytes of input each), in process:",
        events[0].1.len()
    );
    println!(
        "    memory: {:.1} MiB of state, {} bytes per pending timer (the task's state: input copy, step, ids)",
        held as f64 / (1 << 20) as f64,
        held / pending as isize
    );
    let scans = 20;
    let started = Instant::now();
    for _ in 0..scans {
        assert!(partition(&engine, &mut state, 500).due().is_empty());
    }
    let scan = started.elapsed().as_secs_f64() / f64::from(scans);
    println!(
        "    one tick's scan finding nothing due: {:.1} ms",
        scan * 1000.0
    );
    let started = Instant::now();
    let due = partition(&engine, &mut state, 1_000).due();
    let mut fired = 0;
    let mut size = 0;
    for (task, firing) in due {
        if let Some(step) = partition(&engine, &mut state, 1_000).fire(&task, firing) {
            fired += 1;
            size = serde_json::to_vec(&step.record).unwrap().len();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(fired, pending);
    assert!(state.tasks.is_empty());
    println!(
        "    fired (scan, decide, fold): {:>10.0} timers/s",
        fired as f64 / seconds
    );
    size
}

fn kafka(bootstrap: &str, prefix: String) -> KafkaConfig {
    KafkaConfig {
        bootstrap_servers: bootstrap.into(),
        topic_prefix: prefix,
        options: Default::default(),
    }
}

/// A consumer of `kafka`'s state topic from its current end.
fn from_end(kafka: &KafkaConfig) -> StreamConsumer {
    let state = kafka.topics().state();
    let mut config = kafka.client_config();
    config
        .set("group.id", format!("{}.bench", kafka.topic_prefix))
        .set("enable.auto.commit", "false");
    let consumer: StreamConsumer = config.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..kafka.partition_count(&state).unwrap() {
        tpl.add_partition_offset(&state, p, Offset::End).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    consumer
}

/// Reads `consumer` until `count` items have arrived, `items` saying what a record holds (a
/// value for each); returns when the last arrived (ms since the Unix epoch, this machine's
/// clock) and the items' values.
async fn arrivals(
    consumer: &StreamConsumer,
    count: usize,
    items: impl Fn(&[u8]) -> Vec<i64>,
) -> (i64, Vec<i64>) {
    let mut seen = Vec::with_capacity(count);
    while seen.len() < count {
        let message = consumer.recv().await.unwrap();
        seen.extend(items(message.payload().unwrap_or_default()));
    }
    (now_ms(), seen)
}

/// Timers/s of a router restarted after `timers` step timeouts fell due: from the first firing
/// (its record's `at`) to the last firing record's arrival at a consumer.
async fn fire_after_restart(kafka: &KafkaConfig, workflow: &Workflow, timers: usize) -> f64 {
    let specs = TopicSpecs::load(Path::new("topics/switchyard.yaml")).unwrap();
    topics::apply(kafka, &specs, &workflow.cards).await.unwrap();
    let producer = kafka.producer().unwrap();
    let topic = kafka.topics().tasks();
    let submissions: Vec<TaskEvent> = (0..timers).map(submission).collect();
    for chunk in submissions.chunks(5_000) {
        let sends = chunk.iter().map(|e| {
            let bytes = serde_json::to_vec(e).unwrap();
            let producer = producer.clone();
            let topic = topic.clone();
            async move {
                let record = FutureRecord::to(&topic).key(&e.task_id).payload(&bytes);
                producer.send(record, Duration::from_secs(30)).await
            }
        });
        for sent in join_all(sends).await {
            sent.map_err(|(e, _)| e).unwrap();
        }
    }
    let first = router::Running::start(kafka, workflow).await;
    while first.metrics.routing_latency.get_sample_count() < timers as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.stop().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let consumer = from_end(kafka);
    let restarted = router::Running::start(kafka, workflow).await;
    let firings = |v: &[u8]| {
        let events = state_record::decode(v).unwrap_or_default();
        events
            .iter()
            .filter(|e| e.timer.is_some())
            .map(|e| e.at)
            .collect()
    };
    let (last, at) = arrivals(&consumer, timers, firings).await;
    let first = at.into_iter().min().unwrap();
    restarted.stop().await;
    timers as f64 * 1000.0 / (last - first).max(1) as f64
}

/// Records/s of a bare producer writing `count` records of `size` bytes to a fresh topic: from
/// the first send to the last record's arrival at a consumer.
async fn produce(kafka: &KafkaConfig, workflow: &Workflow, count: usize, size: usize) -> f64 {
    let specs = TopicSpecs::load(Path::new("topics/switchyard.yaml")).unwrap();
    topics::apply(kafka, &specs, &workflow.cards).await.unwrap();
    let producer = kafka.producer().unwrap();
    let topic = kafka.topics().state();
    let value = vec![b'x'; size];
    let keys: Vec<String> = (0..count).map(|i| format!("timer-{i:06}")).collect();
    // Connected and with the topic's metadata, as the router's producer is when timers fire.
    let warm = FutureRecord::to(&topic).key("warm").payload(b"warm");
    producer
        .send(warm, Duration::from_secs(60))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let consumer = from_end(kafka);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = now_ms();
    let writer = tokio::spawn(async move {
        let sends = keys.iter().map(|key| {
            producer.send(
                FutureRecord::to(&topic).key(key).payload(&value),
                Duration::from_secs(60),
            )
        });
        for sent in join_all(sends).await {
            sent.map_err(|(e, _)| e).unwrap();
        }
    });
    let (last, _) = arrivals(&consumer, count, |_| vec![0]).await;
    writer.await.unwrap();
    count as f64 * 1000.0 / (last - first).max(1) as f64
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let workflow = workflow(dir.path());
    let size = in_process(&workflow, env::number("BENCH_PENDING", 100_000));

    let timers = env::number("BENCH_TIMERS", 20_000);
    let bootstrap =
        std::env::var("SWITCHYARD_TEST_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    kafka(&bootstrap, "probe".into())
        .wait_for_broker(Duration::from_secs(10))
        .expect("start the broker with scripts/start-broker");
    println!("(2) {timers} step timeouts due at once after a restart, broker at {bootstrap}:");
    let mut ratios = Vec::new();
    for round in 1..=2 {
        let base = produce(
            &kafka(&bootstrap, format!("bench-produce-{run}-{round}")),
            &workflow,
            timers,
            size,
        )
        .await;
        let fired = fire_after_restart(
            &kafka(&bootstrap, format!("bench-timers-{run}-{round}")),
            &workflow,
            timers,
        )
        .await;
        println!("    round {round}: bare producer, {size}-byte records {base:>10.0} records/s; router firing {fired:>10.0} timers/s; ratio {:.2}", fired / base);
        ratios.push(fired / base);
    }
    println!(
        "ratio router firing / bare producer: {:.2} (mean of {})",
        ratios.iter().sum::<f64>() / ratios.len() as f64,
        ratios.len()
    );
}

//! Console benchmark (run with `scripts/bench-console`, on a fresh broker): the state history of
//! `BENCH_TASKS` tasks (default 100,000; three records each: submitted and routed, a result, and
//! the end: completed for most, escalated or dead-lettered for some), across 5 tenants and the
//! example workflow's cards. Times a bare read of the state topic (the baseline) and the console
//! indexing it from nothing, alternated twice with the ratio, then the Tasks page with filters
//! (`BENCH_REQUESTS` requests per filter, default 100): p50 and p95 per filter and overall.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::producer::FutureRecord;
use switchyard::codec::Codec;
use switchyard::console::index::Index;
use switchyard::console::{self, ConsoleConfig};
use switchyard::envelope::{
    now_ms, DecidedBy, Decision, EventKind, InputRef, StateEvent, Step, TaskEvent,
};
use switchyard::kafka::{read_topic, KafkaConfig};
use switchyard::topics::{self, TopicSpecs};
use switchyard::workflow::Workflow;

#[path = "support/env.rs"]
mod env;

const CARDS: [&str; 6] = [
    "sentiment_analyzer",
    "intent_classifier",
    "knowledge_retriever",
    "response_generator",
    "quality_controller",
    "message_sender",
];

/// The three state records of task `i`.
fn history(kafka: &KafkaConfig, i: usize, at: i64) -> [StateEvent; 3] {
    let id = format!("task-{i:06}");
    let tenant = format!("tenant-{}", i % 5);
    let card = CARDS[i % CARDS.len()];
    let input = |offset| InputRef {
        event_id: None,
        topic: kafka.topics().tasks(),
        partition: 0,
        offset,
        size: Some(200),
        sha256: None,
    };
    let event = |kind, source: &str| {
        let mut e = TaskEvent::new(&id, kind, source);
        e.tenant = tenant.clone();
        e.payload = serde_json::json!({ "customer_message": format!("where is order {i}?") });
        e
    };
    let routed = Decision::Routed {
        steps: vec![Step::new(1, card, 1)],
        decided_by: DecidedBy::Rule {
            rule_id: "analyse".into(),
        },
    };
    let end = match i % 20 {
        0 => Decision::Escalated {
            step: Step::new(2, "human_agent", 1),
            rule_id: "not-confident".into(),
        },
        1 => Decision::DeadLettered {
            reason: "agent_failed".into(),
            message: "bench".into(),
            ends_task: true,
        },
        _ => Decision::Completed {
            rule_id: "sent".into(),
        },
    };
    let mut result = event(EventKind::Result, card);
    result.step_id = Some(1);
    let record = |seq, decision, event: TaskEvent, offset| StateEvent {
        input: Some(input(offset)),
        answers_step: event.step_id,
        event: Some(event),
        ..StateEvent::new(&id, seq, (0, "bench"), decision, at + seq as i64)
    };
    [
        record(1, routed, event(EventKind::Submitted, "client"), -1),
        record(2, Decision::Recorded, result.clone(), -1),
        record(3, end, result, -1),
    ]
}

async fn write(kafka: &KafkaConfig, tasks: usize) {
    let producer = kafka.producer().unwrap();
    let state = kafka.topics().state();
    let at = now_ms() - 30 * 60_000;
    for chunk in (0..tasks).collect::<Vec<_>>().chunks(5_000) {
        let records: Vec<(String, Vec<u8>)> = chunk
            .iter()
            .flat_map(|i| history(kafka, *i, at + *i as i64))
            .map(|r| (r.task_id.clone(), serde_json::to_vec(&r).unwrap()))
            .collect();
        let sends = records.iter().map(|(key, value)| {
            let record = FutureRecord::to(&state).key(key).payload(value);
            producer.send(record, Duration::from_secs(60))
        });
        for sent in join_all(sends).await {
            sent.map_err(|(e, _)| e).unwrap();
        }
    }
}

/// Seconds to read the whole state topic without doing anything with it.
fn bare_read(kafka: &KafkaConfig) -> (f64, usize) {
    let started = Instant::now();
    let mut n = 0;
    read_topic(kafka, &kafka.topics().state(), None, |_| n += 1).unwrap();
    (started.elapsed().as_secs_f64(), n)
}

/// Seconds for a console with an empty index to index `records` state records.
async fn index_all(
    kafka: &KafkaConfig,
    workflow: &Workflow,
    records: usize,
) -> (f64, Index, console::Running, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let running = console::serve(ConsoleConfig {
        kafka: kafka.clone(),
        codec: Codec::Json,
        workflow: workflow.clone(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: data.path().to_path_buf(),
        token: None,
        max_redrives: 3,
    })
    .await
    .unwrap();
    let index = Index::open(&data.path().join("index.sqlite")).unwrap();
    loop {
        if index.counts().unwrap().1 as usize >= records {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (started.elapsed().as_secs_f64(), index, running, data)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let (tasks, requests) = (
        env::number("BENCH_TASKS", 100_000),
        env::number("BENCH_REQUESTS", 100),
    );
    let kafka = env::kafka("console");
    let workflow = Workflow::load(Path::new("agents/customer-service"), None).unwrap();
    let specs = TopicSpecs::load(Path::new("topics/switchyard.yaml")).unwrap();
    topics::apply(&kafka, &specs, &workflow.cards)
        .await
        .unwrap();
    let written = Instant::now();
    write(&kafka, tasks).await;
    let records = tasks * 3;
    println!(
        "{tasks} tasks, {records} state records written in {:.1}s",
        written.elapsed().as_secs_f64()
    );

    let mut last = None;
    for run in 1..=2 {
        let (bare, read) = bare_read(&kafka);
        let (indexed, index, running, data) = index_all(&kafka, &workflow, records).await;
        println!(
            "run {run}: bare read {read} records in {bare:.2}s ({:.0}/s); console indexed {records} in {indexed:.2}s ({:.0} records/s, {:.0} tasks/s); ratio {:.2}",
            read as f64 / bare,
            records as f64 / indexed,
            tasks as f64 / indexed,
            bare / indexed
        );
        assert_eq!(index.counts().unwrap(), (tasks as i64, records as i64));
        if let Some((old, _, _)) = last.replace((running, data, index)) {
            let old: console::Running = old;
            old.stop();
        }
    }
    let (running, _data, _index) = last.unwrap();
    let filters = [
        "",
        "status=completed",
        "status=escalated",
        "card=message_sender",
        "tenant=tenant-3",
        "q=12345",
        "max_age_minutes=60&status=dead_lettered",
        "tenant=tenant-1&status=completed&page=40",
    ];
    let client = reqwest::Client::new();
    let mut all = Vec::new();
    for filter in filters {
        let url = format!("http://{}/tasks?{filter}", running.addr);
        let mut times = Vec::new();
        for _ in 0..requests {
            let started = Instant::now();
            let answer = client.get(&url).send().await.unwrap();
            assert!(answer.status().is_success());
            let body = answer.text().await.unwrap();
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            assert!(body.contains("id=\"tasks\""));
        }
        times.sort_by(f64::total_cmp);
        println!(
            "Tasks page ?{filter:<42} p50 {:6.1} ms  p95 {:6.1} ms",
            percentile(&times, 0.5),
            percentile(&times, 0.95)
        );
        all.extend(times);
    }
    all.sort_by(f64::total_cmp);
    println!(
        "Tasks page, all filters: p50 {:.1} ms, p95 {:.1} ms (goal: p95 < 200 ms)",
        percentile(&all, 0.5),
        percentile(&all, 0.95)
    );
    running.stop();
}

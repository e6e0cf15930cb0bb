//! Restore benchmark (run with `scripts/bench-restore`, on a fresh broker): a state partition
//! holding `BENCH_FINISHED` finished tasks (default 1,000,000) and `BENCH_OPEN` open ones (default
//! 10,000), written as the router records a backlog's decisions (a batch's decisions share
//! records). A first router takes the partition over with snapshots off (a full fold), decides one
//! task and writes a snapshot; then `BENCH_TAIL` more finished tasks (default 50,000, the default
//! snapshot interval in decisions: the most a restore reads after a snapshot) are recorded, and a
//! second router takes over from the snapshot.
//! Prints both restores' time and records read, the snapshot's size, and the heap an open task
//! takes once restored (a counting allocator over the same fold in process).

use std::path::Path;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::producer::{FutureProducer, FutureRecord};
use switchyard::commit::Outgoing;
use switchyard::envelope::{
    now_ms, DecidedBy, Decision, EventKind, InputRef, StateEvent, Step, TaskEvent,
};
use switchyard::kafka::KafkaConfig;
use switchyard::router::service::DEFAULT_MAX_BATCH;
use switchyard::router::snapshot::SnapshotConfig;
use switchyard::rules::DEFAULT_MAX_EVENT_BYTES;
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

/// The state record of task `i`: a submission completed at once (`open`: routed to a card).
fn record(kafka: &KafkaConfig, i: usize, open: bool) -> StateEvent {
    record_at(kafka, i, open, 0)
}

/// [`record`], by the owner of epoch `epoch`.
fn record_at(kafka: &KafkaConfig, i: usize, open: bool, epoch: i64) -> StateEvent {
    let id = if open {
        format!("open-{i}")
    } else {
        format!("done-{i}")
    };
    let mut event = TaskEvent::new(&id, EventKind::Submitted, "bench");
    event.payload = serde_json::json!({ "customer_message": "where is my order? it should have arrived by now" });
    let decision = match open {
        true => Decision::Routed {
            steps: vec![Step::new(1, "sentiment_analyzer", 1)],
            decided_by: DecidedBy::Rule {
                rule_id: "analyse".into(),
            },
        },
        false => Decision::Completed {
            rule_id: "bench".into(),
        },
    };
    StateEvent {
        input: Some(InputRef {
            event_id: Some(event.event_id.clone()),
            topic: kafka.topics().tasks(),
            partition: 0,
            // The tasks topic is empty: the records claim no position in it, so the router
            // decides the one task the benchmark publishes there.
            offset: -1,
            size: Some(200),
            sha256: None,
        }),
        event: Some(event),
        ..StateEvent::new(id, 1, (epoch, "bench"), decision, now_ms())
    }
}

#[tokio::main]
async fn main() {
    let (finished, open) = (
        env::number("BENCH_FINISHED", 1_000_000),
        env::number("BENCH_OPEN", 10_000),
    );
    let kafka = env::kafka("restore");
    let workflow = Workflow::load(Path::new("agents/customer-service"), None).unwrap();
    let mut specs = TopicSpecs::load(Path::new("topics/switchyard.yaml")).unwrap();
    specs.set_partitions(1);
    topics::apply(&kafka, &specs, &workflow.cards)
        .await
        .unwrap();

    // The memory an open task takes: the same fold in process, with and without the open tasks.
    let records: Vec<StateEvent> = std::iter::once(StateEvent::owned("bench", now_ms()))
        .chain((0..finished).map(|i| record(&kafka, i, false)))
        .chain((0..open).map(|i| record(&kafka, finished + i, true)))
        .collect();
    let heap = |with_open: bool| {
        let before = heap::in_use();
        let mut state = PartitionState::default();
        for (offset, r) in records.iter().enumerate() {
            if with_open || !r.task_id.starts_with("open-") {
                state.restore(r, offset as i64);
            }
        }
        let held = heap::in_use() - before;
        drop(state);
        held
    };
    let (all, done_only) = (heap(true), heap(false));
    let per_open = (all - done_only) / open.max(1) as isize;

    let producer = kafka.producer().unwrap();
    let written = Instant::now();
    let written_records = write_records(&kafka, &producer, &records).await;
    println!(
        "{finished} finished and {open} open tasks on one state partition ({} decisions in {written_records} records, written in {:.1}s)",
        records.len(),
        written.elapsed().as_secs_f64()
    );

    // A full fold; then one decision, after which this router writes a snapshot.
    let snapshot_at_once = SnapshotConfig {
        every_records: 1,
        interval: Duration::ZERO,
        ..SnapshotConfig::default()
    };
    let first =
        router::Running::start_with(&kafka, &workflow, |c| c.snapshots = snapshot_at_once).await;
    first.restored().await;
    let full_seconds = first.metrics.restore_seconds.get_sample_sum();
    let full_read = first.metrics.restore_records.get();
    // The first router's ownership record follows the records written.
    let epoch = written_records as i64;
    let mut trigger = TaskEvent::new("trigger", EventKind::Submitted, "bench");
    trigger.payload = serde_json::json!({ "customer_message": "hello" });
    let value = serde_json::to_vec(&trigger).unwrap();
    producer
        .send(
            FutureRecord::to(&kafka.topics().tasks())
                .partition(0)
                .key("trigger")
                .payload(&value),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let written_snapshots = || {
        first
            .metrics
            .snapshots
            .with_label_values(&["written"])
            .get()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while written_snapshots() == 0 {
        assert!(
            Instant::now() < deadline,
            "the first router wrote no snapshot in 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let snapshot_bytes = first.metrics.snapshot_bytes.get_sample_sum();
    first.stop().await;

    let tail: Vec<StateEvent> = (0..env::number("BENCH_TAIL", 50_000))
        .map(|i| record_at(&kafka, finished + open + i, false, epoch))
        .collect();
    write_records(&kafka, &producer, &tail).await;
    let second = router::Running::start(&kafka, &workflow).await;
    second.restored().await;
    let snap_seconds = second.metrics.restore_seconds.get_sample_sum();
    let snap_read = second.metrics.restore_records.get();
    let skipped: u64 = [
        "incomplete",
        "checksum",
        "unknown_version",
        "unreadable",
        "body",
        "fenced",
    ]
    .iter()
    .map(|r| {
        second
            .metrics
            .snapshots_skipped
            .with_label_values(&[r])
            .get()
    })
    .sum();
    assert_eq!(skipped, 0, "the snapshot was usable");
    second.stop().await;

    println!(
        "restore without a snapshot (a full fold): {full_seconds:.2}s, {full_read} state records read ({} decisions, {:.0} decisions/s)",
        records.len(),
        records.len() as f64 / full_seconds
    );
    println!(
        "restore with a snapshot ({:.1} MiB) and {} decisions after it: {snap_seconds:.2}s, {snap_read} state records read; {:.1}x faster",
        snapshot_bytes / (1 << 20) as f64,
        tail.len(),
        full_seconds / snap_seconds
    );
    println!(
        "heap per open task once restored: {per_open} bytes (the 100,000 remembered finished tasks take {:.1} MiB)",
        done_only as f64 / (1 << 20) as f64
    );
}

/// Writes `records` to state partition 0 as the router writes a backlog's decisions: an
/// ownership record alone, the others a batch of [`DEFAULT_MAX_BATCH`] at a time, as few records
/// as the default `max_event_bytes` allows ([`state_record::Records`], as the router does).
/// Returns how many records it wrote.
async fn write_records(
    kafka: &KafkaConfig,
    producer: &FutureProducer,
    records: &[StateEvent],
) -> usize {
    let state = kafka.topics().state();
    let one = |r: &StateEvent| Outgoing::json(state.clone(), Some(0), &r.task_id, r);
    let owned = |r: &StateEvent| matches!(r.decision, Decision::Owned { .. });
    let lone = records.iter().take_while(|r| owned(r)).count();
    let outgoing: Vec<Outgoing> = records[..lone]
        .iter()
        .map(one)
        .chain(records[lone..].chunks(DEFAULT_MAX_BATCH).flat_map(|batch| {
            let mut together = state_record::Records::new(DEFAULT_MAX_EVENT_BYTES);
            for r in batch {
                together.push(0, r.clone(), None);
            }
            together.finish(&state).records
        }))
        .collect();
    for chunk in outgoing.chunks(100) {
        let sends = chunk.iter().map(|r| {
            let record = FutureRecord::to(&r.topic)
                .partition(0)
                .key(&r.key)
                .payload(r.payload.as_deref().unwrap_or_default());
            producer.send(record, Duration::from_secs(60))
        });
        for sent in join_all(sends).await {
            sent.map_err(|(e, _)| e).unwrap();
        }
    }
    outgoing.len()
}

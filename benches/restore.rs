//! Restore benchmark (run with `scripts/bench-restore`, on a fresh broker): a state partition
//! holding `BENCH_FINISHED` finished tasks (default 1,000,000) and `BENCH_OPEN` open ones (default
//! 10,000), written as the router records them; then a router takes the partition over. Prints
//! the restore time, the records read and their rate, and the heap an open task takes once
//! restored (a counting allocator over the same fold in process). Restore is a full fold of the
//! partition: snapshots are not built yet (issue #9), so there is no "with a snapshot" column.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::producer::FutureRecord;
use switchyard::envelope::{
    now_ms, DecidedBy, Decision, EventKind, InputRef, StateEvent, Step, TaskEvent,
};
use switchyard::kafka::KafkaConfig;
use switchyard::state::PartitionState;
use switchyard::topics::{self, TopicSpecs};
use switchyard::workflow::Workflow;

#[path = "support/heap.rs"]
mod heap;
#[path = "support/router.rs"]
mod router;

/// The state record of task `i`: a submission completed at once (`open`: routed to a card).
fn record(kafka: &KafkaConfig, i: usize, open: bool) -> StateEvent {
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
            offset: i as i64,
            size: Some(200),
            sha256: None,
        }),
        event: Some(event),
        ..StateEvent::new(id, 1, (0, "bench"), decision, now_ms())
    }
}

#[tokio::main]
async fn main() {
    let number = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (finished, open) = (
        number("BENCH_FINISHED", 1_000_000),
        number("BENCH_OPEN", 10_000),
    );
    let kafka = KafkaConfig {
        bootstrap_servers: std::env::var("SWITCHYARD_TEST_BOOTSTRAP")
            .unwrap_or_else(|_| "127.0.0.1:9092".into()),
        topic_prefix: format!(
            "bench-restore-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
        options: Default::default(),
    };
    kafka
        .wait_for_broker(Duration::from_secs(10))
        .expect("start the broker with scripts/start-broker");
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
    let state = kafka.topics().state();
    let written = Instant::now();
    for chunk in records.chunks(20_000) {
        let sends = chunk.iter().map(|r| {
            let value = serde_json::to_vec(r).unwrap();
            let producer = producer.clone();
            let state = state.clone();
            async move {
                let record = FutureRecord::to(&state)
                    .partition(0)
                    .key(&r.task_id)
                    .payload(&value);
                producer.send(record, Duration::from_secs(60)).await
            }
        });
        for sent in join_all(sends).await {
            sent.map_err(|(e, _)| e).unwrap();
        }
    }
    println!(
        "{finished} finished and {open} open tasks on one state partition ({} records, written in {:.1}s)",
        records.len(),
        written.elapsed().as_secs_f64()
    );

    let router = router::Running::start(&kafka, &workflow).await;
    router.restored().await;
    let seconds = router.metrics.restore_seconds.get_sample_sum();
    let read = records.len() + 1;
    println!(
        "restore without a snapshot (a full fold): {seconds:.2}s, {read} records read, {:.0} records/s",
        read as f64 / seconds
    );
    println!("restore with a snapshot: not built yet (issue #9)");
    println!(
        "heap per open task once restored: {per_open} bytes (the 100,000 remembered finished tasks take {:.1} MiB)",
        done_only as f64 / (1 << 20) as f64
    );
    router.stop().await;
}

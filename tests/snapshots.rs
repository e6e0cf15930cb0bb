//! Snapshots: a restore starts from the newest usable snapshot of a partition, and snapshots
//! that are incomplete, corrupt, of an unknown version or written by an instance that did not own
//! the partition are skipped with a warning; under SIGKILLs, some of them while a snapshot is
//! being written, nothing is lost or decided twice.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use switchyard::kafka::{self, KafkaConfig};
use switchyard::router::snapshot::store::Store;
use switchyard::router::snapshot::{self, Header, SnapshotConfig};
use switchyard::state::PartitionState;
use switchyard::state_record;

const TASKS: usize = 2_000;
const KILLS: usize = 3;

/// Every snapshot record's header, with the offset and partition it was read at.
fn snapshot_headers(kafka: &KafkaConfig) -> Vec<(i32, i64, Header)> {
    read_all(kafka, &kafka.topics().snapshots())
        .iter()
        .filter_map(|m| {
            let (header, _) = snapshot::split(m.payload()?).ok()?;
            Some((m.partition(), m.offset(), header))
        })
        .collect()
}

/// Snapshots of which some chunk never arrived: (partition, covers).
fn incomplete_snapshots(kafka: &KafkaConfig) -> Vec<(i32, i64)> {
    let mut chunks: BTreeMap<(i32, i64, String), (u32, BTreeSet<u32>)> = BTreeMap::new();
    for (p, _, h) in snapshot_headers(kafka) {
        let entry = chunks.entry((p, h.covers, h.instance)).or_default();
        entry.0 = h.chunks;
        entry.1.insert(h.chunk);
    }
    chunks
        .into_iter()
        .filter(|(_, (n, seen))| seen.len() < *n as usize)
        .map(|((p, covers, _), _)| (p, covers))
        .collect()
}

fn log_of(kafka: &KafkaConfig, n: usize) -> String {
    let path = std::env::temp_dir().join(format!("{}-router-{n}.log", kafka.topic_prefix));
    std::fs::read_to_string(path).unwrap_or_default()
}

/// How many snapshots the router's log shows started, and whether one of them has not ended.
fn snapshots_begun(log: &str) -> (usize, bool) {
    let started = log.matches("writing snapshot").count();
    let ended =
        log.matches("snapshot written").count() + log.matches("snapshot not written").count();
    (started, started > ended)
}

/// Returns once router run `n` is writing a snapshot of which at least one chunk is on the
/// topic: a kill then leaves that snapshot incomplete (a kill before its first chunk, during the
/// owner check or the encoding, leaves nothing of it to see).
async fn mid_snapshot(kafka: &KafkaConfig, n: usize) {
    let reader = reader_in(kafka, "switchyard-test-reader");
    let topic = kafka.topics().snapshots();
    let partitions = kafka.partition_count(&topic).unwrap();
    let topic_end = || kafka::high_watermark_sum(&reader, &topic, partitions).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // The snapshot seen started (by its count of "writing snapshot" lines) and the topic's end
    // when it was.
    let mut seen: Option<(usize, i64)> = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "router run {n} wrote no chunk of a snapshot in 60s (see {}-router-{n}.log)",
            kafka.topic_prefix
        );
        let (started, writing) = snapshots_begun(&log_of(kafka, n));
        let end = topic_end();
        match seen {
            _ if !writing => seen = None,
            Some((same, before)) if same == started && end > before => {
                // Still that snapshot, after its chunk landed.
                if snapshots_begun(&log_of(kafka, n)) == (same, true) {
                    return;
                }
            }
            Some((same, _)) if same == started => {}
            _ => seen = Some((started, end)),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkills_while_snapshots_are_written_lose_and_duplicate_nothing() {
    let kafka = kafka("snapcrash");
    let dir = example_with_timeout("10m");
    let workflow = setup(&kafka, dir.path()).await;
    let agents = RunningAgents::example(&kafka, &workflow, |_| {});
    let humans = RunningAgents::start(&kafka, &workflow, &["human_agent"], |_| {
        Human(kafka.clone())
    });
    // Small chunks: a snapshot takes hundreds of records, written one after the other, so a
    // kill lands in the middle of one.
    let args = [
        "--max-batch",
        "50",
        "--snapshot-every-records",
        "200",
        "--snapshot-chunk-bytes",
        "2048",
    ];
    run_tasks_through_sigkills(&kafka, dir.path(), &args, TASKS, KILLS, |kill| {
        let kafka = kafka.clone();
        async move { mid_snapshot(&kafka, kill - 1).await }
    })
    .await;
    agents.stop().await;
    humans.stop().await;

    let incomplete = incomplete_snapshots(&kafka);
    assert!(
        !incomplete.is_empty(),
        "at least one kill landed while a snapshot was being written (some snapshot lacks chunks)"
    );
    let from_snapshot = (1..=KILLS)
        .filter(|n| log_of(&kafka, *n).contains("restoring from snapshot"))
        .count();
    assert!(
        from_snapshot >= 1,
        "the restarted routers restored from snapshots (see {}-router-N.log)",
        kafka.topic_prefix
    );
    assert_each_step_decided_once(&state_events(&kafka), TASKS);
}

/// The fold of state partition `p` from its first record up to and including `to`.
fn full_fold(kafka: &KafkaConfig, p: i32, to: i64) -> PartitionState {
    let mut state = PartitionState::default();
    for m in read_all(kafka, &kafka.topics().state()) {
        if m.partition() == p && m.offset() <= to {
            for record in state_record::decode(m.payload().unwrap()).unwrap() {
                state.restore(&record, m.offset());
            }
        }
    }
    state
}

async fn publish_tasks(kafka: &KafkaConfig, ids: std::ops::Range<usize>) {
    let tasks: Vec<_> = ids
        .map(|i| submission(&format!("task-{i}"), "where is my order"))
        .collect();
    futures::future::join_all(tasks.iter().map(|s| publish(kafka, s))).await;
}

async fn write_snapshot_record(kafka: &KafkaConfig, p: i32, key: &str, value: &[u8]) {
    let producer = kafka.producer().unwrap();
    producer
        .send(
            FutureRecord::to(&kafka.topics().snapshots())
                .partition(p)
                .key(key)
                .payload(value),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

/// A snapshot record's value with its header changed by `edit`.
fn edited(value: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let newline = value.iter().position(|b| *b == b'\n').unwrap();
    let mut header: serde_json::Value = serde_json::from_slice(&value[..newline]).unwrap();
    edit(&mut header);
    let mut out = serde_json::to_vec(&header).unwrap();
    out.extend_from_slice(&value[newline..]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_unknown_and_foreign_snapshots_are_skipped_and_the_restore_is_still_right() {
    let kafka = kafka("snapskip");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let agents = RunningAgents::example(&kafka, &workflow, |_| {});
    let humans = RunningAgents::start(&kafka, &workflow, &["human_agent"], |_| {
        Human(kafka.clone())
    });
    let snapshots = SnapshotConfig {
        every_records: 50,
        ..SnapshotConfig::default()
    };
    let router =
        RunningRouter::start_with(&kafka, &workflow, |c| c.snapshots = snapshots.clone()).await;
    publish_tasks(&kafka, 0..100).await;
    eventually(Duration::from_secs(120), "100 tasks to finish", || async {
        (completed_tasks(&kafka) >= 100).then_some(())
    })
    .await;
    router.stop().await;
    // Decisions after the newest snapshot, so that forged snapshots can claim to cover more.
    let router = RunningRouter::start_with(&kafka, &workflow, |c| {
        c.snapshots = SnapshotConfig {
            every_records: 0,
            interval: Duration::ZERO,
            ..SnapshotConfig::default()
        }
    })
    .await;
    publish_tasks(&kafka, 100..200).await;
    eventually(Duration::from_secs(120), "200 tasks to finish", || async {
        (completed_tasks(&kafka) >= 200).then_some(())
    })
    .await;
    router.stop().await;

    // The newest whole snapshot of partition 0, forged three ways with newer `covers`: a flipped
    // body byte, a future format version, and a writer that never owned the partition.
    let records = read_all(&kafka, &kafka.topics().snapshots());
    let newest = snapshot_headers(&kafka)
        .into_iter()
        .filter(|(p, _, h)| *p == 0 && h.chunks == 1)
        .max_by_key(|(_, _, h)| h.covers)
        .expect("the router wrote a one-chunk snapshot of partition 0");
    let value = records
        .iter()
        .find(|m| m.partition() == 0 && m.offset() == newest.1)
        .and_then(|m| m.payload())
        .unwrap()
        .to_vec();
    let covers = newest.2.covers;
    let mut corrupt = edited(&value, |h| h["covers"] = (covers + 1).into());
    let last = corrupt.len() - 2;
    corrupt[last] ^= 0x20;
    let future = edited(&value, |h| {
        h["version"] = 99.into();
        h["covers"] = (covers + 2).into();
    });
    let foreign = edited(&value, |h| {
        h["instance"] = "a-stranger".into();
        h["covers"] = (covers + 3).into();
    });
    for (i, forged) in [corrupt, future, foreign].iter().enumerate() {
        let key = snapshot::key(0, covers + 1 + i as i64, 0);
        write_snapshot_record(&kafka, 0, &key, forged).await;
    }

    // A restore below the end of the state partition: the forged ones are skipped, the newest
    // real one is used, and the snapshot plus the records after it fold to the full fold.
    let store = Store::new(&kafka).unwrap();
    let end = read_all(&kafka, &kafka.topics().state())
        .iter()
        .filter(|m| m.partition() == 0)
        .map(|m| m.offset())
        .max()
        .unwrap();
    let loaded = store.load(0, end + 1).await.unwrap();
    let reasons: BTreeSet<&str> = loaded.skipped.iter().map(|s| s.reason).collect();
    assert!(
        ["checksum", "unknown_version", "fenced"]
            .iter()
            .all(|r| reasons.contains(r)),
        "skipped: {:?}",
        loaded.skipped
    );
    let snapshot = loaded.snapshot.expect("the real snapshot is used");
    assert_eq!(snapshot.header.covers, covers);
    let mut restored = snapshot.state;
    for m in read_all(&kafka, &kafka.topics().state()) {
        if m.partition() == 0 && m.offset() > covers {
            for record in state_record::decode(m.payload().unwrap()).unwrap() {
                restored.restore(&record, m.offset());
            }
        }
    }
    assert_eq!(
        restored,
        full_fold(&kafka, 0, end),
        "snapshot + tail == full fold"
    );

    // A router restarted on these topics warns about each and routes on correctly.
    let router = RunningRouter::start_with(&kafka, &workflow, |c| c.snapshots = snapshots).await;
    let metrics = router.metrics.clone();
    eventually(
        Duration::from_secs(60),
        "the restore to skip the forged snapshots",
        || async {
            let skipped = |r: &str| metrics.snapshots_skipped.with_label_values(&[r]).get();
            (skipped("checksum") >= 1 && skipped("unknown_version") >= 1 && skipped("fenced") >= 1)
                .then_some(())
        },
    )
    .await;
    publish_tasks(&kafka, 200..300).await;
    eventually(Duration::from_secs(120), "300 tasks to finish", || async {
        (completed_tasks(&kafka) >= 300).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(60),
        "the restarted router to write a snapshot",
        || async {
            let written = metrics.snapshots.with_label_values(&["written"]).get();
            (written >= 1).then_some(())
        },
    )
    .await;
    assert!(
        metrics.snapshot_seconds.get_sample_count() >= 1,
        "each snapshot's duration is observed"
    );
    router.stop().await;
    agents.stop().await;
    humans.stop().await;
    assert_each_step_decided_once(&state_events(&kafka), 300);
}

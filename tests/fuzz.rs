//! A fuzz test of the whole path: 10,000 hostile records published to the tasks topic of a
//! running router process, interleaved with 200 valid tasks. The router never exits, every
//! record yields exactly one state record, every valid task completes, and every hostile record is
//! dead-lettered (with a dead letter at its position) or dropped with a reason.
//!
//! The hostile records are random bytes, valid events broken by one mutation, sizes at and around
//! every limit (`max_event_bytes` as read and as recorded, the router's record limit that cuts a
//! dead letter to a prefix), answers from the wrong card or to a step that is not a human's,
//! answers for tasks that do not exist, tombstones, empty values, huge keys, invalid UTF-8 and
//! deep nesting. A seed (printed; `FUZZ_SEED` sets it) makes a run repeatable.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::Message;
use serde_json::{json, Value};
use switchyard::dlq::{self, Selection};
use switchyard::envelope::{Decision, EventKind, TaskEvent};

const HOSTILE: usize = 10_000;
const VALID: usize = 200;
/// `max_event_bytes` of the fuzzed rule table.
const MAX_EVENT: usize = 4096;
/// The router's `message.max.bytes`: dead letters over it keep a prefix.
const MAX_RECORD: usize = 65_536;

/// xorshift64*: small, fast, repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One record to publish and what must become of it.
struct Record {
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    headers: Vec<(&'static str, Vec<u8>)>,
    /// `Some(task)`: a task that must complete; `None`: dead-lettered or dropped.
    completes: Option<String>,
}

impl Record {
    fn refused(key: &str, value: Option<Vec<u8>>) -> Self {
        Self {
            key: key.as_bytes().to_vec(),
            value,
            headers: Vec::new(),
            completes: None,
        }
    }
}

fn json_bytes(v: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// A submission whose JSON is exactly `size` bytes.
fn submission_of(task: &str, size: usize) -> Vec<u8> {
    let mut e = submission(task, "");
    let base = json_bytes(&e).len();
    e.payload["customer_message"] = "s".repeat(size - base).into();
    let bytes = json_bytes(&e);
    assert_eq!(bytes.len(), size);
    bytes
}

/// A valid event broken by one mutation that no decoder accepts.
fn mutated(rng: &mut Rng, i: usize) -> Record {
    let mut e = TaskEvent::new(format!("h-{i}"), EventKind::Result, "sentiment_analyzer");
    (e.step_id, e.attempt) = (Some(1), Some(1));
    let mut v: Value = serde_json::to_value(&e).unwrap();
    let o = v.as_object_mut().unwrap();
    match rng.below(11) {
        0 => drop(o.insert("kind".into(), json!(format!("EXPLODE{i}")))),
        1 => drop(o.insert("task_id".into(), json!(i))),
        2 => drop(o.remove("kind")),
        3 => drop(o.insert("step_id".into(), json!(-1))),
        4 => drop(o.insert("step_id".into(), json!("one"))),
        5 => drop(o.insert("attempt".into(), json!(1e20))),
        6 => drop(o.insert("labels".into(), json!(7))),
        7 => drop(o.insert("usage".into(), json!({ "tokens_in": -5 }))),
        8 => drop(o.insert("confidence".into(), json!("high"))),
        9 => drop(o.insert("task_id".into(), json!(""))),
        _ => drop(o.remove("event_id")),
    }
    let mut bytes = json_bytes(&v);
    if rng.below(4) == 0 {
        bytes.truncate(rng.below(bytes.len()));
    }
    Record::refused(&format!("h-{i}"), Some(bytes))
}

fn hostile(rng: &mut Rng, i: usize, max_value: usize) -> Record {
    let key = format!("h-{i}");
    let answer = |task: &str, kind: EventKind, step: u32, source: &str| {
        let mut e = TaskEvent::new(task, kind, source);
        (e.step_id, e.attempt) = (Some(step), Some(1));
        json_bytes(&e)
    };
    let valid = format!("v-{}", rng.below(VALID));
    match i % 16 {
        0 => {
            let n = rng.below(300);
            Record::refused(&key, Some(rng.bytes(n)))
        }
        1 => Record::refused(&key, Some(Vec::new())),
        2 => Record::refused(&key, None),
        3..=5 => mutated(rng, i),
        6 => {
            let kinds = [
                EventKind::Result,
                EventKind::Failed,
                EventKind::HumanDecision,
                EventKind::Cancel,
            ];
            let kind = kinds[rng.below(kinds.len())];
            Record::refused(
                &key,
                Some(answer(
                    &key,
                    kind,
                    1 + rng.below(3) as u32,
                    "intent_classifier",
                )),
            )
        }
        7 => Record {
            key: valid.clone().into_bytes(),
            value: Some(answer(&valid, EventKind::Result, 2, "sentiment_analyzer")),
            headers: Vec::new(),
            completes: None,
        },
        8 => Record {
            key: valid.clone().into_bytes(),
            value: Some(answer(&valid, EventKind::HumanDecision, 1, "mallory")),
            headers: Vec::new(),
            completes: None,
        },
        9 => Record {
            key: valid.clone().into_bytes(),
            value: Some(answer(&valid, EventKind::Failed, 1, "knowledge_retriever")),
            headers: vec![("switchyard.signature", b"forged".to_vec())],
            completes: None,
        },
        10 => {
            let mut bytes = br#"{"event_id":"e","task_id":"h-"#.to_vec();
            bytes.extend_from_slice(&[0xff, 0xfe]);
            bytes.extend_from_slice(br#"","kind":"SUBMITTED"}"#);
            Record::refused(&key, Some(bytes))
        }
        11 => {
            let depth = 10_000;
            let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let text = format!(
                r#"{{"event_id":"e","task_id":"{key}","kind":"SUBMITTED","payload":{nested}}}"#
            );
            Record::refused(&key, Some(text.into_bytes()))
        }
        12 => Record {
            key: rng.bytes(100_000),
            value: Some(rng.bytes(64)),
            headers: Vec::new(),
            completes: None,
        },
        13 => {
            // Small as read, too large as recorded: 1e15 is written 1000000000000000.0.
            let numbers = vec!["1e15"; 700].join(",");
            let text = format!(
                r#"{{"event_id":"e-{i}","task_id":"{key}","kind":"SUBMITTED","payload":{{"n":[{numbers}]}}}}"#
            );
            assert!(text.len() <= MAX_EVENT);
            Record::refused(&key, Some(text.into_bytes()))
        }
        14 => {
            // At and around max_event_bytes: at or under it is a task that must complete.
            let size = MAX_EVENT - 1 + (i / 16) % 3;
            Record {
                key: key.clone().into_bytes(),
                value: Some(submission_of(&key, size)),
                headers: Vec::new(),
                completes: (size <= MAX_EVENT).then(|| key.clone()),
            }
        }
        _ => {
            // Around the size at which a dead letter keeps only a prefix.
            let size = max_value - key.len() - 1 + (i / 16) % 3;
            Record::refused(&key, Some(submission_of(&key, size)))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_hostile_records_never_stop_the_router() {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| switchyard::envelope::now_ms() as u64 | 1);
    println!("FUZZ_SEED={seed}");
    let mut rng = Rng(seed);
    let kafka = kafka("fuzz");
    let dir = workflow_copy(
        "customer-service",
        &[],
        &format!("max_event_bytes: {MAX_EVENT}\nmax_work_item_bytes: 16384"),
    );
    let workflow = setup(&kafka, dir.path()).await;
    let max_record = MAX_RECORD.to_string();
    let limit = format!("message.max.bytes={max_record}");
    let router = std::sync::Mutex::new(spawn_router(&kafka, dir.path(), 0, &["-X", &limit]));
    let running = || router.lock().unwrap().try_wait().unwrap().is_none();
    let agents = RunningAgents::example(&kafka, &workflow, |_| {});
    let humans = RunningAgents::start(&kafka, &workflow, &["human_agent"], |_| {
        Human(kafka.clone())
    });

    // The largest value a dead letter keeps whole: the router's record limit less the key and
    // the room it keeps for headers (dlq::record), counted here with a key of the same length.
    let max_value = MAX_RECORD - 8 * 1024;
    let mut records: Vec<Record> = (0..HOSTILE)
        .map(|i| hostile(&mut rng, i, max_value))
        .collect();
    for v in 0..VALID {
        let task = format!("v-{v}");
        let at = rng.below(records.len() + 1);
        records.insert(
            at,
            Record {
                key: task.clone().into_bytes(),
                value: Some(json_bytes(&submission(&task, &format!("hello {v}")))),
                headers: Vec::new(),
                completes: Some(task),
            },
        );
    }
    let started = Instant::now();
    let mut expected: HashMap<(i32, i64), Option<String>> = HashMap::new();
    for chunk in records.chunks(500) {
        let sends = chunk.iter().map(|r| {
            let headers: Vec<(&str, &[u8])> =
                r.headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            let kafka = &kafka;
            async move { publish_record(kafka, &r.key, r.value.as_deref(), &headers).await }
        });
        for (at, r) in futures::future::join_all(sends)
            .await
            .into_iter()
            .zip(chunk)
        {
            expected.insert(at, r.completes.clone());
        }
    }
    let published = started.elapsed();
    let must_complete: HashSet<String> = expected.values().flatten().cloned().collect();
    println!(
        "published {} records ({} hostile, {} tasks that must complete) in {published:?}",
        expected.len(),
        HOSTILE,
        must_complete.len()
    );

    let tasks_topic = kafka.topics().tasks();
    let (states, inputs) = eventually(
        Duration::from_secs(300),
        "every record decided and every valid task complete",
        || async {
            assert!(running(), "the router process exited");
            let states = state_events(&kafka);
            let done: HashSet<&str> = states
                .iter()
                .filter(|e| matches!(e.decision, Decision::Completed { .. }))
                .map(|e| e.task_id.as_str())
                .collect();
            if must_complete.iter().any(|t| !done.contains(t.as_str())) {
                return None;
            }
            let inputs: Vec<(i32, i64)> = read_all(&kafka, &tasks_topic)
                .iter()
                .map(|m| (m.partition(), m.offset()))
                .collect();
            let decided = states
                .iter()
                .filter(|e| e.input.is_some() && !e.dequeued)
                .count();
            (decided >= inputs.len()).then_some((states, inputs))
        },
    )
    .await;
    let took = started.elapsed();
    assert!(running(), "the router process exited");

    let mut per_input: HashMap<(i32, i64), Vec<&Decision>> = HashMap::new();
    for e in states.iter().filter(|e| !e.dequeued) {
        if let Some(i) = e.input.as_ref().filter(|i| i.topic == tasks_topic) {
            per_input
                .entry((i.partition, i.offset))
                .or_default()
                .push(&e.decision);
        }
    }
    for at in &inputs {
        let n = per_input.get(at).map_or(0, Vec::len);
        assert_eq!(n, 1, "the record at {at:?} has {n} state records");
    }
    let letters: HashSet<(i32, i64)> = dlq::list(&kafka, &Selection::default())
        .unwrap()
        .iter()
        .filter(|d| d.source_topic == tasks_topic)
        .map(|d| (d.source_partition, d.source_offset))
        .collect();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for (at, completes) in &expected {
        let decision = per_input[at][0];
        let label = match decision {
            Decision::DeadLettered { reason, .. } => {
                assert!(
                    letters.contains(at),
                    "no dead letter for the record at {at:?}"
                );
                format!("dead-lettered {reason}")
            }
            Decision::Dropped { reason } => {
                assert!(!reason.is_empty());
                format!("dropped {reason}")
            }
            other if completes.is_some() => other.name().to_string(),
            other => panic!("the hostile record at {at:?} was decided {other:?}"),
        };
        *outcomes.entry(label).or_default() += 1;
    }
    println!(
        "decided {} records ({} from agents) in {took:?}; outcomes of the published ones:",
        inputs.len(),
        inputs.len() - expected.len()
    );
    for (label, n) in &outcomes {
        println!("  {n:>6}  {label}");
    }
    humans.stop().await;
    agents.stop().await;
    let mut router = router.into_inner().unwrap();
    router.kill().unwrap();
    router.wait().unwrap();
}

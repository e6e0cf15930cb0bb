//! Where unfinished tasks stand, printed by a test that timed out waiting for them: which tasks
//! partitions hold them, the cards their latest steps wait on, and how far those cards' agents
//! have read their topics.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::TopicPartitionList;
use switchyard::envelope::Decision;
use switchyard::kafka::KafkaConfig;

use super::{reader_in, state_events};

/// The report: open tasks by tasks partition and the card of their latest step, then each
/// partition's high watermark against the offset its readers committed, for the tasks topic (the
/// routers) and for those cards' topics (the cards' agents).
pub fn report(kafka: &KafkaConfig) -> String {
    let events = state_events(kafka);
    let tasks_topic = kafka.topics().tasks();
    let mut partition_of: HashMap<&str, i32> = HashMap::new();
    let mut latest: HashMap<&str, &str> = HashMap::new();
    let mut ended: HashSet<&str> = HashSet::new();
    for e in &events {
        if let Some(input) = e.input.as_ref().filter(|i| i.topic == tasks_topic) {
            partition_of.entry(&e.task_id).or_insert(input.partition);
        }
        if let Some(step) = e.decision.steps().last() {
            latest.insert(&e.task_id, &step.card);
        }
        if matches!(
            e.decision,
            Decision::Completed { .. } | Decision::Cancelled | Decision::DeadLettered { .. }
        ) {
            ended.insert(&e.task_id);
        }
    }
    let mut open: BTreeMap<(i32, &str), usize> = BTreeMap::new();
    for (task, p) in &partition_of {
        if !ended.contains(task) {
            let card = latest.get(task).copied().unwrap_or("(no step)");
            *open.entry((*p, card)).or_default() += 1;
        }
    }
    let mut out =
        String::from("open tasks by tasks partition, and the card of their latest step:\n");
    for ((p, card), n) in &open {
        let _ = writeln!(out, "  partition {p}: {n} at {card}");
    }
    let routers = kafka.topics().router_group();
    let _ = writeln!(
        out,
        "{tasks_topic} (high watermark / committed by the routers):"
    );
    let _ = writeln!(out, "  {}", positions(kafka, &tasks_topic, &routers));
    let cards: BTreeSet<&str> = open.keys().map(|(_, card)| *card).collect();
    for card in cards.into_iter().filter(|c| !c.starts_with('(')) {
        // An agent's group and its topic share their name.
        let name = format!("{}.agent.{card}", kafka.topic_prefix);
        let _ = writeln!(out, "{name} (high watermark / committed by its agents):");
        let _ = writeln!(out, "  {}", positions(kafka, &name, &name));
    }
    out
}

/// Each partition's high watermark and the offset `group` committed.
fn positions(kafka: &KafkaConfig, topic: &str, group: &str) -> String {
    let consumer = reader_in(kafka, group);
    let Ok(partitions) = kafka.partition_count(topic) else {
        return "no metadata".into();
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map(|tpl| {
            tpl.elements()
                .iter()
                .map(|e| e.offset())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    (0..partitions)
        .map(|p| {
            let high = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map_or(-1, |(_, high)| high);
            let done = committed.get(p as usize).map(|o| format!("{o:?}"));
            format!("{p}: {high} / {}", done.unwrap_or_else(|| "?".into()))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

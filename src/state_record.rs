//! The state topic's record format.
//!
//! A record's value is one state event (a JSON object), or several decisions of one partition
//! written together (a JSON array of state events, in the order they were folded). The router
//! writes each batch's decisions of a partition as one record, up to the rule table's
//! `max_event_bytes` of them (the state topic accepts a single event that large):
//! `scripts/bench-routing` measured a state record per decision at about 3 µs of the client's CPU
//! per event. Ownership records, a partition's only decision of a batch and an event larger than
//! the limit are written alone, as objects, as every record was before arrays. Readers take both
//! through [`decode`]. A decision's position is its record's offset and its index in the record.

use std::collections::HashMap;

use crate::commit::Outgoing;
use crate::envelope::{from_json, Decision, StateEvent};

/// The state events of a record's value, in order.
pub fn decode(value: &[u8]) -> serde_json::Result<Vec<StateEvent>> {
    match value.trim_ascii_start().first() {
        Some(b'[') => from_json(value),
        _ => from_json(value).map(|event| vec![event]),
    }
}

/// The instance that an ownership record names; `None` for any other record.
pub fn owner(value: &[u8]) -> Option<String> {
    let events = decode(value).ok()?;
    let owned = events
        .into_iter()
        .find(|e| matches!(e.decision, Decision::Owned { .. }))?;
    Some(owned.instance)
}

/// How a state event without its input event names that field.
const NO_EVENT: &[u8] = b"\"event\":null";

/// The state topic's record of one decision on `partition`, keyed by its task, with its trace
/// header. `read` is the value of the input the decision copies, when that value is the input
/// event's JSON text as read ([`crate::envelope::read_task_event`]): the record then copies that
/// text instead of encoding the decoded event again, which decodes to the same event and costs
/// a copy (`scripts/bench-decide --instructions`: 38,700 instructions per event instead of 42,600).
pub fn record(
    topic: String,
    partition: i32,
    mut decision: StateEvent,
    read: Option<&[u8]>,
) -> Outgoing {
    let text = match (read, &decision.event) {
        (Some(text), Some(_)) => {
            decision.event = None;
            Some(text)
        }
        _ => None,
    };
    let mut record = Outgoing::json(topic, Some(partition), &decision.task_id, &decision);
    if let (Some(text), Some(value)) = (text, record.payload.as_mut()) {
        // The first `"event":null` is the field's: only fields of switchyard's own (the task id
        // and the instance as strings, where a quote is escaped, and the input's position) come
        // before it.
        let at = memchr::memmem::find(value, NO_EVENT)
            .expect("a state event without its event names it null");
        // In place: the fields after it move to make room, then the text fills it.
        let (null, end) = (at + NO_EVENT.len() - b"null".len(), at + NO_EVENT.len());
        let (tail, len) = (value.len() - end, value.len() - end + null + text.len());
        value.resize(len.max(value.len()), 0);
        value.copy_within(end..end + tail, null + text.len());
        value.truncate(len);
        value[null..null + text.len()].copy_from_slice(text);
    }
    record.traceparent = decision.trace;
    record
}

/// State records to write, with how many decisions each holds.
#[derive(Default)]
pub struct Batched {
    /// The records, each partition's in decision order.
    pub records: Vec<Outgoing>,
    /// How many state events each record holds.
    pub events: Vec<usize>,
}

/// `records` (state records of one event each, with their partitions, in decision order) as
/// few records of at most `max_bytes` as they fit in: consecutive events of a partition share one.
pub fn batched(records: Vec<Outgoing>, max_bytes: usize) -> Batched {
    // Each group with the size of its array: its events, the commas between them, the brackets.
    let mut groups: Vec<(Vec<Outgoing>, usize)> = Vec::new();
    let mut open: HashMap<Option<i32>, usize> = HashMap::new();
    for record in records {
        let size = record.payload.as_ref().map_or(0, Vec::len);
        match open.get(&record.partition).map(|&g| &mut groups[g]) {
            Some((group, bytes)) if *bytes + size < max_bytes => {
                *bytes += size + 1;
                group.push(record);
            }
            _ => {
                open.insert(record.partition, groups.len());
                groups.push((vec![record], size + 2));
            }
        }
    }
    let mut out = Batched::default();
    for (mut group, bytes) in groups {
        out.events.push(group.len());
        if group.len() == 1 {
            out.records.extend(group.pop());
            continue;
        }
        let mut value = Vec::with_capacity(bytes);
        value.push(b'[');
        for (i, record) in group.iter().enumerate() {
            if i > 0 {
                value.push(b',');
            }
            value.extend_from_slice(record.payload.as_deref().unwrap_or(b"null"));
        }
        value.push(b']');
        let first = &group[0];
        out.records.push(Outgoing::bytes(
            first.topic.clone(),
            first.partition,
            "",
            value,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{EventKind, TaskEvent};

    const MAX: usize = 256 * 1024;

    fn event(task: &str, seq: u64) -> StateEvent {
        StateEvent {
            event: Some(TaskEvent::new(task, EventKind::Submitted, "client")),
            ..StateEvent::new(task, seq, (3, "r1"), Decision::Queued, 1_000)
        }
    }

    fn single(p: i32, e: &StateEvent) -> Outgoing {
        let mut r = Outgoing::json("s".into(), Some(p), &e.task_id, e);
        r.traceparent = Some("00-t-s-01".into());
        r
    }

    #[test]
    fn a_partitions_decisions_share_a_record_in_order_and_read_back_as_they_were() {
        let events: Vec<_> = (0..5).map(|i| event(&format!("t{i}"), 1)).collect();
        let parts = [0, 1, 0, 0, 2];
        let records = events.iter().zip(parts).map(|(e, p)| single(p, e));
        let out = batched(records.collect(), MAX);
        assert_eq!(
            out.events,
            [3, 1, 1],
            "partition 0's three, then 1's and 2's alone"
        );
        let read: Vec<Vec<StateEvent>> = out
            .records
            .iter()
            .map(|r| decode(r.payload.as_deref().unwrap()).unwrap())
            .collect();
        assert_eq!(
            read[0],
            [events[0].clone(), events[2].clone(), events[3].clone()]
        );
        assert_eq!(read[1], [events[1].clone()]);
        assert_eq!(out.records[0].partition, Some(0));
        assert!(out.records[0].key.is_empty() && out.records[0].traceparent.is_none());
        assert_eq!(out.records[1].key, b"t1", "a lone event keeps its key");
        assert!(out.records[1].traceparent.is_some(), "and its trace header");
    }

    #[test]
    fn a_record_holds_at_most_max_bytes_and_a_larger_event_goes_alone() {
        let mut big = event("big", 1);
        big.event.as_mut().unwrap().payload = serde_json::json!("x".repeat(MAX));
        let small: Vec<_> = (0..400)
            .map(|i| single(0, &event(&format!("t{i}"), 1)))
            .collect();
        let one = small[0].payload.as_ref().unwrap().len();
        let mut records = small.clone();
        records.insert(200, single(0, &big));
        let out = batched(records, MAX);
        for r in &out.records {
            let len = r.payload.as_ref().unwrap().len();
            assert!(len <= MAX || r.key == b"big", "{len} bytes");
        }
        let read: Vec<StateEvent> = out
            .records
            .iter()
            .flat_map(|r| decode(r.payload.as_deref().unwrap()).unwrap())
            .collect();
        assert_eq!(read.len(), 401, "nothing lost");
        assert_eq!(read[200].task_id, "big", "order kept");
        let least = 400 * one / MAX + 1;
        let n = out.records.len();
        assert!(
            (least..=least + 2).contains(&n),
            "{n} records: filled, and cut around the large one"
        );
    }

    #[test]
    fn a_record_copies_the_input_text_and_reads_back_as_the_decision_with_its_event() {
        let texts: [&[u8]; 3] = [
            br#"{"event_id":"e","task_id":"t","kind":"SUBMITTED","payload":{"q":"\"event\":null \u00e9"}}"#,
            b" {\n \"kind\": \"SUBMITTED\", \"task_id\": \"t\", \"event_id\": \"e\", \"surprise\": [1, 2] }\n",
            br#"{"event_id":"e","task_id":"t","kind":"SUBMITTED","payload":[1e3,-0.5,"x"],"labels":{"a":"b"}}"#,
        ];
        for text in texts {
            let (event, verbatim) = crate::envelope::read_task_event(text).unwrap();
            assert!(verbatim, "{}", String::from_utf8_lossy(text));
            let mut decision = StateEvent {
                event: Some(event),
                trace: Some("00-t-s-01".into()),
                ..StateEvent::new("t", 1, (3, "r\"event\":null"), Decision::Queued, 1_000)
            };
            decision.task_id = "t\"event\":null".into();
            let r = record("s".into(), 2, decision.clone(), Some(text));
            let value = r.payload.as_deref().unwrap();
            assert!(
                memchr::memmem::find(value, text).is_some(),
                "the text is copied as it is"
            );
            assert_eq!(decode(value).unwrap(), [decision.clone()]);
            assert_eq!(
                (r.partition, r.key.as_slice()),
                (Some(2), b"t\"event\":null".as_slice())
            );
            assert_eq!(r.traceparent.as_deref(), Some("00-t-s-01"));
        }
        let shorter = record("s".into(), 2, event("t", 1), Some(b"{}"));
        let value = shorter.payload.unwrap();
        let (at, end) = (br#""event":{},"#.as_slice(), br#""at":1000}"#.as_slice());
        assert!(memchr::memmem::find(&value, at).is_some() && value.ends_with(end));
    }

    #[test]
    fn without_a_text_or_an_event_a_record_is_the_decision_encoded() {
        let decision = event("t", 1);
        let encoded = serde_json::to_vec(&decision).unwrap();
        let r = record("s".into(), 0, decision.clone(), None);
        assert_eq!(r.payload.as_deref(), Some(encoded.as_slice()));
        let undecodable = StateEvent {
            event: None,
            ..decision
        };
        let r = record("s".into(), 0, undecodable.clone(), Some(b"not json"));
        assert_eq!(
            decode(r.payload.as_deref().unwrap()).unwrap(),
            [undecodable]
        );
    }

    #[test]
    fn an_object_is_one_event_and_anything_else_is_an_error() {
        let e = event("t", 2);
        let object = serde_json::to_vec(&e).unwrap();
        assert_eq!(decode(&object).unwrap(), [e]);
        assert!(decode(b"[{\"nope\": 1}]").is_err());
        assert!(decode(b"not json").is_err());
        let owned = serde_json::to_vec(&StateEvent::owned("r2", 5)).unwrap();
        assert_eq!(owner(&owned).as_deref(), Some("r2"));
        assert_eq!(owner(&object), None);
    }
}

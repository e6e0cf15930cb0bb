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

/// What a state record takes besides the input it copies (about 460 bytes in
/// `scripts/bench-routing`): room reserved per decision, so that a partition's record is not
/// copied as it grows.
pub const ROOM_PER_DECISION: usize = 512;

/// A batch's state records, built as its decisions are made: each partition's decisions are
/// encoded straight into the record that holds them (rather than into a record each, copied into
/// it afterwards: an allocation, a copy and three frees per decision).
pub struct Records {
    max_bytes: usize,
    /// The records so far, in order; a partition's last one takes its next decision.
    groups: Vec<Group>,
}

/// One record's decisions, all of one partition.
struct Group {
    partition: i32,
    /// `[` and the decisions so far, separated by commas.
    value: Vec<u8>,
    /// Each decision's key (its task) and trace: a record of one decision keeps them.
    decisions: Vec<(String, Option<String>)>,
}

impl Records {
    /// No records yet; each will hold at most `max_bytes` (a decision larger than that alone).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            groups: Vec::new(),
        }
    }

    /// Reserves room for `bytes` more of `partition`'s decisions (up to the largest record).
    pub fn reserve(&mut self, partition: i32, bytes: usize) {
        let max = self.max_bytes;
        self.open(partition).value.reserve(bytes.min(max));
    }

    /// Adds the state event of one decision on `partition`. `read` is the value of the input
    /// the decision copies, when that value is the input event's JSON text as read
    /// ([`crate::envelope::read_task_event`]): the record then copies that text instead of
    /// encoding the decoded event again, which decodes to the same event and costs a copy
    /// (`scripts/bench-decide --instructions`: 38,700 instructions per event instead of 42,600).
    pub fn push(&mut self, partition: i32, mut decision: StateEvent, read: Option<&[u8]>) {
        let text = match (read, &decision.event) {
            (Some(text), Some(_)) => {
                decision.event = None;
                Some(text)
            }
            _ => None,
        };
        let max = self.max_bytes;
        let mut group = self.open(partition);
        let joins = !group.decisions.is_empty();
        if joins {
            group.value.push(b',');
        }
        let start = group.value.len();
        serde_json::to_writer(&mut group.value, &decision).expect("records serialize to JSON");
        if let Some(text) = text {
            splice(&mut group.value, start, text);
        }
        // The array with this decision would reach `max_bytes`: it starts the next record.
        if joins && group.value.len() >= max {
            let mut value = Vec::with_capacity(max.max(group.value.len() - start + 1));
            value.push(b'[');
            value.extend_from_slice(&group.value[start..]);
            group.value.truncate(start - 1);
            self.groups.push(Group {
                partition,
                value,
                decisions: Vec::new(),
            });
            group = self.groups.last_mut().expect("just pushed");
        }
        group.decisions.push((decision.task_id, decision.trace));
    }

    /// Whether no decision was added.
    pub fn is_empty(&self) -> bool {
        self.groups.iter().all(|g| g.decisions.is_empty())
    }

    /// The records to write to `topic`, with how many decisions each holds: a JSON array of a
    /// partition's decisions, or a decision's object alone (keyed by its task, with its trace
    /// header) when it is its record's only one.
    pub fn finish(self, topic: &str) -> Batched {
        let mut out = Batched::default();
        for Group {
            partition,
            mut value,
            mut decisions,
        } in self.groups
        {
            let n = decisions.len();
            let (key, trace) = match n {
                0 => continue,
                1 => {
                    value.remove(0);
                    decisions.swap_remove(0)
                }
                _ => {
                    value.push(b']');
                    (String::new(), None)
                }
            };
            let mut record = Outgoing::bytes(topic.to_string(), Some(partition), &key, value);
            record.traceparent = trace;
            out.records.push(record);
            out.events.push(n);
        }
        out
    }

    /// `partition`'s record that takes its next decision.
    fn open(&mut self, partition: i32) -> &mut Group {
        let at = match self.groups.iter().rposition(|g| g.partition == partition) {
            Some(at) => at,
            None => {
                self.groups.push(Group {
                    partition,
                    value: vec![b'['],
                    decisions: Vec::new(),
                });
                self.groups.len() - 1
            }
        };
        &mut self.groups[at]
    }
}

/// Puts `text` in the place of the first `"event":null` of the state event encoded at
/// `value[start..]`, in place: the fields after it move to make room, then the text fills it.
fn splice(value: &mut Vec<u8>, start: usize, text: &[u8]) {
    // The first `"event":null` is the field's: only fields of switchyard's own (the task id
    // and the instance as strings, where a quote is escaped, and the input's position) come
    // before it.
    let at = start
        + memchr::memmem::find(&value[start..], NO_EVENT)
            .expect("a state event without its event names it null");
    let (null, end) = (at + NO_EVENT.len() - b"null".len(), at + NO_EVENT.len());
    let (tail, len) = (value.len() - end, value.len() - end + null + text.len());
    value.resize(len.max(value.len()), 0);
    value.copy_within(end..end + tail, null + text.len());
    value.truncate(len);
    value[null..null + text.len()].copy_from_slice(text);
}

/// State records to write, with how many decisions each holds.
#[derive(Default)]
pub struct Batched {
    /// The records, each partition's in decision order.
    pub records: Vec<Outgoing>,
    /// How many state events each record holds.
    pub events: Vec<usize>,
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

    fn traced(mut e: StateEvent) -> StateEvent {
        e.trace = Some("00-t-s-01".into());
        e
    }

    fn batched<'a>(decisions: impl IntoIterator<Item = (i32, &'a StateEvent)>) -> Batched {
        let mut records = Records::new(MAX);
        for (p, e) in decisions {
            records.push(p, e.clone(), None);
        }
        records.finish("s")
    }

    /// The record of one decision alone.
    fn record(p: i32, decision: StateEvent, read: Option<&[u8]>) -> Outgoing {
        let mut records = Records::new(MAX);
        records.reserve(p, 100);
        records.push(p, decision, read);
        let mut out = records.finish("s");
        assert_eq!(out.events, [1]);
        out.records.remove(0)
    }

    #[test]
    fn a_partitions_decisions_share_a_record_in_order_and_read_back_as_they_were() {
        let events: Vec<_> = (0..5).map(|i| traced(event(&format!("t{i}"), 1))).collect();
        let parts = [0, 1, 0, 0, 2];
        let out = batched(parts.into_iter().zip(&events));
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
        let mut events: Vec<_> = (0..400).map(|i| event(&format!("t{i}"), 1)).collect();
        let one = serde_json::to_vec(&events[0]).unwrap().len();
        events.insert(200, big);
        let out = batched(events.iter().map(|e| (0, e)));
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
        assert_eq!(out.events.iter().sum::<usize>(), 401);
        let alone = out.records.iter().zip(&out.events);
        assert!(
            alone.filter(|(r, n)| r.key == b"big" && **n == 1).count() == 1,
            "the large one alone, keyed"
        );
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
            let r = record(2, decision.clone(), Some(text));
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
        let mut together = Records::new(MAX);
        let decisions: Vec<_> = texts
            .iter()
            .map(|text| {
                let event = crate::envelope::read_task_event(text).unwrap().0;
                let decision = StateEvent {
                    event: Some(event),
                    ..StateEvent::new("t", 1, (3, "r1"), Decision::Queued, 1_000)
                };
                together.push(2, decision.clone(), Some(text));
                decision
            })
            .collect();
        assert!(!together.is_empty());
        let out = together.finish("s");
        assert_eq!(out.events, [3], "one record");
        let value = out.records[0].payload.as_deref().unwrap();
        assert_eq!(decode(value).unwrap(), decisions, "each text in its place");
        let shorter = record(2, event("t", 1), Some(b"{}"));
        let value = shorter.payload.unwrap();
        let (at, end) = (br#""event":{},"#.as_slice(), br#""at":1000}"#.as_slice());
        assert!(memchr::memmem::find(&value, at).is_some() && value.ends_with(end));
    }

    #[test]
    fn without_a_text_or_an_event_a_record_is_the_decision_encoded() {
        let decision = event("t", 1);
        let encoded = serde_json::to_vec(&decision).unwrap();
        let r = record(0, decision.clone(), None);
        assert_eq!(r.payload.as_deref(), Some(encoded.as_slice()));
        let undecodable = StateEvent {
            event: None,
            ..decision
        };
        let r = record(0, undecodable.clone(), Some(b"not json"));
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

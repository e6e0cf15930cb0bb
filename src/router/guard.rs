//! Guards on what the router reads and writes, pure like the engine they serve: the size of a
//! task event (as read and as it would be recorded), the signature of an answer, and the size of
//! the work item a decision would send. Live routing and replay admit every record through
//! [`Engine::refusal`], so both refuse the same records for the same reasons.

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::Serialize;
use serde_json::Value;

use super::engine::{Engine, Outcome};
use super::partition::{Partition, Position};
use crate::envelope::{Decision, DecodeError, EventKind, StateEvent, Step, TaskEvent, WorkItemRef};
use crate::state::{PartitionState, TaskState};

/// What admission looks at in a task-event record besides the decoded event.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw<'a> {
    /// The size of the record's value in bytes.
    pub size: usize,
    /// The record's value as read (needed to check a signature).
    pub value: Option<&'a [u8]>,
    /// The `switchyard.signature` header, if any.
    pub signature: Option<&'a [u8]>,
    /// Whether the value is the event's JSON text ([`crate::envelope::read_task_event`]): its
    /// JSON form, as recorded, is then at most [`json_form_bound`] of its size, and admission
    /// measures that form only when the bound is over the limit.
    pub json: bool,
}

impl<'a> Raw<'a> {
    /// A record as read: its value (`None` for a tombstone) and its signature header.
    pub fn new(value: Option<&'a [u8]>, signature: Option<&'a [u8]>) -> Self {
        Self {
            size: value.map_or(0, <[u8]>::len),
            value,
            signature,
            json: false,
        }
    }
}

/// The most bytes the JSON form of a task event takes when it was read from `size` bytes of
/// JSON text. Encoded again, a string never grows (the encoder escapes only what the text must
/// have escaped too, and unescapes the rest), nor do whitespace, fields it does not know, and
/// repeated keys (they go); a number grows at most 4.5 times (`1e15`, 4 bytes, is
/// `1000000000000000.0`); the fields the text leaves out take their defaults, under 1 KiB in
/// all. Admission skips measuring an event this bound puts within the limit: the measure costs
/// as much as encoding it (`scripts/bench-decide --instructions`: 3,250 instructions an event).
pub fn json_form_bound(size: usize) -> usize {
    size.saturating_mul(5).saturating_add(1024)
}

impl Engine {
    /// The error for a record of `len` bytes, if it is over `max_event_bytes`; checked before
    /// decoding, so that an oversized record costs no decoding.
    pub fn too_large(&self, len: usize) -> Option<DecodeError> {
        let limit = self.rules.max_event_bytes;
        (len > limit).then_some(DecodeError::TooLarge {
            size: len,
            form: "as read",
            limit,
        })
    }

    /// Why a record is refused before it is decided, if it is: its size as read or as it would
    /// be recorded (`too_large`), its decoding, or, for an answer to a step of a card with a
    /// secret, its signature (`bad_signature`). Returns whether the event may still be copied
    /// into the state record, and the dead letter.
    pub fn refusal(
        &self,
        state: &PartitionState,
        raw: Raw<'_>,
        decoded: Result<&TaskEvent, &DecodeError>,
    ) -> Option<(bool, Outcome)> {
        if let Some(error) = self.too_large(raw.size) {
            return Some((false, Outcome::undecodable(&error)));
        }
        let event = match decoded {
            Ok(event) => event,
            Err(e) => return Some((false, Outcome::undecodable(e))),
        };
        let limit = self.rules.max_event_bytes;
        let bounded = raw.json && json_form_bound(raw.size) <= limit;
        if let Some(recorded) = (!bounded).then(|| json_len(event)).filter(|r| *r > limit) {
            let error = DecodeError::TooLarge {
                size: recorded,
                form: "as recorded",
                limit,
            };
            return Some((false, Outcome::undecodable(&error)));
        }
        self.signature_problem(state, raw, event)
            .map(|message| (true, Outcome::dead_letter("bad_signature", message, false)))
    }

    /// Decides one record as read: admission ([`Engine::refusal`]), then the decision. Returns
    /// the event when the state record may copy it.
    pub fn step(
        &self,
        state: &PartitionState,
        raw: Raw<'_>,
        decoded: Result<TaskEvent, DecodeError>,
    ) -> (Option<TaskEvent>, Outcome) {
        match (self.refusal(state, raw, decoded.as_ref()), decoded) {
            (Some((copy, outcome)), decoded) => (decoded.ok().filter(|_| copy), outcome),
            (None, Ok(event)) => {
                let outcome = self.decide(state, &event);
                (Some(event), outcome)
            }
            (None, Err(e)) => (None, Outcome::undecodable(&e)),
        }
    }

    /// The router's whole per-record step without Kafka: decodes `value` (JSON), admits and
    /// decides it against `state`, and folds the state record into `state`, which it returns.
    /// The entry point of the fuzz target in `fuzz/`; it panics only when an invariant breaks (a
    /// refused event copied, an oversized event recorded, a work item over the limit).
    pub fn decide_record(
        &self,
        state: &mut PartitionState,
        value: Option<&[u8]>,
        signature: Option<&[u8]>,
    ) -> StateEvent {
        let bytes = value.unwrap_or_default();
        let mut raw = Raw::new(value, signature);
        let decoded = match self.too_large(bytes.len()) {
            Some(e) => Err(e),
            None => crate::envelope::read_task_event(bytes).map(|(event, json)| {
                raw.json = json;
                event
            }),
        };
        let mut partition = Partition {
            engine: self,
            state,
            instance: "decide_record",
            now: 0,
            keep_undo: false,
            trace: None,
        };
        let at = Position {
            topic: "tasks",
            partition: 0,
            offset: 0,
        };
        let record = partition.decide(at, raw, decoded).record;
        if let Some(event) = &record.event {
            assert!(
                json_len(event) <= self.rules.max_event_bytes,
                "an oversized event is copied"
            );
        }
        let task_id = &record.task_id;
        if let Some(task) = state.tasks.get(task_id) {
            for item in self.work_items(task, &record.decision, i32::MAX) {
                assert!(
                    json_len(&item) <= self.rules.max_work_item_bytes,
                    "a work item over max_work_item_bytes"
                );
            }
        }
        record
    }

    /// Whether `event` answers a step of a card whose secret this process does not have, so
    /// that its signature cannot be checked (replay without the secrets).
    pub fn unverifiable(&self, state: &PartitionState, event: &TaskEvent) -> bool {
        self.signer(state, event)
            .is_some_and(|(card, _)| matches!(self.secrets.get(card), Some(None)))
    }

    /// The card that must have signed `event` and the step it answers, if the event answers a
    /// step of an active task.
    fn signer<'s>(&self, state: &'s PartitionState, event: &TaskEvent) -> Option<(&'s str, u32)> {
        if !matches!(
            event.kind,
            EventKind::Result | EventKind::Failed | EventKind::HumanDecision
        ) {
            return None;
        }
        let task = state.tasks.get(&event.task_id)?;
        let step_id = self.answered_step(task, event)?;
        task.steps.get(&step_id).map(|s| (s.card.as_str(), step_id))
    }

    fn signature_problem(
        &self,
        state: &PartitionState,
        raw: Raw<'_>,
        event: &TaskEvent,
    ) -> Option<String> {
        let (card, step_id) = self.signer(state, event)?;
        let secret = self.secrets.get(card).flatten()?;
        let Some(signature) = raw.signature else {
            return Some(format!(
                "the answer to step {step_id} is not signed; card `{card}` requires a `{}` header",
                crate::signing::SIGNATURE_HEADER
            ));
        };
        let value = raw.value.unwrap_or_default();
        let valid = secret.verify(
            &event.task_id,
            event.step_id,
            event.attempt,
            value,
            signature,
        );
        (!valid).then(|| {
            format!("the signature of the answer to step {step_id} was not made with card `{card}`'s secret over these bytes")
        })
    }

    /// `outcome`, or a dead letter `too_large` when a work item it sends would be over
    /// `max_work_item_bytes`. `task` is the task before the decision (`None` for a new one) and
    /// `answer` the event whose payload becomes its answered card's output.
    pub(super) fn bounded(
        &self,
        task: Option<&TaskState>,
        submitted: Option<&TaskEvent>,
        answer: Option<&TaskEvent>,
        outcome: Outcome,
    ) -> Outcome {
        let steps = outcome.decision.steps();
        if steps.is_empty() {
            return outcome;
        }
        let answered = task
            .zip(outcome.answers_step)
            .and_then(|(t, id)| t.steps.get(&id))
            .map(|s| s.card.as_str());
        let output = answer
            .filter(|e| e.kind != EventKind::Failed)
            .map(|e| &e.payload);
        let limit = self.rules.max_work_item_bytes;
        for step in steps {
            // A new task's work item holds fields of its admitted submission (fewer of them, and
            // `payload` is `input`) and the step's (two numbers, the card, `context: {}`, the
            // partition): at most `max_event_bytes`, 128 bytes more and the card's name. Not
            // measured when that is within the limit: the measure costs as much as the encoding
            // (`scripts/bench-decide --instructions`: 2,270 instructions an event).
            let new_task = task.is_none() && submitted.is_some();
            if new_task && self.rules.max_event_bytes + 128 + step.card.len() <= limit {
                continue;
            }
            let size = work_item_len(task, submitted, answered.zip(output), step);
            if size > limit {
                return Outcome {
                    breakers: outcome.breakers,
                    answers_step: outcome.answers_step,
                    decision: Decision::DeadLettered {
                        reason: "too_large".into(),
                        message: format!(
                            "the work item for `{}` (step {}) would be {size} bytes, over the limit of {limit} (`max_work_item_bytes` of the rule table)",
                            step.card, step.step_id
                        ),
                        ends_task: true,
                    },
                    llm: outcome.llm,
                };
            }
        }
        outcome
    }
}

/// The length of `value` as JSON, without building it.
pub fn json_len(value: &impl Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).expect("records serialize to JSON");
    count.0
}

/// The JSON length of the work item for `step`, as `engine::work_item` would build it after the
/// decision (with the widest reply partition, so the bound holds for every partition).
fn work_item_len(
    task: Option<&TaskState>,
    submitted: Option<&TaskEvent>,
    output: Option<(&str, &Value)>,
    step: &Step,
) -> usize {
    /// The task's outputs with `output` in place of its card's (same length as the fold's map).
    struct Context<'a> {
        outputs: Option<&'a BTreeMap<String, Value>>,
        output: Option<(&'a str, &'a Value)>,
    }
    impl Serialize for Context<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut map = s.serialize_map(None)?;
            let replaced = self.output.map(|(card, _)| card);
            for (card, value) in self.outputs.into_iter().flatten() {
                if Some(card.as_str()) != replaced {
                    map.serialize_entry(card, value)?;
                }
            }
            if let Some((card, value)) = self.output {
                map.serialize_entry(card, value)?;
            }
            map.end()
        }
    }
    let (task_id, tenant, input, labels, deadline) = match (task, submitted) {
        (Some(t), _) => (&t.task_id, &t.tenant, &t.input, &t.labels, t.deadline),
        (None, Some(e)) => (&e.task_id, &e.tenant, &e.payload, &e.labels, e.deadline),
        (None, None) => return 0,
    };
    json_len(&WorkItemRef {
        task_id,
        tenant,
        step_id: step.step_id,
        attempt: step.attempt,
        card: &step.card,
        input,
        context: Context {
            outputs: task.map(|t| &t.outputs),
            output,
        },
        labels,
        deadline,
        reply_partition: i32::MAX,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::DecidedBy;

    #[test]
    fn an_events_json_form_is_within_the_bound_of_its_text() {
        let event =
            |rest: &str| format!(r#"{{"event_id":"e","task_id":"t","kind":"SUBMITTED"{rest}}}"#);
        let numbers = |n: &str| format!(r#","payload":[{}]"#, vec![n; 1000].join(","));
        let texts = [
            event(""),
            event(r#","usage":{}"#),
            event(&numbers("1e15")),
            event(&numbers("9e9")),
            event(&numbers("-1e15")),
            event(r#","payload":{"a":1e15,"b":[1e14,1e9]},"confidence":1e0,"usage":{"cost":1e15}"#),
            event(r#","payload":"\/\u00e9\ud83d\ude00\n\t\"\u001f","labels":{"k":"\u0076"}"#),
            "  {  \"event_id\" : \"e\" , \"task_id\":\"t\",\"kind\":\"SUBMITTED\" }  ".into(),
        ];
        for text in texts {
            let (event, json) = crate::envelope::read_task_event(text.as_bytes()).unwrap();
            assert!(json, "{text}");
            let form = json_len(&event);
            let bound = json_form_bound(text.len());
            assert!(form <= bound, "{form} bytes, over {bound}: {text}");
        }
        let (one, _) =
            crate::envelope::read_task_event(event(&numbers("1e15")).as_bytes()).unwrap();
        let grown = json_len(&one.payload) as f64 / numbers("1e15").len() as f64;
        assert!(
            grown > 3.5,
            "the worst number grows {grown:.1} times: the bound allows 5"
        );
    }

    #[test]
    fn the_work_item_bound_is_the_json_length_of_the_item() {
        let mut submitted = TaskEvent::new("t", EventKind::Submitted, "client");
        submitted.payload = serde_json::json!({ "q": "héllo \"x\"\n", "n": [1, 2.5, null] });
        submitted.labels.insert("k".into(), "v".into());
        submitted.deadline = Some(1_700_000_000_000);
        let step = |id: u32, card: &str| Step::new(id, card, 1);
        let mut state = PartitionState::default();
        state.apply(&StateEvent {
            task_id: "t".into(),
            seq: 1,
            epoch: 0,
            instance: "i".into(),
            input: None,
            event: Some(submitted.clone()),
            answers_step: None,
            decision: Decision::Routed {
                steps: vec![step(1, "a")],
                decided_by: DecidedBy::Rule {
                    rule_id: "r".into(),
                },
            },
            llm: None,
            dequeued: false,
            rejected: None,
            timer: None,
            breakers: Vec::new(),
            trace: None,
            at: 0,
        });
        let first = super::super::engine::work_item(&state.tasks["t"], &step(1, "a"), i32::MAX);
        assert_eq!(
            work_item_len(None, Some(&submitted), None, &step(1, "a")),
            json_len(&first)
        );
        let output = serde_json::json!({ "out": "ü", "z": {"y": 1} });
        let next = step(2, "b");
        let mut after = state.tasks["t"].as_ref().clone();
        after.outputs.insert("a".into(), output.clone());
        let item = super::super::engine::work_item(&after, &next, i32::MAX);
        let bound = work_item_len(Some(&state.tasks["t"]), None, Some(("a", &output)), &next);
        assert_eq!(bound, json_len(&item));
        assert_eq!(bound, serde_json::to_vec(&item).unwrap().len());
    }
}

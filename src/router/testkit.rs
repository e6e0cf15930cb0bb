//! What the router's unit tests share: an engine built from YAML, and a partition driven through
//! its per-event step as the router drives it.

use std::path::PathBuf;

use super::{Engine, Partition, Position, Raw};
use crate::cards::Cards;
use crate::envelope::{Decision, EventKind, LlmRecord, StateEvent, TaskEvent};
use crate::rules::RuleTable;
use crate::signing::Secrets;
use crate::state::PartitionState;

/// An engine with `rules` and `cards`: each a card name (a human card when it starts with `h`)
/// and extra YAML fields; without them, 2 attempts and no backoff.
pub fn engine(rules: &str, cards: &[(&str, &str)]) -> Engine {
    let mut set = Cards::default();
    for (name, extra) in cards {
        let runtime = if name.starts_with('h') {
            "human"
        } else {
            "handler"
        };
        let extra = match extra.is_empty() {
            true => "retry: {max_attempts: 2, backoff: {initial: 0s}}",
            false => extra,
        };
        let yaml = format!("name: {name}\n{extra}\nruntime: {{kind: {runtime}}}");
        set.insert(serde_yaml_ng::from_str(&yaml).unwrap(), PathBuf::from(name))
            .unwrap();
    }
    let rules: RuleTable = serde_yaml_ng::from_str(rules).unwrap();
    rules.validate(&set).unwrap();
    Engine {
        cards: set,
        rules,
        secrets: Secrets::default(),
    }
}

/// A fan-out to `a` and `b`, joined into `c`, which completes when sure and escalates to `h`
/// otherwise.
pub const RULES: &str = r#"
hop_limit: 6
rules:
  - { id: start, when: { kind: SUBMITTED }, then: { route: [a, b] } }
  - { id: joined, when: { join: [a, b] }, then: { route: [c] } }
  - { id: sure, when: { source: c, confidence: { gt: 0.8 } }, then: complete }
  - { id: unsure, when: { source: c }, then: { escalate: h } }
  - { id: human, when: { kind: HUMAN_DECISION }, then: complete }
"#;

/// One partition and the engine that decides for it.
pub struct Run {
    /// The engine.
    pub engine: Engine,
    /// The partition's state.
    pub state: PartitionState,
    offset: i64,
}

impl Run {
    /// A partition deciding with `rules` and `cards` (names, default fields).
    pub fn new(rules: &str, cards: &[&str]) -> Self {
        let cards: Vec<(&str, &str)> = cards.iter().map(|c| (*c, "")).collect();
        Self::with(rules, &cards)
    }

    /// A partition deciding with `rules` and `cards` (names and extra YAML fields).
    pub fn with(rules: &str, cards: &[(&str, &str)]) -> Self {
        Self {
            engine: engine(rules, cards),
            state: PartitionState::default(),
            offset: 0,
        }
    }

    /// The partition's per-event step, as the router drives it (at time 0).
    pub fn partition(&mut self) -> Partition<'_> {
        self.partition_at(0)
    }

    /// The partition's per-event step at time `now`.
    pub fn partition_at(&mut self, now: i64) -> Partition<'_> {
        Partition {
            engine: &self.engine,
            state: &mut self.state,
            instance: "test",
            now,
            keep_undo: false,
            trace: None,
        }
    }

    /// Reads `event` as the next record of the partition and decides it (at time 0).
    pub fn send(&mut self, event: TaskEvent) -> Decision {
        self.send_at(0, event).decision
    }

    /// Reads `event` as the next record of the partition at time `now` and decides it.
    pub fn send_at(&mut self, now: i64, event: TaskEvent) -> StateEvent {
        let bytes = serde_json::to_vec(&event).unwrap();
        let raw = Raw::new(Some(&bytes), None);
        self.offset += 1;
        let at = Position {
            topic: "tasks",
            partition: 0,
            offset: self.offset,
        };
        self.partition_at(now).decide(at, raw, Ok(event)).record
    }

    /// Records the LLM's answer for `t1` and decides its queued events, as the router does.
    pub fn llm_answers(&mut self, call: LlmRecord) -> Vec<Decision> {
        let steps = self.partition().resolve("t1", &call);
        steps.into_iter().map(|s| s.record.decision).collect()
    }

    /// Fires every timer due at `now`, in order, as the router's tick does.
    pub fn tick(&mut self, now: i64) -> Vec<StateEvent> {
        let due = self.partition_at(now).due();
        let mut fired = Vec::new();
        for (task, firing) in due {
            fired.extend(self.partition_at(now).fire(&task, firing).map(|s| s.record));
        }
        fired
    }

    /// An answer to `step` of task `t1` from the card that owns it (`agent` if none does).
    pub fn answer(
        &self,
        kind: EventKind,
        step: u32,
        attempt: u32,
        confidence: Option<f64>,
    ) -> TaskEvent {
        let card = self
            .state
            .tasks
            .get("t1")
            .and_then(|t| t.steps.get(&step))
            .map_or("agent", |s| s.card.as_str());
        let mut e = TaskEvent::new("t1", kind, card);
        e.step_id = Some(step);
        e.attempt = Some(attempt);
        e.confidence = confidence;
        e
    }
}

//! Per-task state, folded from state events.
//!
//! The same [`PartitionState::apply`] runs when the router decides live and when it restores a
//! partition from the state topic, so a restored router holds exactly the state it had.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::by_task::ByTask;
use crate::envelope::{
    BreakerPhase, Decision, EventKind, InputRef, StateEvent, Step, TaskEvent, TimerKind, Usage,
};
use crate::steps::Steps;

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepStatus {
    /// Work item sent, no answer yet.
    Pending,
    /// Answered.
    Done,
    /// Given up on by a timer (its timeout, its task's deadline); a late answer is stale.
    Abandoned,
}

/// One step of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// The card that acts.
    pub card: String,
    /// Current attempt.
    pub attempt: u32,
    /// Where it stands.
    pub status: StepStatus,
    /// When its current attempt was sent (the `at` of the decision), ms since the Unix epoch:
    /// its timeout counts from here.
    pub since: i64,
    /// When set, the current attempt's work item is not sent yet: it goes at this time (a
    /// retry's backoff, an open breaker).
    pub not_before: Option<i64>,
    /// The rule that escalated to this step's (human) card: it says how long the step waits.
    pub escalated_by: Option<String>,
    /// Reminders sent for the current attempt.
    pub reminders: u32,
    /// The tasks-topic offset of the input whose decision last sent this step's work item;
    /// `None` when that decision had no input of its own (a timer, an LLM answer) or decided a
    /// queued event. A new owner need not re-send the work item when the previous owner
    /// committed a position past that input (see [`crate::router::resend`]).
    pub sent_by: Option<i64>,
}

impl StepState {
    /// Whether the step waits for an answer to a work item that was sent.
    pub fn is_sent(&self) -> bool {
        self.status == StepStatus::Pending && self.not_before.is_none()
    }
}

/// The state of one active task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    /// The task.
    pub task_id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// The submitted payload.
    pub input: Value,
    /// The event id of the submission (a repeated submission is a duplicate).
    pub submitted_event_id: String,
    /// The task's deadline.
    pub deadline: Option<i64>,
    /// Sequence number of the last state event.
    pub seq: u64,
    /// Steps taken, by step id.
    pub steps: Steps,
    /// Latest output of each card that has answered.
    pub outputs: BTreeMap<String, Value>,
    /// Steps of earlier lives of the task (a redriven task continues after them).
    pub step_base: u32,
    /// The LLM decision the task waits for, if any (boxed: most tasks wait for none).
    pub awaiting: Option<Box<Awaiting>>,
    /// Events that arrived while the task waited for the LLM, oldest first.
    pub queue: VecDeque<Queued>,
    /// Tokens and cost spent so far (agents' results and LLM decisions).
    pub spent: Usage,
    /// The `traceparent` of the task's latest decision (see [`StateEvent::trace`]).
    #[serde(default)]
    pub trace: Option<String>,
}

/// An LLM decision a task waits for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Awaiting {
    /// The rule that asked.
    pub rule_id: String,
    /// The event the rule matched (its payload is what the LLM is shown).
    pub event: TaskEvent,
    /// Where that event was read.
    pub input: Option<InputRef>,
}

/// An event queued behind a pending LLM decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Queued {
    /// The event.
    pub event: TaskEvent,
    /// Where it was read.
    pub input: Option<InputRef>,
}

impl TaskState {
    fn new(event: &TaskEvent, step_base: u32) -> Self {
        Self {
            task_id: event.task_id.clone(),
            tenant: event.tenant.clone(),
            labels: event.labels.clone(),
            input: event.payload.clone(),
            submitted_event_id: event.event_id.clone(),
            deadline: event.deadline,
            seq: 0,
            steps: Steps::default(),
            outputs: BTreeMap::new(),
            step_base,
            awaiting: None,
            queue: VecDeque::new(),
            spent: Usage::default(),
            trace: None,
        }
    }

    /// Steps taken so far (the hop count).
    pub fn hops(&self) -> u32 {
        self.steps.len() as u32
    }

    /// The next step id.
    pub fn next_step(&self) -> u32 {
        self.steps
            .keys()
            .next_back()
            .map_or(self.step_base, |last| *last)
            + 1
    }

    /// Whether the latest step of `card` is done (`also_done` counts as done).
    pub fn latest_done(&self, card: &str, also_done: Option<u32>) -> bool {
        self.steps
            .iter()
            .rev()
            .find(|(_, s)| s.card == card)
            .is_some_and(|(id, s)| s.status == StepStatus::Done || Some(*id) == also_done)
    }

    /// Pending steps other than `except`.
    pub fn pending_except(&self, except: Option<u32>) -> usize {
        self.steps
            .iter()
            .filter(|(id, s)| s.status == StepStatus::Pending && Some(**id) != except)
            .count()
    }

    /// Whether step `step_id` still waits for an answer to `attempt`.
    pub fn waits_for(&self, step_id: u32, attempt: u32) -> bool {
        self.steps
            .get(&step_id)
            .is_some_and(|s| s.status == StepStatus::Pending && s.attempt == attempt)
    }

    /// Pending steps whose work item was sent, with their ids.
    pub fn pending(&self) -> impl Iterator<Item = Step> + '_ {
        self.steps
            .iter()
            .filter(|(_, s)| s.is_sent())
            .map(|(id, s)| Step::new(*id, s.card.clone(), s.attempt))
    }

    /// Marks the pending steps abandoned (`only` alone, when given).
    fn abandon(&mut self, only: Option<u32>) {
        for (id, step) in &mut self.steps {
            if step.status == StepStatus::Pending && only.is_none_or(|o| o == *id) {
                step.status = StepStatus::Abandoned;
            }
        }
    }

    /// Marks `step_id` done; a result's payload becomes its card's latest output.
    fn answer(&mut self, step_id: Option<u32>, event: Option<&TaskEvent>) {
        let Some(step) = step_id.and_then(|id| self.steps.get_mut(&id)) else {
            return;
        };
        step.status = StepStatus::Done;
        if let Some(event) = event.filter(|e| e.kind != EventKind::Failed) {
            self.outputs
                .insert(step.card.clone(), event.payload.clone());
        }
    }
}

/// How a remembered task finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    /// Its last step id (0 if it took none).
    pub last_step: u32,
    /// Whether it ended in the dead-letter topic (a redriven submission may start it again).
    pub dead_lettered: bool,
}

/// A bounded memory of finished tasks.
///
/// Forgetting a task (a dead-lettered task submitted again, a decision taken back) leaves its
/// place in the order behind, marked stale by the filing number it was remembered with, instead
/// of searching the order for it: a search went through up to [`FINISHED_MEMORY`] ids for every
/// such event (with the memory full, 405 µs per dead-lettered task submitted again, in a release
/// build here, so that such submissions alone could hold a router to about 2,500 events/s; 0.3 µs
/// now). Stale places are skipped when the oldest task is forgotten and swept out when they
/// outnumber the tasks remembered.
#[derive(Debug, Clone, Default)]
pub struct FinishedTasks {
    tasks: ByTask<(Finished, u64), Arc<str>>,
    order: VecDeque<(Arc<str>, u64)>,
    filings: u64,
}

/// How many finished task ids a partition remembers.
pub const FINISHED_MEMORY: usize = 100_000;

impl FinishedTasks {
    fn insert(&mut self, task_id: Arc<str>, finished: Finished) {
        if let Some((remembered, _)) = self.tasks.get_mut(&task_id) {
            *remembered = finished;
            return;
        }
        let filing = self.filings;
        self.filings += 1;
        self.tasks.insert(task_id.clone(), (finished, filing));
        self.order.push_back((task_id, filing));
        while self.tasks.len() > FINISHED_MEMORY {
            let Some((old, filing)) = self.order.pop_front() else {
                break;
            };
            if remembers(&self.tasks, &old, filing) {
                self.tasks.remove(&old);
            }
        }
        if self.order.len() > 2 * self.tasks.len().max(FINISHED_MEMORY / 2) {
            let tasks = &self.tasks;
            self.order
                .retain(|(id, filing)| remembers(tasks, id, *filing));
        }
    }

    fn remove(&mut self, task_id: &str) {
        self.tasks.remove(task_id);
    }

    /// How a finished task ended, if it is remembered.
    pub fn get(&self, task_id: &str) -> Option<Finished> {
        self.tasks.get(task_id).map(|(finished, _)| *finished)
    }

    /// The remembered tasks, oldest first: the order in which the memory forgets.
    fn remembered(&self) -> impl Iterator<Item = (&str, Finished)> {
        self.order
            .iter()
            .filter_map(|(id, filing)| match self.tasks.get(id) {
                Some((finished, f)) if f == filing => Some((&**id, *finished)),
                _ => None,
            })
    }
}

/// Whether `tasks` remembers `id` from its filing `filing` (else that place in the order is
/// stale: the task was forgotten, and perhaps remembered again later).
fn remembers(tasks: &ByTask<(Finished, u64), Arc<str>>, id: &str, filing: u64) -> bool {
    tasks.get(id).is_some_and(|(_, f)| *f == filing)
}

/// Two memories are equal when they remember the same tasks in the same order.
impl PartialEq for FinishedTasks {
    fn eq(&self, other: &Self) -> bool {
        self.tasks.len() == other.tasks.len() && self.remembered().eq(other.remembered())
    }
}

/// Serialized as a list of `[task_id, finished]`, oldest first: the order in which the memory
/// forgets.
impl Serialize for FinishedTasks {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.tasks.len()))?;
        for entry in self.remembered() {
            seq.serialize_element(&entry)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for FinishedTasks {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let list = Vec::<(String, Finished)>::deserialize(deserializer)?;
        let mut memory = FinishedTasks::default();
        for (id, finished) in list {
            memory.insert(id.into(), finished);
        }
        Ok(memory)
    }
}

/// What applying one decision may change, kept to take it back when a transaction aborts.
#[derive(Debug, Clone)]
pub struct Undo {
    task_id: String,
    task: Option<Arc<TaskState>>,
    finished: Option<Finished>,
    next_offset: Option<i64>,
    breakers: BTreeMap<String, Breaker>,
}

/// One card's circuit breaker in a partition, as folded from the records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Breaker {
    /// Where it stands.
    pub phase: BreakerPhase,
    /// Until when it stays open.
    pub until: i64,
    /// The probe step of a half-open breaker: task and step.
    pub probe: Option<(String, u32)>,
    /// When it last changed.
    pub since: i64,
    /// When the card's latest failures in a row happened (at most [`FAILURES_KEPT`]).
    pub failures: VecDeque<i64>,
}

/// How many failures in a row a breaker remembers (a card's `breaker.failures` is at most this).
pub const FAILURES_KEPT: usize = 100;

impl Default for Breaker {
    fn default() -> Self {
        Self {
            phase: BreakerPhase::Closed,
            until: 0,
            probe: None,
            since: 0,
            failures: VecDeque::new(),
        }
    }
}

/// What a decision tells a card's breaker: the card answered, or failed (`FAILED`, timed out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    /// The card.
    pub card: String,
    /// The step that answered or failed.
    pub step_id: u32,
    /// Whether it failed.
    pub failed: bool,
}

/// The state of one partition: its active tasks and its recently finished ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionState {
    /// Active tasks. Behind pointers, so that growing the table moves pointers rather than
    /// whole states (with 100,000 open tasks held inline, rehashing took a quarter of the time
    /// per event), and shared, so that a snapshot's copy of the partition, taken on the router's
    /// task, copies pointers (100,000 tasks: 16 ms, against 126 ms deep, 0.35-0.47 s in the
    /// routing benchmark); a change to a task the snapshot still holds copies that task first
    /// ([`Arc::make_mut`]).
    pub tasks: ByTask<Arc<TaskState>, Arc<str>>,
    /// Recently finished tasks.
    pub finished: FinishedTasks,
    /// The next tasks-topic offset to process (one past the last recorded input).
    pub next_offset: Option<i64>,
    /// The current owner's epoch (offset of its ownership record).
    pub epoch: Option<i64>,
    /// The cards' circuit breakers, by card (only cards that answered or failed here).
    pub breakers: BTreeMap<String, Breaker>,
}

impl PartitionState {
    /// Folds one state event read from the state topic at `offset`. Records of a fenced
    /// owner (an epoch other than the current one) are ignored; returns whether it was applied.
    pub fn restore(&mut self, record: &StateEvent, offset: i64) -> bool {
        if let Decision::Owned { .. } = record.decision {
            self.epoch = Some(offset);
            return true;
        }
        if self.epoch.is_some() && self.epoch != Some(record.epoch) {
            return false;
        }
        self.apply(record);
        true
    }

    /// What must be kept to undo the next decision about `task_id`.
    pub fn undo_point(&self, task_id: &str) -> Undo {
        Undo {
            task_id: task_id.to_string(),
            task: self.tasks.get(task_id).cloned(),
            finished: self.finished.get(task_id),
            next_offset: self.next_offset,
            breakers: self.breakers.clone(),
        }
    }

    /// What a decision about `task_id` tells a card's breaker: the step it answered (or that
    /// a timer gave up on) answered or failed. Nothing for a dropped or refused input.
    pub fn signal(
        &self,
        task_id: &str,
        kind: Option<EventKind>,
        timer: Option<&crate::envelope::Firing>,
        answers_step: Option<u32>,
        decision: &Decision,
    ) -> Option<Signal> {
        let counts = !matches!(
            decision,
            Decision::Dropped { .. }
                | Decision::Queued
                | Decision::DeadLettered {
                    ends_task: false,
                    ..
                }
        );
        let step_id = answers_step.filter(|_| counts)?;
        let failed = match (timer.map(|f| f.kind), kind) {
            (Some(TimerKind::StepTimeout), _) | (None, Some(EventKind::Failed)) => true,
            (None, Some(EventKind::Result)) => false,
            _ => return None,
        };
        let card = self.tasks.get(task_id)?.steps.get(&step_id)?.card.clone();
        Some(Signal {
            card,
            step_id,
            failed,
        })
    }

    /// Folds what `record` did to the breakers: a failure in a row, an answer, the changes it
    /// recorded.
    fn apply_breakers(&mut self, record: &StateEvent) {
        let kind = record.event.as_ref().map(|e| e.kind);
        let signal = self.signal(
            &record.task_id,
            kind,
            record.timer.as_ref(),
            record.answers_step,
            &record.decision,
        );
        if let Some(signal) = signal {
            let breaker = self.breakers.entry(signal.card).or_default();
            if signal.failed {
                breaker.failures.push_back(record.at);
                if breaker.failures.len() > FAILURES_KEPT {
                    breaker.failures.pop_front();
                }
            } else {
                breaker.failures.clear();
            }
        }
        for change in &record.breakers {
            let breaker = self.breakers.entry(change.card.clone()).or_default();
            breaker.phase = change.phase;
            breaker.until = change.until.unwrap_or(record.at);
            breaker.probe = change.probe.map(|step| (record.task_id.clone(), step));
            breaker.since = record.at;
            if change.phase != BreakerPhase::HalfOpen {
                breaker.failures.clear();
            }
        }
    }

    /// Takes a decision back (undo points are applied newest first); returns the task it was
    /// about.
    pub fn undo(&mut self, undo: Undo) -> String {
        let task_id = undo.task_id.clone();
        self.undo_into(undo);
        task_id
    }

    fn undo_into(&mut self, undo: Undo) {
        match undo.task {
            Some(task) => self.tasks.insert(undo.task_id.as_str().into(), task),
            None => self.tasks.remove(&undo.task_id),
        };
        match undo.finished {
            Some(f) => self.finished.insert(undo.task_id.into(), f),
            None => self.finished.remove(&undo.task_id),
        }
        self.next_offset = undo.next_offset;
        self.breakers = undo.breakers;
    }

    /// Applies a decision to the state. A record without an event changes no task unless it
    /// decides what follows from a refused write (`rejected`) or a timer (`timer`).
    pub fn apply(&mut self, record: &StateEvent) {
        if let Some(input) = &record.input {
            self.next_offset = Some(self.next_offset.unwrap_or(0).max(input.offset + 1));
        }
        self.apply_breakers(record);
        let event = record.event.as_ref();
        if event.is_none() && record.rejected.is_none() && record.timer.is_none() {
            return;
        }
        let id = &record.task_id;
        if let Some(event) = event {
            self.create(record, event);
        }
        let Some(task) = self.tasks.get_mut(id).map(Arc::make_mut) else {
            if let (
                Some(_),
                Decision::DeadLettered {
                    ends_task: true, ..
                },
            ) = (event, &record.decision)
            {
                let last_step = self.finished.get(id).map_or(0, |f| f.last_step);
                self.finished.insert(
                    id.as_str().into(),
                    Finished {
                        last_step,
                        dead_lettered: true,
                    },
                );
            }
            return;
        };
        task.seq = record.seq;
        if record.trace.is_some() {
            task.trace = record.trace.clone();
        }
        if record.dequeued {
            task.queue.pop_front();
        }
        if record.resolves_llm() {
            task.awaiting = None;
        }
        if let Some(call) = &record.llm {
            task.spent.add(&call.usage);
        }
        if let Some(usage) = record.event_usage() {
            task.spent.add(usage);
        }
        match record.timer.as_ref().map(|f| f.kind) {
            Some(TimerKind::Deadline) => {
                task.deadline = None;
                task.abandon(None);
            }
            Some(TimerKind::StepTimeout | TimerKind::HumanTimeout)
                if record.answers_step.is_some() =>
            {
                task.abandon(record.answers_step);
            }
            _ => {}
        }
        let sent_by = record
            .input
            .as_ref()
            .filter(|_| !record.dequeued)
            .map(|i| i.offset);
        let ends = match (&record.decision, event) {
            (Decision::Owned { .. } | Decision::Dropped { .. }, _) => false,
            (Decision::AwaitingLlm { rule_id }, Some(event)) => {
                task.answer(record.answers_step, Some(event));
                task.awaiting = Some(Box::new(Awaiting {
                    rule_id: rule_id.clone(),
                    event: event.clone(),
                    input: record.input.clone(),
                }));
                false
            }
            (Decision::Queued, Some(event)) => {
                task.queue.push_back(Queued {
                    event: event.clone(),
                    input: record.input.clone(),
                });
                false
            }
            (Decision::AwaitingLlm { .. } | Decision::Queued, None) => false,
            (Decision::Routed { steps, .. }, _) => {
                task.answer(record.answers_step, event);
                add_steps(task, steps, record.at, sent_by);
                false
            }
            (Decision::Escalated { step, rule_id }, _) => {
                task.answer(record.answers_step, event);
                add_steps(task, std::slice::from_ref(step), record.at, sent_by);
                if let Some(s) = task.steps.get_mut(&step.step_id) {
                    s.escalated_by = Some(rule_id.clone());
                }
                false
            }
            (Decision::Recorded, _) => {
                task.answer(record.answers_step, event);
                false
            }
            (Decision::RetryScheduled { step } | Decision::Dispatched { step }, _) => {
                if let Some(s) = task.steps.get_mut(&step.step_id) {
                    s.attempt = step.attempt;
                    s.status = StepStatus::Pending;
                    s.since = record.at;
                    s.not_before = step.delay_ms.map(|d| record.at + d);
                    s.reminders = 0;
                    s.sent_by = sent_by.filter(|_| step.delay_ms.is_none());
                }
                false
            }
            (Decision::Reminded { step }, _) => {
                if let Some(s) = task.steps.get_mut(&step.step_id) {
                    s.reminders += 1;
                    s.sent_by = None;
                }
                false
            }
            (Decision::Completed { .. } | Decision::Cancelled, _) => true,
            (Decision::DeadLettered { ends_task, .. }, _) => *ends_task,
        };
        if ends {
            let finished = Finished {
                last_step: task.next_step() - 1,
                dead_lettered: matches!(record.decision, Decision::DeadLettered { .. }),
            };
            let key = self.tasks.remove_entry(id).map(|(key, _)| key);
            self.finished
                .insert(key.unwrap_or_else(|| id.as_str().into()), finished);
        }
    }

    /// Starts the task a submission's decision starts (a dead-lettered task may start again).
    /// Each lookup hashes the id and probes a large table: a new task costs three (the finished
    /// memory, the open tasks, the insert), a revived one a fourth.
    fn create(&mut self, record: &StateEvent, event: &TaskEvent) {
        let starts = matches!(
            record.decision,
            Decision::Routed { .. }
                | Decision::Completed { .. }
                | Decision::Escalated { .. }
                | Decision::AwaitingLlm { .. }
        );
        if event.kind != EventKind::Submitted || !starts {
            return;
        }
        let id = &event.task_id;
        let finished = self.finished.get(id);
        if finished.is_some_and(|f| !f.dead_lettered) || self.tasks.contains_key(id) {
            return;
        }
        if finished.is_some() {
            self.finished.remove(id);
        }
        let step_base = finished.map_or(0, |f| f.last_step);
        self.tasks.insert(
            id.as_str().into(),
            Arc::new(TaskState::new(event, step_base)),
        );
    }
}

fn add_steps(task: &mut TaskState, steps: &[Step], since: i64, sent_by: Option<i64>) {
    for step in steps {
        task.steps.insert(
            step.step_id,
            StepState {
                card: step.card.clone(),
                attempt: step.attempt,
                status: StepStatus::Pending,
                since,
                not_before: step.delay_ms.map(|d| since + d),
                escalated_by: None,
                reminders: 0,
                sent_by: sent_by.filter(|_| step.delay_ms.is_none()),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended() -> Finished {
        Finished {
            last_step: 1,
            dead_lettered: true,
        }
    }

    #[test]
    fn the_memory_forgets_the_oldest_and_a_task_forgotten_early_is_remembered_anew() {
        let mut memory = FinishedTasks::default();
        for i in 0..FINISHED_MEMORY {
            memory.insert(format!("t{i}").into(), ended());
        }
        memory.remove("t0");
        assert_eq!(memory.get("t0"), None, "submitted again");
        memory.insert("t0".into(), ended());
        memory.insert("new".into(), ended());
        assert_eq!(memory.get("t1"), None, "the oldest is forgotten");
        assert!(memory.get("t0").is_some() && memory.get("t2").is_some());
        let list: Vec<(String, Finished)> =
            serde_json::from_value(serde_json::to_value(&memory).unwrap()).unwrap();
        assert_eq!(list.len(), FINISHED_MEMORY);
        let ids: Vec<&str> = list.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            (ids[0], ids[FINISHED_MEMORY - 2..].to_vec()),
            ("t2", vec!["t0", "new"])
        );
        let read: FinishedTasks =
            serde_json::from_value(serde_json::to_value(&memory).unwrap()).unwrap();
        assert_eq!(read, memory, "the same tasks in the same order");
    }

    #[test]
    fn forgetting_tasks_again_and_again_keeps_the_order_bounded() {
        let mut memory = FinishedTasks::default();
        memory.insert("kept".into(), ended());
        for _ in 0..3 * FINISHED_MEMORY {
            memory.remove("again");
            memory.insert("again".into(), ended());
        }
        assert!(
            memory.order.len() <= FINISHED_MEMORY + 1,
            "{}",
            memory.order.len()
        );
        let remembered: Vec<_> = memory.remembered().map(|(id, _)| id).collect();
        assert_eq!(remembered, ["kept", "again"]);
    }
}

//! Per-task state, folded from state events.
//!
//! The same [`PartitionState::apply`] runs when the router decides live and when it restores a
//! partition from the state topic, so a restored router holds exactly the state it had.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde_json::Value;

use crate::envelope::{Decision, EventKind, InputRef, StateEvent, Step, TaskEvent, Usage};

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    /// Work item sent, no answer yet.
    Pending,
    /// Answered.
    Done,
}

/// One step of a task.
#[derive(Debug, Clone, PartialEq)]
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
}

/// The state of one active task.
#[derive(Debug, Clone, PartialEq)]
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
    pub steps: BTreeMap<u32, StepState>,
    /// Latest output of each card that has answered.
    pub outputs: BTreeMap<String, Value>,
    /// Steps of earlier lives of the task (a redriven task continues after them).
    pub step_base: u32,
    /// The LLM decision the task waits for, if any.
    pub awaiting: Option<Awaiting>,
    /// Events that arrived while the task waited for the LLM, oldest first.
    pub queue: VecDeque<Queued>,
    /// Tokens and cost spent so far (agents' results and LLM decisions).
    pub spent: Usage,
}

/// An LLM decision a task waits for.
#[derive(Debug, Clone, PartialEq)]
pub struct Awaiting {
    /// The rule that asked.
    pub rule_id: String,
    /// The event the rule matched (its payload is what the LLM is shown).
    pub event: TaskEvent,
    /// Where that event was read.
    pub input: Option<InputRef>,
}

/// An event queued behind a pending LLM decision.
#[derive(Debug, Clone, PartialEq)]
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
            steps: BTreeMap::new(),
            outputs: BTreeMap::new(),
            step_base,
            awaiting: None,
            queue: VecDeque::new(),
            spent: Usage::default(),
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

    /// Pending steps with their ids.
    pub fn pending(&self) -> impl Iterator<Item = Step> + '_ {
        self.steps
            .iter()
            .filter(|(_, s)| s.status == StepStatus::Pending)
            .map(|(id, s)| Step {
                step_id: *id,
                card: s.card.clone(),
                attempt: s.attempt,
            })
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// Its last step id (0 if it took none).
    pub last_step: u32,
    /// Whether it ended in the dead-letter topic (a redriven submission may start it again).
    pub dead_lettered: bool,
}

/// A bounded memory of finished tasks.
#[derive(Debug, Clone, Default)]
pub struct FinishedTasks {
    tasks: HashMap<String, Finished>,
    order: VecDeque<String>,
}

/// How many finished task ids a partition remembers.
pub const FINISHED_MEMORY: usize = 100_000;

impl FinishedTasks {
    fn insert(&mut self, task_id: String, finished: Finished) {
        if self.tasks.insert(task_id.clone(), finished).is_none() {
            self.order.push_back(task_id);
            if self.order.len() > FINISHED_MEMORY {
                if let Some(old) = self.order.pop_front() {
                    self.tasks.remove(&old);
                }
            }
        }
    }

    fn remove(&mut self, task_id: &str) {
        if self.tasks.remove(task_id).is_some() {
            self.order.retain(|t| t != task_id);
        }
    }

    /// How a finished task ended, if it is remembered.
    pub fn get(&self, task_id: &str) -> Option<Finished> {
        self.tasks.get(task_id).copied()
    }
}

/// What applying one decision may change, kept to take it back when a transaction aborts.
#[derive(Debug, Clone)]
pub struct Undo {
    task_id: String,
    task: Option<TaskState>,
    finished: Option<Finished>,
    next_offset: Option<i64>,
}

/// The state of one partition: its active tasks and its recently finished ones.
#[derive(Debug, Clone, Default)]
pub struct PartitionState {
    /// Active tasks.
    pub tasks: HashMap<String, TaskState>,
    /// Recently finished tasks.
    pub finished: FinishedTasks,
    /// The next tasks-topic offset to process (one past the last recorded input).
    pub next_offset: Option<i64>,
    /// The current owner's epoch (offset of its ownership record).
    pub epoch: Option<i64>,
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
        }
    }

    /// Takes a decision back (undo points are applied newest first).
    pub fn undo(&mut self, undo: Undo) {
        match undo.task {
            Some(task) => self.tasks.insert(undo.task_id.clone(), task),
            None => self.tasks.remove(&undo.task_id),
        };
        match undo.finished {
            Some(f) => self.finished.insert(undo.task_id, f),
            None => self.finished.remove(&undo.task_id),
        }
        self.next_offset = undo.next_offset;
    }

    /// Applies a decision to the state. A record without an event changes no task unless it
    /// decides what follows from a refused write (`rejected`) or a timer (`timer`).
    pub fn apply(&mut self, record: &StateEvent) {
        if let Some(input) = &record.input {
            self.next_offset = Some(self.next_offset.unwrap_or(0).max(input.offset + 1));
        }
        let event = record.event.as_ref();
        if event.is_none() && record.rejected.is_none() && record.timer.is_none() {
            return;
        }
        let id = &record.task_id;
        if let Some(event) = event {
            self.create(record, event);
        }
        let Some(task) = self.tasks.get_mut(id) else {
            if let (
                Some(_),
                Decision::DeadLettered {
                    ends_task: true, ..
                },
            ) = (event, &record.decision)
            {
                let last_step = self.finished.get(id).map_or(0, |f| f.last_step);
                self.finished.insert(
                    id.clone(),
                    Finished {
                        last_step,
                        dead_lettered: true,
                    },
                );
            }
            return;
        };
        task.seq = record.seq;
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
        let ends = match (&record.decision, event) {
            (Decision::Owned { .. } | Decision::Dropped { .. }, _) => false,
            (Decision::AwaitingLlm { rule_id }, Some(event)) => {
                task.answer(record.answers_step, Some(event));
                task.awaiting = Some(Awaiting {
                    rule_id: rule_id.clone(),
                    event: event.clone(),
                    input: record.input.clone(),
                });
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
                add_steps(task, steps, record.at);
                false
            }
            (Decision::Escalated { step, .. }, _) => {
                task.answer(record.answers_step, event);
                add_steps(task, std::slice::from_ref(step), record.at);
                false
            }
            (Decision::Recorded, _) => {
                task.answer(record.answers_step, event);
                false
            }
            (Decision::RetryScheduled { step }, _) => {
                if let Some(s) = task.steps.get_mut(&step.step_id) {
                    s.attempt = step.attempt;
                    s.status = StepStatus::Pending;
                    s.since = record.at;
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
            self.tasks.remove(id);
            self.finished.insert(id.clone(), finished);
        }
    }

    /// Starts the task a submission's decision starts (a dead-lettered task may start again).
    fn create(&mut self, record: &StateEvent, event: &TaskEvent) {
        let id = &event.task_id;
        let revivable = self.finished.get(id).is_none_or(|f| f.dead_lettered);
        if event.kind == EventKind::Submitted && !self.tasks.contains_key(id) && revivable {
            if let Decision::Routed { .. }
            | Decision::Completed { .. }
            | Decision::Escalated { .. }
            | Decision::AwaitingLlm { .. } = record.decision
            {
                let step_base = self.finished.get(id).map_or(0, |f| f.last_step);
                self.finished.remove(id);
                self.tasks
                    .insert(id.clone(), TaskState::new(event, step_base));
            }
        }
    }
}

fn add_steps(task: &mut TaskState, steps: &[Step], since: i64) {
    for step in steps {
        task.steps.insert(
            step.step_id,
            StepState {
                card: step.card.clone(),
                attempt: step.attempt,
                status: StepStatus::Pending,
                since,
            },
        );
    }
}

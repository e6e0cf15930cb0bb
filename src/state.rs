//! Per-task state, folded from state events.
//!
//! The same [`PartitionState::apply`] runs when the router decides live and when it restores a
//! partition from the state topic, so a restored router holds exactly the state it had.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde_json::Value;

use crate::envelope::{Decision, EventKind, StateEvent, Step, TaskEvent};

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
}

impl TaskState {
    fn new(event: &TaskEvent) -> Self {
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
        }
    }

    /// Steps taken so far (the hop count).
    pub fn hops(&self) -> u32 {
        self.steps.len() as u32
    }

    /// The next step id.
    pub fn next_step(&self) -> u32 {
        self.steps.keys().next_back().map_or(1, |last| last + 1)
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

    fn answer(&mut self, step_id: Option<u32>, event: &TaskEvent) {
        let Some(step) = step_id.and_then(|id| self.steps.get_mut(&id)) else {
            return;
        };
        step.status = StepStatus::Done;
        if event.kind != EventKind::Failed {
            self.outputs
                .insert(step.card.clone(), event.payload.clone());
        }
    }
}

/// A bounded memory of finished tasks: task id → the last step id it had.
#[derive(Debug, Clone, Default)]
pub struct FinishedTasks {
    last_step: HashMap<String, u32>,
    order: VecDeque<String>,
}

/// How many finished task ids a partition remembers.
pub const FINISHED_MEMORY: usize = 100_000;

impl FinishedTasks {
    fn insert(&mut self, task_id: String, last_step: u32) {
        if self.last_step.insert(task_id.clone(), last_step).is_none() {
            self.order.push_back(task_id);
            if self.order.len() > FINISHED_MEMORY {
                if let Some(old) = self.order.pop_front() {
                    self.last_step.remove(&old);
                }
            }
        }
    }

    /// The last step id of a finished task, if it is remembered.
    pub fn last_step(&self, task_id: &str) -> Option<u32> {
        self.last_step.get(task_id).copied()
    }
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

    /// Applies a decision to the state.
    pub fn apply(&mut self, record: &StateEvent) {
        if let Some(input) = &record.input {
            self.next_offset = Some(self.next_offset.unwrap_or(0).max(input.offset + 1));
        }
        let Some(event) = &record.event else { return };
        let id = &event.task_id;
        if event.kind == EventKind::Submitted
            && !self.tasks.contains_key(id)
            && self.finished.last_step(id).is_none()
        {
            if let Decision::Routed { .. }
            | Decision::Completed { .. }
            | Decision::Escalated { .. } = record.decision
            {
                self.tasks.insert(id.clone(), TaskState::new(event));
            }
        }
        let Some(task) = self.tasks.get_mut(id) else {
            if let Decision::DeadLettered {
                ends_task: true, ..
            } = record.decision
            {
                self.finished.insert(id.clone(), 0);
            }
            return;
        };
        task.seq = record.seq;
        let ends = match &record.decision {
            Decision::Owned { .. } | Decision::Dropped { .. } => false,
            Decision::Routed { steps, .. } => {
                task.answer(record.answers_step, event);
                add_steps(task, steps);
                false
            }
            Decision::Escalated { step, .. } => {
                task.answer(record.answers_step, event);
                add_steps(task, std::slice::from_ref(step));
                false
            }
            Decision::Recorded => {
                task.answer(record.answers_step, event);
                false
            }
            Decision::RetryScheduled { step } => {
                if let Some(s) = task.steps.get_mut(&step.step_id) {
                    s.attempt = step.attempt;
                    s.status = StepStatus::Pending;
                }
                false
            }
            Decision::Completed { .. } | Decision::Cancelled => true,
            Decision::DeadLettered { ends_task, .. } => *ends_task,
        };
        if ends {
            let last = task.next_step() - 1;
            self.tasks.remove(id);
            self.finished.insert(id.clone(), last);
        }
    }
}

fn add_steps(task: &mut TaskState, steps: &[Step]) {
    for step in steps {
        task.steps.insert(
            step.step_id,
            StepState {
                card: step.card.clone(),
                attempt: step.attempt,
                status: StepStatus::Pending,
            },
        );
    }
}

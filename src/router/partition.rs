//! The per-event step of one partition, pure: decide what an input (or an LLM answer) does to its
//! task, number the decision after the task's last one, and fold it into the partition's state.
//! No Kafka and no clock (the caller passes `now`, which only stamps the record): the live router
//! drives it, and the engine's unit tests drive the same code. Writing what a decision sends
//! (work items, dead letters) is the caller's business.

use super::engine::{Engine, Outcome};
use super::guard::Raw;
use crate::envelope::{
    DecodeError, Firing, InputRef, LlmRecord, Rejection, StateEvent, TaskEvent, TimerKind,
};
use crate::signing::sha256_hex;
use crate::state::{PartitionState, Undo};

/// One folded decision: its state event and, when asked for, what undoes it.
#[derive(Debug)]
pub struct Step {
    /// The state event, already folded into the partition.
    pub record: StateEvent,
    /// How to take the decision back (exactly-once keeps it until its transaction commits).
    pub undo: Option<Undo>,
}

/// Where an input record was read.
#[derive(Debug, Clone, Copy)]
pub struct Position<'a> {
    /// Its topic.
    pub topic: &'a str,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

/// A partition's state with what its per-event step needs.
pub struct Partition<'a> {
    /// The rules and cards that decide.
    pub engine: &'a Engine,
    /// The partition's state.
    pub state: &'a mut PartitionState,
    /// The instance that records the decisions.
    pub instance: &'a str,
    /// The time stamped on the records, ms since the Unix epoch.
    pub now: i64,
    /// Whether each step keeps what undoes it.
    pub keep_undo: bool,
    /// The `traceparent` of the span the decisions are made in, recorded with them.
    pub trace: Option<String>,
}

impl Partition<'_> {
    /// Decides a record read at `at`: admission, decision, numbering, fold. A record that is not
    /// copied (undecodable, too large) is referred to by its size and SHA-256.
    pub fn decide(
        &mut self,
        at: Position<'_>,
        raw: Raw<'_>,
        decoded: Result<TaskEvent, DecodeError>,
    ) -> Step {
        let (event, outcome) = self.engine.step(self.state, raw, decoded);
        let input = InputRef {
            event_id: event.as_ref().map(|e| e.event_id.clone()),
            topic: at.topic.to_string(),
            partition: at.partition,
            offset: at.offset,
            size: Some(raw.size as u64),
            sha256: event
                .is_none()
                .then(|| sha256_hex(raw.value.unwrap_or_default())),
        };
        let task_id = event
            .as_ref()
            .map(|e| e.task_id.clone())
            .unwrap_or_default();
        self.fold(&task_id, Some(input), event, outcome, false)
    }

    /// Records the LLM's answer `call` for `task_id` and decides, in order, the events queued
    /// behind it. Nothing when the task no longer waits for an answer.
    pub fn resolve(&mut self, task_id: &str, call: &LlmRecord) -> Vec<Step> {
        let Some(task) = self.state.tasks.get(task_id) else {
            return Vec::new();
        };
        let Some(awaiting) = &task.awaiting else {
            return Vec::new();
        };
        let outcome = self.engine.resolve(task, call);
        let event = awaiting.event.clone();
        let mut steps = vec![self.fold(task_id, None, Some(event), outcome, false)];
        steps.extend(self.drain(task_id));
        steps
    }

    /// Decides, in order, the events queued behind `task_id`'s LLM decision, until the queue is
    /// empty or one of them waits for the LLM again.
    pub fn drain(&mut self, task_id: &str) -> Vec<Step> {
        let queue: Vec<_> = match self.state.tasks.get(task_id) {
            Some(task) => task.queue.iter().cloned().collect(),
            None => return Vec::new(),
        };
        let mut steps = Vec::new();
        for queued in queue {
            let waits = self
                .state
                .tasks
                .get(task_id)
                .is_some_and(|t| t.awaiting.is_some());
            if waits {
                break;
            }
            let outcome = self.engine.decide_dequeued(self.state, &queued.event);
            steps.push(self.fold(task_id, queued.input, Some(queued.event), outcome, true));
        }
        steps
    }

    /// The timers of this partition that are due at `now`, oldest first. A task whose deadline
    /// passed fires nothing else.
    pub fn due(&self) -> Vec<(String, Firing)> {
        self.due_among(self.state.tasks.keys().map(|id| &**id))
    }

    /// [`Partition::due`] of the tasks `ids` only (those a [`super::timers::TimerIndex`] says
    /// have a timer due).
    pub fn due_among<'i>(&self, ids: impl IntoIterator<Item = &'i str>) -> Vec<(String, Firing)> {
        let mut due = Vec::new();
        for task in ids.into_iter().filter_map(|id| self.state.tasks.get(id)) {
            let mut timers = self.engine.timers(task);
            timers.retain(|f| f.due <= self.now);
            if let Some(deadline) = timers.iter().position(|f| f.kind == TimerKind::Deadline) {
                timers.swap(0, deadline);
                timers.truncate(1);
            }
            due.extend(timers.into_iter().map(|f| (task.task_id.clone(), f)));
        }
        due.sort_by(|(a, f), (b, g)| (f.due, a, f.step_id).cmp(&(g.due, b, g.step_id)));
        due
    }

    /// Fires a due timer of `task_id`: the decision that follows from it, recorded with the
    /// firing, numbered and folded. `None` when the task is no longer active.
    pub fn fire(&mut self, task_id: &str, firing: Firing) -> Option<Step> {
        let task = self.state.tasks.get(task_id)?;
        let outcome = self.engine.fire(task, &firing);
        let record = self.numbered(task_id, None, None, outcome, false, Some(firing));
        Some(self.fold_record(record))
    }

    /// Ends `task_id` because the broker refused a write of an earlier decision: `outcome` (a
    /// dead letter), recorded with the refusal.
    pub fn refuse(&mut self, task_id: &str, rejection: Rejection, outcome: Outcome) -> Step {
        let mut record = self.numbered(task_id, None, None, outcome, false, None);
        record.rejected = Some(rejection);
        self.fold_record(record)
    }

    fn fold(
        &mut self,
        task_id: &str,
        input: Option<InputRef>,
        event: Option<TaskEvent>,
        outcome: Outcome,
        dequeued: bool,
    ) -> Step {
        let record = self.numbered(task_id, input, event, outcome, dequeued, None);
        self.fold_record(record)
    }

    /// The state event for `outcome` about `task_id` (following from `event` or `timer`), with
    /// the cards' breakers applied, numbered after the task's last one.
    fn numbered(
        &self,
        task_id: &str,
        input: Option<InputRef>,
        event: Option<TaskEvent>,
        outcome: Outcome,
        dequeued: bool,
        timer: Option<Firing>,
    ) -> StateEvent {
        let cause = (event.as_ref().map(|e| e.kind), timer.as_ref());
        let outcome = self
            .engine
            .breakers(self.state, task_id, cause, self.now, outcome);
        StateEvent {
            task_id: task_id.to_string(),
            seq: self.state.tasks.get(task_id).map_or(1, |t| t.seq + 1),
            epoch: self.state.epoch.unwrap_or(-1),
            instance: self.instance.to_string(),
            input,
            event,
            answers_step: outcome.answers_step,
            decision: outcome.decision,
            llm: outcome.llm,
            dequeued,
            rejected: None,
            timer,
            breakers: outcome.breakers,
            trace: self.trace.clone(),
            at: self.now,
        }
    }

    fn fold_record(&mut self, record: StateEvent) -> Step {
        let undo = self
            .keep_undo
            .then(|| self.state.undo_point(&record.task_id));
        self.state.apply(&record);
        Step { record, undo }
    }
}

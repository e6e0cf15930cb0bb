//! Durable time: the timers a task holds, and what each does when it falls due.
//!
//! A timer is not kept anywhere: it follows from the task's state (a deadline, a step waiting
//! to be sent, a sent step and its card's `timeout`, a human step and its escalation), so a
//! restored router holds exactly the timers it held. When one falls due the owning router
//! records the firing and the decision that follows (see [`super::Partition::fire`]); restore
//! and replay read that record, never the clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::engine::{Engine, Outcome};
use crate::by_task::ByTask;
use crate::envelope::{DecidedBy, Decision, Firing, Step, TimerKind};
use crate::rules::{Facts, Kind, HUMAN_TIMEOUT};
use crate::state::{PartitionState, StepStatus, TaskState};

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

impl Engine {
    /// Every timer `task` holds, with its due time: its deadline; for each pending step, its
    /// dispatch (a step waiting to be sent), its timeout (a sent step of a non-human card), or
    /// the timeout and next reminder its escalation gives a human card's step.
    pub fn timers(&self, task: &TaskState) -> Vec<Firing> {
        let mut out = Vec::new();
        if let Some(due) = task.deadline {
            out.push(Firing {
                kind: TimerKind::Deadline,
                due,
                step_id: None,
                attempt: None,
                waited_ms: None,
                max_attempts: None,
            });
        }
        for (id, step) in &task.steps {
            if step.status != StepStatus::Pending {
                continue;
            }
            let timer = |kind, due| Firing {
                kind,
                due,
                step_id: Some(*id),
                attempt: Some(step.attempt),
                waited_ms: None,
                max_attempts: None,
            };
            if let Some(due) = step.not_before {
                out.push(timer(TimerKind::Dispatch, due));
                continue;
            }
            let Some(card) = self.cards.get(&step.card) else {
                continue;
            };
            if !card.is_human() {
                out.push(Firing {
                    waited_ms: Some(ms(card.timeout)),
                    max_attempts: Some(card.retry.max_attempts),
                    ..timer(TimerKind::StepTimeout, step.since + ms(card.timeout))
                });
                continue;
            }
            let escalation = step
                .escalated_by
                .as_deref()
                .and_then(|rule| self.rules.escalation(rule, &step.card));
            let Some(escalation) = escalation else {
                continue;
            };
            let timeout = escalation.timeout.map(|t| step.since + ms(t));
            if let Some(every) = escalation.remind_every {
                let next = step.since + ms(every) * (i64::from(step.reminders) + 1);
                if timeout.is_none_or(|t| next < t) {
                    out.push(timer(TimerKind::Reminder, next));
                }
            }
            if let (Some(due), Some(t)) = (timeout, escalation.timeout) {
                out.push(Firing {
                    waited_ms: Some(ms(t)),
                    ..timer(TimerKind::HumanTimeout, due)
                });
            }
        }
        out
    }

    /// What a timer that fell due does to its task:
    /// - a passed deadline abandons the pending steps and goes to the rule table as
    ///   `DEADLINE_EXCEEDED` (default: dead letter `deadline_exceeded`);
    /// - a step that timed out is tried again while its card allows (after its backoff), then
    ///   goes to its card's fallback, then to the rule table as `TIMED_OUT` (default: dead
    ///   letter `step_timeout`); the late answer of the old attempt is dropped as stale;
    /// - a step waiting to be sent is sent (`DISPATCHED`);
    /// - a human step whose escalation's timeout passed does what the escalation's `then` says
    ///   (default: dead letter `human_timeout`); a reminder sends its work item again.
    ///
    /// A timer the task no longer holds (its step answered, moved on, or its task ended)
    /// fires nothing: `DROPPED stale_timer`.
    pub fn fire(&self, task: &TaskState, firing: &Firing) -> Outcome {
        if !self.timers(task).contains(firing) {
            return Outcome::dropped(firing.step_id, "stale_timer");
        }
        let step_id = firing.step_id.unwrap_or_default();
        let step = task.steps.get(&step_id);
        let outcome = match (firing.kind, step) {
            (TimerKind::Deadline, _) => self.deadline_passed(task, firing.due),
            (TimerKind::StepTimeout, Some(step)) => {
                let message = format!(
                    "card `{}` did not answer step {step_id} (attempt {}) in time",
                    step.card, step.attempt
                );
                self.retry_or_fallback(task, step_id, true)
                    .or_else(|| self.by_rule(Kind::TimedOut, task, Some(step_id)))
                    .unwrap_or_else(|| Outcome {
                        answers_step: Some(step_id),
                        ..Outcome::dead_letter("step_timeout", message, true)
                    })
            }
            (TimerKind::Dispatch, Some(step)) => {
                let step = Step::new(step_id, step.card.clone(), step.attempt);
                Outcome::new(None, Decision::Dispatched { step })
            }
            (TimerKind::Reminder, Some(step)) => {
                let step = Step::new(step_id, step.card.clone(), step.attempt);
                Outcome::new(None, Decision::Reminded { step })
            }
            (TimerKind::HumanTimeout, Some(step)) => {
                let rule_id = step.escalated_by.clone().unwrap_or_default();
                let then = self
                    .rules
                    .escalation(&rule_id, &step.card)
                    .and_then(|e| e.then.as_deref());
                let message = format!(
                    "nobody answered the escalation to `{}` (step {step_id}) in time",
                    step.card
                );
                let by = DecidedBy::Rule {
                    rule_id: rule_id.clone(),
                };
                let at = (task.hops(), task.next_step());
                let decision = self.fallback(then, &rule_id, by, HUMAN_TIMEOUT.into(), message, at);
                Outcome::new(Some(step_id), decision)
            }
            (_, None) => Outcome::dropped(firing.step_id, "stale_timer"),
        };
        self.bounded(Some(task), None, None, outcome)
    }

    /// What a passed deadline does: the first `DEADLINE_EXCEEDED` rule, else a dead letter.
    fn deadline_passed(&self, task: &TaskState, due: i64) -> Outcome {
        self.by_rule(Kind::DeadlineExceeded, task, None)
            .unwrap_or_else(|| {
                let message = format!(
                    "the task's deadline ({due} ms since the epoch) passed with {} step(s) pending",
                    task.pending_except(None)
                );
                Outcome::dead_letter("deadline_exceeded", message, true)
            })
    }

    /// What the first rule about `kind` (a timer's) does to `task`, the step a timer gave up on
    /// being `step_id`. Its facts: the step's card and attempt, the task's labels and input.
    fn by_rule(&self, kind: Kind, task: &TaskState, step_id: Option<u32>) -> Option<Outcome> {
        let step = step_id.and_then(|id| task.steps.get(&id));
        let facts = Facts {
            kind,
            source: step.map(|s| s.card.as_str()),
            labels: &task.labels,
            attempt: step.map_or(0, |s| s.attempt),
            confidence: None,
            payload: &task.input,
        };
        let rule = self
            .rules
            .decide(&facts, |card| task.latest_done(card, None))?;
        let decision = self.act_plainly(&rule.then, &rule.id, task.hops(), task.next_step());
        Some(Outcome::new(step_id, decision))
    }
}

#[cfg(test)]
mod tests {
    use crate::envelope::{Decision, EventKind, StateEvent, TaskEvent, TimerKind};
    use crate::replay::summary;
    use crate::router::testkit::Run;

    const FLOW: &str = r#"
rules:
  - { id: start, when: { kind: SUBMITTED }, then: { route: [a] } }
  - { id: late, when: { kind: DEADLINE_EXCEEDED, labels: { on_deadline: apologise } }, then: { route: [sorry] } }
  - { id: slow, when: { kind: TIMED_OUT, source: a, labels: { on_timeout: complete } }, then: complete }
  - { id: ask, when: { source: a }, then: { escalate: { card: h, timeout: 2s, then: dead_letter, remind_every: 500ms } } }
  - { id: done, when: { source: [h, sorry] }, then: complete }
"#;

    /// Card `a` times out after 1 s and has 3 attempts, 1 s apart, then 2 s.
    fn flow() -> Run {
        let a = "timeout: 1s\nretry: {max_attempts: 3, backoff: {initial: 1s, multiplier: 2}}";
        Run::with(FLOW, &[("a", a), ("h", ""), ("sorry", "")])
    }

    fn summaries(records: &[StateEvent]) -> Vec<String> {
        records.iter().map(|r| summary(&r.decision)).collect()
    }

    fn submitted(labels: &[(&str, &str)]) -> TaskEvent {
        let mut e = TaskEvent::new("t1", EventKind::Submitted, "client");
        for (k, v) in labels {
            e.labels.insert(k.to_string(), v.to_string());
        }
        e
    }

    #[test]
    fn the_index_names_the_tasks_with_a_timer_due_and_counts_every_timer() {
        let mut run = flow();
        for id in ["t1", "t2"] {
            let mut e = submitted(&[]);
            e.task_id = id.into();
            run.send_at(0, e);
        }
        let mut index = super::TimerIndex::build(&run.engine, &run.state);
        assert_eq!(index.pending(), 2, "one step timeout each");
        assert!(index.due(999).is_empty());
        let mut due = index.due(run.engine.timers(&run.state.tasks["t1"])[0].due);
        due.sort();
        assert_eq!(due, ["t1", "t2"]);
        let full = run.partition_at(5_000).due();
        let among = run
            .partition_at(5_000)
            .due_among(index.due(5_000).iter().map(String::as_str));
        assert_eq!(
            full, among,
            "the index finds what a scan of every task finds"
        );
        run.state.tasks.remove("t2");
        index.refresh(&run.engine, "t2", None);
        assert_eq!(index.pending(), 1);
        assert_eq!(index.due(5_000), ["t1"]);
        let step_due = run.engine.timers(&run.state.tasks["t1"])[0].due;
        let mut t1 = run.state.tasks["t1"].as_ref().clone();
        t1.deadline = Some(step_due);
        index.refresh(&run.engine, "t1", Some((&"t1".into(), &t1)));
        assert_eq!(
            index.pending(),
            2,
            "a deadline at the same time: one more timer"
        );
        assert_eq!(index.due(step_due), ["t1"]);
        t1.deadline = Some(500);
        index.refresh(&run.engine, "t1", Some((&"t1".into(), &t1)));
        assert_eq!(index.pending(), 2);
        assert!(index.due(499).is_empty());
        assert_eq!(index.due(500), ["t1"], "filed again by its earliest timer");
    }

    #[test]
    fn a_timed_out_step_is_retried_after_its_backoff_and_its_late_answer_is_stale() {
        let mut run = flow();
        run.send_at(0, submitted(&[]));
        assert!(run.tick(999).is_empty(), "nothing before the timeout");
        let fired = run.tick(1_000);
        assert_eq!(summaries(&fired), ["RETRY a"]);
        let Decision::RetryScheduled { step } = &fired[0].decision else {
            panic!()
        };
        assert_eq!((step.attempt, step.delay_ms), (2, Some(1_000)));
        assert_eq!(
            fired[0].timer.as_ref().unwrap().kind,
            TimerKind::StepTimeout
        );
        let early = run.answer(EventKind::Result, 1, 2, None);
        let refused = run.send_at(1_200, early);
        assert_eq!(
            summary(&refused.decision),
            "DEAD_LETTERED unknown_attempt",
            "attempt 2 is not sent yet"
        );
        let stale = run.send_at(1_300, run.answer(EventKind::Result, 1, 1, None));
        assert_eq!(summary(&stale.decision), "DROPPED stale_attempt");
        assert!(run.tick(1_999).is_empty());
        let sent = run.tick(2_000);
        assert_eq!(summaries(&sent), ["DISPATCHED"]);
        assert_eq!(sent[0].timer.as_ref().unwrap().due, 2_000);
        // Attempt 2 times out a second after it was sent; attempt 3 waits 2 s (1 s × 2).
        let fired = run.tick(3_000);
        let Decision::RetryScheduled { step } = &fired[0].decision else {
            panic!("{fired:?}")
        };
        assert_eq!((step.attempt, step.delay_ms), (3, Some(2_000)));
        assert!(run.tick(4_999).is_empty());
        assert_eq!(summaries(&run.tick(5_000)), ["DISPATCHED"]);
        let gave_up = run.tick(6_000);
        assert_eq!(summaries(&gave_up), ["DEAD_LETTERED step_timeout"]);
        assert!(run.state.tasks.is_empty());
    }

    #[test]
    fn timed_out_and_deadline_exceeded_go_through_the_rule_table() {
        let mut run = flow();
        run.send_at(0, submitted(&[("on_timeout", "complete")]));
        for now in [1_000, 2_000, 3_000, 5_000] {
            run.tick(now);
        }
        let last = run.tick(6_000);
        assert_eq!(summaries(&last), ["COMPLETED"], "rule `slow`");

        let mut run = run_with_deadline(&[("on_deadline", "apologise")]);
        let fired = run.tick(500);
        assert_eq!(summaries(&fired), ["ROUTED sorry"], "rule `late`");
        assert_eq!(fired[0].timer.as_ref().unwrap().kind, TimerKind::Deadline);
        let late = run.send_at(600, run.answer(EventKind::Result, 1, 1, None));
        assert_eq!(
            summary(&late.decision),
            "DROPPED stale_attempt",
            "the abandoned step's late result"
        );
        assert!(
            run.tick(10_000)
                .iter()
                .all(|r| r.timer.as_ref().unwrap().kind != TimerKind::Deadline),
            "a deadline fires once"
        );
        let done = run.send_at(700, run.answer(EventKind::Result, 2, 1, None));
        assert_eq!(summary(&done.decision), "COMPLETED");

        let mut run = run_with_deadline(&[]);
        assert_eq!(
            summaries(&run.tick(500)),
            ["DEAD_LETTERED deadline_exceeded"]
        );
    }

    fn run_with_deadline(labels: &[(&str, &str)]) -> Run {
        let mut run = flow();
        let mut task = submitted(labels);
        task.deadline = Some(500);
        run.send_at(0, task);
        run
    }

    #[test]
    fn a_human_wait_reminds_then_times_out_and_an_answer_in_time_fires_nothing() {
        let mut run = flow();
        run.send_at(0, submitted(&[]));
        let escalated = run.send_at(100, run.answer(EventKind::Result, 1, 1, None));
        assert_eq!(summary(&escalated.decision), "ESCALATED h");
        assert_eq!(summaries(&run.tick(600)), ["REMINDED"]);
        assert!(
            run.tick(1_000).is_empty(),
            "the next reminder is due at 1.1 s"
        );
        assert_eq!(summaries(&run.tick(1_100)), ["REMINDED"]);
        run.tick(1_600);
        let timed_out = run.tick(2_100);
        assert_eq!(summaries(&timed_out), ["DEAD_LETTERED human_timeout"]);
        assert_eq!(timed_out[0].timer.as_ref().unwrap().waited_ms, Some(2_000));
        assert!(run.state.tasks.is_empty());

        let mut run = flow();
        run.send_at(0, submitted(&[]));
        run.send_at(100, run.answer(EventKind::Result, 1, 1, None));
        let mut answer = run.answer(EventKind::HumanDecision, 2, 1, None);
        answer.source = "alice".into();
        assert_eq!(summary(&run.send_at(1_500, answer).decision), "COMPLETED");
        assert!(
            run.tick(10_000).is_empty(),
            "the answered wait fires nothing"
        );
    }

    #[test]
    fn cancel_drops_every_timer_and_a_stale_firing_does_nothing() {
        let mut run = flow();
        let mut task = submitted(&[]);
        task.deadline = Some(60_000);
        run.send_at(0, task);
        run.tick(1_000);
        let held = run.engine.timers(&run.state.tasks["t1"]);
        let kinds: Vec<_> = held.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, [TimerKind::Deadline, TimerKind::Dispatch]);
        let stale = held[1].clone();
        run.send_at(1_100, TaskEvent::new("t1", EventKind::Cancel, "client"));
        assert!(run.tick(100_000).is_empty());
        assert!(run.partition_at(2_000).fire("t1", stale).is_none());
    }

    #[test]
    fn jitter_is_derived_from_task_step_and_attempt() {
        let backoff = crate::cards::Backoff {
            jitter: 0.5,
            ..Default::default()
        };
        let delays: Vec<i64> = (0..50)
            .map(|i| backoff.delay_ms(&format!("t{i}"), 1, 3))
            .collect();
        assert!(
            delays.iter().all(|d| (1_000..=2_000).contains(d)),
            "{delays:?}"
        );
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 40, "spread: {delays:?}");
        assert_eq!(
            backoff.delay_ms("t7", 1, 3),
            delays[7],
            "the same every time"
        );
        let capped = crate::cards::Backoff::default().delay_ms("t", 1, 30);
        assert_eq!(capped, 60_000, "at most `max`");
    }
}

/// A partition's tasks by when their next timer falls due, so that a tick looks only at the tasks
/// with a timer due instead of at every task. The router refreshes a task's entry after each
/// decision about it (and after taking one back); timers depend on the task and the engine only.
///
/// Filed by (due time, filing number): tasks decided in one batch fall due in the same
/// millisecond, and a key of (due time, task id) compared their ids, byte by byte, at every node
/// of the tree (`scripts/bench-decide --instructions`: about 1,500 instructions per insert).
/// Both maps share the partition's own copy of each task id.
#[derive(Debug, Default)]
pub struct TimerIndex {
    by_due: BTreeMap<(i64, u64), Arc<str>>,
    tasks: ByTask<Filed, Arc<str>>,
    filings: u64,
    pending: usize,
}

/// Where a task is filed in a [`TimerIndex`], and how many timers it holds.
#[derive(Debug, Clone, Copy)]
struct Filed {
    key: (i64, u64),
    held: usize,
}

impl TimerIndex {
    /// The index of every task of `state`.
    pub fn build(engine: &Engine, state: &PartitionState) -> Self {
        let mut index = Self::default();
        for (id, task) in &state.tasks {
            index.refresh(engine, id, Some((id, task)));
        }
        index
    }

    /// Files `task_id` again by its next timer (`task`: its id as the partition's map holds it,
    /// shared with the index, and its state now; `None` when it is gone).
    pub fn refresh(
        &mut self,
        engine: &Engine,
        task_id: &str,
        task: Option<(&Arc<str>, &TaskState)>,
    ) {
        let next = task.and_then(|(id, task)| {
            let timers = engine.timers(task);
            let due = timers.iter().map(|f| f.due).min()?;
            Some((id, due, timers.len()))
        });
        let Some((id, due, held)) = next else {
            if let Some(Filed { key, held }) = self.tasks.remove(task_id) {
                self.by_due.remove(&key);
                self.pending -= held;
            }
            return;
        };
        // One lookup, whether the task is new (the common case) or filed already.
        let key = (due, self.filings);
        let (filed, new) = self
            .tasks
            .get_or_insert_with(id.clone(), || Filed { key, held: 0 });
        self.pending = self.pending - filed.held + held;
        filed.held = held;
        if !new && filed.key.0 == due {
            return;
        }
        if !new {
            self.by_due.remove(&filed.key);
        }
        filed.key = key;
        self.filings += 1;
        self.by_due.insert(key, id.clone());
    }

    /// The tasks with a timer due at `now`, in no particular order.
    pub fn due(&self, now: i64) -> Vec<String> {
        self.by_due
            .range(..=(now, u64::MAX))
            .map(|(_, id)| id.to_string())
            .collect()
    }

    /// Whether a timer is due at `now`.
    pub fn any_due(&self, now: i64) -> bool {
        self.by_due
            .first_key_value()
            .is_some_and(|((due, _), _)| *due <= now)
    }

    /// Timers the partition holds, due or not.
    pub fn pending(&self) -> usize {
        self.pending
    }
}

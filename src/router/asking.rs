//! LLM questions in flight and answers waiting for their partition: what each one is about, so
//! that an answer is applied only to the decision it was asked for.
//!
//! A question outlives its partition's ownership. When a partition is revoked (a rebalance, an
//! expired session, a producer started over) and comes back to the same instance, its tasks are
//! not asked about again: a question still in flight is awaited, and an answer that came while
//! the partition was away is used (a model call costs time and money). An answer whose task
//! waits on another question by then (another owner decided meanwhile and the task moved on), or
//! no longer waits, is dropped; so is one whose partition has not come back within about
//! [`PARKED_FOR`].

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::envelope::LlmRecord;
use crate::state::Awaiting;

/// What a question is about: the rule that asked and the event it matched. A decision whose
/// event has no recorded position is identified by the ownership epoch it was asked under
/// instead, so its answer is applied only within that epoch.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Question {
    rule_id: String,
    about: About,
}

#[derive(Debug, Clone, PartialEq)]
enum About {
    /// The event's topic, partition and offset.
    Input(String, i32, i64),
    Epoch(Option<i64>),
}

impl Question {
    /// The question `awaiting` asks, under the partition's ownership `epoch`.
    pub(super) fn of(awaiting: &Awaiting, epoch: Option<i64>) -> Self {
        Self {
            rule_id: awaiting.rule_id.clone(),
            about: match &awaiting.input {
                Some(input) => About::Input(input.topic.clone(), input.partition, input.offset),
                None => About::Epoch(epoch),
            },
        }
    }

    /// Whether a task that waits on `awaiting` under `epoch` waits on this question.
    pub(super) fn asked_by(&self, awaiting: &Awaiting, epoch: Option<i64>) -> bool {
        *self == Self::of(awaiting, epoch)
    }
}

/// The decider's answer to `question`, asked for `task_id` of `partition`.
pub(super) struct Answer {
    pub(super) partition: i32,
    pub(super) task_id: String,
    pub(super) question: Question,
    pub(super) call: LlmRecord,
}

/// How long an answer whose partition is not owned is kept for the partition's return.
pub(super) const PARKED_FOR: Duration = Duration::from_secs(600);

/// The questions this instance is asking and the answers it holds for partitions it does not
/// own now, by partition and task.
#[derive(Default)]
pub(super) struct Questions {
    asking: HashSet<(i32, String)>,
    parked: HashMap<(i32, String), (Instant, Answer)>,
    /// When the parked answers were last swept for old ones.
    swept: Option<Instant>,
}

/// How often the parked answers are swept: a sweep reads them all, and thousands can be parked
/// at once when a busy partition is revoked.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

impl Questions {
    /// Starts asking about `task_id` of `p`: `false` when it is being asked already.
    pub(super) fn start(&mut self, p: i32, task_id: &str) -> bool {
        self.asking.insert((p, task_id.to_string()))
    }

    /// The answer held for `task_id` of `p` if it answers the question the task waits on
    /// (`awaiting`, under `epoch`); an answer to another question is dropped.
    pub(super) fn parked(
        &mut self,
        p: i32,
        task_id: &str,
        awaiting: &Awaiting,
        epoch: Option<i64>,
    ) -> Option<Answer> {
        let (_, answer) = self.parked.remove(&(p, task_id.to_string()))?;
        answer.question.asked_by(awaiting, epoch).then_some(answer)
    }

    /// `answer` came back: it is no longer being asked.
    pub(super) fn answered(&mut self, answer: &Answer) {
        self.asking
            .remove(&(answer.partition, answer.task_id.clone()));
    }

    /// Keeps `answer`, whose partition is not owned, for the partition's return; drops the
    /// answers kept longer than [`PARKED_FOR`] (swept at most once a minute).
    pub(super) fn park(&mut self, answer: Answer, now: Instant) {
        if self
            .swept
            .is_none_or(|swept| now.duration_since(swept) >= SWEEP_EVERY)
        {
            self.parked
                .retain(|_, (at, _)| now.duration_since(*at) < PARKED_FOR);
            self.swept = Some(now);
        }
        let key = (answer.partition, answer.task_id.clone());
        self.parked.insert(key, (now, answer));
    }

    /// Questions being asked.
    pub(super) fn pending(&self) -> usize {
        self.asking.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{EventKind, InputRef, TaskEvent};

    fn awaiting(rule: &str, offset: Option<i64>) -> Awaiting {
        Awaiting {
            rule_id: rule.into(),
            event: TaskEvent::new("t", EventKind::Submitted, "test"),
            input: offset.map(|offset| InputRef {
                event_id: None,
                topic: "tasks".into(),
                partition: 0,
                offset,
                size: None,
                sha256: None,
            }),
        }
    }

    #[test]
    fn a_question_is_its_rule_and_event_whatever_the_epoch() {
        let asked = Question::of(&awaiting("triage", Some(7)), Some(3));
        assert!(asked.asked_by(&awaiting("triage", Some(7)), Some(4)));
        assert!(!asked.asked_by(&awaiting("triage", Some(9)), Some(3)));
        assert!(!asked.asked_by(&awaiting("other", Some(7)), Some(3)));
    }

    #[test]
    fn a_question_about_an_unplaced_event_holds_only_within_its_epoch() {
        let asked = Question::of(&awaiting("triage", None), Some(3));
        assert!(asked.asked_by(&awaiting("triage", None), Some(3)));
        assert!(!asked.asked_by(&awaiting("triage", None), Some(4)));
    }

    fn answer(task_id: &str, asked: &Awaiting) -> Answer {
        Answer {
            partition: 1,
            task_id: task_id.into(),
            question: Question::of(asked, Some(3)),
            call: LlmRecord::default(),
        }
    }

    #[test]
    fn a_parked_answer_is_used_once_and_only_for_its_question() {
        let (asked, now) = (awaiting("triage", Some(7)), Instant::now());
        let mut questions = Questions::default();
        assert!(questions.start(1, "a"));
        assert!(!questions.start(1, "a"), "asked once at a time");
        questions.answered(&answer("a", &asked));
        assert_eq!(questions.pending(), 0);
        questions.park(answer("a", &asked), now);
        questions.park(answer("b", &asked), now);
        assert!(questions.parked(1, "a", &asked, Some(5)).is_some());
        assert!(
            questions.parked(1, "a", &asked, Some(5)).is_none(),
            "used once"
        );
        let moved_on = awaiting("triage", Some(12));
        assert!(questions.parked(1, "b", &moved_on, Some(5)).is_none());
        assert!(
            questions.parked(1, "b", &asked, Some(5)).is_none(),
            "an answer to another question is dropped"
        );
    }

    #[test]
    fn parked_answers_are_dropped_after_a_while() {
        let (asked, then) = (awaiting("triage", Some(7)), Instant::now());
        let mut questions = Questions::default();
        questions.park(answer("old", &asked), then);
        questions.park(answer("new", &asked), then + PARKED_FOR);
        assert!(questions.parked(1, "old", &asked, None).is_none());
        assert!(questions.parked(1, "new", &asked, None).is_some());
    }
}

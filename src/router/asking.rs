//! LLM questions in flight: what each one is about, so that an answer is applied only to the
//! decision it was asked for.
//!
//! A question outlives its partition's ownership: when a partition is revoked (a rebalance, an
//! expired session, a producer started over) and comes back to the same instance while the
//! question is still being asked, the answer is used instead of asking the model again (a call
//! costs time and money). An answer whose task waits on another question by then (another owner
//! decided meanwhile and the task moved on), or no longer waits, is dropped.

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
}

//! What a new owner re-sends when it takes a partition over: only the work items of decisions
//! whose writes are not known to have completed.
//!
//! Exactly-once: a decision and its work items commit in one transaction, so a restored decision
//! has its work items and nothing is re-sent. Effectively-once: the router commits a tasks
//! partition's position only after the batch that decided the inputs before it is written, work
//! items included. So a step sent by the decision of an input before the committed position has
//! its work item. Every other pending step's work item is sent again: one whose decision had no
//! input of its own (a timer, an LLM answer), decided a queued event, or came after the
//! position. Position commits are asynchronous; a lost one only makes the new owner re-send
//! more, never less.

use std::sync::Arc;

use crate::commit::ConsistencyMode;
use crate::envelope::Step;
use crate::state::{PartitionState, TaskState};

/// The pending steps of `state` whose work items may be missing, given the tasks partition's
/// `committed` position (none when it could not be read) in `mode`.
pub fn missing(
    state: &PartitionState,
    committed: Option<i64>,
    mode: ConsistencyMode,
) -> Vec<(&TaskState, Step)> {
    if mode.writes_atomically() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for task in state.tasks.values().map(Arc::as_ref) {
        for step in task.pending() {
            let sent_by = task.steps.get(&step.step_id).and_then(|s| s.sent_by);
            let delivered = sent_by
                .zip(committed)
                .is_some_and(|(input, position)| input < position);
            if !delivered {
                out.push((task, step));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{EventKind, TaskEvent};
    use crate::router::testkit::{Run, RULES};

    #[test]
    fn only_steps_sent_after_the_committed_position_or_without_an_input_are_missing() {
        let mut run = Run::new(RULES, &["a", "b", "c", "h"]);
        for task in ["t1", "t2", "t3"] {
            run.send(TaskEvent::new(task, EventKind::Submitted, "client"));
        }
        let effectively = ConsistencyMode::EffectivelyOnce;
        let count = |run: &Run, committed| missing(&run.state, committed, effectively).len();
        assert_eq!(count(&run, None), 6, "no position: every pending step");
        assert_eq!(
            count(&run, Some(3)),
            2,
            "t3's input (offset 3) is not before position 3"
        );
        assert_eq!(count(&run, Some(4)), 0);
        assert!(missing(&run.state, None, ConsistencyMode::ExactlyOnce).is_empty());
        let mut run = Run::with(
            RULES,
            &[("a", "timeout: 1s"), ("b", ""), ("c", ""), ("h", "")],
        );
        run.send(TaskEvent::new("t1", EventKind::Submitted, "client"));
        run.tick(1_000);
        run.tick(2_000);
        let steps: Vec<u32> = missing(&run.state, Some(100), effectively)
            .iter()
            .map(|(_, s)| s.step_id)
            .collect();
        assert_eq!(
            steps,
            [1],
            "a retry sent by a timer has no input to vouch for it"
        );
    }
}

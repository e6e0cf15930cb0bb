//! Per-card circuit breakers: after `breaker.failures` failures or timeouts of a card in a row,
//! new work for the card goes to its fallback card (or waits) for `open_for`; then one probe
//! step is let through, and the card's next answer closes the breaker again (a failure opens it
//! for another `open_for`).
//!
//! Each partition keeps its own breakers, folded from its state topic. A decision that changes a
//! breaker records the change ([`BreakerChange`]), and the time it depends on is the record's
//! own `at`, so restore and replay hold and reproduce the same breakers without a clock.

use std::collections::BTreeMap;

use super::engine::{Engine, Outcome};
use crate::cards::{BreakerPolicy, WhenOpen};
use crate::envelope::{BreakerChange, BreakerPhase, DecidedBy, Decision, EventKind, Firing, Step};
use crate::state::{Breaker, PartitionState, Signal};

fn ms(d: std::time::Duration) -> i64 {
    d.as_millis() as i64
}

/// Where the breakers a decision touches stand, as the decision goes.
struct View<'a> {
    state: &'a PartitionState,
    changed: BTreeMap<String, Breaker>,
    changes: Vec<BreakerChange>,
    task_id: &'a str,
    at: i64,
}

impl View<'_> {
    fn get(&self, card: &str) -> Breaker {
        self.changed
            .get(card)
            .or_else(|| self.state.breakers.get(card))
            .cloned()
            .unwrap_or_default()
    }

    fn change(&mut self, card: &str, phase: BreakerPhase, until: i64, probe: Option<u32>) {
        let breaker = Breaker {
            phase,
            until,
            probe: probe.map(|s| (self.task_id.to_string(), s)),
            since: self.at,
            failures: Default::default(),
        };
        self.changed.insert(card.to_string(), breaker);
        self.changes.push(BreakerChange {
            card: card.to_string(),
            phase,
            until: (phase == BreakerPhase::Open).then_some(until),
            probe,
        });
    }

    /// Folds what the decision says of `signal.card` (with breaker `policy`).
    fn observe(&mut self, signal: &Signal, policy: &BreakerPolicy) {
        let breaker = self.get(&signal.card);
        let open_until = self.at + ms(policy.open_for);
        if !signal.failed {
            if breaker.phase != BreakerPhase::Closed {
                self.change(&signal.card, BreakerPhase::Closed, self.at, None);
            }
            return;
        }
        let probe = Some((self.task_id.to_string(), signal.step_id));
        match breaker.phase {
            BreakerPhase::HalfOpen if breaker.probe == probe => {
                self.change(&signal.card, BreakerPhase::Open, open_until, None);
            }
            BreakerPhase::Closed => {
                let (mut count, mut last) = (1, self.at);
                for &failed in breaker.failures.iter().rev() {
                    if last - failed > ms(policy.window) {
                        break;
                    }
                    (count, last) = (count + 1, failed);
                }
                if count >= policy.failures {
                    self.change(&signal.card, BreakerPhase::Open, open_until, None);
                }
            }
            _ => {}
        }
    }

    /// Whether new work for `card` may go to it now: a closed breaker, or the one probe of a
    /// breaker whose `open_for` has passed (recorded). `Err` holds how long the work would wait.
    fn admit(&mut self, card: &str, step_id: u32, policy: &BreakerPolicy) -> Result<(), i64> {
        let breaker = self.get(card);
        let probe_due = match breaker.phase {
            BreakerPhase::Closed => return Ok(()),
            BreakerPhase::Open => self.at >= breaker.until,
            BreakerPhase::HalfOpen => self.at >= breaker.since + ms(policy.open_for),
        };
        if probe_due {
            self.change(card, BreakerPhase::HalfOpen, self.at, Some(step_id));
            return Ok(());
        }
        match breaker.phase {
            BreakerPhase::Open => Err(breaker.until - self.at),
            _ => Err(breaker.since + ms(policy.open_for) - self.at),
        }
    }
}

impl Engine {
    /// `outcome` for `task_id`, following from an event of `kind` or from `timer`, with the
    /// cards' circuit breakers applied at `at` (the record's time): the answer or failure it
    /// records (see [`PartitionState::signal`]) may open or close its card's breaker, and work it
    /// sends to a card whose breaker holds work back goes to the card's fallback (with
    /// `instead_of` set) or waits (`delay_ms`). The changes are in `outcome.breakers`.
    pub fn breakers(
        &self,
        state: &PartitionState,
        task_id: &str,
        (kind, timer): (Option<EventKind>, Option<&Firing>),
        at: i64,
        mut outcome: Outcome,
    ) -> Outcome {
        let signal = state.signal(
            task_id,
            kind,
            timer,
            outcome.answers_step,
            &outcome.decision,
        );
        let mut view = View {
            state,
            changed: BTreeMap::new(),
            changes: Vec::new(),
            task_id,
            at,
        };
        let policy = |card: &str| self.cards.get(card).and_then(|c| c.breaker.as_ref());
        if let Some(signal) = &signal {
            if let Some(policy) = policy(&signal.card) {
                view.observe(signal, policy);
            }
        }
        let sends = matches!(
            outcome.decision,
            Decision::Routed { .. } | Decision::RetryScheduled { .. } | Decision::Dispatched { .. }
        );
        let held: Vec<(usize, i64)> = match sends {
            true => outcome
                .decision
                .steps()
                .iter()
                .enumerate()
                .filter(|(_, step)| step.delay_ms.is_none())
                .filter_map(|(i, step)| {
                    let policy = policy(&step.card)?;
                    view.admit(&step.card, step.step_id, policy)
                        .err()
                        .map(|wait| (i, wait))
                })
                .collect(),
            false => Vec::new(),
        };
        for (i, wait) in held {
            outcome = self.hold(state, task_id, outcome, i, wait);
        }
        outcome.breakers = view.changes;
        outcome
    }

    /// `outcome` with its `i`th step held back by its card's breaker: sent to the card's
    /// fallback, or waiting `wait` ms (`when_open: wait`).
    fn hold(
        &self,
        state: &PartitionState,
        task_id: &str,
        mut outcome: Outcome,
        i: usize,
        wait: i64,
    ) -> Outcome {
        let card = outcome.decision.steps()[i].card.clone();
        let Some(policy_card) = self.cards.get(&card) else {
            return outcome;
        };
        let fallback = match (&policy_card.breaker, &policy_card.fallback) {
            (Some(b), Some(fallback)) if b.when_open == WhenOpen::Fallback => fallback.clone(),
            _ => {
                if let Some(step) = steps_mut(&mut outcome.decision).get_mut(i) {
                    step.delay_ms = Some(wait.max(1));
                }
                return outcome;
            }
        };
        if let Decision::Routed { steps, .. } = &mut outcome.decision {
            steps[i].instead_of = Some(std::mem::replace(&mut steps[i].card, fallback));
            return outcome;
        }
        let Some(task) = state.tasks.get(task_id) else {
            return outcome;
        };
        let old = outcome.decision.steps()[i].step_id;
        let by = DecidedBy::Fallback {
            failed_card: card.clone(),
        };
        let mut decision = self.route(task.hops(), task.next_step(), &[fallback], by);
        if let Decision::Routed { steps, .. } = &mut decision {
            steps[0].instead_of = Some(card);
        }
        Outcome {
            answers_step: outcome.answers_step.or(Some(old)),
            decision,
            ..outcome
        }
    }
}

/// The steps of a decision, to change one.
fn steps_mut(decision: &mut Decision) -> &mut [Step] {
    match decision {
        Decision::Routed { steps, .. } => steps,
        Decision::Escalated { step, .. }
        | Decision::RetryScheduled { step }
        | Decision::Dispatched { step }
        | Decision::Reminded { step } => std::slice::from_mut(step),
        _ => &mut [],
    }
}

#[cfg(test)]
mod tests {
    use crate::envelope::{BreakerPhase, Decision, EventKind, StateEvent, TaskEvent};
    use crate::replay::summary;
    use crate::router::testkit::Run;

    const FLOW: &str = r#"
rules:
  - { id: start, when: { kind: SUBMITTED }, then: { route: [a] } }
  - { id: done, when: { source: [a, b] }, then: complete }
"#;

    fn flow(when_open: &str) -> Run {
        let a = format!(
            "retry: {{max_attempts: 1}}\nfallback: b\nbreaker: {{failures: 3, window: 10s, open_for: 5s, when_open: {when_open}}}"
        );
        Run::with(FLOW, &[("a", &a), ("b", "")])
    }

    fn submit(run: &mut Run, at: i64, task: &str) -> StateEvent {
        run.send_at(at, TaskEvent::new(task, EventKind::Submitted, "client"))
    }

    fn answer(run: &mut Run, at: i64, task: &str, kind: EventKind) -> StateEvent {
        let mut e = TaskEvent::new(task, kind, "a");
        e.step_id = Some(1);
        e.attempt = Some(1);
        run.send_at(at, e)
    }

    fn phases(record: &StateEvent) -> Vec<(String, BreakerPhase, Option<i64>)> {
        let b = record.breakers.iter();
        b.map(|b| (b.card.clone(), b.phase, b.until)).collect()
    }

    fn cards(record: &StateEvent) -> Vec<(String, Option<String>)> {
        let steps = record.decision.steps().iter();
        steps
            .map(|s| (s.card.clone(), s.instead_of.clone()))
            .collect()
    }

    #[test]
    fn failures_in_a_row_open_the_breaker_and_a_probe_closes_it() {
        let mut run = flow("fallback");
        for (i, at) in [100, 200, 300].into_iter().enumerate() {
            submit(&mut run, at - 50, &format!("t{i}"));
            let failed = answer(&mut run, at, &format!("t{i}"), EventKind::Failed);
            assert_eq!(summary(&failed.decision), "ROUTED b", "the card's fallback");
            let opened = i == 2;
            assert_eq!(!failed.breakers.is_empty(), opened, "{failed:?}");
        }
        let t2 = &run.state.breakers["a"];
        assert_eq!((t2.phase, t2.until), (BreakerPhase::Open, 5_300));
        let held = submit(&mut run, 400, "t3");
        assert_eq!(cards(&held), [("b".into(), Some("a".into()))]);
        let probe = submit(&mut run, 5_300, "t4");
        assert_eq!(cards(&probe), [("a".into(), None)]);
        assert_eq!(phases(&probe), [("a".into(), BreakerPhase::HalfOpen, None)]);
        let during = submit(&mut run, 5_400, "t5");
        assert_eq!(
            cards(&during),
            [("b".into(), Some("a".into()))],
            "one probe only"
        );
        let closed = answer(&mut run, 5_500, "t4", EventKind::Result);
        assert_eq!(summary(&closed.decision), "COMPLETED");
        assert_eq!(phases(&closed), [("a".into(), BreakerPhase::Closed, None)]);
        assert_eq!(cards(&submit(&mut run, 5_600, "t6")), [("a".into(), None)]);
    }

    #[test]
    fn a_failed_probe_opens_it_again_and_old_failures_do_not_count() {
        let mut run = flow("fallback");
        for (i, at) in [0, 20_000, 40_000].into_iter().enumerate() {
            submit(&mut run, at, &format!("t{i}"));
            let failed = answer(&mut run, at + 1, &format!("t{i}"), EventKind::Failed);
            assert!(
                failed.breakers.is_empty(),
                "10 s apart: never 3 in a window"
            );
        }
        for (i, at) in [50_000, 50_001, 50_002].into_iter().enumerate() {
            submit(&mut run, at, &format!("u{i}"));
            answer(&mut run, at, &format!("u{i}"), EventKind::Failed);
        }
        assert_eq!(run.state.breakers["a"].phase, BreakerPhase::Open);
        submit(&mut run, 56_000, "probe");
        let failed = answer(&mut run, 56_100, "probe", EventKind::Failed);
        assert_eq!(
            phases(&failed),
            [("a".into(), BreakerPhase::Open, Some(61_100))]
        );
    }

    #[test]
    fn when_open_wait_holds_new_work_until_the_breaker_lets_it_through() {
        let mut run = Run::with(
            FLOW,
            &[
                ("a", "retry: {max_attempts: 1}\nbreaker: {failures: 1, open_for: 5s, when_open: wait}"),
                ("b", ""),
            ],
        );
        submit(&mut run, 0, "t0");
        let failed = answer(&mut run, 100, "t0", EventKind::Failed);
        assert_eq!(
            phases(&failed),
            [("a".into(), BreakerPhase::Open, Some(5_100))]
        );
        let held = submit(&mut run, 1_100, "t1");
        let Decision::Routed { steps, .. } = &held.decision else {
            panic!("{held:?}")
        };
        assert_eq!(
            steps[0].delay_ms,
            Some(4_000),
            "until the breaker's open_for ends"
        );
        assert!(run.tick(5_099).is_empty());
        let sent = run.tick(5_100);
        assert_eq!(summary(&sent[0].decision), "DISPATCHED");
        assert_eq!(
            phases(&sent[0]),
            [("a".into(), BreakerPhase::HalfOpen, None)]
        );
        let Decision::Dispatched { step } = &sent[0].decision else {
            panic!()
        };
        assert_eq!(step.delay_ms, None, "sent as the probe");
    }
}

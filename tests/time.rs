//! Durable time: deadlines, step timeouts with backoff, human waits and per-card breakers are
//! timers and state the owning router records when they fall due or change, then decides like
//! any other event; replay reads the recorded firings, never the clock.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use switchyard::agent::{Failure, Handler, Reply};
use switchyard::dlq::{self, Selection};
use switchyard::envelope::{
    now_ms, BreakerPhase, Decision, EventKind, StateEvent, TaskEvent, TimerKind, WorkItem,
};

const WAIT: Duration = Duration::from_secs(60);

/// An agent that answers like [`ExampleAgent`], `delay` late.
struct Slow(Duration, ExampleAgent);

impl Handler for Slow {
    fn handle(&self, item: WorkItem) -> impl Future<Output = Result<Reply, Failure>> + Send {
        let (delay, answer) = (self.0, self.1.handle(item));
        async move {
            tokio::time::sleep(delay).await;
            answer.await
        }
    }
}

fn expired(d: &Decision) -> bool {
    matches!(d, Decision::DeadLettered { reason, ends_task: true, .. } if reason == "deadline_exceeded")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_past_its_deadline_ends_and_its_late_result_is_dropped() {
    let kafka = kafka("deadline");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let fast = RunningAgents::example_except(&kafka, &workflow, &["sentiment_analyzer"]);
    let slow = RunningAgents::start(&kafka, &workflow, &["sentiment_analyzer"], |n| {
        Slow(Duration::from_secs(6), ExampleAgent(n.to_string()))
    });
    let mut task = submission("late", "where is my parcel?");
    let deadline = now_ms() + 3_000;
    task.deadline = Some(deadline);
    publish(&kafka, &task).await;

    let events = eventually(WAIT, "the deadline to end the task", || async {
        let events = task_events(&kafka, "late");
        events
            .iter()
            .any(|e| expired(&e.decision))
            .then_some(events)
    })
    .await;
    let fired = events.iter().find(|e| expired(&e.decision)).unwrap();
    let firing = fired.timer.as_ref().expect("the firing is recorded");
    assert_eq!(firing.due, deadline);
    assert!(
        fired.at >= deadline,
        "fired {} ms before its due time",
        deadline - fired.at
    );
    assert!(fired.input.is_none() && fired.event.is_none());

    let late = eventually(WAIT, "the slow agent's late result", || async {
        task_events(&kafka, "late").into_iter().find(|e| {
            e.event
                .as_ref()
                .is_some_and(|ev| ev.source == "sentiment_analyzer")
        })
    })
    .await;
    assert_eq!(
        late.decision,
        Decision::Dropped {
            reason: "late_duplicate".into()
        }
    );
    let letter = eventually(WAIT, "the task in the dead-letter topic", || async {
        let letters = dlq::list(&kafka, &Selection::default()).unwrap();
        letters
            .into_iter()
            .find(|d| d.reason == "deadline_exceeded")
    })
    .await;
    assert_eq!(letter.key, "late");
    assert_eq!(
        router
            .metrics
            .timers_fired
            .with_label_values(&["deadline"])
            .get(),
        1
    );

    let report = replay_all(&kafka, &workflow.engine()).await;
    assert!(report.divergences.is_empty(), "{:?}", report.divergences);
    assert_eq!(report.timers_fired, 1);
    slow.stop().await;
    fast.stop().await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadline_that_passes_while_no_router_runs_fires_once_after_the_restore() {
    let kafka = kafka("deadline-restore");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let mut task = submission("orphan", "nobody will answer this");
    let deadline = now_ms() + 6_000;
    task.deadline = Some(deadline);
    publish(&kafka, &task).await;
    eventually(WAIT, "the task to be routed", || async {
        task_events(&kafka, "orphan")
            .iter()
            .any(|e| matches!(e.decision, Decision::Routed { .. }))
            .then_some(())
    })
    .await;
    router.stop().await;
    assert!(
        now_ms() < deadline,
        "the router stopped before the deadline"
    );
    tokio::time::sleep(Duration::from_millis((deadline - now_ms() + 1_000) as u64)).await;

    let router = RunningRouter::start(&kafka, &workflow).await;
    eventually(
        WAIT,
        "the missed deadline to fire after the restore",
        || async {
            task_events(&kafka, "orphan")
                .iter()
                .any(|e| expired(&e.decision))
                .then_some(())
        },
    )
    .await;
    // A few more ticks: it must not fire again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let firings = task_events(&kafka, "orphan")
        .iter()
        .filter(|e| e.timer.is_some())
        .count();
    assert_eq!(firings, 1);
    router.stop().await;
}

/// A workflow directory with `cards` (name and extra YAML; a human card when `kind: human` is
/// among them) and the rule table `rules`.
fn workflow_dir(cards: &[(&str, &str)], rules: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cards")).unwrap();
    for (name, extra) in cards {
        let runtime = match extra.contains("kind: human") {
            true => String::new(),
            false => "runtime: {kind: handler}\n".into(),
        };
        let card = format!("name: {name}\n{runtime}{extra}\n");
        std::fs::write(dir.path().join(format!("cards/{name}.yaml")), card).unwrap();
    }
    std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
    dir
}

/// A workflow whose `slow` card never answers within its 2 s timeout (3 attempts, 1 s then 2 s
/// apart, then the `backup` card) and whose `lonely` card has no fallback.
fn timeouts_workflow() -> tempfile::TempDir {
    let slow = "timeout: 2s\nretry: {max_attempts: 3, backoff: {initial: 1s, multiplier: 2}}\nfallback: backup";
    workflow_dir(
        &[
            ("slow", slow),
            ("backup", ""),
            ("lonely", "timeout: 2s\nretry: {max_attempts: 1}"),
        ],
        "rules:\n  - { id: lonely, when: { kind: SUBMITTED, labels: { route: lonely } }, then: { route: [lonely] } }\n  - { id: start, when: { kind: SUBMITTED }, then: { route: [slow] } }\n  - { id: done, when: { source: [slow, backup, lonely] }, then: complete }\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_that_never_answers_times_out_is_retried_then_goes_to_its_fallback() {
    let kafka = kafka("timeouts");
    let dir = timeouts_workflow();
    let workflow = setup(&kafka, dir.path()).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let backup = RunningAgents::start(&kafka, &workflow, &["backup"], |n| {
        ExampleAgent(n.to_string())
    });
    publish(&kafka, &submission("t1", "hello")).await;
    let mut lonely = submission("t2", "hello");
    lonely.labels.insert("route".into(), "lonely".into());
    publish(&kafka, &lonely).await;

    let events = eventually(WAIT, "t1 to complete through the fallback", || async {
        let events = task_events(&kafka, "t1");
        events
            .iter()
            .any(|e| matches!(e.decision, Decision::Completed { .. }))
            .then_some(events)
    })
    .await;
    let summary: Vec<String> = events
        .iter()
        .map(|e| switchyard::replay::summary(&e.decision))
        .collect();
    assert_eq!(
        summary,
        [
            "ROUTED slow",
            "RETRY slow",
            "DISPATCHED",
            "RETRY slow",
            "DISPATCHED",
            "ROUTED backup",
            "COMPLETED"
        ],
        "{events:#?}"
    );
    // Each attempt times out 2 s after it was sent; the retries wait 1 s, then 2 s. Every
    // recorded due time follows from the record before it, and nothing fires early.
    let waits = [
        (2_000, TimerKind::StepTimeout),
        (1_000, TimerKind::Dispatch),
    ];
    let waits = [
        waits[0],
        waits[1],
        waits[0],
        (2_000, TimerKind::Dispatch),
        waits[0],
    ];
    for (i, (wait, kind)) in waits.into_iter().enumerate() {
        let (before, fired) = (&events[i], &events[i + 1]);
        let firing = fired.timer.as_ref().expect("a recorded firing");
        assert_eq!(
            (firing.kind, firing.due),
            (kind, before.at + wait),
            "{fired:?}"
        );
        assert!(fired.at >= firing.due, "fired early: {fired:?}");
    }
    let retries: Vec<Option<i64>> = events
        .iter()
        .filter_map(|e| match &e.decision {
            Decision::RetryScheduled { step } => Some(step.delay_ms),
            _ => None,
        })
        .collect();
    assert_eq!(retries, [Some(1_000), Some(2_000)]);
    let t2 = eventually(WAIT, "t2 to be dead-lettered step_timeout", || async {
        task_events(&kafka, "t2")
            .into_iter()
            .find(|e| e.timer.is_some())
    })
    .await;
    assert!(
        matches!(&t2.decision, Decision::DeadLettered { reason, ends_task: true, .. } if reason == "step_timeout"),
        "{:?}",
        t2.decision
    );
    let timeouts = |card: &str| {
        router
            .metrics
            .step_timeouts
            .with_label_values(&[card])
            .get()
    };
    assert_eq!((timeouts("slow"), timeouts("lonely")), (3, 1));
    let report = replay_all(&kafka, &workflow.engine()).await;
    assert!(report.divergences.is_empty(), "{:?}", report.divergences);
    assert_eq!(report.timers_fired, 6);
    backup.stop().await;
    router.stop().await;
}

/// The recorded decisions of `task_id`, summarised (`ROUTED a`, `DEAD_LETTERED reason`).
fn summaries(kafka: &switchyard::kafka::KafkaConfig, task_id: &str) -> Vec<String> {
    let events = task_events(kafka, task_id);
    events
        .iter()
        .map(|e| switchyard::replay::summary(&e.decision))
        .collect()
}

/// Waits until `task_id` has a record for which `done` holds; returns all its records.
async fn until(
    kafka: &switchyard::kafka::KafkaConfig,
    task_id: &str,
    what: &str,
    done: impl Fn(&StateEvent) -> bool,
) -> Vec<StateEvent> {
    eventually(WAIT, what, || async {
        let events = task_events(kafka, task_id);
        events.iter().any(&done).then_some(events)
    })
    .await
}

fn finished(e: &StateEvent) -> bool {
    matches!(
        e.decision,
        Decision::Completed { .. }
            | Decision::DeadLettered {
                ends_task: true,
                ..
            }
    )
}

const HUMAN_RULES: &str = "rules:
  - { id: start, when: { kind: SUBMITTED }, then: { route: [asker] } }
  - { id: ask, when: { source: asker }, then: { escalate: { card: human, timeout: 2s, then: dead_letter } } }
  - { id: answered, when: { kind: HUMAN_DECISION }, then: complete }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unanswered_escalation_times_out_and_an_answer_in_time_fires_nothing() {
    let kafka = kafka("human-wait");
    let dir = workflow_dir(
        &[("asker", ""), ("human", "runtime: {kind: human}")],
        HUMAN_RULES,
    );
    let workflow = setup(&kafka, dir.path()).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let asker = RunningAgents::start(&kafka, &workflow, &["asker"], |n| {
        ExampleAgent(n.to_string())
    });
    publish(&kafka, &submission("answered", "please look")).await;
    let escalated = |e: &StateEvent| matches!(e.decision, Decision::Escalated { .. });
    until(&kafka, "answered", "the first escalation", escalated).await;
    let mut answer = TaskEvent::new("answered", EventKind::HumanDecision, "alice");
    answer.payload = serde_json::json!({ "reply": "done" });
    publish(&kafka, &answer).await;
    publish(&kafka, &submission("ignored", "please look")).await;

    let ignored = until(
        &kafka,
        "ignored",
        "the unanswered wait to time out",
        finished,
    )
    .await;
    let (asked, last) = (&ignored[1], ignored.last().unwrap());
    assert!(
        matches!(&last.decision, Decision::DeadLettered { reason, .. } if reason == "human_timeout"),
        "{last:?}"
    );
    let firing = last.timer.as_ref().expect("a recorded firing");
    assert_eq!(
        (firing.kind, firing.due),
        (TimerKind::HumanTimeout, asked.at + 2_000)
    );
    assert!(last.at >= firing.due);
    let letter = eventually(WAIT, "the task in the dead-letter topic", || async {
        let letters = dlq::list(&kafka, &Selection::default()).unwrap();
        letters.into_iter().find(|d| d.reason == "human_timeout")
    })
    .await;
    assert_eq!(letter.key, "ignored");
    // `ignored` was escalated after `answered`, so `answered`'s wait would have fallen due too.
    let answered = until(&kafka, "answered", "the answer to complete", finished).await;
    assert_eq!(
        summaries(&kafka, "answered"),
        ["ROUTED asker", "ESCALATED human", "COMPLETED"]
    );
    assert!(answered.iter().all(|e| e.timer.is_none()), "{answered:?}");
    let report = replay_all(&kafka, &workflow.engine()).await;
    assert!(report.divergences.is_empty(), "{:?}", report.divergences);
    assert_eq!(report.timers_fired, 1);
    asker.stop().await;
    router.stop().await;
}

/// Fails its first `.1` work items (counted in `.0`), then answers like `.2`.
struct Flaky(Arc<AtomicUsize>, usize, ExampleAgent);

impl Handler for Flaky {
    fn handle(&self, item: WorkItem) -> impl Future<Output = Result<Reply, Failure>> + Send {
        let failing = self.0.fetch_add(1, Ordering::SeqCst) < self.1;
        let answer = self.2.handle(item);
        async move {
            match failing {
                true => Err("the billing API is down".into()),
                false => answer.await,
            }
        }
    }
}

/// One tasks (and state) partition: every task shares the partition's breakers.
fn one_partition(specs: &mut switchyard::topics::TopicSpecs) {
    specs.set_partitions(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_failures_open_a_cards_breaker_and_a_probe_closes_it() {
    let kafka = kafka("breaker");
    let flaky = "retry: {max_attempts: 1}\nfallback: backup\nbreaker: {failures: 5, window: 1m, open_for: 4s}";
    let dir = workflow_dir(
        &[("flaky", flaky), ("backup", "")],
        "rules:\n  - { id: start, when: { kind: SUBMITTED }, then: { route: [flaky] } }\n  - { id: done, when: { source: [flaky, backup] }, then: complete }\n",
    );
    let workflow = setup_with(&kafka, dir.path(), one_partition).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let agents = RunningAgents::start(&kafka, &workflow, &["flaky", "backup"], |n| {
        let fails = if n == "flaky" { 5 } else { 0 };
        Flaky(Arc::default(), fails, ExampleAgent(n.to_string()))
    });
    let opened = (1..=5).map(|i| format!("f{i}"));
    let mut last = Vec::new();
    for task in opened {
        publish(&kafka, &submission(&task, "charge me")).await;
        last = until(&kafka, &task, "the task to finish", finished).await;
        assert_eq!(
            summaries(&kafka, &task),
            ["ROUTED flaky", "ROUTED backup", "COMPLETED"],
            "a failure goes to the card's fallback"
        );
    }
    let open = last[1].breakers.clone();
    assert_eq!(
        open.len(),
        1,
        "the fifth failure opens the breaker: {last:?}"
    );
    assert_eq!(
        (open[0].card.as_str(), open[0].phase),
        ("flaky", BreakerPhase::Open)
    );
    let until_ms = open[0].until.unwrap();
    assert_eq!(until_ms, last[1].at + 4_000);
    let gauge = || {
        router
            .metrics
            .breaker_open
            .with_label_values(&["flaky"])
            .get()
    };
    eventually(
        WAIT,
        "switchyard_card_breaker_open{card=flaky} = 1",
        || async { (gauge() == 1).then_some(()) },
    )
    .await;

    publish(&kafka, &submission("held", "charge me")).await;
    let held = until(&kafka, "held", "the held task to finish", finished).await;
    let Decision::Routed { steps, .. } = &held[0].decision else {
        panic!("{held:?}")
    };
    assert_eq!(
        (steps[0].card.as_str(), steps[0].instead_of.as_deref()),
        ("backup", Some("flaky")),
        "new work goes to the fallback while the breaker is open"
    );
    assert!(held[0].at < until_ms, "decided while open");
    let wait = (until_ms - now_ms()).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait + 100)).await;

    publish(&kafka, &submission("probe", "charge me")).await;
    let probe = until(&kafka, "probe", "the probe to finish", finished).await;
    assert_eq!(summaries(&kafka, "probe"), ["ROUTED flaky", "COMPLETED"]);
    assert_eq!(probe[0].breakers[0].phase, BreakerPhase::HalfOpen);
    assert_eq!(
        probe[1].breakers[0].phase,
        BreakerPhase::Closed,
        "the card recovered"
    );
    publish(&kafka, &submission("after", "charge me")).await;
    until(&kafka, "after", "the next task to finish", finished).await;
    assert_eq!(summaries(&kafka, "after"), ["ROUTED flaky", "COMPLETED"]);
    eventually(
        WAIT,
        "switchyard_card_breaker_open{card=flaky} = 0",
        || async { (gauge() == 0).then_some(()) },
    )
    .await;
    let report = replay_all(&kafka, &workflow.engine()).await;
    assert!(report.divergences.is_empty(), "{:?}", report.divergences);
    agents.stop().await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_of_timeouts_retries_deadlines_and_breakers_reads_no_clock() {
    let kafka = kafka("replay-clock");
    let dir = workflow_dir(
        &[
            ("flaky", "retry: {max_attempts: 1}\nfallback: backup\nbreaker: {failures: 1, open_for: 1h}"),
            ("backup", ""),
            ("slow", "timeout: 1s\nretry: {max_attempts: 2, backoff: {initial: 500ms}}\nfallback: backup"),
            ("silent", "timeout: 6s\nretry: {max_attempts: 1}"),
        ],
        "rules:
  - { id: to_flaky, when: { kind: SUBMITTED, labels: { to: flaky } }, then: { route: [flaky] } }
  - { id: to_slow, when: { kind: SUBMITTED, labels: { to: slow } }, then: { route: [slow] } }
  - { id: start, when: { kind: SUBMITTED }, then: { route: [silent] } }
  - { id: done, when: { source: [flaky, backup, slow, silent] }, then: complete }
",
    );
    let workflow = setup_with(&kafka, dir.path(), one_partition).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let agents = RunningAgents::start(&kafka, &workflow, &["flaky", "backup"], |n| {
        let fails = if n == "flaky" { usize::MAX } else { 0 };
        Flaky(Arc::default(), fails, ExampleAgent(n.to_string()))
    });
    let labelled = |id: &str, to: &str| {
        let mut task = submission(id, "hello");
        task.labels.insert("to".into(), to.into());
        task
    };
    let mut late = submission("late", "hello");
    late.deadline = Some(now_ms() + 1_500);
    for task in [
        labelled("b1", "flaky"),
        labelled("b2", "flaky"),
        labelled("s1", "slow"),
        late,
    ] {
        publish(&kafka, &task).await;
    }
    for task in ["b1", "b2", "s1", "late"] {
        until(&kafka, task, "the task to finish", finished).await;
    }
    assert_eq!(
        summaries(&kafka, "s1"),
        [
            "ROUTED slow",
            "RETRY slow",
            "DISPATCHED",
            "ROUTED backup",
            "COMPLETED"
        ]
    );
    let opened: Vec<_> = ["b1", "b2"]
        .into_iter()
        .flat_map(|t| task_events(&kafka, t))
        .flat_map(|e| e.breakers)
        .collect();
    assert_eq!(
        opened.len(),
        1,
        "the first failure opens the breaker: {opened:?}"
    );
    publish(&kafka, &submission("pending", "nobody answers")).await;
    let routed = until(&kafka, "pending", "the last task to be sent", |e| {
        matches!(e.decision, Decision::Routed { .. })
    })
    .await;
    router.stop().await;
    let due = routed[0].at + 6_000;
    assert!(now_ms() < due, "stopped before the pending step's timeout");

    let engine = workflow.engine();
    let before = replay_all(&kafka, &engine).await;
    assert!(before.divergences.is_empty(), "{:?}", before.divergences);
    assert_eq!(
        before.timers_fired, 4,
        "s1: timeout, dispatch, timeout; late: deadline"
    );
    let wait = (due - now_ms() + 2_000).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let after = replay_all(&kafka, &engine).await;
    assert_eq!(
        serde_json::to_value(&before).unwrap(),
        serde_json::to_value(&after).unwrap(),
        "the same report once the pending timeout has passed: replay reads no clock"
    );
    agents.stop().await;
}

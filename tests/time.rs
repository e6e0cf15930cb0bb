//! Durable time: a task's deadline is a timer the owning router records when it falls due, then
//! decides like any other event; replay reads the recorded firing, never the clock.

mod common;

use std::future::Future;
use std::time::Duration;

use common::*;
use switchyard::agent::{Handler, Reply};
use switchyard::dlq::{self, Selection};
use switchyard::envelope::{now_ms, Decision, WorkItem};

const WAIT: Duration = Duration::from_secs(60);

/// An agent that answers like [`ExampleAgent`], `delay` late.
struct Slow(Duration, ExampleAgent);

impl Handler for Slow {
    fn handle(&self, item: WorkItem) -> impl Future<Output = Result<Reply, String>> + Send {
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

/// A workflow whose `slow` card never answers within its 2 s timeout (2 attempts, then the
/// `backup` card) and whose `lonely` card has no fallback.
fn timeouts_workflow() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cards")).unwrap();
    let cards = [
        (
            "slow",
            "timeout: 2s\nretry: {max_attempts: 2}\nfallback: backup\n",
        ),
        ("backup", ""),
        ("lonely", "timeout: 2s\nretry: {max_attempts: 1}\n"),
    ];
    for (name, extra) in cards {
        let card = format!("name: {name}\nruntime: {{kind: handler}}\n{extra}");
        std::fs::write(dir.path().join(format!("cards/{name}.yaml")), card).unwrap();
    }
    let rules = "rules:\n  - { id: lonely, when: { kind: SUBMITTED, labels: { route: lonely } }, then: { route: [lonely] } }\n  - { id: start, when: { kind: SUBMITTED }, then: { route: [slow] } }\n  - { id: done, when: { source: [slow, backup, lonely] }, then: complete }\n";
    std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
    dir
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
        ["ROUTED slow", "RETRY slow", "ROUTED backup", "COMPLETED"],
        "{events:#?}"
    );
    // Each attempt's timer is due 2 s after the decision that sent it, and fires no earlier.
    for (sent, fired) in [(&events[0], &events[1]), (&events[1], &events[2])] {
        let firing = fired.timer.as_ref().expect("a recorded firing");
        assert_eq!(firing.due, sent.at + 2_000);
        assert!(fired.at >= firing.due);
    }
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
    assert_eq!((timeouts("slow"), timeouts("lonely")), (2, 1));
    let report = replay_all(&kafka, &workflow.engine()).await;
    assert!(report.divergences.is_empty(), "{:?}", report.divergences);
    assert_eq!(report.timers_fired, 3);
    backup.stop().await;
    router.stop().await;
}

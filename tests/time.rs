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

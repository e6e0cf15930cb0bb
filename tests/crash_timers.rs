//! Timers under crashes: 1,000 tasks whose agent never answers, each step timing out 5 s after
//! it was sent, while the router process is SIGKILLed twice before the timeouts fall due and once
//! after, and restarted each time. Every timer must fire exactly once (one firing record per
//! timer on the state topic), none before its due time, and every task must end as configured.

mod common;

use std::collections::HashMap;
use std::process::Child;
use std::time::Duration;

use common::*;
use switchyard::envelope::{now_ms, Decision, StateEvent, TimerKind};
use switchyard::kafka::KafkaConfig;

const TASKS: usize = 1_000;
const WAIT: Duration = Duration::from_secs(300);

/// `mute` never answers; a timed-out task labelled `end: complete` completes by rule `gave_up`,
/// the others are dead-lettered `step_timeout`.
const RULES: &str = "rules:
  - { id: start, when: { kind: SUBMITTED }, then: { route: [mute] } }
  - { id: gave_up, when: { kind: TIMED_OUT, labels: { end: complete } }, then: complete }
  - { id: done, when: { source: mute }, then: complete }
";

fn count(kafka: &KafkaConfig, what: impl Fn(&StateEvent) -> bool) -> usize {
    state_events(kafka).iter().filter(|e| what(e)).count()
}

fn kill(router: &mut Child) {
    router.kill().unwrap();
    router.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_timer_fires_exactly_once_across_sigkills() {
    let kafka = kafka("crash-timers");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cards")).unwrap();
    let card = "name: mute\ntimeout: 5s\nretry: {max_attempts: 1}\nruntime: {kind: handler}\n";
    std::fs::write(dir.path().join("cards/mute.yaml"), card).unwrap();
    std::fs::write(dir.path().join("rules.yaml"), RULES).unwrap();
    let workflow = setup(&kafka, dir.path()).await;
    let spawn = |n| spawn_router(&kafka, dir.path(), n, &["--max-batch", "200"]);
    let mut router = spawn(0);

    let submissions: Vec<_> = (0..TASKS)
        .map(|i| {
            let mut task = submission(&format!("task-{i}"), "nobody will answer");
            let end = if i % 2 == 0 {
                "complete"
            } else {
                "dead_letter"
            };
            task.labels.insert("end".into(), end.into());
            task
        })
        .collect();
    futures::future::join_all(submissions.iter().map(|s| publish(&kafka, s))).await;
    let routed = |e: &StateEvent| matches!(e.decision, Decision::Routed { .. });
    let owned = |e: &StateEvent| matches!(e.decision, Decision::Owned { .. });
    eventually(WAIT, "every task to be sent to `mute`", || async {
        (count(&kafka, routed) >= TASKS).then_some(())
    })
    .await;
    let first_due = state_events(&kafka)
        .iter()
        .filter(|e| routed(e))
        .map(|e| e.at + 5_000)
        .min()
        .unwrap();

    // Kill 1 at once, kill 2 as soon as the second run has taken over: both before any timeout.
    let mut kills_before_due = 0;
    for n in 1..=2 {
        let owners = count(&kafka, owned);
        kill(&mut router);
        kills_before_due += usize::from(now_ms() < first_due);
        router = spawn(n);
        if n == 1 {
            eventually(WAIT, "the second run to take over", || async {
                (count(&kafka, owned) > owners).then_some(())
            })
            .await;
        }
    }
    let fired = |e: &StateEvent| e.timer.is_some();
    eventually(WAIT, "the timeouts to start firing", || async {
        (count(&kafka, fired) > 0).then_some(())
    })
    .await;
    kill(&mut router);
    router = spawn(3);
    let ended = |e: &StateEvent| {
        matches!(
            e.decision,
            Decision::Completed { .. }
                | Decision::DeadLettered {
                    ends_task: true,
                    ..
                }
        )
    };
    eventually(WAIT, "every task to end", || async {
        (count(&kafka, ended) >= TASKS).then_some(())
    })
    .await;
    // A few more ticks of the last run: nothing may fire again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    kill(&mut router);
    assert_eq!(
        kills_before_due, 2,
        "two kills fell before the first due time"
    );

    let events = state_events(&kafka);
    let mut sent: HashMap<&str, i64> = HashMap::new();
    let mut firings: HashMap<&str, Vec<&StateEvent>> = HashMap::new();
    let mut endings: HashMap<&str, Vec<String>> = HashMap::new();
    for e in &events {
        if routed(e) {
            sent.insert(&e.task_id, e.at);
        }
        if fired(e) {
            firings.entry(&e.task_id).or_default().push(e);
        }
        if ended(e) {
            let summary = switchyard::replay::summary(&e.decision);
            endings.entry(&e.task_id).or_default().push(summary);
        }
    }
    assert_eq!(firings.len(), TASKS, "every task's timer fired");
    for i in 0..TASKS {
        let task = format!("task-{i}");
        let fired = &firings[task.as_str()];
        assert_eq!(fired.len(), 1, "{task} fired {} times", fired.len());
        let firing = fired[0].timer.as_ref().unwrap();
        assert_eq!(firing.kind, TimerKind::StepTimeout);
        assert_eq!(firing.due, sent[task.as_str()] + 5_000, "{task}");
        assert!(
            fired[0].at >= firing.due,
            "{task} fired {} ms early",
            firing.due - fired[0].at
        );
        let expected = if i % 2 == 0 {
            "COMPLETED"
        } else {
            "DEAD_LETTERED step_timeout"
        };
        assert_eq!(endings[task.as_str()], [expected], "{task}");
    }
    let report = replay_all(&kafka, &workflow.engine()).await;
    assert!(
        report.divergences.is_empty(),
        "{:?}",
        &report.divergences[..report.divergences.len().min(5)]
    );
    assert_eq!(report.timers_fired, TASKS as u64);
}

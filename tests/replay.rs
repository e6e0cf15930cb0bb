//! Replay and audit from the topics alone: verified re-runs, tampering, what-if rule tables,
//! timelines and dead-letter redrive, on a real broker.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use switchyard::dlq::{self, Redriven, Selection};
use switchyard::envelope::{DecidedBy, Decision, EventKind, StateEvent, TaskEvent};
use switchyard::kafka::KafkaConfig;
use switchyard::replay;
use switchyard::state_record;
use switchyard::topics::{self, TopicSpecs};
use switchyard::workflow::Workflow;

const WAIT: Duration = Duration::from_secs(90);

fn is_final(e: &StateEvent) -> bool {
    matches!(
        e.decision,
        Decision::Completed { .. }
            | Decision::DeadLettered {
                ends_task: true,
                ..
            }
    )
}

/// Runs the example workflow over `messages` (task id, message, optional score) until each ends.
async fn run_history(kafka: &KafkaConfig, messages: &[(String, String, Option<f64>)]) -> Workflow {
    let workflow = setup(kafka, &root().join("agents/customer-service")).await;
    let router = RunningRouter::start(kafka, &workflow).await;
    let agents = RunningAgents::example(kafka, &workflow, |_| {});
    let humans = RunningAgents::start(kafka, &workflow, &["human_agent"], |_| Human(kafka.clone()));
    for (id, message, score) in messages {
        let mut s = submission(id, message);
        if let Some(score) = score {
            s.payload["score"] = serde_json::json!(score);
        }
        publish(kafka, &s).await;
    }
    eventually(WAIT, "every task to end", || async {
        let ended = state_events(kafka).iter().filter(|e| is_final(e)).count();
        (ended >= messages.len()).then_some(())
    })
    .await;
    agents.stop().await;
    humans.stop().await;
    router.stop().await;
    workflow
}

fn switchyard(kafka: &KafkaConfig, args: &[&str]) -> (bool, String, String) {
    let out = switchyard_command(kafka).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Copies `from`'s tasks and state topics into `to`'s (same partitions, same order, so the same
/// offsets), passing each state record through `edit`.
async fn copy_history(
    from: &KafkaConfig,
    to: &KafkaConfig,
    workflow: &Workflow,
    mut edit: impl FnMut(&mut StateEvent) -> bool,
) {
    let specs = TopicSpecs::load(&root().join("topics/switchyard.yaml")).unwrap();
    topics::apply(to, &specs, &workflow.cards).await.unwrap();
    let producer = to.producer().unwrap();
    for (src, dst, is_state) in [
        (from.topics().tasks(), to.topics().tasks(), false),
        (from.topics().state(), to.topics().state(), true),
    ] {
        for m in read_all(from, &src) {
            let mut payload = m.payload().unwrap_or_default().to_vec();
            if is_state {
                let mut records = state_record::decode(&payload).unwrap();
                let mut edited = false;
                for record in &mut records {
                    edited |= edit(record);
                }
                if edited {
                    payload = match payload.starts_with(b"[") {
                        true => serde_json::to_vec(&records).unwrap(),
                        false => serde_json::to_vec(&records[0]).unwrap(),
                    };
                }
            }
            let key = m.key().unwrap_or_default().to_vec();
            let mut record = FutureRecord::to(&dst)
                .key(&key)
                .payload(&payload)
                .partition(m.partition());
            let headers = m.headers().cloned();
            if let Some(h) = headers {
                record = record.headers(h);
            }
            producer
                .send(record, Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_verifies_history_and_catches_a_tampered_decision() {
    let kafka = kafka("verify");
    let messages: Vec<_> = (0..30)
        .map(|i| {
            (
                format!("v{i}"),
                if i % 5 == 0 {
                    "I am furious"
                } else if i % 7 == 0 {
                    "flaky"
                } else {
                    "where is it"
                }
                .to_string(),
                None,
            )
        })
        .collect();
    let workflow = run_history(&kafka, &messages).await;

    let report = replay_all(&kafka, &workflow.engine()).await;
    assert!(
        report.checked > 30 * 5,
        "every decision is checked: {}",
        report.checked
    );
    assert!(report.divergences.is_empty(), "{:?}", report.divergences);
    let (ok, _, stderr) = switchyard(&kafka, &["replay", "--verify"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("0 divergences"), "{stderr}");

    let tampered = self::kafka("tampered");
    let mut forged = None;
    copy_history(&kafka, &tampered, &workflow, |record| {
        if let (
            None,
            Decision::Routed {
                steps,
                decided_by: DecidedBy::Rule { rule_id },
            },
        ) = (&forged, &mut record.decision)
        {
            if rule_id == "confident" {
                steps[0].card = "human_agent".into();
                forged = Some(record.task_id.clone());
                return true;
            }
        }
        false
    })
    .await;
    let forged = forged.expect("a decision was tampered with");
    let report = replay_all(&tampered, &workflow.engine()).await;
    // The forged step also makes the task's next decision diverge (the message_sender result
    // answers a step recorded for human_agent); nothing in other tasks does.
    let first = &report.divergences[0];
    let expected = (
        "ROUTED human_agent".to_string(),
        "ROUTED message_sender".to_string(),
    );
    assert_eq!(
        (first.task_id.as_str(), &first.change),
        (forged.as_str(), &expected)
    );
    assert!(
        report.divergences.iter().all(|d| d.task_id == forged),
        "{:?}",
        report.divergences
    );
    let (ok, stdout, stderr) = switchyard(&tampered, &["replay", "--verify"]);
    assert!(!ok, "replay --verify exits non-zero on divergence");
    assert!(
        stdout.contains(&format!("DIVERGENCE task {forged}"))
            && stderr.contains("recorded decisions do not follow"),
        "{stdout}\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_with_a_changed_threshold_reports_exactly_the_tasks_whose_route_changes() {
    let kafka = kafka("whatif");
    let scores = [0.95, 0.85, 0.5, 0.88, 0.99, 0.81, 0.91];
    let messages: Vec<_> = scores
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("w{i}"), "where is it".to_string(), Some(*s)))
        .collect();
    let workflow = run_history(&kafka, &messages).await;
    let expected: Vec<String> = scores
        .iter()
        .enumerate()
        .filter(|(_, s)| **s > 0.8 && **s <= 0.9)
        .map(|(i, _)| format!("w{i}"))
        .collect();

    let stricter = tempfile::NamedTempFile::new().unwrap();
    let rules = std::fs::read_to_string(root().join("agents/customer-service/rules.yaml")).unwrap();
    assert!(rules.contains("confidence: { gt: 0.8 }"));
    std::fs::write(
        stricter.path(),
        rules.replace("confidence: { gt: 0.8 }", "confidence: { gt: 0.9 }"),
    )
    .unwrap();
    let mut engine = workflow.engine();
    engine.rules = switchyard::rules::RuleTable::load(stricter.path(), &workflow.cards).unwrap();
    let report = replay_all(&kafka, &engine).await;
    let changed: Vec<&str> = report.changed_tasks().into_iter().collect();
    assert_eq!(changed, expected);
    let transitions = report.transitions();
    assert_eq!(transitions.len(), 1, "{transitions:?}");
    assert_eq!(
        transitions[&(
            "ROUTED message_sender".to_string(),
            "ESCALATED human_agent".to_string()
        )],
        expected.len() as u64
    );

    let (ok, stdout, stderr) = switchyard(
        &kafka,
        &["replay", "--rules", stricter.path().to_str().unwrap()],
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!("{} of", expected.len())),
        "{stdout}"
    );
    for task in &expected {
        assert!(stdout.contains(&format!("task {task}")), "{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_shows_fan_out_join_retry_and_dead_letter() {
    let kafka = kafka("audit");
    run_history(&kafka, &[("flaky-1".into(), "flaky".into(), None)]).await;
    let timeline = switchyard::journey::audit(&kafka, "flaky-1").unwrap();
    let names: Vec<String> = timeline
        .decisions
        .iter()
        .map(|(_, e)| replay::summary(&e.decision))
        .collect();
    assert_eq!(
        names[0], "ROUTED sentiment_analyzer+intent_classifier",
        "fan-out: {names:?}"
    );
    assert!(
        names.contains(&"RETRY intent_classifier".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"RECORDED".to_string()),
        "the join waited: {names:?}"
    );
    assert!(
        names.contains(&"ROUTED knowledge_retriever".to_string()),
        "the join: {names:?}"
    );
    assert_eq!(
        names.last().unwrap(),
        "DEAD_LETTERED agent_failed",
        "{names:?}"
    );
    assert_eq!(timeline.dead_letters.len(), 1);
    assert_eq!(timeline.dead_letters[0].reason, "agent_failed");

    let (ok, stdout, _) = switchyard(&kafka, &["audit", "flaky-1"]);
    assert!(ok);
    for needle in [
        "ROUTED → sentiment_analyzer (step 1), intent_classifier (step 2)",
        "RETRY in 1s → intent_classifier (step 2 attempt 2)",
        "WAIT OVER (step 2)",
        "[rule analysed]",
        "DEAD_LETTERED agent_failed",
        "dead letter 0@",
    ] {
        assert!(stdout.contains(needle), "missing `{needle}` in\n{stdout}");
    }
    let (ok, json, _) = switchyard(&kafka, &["audit", "flaky-1", "--json"]);
    assert!(ok);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["task_id"], "flaky-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_for_a_missing_card_is_redriven_after_the_card_is_added() {
    let kafka = kafka("redrive");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cards")).unwrap();
    let card = |name: &str| {
        std::fs::write(
            dir.path().join(format!("cards/{name}.yaml")),
            format!("name: {name}\nruntime: {{kind: handler}}\n"),
        )
        .unwrap()
    };
    card("shipping");
    std::fs::write(
        dir.path().join("rules.yaml"),
        "rules:\n  - { id: ship, when: { kind: SUBMITTED, payload: [{ pointer: /topic, eq: shipping }] }, then: { route: [shipping] } }\n  - { id: shipped, when: { source: shipping }, then: complete }\n",
    )
    .unwrap();
    let v1 = setup(&kafka, dir.path()).await;
    let router = RunningRouter::start(&kafka, &v1).await;
    let mut task = TaskEvent::new("bill-1", EventKind::Submitted, "client");
    task.payload = serde_json::json!({ "topic": "billing" });
    publish(&kafka, &task).await;
    let dead = eventually(WAIT, "the billing task to be dead-lettered", || async {
        let letters = dlq::list(&kafka, &Selection::default()).unwrap();
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(dead[0].reason, "no_rule_matched");
    router.stop().await;

    card("billing");
    std::fs::write(
        dir.path().join("rules.yaml"),
        "rules:\n  - { id: ship, when: { kind: SUBMITTED, payload: [{ pointer: /topic, eq: shipping }] }, then: { route: [shipping] } }\n  - { id: bill, when: { kind: SUBMITTED, payload: [{ pointer: /topic, eq: billing }] }, then: { route: [billing] } }\n  - { id: done, when: { source: [shipping, billing] }, then: complete }\n",
    )
    .unwrap();
    let v2 = setup(&kafka, dir.path()).await;
    let router = RunningRouter::start(&kafka, &v2).await;
    let agents = RunningAgents::start(&kafka, &v2, &["billing"], |n| ExampleAgent(n.to_string()));
    let (ok, stdout, stderr) = switchyard(
        &kafka,
        &[
            "dlq",
            "redrive",
            "--reason",
            "no_rule_matched",
            "--max-redrives",
            "1",
        ],
    );
    assert!(ok && stdout.contains("redriven 0:"), "{stdout}{stderr}");
    let events = eventually(WAIT, "the redriven task to complete", || async {
        let events = task_events(&kafka, "bill-1");
        events
            .iter()
            .any(|e| matches!(e.decision, Decision::Completed { .. }))
            .then_some(events)
    })
    .await;
    assert!(events.iter().any(
        |e| matches!(&e.decision, Decision::Routed { steps, .. } if steps[0].card == "billing")
    ));

    // Redriving the same record again re-submits a finished task: that dead letter carries the
    // redrive count, so with a limit of 1 it is refused.
    dlq::redrive(
        &kafka,
        &Selection {
            reason: Some("no_rule_matched".into()),
            ..Default::default()
        },
        2,
    )
    .await
    .unwrap();
    let again = eventually(WAIT, "the second redrive to be dead-lettered", || async {
        let letters = dlq::list(
            &kafka,
            &Selection {
                reason: Some("task_finished".into()),
                ..Default::default()
            },
        )
        .unwrap();
        letters.into_iter().next()
    })
    .await;
    assert_eq!(again.redrives, 1);
    let refused = dlq::redrive(
        &kafka,
        &Selection {
            reason: Some("task_finished".into()),
            ..Default::default()
        },
        1,
    )
    .await
    .unwrap();
    assert!(
        matches!(refused.as_slice(), [Redriven::Refused { max: 1, .. }]),
        "{refused:?}"
    );
    agents.stop().await;
    router.stop().await;
}

//! The example workflow end to end on a real broker: fan-out and join, completion, escalation,
//! poison input, stale results and the hop limit.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::message::Message;
use switchyard::dlq::headers as dlq_headers;
use switchyard::envelope::{Decision, EventKind, TaskEvent, WorkItem};
use switchyard::runtime::CommandHandler;

const WAIT: Duration = Duration::from_secs(60);

fn decisions(events: &[switchyard::envelope::StateEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match &e.decision {
            Decision::Routed { steps, .. } => format!(
                "ROUTED {}",
                steps
                    .iter()
                    .map(|s| s.card.as_str())
                    .collect::<Vec<_>>()
                    .join("+")
            ),
            Decision::Escalated { step, .. } => format!("ESCALATED {}", step.card),
            other => other.name().to_string(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn example_workflow_completes_and_escalates_with_the_shipped_agents() {
    let kafka = kafka("example");
    let dir = root().join("agents/customer-service");
    let workflow = setup(&kafka, &dir).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let commands: Vec<&str> = workflow
        .cards
        .iter()
        .filter(|c| !c.is_human())
        .map(|c| c.name.as_str())
        .collect();
    let agents = RunningAgents::start(&kafka, &workflow, &commands, |name| {
        CommandHandler::new(workflow.cards.get(name).unwrap(), dir.join("cards")).unwrap()
    });

    publish(
        &kafka,
        &submission(
            "happy",
            "Hi! My order arrived. How do I change the delivery address?",
        ),
    )
    .await;
    publish(
        &kafka,
        &submission("angry", "My refund failed again, I am furious."),
    )
    .await;

    let happy = eventually(WAIT, "the happy task to complete", || async {
        let events = task_events(&kafka, "happy");
        events
            .iter()
            .any(|e| matches!(e.decision, Decision::Completed { .. }))
            .then_some(events)
    })
    .await;
    assert_eq!(
        decisions(&happy),
        [
            "ROUTED sentiment_analyzer+intent_classifier",
            "RECORDED",
            "ROUTED knowledge_retriever",
            "ROUTED response_generator",
            "ROUTED quality_controller",
            "ROUTED message_sender",
            "COMPLETED",
        ],
        "parallel steps are joined before knowledge retrieval"
    );
    let knowledge = happy
        .iter()
        .find(|e| decisions(std::slice::from_ref(e)) == ["ROUTED knowledge_retriever"])
        .unwrap();
    assert!(
        matches!(&knowledge.decision, Decision::Routed { decided_by: switchyard::envelope::DecidedBy::Rule { rule_id }, .. } if rule_id == "analysed")
    );

    let angry = eventually(WAIT, "the angry task to be escalated", || async {
        let events = task_events(&kafka, "angry");
        events
            .iter()
            .any(|e| matches!(e.decision, Decision::Escalated { .. }))
            .then_some(events)
    })
    .await;
    assert_eq!(
        decisions(&angry).last().unwrap(),
        "ESCALATED human_agent",
        "low confidence reaches the human card"
    );
    let human_inbox = read_all(&kafka, &format!("{}.agent.human_agent", kafka.topic_prefix));
    let item: WorkItem = serde_json::from_slice(human_inbox[0].payload().unwrap()).unwrap();
    assert_eq!(
        (item.task_id.as_str(), item.card.as_str()),
        ("angry", "human_agent")
    );
    assert!(
        item.context.contains_key("quality_controller"),
        "the human sees the earlier outputs"
    );

    let mut answer = TaskEvent::new("angry", EventKind::HumanDecision, "alice");
    answer.payload = serde_json::json!({ "reply": "refund approved" });
    publish(&kafka, &answer).await;
    eventually(WAIT, "the human's answer to complete the task", || async {
        task_events(&kafka, "angry")
            .iter()
            .any(|e| matches!(e.decision, Decision::Completed { .. }))
            .then_some(())
    })
    .await;
    agents.stop().await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_input_and_stale_results_are_handled_and_routing_goes_on() {
    let kafka = kafka("poison");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let router = RunningRouter::start(&kafka, &workflow).await;

    publish_raw(&kafka, "garbage", b"\x00\x01not json at all").await;
    publish_raw(
        &kafka,
        "odd",
        br#"{"event_id":"e1","task_id":"odd","kind":"EXPLODE"}"#,
    )
    .await;
    let mut orphan = TaskEvent::new("nobody", EventKind::Result, "sentiment_analyzer");
    orphan.step_id = Some(1);
    publish(&kafka, &orphan).await;

    publish(&kafka, &submission("t1", "hello")).await;
    eventually(WAIT, "t1 to be routed", || async {
        (task_events(&kafka, "t1").len() == 1).then_some(())
    })
    .await;
    let mut failed = TaskEvent::new("t1", EventKind::Failed, "sentiment_analyzer");
    (failed.step_id, failed.attempt) = (Some(1), Some(1));
    publish(&kafka, &failed).await;
    eventually(WAIT, "a retry", || async {
        task_events(&kafka, "t1")
            .iter()
            .any(|e| matches!(e.decision, Decision::RetryScheduled { .. }))
            .then_some(())
    })
    .await;
    let mut stale = TaskEvent::new("t1", EventKind::Result, "sentiment_analyzer");
    (stale.step_id, stale.attempt) = (Some(1), Some(1));
    publish(&kafka, &stale).await;
    publish(&kafka, &submission("t2", "still routing?")).await;

    eventually(WAIT, "t2 to be routed after the poison", || async {
        task_events(&kafka, "t2")
            .iter()
            .any(|e| matches!(e.decision, Decision::Routed { .. }))
            .then_some(())
    })
    .await;
    let t1 = task_events(&kafka, "t1");
    assert!(
        t1.iter().any(|e| e.decision
            == Decision::Dropped {
                reason: "stale_attempt".into()
            }),
        "{t1:?}"
    );

    let dlq = eventually(WAIT, "three dead letters", || async {
        let dlq = read_all(&kafka, &kafka.topics().dlq());
        (dlq.len() >= 3).then_some(dlq)
    })
    .await;
    let mut reasons: Vec<String> = dlq
        .iter()
        .map(|m| header(m, dlq_headers::REASON).unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["deserialization", "unknown_kind", "unknown_task"]);
    let garbage = dlq
        .iter()
        .find(|m| header(m, dlq_headers::REASON).as_deref() == Some("deserialization"))
        .unwrap();
    assert_eq!(
        garbage.payload().unwrap(),
        b"\x00\x01not json at all",
        "the original bytes are kept"
    );
    assert_eq!(
        header(garbage, dlq_headers::TOPIC).unwrap(),
        kafka.topics().tasks()
    );
    assert!(header(garbage, dlq_headers::OFFSET)
        .unwrap()
        .parse::<i64>()
        .is_ok());
    assert!(header(garbage, dlq_headers::MESSAGE)
        .unwrap()
        .contains("not a JSON object"));
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rule_table_that_loops_ends_in_the_dead_letter_topic_at_the_hop_limit() {
    let kafka = kafka("loop");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cards")).unwrap();
    for name in ["ping", "pong"] {
        std::fs::write(
            dir.path().join(format!("cards/{name}.yaml")),
            format!("name: {name}\nruntime: {{kind: handler}}\n"),
        )
        .unwrap();
    }
    std::fs::write(
        dir.path().join("rules.yaml"),
        r#"
hop_limit: 7
rules:
  - { id: start, when: { kind: SUBMITTED }, then: { route: [ping] } }
  - { id: to-pong, when: { source: ping }, then: { route: [pong] } }
  - { id: done, when: { source: pong, payload: [{ pointer: /done, eq: true }] }, then: complete }
  - { id: to-ping, when: { source: pong }, then: { route: [ping] } }
"#,
    )
    .unwrap();
    let workflow = setup(&kafka, dir.path()).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let agents = RunningAgents::start(&kafka, &workflow, &["ping", "pong"], |name| {
        ExampleAgent(name.to_string())
    });
    publish(&kafka, &submission("looper", "round and round")).await;
    let events = eventually(WAIT, "the loop to be dead-lettered", || async {
        let events = task_events(&kafka, "looper");
        events
            .iter()
            .any(|e| matches!(e.decision, Decision::DeadLettered { .. }))
            .then_some(events)
    })
    .await;
    let routed = events
        .iter()
        .filter(|e| matches!(e.decision, Decision::Routed { .. }))
        .count();
    assert_eq!(routed, 7, "exactly hop_limit steps were taken");
    assert!(
        matches!(&events.last().unwrap().decision, Decision::DeadLettered { reason, ends_task: true, .. } if reason == "hop_limit")
    );
    let dlq = eventually(WAIT, "the dead letter", || async {
        let dlq = read_all(&kafka, &kafka.topics().dlq());
        (!dlq.is_empty()).then_some(dlq)
    })
    .await;
    assert_eq!(
        header(&dlq[0], dlq_headers::REASON).as_deref(),
        Some("hop_limit")
    );
    agents.stop().await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_apply_is_idempotent_and_refuses_topics_that_are_not_co_partitioned() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use switchyard::topics::{self, TopicSpecs};

    let kafka = kafka("topics");
    let workflow =
        switchyard::workflow::Workflow::load(&root().join("agents/customer-service"), None)
            .unwrap();
    let specs = TopicSpecs::load(&root().join("topics/switchyard.yaml")).unwrap();
    let first = topics::apply(&kafka, &specs, &workflow.cards)
        .await
        .unwrap();
    assert!(first.iter().all(|l| l.starts_with("created")), "{first:?}");
    let second = topics::apply(&kafka, &specs, &workflow.cards)
        .await
        .unwrap();
    assert_eq!(second.len(), first.len());
    assert!(second.iter().all(|l| l.starts_with("exists")), "{second:?}");

    let broken = self::kafka("copart");
    let admin: AdminClient<DefaultClientContext> = broken.client_config().create().unwrap();
    let (tasks, state) = (broken.topics().tasks(), broken.topics().state());
    let new = [
        NewTopic::new(&tasks, 3, TopicReplication::Fixed(1)),
        NewTopic::new(&state, 2, TopicReplication::Fixed(1)),
    ];
    for r in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let error = topics::apply(&broken, &specs, &workflow.cards)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("co-partitioned") && error.contains(&tasks),
        "{error}"
    );
}

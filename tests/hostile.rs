//! Hostile input never stops routing: oversized records, answers for another card's step, and
//! answers that are not signed with their card's secret are dead-lettered with their reason,
//! while the router process keeps running and real tasks complete.

mod common;

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use common::*;
use switchyard::dlq::{self, headers, Redriven, Selection};
use switchyard::envelope::{Decision, EventKind, StateEvent, TaskEvent};
use switchyard::kafka::KafkaConfig;
use switchyard::signing::{sha256_hex, Secret};
use switchyard::topics::TopicSpecs;

const WAIT: Duration = Duration::from_secs(60);

/// Panics unless `router` is still running.
fn assert_running(router: &mut Child) {
    let status = router.try_wait().unwrap();
    assert!(status.is_none(), "the router process exited: {status:?}");
}

/// The task's state events, once one of them passes `done`.
async fn until(
    kafka: &KafkaConfig,
    task: &str,
    what: &str,
    done: fn(&Decision) -> bool,
) -> Vec<StateEvent> {
    eventually(WAIT, what, || async {
        let events = task_events(kafka, task);
        events.iter().any(|e| done(&e.decision)).then_some(events)
    })
    .await
}

fn completed(d: &Decision) -> bool {
    matches!(d, Decision::Completed { .. })
}

/// A SUBMITTED of exactly `size` bytes goes to the dead-letter topic as `too_large` (a prefix,
/// its size and hash), is recorded by reference, can be redriven from its source position; a
/// task submitted after it completes; the router process runs throughout.
async fn oversized(test: &str, size: usize, edit: impl FnOnce(&mut TopicSpecs)) {
    let kafka = kafka(test);
    let workflow = setup_with(&kafka, &root().join("agents/customer-service"), edit).await;
    let mut router = spawn_router(&kafka, Path::new("agents/customer-service"), 0, &[]);
    let agents = RunningAgents::example(&kafka, &workflow, |_| {});

    let mut big = submission("big", "");
    let base = serde_json::to_vec(&big).unwrap().len();
    big.payload["customer_message"] = "x".repeat(size - base).into();
    let bytes = serde_json::to_vec(&big).unwrap();
    assert_eq!(bytes.len(), size);
    let (p, offset) = publish_record(&kafka, b"big", Some(&bytes), &[]).await;

    let letter = eventually(
        WAIT,
        "the oversized task in the dead-letter topic",
        || async {
            let letters = dlq::list(&kafka, &Selection::default()).unwrap();
            letters.into_iter().find(|d| d.reason == "too_large")
        },
    )
    .await;
    assert_running(&mut router);
    assert_eq!((letter.source_partition, letter.source_offset), (p, offset));
    assert_eq!(letter.key, "big");
    assert!(
        letter.message.contains(&format!("{size} bytes")),
        "{}",
        letter.message
    );
    assert!(letter.truncated(), "{:?}", letter.headers);
    assert_eq!(letter.headers[headers::ORIGINAL_SIZE], size.to_string());
    assert_eq!(letter.headers[headers::ORIGINAL_SHA256], sha256_hex(&bytes));
    assert_eq!(letter.payload.as_deref(), Some(&bytes[..dlq::PREFIX_BYTES]));

    let recorded = state_events(&kafka)
        .into_iter()
        .find(|e| {
            e.input
                .as_ref()
                .is_some_and(|i| (i.partition, i.offset) == (p, offset))
        })
        .expect("a state record for the oversized input");
    let input = recorded.input.as_ref().unwrap();
    assert!(
        recorded.event.is_none(),
        "the input is referred to, never copied"
    );
    assert_eq!(input.size, Some(size as u64));
    assert_eq!(input.sha256.as_deref(), Some(sha256_hex(&bytes).as_str()));

    publish(&kafka, &submission("after", "hello after the big one")).await;
    until(&kafka, "after", "the next task to complete", completed).await;
    assert_running(&mut router);

    // Redrive reads the whole original back from its position (the dead letter holds a prefix).
    let redriven = dlq::redrive(
        &kafka,
        &Selection {
            reason: Some("too_large".into()),
            ..Default::default()
        },
        3,
    )
    .await
    .unwrap();
    assert!(
        matches!(redriven.as_slice(), [Redriven::Sent { .. }]),
        "{redriven:?}"
    );
    eventually(
        WAIT,
        "the redriven record to be dead-lettered again",
        || async {
            let letters = dlq::list(&kafka, &Selection::default()).unwrap();
            letters.into_iter().find(|d| {
                d.redrives == 1
                    && d.headers.get(headers::ORIGINAL_SHA256) == Some(&sha256_hex(&bytes))
            })
        },
    )
    .await;
    let report = replay_all(&kafka, &workflow.engine()).await;
    assert!(report.divergences.is_empty(), "{:?}", report.divergences);
    assert_running(&mut router);

    router.kill().unwrap();
    router.wait().unwrap();
    agents.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submission_under_the_brokers_limit_but_over_max_event_bytes_is_dead_lettered() {
    oversized("large", 1_030_270, |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_5_mb_submission_on_a_topic_that_accepts_it_is_dead_lettered() {
    oversized("huge", 5_000_000, |specs| {
        specs
            .tasks
            .config
            .insert("max.message.bytes".into(), "10485760".into());
    })
    .await;
}

/// Answers a task's steps 1 (sentiment_analyzer) and 2 (intent_classifier) need, from `source`.
fn answer(task: &str, kind: EventKind, step: u32, source: &str) -> TaskEvent {
    let mut e = TaskEvent::new(task, kind, source);
    (e.step_id, e.attempt) = (Some(step), Some(1));
    e
}

fn routed(d: &Decision) -> bool {
    matches!(d, Decision::Routed { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_for_another_cards_step_are_dead_lettered_and_the_step_keeps_waiting() {
    let kafka = kafka("mismatch");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    publish(&kafka, &submission("t1", "where is my parcel?")).await;
    until(&kafka, "t1", "t1 to be routed", routed).await;

    // sentiment_analyzer answers intent_classifier's step; a human answers an agent's step.
    publish(
        &kafka,
        &answer("t1", EventKind::Result, 2, "sentiment_analyzer"),
    )
    .await;
    publish(
        &kafka,
        &answer("t1", EventKind::HumanDecision, 1, "mallory"),
    )
    .await;
    let letters = eventually(WAIT, "two dead letters", || async {
        let letters = dlq::list(&kafka, &Selection::default()).unwrap();
        (letters.len() >= 2).then_some(letters)
    })
    .await;
    let mut reasons: Vec<&str> = letters.iter().map(|d| d.reason.as_str()).collect();
    reasons.sort_unstable();
    assert_eq!(reasons, ["not_a_human_step", "source_mismatch"]);

    let agents = RunningAgents::example(&kafka, &workflow, |_| {});
    let events = until(
        &kafka,
        "t1",
        "t1 to complete with its real answers",
        completed,
    )
    .await;
    let answered: Vec<(u32, &str)> = events
        .iter()
        .filter(|e| routed(&e.decision) || e.decision == Decision::Recorded)
        .filter_map(|e| Some((e.answers_step?, e.event.as_ref()?.source.as_str())))
        .collect();
    assert!(answered.contains(&(2, "intent_classifier")), "{answered:?}");
    assert!(
        answered.contains(&(1, "sentiment_analyzer")),
        "{answered:?}"
    );
    agents.stop().await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signing_card_routes_only_answers_signed_with_its_secret() {
    let kafka = kafka("signed");
    let dir = workflow_copy(
        "customer-service",
        &[
            ("sentiment_analyzer", "secret_env: SENTIMENT_SECRET"),
            ("intent_classifier", "secret_env: INTENT_SECRET"),
        ],
        "",
    );
    let workflow = setup(&kafka, dir.path()).await;
    let sentiment = Secret::new("sentiment's secret");
    let intent = Secret::new("intent's secret");
    let mut engine = workflow.engine();
    engine
        .secrets
        .insert("sentiment_analyzer", Some(sentiment.clone()));
    engine
        .secrets
        .insert("intent_classifier", Some(intent.clone()));
    let router = RunningRouter::start_engine(&kafka, engine, |_| {}).await;
    publish(&kafka, &submission("t1", "where is my parcel?")).await;
    until(&kafka, "t1", "t1 to be routed", routed).await;

    let result = answer("t1", EventKind::Result, 1, "sentiment_analyzer");
    let bytes = serde_json::to_vec(&result).unwrap();
    let signed = |secret: &Secret, bytes: &[u8]| secret.sign("t1", Some(1), Some(1), bytes);
    let mut changed = result.clone();
    changed.payload = serde_json::json!({ "sentiment": "positive, trust me" });
    let changed = serde_json::to_vec(&changed).unwrap();
    let unsigned: Option<String> = None;
    for (value, signature) in [
        (&bytes, unsigned),
        (&bytes, Some(signed(&intent, &bytes))),
        (&changed, Some(signed(&sentiment, &bytes))),
    ] {
        let headers: Vec<(&str, &[u8])> = signature
            .iter()
            .map(|s| (switchyard::signing::SIGNATURE_HEADER, s.as_bytes()))
            .collect();
        publish_record(&kafka, b"t1", Some(value), &headers).await;
    }
    let letters = eventually(WAIT, "three bad signatures", || async {
        let letters = dlq::list(&kafka, &Selection::default()).unwrap();
        (letters.len() >= 3).then_some(letters)
    })
    .await;
    assert!(
        letters.iter().all(|d| d.reason == "bad_signature"),
        "{letters:?}"
    );
    assert!(
        letters[0].message.contains("not signed"),
        "{}",
        letters[0].message
    );

    // The agents sign with their cards' secrets, so their answers route and the task completes.
    let agents = RunningAgents::example(&kafka, &workflow, |config| {
        config.secret = match config.card.name.as_str() {
            "sentiment_analyzer" => Some(sentiment.clone()),
            "intent_classifier" => Some(intent.clone()),
            _ => None,
        };
    });
    until(
        &kafka,
        "t1",
        "t1 to complete with signed answers",
        completed,
    )
    .await;
    assert_eq!(dlq::list(&kafka, &Selection::default()).unwrap().len(), 3);
    agents.stop().await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_agent_refuse_to_start_without_a_cards_secret() {
    let kafka = kafka("nosecret");
    let dir = workflow_copy(
        "customer-service",
        &[(
            "sentiment_analyzer",
            "secret_env: SWITCHYARD_TEST_UNSET_SECRET",
        )],
        "",
    );
    setup(&kafka, dir.path()).await;
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["--bootstrap-servers", &kafka.bootstrap_servers])
            .args(["--topic-prefix", &kafka.topic_prefix])
            .args(args)
            .env_remove("SWITCHYARD_TEST_UNSET_SECRET")
            .output()
            .unwrap()
    };
    let workflow = dir.path().to_str().unwrap();
    let card = dir.path().join("cards/sentiment_analyzer.yaml");
    for out in [
        run(&[
            "router",
            "--workflow",
            workflow,
            "--http-addr",
            "127.0.0.1:0",
        ]),
        run(&["agent", "--card", card.to_str().unwrap()]),
    ] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("SWITCHYARD_TEST_UNSET_SECRET")
                && stderr.contains("sentiment_analyzer"),
            "{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_work_item_the_broker_refuses_ends_its_task_and_routing_goes_on() {
    let workflow =
        switchyard::workflow::Workflow::load(&root().join("agents/customer-service"), None)
            .unwrap();
    let (cluster, kafka) = mock_cluster_with(&workflow, "refused");
    let router = RunningRouter::start(&kafka, &workflow).await;
    let agents = RunningAgents::example_except(&kafka, &workflow, &["message_sender"]);
    // The broker refuses every record for message_sender's topic, as it does without a write ACL.
    let sender = "refused.agent.message_sender";
    cluster
        .topic_error(
            sender,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    publish(&kafka, &submission("t1", "where is my parcel?")).await;
    let ended = |d: &Decision| {
        matches!(
            d,
            Decision::DeadLettered {
                ends_task: true,
                ..
            }
        )
    };
    let events = until(
        &kafka,
        "t1",
        "t1 to end when its work item is refused",
        ended,
    )
    .await;
    let last = events.last().unwrap();
    let rejection = last
        .rejected
        .as_ref()
        .expect("the decision carries the refusal");
    assert_eq!(rejection.topic, sender);
    assert!(rejection.error.contains("authoriz"), "{}", rejection.error);
    assert!(
        matches!(&last.decision, Decision::DeadLettered { reason, .. } if reason == "work_item_rejected")
    );
    let letters = eventually(WAIT, "the work item in the dead-letter topic", || async {
        let letters = dlq::list(&kafka, &Selection::default()).unwrap();
        letters
            .into_iter()
            .find(|d| d.reason == "work_item_rejected")
    })
    .await;
    assert_eq!(letters.source_topic, sender);
    assert_eq!(
        router
            .metrics
            .rejected_records
            .with_label_values(&["work_item"])
            .get(),
        1
    );

    cluster
        .topic_error(
            sender,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
        )
        .unwrap();
    let sender = RunningAgents::start(&kafka, &workflow, &["message_sender"], |n| {
        ExampleAgent(n.to_string())
    });
    let refused_after = submit_until_one_completes(&kafka, "t2").await;
    let report = replay_all(&kafka, &workflow.engine()).await;
    assert!(report.divergences.is_empty(), "{:?}", report.divergences);
    assert_eq!(report.refused_writes, 1 + refused_after as u64);
    sender.stop().await;
    agents.stop().await;
    router.stop().await;
}

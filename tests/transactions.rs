//! Exactly-once routing with Kafka transactions, against librdkafka's in-process mock cluster
//! (no broker installable here implements transactions), and the refusal on the local broker.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use switchyard::envelope::{Decision, EventKind, StateEvent};
use switchyard::kafka::KafkaConfig;
use switchyard::metrics::RouterMetrics;
use switchyard::router::snapshot::SnapshotConfig;
use switchyard::router::{ConsistencyMode, Router, RouterConfig};
use switchyard::workflow::Workflow;

const WAIT: Duration = Duration::from_secs(60);

/// A mock cluster with the example workflow's topics.
fn mock_cluster() -> (
    MockCluster<'static, DefaultProducerContext>,
    KafkaConfig,
    Workflow,
) {
    let workflow = Workflow::load(&root().join("agents/customer-service"), None).unwrap();
    let (cluster, kafka) = mock_cluster_with(&workflow, "eos");
    (cluster, kafka, workflow)
}

fn exactly_once(config: &mut RouterConfig) {
    config.consistency = ConsistencyMode::ExactlyOnce;
    config.commit_interval = Duration::from_millis(50);
}

/// Every state event a consumer with `isolation.level` sees.
fn state_with(kafka: &KafkaConfig, isolation: &str) -> Vec<StateEvent> {
    let mut k = kafka.clone();
    k.options.insert("isolation.level".into(), isolation.into());
    state_events(&k)
}

fn routed_per_task(events: &[StateEvent]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for e in events {
        if matches!(e.decision, Decision::Routed { .. }) {
            *out.entry(e.task_id.clone()).or_default() += 1;
        }
    }
    out
}

// What librdkafka's mock cluster (2.12.1) does with transactions, read from its source
// (rdkafka_mock_handlers.c) and confirmed by these tests: it runs the transaction coordinator
// (InitProducerId with producer epochs, AddPartitionsToTxn, AddOffsetsToTxn, EndTxn), fences a
// producer whose epoch is stale, and injects errors on request. It does not write commit/abort
// markers (Fetch always reports no aborted transactions, so read_committed consumers see aborted
// records) and does not store TxnOffsetCommit offsets (OffsetFetch returns none). The tests
// therefore check the router's side of each guarantee, and say where the mock cannot show the
// broker's side.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_committed_batch_is_visible_and_a_new_instance_resumes_after_it() {
    let (_cluster, kafka, workflow) = mock_cluster();
    let router = RunningRouter::start_with(&kafka, &workflow, exactly_once).await;
    for i in 0..5 {
        publish(&kafka, &submission(&format!("c{i}"), "hello")).await;
    }
    let routed = eventually(WAIT, "5 committed decisions", || async {
        let routed = routed_per_task(&state_with(&kafka, "read_committed"));
        (routed.len() == 5).then_some(routed)
    })
    .await;
    assert!(routed.values().all(|n| *n == 1), "{routed:?}");
    let work = read_all(&kafka, "eos.agent.sentiment_analyzer");
    assert_eq!(
        work.len(),
        5,
        "the work items are committed with their decisions"
    );
    router.stop().await;

    // A new instance restores the position from the committed state and decides nothing twice.
    let router = RunningRouter::start_with(&kafka, &workflow, exactly_once).await;
    publish(&kafka, &submission("c5", "hello")).await;
    let routed = eventually(WAIT, "the new instance's decision", || async {
        let routed = routed_per_task(&state_with(&kafka, "read_committed"));
        (routed.len() == 6).then_some(routed)
    })
    .await;
    assert!(
        routed.values().all(|n| *n == 1),
        "nothing decided twice: {routed:?}"
    );
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborted_batch_is_taken_back_and_decided_again_the_same_way() {
    let (cluster, kafka, workflow) = mock_cluster();
    let router = RunningRouter::start_with(&kafka, &workflow, exactly_once).await;
    publish(&kafka, &submission("warm-up", "hello")).await;
    eventually(WAIT, "the warm-up decision", || async {
        (routed_per_task(&state_with(&kafka, "read_committed")).len() == 1).then_some(())
    })
    .await;

    // The offset commit inside the next transaction fails as after a rebalance: the records are
    // produced, the transaction cannot commit and must abort.
    cluster.request_errors(
        RDKafkaApiKey::TxnOffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION],
    );
    for i in 0..3 {
        publish(&kafka, &submission(&format!("a{i}"), "hello")).await;
    }
    // The mock shows aborted records to everyone, so the log holds the aborted attempt and the
    // committed one. Had the router not taken the aborted decisions back, the second reading of
    // each submission would have been dropped as a duplicate instead of routed again.
    let events = eventually(
        WAIT,
        "the batch decided twice (aborted, then committed)",
        || async {
            let events = state_with(&kafka, "read_uncommitted");
            let routed = routed_per_task(&events);
            (0..3)
                .all(|i| routed.get(&format!("a{i}")) == Some(&2))
                .then_some(events)
        },
    )
    .await;
    for i in 0..3 {
        let task = format!("a{i}");
        let decisions: Vec<&Decision> = events
            .iter()
            .filter(|e| e.task_id == task)
            .map(|e| &e.decision)
            .collect();
        assert_eq!(decisions.len(), 2, "{task}: {decisions:?}");
        assert_eq!(
            decisions[0], decisions[1],
            "{task}: the re-decision repeats the aborted one exactly"
        );
    }
    assert!(
        !events.iter().any(|e| matches!(
            &e.decision,
            Decision::Dropped { .. } | Decision::DeadLettered { .. }
        )),
        "no duplicate or dead letter came from the re-read"
    );
    router.stop().await;
}

/// A broker fences a producer when another one initialises the same transactional id. The mock
/// cannot do that itself (every InitProducerId gets a fresh producer id, `rd_kafka_mock_pid_new`),
/// so the test makes the mock answer the way a broker answers a fenced producer, and checks what
/// the router does with it: stop at once with a clear fatal error, leaving a restart to the
/// supervisor. A second `init_transactions` on the same id must still succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_instance_stops_with_a_clear_fatal_error() {
    let (cluster, kafka, workflow) = mock_cluster();
    let mut config = RouterConfig::new(kafka.clone());
    exactly_once(&mut config);
    config.instance_id = "router-1".into();
    let first = Router::new(
        config.clone(),
        workflow.engine(),
        RouterMetrics::new().unwrap(),
    )
    .await
    .unwrap();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let first = tokio::spawn(first.run(rx));
    publish(&kafka, &submission("before", "hello")).await;
    eventually(WAIT, "the first instance to route", || async {
        (routed_per_task(&state_with(&kafka, "read_committed")).len() == 1).then_some(())
    })
    .await;

    let _second = Router::new(config, workflow.engine(), RouterMetrics::new().unwrap())
        .await
        .expect("the successor initialises");
    cluster.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    publish(&kafka, &submission("after", "hello")).await;
    let error = tokio::time::timeout(WAIT, first)
        .await
        .expect("the fenced instance stops")
        .unwrap()
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("fatal producer error, restart this instance")
            && message.to_lowercase().contains("fenced"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_workflow_completes_with_router_and_agents_in_exactly_once_mode() {
    let (_cluster, kafka, workflow) = mock_cluster();
    let router = RunningRouter::start_with(&kafka, &workflow, exactly_once).await;
    let agents = RunningAgents::example(&kafka, &workflow, |c| {
        c.consistency = ConsistencyMode::ExactlyOnce
    });
    for i in 0..3 {
        publish(&kafka, &submission(&format!("e{i}"), "where is my order")).await;
    }
    let events = eventually(WAIT, "three completed tasks", || async {
        let events = state_with(&kafka, "read_committed");
        let done = events
            .iter()
            .filter(|e| matches!(e.decision, Decision::Completed { .. }))
            .count();
        (done == 3).then_some(events)
    })
    .await;
    assert!(
        !events.iter().any(|e| matches!(
            e.decision,
            Decision::Dropped { .. } | Decision::DeadLettered { .. }
        )),
        "no duplicate result"
    );
    agents.stop().await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_on_the_local_broker_fails_fast_naming_the_alternative() {
    let kafka = kafka("no-txn");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let mut config = RouterConfig::new(kafka.clone());
    config.consistency = ConsistencyMode::ExactlyOnce;
    let started = std::time::Instant::now();
    let error = match Router::new(config, workflow.engine(), RouterMetrics::new().unwrap()).await {
        Ok(_) => panic!("nisshi has no transactions; exactly-once must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("refused transactions") && error.contains("--consistency effectively-once"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "fails fast");
}

/// An effectively-once agent whose result is refused by an injected Produce error: `error`,
/// then the agent's answer to the work item on the tasks topic.
async fn answer_after_produce_error(error: RDKafkaRespErr) -> switchyard::envelope::TaskEvent {
    let (cluster, kafka, workflow) = mock_cluster();
    let item = switchyard::envelope::WorkItem {
        task_id: "w1".into(),
        tenant: "default".into(),
        step_id: 1,
        attempt: 1,
        card: "sentiment_analyzer".into(),
        input: serde_json::json!({ "customer_message": "hello" }),
        context: Default::default(),
        labels: Default::default(),
        deadline: None,
        reply_partition: 0,
    };
    let producer = kafka.producer().unwrap();
    let inbox = "eos.agent.sentiment_analyzer";
    let bytes = serde_json::to_vec(&item).unwrap();
    producer
        .send(
            rdkafka::producer::FutureRecord::to(inbox)
                .key("w1")
                .payload(&bytes),
            WAIT,
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    cluster.request_errors(RDKafkaApiKey::Produce, &[error]);
    let agents = RunningAgents::start(&kafka, &workflow, &["sentiment_analyzer"], |n| {
        ExampleAgent(n.to_string())
    });
    let answer = eventually(WAIT, "the answer on the tasks topic", || async {
        let records = read_all(&kafka, &kafka.topics().tasks());
        records
            .iter()
            .filter_map(|m| {
                rdkafka::Message::payload(m)
                    .and_then(|b| switchyard::envelope::decode_task_event(b).ok())
            })
            .find(|e| e.task_id == "w1")
    })
    .await;
    agents.stop().await;
    answer
}

/// An effectively-once agent whose producer fails for good (nisshi once answered an idempotent
/// write with OutOfOrderSequenceNumber, which librdkafka's idempotent producer treats as fatal)
/// replaces its producer and publishes the result again instead of stopping.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_whose_producer_fails_publishes_its_result_with_a_new_one() {
    let error = RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER;
    let answer = answer_after_produce_error(error).await;
    assert_eq!(
        (answer.kind, answer.step_id, answer.source.as_str()),
        (EventKind::Result, Some(1), "sentiment_analyzer")
    );
}

/// A result the broker refuses as a record (too large) becomes a FAILED with the broker's error,
/// so the card's retry policy decides; the agent goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_whose_result_is_refused_publishes_a_failure_instead() {
    let error = RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE;
    let answer = answer_after_produce_error(error).await;
    assert_eq!((answer.kind, answer.step_id), (EventKind::Failed, Some(1)));
    let message = answer.payload["error"].as_str().unwrap_or_default();
    assert!(message.contains("refused the result"), "{message}");
}

/// In exactly-once mode a work item the broker refuses aborts its batch's transaction; the batch
/// is decided again without it, as effectively-once does at once: the task ends with a decision
/// that carries the refusal, and routing goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_work_item_refused_in_a_transaction_ends_its_task_and_routing_goes_on() {
    let (cluster, kafka, workflow) = mock_cluster();
    let router = RunningRouter::start_with(&kafka, &workflow, exactly_once).await;
    let agents = RunningAgents::example_except(&kafka, &workflow, &["message_sender"]);
    let sender = "eos.agent.message_sender";
    cluster
        .topic_error(
            sender,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    publish(&kafka, &submission("t1", "where is my parcel?")).await;
    let refusal = eventually(WAIT, "t1 to end with the refusal", || async {
        state_with(&kafka, "read_committed")
            .into_iter()
            .find(|e| e.task_id == "t1" && e.rejected.is_some())
    })
    .await;
    assert_eq!(refusal.rejected.unwrap().topic, sender);
    assert!(
        matches!(&refusal.decision, Decision::DeadLettered { ends_task: true, reason, .. } if reason == "work_item_rejected")
    );
    assert!(
        router.metrics.aborted.get() >= 1,
        "the first attempt aborted"
    );

    cluster
        .topic_error(sender, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    let sending = RunningAgents::start(&kafka, &workflow, &["message_sender"], |n| {
        ExampleAgent(n.to_string())
    });
    submit_until_one_completes(&kafka, "t2").await;
    sending.stop().await;
    agents.stop().await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exactly_once_router_writes_snapshots_and_its_successor_restores_from_one() {
    let (_cluster, kafka, workflow) = mock_cluster();
    let snapshots = |c: &mut RouterConfig| {
        exactly_once(c);
        c.snapshots = SnapshotConfig {
            every_records: 5,
            ..SnapshotConfig::default()
        };
    };
    let agents = RunningAgents::example(&kafka, &workflow, |c| {
        c.consistency = ConsistencyMode::ExactlyOnce
    });
    let completed = |n: usize| {
        let kafka = kafka.clone();
        async move {
            let events = state_with(&kafka, "read_committed");
            let done = events
                .iter()
                .filter(|e| matches!(e.decision, Decision::Completed { .. }))
                .count();
            (done >= n).then_some(events.len())
        }
    };
    let first = RunningRouter::start_with(&kafka, &workflow, snapshots).await;
    for i in 0..6 {
        publish(&kafka, &submission(&format!("s{i}"), "where is my order")).await;
    }
    eventually(WAIT, "six completed tasks", || completed(6)).await;
    let written = || {
        first
            .metrics
            .snapshots
            .with_label_values(&["written"])
            .get()
    };
    eventually(WAIT, "a snapshot written", || async {
        (written() > 0).then_some(())
    })
    .await;
    first.stop().await;
    let recorded = state_with(&kafka, "read_committed").len() as u64;

    let second = RunningRouter::start_with(&kafka, &workflow, snapshots).await;
    eventually(WAIT, "the successor's restore", || async {
        (second.metrics.restore_seconds.get_sample_count() > 0).then_some(())
    })
    .await;
    let read = second.metrics.restore_records.get();
    assert!(
        read < recorded,
        "the restore read {read} of {recorded} state records: it started from a snapshot"
    );
    publish(&kafka, &submission("s6", "where is my order")).await;
    eventually(WAIT, "the seventh task to complete", || completed(7)).await;
    second.stop().await;
    agents.stop().await;
}

//! Exactly-once routing with Kafka transactions.
//!
//! The guarantees are checked on a broker that implements transactions (crabka; `scripts/test`
//! starts it, or `scripts/start-txn-broker`; `SWITCHYARD_TXN_BOOTSTRAP` names another), through
//! what users see: read_committed readers, and the offsets the consumer group committed.
//! librdkafka's in-process mock cluster serves the tests that need a fault at one request a
//! broker cannot be made to fail on demand, and the local broker (nisshi) the refusal.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Message, Offset, TopicPartitionList};

use switchyard::commit::{Outgoing, Writer, Written};
use switchyard::envelope::{Decision, EventKind, StateEvent};
use switchyard::kafka::KafkaConfig;
use switchyard::metrics::RouterMetrics;
use switchyard::router::snapshot::SnapshotConfig;
use switchyard::router::{ConsistencyMode, Router, RouterConfig};
use switchyard::workflow::Workflow;

const WAIT: Duration = Duration::from_secs(60);

fn exactly_once(config: &mut RouterConfig) {
    config.consistency = ConsistencyMode::ExactlyOnce;
    config.commit_interval = Duration::from_millis(50);
}

/// The example workflow, its topics created on the transactional broker.
async fn transactional(test: &str) -> (KafkaConfig, Workflow) {
    let kafka = txn_kafka(test);
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    (kafka, workflow)
}

/// `kafka` with `isolation.level` set.
fn reading(kafka: &KafkaConfig, isolation: &str) -> KafkaConfig {
    let mut k = kafka.clone();
    k.options.insert("isolation.level".into(), isolation.into());
    k
}

/// Every state event a consumer with `isolation.level` sees.
fn state_with(kafka: &KafkaConfig, isolation: &str) -> Vec<StateEvent> {
    state_events(&reading(kafka, isolation))
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

/// Waits until `tasks` tasks have a committed routing decision, and checks each has exactly one.
async fn each_routed_once(kafka: &KafkaConfig, tasks: usize, what: &str) {
    let routed = eventually(WAIT, what, || async {
        let routed = routed_per_task(&state_with(kafka, "read_committed"));
        (routed.len() == tasks).then_some(routed)
    })
    .await;
    assert!(
        routed.values().all(|n| *n == 1),
        "nothing decided twice: {routed:?}"
    );
}

/// Waits until the router group's committed offsets reach the end of the tasks topic.
async fn offsets_at_the_end(kafka: &KafkaConfig, what: &str) {
    let (tasks, group) = (kafka.topics().tasks(), kafka.topics().router_group());
    eventually(WAIT, what, || async {
        (committed_offsets(kafka, &group, &tasks) == ends(kafka, &tasks)).then_some(())
    })
    .await;
}

/// The offsets `group` committed on each partition of `topic` (-1: none).
fn committed_offsets(kafka: &KafkaConfig, group: &str, topic: &str) -> Vec<i64> {
    let mut config = kafka.client_config();
    config.set("group.id", group);
    let consumer: BaseConsumer = config.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..kafka.partition_count(topic).unwrap() {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, WAIT).unwrap();
    committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(n) => n,
            _ => -1,
        })
        .collect()
}

/// The high watermark of each partition of `topic`.
fn ends(kafka: &KafkaConfig, topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = kafka.client_config().create().unwrap();
    (0..kafka.partition_count(topic).unwrap())
        .map(|p| consumer.fetch_watermarks(topic, p, WAIT).unwrap().1)
        .collect()
}

/// The payloads of `topic` a consumer with `isolation.level` sees, as text.
fn payloads(kafka: &KafkaConfig, topic: &str, isolation: &str) -> Vec<String> {
    read_all(&reading(kafka, isolation), topic)
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned())
        .collect()
}

/// The writer the router and the agents share, on its own: an aborted transaction leaves
/// nothing for read_committed readers and does not move the group's offsets; a committed one is
/// visible and moves them. The abort is injected mid-batch: the middle record is refused (its
/// partition does not exist) after the records around it were written in the transaction.
/// (crabka 0.3.8 does not enforce a topic's `max.message.bytes`, so a record too large is no
/// way to make it refuse one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborted_transaction_is_invisible_and_moves_no_offset_a_committed_one_is_seen() {
    let kafka = txn_kafka("eos-writer");
    setup(&kafka, &root().join("agents/customer-service")).await;
    let (input, output) = (kafka.topics().tasks(), kafka.topics().state());
    let group = format!("{}.writer-test", kafka.topic_prefix);

    // A member of the group, whose metadata the transactions carry.
    let mut config = kafka.client_config();
    config
        .set("group.id", &group)
        .set("enable.auto.commit", "false");
    let member: BaseConsumer = config.create().unwrap();
    member.subscribe(&[&input]).unwrap();
    eventually(WAIT, "the member's assignment", || async {
        let _ = member.poll(Duration::from_millis(100));
        (member.assignment().unwrap().count() > 0).then_some(())
    })
    .await;
    let writer = Writer::new(&kafka, ConsistencyMode::ExactlyOnce, &group)
        .await
        .expect("the transactional broker accepts transactions");
    let record_at = |p: i32, text: &str| Outgoing::bytes(output.clone(), Some(p), "k", text.into());
    let record = |text: &str| record_at(0, text);
    let offsets = |next: i64| {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&input, 0, Offset::Offset(next))
            .unwrap();
        Some((tpl, member.group_metadata().unwrap()))
    };
    let write = |records: Vec<Outgoing>, next: i64| writer.write(vec![records], offsets(next));

    let first = write(vec![record("a1"), record("a2")], 1);
    assert!(matches!(first.await.unwrap(), Written::Committed(_)));
    assert_eq!(payloads(&kafka, &output, "read_committed"), ["a1", "a2"]);
    assert_eq!(committed_offsets(&kafka, &group, &input)[0], 1);

    let batch = vec![record("b1"), record_at(99, "refused"), record("b2")];
    let aborted = write(batch, 3).await.unwrap();
    assert!(
        matches!(&aborted, Written::Refused(refused) if refused.len() == 1 && refused[0].0 == 1),
        "the middle record is refused and the transaction aborted"
    );
    let uncommitted = payloads(&kafka, &output, "read_uncommitted");
    assert!(
        uncommitted.contains(&"b1".to_string()) && uncommitted.contains(&"b2".to_string()),
        "the aborted records reached the log: {uncommitted:?}"
    );
    assert_eq!(
        payloads(&kafka, &output, "read_committed"),
        ["a1", "a2"],
        "a read_committed reader sees nothing of the aborted batch"
    );
    assert_eq!(
        committed_offsets(&kafka, &group, &input)[0],
        1,
        "the aborted batch's offsets were not committed"
    );

    let third = write(vec![record("c1")], 3);
    assert!(matches!(third.await.unwrap(), Written::Committed(_)));
    assert_eq!(
        payloads(&kafka, &output, "read_committed"),
        ["a1", "a2", "c1"]
    );
    assert_eq!(committed_offsets(&kafka, &group, &input)[0], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_batches_are_visible_with_the_offsets_advanced_and_a_new_instance_resumes() {
    let (kafka, workflow) = transactional("eos-commit").await;
    let router = RunningRouter::start_with(&kafka, &workflow, exactly_once).await;
    for i in 0..5 {
        publish(&kafka, &submission(&format!("c{i}"), "hello")).await;
    }
    each_routed_once(&kafka, 5, "5 committed decisions").await;
    let work = read_all(
        &kafka,
        &format!("{}.agent.sentiment_analyzer", kafka.topic_prefix),
    );
    assert_eq!(
        work.len(),
        5,
        "the work items are committed with their decisions"
    );
    offsets_at_the_end(&kafka, "the group's offsets at the tasks topic's end").await;
    router.stop().await;

    // A new instance resumes from the committed offsets and state, and decides nothing twice.
    let router = RunningRouter::start_with(&kafka, &workflow, exactly_once).await;
    publish(&kafka, &submission("c5", "hello")).await;
    each_routed_once(&kafka, 6, "the new instance's decision").await;
    offsets_at_the_end(&kafka, "the offsets to advance past c5").await;
    router.stop().await;
}

/// A second instance with the same transactional id fences the first, which stops with a clear
/// fatal error; the second takes over and decides nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_instance_fences_the_first_which_stops_and_the_second_resumes() {
    let (kafka, workflow) = transactional("eos-fence").await;
    let mut config = RouterConfig::new(kafka.clone());
    exactly_once(&mut config);
    config.instance_id = "router-1".into();
    let start = |config: RouterConfig| {
        let engine = workflow.engine();
        async move {
            Router::new(config, engine, RouterMetrics::new().unwrap())
                .await
                .expect("the instance initialises its transactions")
        }
    };
    let (stop, rx) = tokio::sync::watch::channel(false);
    let first = tokio::spawn(start(config.clone()).await.run(rx.clone()));
    publish(&kafka, &submission("before", "hello")).await;
    each_routed_once(&kafka, 1, "the first instance to route").await;

    let second = start(config).await;
    publish(&kafka, &submission("after", "hello")).await;
    let error = tokio::time::timeout(WAIT, first)
        .await
        .expect("the fenced instance stops")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("fatal producer error, restart this instance")
            && error.to_lowercase().contains("fenced"),
        "{error}"
    );

    let second = tokio::spawn(second.run(rx));
    publish(&kafka, &submission("later", "hello")).await;
    each_routed_once(&kafka, 3, "the second instance to route the rest").await;
    stop.send(true).unwrap();
    tokio::time::timeout(WAIT, second)
        .await
        .expect("the second instance stops")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_workflow_completes_with_router_and_agents_in_exactly_once_mode() {
    let (kafka, workflow) = transactional("eos-workflow").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exactly_once_router_writes_snapshots_and_its_successor_restores_from_one() {
    let (kafka, workflow) = transactional("eos-snapshots").await;
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

// Faults at one request, on librdkafka's in-process mock cluster.

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

// What librdkafka's mock cluster (2.12.1) does with transactions, read from its source
// (rdkafka_mock_handlers.c) and confirmed by these tests: it runs the transaction coordinator
// (InitProducerId with producer epochs, AddPartitionsToTxn, AddOffsetsToTxn, EndTxn), fences a
// producer whose epoch is stale, and injects errors on request. It does not write commit/abort
// markers (Fetch always reports no aborted transactions, so read_committed consumers see aborted
// records) and does not store TxnOffsetCommit offsets (OffsetFetch returns none). The tests
// here check the router's side; the tests above, the broker's.

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

//! Exactly-once routing with Kafka transactions, against librdkafka's in-process mock cluster
//! (no broker installable here implements transactions), and the refusal on the local broker.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use switchyard::envelope::{Decision, StateEvent};
use switchyard::kafka::KafkaConfig;
use switchyard::metrics::RouterMetrics;
use switchyard::router::{ConsistencyMode, Router, RouterConfig};
use switchyard::workflow::Workflow;

const WAIT: Duration = Duration::from_secs(60);

/// A mock cluster with the example workflow's topics (3 partitions each).
fn mock_cluster() -> (
    MockCluster<'static, DefaultProducerContext>,
    KafkaConfig,
    Workflow,
) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let kafka = KafkaConfig {
        bootstrap_servers: cluster.bootstrap_servers(),
        topic_prefix: "eos".into(),
        options: Default::default(),
    };
    let workflow = Workflow::load(&root().join("agents/customer-service"), None).unwrap();
    let topics = kafka.topics();
    let mut names = vec![topics.tasks(), topics.state(), topics.dlq()];
    names.extend(workflow.cards.iter().map(|c| c.topic(&kafka.topic_prefix)));
    for name in names {
        cluster.create_topic(&name, 3, 1).unwrap();
    }
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

/// The router group's committed offsets on the tasks topic, summed over partitions.
fn committed(kafka: &KafkaConfig) -> i64 {
    let mut config = kafka.client_config();
    config.set("group.id", kafka.topics().router_group());
    let consumer: BaseConsumer = config.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(&kafka.topics().tasks(), p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    committed
        .elements()
        .iter()
        .map(|e| {
            if let Offset::Offset(o) = e.offset() {
                o
            } else {
                0
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_committed_batch_is_visible_with_its_offsets() {
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
    eventually(
        WAIT,
        "the offsets committed with the transaction",
        || async { (committed(&kafka) == 5).then_some(()) },
    )
    .await;
    let work = read_all(&kafka, "eos.agent.sentiment_analyzer");
    assert_eq!(work.len(), 5, "the work items are committed too");
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborted_batch_leaves_nothing_visible_and_is_decided_again_exactly_once() {
    let (cluster, kafka, workflow) = mock_cluster();
    let router = RunningRouter::start_with(&kafka, &workflow, exactly_once).await;
    publish(&kafka, &submission("warm-up", "hello")).await;
    eventually(WAIT, "the warm-up decision", || async {
        (routed_per_task(&state_with(&kafka, "read_committed")).len() == 1).then_some(())
    })
    .await;
    let before = committed(&kafka);

    // The next offset commit inside a transaction fails as after a rebalance: records are
    // produced, the commit cannot happen, the transaction must abort.
    cluster.request_errors(
        RDKafkaApiKey::TxnOffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION],
    );
    for i in 0..3 {
        publish(&kafka, &submission(&format!("a{i}"), "hello")).await;
    }
    let routed = eventually(WAIT, "the batch decided again and committed", || async {
        let routed = routed_per_task(&state_with(&kafka, "read_committed"));
        (routed.len() == 4).then_some(routed)
    })
    .await;
    assert!(
        routed.values().all(|n| *n == 1),
        "exactly one committed decision per task: {routed:?}"
    );
    let uncommitted = routed_per_task(&state_with(&kafka, "read_uncommitted"));
    assert!(
        (0..3).any(|i| uncommitted.get(&format!("a{i}")).copied().unwrap_or(0) == 2),
        "the aborted attempt was written and is hidden from read_committed: {uncommitted:?}"
    );
    assert_eq!(before, 1);
    eventually(WAIT, "offsets past the re-processed batch", || async {
        (committed(&kafka) == 4).then_some(())
    })
    .await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_instance_with_the_same_transactional_identity_fences_the_first() {
    let (_cluster, kafka, workflow) = mock_cluster();
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
        .unwrap();
    publish(&kafka, &submission("after", "hello")).await;
    let error = tokio::time::timeout(WAIT, first)
        .await
        .expect("the fenced instance stops")
        .unwrap()
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("fatal") && message.to_lowercase().contains("fenced"),
        "{message}"
    );
    let routed = routed_per_task(&state_with(&kafka, "read_committed"));
    assert!(
        !routed.contains_key("after"),
        "the zombie's decision is not committed: {routed:?}"
    );
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

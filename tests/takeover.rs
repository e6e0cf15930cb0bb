//! Take-over re-sends only what may be missing: after a crash, the new owner re-sends the work
//! items of decisions whose writes are not known to have completed, not those of every open task.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use switchyard::envelope::{now_ms, DecidedBy, Decision, InputRef, StateEvent, Step, WorkItem};
use switchyard::kafka::KafkaConfig;
use switchyard::state_record;

const TASKS: usize = 1_000;
const ORPHANS: usize = 5;
const WAIT: Duration = Duration::from_secs(120);

/// The router group's committed position of each tasks partition.
fn committed(kafka: &KafkaConfig, partitions: i32) -> HashMap<i32, i64> {
    let mut config = kafka.client_config();
    config.set("group.id", kafka.topics().router_group());
    let consumer: BaseConsumer = config.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(&kafka.topics().tasks(), p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_take_over_re_sends_exactly_the_work_items_that_may_be_missing() {
    let kafka = kafka("takeover");
    let dir = idle_workflow();
    let workflow = setup(&kafka, dir.path()).await;
    let partitions = kafka.partition_count(&kafka.topics().tasks()).unwrap();
    let inbox = format!("{}.agent.idle", kafka.topic_prefix);

    let mut router = spawn_router(&kafka, dir.path(), 0, &[]);
    let submissions: Vec<_> = (0..TASKS)
        .map(|i| submission(&format!("open-{i}"), "nobody answers yet"))
        .collect();
    futures::future::join_all(submissions.iter().map(|s| publish(&kafka, s))).await;
    let state = kafka.topics().state();
    eventually(
        WAIT,
        "every task routed and its position committed",
        || async {
            let routed = read_all(&kafka, &inbox).len();
            let position: i64 = committed(&kafka, partitions).values().sum();
            (routed == TASKS && position == TASKS as i64).then_some(())
        },
    )
    .await;
    router.kill().unwrap();
    router.wait().unwrap();

    // A crash between the state write and the work-item write: decisions of the dead owner
    // recorded for inputs past its committed positions, whose work items were never written.
    let mut owners: HashMap<i32, (i64, String)> = HashMap::new();
    for m in read_all(&kafka, &state) {
        if let Some(instance) = state_record::owner(m.payload().unwrap()) {
            owners.insert(m.partition(), (m.offset(), instance));
        }
    }
    let producer = kafka.producer().unwrap();
    let mut orphans = Vec::new();
    for i in 0..ORPHANS {
        let event = submission(&format!("orphan-{i}"), "decided, never sent");
        let bytes = serde_json::to_vec(&event).unwrap();
        let (partition, offset) =
            publish_record(&kafka, event.task_id.as_bytes(), Some(&bytes), &[]).await;
        let (epoch, instance) = owners[&partition].clone();
        let decision = Decision::Routed {
            steps: vec![Step::new(1, "idle", 1)],
            decided_by: DecidedBy::Rule {
                rule_id: "start".into(),
            },
        };
        let record = StateEvent {
            input: Some(InputRef {
                event_id: Some(event.event_id.clone()),
                topic: kafka.topics().tasks(),
                partition,
                offset,
                size: Some(bytes.len() as u64),
                sha256: None,
            }),
            event: Some(event.clone()),
            ..StateEvent::new(&event.task_id, 1, (epoch, &instance), decision, now_ms())
        };
        let value = serde_json::to_vec(&record).unwrap();
        let out = FutureRecord::to(&state)
            .partition(partition)
            .key(&record.task_id)
            .payload(&value);
        producer
            .send(out, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        orphans.push(event.task_id);
    }

    let router = RunningRouter::start(&kafka, &workflow).await;
    eventually(WAIT, "the take-over", || async {
        (router.metrics.restore_seconds.get_sample_count() > 0).then_some(())
    })
    .await;
    let resent = router.metrics.reemitted.with_label_values(&["idle"]).get();
    assert_eq!(
        resent, ORPHANS as u64,
        "only the orphans' work items are re-sent"
    );
    let items: Vec<WorkItem> = eventually(WAIT, "the orphans' work items", || async {
        let items: Vec<WorkItem> = read_all(&kafka, &inbox)
            .iter()
            .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
            .collect();
        (items.len() >= TASKS + ORPHANS).then_some(items)
    })
    .await;
    assert_eq!(
        items.len(),
        TASKS + ORPHANS,
        "no other work item was sent again"
    );
    let mut sent: HashMap<&str, usize> = HashMap::new();
    for item in &items {
        *sent.entry(item.task_id.as_str()).or_default() += 1;
    }
    assert!(sent.values().all(|n| *n == 1), "each work item once");
    assert!(orphans.iter().all(|o| sent.contains_key(o.as_str())));
    router.stop().await;
}

/// Makes `producer` fail fatally, as librdkafka does when a broker answers its idempotent
/// writes with an out-of-order sequence (nisshi sometimes handles one connection's produce
/// requests out of order under load).
fn fail_fatally(producer: &rdkafka::producer::FutureProducer) {
    use rdkafka::bindings::{rd_kafka_resp_err_t as Code, rd_kafka_test_fatal_error};
    use rdkafka::producer::Producer;
    let client = producer.client();
    let reason = c"test: produce requests handled out of order";
    let code = unsafe {
        rd_kafka_test_fatal_error(
            client.native_ptr(),
            Code::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        )
    };
    assert_eq!(code, Code::RD_KAFKA_RESP_ERR_NO_ERROR);
    assert!(client.fatal_error().is_some());
}

/// An effectively-once router whose producer fails fatally mid-flow starts over in process: a
/// new producer, its partitions taken over again; every task still finishes, each step decided
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fatal_producer_error_starts_the_router_over_and_loses_nothing() {
    const FLOW: usize = 200;
    let kafka = kafka("fatalprod");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let agents = RunningAgents::example(&kafka, &workflow, |_| {});
    let humans = RunningAgents::start(&kafka, &workflow, &["human_agent"], |_| {
        Human(kafka.clone())
    });
    let router = RunningRouter::start(&kafka, &workflow).await;
    publish_example_tasks(&kafka, FLOW).await;
    eventually(WAIT, "20 tasks to finish", || async {
        (completed_tasks(&kafka) >= 20).then_some(())
    })
    .await;
    fail_fatally(&router.producer);
    eventually(WAIT, "every task to finish", || async {
        (completed_tasks(&kafka) >= FLOW).then_some(())
    })
    .await;
    assert_eq!(
        router.metrics.producer_restarts.get(),
        1,
        "the router started over once, with a new producer"
    );
    router.stop().await;
    agents.stop().await;
    humans.stop().await;
    assert_each_step_decided_once(&state_events(&kafka), FLOW);
}

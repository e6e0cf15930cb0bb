//! Avro in the Confluent wire format end to end: the built-in registry, `schemas register`, the
//! router and agents speaking Avro, poison records, and a schema that evolves while running.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::message::Message;
use serde_json::{json, Value};
use switchyard::codec::{Codec, Encoding};
use switchyard::dlq::headers as dlq_headers;
use switchyard::envelope::Decision;

const WAIT: Duration = Duration::from_secs(60);

/// Starts a registry of this test's own (state in `<prefix>._schemas`) and registers schemas/ in
/// it; returns its URL and the registrations.
async fn registry_with_schemas(
    kafka: &switchyard::kafka::KafkaConfig,
    workflow: &switchyard::workflow::Workflow,
) -> (String, Vec<switchyard::registry::client::Registration>) {
    let topic = format!("{}._schemas", kafka.topic_prefix);
    let addr = switchyard::registry::serve(kafka, &topic, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{addr}");
    let registered = switchyard::registry::client::register(
        &url,
        kafka,
        &workflow.cards,
        &root().join("schemas"),
    )
    .await
    .unwrap();
    (url, registered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_workflow_runs_on_avro_and_poison_records_are_dead_lettered() {
    let kafka = kafka("avro");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let (url, registered) = registry_with_schemas(&kafka, &workflow).await;
    let avro = |c: &mut switchyard::router::RouterConfig| {
        c.encoding = Encoding::Avro;
        c.registry_url = url.clone();
    };
    let router = RunningRouter::start_with(&kafka, &workflow, avro).await;
    let agents = RunningAgents::example(&kafka, &workflow, |c| {
        c.encoding = Encoding::Avro;
        c.registry_url = url.clone();
    });
    let codec = Codec::new(Encoding::Avro, &url);
    let tasks = kafka.topics().tasks();

    let first = codec
        .encode_task_event(&tasks, &submission("avro-1", "where is my order"))
        .await
        .unwrap();
    assert_eq!(
        &first[..5],
        &[0, 0, 0, 0, registered[0].id as u8],
        "Confluent wire format with the TaskEvent id"
    );
    publish_raw(&kafka, "avro-1", &first).await;
    publish_raw(&kafka, "poison-1", b"\x01not the magic byte").await;
    publish_raw(&kafka, "poison-2", &[0, 0, 0, 0x27, 0x0f, 2, 4, 6]).await;
    publish_raw(&kafka, "poison-3", &first[..first.len() / 2]).await;

    let completed = |task: &'static str| {
        let kafka = kafka.clone();
        async move {
            eventually(WAIT, &format!("{task} to complete"), || async {
                task_events(&kafka, task)
                    .iter()
                    .any(|e| matches!(e.decision, Decision::Completed { .. }))
                    .then_some(())
            })
            .await
        }
    };
    completed("avro-1").await;
    let work = read_all(
        &kafka,
        &format!("{}.agent.sentiment_analyzer", kafka.topic_prefix),
    );
    let bytes = work[0].payload().unwrap();
    assert_eq!(bytes[0], 0, "work items are Avro too");
    let item = codec.decode_work_item(bytes).await.unwrap();
    assert_eq!(
        (item.task_id.as_str(), item.card.as_str()),
        ("avro-1", "sentiment_analyzer")
    );

    let dlq = eventually(WAIT, "three dead letters", || async {
        let dlq = read_all(&kafka, &kafka.topics().dlq());
        (dlq.len() >= 3).then_some(dlq)
    })
    .await;
    let mut reasons: Vec<(String, String)> = dlq
        .iter()
        .map(|m| {
            (
                header(m, dlq_headers::REASON).unwrap(),
                String::from_utf8_lossy(m.key().unwrap()).into_owned(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("bad_magic_byte".to_string(), "poison-1".to_string()),
            ("corrupt_datum".to_string(), "poison-3".to_string()),
            ("unknown_schema_id".to_string(), "poison-2".to_string()),
        ]
    );

    // TaskEvent evolves: an optional field with a default. New records are written with it (the
    // subject's latest schema) and the router, built for the old schema, still routes them.
    let schema_path = root().join("schemas/TaskEvent.avsc");
    let mut evolved: Value =
        serde_json::from_str(&std::fs::read_to_string(&schema_path).unwrap()).unwrap();
    evolved["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "channel", "type": ["null", "string"], "default": null }));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("TaskEvent.avsc"), evolved.to_string()).unwrap();
    std::fs::copy(
        root().join("schemas/WorkItem.avsc"),
        dir.path().join("WorkItem.avsc"),
    )
    .unwrap();
    let v2 = switchyard::registry::client::register(&url, &kafka, &workflow.cards, dir.path())
        .await
        .unwrap();
    assert_ne!(v2[0].id, registered[0].id);
    let fresh = Codec::new(Encoding::Avro, &url);
    let second = fresh
        .encode_task_event(&tasks, &submission("avro-2", "where is my order"))
        .await
        .unwrap();
    assert_eq!(
        &second[1..5],
        &v2[0].id.to_be_bytes(),
        "written with the evolved schema"
    );
    publish_raw(&kafka, "avro-2", &second).await;
    completed("avro-2").await;
    assert_eq!(
        fresh.decode_task_event(&first).await.unwrap().task_id,
        "avro-1",
        "records of the old schema still decode"
    );

    agents.stop().await;
    router.stop().await;
}

/// Confluent's own Python client (confluent-kafka's AvroSerializer / AvroDeserializer, installed
/// by `scripts/install-python-deps`) submits a task that the router routes, and decodes the work
/// item the router wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confluents_python_client_submits_a_task_and_decodes_the_work_item() {
    let check = std::process::Command::new("python3")
        .args([
            "-c",
            "from confluent_kafka.schema_registry.avro import AvroSerializer",
        ])
        .output()
        .expect("python3 runs");
    assert!(
        check.status.success(),
        "this test needs confluent-kafka with its Avro serializers: run scripts/install-python-deps\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let kafka = kafka("interop");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let (url, _) = registry_with_schemas(&kafka, &workflow).await;
    let router = RunningRouter::start_with(&kafka, &workflow, |c| {
        c.encoding = Encoding::Avro;
        c.registry_url = url.clone();
    })
    .await;
    let script = root().join("tests/interop/confluent_avro_client.py");
    let schema = root().join("schemas/TaskEvent.avsc");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .args([
            &kafka.bootstrap_servers,
            &url,
            &kafka.topic_prefix,
            "py-1",
            schema.to_str().unwrap(),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let item: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(item["task_id"], "py-1");
    assert_eq!(item["card"], "sentiment_analyzer");
    assert_eq!(item["step_id"], 1);
    assert_eq!(item["input"]["customer_message"], "hello from python");
    assert_eq!(item["labels"]["client"], "confluent-kafka");
    let events = task_events(&kafka, "py-1");
    assert!(
        matches!(&events[0].decision, Decision::Routed { .. }),
        "{events:?}"
    );
    router.stop().await;
}

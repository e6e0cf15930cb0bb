//! The built-in schema registry against Confluent Schema Registry's documented API: status codes,
//! bodies, compatibility, and ids that survive a restart (state persisted in a Kafka topic).

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP/1.1 client: one request per connection.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, String, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (
        status,
        content_type,
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

const TASK_V1: &str = r#"{"type":"record","name":"TaskEvent","namespace":"io.switchyard","fields":[{"name":"event_id","type":"string"},{"name":"task_id","type":"string"}]}"#;
const TASK_V2: &str = r#"{"type":"record","name":"TaskEvent","namespace":"io.switchyard","fields":[{"name":"event_id","type":"string"},{"name":"task_id","type":"string"},{"name":"tenant","type":"string","default":"default"}]}"#;
const TASK_NO_TASK_ID: &str = r#"{"type":"record","name":"TaskEvent","namespace":"io.switchyard","fields":[{"name":"event_id","type":"string"}]}"#;

fn schema(s: &str) -> Option<Value> {
    Some(json!({ "schema": s }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_answer_like_confluent_and_ids_survive_a_restart() {
    let kafka = kafka("registry");
    let topic = format!("{}._schemas", kafka.topic_prefix);
    let addr = switchyard::registry::serve(&kafka, &topic, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let subject = "orders.tasks-value";

    let (status, content_type, body) = call(
        addr,
        "POST",
        &format!("/subjects/{subject}/versions"),
        schema(TASK_V1),
    )
    .await;
    assert_eq!((status, body), (200, json!({ "id": 1 })));
    assert_eq!(content_type, "application/vnd.schemaregistry.v1+json");
    let (status, _, body) = call(
        addr,
        "POST",
        &format!("/subjects/{subject}/versions"),
        schema(&TASK_V1.replace(',', ", ")),
    )
    .await;
    assert_eq!(
        (status, body),
        (200, json!({ "id": 1 })),
        "the same schema gets the same id"
    );
    let (_, _, body) = call(
        addr,
        "POST",
        "/subjects/other-value/versions",
        schema(TASK_V1),
    )
    .await;
    assert_eq!(body, json!({ "id": 1 }), "ids are global");

    let (status, _, body) = call(
        addr,
        "POST",
        &format!("/compatibility/subjects/{subject}/versions/latest"),
        schema(TASK_V2),
    )
    .await;
    assert_eq!(
        (status, body),
        (200, json!({ "is_compatible": true })),
        "an optional field with a default is BACKWARD compatible"
    );
    let (_, _, body) = call(
        addr,
        "POST",
        &format!("/subjects/{subject}/versions"),
        schema(TASK_V2),
    )
    .await;
    assert_eq!(body, json!({ "id": 2 }));

    let (status, _, body) = call(addr, "GET", "/subjects", None).await;
    assert_eq!(
        (status, body),
        (200, json!(["orders.tasks-value", "other-value"]))
    );
    let (_, _, body) = call(addr, "GET", &format!("/subjects/{subject}/versions"), None).await;
    assert_eq!(body, json!([1, 2]));
    let (_, _, body) = call(
        addr,
        "GET",
        &format!("/subjects/{subject}/versions/latest"),
        None,
    )
    .await;
    assert_eq!(
        body,
        json!({ "subject": subject, "version": 2, "id": 2, "schema": TASK_V2 })
    );
    let (_, _, body) = call(
        addr,
        "GET",
        &format!("/subjects/{subject}/versions/1"),
        None,
    )
    .await;
    assert_eq!(body["id"], 1);
    let (_, _, body) = call(addr, "GET", "/schemas/ids/2", None).await;
    assert_eq!(body, json!({ "schema": TASK_V2 }));
    let (status, _, body) = call(
        addr,
        "POST",
        &format!("/subjects/{subject}"),
        schema(TASK_V1),
    )
    .await;
    assert_eq!(
        (status, body["version"].clone(), body["id"].clone()),
        (200, json!(1), json!(1))
    );

    // Errors, with Confluent's status codes and error codes.
    let expect = |status: u16, code: u32, got: (u16, String, Value)| {
        assert_eq!(
            (got.0, got.2["error_code"].clone()),
            (status, json!(code)),
            "{:?}",
            got.2
        );
        assert!(got.2["message"].is_string());
    };
    expect(
        404,
        40401,
        call(addr, "GET", "/subjects/nope/versions", None).await,
    );
    expect(
        404,
        40402,
        call(
            addr,
            "GET",
            &format!("/subjects/{subject}/versions/9"),
            None,
        )
        .await,
    );
    expect(
        422,
        42202,
        call(
            addr,
            "GET",
            &format!("/subjects/{subject}/versions/zero"),
            None,
        )
        .await,
    );
    expect(404, 40403, call(addr, "GET", "/schemas/ids/99", None).await);
    expect(
        404,
        40403,
        call(
            addr,
            "POST",
            &format!("/subjects/{subject}"),
            schema(TASK_NO_TASK_ID),
        )
        .await,
    );
    expect(
        422,
        42201,
        call(
            addr,
            "POST",
            &format!("/subjects/{subject}/versions"),
            schema("{not avro"),
        )
        .await,
    );
    expect(
        422,
        42203,
        call(
            addr,
            "PUT",
            "/config",
            Some(json!({ "compatibility": "SIDEWAYS" })),
        )
        .await,
    );

    // Under FULL, removing a field without a default is refused with the registry's error.
    let (status, _, body) = call(
        addr,
        "PUT",
        &format!("/config/{subject}"),
        Some(json!({ "compatibility": "FULL" })),
    )
    .await;
    assert_eq!((status, body), (200, json!({ "compatibility": "FULL" })));
    let (_, _, body) = call(addr, "GET", &format!("/config/{subject}"), None).await;
    assert_eq!(body, json!({ "compatibilityLevel": "FULL" }));
    let (status, _, body) = call(
        addr,
        "POST",
        &format!("/compatibility/subjects/{subject}/versions/latest?verbose=true"),
        schema(TASK_NO_TASK_ID),
    )
    .await;
    assert_eq!((status, body["is_compatible"].clone()), (200, json!(false)));
    assert!(
        body["messages"][0]
            .as_str()
            .unwrap()
            .contains("oldSchemaCannotReadNewData"),
        "{body}"
    );
    expect(
        409,
        409,
        call(
            addr,
            "POST",
            &format!("/subjects/{subject}/versions"),
            schema(TASK_NO_TASK_ID),
        )
        .await,
    );
    let (_, _, body) = call(addr, "GET", "/config", None).await;
    assert_eq!(body, json!({ "compatibilityLevel": "BACKWARD" }));

    // A second registry on the same topic replays it: same ids, versions and levels.
    let again = switchyard::registry::serve(&kafka, &topic, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (_, _, body) = call(
        again,
        "GET",
        &format!("/subjects/{subject}/versions/latest"),
        None,
    )
    .await;
    assert_eq!(
        body,
        json!({ "subject": subject, "version": 2, "id": 2, "schema": TASK_V2 })
    );
    let (_, _, body) = call(
        again,
        "POST",
        "/subjects/third-value/versions",
        schema(TASK_V2),
    )
    .await;
    assert_eq!(
        body,
        json!({ "id": 2 }),
        "the canonical schema keeps its id after the restart"
    );
    let (_, _, body) = call(again, "GET", &format!("/config/{subject}"), None).await;
    assert_eq!(body, json!({ "compatibilityLevel": "FULL" }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_register_talks_to_the_built_in_registry_through_schema_registry_converter() {
    let kafka = kafka("schemas");
    let topic = format!("{}._schemas", kafka.topic_prefix);
    let addr = switchyard::registry::serve(&kafka, &topic, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{addr}");
    let workflow =
        switchyard::workflow::Workflow::load(&root().join("agents/customer-service"), None)
            .unwrap();
    let dir = root().join("schemas");
    let registered = switchyard::registry::client::register(&url, &kafka, &workflow.cards, &dir)
        .await
        .unwrap();
    assert_eq!(registered.len(), 1 + workflow.cards.names().len());
    let tasks = format!("{}.tasks-value", kafka.topic_prefix);
    assert_eq!(registered[0].subject, tasks);
    let work_ids: std::collections::BTreeSet<u32> = registered[1..].iter().map(|r| r.id).collect();
    assert_eq!(
        work_ids.len(),
        1,
        "one WorkItem schema, one id, under every inbox subject"
    );
    let again = switchyard::registry::client::register(&url, &kafka, &workflow.cards, &dir)
        .await
        .unwrap();
    assert_eq!(again, registered, "registering again changes nothing");

    // An incompatible change is refused with the registry's own error.
    let (status, _, _) = call(
        addr,
        "PUT",
        &format!("/config/{tasks}"),
        Some(json!({ "compatibility": "FULL" })),
    )
    .await;
    assert_eq!(status, 200);
    let changed = tempfile::tempdir().unwrap();
    let task_event: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("TaskEvent.avsc")).unwrap())
            .unwrap();
    let mut without_task_id = task_event.clone();
    without_task_id["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != "task_id");
    std::fs::write(
        changed.path().join("TaskEvent.avsc"),
        without_task_id.to_string(),
    )
    .unwrap();
    std::fs::copy(
        dir.join("WorkItem.avsc"),
        changed.path().join("WorkItem.avsc"),
    )
    .unwrap();
    let error =
        switchyard::registry::client::register(&url, &kafka, &workflow.cards, changed.path())
            .await
            .unwrap_err()
            .to_string();
    assert!(
        error.contains(&tasks) && error.contains("incompatible"),
        "{error}"
    );

    // Adding an optional field with a default is accepted.
    let mut with_channel = task_event;
    with_channel["fields"].as_array_mut().unwrap().push(json!({ "name": "channel", "type": ["null", "string"], "default": null, "doc": "Where the task came from." }));
    std::fs::write(
        changed.path().join("TaskEvent.avsc"),
        with_channel.to_string(),
    )
    .unwrap();
    let evolved =
        switchyard::registry::client::register(&url, &kafka, &workflow.cards, changed.path())
            .await
            .unwrap();
    assert_ne!(evolved[0].id, registered[0].id);
    let (_, _, versions) = call(addr, "GET", &format!("/subjects/{tasks}/versions"), None).await;
    assert_eq!(versions, json!([1, 2]));
}

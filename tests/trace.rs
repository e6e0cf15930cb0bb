//! Trace context end to end: one task through the example workflow, with `switchyard submit`,
//! the router and every agent running as processes that export spans over OTLP/HTTP (JSON) to a
//! receiver in this test, yields one trace: the submission is its root, each decision's parent is
//! the span of the event it decides (the submission, or the agent step that answered), and each
//! agent step's parent is the decision that sent its work item.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use common::*;
use serde_json::{json, Value};
use switchyard::envelope::Decision;
use switchyard::kafka::KafkaConfig;

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

type Spans = Arc<Mutex<Vec<Span>>>;

/// An attribute's value as text (`stringValue`, `intValue`, ...).
fn text(value: &Value) -> String {
    match value.as_object().and_then(|o| o.values().next()) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn attributes(list: &Value) -> HashMap<String, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["key"].as_str().unwrap_or_default().to_string(),
                text(&a["value"]),
            )
        })
        .collect()
}

async fn receive(State(spans): State<Spans>, Json(body): Json<Value>) -> Json<Value> {
    let mut out = spans.lock().unwrap();
    for resource in body["resourceSpans"].as_array().into_iter().flatten() {
        let service = attributes(&resource["resource"]["attributes"])
            .remove("service.name")
            .unwrap_or_default();
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                out.push(Span {
                    service: service.clone(),
                    name: span["name"].as_str().unwrap_or_default().to_string(),
                    trace: span["traceId"].as_str().unwrap_or_default().to_string(),
                    id: span["spanId"].as_str().unwrap_or_default().to_string(),
                    parent: span["parentSpanId"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    attributes: attributes(&span["attributes"]),
                });
            }
        }
    }
    Json(json!({}))
}

/// An OTLP/HTTP receiver on 127.0.0.1; returns its base URL.
async fn receiver(spans: Spans) -> String {
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(spans);
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn traced(kafka: &KafkaConfig, url: &str, args: &[&str], log: &str) -> Spawned {
    let log = std::fs::File::create(std::env::temp_dir().join(log)).unwrap();
    let child = switchyard_command(kafka)
        .envs([
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            // A slow export on a loaded machine is waited for, not dropped.
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "60000"),
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    Spawned(child)
}

const CARDS: [&str; 6] = [
    "sentiment_analyzer",
    "intent_classifier",
    "knowledge_retriever",
    "response_generator",
    "quality_controller",
    "message_sender",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_task_is_one_trace_from_submit_through_every_decision_and_agent_step() {
    let kafka = kafka("trace");
    setup(&kafka, &root().join("agents/customer-service")).await;
    let spans: Spans = Arc::default();
    let url = receiver(spans.clone()).await;
    let prefix = kafka.topic_prefix.clone();
    let mut children = vec![traced(
        &kafka,
        &url,
        &[
            "router",
            "--workflow",
            "agents/customer-service",
            "--http-addr",
            "127.0.0.1:0",
        ],
        &format!("{prefix}-router.log"),
    )];
    for card in CARDS {
        let path = format!("agents/customer-service/cards/{card}.yaml");
        children.push(traced(
            &kafka,
            &url,
            &["agent", "--card", &path],
            &format!("{prefix}-{card}.log"),
        ));
    }
    let submitted = switchyard_command(&kafka)
        .envs([
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ])
        .args([
            "submit",
            "--task-id",
            "traced-1",
            "--payload",
            r#"{"customer_message": "where is my order?"}"#,
        ])
        .output()
        .unwrap();
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );

    let decisions = eventually(Duration::from_secs(180), "the task to complete", || async {
        let events = task_events(&kafka, "traced-1");
        events
            .iter()
            .any(|e| matches!(e.decision, Decision::Completed { .. }))
            .then_some(events)
    })
    .await;
    let steps: usize = decisions
        .iter()
        .map(|e| match &e.decision {
            Decision::Routed { steps, .. } => steps.len(),
            Decision::Escalated { .. } => 1,
            _ => 0,
        })
        .sum();
    assert_eq!(steps, 6, "the example workflow's six agent steps");
    assert!(decisions.len() >= 7, "{} decisions", decisions.len());
    let of_task = |name: &str| {
        let name = name.to_string();
        let spans = spans.clone();
        move || -> Vec<Span> {
            spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| {
                    s.name == name
                        && s.attributes.get("task_id").map(String::as_str) == Some("traced-1")
                })
                .cloned()
                .collect()
        }
    };
    let (decides, agent_steps, submits) =
        (of_task("decide"), of_task("agent_step"), of_task("submit"));
    let arrived = || {
        format!(
            "{} of {} decide, {} of {steps} agent_step, {} of 1 submit spans",
            decides().len(),
            decisions.len(),
            agent_steps().len(),
            submits().len()
        )
    };
    let all_arrived = || {
        decides().len() >= decisions.len() && agent_steps().len() >= steps && !submits().is_empty()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !all_arrived() {
        assert!(
            std::time::Instant::now() < deadline,
            "not every span arrived within 120 s: {}",
            arrived()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }

    let (decides, agent_steps, submits) = (decides(), agent_steps(), submits());
    assert_eq!(submits.len(), 1, "one submit span");
    let root = &submits[0];
    assert!(root.parent.is_empty(), "submit starts the trace: {root:?}");
    assert_eq!(root.service, "switchyard-submit");
    assert_eq!(decides.len(), decisions.len(), "one span per decision");
    assert_eq!(agent_steps.len(), steps, "one span per agent step");
    for span in decides.iter().chain(&agent_steps) {
        assert_eq!(span.trace, root.trace, "one trace: {span:?}");
    }
    let by_step: HashMap<&str, &Span> = agent_steps
        .iter()
        .map(|s| (s.attributes["step_id"].as_str(), s))
        .collect();
    for decide in &decides {
        assert_eq!(decide.service, "switchyard-router");
        let kind = decide.attributes.get("kind").map(String::as_str);
        let expected = match kind {
            Some("SUBMITTED") => root.id.as_str(),
            _ => {
                let step = decide
                    .attributes
                    .get("answers_step")
                    .expect("a decision about a result answers a step");
                by_step
                    .get(step.as_str())
                    .unwrap_or_else(|| panic!("no agent span for step {step}"))
                    .id
                    .as_str()
            }
        };
        assert_eq!(
            decide.parent, expected,
            "a decision continues the span of the event it decides: {decide:?}"
        );
    }
    for step in &agent_steps {
        assert_eq!(step.service, "switchyard-agent");
        let parent = decides
            .iter()
            .find(|d| d.id == step.parent)
            .unwrap_or_else(|| panic!("agent step {step:?} is not a child of a decision"));
        let cards = parent.attributes.get("cards").cloned().unwrap_or_default();
        assert!(
            cards
                .split(',')
                .any(|c| Some(c) == step.attributes.get("card").map(String::as_str)),
            "the decision that sent the work item routed to its card: {parent:?} -> {step:?}"
        );
    }
}

/// Counts the connections accepted on `addr` (an OTLP default endpoint); fails saying what holds
/// the port when it cannot be bound.
async fn connection_counter(addr: &str) -> Arc<std::sync::atomic::AtomicUsize> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| {
        panic!("cannot listen on {addr} ({e}); this test needs the default OTLP port free: stop what listens there (`ss -ltnp | grep {addr}`)")
    });
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_an_endpoint_nothing_connects_to_an_otlp_port() {
    let kafka = kafka("trace-off");
    setup(&kafka, &root().join("agents/customer-service")).await;
    // The OTLP defaults (HTTP and gRPC) on this host: where an exporter would go unconfigured.
    let http = connection_counter("127.0.0.1:4318").await;
    let grpc = connection_counter("127.0.0.1:4317").await;
    let without_otel = |command: &mut std::process::Command| {
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("OTEL_")) {
            command.env_remove(name);
        }
    };
    let log = std::fs::File::create(
        std::env::temp_dir().join(format!("{}-router.log", kafka.topic_prefix)),
    )
    .unwrap();
    let mut router = switchyard_command(&kafka);
    without_otel(&mut router);
    let mut router = Spawned(
        router
            .args(["router", "--workflow", "agents/customer-service"])
            .args(["--http-addr", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let mut submit = switchyard_command(&kafka);
    without_otel(&mut submit);
    let submitted = submit
        .args(["submit", "--task-id", "untraced-1", "--payload", "{}"])
        .output()
        .unwrap();
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    eventually(Duration::from_secs(60), "the task to be routed", || async {
        task_events(&kafka, "untraced-1")
            .iter()
            .any(|e| matches!(e.decision, Decision::Routed { .. }))
            .then_some(())
    })
    .await;
    let _ = router.kill();
    let _ = router.wait();
    let seen = (
        http.load(std::sync::atomic::Ordering::SeqCst),
        grpc.load(std::sync::atomic::Ordering::SeqCst),
    );
    assert_eq!(
        seen,
        (0, 0),
        "connections to the OTLP HTTP and gRPC ports with no endpoint set"
    );
}

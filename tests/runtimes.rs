//! The `http` and `a2a` runtimes against local servers, and `cards import`, with the router and
//! `switchyard agent` processes on the real broker.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::*;
use serde_json::{json, Value};
use switchyard::envelope::{Decision, EventKind, StateEvent, TaskEvent};
use switchyard::kafka::KafkaConfig;

const WAIT: Duration = Duration::from_secs(60);

/// What the test server saw: per task, how many requests, and the last `x-api-key` header.
#[derive(Default)]
struct Seen {
    calls: HashMap<String, usize>,
    key: Option<String>,
}

type Shared = Arc<Mutex<Seen>>;

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// An HTTP agent whose answer depends on the task: `ok-*` 200, `flaky-*` 500 then 200, `bad-*`
/// 400, `hang-*` a 5-second wait.
async fn http_agent(seen: Shared) -> SocketAddr {
    async fn answer(
        State(seen): State<Shared>,
        headers: HeaderMap,
        Json(item): Json<Value>,
    ) -> (StatusCode, Json<Value>) {
        let task = item["task_id"].as_str().unwrap_or_default().to_string();
        let calls = {
            let mut seen = seen.lock().unwrap();
            seen.key = headers
                .get("x-api-key")
                .map(|v| v.to_str().unwrap().to_string());
            let calls = seen.calls.entry(task.clone()).or_default();
            *calls += 1;
            *calls
        };
        match task.split('-').next().unwrap_or_default() {
            "flaky" if calls == 1 => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"e": 1}))),
            "bad" => (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "no such order"})),
            ),
            "hang" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                (StatusCode::OK, Json(json!({"late": true})))
            }
            _ => (
                StatusCode::OK,
                Json(json!({"shipped": true, "confidence": 0.9})),
            ),
        }
    }
    serve(Router::new().route("/ship", post(answer)).with_state(seen)).await
}

/// A workflow with one card, `worker`, of `runtime` (YAML), and `rules_extra` before the rest.
fn workflow_with(dir: &Path, runtime: &str, rules_extra: &str) {
    std::fs::create_dir_all(dir.join("cards")).unwrap();
    std::fs::write(
        dir.join("cards/worker.yaml"),
        format!("name: worker\ntimeout: 2s\nretry: {{ max_attempts: 2, backoff: {{ initial: 100ms }} }}\nruntime: {runtime}\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("cards/human.yaml"),
        "name: human\nruntime: {kind: human}\n",
    )
    .unwrap();
    let rules = format!(
        "rules:\n  - {{ id: start, when: {{ kind: SUBMITTED }}, then: {{ route: [worker] }} }}\n{rules_extra}  - {{ id: done, when: {{ source: [worker, human] }}, then: complete }}\n"
    );
    std::fs::write(dir.join("rules.yaml"), rules).unwrap();
}

/// The decisions of `task_id` up to the one that ended (or escalated) it.
async fn settled(kafka: &KafkaConfig, task_id: &str) -> Vec<StateEvent> {
    eventually(WAIT, &format!("{task_id} to settle"), || async {
        let mut events = task_events(kafka, task_id);
        let end = events.iter().position(|e| {
            matches!(
                e.decision,
                Decision::Completed { .. }
                    | Decision::Escalated { .. }
                    | Decision::DeadLettered {
                        ends_task: true,
                        ..
                    }
            )
        })?;
        events.truncate(end + 1);
        Some(events)
    })
    .await
}

/// Publishes a `warm-up` task and waits until the worker answered it, so that the agent process
/// consumes its topic: the tests' steps time out after 2 s, and an agent's group join can take
/// longer than that on a loaded machine.
async fn wait_for_the_agent(kafka: &KafkaConfig) {
    publish(
        kafka,
        &TaskEvent::new("warm-up", EventKind::Submitted, "client"),
    )
    .await;
    eventually(WAIT, "the agent to answer a warm-up task", || async {
        task_events(kafka, "warm-up")
            .iter()
            .filter_map(|e| e.event.as_ref())
            .any(|e| e.source == "worker")
            .then_some(())
    })
    .await;
}

fn retries(events: &[StateEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e.decision, Decision::RetryScheduled { .. }))
        .count()
}

fn failures(events: &[StateEvent]) -> Vec<Value> {
    events
        .iter()
        .filter_map(|e| e.event.as_ref())
        .filter(|e| e.kind == EventKind::Failed)
        .map(|e| e.payload.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_agent_completes_steps_retries_5xx_not_4xx_and_times_out_hangs() {
    let kafka = kafka("runtime-http");
    let seen: Shared = Arc::default();
    let addr = http_agent(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    workflow_with(
        dir.path(),
        &format!("{{ kind: http, url: \"http://{addr}/ship\", headers: {{ x-api-key: TEST_SHIPPING_KEY }} }}"),
        "",
    );
    let workflow = setup(&kafka, dir.path()).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let secret = "s3cret-header-value-7f3a";
    let log = format!("{}-agent.log", kafka.topic_prefix);
    let card = dir.path().join("cards/worker.yaml");
    let mut agent = switchyard_command(&kafka);
    agent
        .env("TEST_SHIPPING_KEY", secret)
        .env("RUST_LOG", "debug")
        .args(["agent", "--card", card.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(std::env::temp_dir().join(&log)).unwrap());
    let mut agent = Spawned(agent.spawn().unwrap());
    wait_for_the_agent(&kafka).await;
    for task in ["ok-1", "flaky-1", "bad-1", "hang-1"] {
        publish(
            &kafka,
            &TaskEvent::new(task, EventKind::Submitted, "client"),
        )
        .await;
    }

    let ok = settled(&kafka, "ok-1").await;
    assert!(matches!(
        ok.last().unwrap().decision,
        Decision::Completed { .. }
    ));
    assert_eq!(ok[1].event.as_ref().unwrap().payload["shipped"], true);
    assert_eq!(ok[1].event.as_ref().unwrap().confidence, Some(0.9));

    let flaky = settled(&kafka, "flaky-1").await;
    assert!(
        matches!(flaky.last().unwrap().decision, Decision::Completed { .. }),
        "{flaky:#?}"
    );
    assert_eq!(retries(&flaky), 1, "the 500 was retried once");

    let bad = settled(&kafka, "bad-1").await;
    assert!(
        matches!(&bad.last().unwrap().decision, Decision::DeadLettered { reason, .. } if reason == "agent_failed"),
        "{:?}",
        bad.last()
    );
    assert_eq!(retries(&bad), 0, "a 400 is not retried");
    assert_eq!(failures(&bad)[0]["retryable"], false);
    assert_eq!(seen.lock().unwrap().calls["bad-1"], 1);

    let hang = settled(&kafka, "hang-1").await;
    let failed = failures(&hang);
    assert!(!failed.is_empty(), "the hang ended as a failure: {hang:?}");
    assert!(
        failed[0]["error"].as_str().unwrap().contains("timed out"),
        "{failed:?}"
    );
    assert!(matches!(
        hang.last().unwrap().decision,
        Decision::DeadLettered { .. }
    ));

    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(
        seen.lock().unwrap().key.as_deref(),
        Some(secret),
        "the header was sent"
    );
    let logged = std::fs::read_to_string(std::env::temp_dir().join(&log)).unwrap();
    assert!(logged.contains("DEBUG"), "the agent logged at debug level");
    assert!(
        !logged.contains(secret),
        "the header's value appears in the agent's debug log"
    );
    router.stop().await;
}

/// An A2A agent over JSON-RPC: completes tasks whose message says `ship`, asks for input on
/// `ask`; serves its agent card.
async fn a2a_agent() -> SocketAddr {
    async fn rpc(Json(request): Json<Value>) -> Json<Value> {
        let params = &request["params"];
        let message = &params["message"];
        let data = &message["parts"][0]["data"];
        let state = match data["what"].as_str() {
            Some("ask") => "input-required",
            _ => "completed",
        };
        let mut task = json!({
            "kind": "task",
            "id": format!("a2a-{}", message["contextId"].as_str().unwrap_or_default()),
            "contextId": message["contextId"],
            "status": {"state": state, "message": {"role": "agent", "parts": [{"kind": "text", "text": "Which order do you mean?"}]}},
        });
        if state == "completed" {
            task["artifacts"] =
                json!([{"parts": [{"kind": "data", "data": {"tracking": "TRK-1", "echo": data}}]}]);
        }
        assert_eq!(request["method"], "message/send");
        Json(json!({"jsonrpc": "2.0", "id": request["id"], "result": task}))
    }
    let card = |addr: SocketAddr| {
        json!({
            "name": "Parcel Tracker", "description": "Tracks parcels.", "url": format!("http://{addr}/a2a"),
            "version": "1.2.0", "protocolVersion": "0.3.0", "capabilities": {},
            "defaultInputModes": ["application/json"], "defaultOutputModes": ["application/json", "text/plain"],
            "skills": [{"id": "track", "name": "Track", "description": "Finds a parcel.", "tags": ["shipping"], "examples": ["where is TRK-1?"]}]
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/a2a", post(rpc)).route(
        "/.well-known/agent-card.json",
        get(move || async move { Json(card(addr)) }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_a2a_agent_completes_a_step_and_input_required_escalates_to_the_human_card() {
    let kafka = kafka("runtime-a2a");
    let addr = a2a_agent().await;
    let dir = tempfile::tempdir().unwrap();
    workflow_with(
        dir.path(),
        &format!("{{ kind: a2a, url: \"http://{addr}/a2a\" }}"),
        "  - { id: needs-input, when: { source: worker, payload: [{ pointer: /a2a_state, eq: input-required }] }, then: { escalate: human } }\n",
    );
    let workflow = setup(&kafka, dir.path()).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let card = dir.path().join("cards/worker.yaml");
    let mut agent = spawn_switchyard(
        &kafka,
        &["agent", "--card", card.to_str().unwrap()],
        &format!("{}-a2a.log", kafka.topic_prefix),
    );
    wait_for_the_agent(&kafka).await;
    let mut ship = TaskEvent::new("ship-1", EventKind::Submitted, "client");
    ship.payload = json!({"what": "ship"});
    let mut ask = TaskEvent::new("ask-1", EventKind::Submitted, "client");
    ask.payload = json!({"what": "ask"});
    publish(&kafka, &ship).await;
    publish(&kafka, &ask).await;

    let shipped = settled(&kafka, "ship-1").await;
    assert!(matches!(
        shipped.last().unwrap().decision,
        Decision::Completed { .. }
    ));
    let result = &shipped[1].event.as_ref().unwrap().payload;
    assert_eq!(result["tracking"], "TRK-1");
    assert_eq!(
        result["echo"],
        json!({"what": "ship"}),
        "the input went as the data part"
    );

    let asked = settled(&kafka, "ask-1").await;
    match &asked.last().unwrap().decision {
        Decision::Escalated { step, rule_id } => {
            assert_eq!(
                (step.card.as_str(), rule_id.as_str()),
                ("human", "needs-input")
            )
        }
        other => panic!("input-required should escalate: {other:?}"),
    }
    assert_eq!(
        asked[1].event.as_ref().unwrap().payload["message"]["text"],
        "Which order do you mean?"
    );
    let _ = agent.kill();
    let _ = agent.wait();
    router.stop().await;

    let out = dir.path().join("imported.yaml");
    let import = switchyard_command(&kafka)
        .args(["cards", "import", &format!("http://{addr}"), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    let card = switchyard::cards::Card::load(&out).expect("the imported card loads");
    assert_eq!(card.name, "parcel_tracker");
    assert_eq!(card.description, "Tracks parcels.");
    assert_eq!(card.skills[0].tags, vec!["shipping"]);
    assert_eq!(card.output_modes, vec!["application/json", "text/plain"]);
    assert_eq!(
        card.runtime,
        switchyard::cards::Runtime::A2a {
            url: format!("http://{addr}/a2a")
        }
    );
}

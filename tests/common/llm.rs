//! An OpenAI-compatible endpoint that misbehaves on purpose, for the LLM fault tests. The happy
//! path of the LLM tests uses the real local model (scripts/start-llm); this one stands in only
//! where a real model cannot be made to fail on cue.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// What the endpoint does with one request.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Answer with this content after a delay.
    Answer(String, Duration),
    /// Answer with this HTTP status and an OpenAI-style error body.
    Status(u16),
    /// Answer only after this long (longer than the client's time limit).
    Hang(Duration),
    /// Answer with this content once the gate is open (`true`).
    Gated(tokio::sync::watch::Receiver<bool>, String),
}

/// Chooses a behaviour from the request body (the whole JSON as text) and the model asked for.
pub type Script = Arc<dyn Fn(&str, &str) -> Behaviour + Send + Sync>;

/// A running fake endpoint.
pub struct FakeLlm {
    /// Its base URL, ending in `/v1`.
    pub url: String,
    calls: Arc<Mutex<HashMap<String, u32>>>,
    handle: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Shared {
    script: Arc<Mutex<Script>>,
    calls: Arc<Mutex<HashMap<String, u32>>>,
}

impl FakeLlm {
    /// Starts the endpoint on 127.0.0.1 with `script`.
    pub async fn start(script: Script) -> Self {
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let shared = Shared {
            script: Arc::new(Mutex::new(script)),
            calls: calls.clone(),
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(complete))
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let handle = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { url, calls, handle }
    }

    /// How many requests mentioned `reference` (e.g. `ref-q1`) in their prompt.
    pub fn calls(&self, reference: &str) -> u32 {
        self.calls
            .lock()
            .unwrap()
            .get(reference)
            .copied()
            .unwrap_or(0)
    }

    /// Requests in all.
    pub fn total(&self) -> u32 {
        self.calls.lock().unwrap().values().sum()
    }

    /// Requests by reference.
    pub fn all(&self) -> HashMap<String, u32> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// The `ref-...` token a test puts in a task's message to follow it through the endpoint.
fn reference(body: &str) -> String {
    body.find("ref-")
        .map(|i| {
            body[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect()
        })
        .unwrap_or_else(|| "unreferenced".into())
}

async fn complete(State(shared): State<Shared>, Json(body): Json<Value>) -> Response {
    let text = body.to_string();
    let model = body["model"].as_str().unwrap_or_default().to_string();
    *shared
        .calls
        .lock()
        .unwrap()
        .entry(reference(&text))
        .or_default() += 1;
    let behaviour = {
        let script = shared.script.lock().unwrap();
        script(&text, &model)
    };
    match behaviour {
        Behaviour::Status(code) if code >= 500 => {
            (StatusCode::from_u16(code).unwrap(), "upstream model crashed").into_response()
        }
        Behaviour::Status(code) => (
            StatusCode::from_u16(code).unwrap(),
            Json(json!({"error": {"message": format!("fake error {code}"), "type": "invalid_request_error"}})),
        )
            .into_response(),
        Behaviour::Hang(d) => {
            tokio::time::sleep(d).await;
            (StatusCode::GATEWAY_TIMEOUT, "too late").into_response()
        }
        Behaviour::Gated(mut gate, content) => {
            let _ = gate.wait_for(|open| *open).await;
            answer(&model, &content)
        }
        Behaviour::Answer(content, delay) => {
            tokio::time::sleep(delay).await;
            answer(&model, &content)
        }
    }
}

/// A chat completion of `model` saying `content`.
fn answer(model: &str, content: &str) -> Response {
    Json(json!({
        "id": "fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    }))
    .into_response()
}

/// A valid decider answer choosing `agent`.
pub fn choose(agent: &str) -> String {
    json!({"reason": "the fake endpoint says so", "agent": agent, "confidence": 0.9}).to_string()
}

/// The real local model's endpoint; fails with how to start it when nothing answers.
pub async fn real_model() -> String {
    let url = std::env::var("SWITCHYARD_TEST_LLM_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:8089/v1".into());
    let health = url.trim_end_matches("/v1").to_string() + "/health";
    if !http_ok(&health).await {
        panic!(
            "this test needs the local LLM at {url} (OpenAI-compatible): start it with \
             `scripts/start-llm` (installs it on first use), or set SWITCHYARD_TEST_LLM_URL"
        );
    }
    url
}

/// Whether `url` answers a plain GET with 200, without an HTTP client dependency.
async fn http_ok(url: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.trim_start_matches("http://");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut stream) = tokio::net::TcpStream::connect(authority).await else {
        return false;
    };
    let request = format!("GET /{path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.is_ok() && head.ends_with(b"200")
}

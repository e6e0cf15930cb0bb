//! `switchyard console`: a web console to watch, search, answer and repair.
//!
//! It follows the state and dead-letter topics into an SQLite index ([`index`], one file under
//! its data directory) and serves server-rendered pages from it: Overview, Tasks, a task's
//! timeline, the Workflow graph, Agents, Dead letters and the Inbox of escalations. It never
//! writes the state topic: its write actions (redrive, answer, cancel) publish to the tasks topic
//! or send dead letters back to their source, exactly as the CLI does, and need the token
//! ([`auth`]); without a token it is read-only.

pub mod auth;
pub mod follow;
pub mod graph;
pub mod html;
pub mod index;
pub mod pages;
pub mod repair;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::routing::{get, post};

use crate::codec::Codec;
use crate::error::Result;
use crate::kafka::KafkaConfig;
use crate::workflow::Workflow;

/// The default address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// How the console runs.
pub struct ConsoleConfig {
    /// Kafka and the topic prefix.
    pub kafka: KafkaConfig,
    /// How task events it publishes are encoded.
    pub codec: Codec,
    /// The workflow it draws and whose human cards it answers for.
    pub workflow: Workflow,
    /// Where it listens.
    pub listen: SocketAddr,
    /// Directory of its index file (`index.sqlite`).
    pub data_dir: PathBuf,
    /// The token that allows write actions; `None`: read-only.
    pub token: Option<String>,
    /// Refuse redriving a dead letter redriven this many times already.
    pub max_redrives: u32,
}

/// What the handlers share.
pub struct Console {
    kafka: KafkaConfig,
    codec: Codec,
    workflow: Workflow,
    index: Arc<index::Index>,
    auth: auth::Auth,
    max_redrives: u32,
}

/// A running console: its address, and the follower to stop.
pub struct Running {
    /// The address it serves on.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    follower: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Stops following the topics (the server stops with the runtime).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(follower) = self.follower.take() {
            let _ = follower.join();
        }
    }
}

/// Opens the index, starts following the topics and serves the pages.
pub async fn serve(config: ConsoleConfig) -> Result<Running> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| crate::files::Error::Io {
        path: config.data_dir.clone(),
        source,
    })?;
    let index = Arc::new(index::Index::open(&config.data_dir.join("index.sqlite"))?);
    let stop = Arc::new(AtomicBool::new(false));
    let follower = follow::start(&config.kafka, index.clone(), stop.clone())?;
    let console = Arc::new(Console {
        kafka: config.kafka,
        codec: config.codec,
        workflow: config.workflow,
        index,
        auth: auth::Auth::new(config.token),
        max_redrives: config.max_redrives,
    });
    let app = axum::Router::new()
        .route("/", get(pages::overview))
        .route("/tasks", get(pages::tasks))
        .route("/tasks/rows", get(pages::task_rows))
        .route("/tasks/{id}", get(pages::task))
        .route("/tasks/{id}/cancel", post(repair::cancel))
        .route("/workflow", get(graph::workflow))
        .route("/agents", get(pages::agents))
        .route("/dead-letters", get(repair::dead_letters))
        .route("/dead-letters/redrive", post(repair::redrive))
        .route("/inbox", get(repair::inbox))
        .route("/inbox/{id}/answer", post(repair::answer))
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/health", get(|| async { "ok" }))
        .with_state(console);
    let (listener, addr) = crate::http::listen(config.listen).await?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "console stopped");
        }
    });
    tracing::info!(%addr, "console listening");
    Ok(Running {
        addr,
        stop,
        follower: Some(follower),
    })
}

/// An answer for an index that failed: 500 with the error.
fn failed(e: impl std::fmt::Display) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        format!("console: {e}"),
    )
        .into_response()
}

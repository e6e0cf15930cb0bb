//! The registry's HTTP API, persisted to a Kafka topic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::store::{ApiError, Change, Level, Store};
use crate::error::Error;
use crate::kafka::{read_topic, KafkaConfig};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

struct Registry {
    store: Mutex<Store>,
    producer: FutureProducer,
    topic: String,
}

impl Registry {
    /// Persists `change`, then applies it.
    async fn commit(&self, store: &mut Store, change: Change) -> Result<(), ApiError> {
        let payload = serde_json::to_vec(&change).map_err(ApiError::store)?;
        let key = match &change {
            Change::Schema {
                subject, version, ..
            } => format!("{subject}/{version}"),
            Change::Config { subject, .. } => {
                format!("config/{}", subject.as_deref().unwrap_or(""))
            }
        };
        self.producer
            .send(
                FutureRecord::to(&self.topic)
                    .key(&key)
                    .payload(&payload)
                    .partition(0),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| ApiError::store(e))?;
        store.apply(&change);
        Ok(())
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        body.to_string(),
    )
        .into_response()
}

fn ok(body: Value) -> Response {
    reply(StatusCode::OK, body)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        reply(
            status,
            json!({ "error_code": self.error_code, "message": self.message }),
        )
    }
}

type Api = Result<Response, ApiError>;

#[derive(Deserialize)]
struct SchemaBody {
    schema: String,
    #[serde(default, rename = "schemaType")]
    schema_type: Option<String>,
}

fn schema_body(body: &Bytes) -> Result<String, ApiError> {
    let parsed: SchemaBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_schema(format!("request body: {e}")))?;
    match parsed.schema_type.as_deref() {
        None | Some("AVRO") => Ok(parsed.schema),
        Some(other) => Err(ApiError::invalid_schema(format!(
            "schemaType {other} is not supported; this registry holds AVRO"
        ))),
    }
}

fn registered(r: super::store::Registered) -> Response {
    ok(json!({ "subject": r.subject, "version": r.version, "id": r.id, "schema": r.schema }))
}

async fn subjects(State(r): State<Arc<Registry>>) -> Api {
    Ok(ok(json!(r.store.lock().await.subjects())))
}

async fn versions(State(r): State<Arc<Registry>>, Path(subject): Path<String>) -> Api {
    Ok(ok(json!(r.store.lock().await.versions(&subject)?)))
}

async fn register(State(r): State<Arc<Registry>>, Path(subject): Path<String>, body: Bytes) -> Api {
    let schema = schema_body(&body)?;
    let mut store = r.store.lock().await;
    let (change, id) = store.register(&subject, &schema)?;
    if let Some(change) = change {
        r.commit(&mut store, change).await?;
    }
    Ok(ok(json!({ "id": id })))
}

async fn version(
    State(r): State<Arc<Registry>>,
    Path((subject, version)): Path<(String, String)>,
) -> Api {
    Ok(registered(
        r.store.lock().await.version(&subject, &version)?,
    ))
}

async fn version_schema(
    State(r): State<Arc<Registry>>,
    Path((subject, version)): Path<(String, String)>,
) -> Api {
    let v = r.store.lock().await.version(&subject, &version)?;
    Ok(reply(
        StatusCode::OK,
        serde_json::from_str(&v.schema).unwrap_or(Value::String(v.schema)),
    ))
}

async fn lookup(State(r): State<Arc<Registry>>, Path(subject): Path<String>, body: Bytes) -> Api {
    let schema = schema_body(&body)?;
    Ok(registered(r.store.lock().await.lookup(&subject, &schema)?))
}

async fn by_id(State(r): State<Arc<Registry>>, Path(id): Path<i32>) -> Api {
    Ok(ok(json!({ "schema": r.store.lock().await.schema(id)? })))
}

#[derive(Deserialize)]
struct Verbose {
    #[serde(default)]
    verbose: bool,
}

async fn compatible(
    State(r): State<Arc<Registry>>,
    subject: String,
    version: Option<String>,
    verbose: bool,
    body: Bytes,
) -> Api {
    let schema = schema_body(&body)?;
    let result = r
        .store
        .lock()
        .await
        .compatible(&subject, &schema, version.as_deref())?;
    Ok(ok(match (result, verbose) {
        (Ok(()), false) => json!({ "is_compatible": true }),
        (Ok(()), true) => json!({ "is_compatible": true, "messages": [] }),
        (Err(_), false) => json!({ "is_compatible": false }),
        (Err(why), true) => json!({ "is_compatible": false, "messages": [why] }),
    }))
}

async fn compatible_version(
    state: State<Arc<Registry>>,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Query<Verbose>,
    body: Bytes,
) -> Api {
    compatible(state, subject, Some(version), q.verbose, body).await
}

async fn compatible_all(
    state: State<Arc<Registry>>,
    Path(subject): Path<String>,
    Query(q): Query<Verbose>,
    body: Bytes,
) -> Api {
    compatible(state, subject, None, q.verbose, body).await
}

fn level_body(body: &Bytes) -> Result<Level, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_compatibility(&e.to_string()))?;
    let level = v
        .get("compatibility")
        .and_then(Value::as_str)
        .unwrap_or_default();
    level.parse()
}

async fn get_global(State(r): State<Arc<Registry>>) -> Api {
    Ok(ok(
        json!({ "compatibilityLevel": r.store.lock().await.level(None).to_string() }),
    ))
}

async fn put_global(State(r): State<Arc<Registry>>, body: Bytes) -> Api {
    let level = level_body(&body)?;
    let mut store = r.store.lock().await;
    r.commit(
        &mut store,
        Change::Config {
            subject: None,
            level,
        },
    )
    .await?;
    Ok(ok(json!({ "compatibility": level.to_string() })))
}

async fn get_subject(State(r): State<Arc<Registry>>, Path(subject): Path<String>) -> Api {
    let store = r.store.lock().await;
    if !store.has_level(&subject) {
        return Err(ApiError {
            status: 404,
            error_code: 40408,
            message: format!(
                "Subject '{subject}' does not have subject-level compatibility configured"
            ),
        });
    }
    Ok(ok(
        json!({ "compatibilityLevel": store.level(Some(&subject)).to_string() }),
    ))
}

async fn put_subject(
    State(r): State<Arc<Registry>>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Api {
    let level = level_body(&body)?;
    let mut store = r.store.lock().await;
    r.commit(
        &mut store,
        Change::Config {
            subject: Some(subject),
            level,
        },
    )
    .await?;
    Ok(ok(json!({ "compatibility": level.to_string() })))
}

/// Starts the registry on `addr`, persisting to `topic` (created with one partition if missing)
/// after replaying it. Returns the bound address; the server runs until the runtime stops.
pub async fn serve(
    kafka: &KafkaConfig,
    topic: &str,
    addr: SocketAddr,
) -> Result<SocketAddr, Error> {
    if kafka.partition_count(topic).is_err() {
        let admin: AdminClient<DefaultClientContext> = kafka.client_config().create()?;
        let new = NewTopic::new(topic, 1, TopicReplication::Fixed(1))
            .set("cleanup.policy", "delete")
            .set("retention.ms", "-1");
        for result in admin.create_topics(&[new], &AdminOptions::new()).await? {
            if let Err((name, code)) = result {
                if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                    return Err(rdkafka::error::KafkaError::AdminOp(code).into()).inspect_err(
                        |_| tracing::error!(%name, "cannot create the schemas topic"),
                    );
                }
            }
        }
    }
    let mut store = Store::default();
    let mut corrupt = None;
    let mut replayed = 0u64;
    read_topic(kafka, topic, Some(&[0]), |m| {
        match m.payload().map(serde_json::from_slice::<Change>) {
            Some(Ok(change)) => {
                store.apply(&change);
                replayed += 1;
            }
            other => {
                let message = other.map_or("empty record".into(), |r| {
                    r.err().map(|e| e.to_string()).unwrap_or_default()
                });
                corrupt.get_or_insert(Error::Corrupt {
                    topic: topic.to_string(),
                    partition: 0,
                    offset: m.offset(),
                    what: "registry record",
                    message,
                });
            }
        }
    })?;
    if let Some(e) = corrupt {
        return Err(e);
    }
    let registry = Arc::new(Registry {
        store: Mutex::new(store),
        producer: kafka.producer()?,
        topic: topic.to_string(),
    });
    let app = axum::Router::new()
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}", post(lookup))
        .route("/subjects/{subject}/versions", get(versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(version))
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(version_schema),
        )
        .route("/schemas/ids/{id}", get(by_id))
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(compatible_all),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(compatible_version),
        )
        .route("/config", get(get_global).put(put_global))
        .route("/config/{subject}", get(get_subject).put(put_subject))
        .with_state(registry);
    let (listener, bound) = crate::http::listen(addr).await?;
    tracing::info!(%bound, %topic, replayed, "schema registry listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "schema registry stopped");
        }
    });
    Ok(bound)
}

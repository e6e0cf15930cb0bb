//! How task events and work items are encoded on the wire: JSON, or Avro in the Confluent wire
//! format (magic byte 0, 4-byte big-endian schema id, Avro datum) with schemas from a registry.
//!
//! Avro records are written with the latest schema of the topic's subject (`<topic>-value`,
//! TopicNameStrategy: register them with `switchyard schemas register`) and read with the schema
//! their id names, so records written with older or newer schemas decode as long as the fields
//! switchyard needs are there. Undecodable records are told apart for the dead-letter topic:
//! `bad_magic_byte`, `unknown_schema_id`, `corrupt_datum`. A registry that cannot be reached is
//! not a property of the record: decoding waits and retries instead.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::SubjectNameStrategy;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::envelope::{
    read_task_event, DecodeError, EventKind, TaskEvent, Usage, WorkItem, WorkItemRef, JSON,
};

/// Errors encoding a record.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry refused or could not be reached, or the record does not fit the schema.
    #[error("cannot encode for `{topic}`: {message}")]
    Encode {
        /// The topic.
        topic: String,
        /// What went wrong.
        message: String,
    },
    /// The registry could not be reached for long.
    #[error("the schema registry did not answer: {0}")]
    Registry(String),
}

/// The wire encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// JSON objects: the simplest set-up, no registry.
    #[default]
    Json,
    /// Avro in the Confluent wire format, with a schema registry.
    Avro,
}

impl FromStr for Encoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "json" => Ok(Encoding::Json),
            "avro" => Ok(Encoding::Avro),
            other => Err(format!("`{other}` is not an encoding; use json or avro")),
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoding::Json => "json",
            Encoding::Avro => "avro",
        })
    }
}

/// Encodes and decodes switchyard's records.
pub enum Codec {
    /// JSON.
    Json,
    /// Avro with a registry.
    Avro(Box<AvroCodec>),
}

/// The Avro half of a [`Codec`].
pub struct AvroCodec {
    /// Reads records by the schema id they carry.
    decoder: AvroDecoder,
    /// Writes records with the subject's latest schema.
    encoder: AvroEncoder,
}

const REGISTRY_RETRIES: u32 = 20;

impl Codec {
    /// A codec for `encoding`; `registry_url` is needed for Avro.
    pub fn new(encoding: Encoding, registry_url: &str) -> Self {
        match encoding {
            Encoding::Json => Codec::Json,
            Encoding::Avro => Codec::Avro(Box::new(AvroCodec {
                decoder: AvroDecoder::new(SrSettings::new(registry_url.to_string())),
                encoder: AvroEncoder::new(SrSettings::new(registry_url.to_string())),
            })),
        }
    }

    /// Decodes a task event.
    pub async fn decode_task_event(&self, bytes: &[u8]) -> Result<TaskEvent, DecodeError> {
        self.read_task_event(bytes).await.map(|(event, _)| event)
    }

    /// Decodes a task event, and tells whether `bytes` are its JSON text as a state record may
    /// copy it ([`crate::envelope::read_task_event`]; never for Avro).
    pub async fn read_task_event(&self, bytes: &[u8]) -> Result<(TaskEvent, bool), DecodeError> {
        match self {
            Codec::Json => read_task_event(bytes),
            Codec::Avro(avro) => {
                let value = decode_avro(&avro.decoder, bytes).await?;
                let record: TaskEventRecord = apache_avro::from_value(&value)
                    .map_err(|e| DecodeError::Invalid(e.to_string()))?;
                let event = record.into_event();
                if event.task_id.is_empty() {
                    return Err(DecodeError::Invalid("`task_id` is empty".into()));
                }
                Ok((event, false))
            }
        }
    }

    /// Decodes a work item.
    pub async fn decode_work_item(&self, bytes: &[u8]) -> Result<WorkItem, DecodeError> {
        match self {
            Codec::Json => {
                serde_json::from_slice(bytes).map_err(|e| DecodeError::Invalid(e.to_string()))
            }
            Codec::Avro(avro) => {
                let value = decode_avro(&avro.decoder, bytes).await?;
                let record: WorkItemRecord = apache_avro::from_value(&value)
                    .map_err(|e| DecodeError::Invalid(e.to_string()))?;
                Ok(record.into_item())
            }
        }
    }

    /// Encodes a task event for `topic`.
    pub async fn encode_task_event(
        &self,
        topic: &str,
        event: &TaskEvent,
    ) -> Result<Vec<u8>, Error> {
        match self {
            Codec::Json => Ok(serde_json::to_vec(event).expect("events serialize")),
            Codec::Avro(avro) => {
                encode_avro(&avro.encoder, topic, TaskEventRecord::from_event(event)).await
            }
        }
    }

    /// Encodes a work item for `topic`.
    pub async fn encode_work_item(
        &self,
        topic: &str,
        item: WorkItemRef<'_>,
    ) -> Result<Vec<u8>, Error> {
        match self {
            Codec::Json => {
                let mut bytes = Vec::with_capacity(512);
                serde_json::to_writer(&mut bytes, &item).expect("work items serialize");
                Ok(bytes)
            }
            Codec::Avro(avro) => {
                encode_avro(&avro.encoder, topic, WorkItemRecord::from_item(item)).await
            }
        }
    }
}

async fn decode_avro(
    decoder: &AvroDecoder,
    bytes: &[u8],
) -> Result<apache_avro::types::Value, DecodeError> {
    if bytes.len() < 5 || bytes[0] != 0 {
        return Err(DecodeError::BadMagic(match bytes.first() {
            None => "empty record".into(),
            Some(0) => format!(
                "{} bytes is too short for the Confluent wire format",
                bytes.len()
            ),
            Some(b) => format!(
                "first byte is {b:#04x}, not the magic byte 0x00 of the Confluent wire format"
            ),
        }));
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    retry_registry(|| decoder.get_schema(id))
        .await
        .map_err(|e| DecodeError::UnknownSchema(format!("schema id {id}: {}", describe(&e))))?;
    retry_registry(|| decoder.decode(Some(bytes)))
        .await
        .map(|r| r.value)
        .map_err(|e| DecodeError::CorruptDatum(format!("schema id {id}: {}", describe(&e))))
}

async fn encode_avro(
    encoder: &AvroEncoder,
    topic: &str,
    record: impl Serialize + Clone,
) -> Result<Vec<u8>, Error> {
    let strategy = SubjectNameStrategy::TopicNameStrategy(topic.to_string(), false);
    retry_registry(|| encoder.encode_struct(record.clone(), &strategy))
        .await
        .map_err(|e| Error::Encode {
            topic: topic.to_string(),
            message: describe(&e),
        })
}

/// Calls the registry, waiting while it cannot be reached (retryable errors); returns the first
/// error that is about the request itself.
async fn retry_registry<T, F, Fut>(mut call: F) -> Result<T, SRCError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SRCError>>,
{
    let mut tries = 0;
    loop {
        match call().await {
            Err(e) if e.retriable && tries < REGISTRY_RETRIES => {
                tries += 1;
                tracing::warn!(error = %describe(&e), tries, "schema registry unavailable; retrying");
                tokio::time::sleep(Duration::from_millis(250 * u64::from(tries.min(8)))).await;
            }
            other => return other,
        }
    }
}

fn describe(e: &SRCError) -> String {
    match &e.cause {
        Some(cause) => format!("{}: {cause}", e.error),
        None => e.error.clone(),
    }
}

fn payload_bytes(content_type: &str, payload: &Value) -> Vec<u8> {
    match (content_type == JSON, payload) {
        (false, Value::String(s)) => s.as_bytes().to_vec(),
        _ => serde_json::to_vec(payload).expect("JSON values serialize"),
    }
}

fn payload_value(content_type: &str, bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    match serde_json::from_slice(bytes) {
        Ok(v) if content_type == JSON => v,
        _ => Value::String(String::from_utf8_lossy(bytes).into_owned()),
    }
}

/// The Avro shape of a task event (`schemas/TaskEvent.avsc`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskEventRecord {
    event_id: String,
    task_id: String,
    #[serde(default = "default_tenant")]
    tenant: String,
    kind: EventKind,
    #[serde(default)]
    source: String,
    #[serde(default)]
    step_id: Option<i32>,
    #[serde(default)]
    attempt: Option<i32>,
    #[serde(default, with = "apache_avro::serde::bytes")]
    payload: Vec<u8>,
    #[serde(default = "default_content_type")]
    content_type: String,
    #[serde(default)]
    confidence: Option<f64>,
    #[serde(default)]
    usage: Option<UsageRecord>,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    deadline: Option<i64>,
    #[serde(default)]
    labels: HashMap<String, String>,
    #[serde(default)]
    created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UsageRecord {
    tokens_in: i64,
    tokens_out: i64,
    cost: f64,
}

fn default_tenant() -> String {
    "default".into()
}

fn default_content_type() -> String {
    JSON.into()
}

impl TaskEventRecord {
    fn from_event(e: &TaskEvent) -> Self {
        Self {
            event_id: e.event_id.clone(),
            task_id: e.task_id.clone(),
            tenant: e.tenant.clone(),
            kind: e.kind,
            source: e.source.clone(),
            step_id: e.step_id.map(|s| s as i32),
            attempt: e.attempt.map(|a| a as i32),
            payload: payload_bytes(&e.content_type, &e.payload),
            content_type: e.content_type.clone(),
            confidence: e.confidence,
            usage: e.usage.as_ref().map(|u| UsageRecord {
                tokens_in: u.tokens_in as i64,
                tokens_out: u.tokens_out as i64,
                cost: u.cost,
            }),
            priority: e.priority,
            deadline: e.deadline,
            labels: e
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            created_at: e.created_at,
        }
    }

    fn into_event(self) -> TaskEvent {
        TaskEvent {
            payload: payload_value(&self.content_type, &self.payload),
            event_id: self.event_id,
            task_id: self.task_id,
            tenant: self.tenant,
            kind: self.kind,
            source: self.source,
            step_id: self.step_id.map(|s| s.max(0) as u32),
            attempt: self.attempt.map(|a| a.max(0) as u32),
            content_type: self.content_type,
            confidence: self.confidence,
            usage: self.usage.map(|u| Usage {
                tokens_in: u.tokens_in.max(0) as u64,
                tokens_out: u.tokens_out.max(0) as u64,
                cost: u.cost,
            }),
            priority: self.priority,
            deadline: self.deadline,
            labels: self.labels.into_iter().collect(),
            created_at: self.created_at,
        }
    }
}

/// The Avro shape of a work item (`schemas/WorkItem.avsc`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkItemRecord {
    task_id: String,
    tenant: String,
    step_id: i32,
    attempt: i32,
    card: String,
    #[serde(with = "apache_avro::serde::bytes")]
    input: Vec<u8>,
    #[serde(default)]
    context: HashMap<String, String>,
    #[serde(default)]
    labels: HashMap<String, String>,
    #[serde(default)]
    deadline: Option<i64>,
    reply_partition: i32,
}

impl WorkItemRecord {
    fn from_item(w: WorkItemRef<'_>) -> Self {
        Self {
            task_id: w.task_id.to_string(),
            tenant: w.tenant.to_string(),
            step_id: w.step_id as i32,
            attempt: w.attempt as i32,
            card: w.card.to_string(),
            input: serde_json::to_vec(w.input).expect("JSON values serialize"),
            context: w
                .context
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            labels: w
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            deadline: w.deadline,
            reply_partition: w.reply_partition,
        }
    }

    fn into_item(self) -> WorkItem {
        let context: BTreeMap<String, Value> = self
            .context
            .into_iter()
            .map(|(k, v)| {
                let value = serde_json::from_str(&v).unwrap_or(Value::String(v));
                (k, value)
            })
            .collect();
        WorkItem {
            input: payload_value(JSON, &self.input),
            task_id: self.task_id,
            tenant: self.tenant,
            step_id: self.step_id.max(0) as u32,
            attempt: self.attempt.max(0) as u32,
            card: self.card,
            context,
            labels: self.labels.into_iter().collect(),
            deadline: self.deadline,
            reply_partition: self.reply_partition,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::Schema;

    fn schema(name: &str) -> Schema {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas")
            .join(name);
        Schema::parse_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn task_events_round_trip_through_the_shipped_schema() {
        let mut event = TaskEvent::new("t1", EventKind::Result, "card");
        event.step_id = Some(3);
        event.payload = serde_json::json!({ "answer": 42 });
        event.confidence = Some(0.9);
        event.labels.insert("tier".into(), "gold".into());
        event.usage = Some(Usage {
            tokens_in: 10,
            tokens_out: 5,
            cost: 0.25,
        });
        let schema = schema("TaskEvent.avsc");
        let value = apache_avro::to_value(TaskEventRecord::from_event(&event))
            .unwrap()
            .resolve(&schema)
            .unwrap();
        assert!(
            value.validate(&schema),
            "the Rust type matches schemas/TaskEvent.avsc"
        );
        let back: TaskEventRecord = apache_avro::from_value(&value).unwrap();
        assert_eq!(back.into_event(), event);
    }

    #[test]
    fn work_items_round_trip_through_the_shipped_schema() {
        let item = WorkItem {
            task_id: "t".into(),
            tenant: "default".into(),
            step_id: 2,
            attempt: 1,
            card: "c".into(),
            input: serde_json::json!({ "m": "hi" }),
            context: [("a".to_string(), serde_json::json!({ "x": 1 }))]
                .into_iter()
                .collect(),
            labels: BTreeMap::new(),
            deadline: Some(5),
            reply_partition: 1,
        };
        let schema = schema("WorkItem.avsc");
        let value = apache_avro::to_value(WorkItemRecord::from_item(item.borrowed()))
            .unwrap()
            .resolve(&schema)
            .unwrap();
        assert!(
            value.validate(&schema),
            "the Rust type matches schemas/WorkItem.avsc"
        );
        let back: WorkItemRecord = apache_avro::from_value(&value).unwrap();
        assert_eq!(back.into_item(), item);
    }

    #[tokio::test]
    async fn bytes_without_the_magic_byte_are_refused_before_any_registry_call() {
        let codec = Codec::new(Encoding::Avro, "http://127.0.0.1:1");
        let err = codec
            .decode_task_event(b"{\"kind\":\"SUBMITTED\"}")
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "bad_magic_byte");
        let err = codec.decode_task_event(&[0, 0, 0]).await.unwrap_err();
        assert_eq!(err.reason(), "bad_magic_byte");
    }
}

//! The dead-letter topic: list, show and redrive dead letters.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde::Serialize;

use crate::envelope::dlq_headers;
use crate::kafka::{self, read_topic, KafkaConfig};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kafka failed.
    #[error(transparent)]
    Kafka(#[from] kafka::Error),
    /// A write failed.
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    /// No dead letter at that position.
    #[error("no dead letter at {topic}[{partition}]@{offset}")]
    NotFound {
        /// The dead-letter topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
    },
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One dead letter with its headers decoded.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Partition of the dead-letter topic.
    pub partition: i32,
    /// Offset in that partition.
    pub offset: i64,
    /// The original key (the task id where there was one).
    pub key: String,
    /// Reason code.
    pub reason: String,
    /// Human-readable explanation.
    pub message: String,
    /// Topic the record came from.
    pub source_topic: String,
    /// Its partition there.
    pub source_partition: i32,
    /// Its offset there.
    pub source_offset: i64,
    /// When it was dead-lettered, ms since the Unix epoch.
    pub time: i64,
    /// How often it has been redriven before.
    pub redrives: u32,
    /// Every header, as text.
    pub headers: BTreeMap<String, String>,
    /// The original bytes.
    #[serde(skip)]
    pub payload: Vec<u8>,
}

impl DeadLetter {
    fn from_message(m: &impl Message) -> Self {
        let headers: BTreeMap<String, String> = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let text = |k: &str| headers.get(k).cloned().unwrap_or_default();
        let number = |k: &str| {
            headers
                .get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(-1)
        };
        Self {
            partition: m.partition(),
            offset: m.offset(),
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            reason: text(dlq_headers::REASON),
            message: text(dlq_headers::MESSAGE),
            source_topic: text(dlq_headers::TOPIC),
            source_partition: number(dlq_headers::PARTITION) as i32,
            source_offset: number(dlq_headers::OFFSET),
            time: number(dlq_headers::TIME),
            redrives: headers
                .get(dlq_headers::REDRIVES)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        }
    }
}

/// Which dead letters to act on.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only this reason.
    pub reason: Option<String>,
    /// Only records with this key (task id).
    pub task: Option<String>,
    /// Only these `partition:offset` positions.
    pub positions: Vec<(i32, i64)>,
}

impl Selection {
    fn admits(&self, d: &DeadLetter) -> bool {
        self.reason.as_deref().is_none_or(|r| d.reason == r)
            && self.task.as_deref().is_none_or(|t| d.key == t)
            && (self.positions.is_empty() || self.positions.contains(&(d.partition, d.offset)))
    }
}

/// Every dead letter that `selection` admits, oldest first within each partition.
pub fn list(kafka: &KafkaConfig, selection: &Selection) -> Result<Vec<DeadLetter>> {
    let mut out = Vec::new();
    read_topic(kafka, &kafka.topics().dlq(), None, |m| {
        let d = DeadLetter::from_message(m);
        if selection.admits(&d) {
            out.push(d);
        }
    })?;
    Ok(out)
}

/// The dead letter at `partition`/`offset`.
pub fn show(kafka: &KafkaConfig, partition: i32, offset: i64) -> Result<DeadLetter> {
    let selection = Selection {
        positions: vec![(partition, offset)],
        ..Selection::default()
    };
    list(kafka, &selection)?
        .pop()
        .ok_or_else(|| Error::NotFound {
            topic: kafka.topics().dlq(),
            partition,
            offset,
        })
}

/// What a redrive did with one dead letter.
#[derive(Debug, Clone, Serialize)]
pub enum Redriven {
    /// Sent back to its source topic.
    Sent {
        /// The dead letter.
        dead_letter: DeadLetter,
    },
    /// Refused: it has been redriven `max` times already.
    Refused {
        /// The dead letter.
        dead_letter: DeadLetter,
        /// The limit.
        max: u32,
    },
}

/// Sends the selected dead letters back to their source topics (original key and bytes, with
/// `switchyard.redrive.count` one higher), refusing those redriven `max_redrives` times already.
pub async fn redrive(
    kafka: &KafkaConfig,
    selection: &Selection,
    max_redrives: u32,
) -> Result<Vec<Redriven>> {
    let producer = kafka.producer()?;
    let mut out = Vec::new();
    for d in list(kafka, selection)? {
        if d.redrives >= max_redrives || d.source_topic.is_empty() {
            out.push(Redriven::Refused {
                dead_letter: d,
                max: max_redrives,
            });
            continue;
        }
        let count = (d.redrives + 1).to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: dlq_headers::REDRIVES,
            value: Some(&count),
        });
        let record = FutureRecord::to(&d.source_topic)
            .key(d.key.as_bytes())
            .payload(&d.payload)
            .headers(headers);
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
        out.push(Redriven::Sent { dead_letter: d });
    }
    Ok(out)
}

//! The dead-letter topic: how a dead letter is written (the original key and value, the reason
//! in headers), and how dead letters are listed, shown and redriven.
//!
//! A dead letter keeps its record as it was read: the same key, the same bytes, and no value for
//! a tombstone. A value too large to be written whole keeps a bounded prefix, and its headers
//! say so with the original size and SHA-256; the whole record stays at its source position,
//! which `redrive` reads back (and checks against the hash) instead of the prefix.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde::Serialize;

use crate::commit::{refuses_record, Outgoing};
use crate::envelope::now_ms;
use crate::kafka::{self, read_at, read_topic, Error, KafkaConfig, Result};
use crate::signing::sha256_hex;

/// Header names of dead-letter records (in the spirit of KIP-1034).
pub mod headers {
    /// Reason code.
    pub const REASON: &str = "switchyard.error.reason";
    /// Human-readable error message.
    pub const MESSAGE: &str = "switchyard.error.message";
    /// Source topic.
    pub const TOPIC: &str = "switchyard.error.topic";
    /// Source partition.
    pub const PARTITION: &str = "switchyard.error.partition";
    /// Source offset.
    pub const OFFSET: &str = "switchyard.error.offset";
    /// Version of the router that dead-lettered the record.
    pub const ROUTER_VERSION: &str = "switchyard.error.router.version";
    /// Time of dead-lettering, milliseconds since the Unix epoch.
    pub const TIME: &str = "switchyard.error.time";
    /// How often the record has been redriven from the dead-letter topic.
    pub const REDRIVES: &str = "switchyard.redrive.count";
    /// Present when the dead letter carries only a prefix of the original: `value`, `key` or
    /// `key,value`.
    pub const TRUNCATED: &str = "switchyard.error.truncated";
    /// Size of the original value in bytes (when truncated).
    pub const ORIGINAL_SIZE: &str = "switchyard.error.original.size";
    /// Hex SHA-256 of the original value (when truncated).
    pub const ORIGINAL_SHA256: &str = "switchyard.error.original.sha256";
    /// Size of the original key in bytes (when truncated).
    pub const ORIGINAL_KEY_SIZE: &str = "switchyard.error.original.key.size";
}

/// How often a dead letter may be redriven by default (`dlq redrive --max-redrives`, the
/// console's `--console-max-redrives`).
pub const DEFAULT_MAX_REDRIVES: u32 = 3;

/// How many bytes of a value that cannot be written whole a dead letter keeps.
pub const PREFIX_BYTES: usize = 64 * 1024;

/// How many bytes of a key over a quarter of the record limit a dead letter keeps.
pub const KEY_PREFIX_BYTES: usize = 1024;

/// A dead letter's original record, as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Topic it was read from.
    pub topic: String,
    /// Partition there.
    pub partition: i32,
    /// Offset there (-1 when it was not read from a topic).
    pub offset: i64,
    /// Its key.
    pub key: Vec<u8>,
    /// Its value (`None`: a tombstone).
    pub value: Option<Vec<u8>>,
    /// The redrive count it arrived with.
    pub redrives: Option<String>,
}

impl Source {
    /// The record as read.
    pub fn of_message(message: &impl Message) -> Self {
        let redrives = kafka::header(message, headers::REDRIVES)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        Self {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().unwrap_or_default().to_vec(),
            value: message.payload().map(<[u8]>::to_vec),
            redrives,
        }
    }
}

/// Room left in a dead letter for its headers and the record's framing.
const HEADROOM: usize = 8 * 1024;

/// The dead-letter record for `source` on `topic`: its original key and value, with the reason
/// and `why` in headers (and the redrive count it arrived with). When key and value would make a
/// record of more than `max_record` bytes, the value is cut to a prefix of at most
/// [`PREFIX_BYTES`], with headers that say so; `max_record` 0 keeps no byte of it.
pub fn record(
    topic: String,
    source: &Source,
    reason: &str,
    why: &str,
    max_record: usize,
) -> Outgoing {
    let mut key = source.key.clone();
    let mut cut = Vec::new();
    if key.len() > max_record / 4 {
        key.truncate(KEY_PREFIX_BYTES);
        cut.push("key");
    }
    let max_value = max_record.saturating_sub(key.len() + HEADROOM);
    let partition = source.partition.to_string();
    let offset = source.offset.to_string();
    let time = now_ms().to_string();
    let mut value = source.value.clone();
    if let Some(bytes) = value.as_mut().filter(|v| v.len() > max_value) {
        bytes.truncate(max_value.min(PREFIX_BYTES));
        cut.push("value");
    }
    let original = source.value.as_deref().unwrap_or_default();
    let truncated = (!cut.is_empty()).then(|| {
        (
            cut.join(","),
            original.len().to_string(),
            sha256_hex(original),
            source.key.len().to_string(),
        )
    });
    let mut hs = with_headers(
        OwnedHeaders::new(),
        &[
            (headers::REASON, reason),
            (headers::MESSAGE, why),
            (headers::TOPIC, &source.topic),
            (headers::PARTITION, &partition),
            (headers::OFFSET, &offset),
            (headers::ROUTER_VERSION, env!("CARGO_PKG_VERSION")),
            (headers::TIME, &time),
        ],
    );
    if let Some(count) = &source.redrives {
        hs = with_headers(hs, &[(headers::REDRIVES, count)]);
    }
    if let Some((cut, size, sha256, key_size)) = &truncated {
        hs = with_headers(
            hs,
            &[
                (headers::TRUNCATED, cut),
                (headers::ORIGINAL_SIZE, size),
                (headers::ORIGINAL_SHA256, sha256),
                (headers::ORIGINAL_KEY_SIZE, key_size),
            ],
        );
    }
    Outgoing {
        topic,
        partition: None,
        key,
        payload: value,
        headers: Some(hs),
        traceparent: None,
    }
}

/// One dead letter with its headers decoded.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Partition of the dead-letter topic.
    pub partition: i32,
    /// Offset in that partition.
    pub offset: i64,
    /// The original key as text (the task id where there was one).
    pub key: String,
    /// The original key's bytes.
    #[serde(skip)]
    pub raw_key: Vec<u8>,
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
    /// The original bytes (`None`: a tombstone); only a prefix when `truncated`.
    #[serde(skip)]
    pub payload: Option<Vec<u8>>,
}

impl DeadLetter {
    /// Whether it carries only a prefix of the original value.
    pub fn truncated(&self) -> bool {
        self.headers.contains_key(headers::TRUNCATED)
    }

    /// The dead letter `m` is.
    pub fn from_message(m: &impl Message) -> Self {
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
            raw_key: m.key().unwrap_or_default().to_vec(),
            reason: text(headers::REASON),
            message: text(headers::MESSAGE),
            source_topic: text(headers::TOPIC),
            source_partition: number(headers::PARTITION) as i32,
            source_offset: number(headers::OFFSET),
            time: number(headers::TIME),
            redrives: headers
                .get(headers::REDRIVES)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
        }
    }
}

/// `hs` with the text headers `pairs` added.
fn with_headers(hs: OwnedHeaders, pairs: &[(&str, &str)]) -> OwnedHeaders {
    pairs.iter().fold(hs, |hs, (key, value)| {
        hs.insert(Header {
            key,
            value: Some(*value),
        })
    })
}

/// The source position (topic, partition, offset) a dead-letter record names in its headers.
pub fn source_of(record: &Outgoing) -> Option<(String, i32, i64)> {
    let header = |name| Some(String::from_utf8_lossy(record.header(name)?).into_owned());
    Some((
        header(headers::TOPIC)?,
        header(headers::PARTITION)?.parse().ok()?,
        header(headers::OFFSET)?.parse().ok()?,
    ))
}

/// `record` (a dead letter the broker refused) without its value: the same key and headers,
/// marked truncated, with the original size and hash unless they are there already.
pub fn stub(record: &Outgoing) -> Outgoing {
    let mut hs = record.headers.clone().unwrap_or_default();
    if record.header(headers::ORIGINAL_SIZE).is_none() {
        let value = record.payload.as_deref().unwrap_or_default();
        let (size, sha256) = (value.len().to_string(), sha256_hex(value));
        hs = with_headers(
            hs,
            &[
                (headers::TRUNCATED, "value"),
                (headers::ORIGINAL_SIZE, &size),
                (headers::ORIGINAL_SHA256, &sha256),
            ],
        );
    }
    Outgoing {
        topic: record.topic.clone(),
        partition: record.partition,
        key: record.key.clone(),
        payload: record.payload.as_ref().map(|_| Vec::new()),
        headers: Some(hs),
        traceparent: record.traceparent.clone(),
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
        .ok_or_else(|| Error::NoRecord {
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
    /// Not sent: it carries only a prefix and the original is no longer at its source position
    /// (retention) or is not the record that was dead-lettered (its hash differs), or the broker
    /// refused the record.
    NotSent {
        /// The dead letter.
        dead_letter: DeadLetter,
        /// Why.
        why: String,
    },
}

/// The whole original value of a truncated dead letter, read back from its source position and
/// checked against the recorded hash.
fn original(kafka: &KafkaConfig, d: &DeadLetter) -> Result<Result<Original, String>> {
    let at = format!(
        "{}[{}]@{}",
        d.source_topic, d.source_partition, d.source_offset
    );
    let Some(m) = read_at(kafka, &d.source_topic, d.source_partition, d.source_offset)? else {
        return Ok(Err(format!("the original at {at} is gone (retention)")));
    };
    let value = m.payload().map(<[u8]>::to_vec);
    let sha256 = value.as_deref().map(sha256_hex).unwrap_or_default();
    if d.headers.get(headers::ORIGINAL_SHA256) != Some(&sha256) {
        return Ok(Err(format!(
            "the record at {at} is not the one dead-lettered (its SHA-256 differs)"
        )));
    }
    let key = m.key().unwrap_or_default().to_vec();
    Ok(Ok((key, value)))
}

/// A dead letter's original key and value.
type Original = (Vec<u8>, Option<Vec<u8>>);

/// Sends the selected dead letters back to their source topics (original key and bytes, with
/// `switchyard.redrive.count` one higher), refusing those redriven `max_redrives` times already.
/// A truncated dead letter sends its original, read back from its source position.
pub async fn redrive(
    kafka: &KafkaConfig,
    selection: &Selection,
    max_redrives: u32,
) -> Result<Vec<Redriven>> {
    let letters = list(kafka, selection)?;
    // An original may be larger than librdkafka's default record limit; the producer takes the
    // largest one (the topic's own limit still applies).
    let largest = letters
        .iter()
        .map(|d| {
            let original = |h: &str| d.headers.get(h).and_then(|s| s.parse::<usize>().ok());
            original(headers::ORIGINAL_SIZE).unwrap_or(d.payload.as_ref().map_or(0, Vec::len))
                + original(headers::ORIGINAL_KEY_SIZE).unwrap_or(d.raw_key.len())
        })
        .max()
        .unwrap_or_default();
    let mut config = kafka.client_config();
    let limit = (largest + HEADROOM).max(1_000_000).to_string();
    kafka::set_default(&mut config, "message.max.bytes", &limit);
    let producer = KafkaConfig::producer_from(config)?;
    let mut out = Vec::new();
    for d in letters {
        if d.redrives >= max_redrives || d.source_topic.is_empty() {
            out.push(Redriven::Refused {
                dead_letter: d,
                max: max_redrives,
            });
            continue;
        }
        let (key, value) = if d.truncated() {
            match original(kafka, &d)? {
                Ok(original) => original,
                Err(why) => {
                    let why = format!("it holds only a prefix, and {why}");
                    out.push(Redriven::NotSent {
                        dead_letter: d,
                        why,
                    });
                    continue;
                }
            }
        } else {
            (d.raw_key.clone(), d.payload.clone())
        };
        let count = (d.redrives + 1).to_string();
        let hs = with_headers(OwnedHeaders::new(), &[(headers::REDRIVES, &count)]);
        let mut record = FutureRecord::to(&d.source_topic)
            .key(key.as_slice())
            .headers(hs);
        if let Some(value) = &value {
            record = record.payload(value);
        }
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => out.push(Redriven::Sent { dead_letter: d }),
            Err((e, _)) if refuses_record(&e) => out.push(Redriven::NotSent {
                dead_letter: d,
                why: format!("the broker refused it: {e}"),
            }),
            Err((e, _)) => return Err(e.into()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(key: &[u8], value: Option<Vec<u8>>) -> Source {
        Source {
            topic: "t".into(),
            partition: 1,
            offset: 7,
            key: key.to_vec(),
            value,
            redrives: None,
        }
    }

    fn header(record: &Outgoing, name: &str) -> Option<String> {
        Some(String::from_utf8_lossy(record.header(name)?).into_owned())
    }

    #[test]
    fn a_dead_letter_keeps_its_record_as_it_was_or_says_what_it_cut() {
        let tombstone = record("dlq".into(), &source(b"k", None), "r", "why", 1_000_000);
        assert_eq!(tombstone.payload, None, "a tombstone stays a tombstone");
        assert_eq!(header(&tombstone, headers::TRUNCATED), None);
        assert_eq!(source_of(&tombstone), Some(("t".into(), 1, 7)));

        let value = vec![b'x'; 200_000];
        let whole = record(
            "dlq".into(),
            &source(b"k", Some(value.clone())),
            "r",
            "w",
            1_000_000,
        );
        assert_eq!(whole.payload.as_ref(), Some(&value));

        let cut = record(
            "dlq".into(),
            &source(b"k", Some(value.clone())),
            "r",
            "w",
            100_000,
        );
        assert_eq!(cut.payload.as_ref().map(Vec::len), Some(PREFIX_BYTES));
        assert_eq!(header(&cut, headers::TRUNCATED).as_deref(), Some("value"));
        assert_eq!(
            header(&cut, headers::ORIGINAL_SIZE).as_deref(),
            Some("200000")
        );
        assert_eq!(
            header(&cut, headers::ORIGINAL_SHA256),
            Some(sha256_hex(&value))
        );

        let key = vec![b'k'; 50_000];
        let both = record("dlq".into(), &source(&key, Some(value)), "r", "w", 100_000);
        assert_eq!(both.key.len(), KEY_PREFIX_BYTES);
        assert_eq!(
            header(&both, headers::TRUNCATED).as_deref(),
            Some("key,value")
        );
        assert_eq!(
            header(&both, headers::ORIGINAL_KEY_SIZE).as_deref(),
            Some("50000")
        );

        let stub = stub(&whole);
        assert_eq!(stub.payload.as_ref().map(Vec::len), Some(0));
        assert_eq!(
            header(&stub, headers::ORIGINAL_SIZE).as_deref(),
            Some("200000")
        );
        assert_eq!(header(&stub, headers::REASON).as_deref(), Some("r"));
    }
}

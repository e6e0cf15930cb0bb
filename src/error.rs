//! The error a switchyard service or command stops with.
//!
//! Three boundaries have errors of their own, which this one wraps: loading files
//! ([`files::Error`]), Kafka I/O ([`kafka::Error`]) and the wire format ([`codec::Error`]; an
//! undecodable input record is not an error but a dead letter, see
//! [`DecodeError`](crate::envelope::DecodeError)). The other variants are what a service finds
//! wrong with its setup or its topics; each message names the fix.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{codec, files, kafka};

/// Why a service or command stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kafka failed.
    #[error(transparent)]
    Kafka(#[from] kafka::Error),
    /// A file could not be read or is not valid.
    #[error(transparent)]
    File(#[from] files::Error),
    /// A record could not be encoded.
    #[error(transparent)]
    Codec(#[from] codec::Error),
    /// A metric could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// An HTTP listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// What is configured (cards, rule table, flags, environment, existing topics) cannot run as
    /// it is; the message says what to change.
    #[error("{0}")]
    Setup(String),
    /// A record of a topic that switchyard itself writes does not decode.
    #[error("{topic}[{partition}] offset {offset} is not a {what}: {message}")]
    Corrupt {
        /// The topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
        /// What the record should be (`state event`, `registry record`).
        what: &'static str,
        /// The decoding error.
        message: String,
    },
    /// Restoring a partition failed.
    #[error("restore of {topic}[{partition}] failed: {message}")]
    Restore {
        /// The state topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// What went wrong.
        message: String,
    },
    /// The tasks and state topics are not co-partitioned.
    #[error("`{tasks}` has {task_partitions} partitions but `{state}` has {state_partitions}; they must be equal (run `switchyard topics apply`)")]
    NotCoPartitioned {
        /// Tasks topic.
        tasks: String,
        /// Its partitions.
        task_partitions: i32,
        /// State topic.
        state: String,
        /// Its partitions.
        state_partitions: i32,
    },
    /// The console's index (an SQLite file) failed.
    #[error("console index: {0}")]
    Index(#[from] rusqlite::Error),
    /// A schema registry refused a schema or could not be reached.
    #[error("registering {path} as `{subject}` failed: {message}")]
    Register {
        /// The schema file.
        path: PathBuf,
        /// The subject.
        subject: String,
        /// What the registry (or the client) said.
        message: String,
    },
}

/// A client error is a Kafka error ([`kafka::Error::Kafka`]).
impl From<rdkafka::error::KafkaError> for Error {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        Error::Kafka(e.into())
    }
}

/// Result type of services and commands.
pub type Result<T, E = Error> = std::result::Result<T, E>;

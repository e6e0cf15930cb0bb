//! `switchyard schemas register`: registers `schemas/*.avsc` in any Confluent-compatible registry
//! through `schema_registry_converter`, under TopicNameStrategy subjects (`<topic>-value`).

use std::path::{Path, PathBuf};

use schema_registry_converter::async_impl::schema_registry::{post_schema, SrSettings};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

use crate::cards::Cards;
use crate::error::Error;
use crate::kafka::KafkaConfig;

/// One registered schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The subject.
    pub subject: String,
    /// The global schema id.
    pub id: u32,
    /// The schema file.
    pub path: PathBuf,
}

/// The subjects each schema file is registered under: TaskEvent for the tasks topic, WorkItem for
/// every card's inbox.
pub fn subjects(kafka: &KafkaConfig, cards: &Cards, dir: &Path) -> Vec<(String, PathBuf)> {
    let topics = kafka.topics();
    let mut out = vec![(
        format!("{}-value", topics.tasks()),
        dir.join("TaskEvent.avsc"),
    )];
    out.extend(cards.iter().map(|c| {
        (
            format!("{}-value", c.topic(&kafka.topic_prefix)),
            dir.join("WorkItem.avsc"),
        )
    }));
    out
}

/// Registers every schema of `dir` in the registry at `url`.
pub async fn register(
    url: &str,
    kafka: &KafkaConfig,
    cards: &Cards,
    dir: &Path,
) -> Result<Vec<Registration>, Error> {
    let settings = SrSettings::new(url.to_string());
    let mut out = Vec::new();
    for (subject, path) in subjects(kafka, cards, dir) {
        let text = std::fs::read_to_string(&path).map_err(|source| crate::files::Error::Io {
            path: path.clone(),
            source,
        })?;
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, text);
        let registered = post_schema(&settings, subject.clone(), supplied)
            .await
            .map_err(|e| Error::Register {
                path: path.clone(),
                subject: subject.clone(),
                message: match &e.cause {
                    Some(cause) => format!("{}: {cause}", e.error),
                    None => e.error.clone(),
                },
            })?;
        out.push(Registration {
            subject,
            id: registered.id,
            path,
        });
    }
    Ok(out)
}

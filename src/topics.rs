//! Topic specs (`topics/*.yaml`) and `switchyard topics apply`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cards::Cards;
use crate::error::{Error, Result};
use crate::files;
use crate::kafka::{self, KafkaConfig};

/// The spec of one kind of topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Partition count.
    pub partitions: i32,
    /// Replication factor.
    #[serde(default = "one")]
    pub replication: i32,
    /// Topic configs, e.g. `retention.ms`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

fn one() -> i32 {
    1
}

/// The topics of a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TopicSpecs {
    /// `<prefix>.tasks`: task events. Must have as many partitions as `state`.
    pub tasks: TopicSpec,
    /// `<prefix>.state`: the decision log.
    pub state: TopicSpec,
    /// `<prefix>.snapshots`: snapshots of the state partitions, so that a restore need not read
    /// the whole log. Must have as many partitions as `state`; compacted (`cleanup.policy:
    /// compact`), since a router tombstones the snapshot it replaces.
    pub snapshots: TopicSpec,
    /// `<prefix>.dlq`: dead letters.
    pub dlq: TopicSpec,
    /// `<prefix>.agent.<card>`: one inbox per card.
    pub agent: TopicSpec,
}

impl TopicSpecs {
    /// Loads and checks a spec file.
    pub fn load(path: &Path) -> Result<Self> {
        let spec_err = |message: String| {
            Error::from(files::Error::Invalid {
                path: path.to_path_buf(),
                message,
            })
        };
        let text = std::fs::read_to_string(path).map_err(|e| spec_err(e.to_string()))?;
        let specs: TopicSpecs =
            serde_yaml_ng::from_str(&text).map_err(|e| spec_err(e.to_string()))?;
        for (field, spec) in [
            ("tasks", &specs.tasks),
            ("state", &specs.state),
            ("snapshots", &specs.snapshots),
            ("dlq", &specs.dlq),
            ("agent", &specs.agent),
        ] {
            if spec.partitions < 1 || spec.replication < 1 {
                return Err(spec_err(format!(
                    "field `{field}`: partitions and replication must be at least 1"
                )));
            }
        }
        for (field, spec) in [("tasks", &specs.tasks), ("snapshots", &specs.snapshots)] {
            if spec.partitions != specs.state.partitions {
                return Err(spec_err(format!(
                    "fields `{field}.partitions` ({}) and `state.partitions` ({}) must be equal: the topics are co-partitioned",
                    spec.partitions, specs.state.partitions
                )));
            }
        }
        Ok(specs)
    }

    /// Sets the partition count of the co-partitioned topics: tasks, state and snapshots.
    pub fn set_partitions(&mut self, partitions: i32) {
        for spec in [&mut self.tasks, &mut self.state, &mut self.snapshots] {
            spec.partitions = partitions;
        }
    }

    /// Every topic to have, with its spec.
    pub fn wanted<'a>(
        &'a self,
        kafka: &KafkaConfig,
        cards: &Cards,
    ) -> Vec<(String, &'a TopicSpec)> {
        let topics = kafka.topics();
        let mut wanted = vec![
            (topics.tasks(), &self.tasks),
            (topics.state(), &self.state),
            (topics.snapshots(), &self.snapshots),
            (topics.dlq(), &self.dlq),
        ];
        wanted.extend(
            cards
                .iter()
                .map(|c| (c.topic(&kafka.topic_prefix), &self.agent)),
        );
        wanted
    }
}

/// Creates the topics that are missing; refuses when existing topics break co-partitioning.
/// Returns one line per topic saying what was done.
pub async fn apply(kafka: &KafkaConfig, specs: &TopicSpecs, cards: &Cards) -> Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create()?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))?;
    let existing: HashMap<String, i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect();
    let topics = kafka.topics();
    let state = topics.state();
    let count =
        |name: &str, spec: &TopicSpec| existing.get(name).copied().unwrap_or(spec.partitions);
    let sp = count(&state, &specs.state);
    for (other, spec) in [
        (topics.tasks(), &specs.tasks),
        (topics.snapshots(), &specs.snapshots),
    ] {
        let op = count(&other, spec);
        if op != sp {
            return Err(Error::Setup(format!(
                "`{other}` has {op} partitions and `{state}` would have {sp}: they must be co-partitioned; \
                 recreate them with equal counts or change topics/ to match"
            )));
        }
    }
    let mut report = Vec::new();
    let mut new_topics = Vec::new();
    for (name, spec) in specs.wanted(kafka, cards) {
        match existing.get(&name) {
            Some(&n) if n != spec.partitions => {
                report.push(format!("kept    {name} ({n} partitions; the spec says {}, which this tool does not change)", spec.partitions))
            }
            Some(&n) => report.push(format!("exists  {name} ({n} partitions)")),
            None => new_topics.push((name, spec)),
        }
    }
    if !new_topics.is_empty() {
        let requests: Vec<NewTopic<'_>> = new_topics
            .iter()
            .map(|(name, spec)| {
                spec.config.iter().fold(
                    NewTopic::new(
                        name,
                        spec.partitions,
                        TopicReplication::Fixed(spec.replication),
                    ),
                    |t, (k, v)| t.set(k, v),
                )
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics(&requests, &options).await? {
            match result {
                Ok(name) => {
                    let spec = new_topics
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, s)| s.partitions)
                        .unwrap_or_default();
                    report.push(format!("created {name} ({spec} partitions)"));
                }
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    report.push(format!("exists  {name}"))
                }
                Err((topic, code)) => return Err(kafka::Error::Create { topic, code }.into()),
            }
        }
    }
    Ok(report)
}

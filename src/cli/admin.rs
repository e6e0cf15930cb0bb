//! `switchyard topics`, `schemas`, `registry` and `cards`: setting up what the services need.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::{shutdown_signal, Global, WorkflowArgs};
use crate::kafka::KafkaConfig;
use crate::topics::{self, TopicSpecs};
use crate::workflow::Workflow;

#[derive(Debug, Subcommand)]
pub(super) enum TopicsCommand {
    /// Create the topics that are missing (idempotent).
    Apply {
        #[command(flatten)]
        workflow: WorkflowArgs,
        /// Topic spec file.
        #[arg(long, default_value = "topics/switchyard.yaml")]
        spec: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum SchemasCommand {
    /// Register `schemas/*.avsc` under `<topic>-value` subjects (TopicNameStrategy).
    Register {
        #[command(flatten)]
        workflow: WorkflowArgs,
        /// Directory of the `.avsc` files.
        #[arg(long, default_value = "schemas")]
        dir: PathBuf,
    },
    /// Write the JSON Schemas of cards, rule tables, topic specs, the config file, state events
    /// and dead-letter headers (generated from the code) to `DIR/*.schema.json`.
    Export {
        /// Where to write them.
        #[arg(long, default_value = "schemas")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum CardsCommand {
    /// Write a card from an A2A agent's card (`<url>/.well-known/agent-card.json`, or the URL
    /// of a `.json` file): name, description, skills, modes and the `a2a` runtime. Review it
    /// (timeout, retry, concurrency) before you deploy it.
    Import {
        /// The agent's base URL, or its agent card's URL.
        url: String,
        /// Write the card here (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub(super) struct RegistryArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Topic that holds the registry's state (replayed on start).
    #[arg(long, default_value = "_schemas")]
    topic: String,
}

/// Creates the topics that are missing.
pub(super) async fn topics(kafka: &KafkaConfig, command: TopicsCommand) -> Result<()> {
    let TopicsCommand::Apply { workflow, spec } = command;
    let wf = Workflow::load(&workflow.workflow, workflow.rules.as_deref())?;
    for line in topics::apply(kafka, &TopicSpecs::load(&spec)?, &wf.cards).await? {
        println!("{line}");
    }
    Ok(())
}

/// Registers the Avro schemas.
pub(super) async fn schemas(
    global: &Global,
    kafka: &KafkaConfig,
    command: SchemasCommand,
) -> Result<()> {
    let (workflow, dir) = match command {
        SchemasCommand::Register { workflow, dir } => (workflow, dir),
        SchemasCommand::Export { dir } => return export(&dir),
    };
    let wf = Workflow::load(&workflow.workflow, workflow.rules.as_deref())?;
    for r in crate::registry::client::register(&global.registry_url, kafka, &wf.cards, &dir).await?
    {
        println!(
            "registered {} as `{}` (id {})",
            r.path.display(),
            r.subject,
            r.id
        );
    }
    Ok(())
}

/// Writes the JSON Schemas.
fn export(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, schema) in crate::schema::all() {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(&schema)? + "\n";
        std::fs::write(&path, text)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Serves the schema registry until SIGINT or SIGTERM.
pub(super) async fn registry(kafka: &KafkaConfig, args: RegistryArgs) -> Result<()> {
    kafka.wait_for_broker(Duration::from_secs(30))?;
    let bound = crate::registry::serve(kafka, &args.topic, args.listen).await?;
    println!(
        "schema registry on http://{bound} (state in `{}`)",
        args.topic
    );
    let mut stop = shutdown_signal()?;
    let _ = stop.changed().await;
    Ok(())
}

/// `cards import`: fetches the agent card, writes the switchyard card, checks that it loads.
pub(super) async fn cards(command: CardsCommand) -> Result<()> {
    use crate::runtime::a2a::{agent_card_url, card_from_agent_card};
    let CardsCommand::Import { url, out } = command;
    let at = agent_card_url(&url);
    let answer = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?
        .get(&at)
        .send()
        .await
        .with_context(|| format!("fetching {at}"))?;
    if !answer.status().is_success() {
        bail!("{at}: HTTP {}", answer.status());
    }
    let agent: serde_json::Value = serde_json::from_slice(&answer.bytes().await?)
        .with_context(|| format!("{at}: not JSON"))?;
    let card = card_from_agent_card(&agent).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
    let yaml = format!(
        "# Imported from {at}; review the timeout, retry and concurrency before deploying it.\n{}",
        serde_yaml_ng::to_string(&card)?
    );
    match out {
        Some(path) => {
            std::fs::write(&path, &yaml).with_context(|| format!("{}", path.display()))?;
            crate::cards::Card::load(&path)?;
            println!("wrote {} (card `{}`)", path.display(), card.name);
        }
        None => print!("{yaml}"),
    }
    Ok(())
}

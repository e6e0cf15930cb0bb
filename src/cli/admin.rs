//! `switchyard topics`, `schemas` and `registry`: setting up what the services need.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
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

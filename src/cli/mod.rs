//! The `switchyard` command line: the global flags and the config file here, and one module
//! per family of commands: `run` (router, agent), `task` (submit, tail), `dev`,
//! `inspect` (audit, replay, dlq), `admin` (topics, schemas, registry) and `console`.

mod admin;
mod console;
mod dev;
mod inspect;
mod run;
mod task;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::watch;

use crate::codec::{Codec, Encoding};
use crate::kafka::KafkaConfig;
use crate::llm::LlmConfig;

/// A Kafka-native router for multi-agent AI systems.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Settings every subcommand shares.
#[derive(Debug, Args)]
struct Global {
    /// YAML config file (`kafka:` section, see README); flags and environment override it.
    #[arg(long, global = true, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long, global = true, env = "SWITCHYARD_BOOTSTRAP_SERVERS")]
    bootstrap_servers: Option<String>,
    /// Prefix of every topic name.
    #[arg(long, global = true, env = "SWITCHYARD_TOPIC_PREFIX")]
    topic_prefix: Option<String>,
    /// A librdkafka property, `key=value` (repeatable), e.g. `-X security.protocol=SASL_SSL`.
    #[arg(short = 'X', global = true, value_name = "KEY=VALUE")]
    options: Vec<String>,
    /// Wire encoding of task events and work items: `json`, or `avro` (Confluent wire format,
    /// schemas from the registry; register them first with `switchyard schemas register`).
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_ENCODING",
        default_value = "json"
    )]
    encoding: Encoding,
    /// Schema registry URL (for `--encoding avro` and `schemas register`).
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    registry_url: String,
    /// Base URL of an OpenAI-compatible endpoint, e.g. `http://127.0.0.1:8089/v1`; overrides
    /// `llm.base_url` of the config file (the rest of `llm:` keeps its defaults).
    #[arg(long, global = true, env = "SWITCHYARD_LLM_URL")]
    llm_url: Option<String>,
    /// The LLM's model; overrides `llm.model`.
    #[arg(long, global = true, env = "SWITCHYARD_LLM_MODEL")]
    llm_model: Option<String>,
    /// Export trace spans over OTLP/HTTP to this base URL, e.g. `http://127.0.0.1:4318`
    /// (`OTEL_EXPORTER_OTLP_PROTOCOL=http/json` for JSON); nothing is exported without it.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

/// The config file (`--config`).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Kafka settings.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// The LLM endpoint (the router's decider and `llm` agents).
    #[serde(default)]
    pub llm: Option<LlmConfig>,
}

impl Global {
    fn codec(&self) -> Codec {
        Codec::new(self.encoding, &self.registry_url)
    }

    /// The Kafka settings and the LLM endpoint (`None` when neither the file nor a flag names
    /// one): the config file, read once, with the flags and environment applied.
    fn settings(&self) -> Result<(KafkaConfig, Option<LlmConfig>)> {
        let file = match &self.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
                let file: FileConfig = serde_yaml_ng::from_str(&text)
                    .with_context(|| format!("{}", path.display()))?;
                if let Some(llm) = &file.llm {
                    llm.validate()
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                }
                file
            }
            None => FileConfig::default(),
        };
        let mut kafka = file.kafka;
        if let Some(b) = &self.bootstrap_servers {
            kafka.bootstrap_servers = b.clone();
        }
        if let Some(p) = &self.topic_prefix {
            kafka.topic_prefix = p.clone();
        }
        for option in &self.options {
            let Some((k, v)) = option.split_once('=') else {
                bail!("-X {option}: expected KEY=VALUE");
            };
            kafka.options.insert(k.to_string(), v.to_string());
        }
        let mut llm = file.llm;
        if self.llm_url.is_some() || self.llm_model.is_some() {
            let config = llm.get_or_insert_with(LlmConfig::default);
            if let Some(url) = &self.llm_url {
                config.base_url = url.clone();
            }
            if let Some(model) = &self.llm_model {
                config.model = model.clone();
            }
        }
        Ok((kafka, llm))
    }

    /// These settings as flags, for child processes (the LLM flags are added by `dev_llm` where
    /// the workflow needs them).
    fn as_args(&self, kafka: &KafkaConfig) -> Vec<String> {
        vec![
            "--bootstrap-servers".into(),
            kafka.bootstrap_servers.clone(),
            "--topic-prefix".into(),
            kafka.topic_prefix.clone(),
        ]
        .into_iter()
        .chain(
            self.config
                .iter()
                .flat_map(|c| ["--config".into(), c.display().to_string()]),
        )
        .chain(self.options.iter().flat_map(|o| ["-X".into(), o.clone()]))
        .chain(
            self.otlp_endpoint
                .iter()
                .flat_map(|e| ["--otlp-endpoint".into(), e.clone()]),
        )
        .chain([
            "--encoding".into(),
            self.encoding.to_string(),
            "--registry-url".into(),
            self.registry_url.clone(),
        ])
        .collect()
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a router instance.
    Router(run::RouterArgs),
    /// Run one agent microservice for a card.
    Agent(run::AgentArgs),
    /// Publish a task event (a new task by default); prints the task id.
    Submit(task::SubmitArgs),
    /// Follow a task's events and decisions.
    Tail(task::TailArgs),
    /// Manage topics.
    #[command(subcommand)]
    Topics(admin::TopicsCommand),
    /// Run everything locally: broker, topics, router, agents, and a sample task.
    Dev(dev::DevArgs),
    /// A task's whole timeline from the topics: every event, decision and dead letter.
    Audit(inspect::AuditArgs),
    /// Re-run the router's decisions over recorded history: verify them, or try another rule table.
    Replay(inspect::ReplayArgs),
    /// Dead letters: list, show, redrive.
    #[command(subcommand)]
    Dlq(inspect::DlqCommand),
    /// Run a Confluent-compatible schema registry (for local use and tests), persisted in Kafka.
    Registry(admin::RegistryArgs),
    /// Manage Avro schemas.
    #[command(subcommand)]
    Schemas(admin::SchemasCommand),
    /// Serve the web console: watch, search, answer escalations, redrive dead letters.
    Console(console::Command),
    /// Agent cards: import one from an A2A agent.
    #[command(subcommand)]
    Cards(admin::CardsCommand),
}

#[derive(Debug, Args)]
struct WorkflowArgs {
    /// Workflow directory with `cards/` and `rules.yaml`.
    #[arg(long, default_value = "agents/customer-service")]
    workflow: PathBuf,
    /// Rule table to use instead of `<workflow>/rules.yaml`.
    #[arg(long)]
    rules: Option<PathBuf>,
}

/// How long a one-shot command waits for the broker before it says which one did not answer.
const BROKER_WAIT: Duration = Duration::from_secs(5);

impl Cli {
    /// The log filter when `RUST_LOG` is not set: services (router, agent, registry, dev) show
    /// librdkafka's warnings; one-shot commands show none of librdkafka's lines, only their own
    /// one-line errors.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Router(_)
            | Command::Agent(_)
            | Command::Registry(_)
            | Command::Dev(_)
            | Command::Console(_) => "info,librdkafka=warn,rdkafka=warn",
            _ => "info,librdkafka=off,rdkafka=off",
        }
    }

    /// The `service.name` of this process's trace spans.
    pub fn service_name(&self) -> &'static str {
        match self.command {
            Command::Router(_) => "switchyard-router",
            Command::Agent(_) => "switchyard-agent",
            Command::Submit(_) => "switchyard-submit",
            _ => "switchyard",
        }
    }

    /// Where trace spans are exported (`--otlp-endpoint`), if anywhere.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.global.otlp_endpoint.as_deref()
    }

    /// Runs the chosen subcommand.
    pub async fn run(self) -> Result<()> {
        let (kafka, llm) = self.global.settings()?;
        if matches!(
            self.command,
            Command::Submit(_)
                | Command::Tail(_)
                | Command::Audit(_)
                | Command::Replay(_)
                | Command::Dlq(_)
                | Command::Topics(_)
                | Command::Console(_)
        ) {
            kafka.wait_for_broker(BROKER_WAIT)?;
        }
        match self.command {
            Command::Router(args) => run::run_router(kafka, llm, &self.global, args).await,
            Command::Agent(args) => run::run_agent(kafka, llm, &self.global, args).await,
            Command::Submit(args) => {
                let task_id = task::submit(&kafka, &self.global.codec(), args).await?;
                println!("{task_id}");
                Ok(())
            }
            Command::Tail(args) => task::tail(&kafka, args).await,
            Command::Topics(command) => admin::topics(&kafka, command).await,
            Command::Dev(args) => dev::dev(&self.global, kafka, llm, args).await,
            Command::Audit(args) => inspect::audit(&kafka, args),
            Command::Replay(args) => inspect::replay(&kafka, &self.global.codec(), args).await,
            Command::Dlq(command) => inspect::dlq(&kafka, command).await,
            Command::Schemas(command) => admin::schemas(&self.global, &kafka, command).await,
            Command::Registry(args) => admin::registry(&kafka, args).await,
            Command::Console(args) => console::run(&self.global, kafka, args).await,
            Command::Cards(command) => admin::cards(command).await,
        }
    }
}

/// A watch channel that turns true on SIGINT or SIGTERM.
fn shutdown_signal() -> Result<watch::Receiver<bool>> {
    let (tx, rx) = watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

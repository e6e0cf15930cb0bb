//! The `switchyard` command line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use rdkafka::producer::FutureRecord;
use serde::Deserialize;
use tokio::sync::watch;

use crate::agent::{self, AgentConfig, CommandHandler};
use crate::cards::{Card, Runtime};
use crate::codec::{Codec, Encoding};
use crate::envelope::{Decision, EventKind, TaskEvent};
use crate::journey::{describe, follow, is_final};
use crate::kafka::KafkaConfig;
use crate::llm::{LlmClient, LlmConfig, LlmHandler};
use crate::metrics::{AgentMetrics, RouterMetrics};
use crate::router::{ConsistencyMode, Router, RouterConfig};
use crate::signing::Secret;
use crate::topics::{self, TopicSpecs};
use crate::workflow::Workflow;

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
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// Kafka settings.
    #[serde(default)]
    kafka: KafkaConfig,
    /// The LLM endpoint (the router's decider and `llm` agents).
    #[serde(default)]
    llm: Option<LlmConfig>,
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
    Router(RouterArgs),
    /// Run one agent microservice for a card.
    Agent(AgentArgs),
    /// Publish a task event (a new task by default); prints the task id.
    Submit(SubmitArgs),
    /// Follow a task's events and decisions.
    Tail(TailArgs),
    /// Manage topics.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Run everything locally: broker, topics, router, agents, and a sample task.
    Dev(DevArgs),
    /// A task's whole timeline from the topics: every event, decision and dead letter.
    Audit(AuditArgs),
    /// Re-run the router's decisions over recorded history: verify them, or try another rule table.
    Replay(ReplayArgs),
    /// Dead letters: list, show, redrive.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Run a Confluent-compatible schema registry (for local use and tests), persisted in Kafka.
    Registry(RegistryArgs),
    /// Manage Avro schemas.
    #[command(subcommand)]
    Schemas(SchemasCommand),
}

#[derive(Debug, Subcommand)]
enum SchemasCommand {
    /// Register `schemas/*.avsc` under `<topic>-value` subjects (TopicNameStrategy).
    Register {
        #[command(flatten)]
        workflow: WorkflowArgs,
        /// Directory of the `.avsc` files.
        #[arg(long, default_value = "schemas")]
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
struct RegistryArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Topic that holds the registry's state (replayed on start).
    #[arg(long, default_value = "_schemas")]
    topic: String,
}

#[derive(Debug, Args)]
struct AuditArgs {
    /// The task id.
    task_id: String,
    /// Print JSON for tools.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    #[command(flatten)]
    workflow: WorkflowArgs,
    /// Report every divergence from the recorded decisions and exit non-zero if there is one.
    #[arg(long)]
    verify: bool,
    /// Check only decisions at or after this state-topic offset (every partition).
    #[arg(long)]
    from_offset: Option<i64>,
    /// Check only decisions at or after this time (RFC 3339, e.g. 2026-11-23T10:00:00Z).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    from_time: Option<std::time::SystemTime>,
    /// Check only this tenant's tasks.
    #[arg(long)]
    tenant: Option<String>,
    /// Check only this task.
    #[arg(long)]
    task: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DlqFilter {
    /// Only this reason.
    #[arg(long)]
    reason: Option<String>,
    /// Only this task (record key).
    #[arg(long)]
    task: Option<String>,
    /// Only these positions, `partition:offset` (repeatable).
    #[arg(long = "at", value_parser = parse_position)]
    positions: Vec<(i32, i64)>,
}

impl DlqFilter {
    fn selection(self) -> crate::dlq::Selection {
        crate::dlq::Selection {
            reason: self.reason,
            task: self.task,
            positions: self.positions,
        }
    }
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters with counts by reason.
    List {
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Show one dead letter with all its headers and its bytes.
    Show {
        /// Its position, `partition:offset`.
        #[arg(value_parser = parse_position)]
        position: (i32, i64),
    },
    /// Send dead letters back to their source topic.
    Redrive {
        #[command(flatten)]
        filter: DlqFilter,
        /// Refuse records already redriven this many times.
        #[arg(long, default_value_t = 3)]
        max_redrives: u32,
    },
}

fn parse_position(s: &str) -> Result<(i32, i64), String> {
    let (p, o) = s.split_once(':').ok_or("expected PARTITION:OFFSET")?;
    Ok((
        p.parse().map_err(|e| format!("partition: {e}"))?,
        o.parse().map_err(|e| format!("offset: {e}"))?,
    ))
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

#[derive(Debug, Args)]
struct RouterArgs {
    #[command(flatten)]
    workflow: WorkflowArgs,
    /// This instance's id (default: random). Give each instance a stable one (e.g. the pod
    /// name of a StatefulSet): a restarted instance then takes its partitions back at once
    /// (static group membership) instead of after the session timeout.
    #[arg(long, env = "SWITCHYARD_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Serve /metrics, /health and /ready here.
    #[arg(long, default_value = "127.0.0.1:9464")]
    http_addr: SocketAddr,
    /// Most events decided per batch.
    #[arg(long, default_value_t = 500)]
    max_batch: usize,
    /// Consumer session timeout: how soon a crashed instance's partitions move to another.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    session_timeout: Duration,
    /// The processing guarantee: `exactly-once` (Kafka transactions) or `effectively-once`.
    #[arg(
        long,
        env = "SWITCHYARD_CONSISTENCY",
        default_value = "effectively-once"
    )]
    consistency: ConsistencyMode,
    /// Exactly-once: how long a batch gathers events before its transaction commits.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    commit_interval: Duration,
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// The card file.
    #[arg(long)]
    card: PathBuf,
    /// Serve /metrics, /health and /ready here.
    #[arg(long)]
    http_addr: Option<SocketAddr>,
    /// Consumer session timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    session_timeout: Duration,
    /// `exactly-once`: publish each result and commit its offset in one transaction.
    #[arg(
        long,
        env = "SWITCHYARD_CONSISTENCY",
        default_value = "effectively-once"
    )]
    consistency: ConsistencyMode,
    /// This replica's id (default: random); with exactly-once it names the transactional id.
    #[arg(long, env = "SWITCHYARD_INSTANCE_ID")]
    instance_id: Option<String>,
}

#[derive(Debug, Args)]
struct SubmitArgs {
    /// Task id (default: a new UUID).
    #[arg(long)]
    task_id: Option<String>,
    /// Event kind.
    #[arg(long, default_value = "SUBMITTED", value_parser = parse_kind)]
    kind: EventKind,
    /// The payload, as JSON (default: read from stdin).
    #[arg(long)]
    payload: Option<String>,
    /// Tenant.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// A label, `key=value` (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// The step this event answers (results and human decisions).
    #[arg(long)]
    step_id: Option<u32>,
    /// The attempt this event answers.
    #[arg(long)]
    attempt: Option<u32>,
    /// Confidence, 0 to 1.
    #[arg(long)]
    confidence: Option<f64>,
    /// Event source (default `client`).
    #[arg(long, default_value = "client")]
    source: String,
    /// Sign the event with the secret in this environment variable: answers to a step of a card
    /// with `secret_env` must be signed with that card's secret.
    #[arg(long, value_name = "VAR")]
    sign_with_env: Option<String>,
}

#[derive(Debug, Args)]
struct TailArgs {
    /// The task id.
    task_id: String,
    /// Stop when the task completes, is cancelled or is dead-lettered.
    #[arg(long)]
    until_done: bool,
    /// Give up after this long without a new event.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
}

#[derive(Debug, Subcommand)]
enum TopicsCommand {
    /// Create the topics that are missing (idempotent).
    Apply {
        #[command(flatten)]
        workflow: WorkflowArgs,
        /// Topic spec file.
        #[arg(long, default_value = "topics/switchyard.yaml")]
        spec: PathBuf,
    },
}

#[derive(Debug, Args)]
struct DevArgs {
    #[command(flatten)]
    workflow: WorkflowArgs,
    /// Topic spec file.
    #[arg(long, default_value = "topics/switchyard.yaml")]
    spec: PathBuf,
    /// Customer messages to submit as sample tasks (default: one happy, one angry).
    #[arg(long = "message")]
    messages: Vec<String>,
    /// Keep the router and agents running after the samples finish (Ctrl-C stops).
    #[arg(long)]
    keep_running: bool,
}

fn parse_kind(s: &str) -> Result<EventKind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_uppercase()))
        .map_err(|_| format!("`{s}` is not one of {}", EventKind::ALL.join(", ")))
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => bail!("--label {l}: expected KEY=VALUE"),
        })
        .collect()
}

/// How long a one-shot command waits for the broker before it says which one did not answer.
const BROKER_WAIT: Duration = Duration::from_secs(5);

impl Cli {
    /// The log filter when `RUST_LOG` is not set: services (router, agent, registry, dev) show
    /// librdkafka's warnings; one-shot commands show none of librdkafka's lines, only their own
    /// one-line errors.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Router(_) | Command::Agent(_) | Command::Registry(_) | Command::Dev(_) => {
                "info,librdkafka=warn,rdkafka=warn"
            }
            _ => "info,librdkafka=off,rdkafka=off",
        }
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
        ) {
            kafka.wait_for_broker(BROKER_WAIT)?;
        }
        match self.command {
            Command::Router(args) => run_router(kafka, llm, &self.global, args).await,
            Command::Agent(args) => run_agent(kafka, llm, &self.global, args).await,
            Command::Submit(args) => {
                let task_id = submit(&kafka, &self.global.codec(), args).await?;
                println!("{task_id}");
                Ok(())
            }
            Command::Tail(args) => tail(&kafka, args).await,
            Command::Topics(TopicsCommand::Apply { workflow, spec }) => {
                let wf = Workflow::load(&workflow.workflow, workflow.rules.as_deref())?;
                for line in topics::apply(&kafka, &TopicSpecs::load(&spec)?, &wf.cards).await? {
                    println!("{line}");
                }
                Ok(())
            }
            Command::Dev(args) => dev(&self.global, kafka, llm, args).await,
            Command::Audit(args) => {
                let timeline = crate::journey::audit(&kafka, &args.task_id)?;
                if timeline.decisions.is_empty() && timeline.dead_letters.is_empty() {
                    bail!(
                        "no record of task `{}` in `{}`",
                        args.task_id,
                        kafka.topics().state()
                    );
                }
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&timeline)?);
                } else {
                    print!("{}", timeline.render());
                }
                Ok(())
            }
            Command::Replay(args) => replay(&kafka, &self.global.codec(), args).await,
            Command::Dlq(command) => dlq(&kafka, command).await,
            Command::Schemas(SchemasCommand::Register { workflow, dir }) => {
                let wf = Workflow::load(&workflow.workflow, workflow.rules.as_deref())?;
                for r in crate::registry::client::register(
                    &self.global.registry_url,
                    &kafka,
                    &wf.cards,
                    &dir,
                )
                .await?
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
            Command::Registry(args) => {
                kafka.wait_for_broker(Duration::from_secs(30))?;
                let bound = crate::registry::serve(&kafka, &args.topic, args.listen).await?;
                println!(
                    "schema registry on http://{bound} (state in `{}`)",
                    args.topic
                );
                let mut stop = shutdown_signal()?;
                let _ = stop.changed().await;
                Ok(())
            }
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

async fn run_router(
    kafka: KafkaConfig,
    llm: Option<LlmConfig>,
    global: &Global,
    args: RouterArgs,
) -> Result<()> {
    let workflow = Workflow::load(&args.workflow.workflow, args.workflow.rules.as_deref())?;
    kafka.wait_for_broker(Duration::from_secs(30))?;
    let mut config = RouterConfig::new(kafka);
    if let Some(id) = args.instance_id {
        config.instance_id = id;
        config.static_membership = true;
    }
    config.http_addr = Some(args.http_addr);
    config.max_batch = args.max_batch;
    config.session_timeout = args.session_timeout;
    config.consistency = args.consistency;
    config.commit_interval = args.commit_interval;
    config.encoding = global.encoding;
    config.registry_url = global.registry_url.clone();
    config.llm = llm;
    let router = Router::new(config, workflow.engine(), RouterMetrics::new()?).await?;
    router.run(shutdown_signal()?).await?;
    Ok(())
}

async fn run_agent(
    kafka: KafkaConfig,
    llm: Option<LlmConfig>,
    global: &Global,
    args: AgentArgs,
) -> Result<()> {
    let card = Card::load(&args.card)?;
    let dir = args
        .card
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let metrics = AgentMetrics::new()?;
    let llm = match &card.runtime {
        Runtime::Llm { .. } => {
            let config = llm.with_context(|| {
                format!(
                    "{}: runtime `llm` needs an endpoint (`llm:` in the config file, or --llm-url)",
                    args.card.display()
                )
            })?;
            let llm_metrics = crate::metrics::LlmMetrics::new(&metrics.registry)?;
            let client = LlmClient::new(config, llm_metrics).map_err(anyhow::Error::msg)?;
            Some(LlmHandler::new(&card, Arc::new(client))?)
        }
        _ => None,
    };
    kafka.wait_for_broker(Duration::from_secs(30))?;
    let mut config = AgentConfig::new(kafka, card);
    config.http_addr = args.http_addr;
    config.session_timeout = args.session_timeout;
    config.consistency = args.consistency;
    config.encoding = global.encoding;
    config.registry_url = global.registry_url.clone();
    if let Some(id) = args.instance_id {
        config.instance_id = id;
    }
    match llm {
        Some(handler) => agent::run(config, Arc::new(handler), metrics, shutdown_signal()?).await?,
        None => {
            let handler = CommandHandler::new(&config.card, dir)?;
            agent::run(config, Arc::new(handler), metrics, shutdown_signal()?).await?
        }
    }
    Ok(())
}

async fn submit(kafka: &KafkaConfig, codec: &Codec, args: SubmitArgs) -> Result<String> {
    let text = match args.payload {
        Some(p) => p,
        None => {
            std::io::read_to_string(std::io::stdin()).context("reading the payload from stdin")?
        }
    };
    let payload: serde_json::Value =
        serde_json::from_str(&text).context("the payload is not JSON")?;
    let task_id = args
        .task_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut event = TaskEvent::new(&task_id, args.kind, args.source);
    event.payload = payload;
    event.tenant = args.tenant;
    event.labels = parse_labels(&args.labels)?;
    event.step_id = args.step_id;
    event.attempt = args.attempt;
    event.confidence = args.confidence;
    let secret = match &args.sign_with_env {
        Some(var) => Some(Secret::from_env(var).with_context(|| {
            format!(
                "--sign-with-env {var}: the variable is not set; it must hold the card's secret"
            )
        })?),
        None => None,
    };
    publish_signed(kafka, codec, &event, secret.as_ref()).await?;
    Ok(task_id)
}

/// Publishes a task event to the tasks topic, keyed by its task id.
async fn publish(kafka: &KafkaConfig, codec: &Codec, event: &TaskEvent) -> Result<()> {
    publish_signed(kafka, codec, event, None).await
}

/// Publishes a task event, signed with `secret` when given (see [`crate::signing`]).
async fn publish_signed(
    kafka: &KafkaConfig,
    codec: &Codec,
    event: &TaskEvent,
    secret: Option<&Secret>,
) -> Result<()> {
    let producer = kafka.producer()?;
    let topic = kafka.topics().tasks();
    let bytes = codec.encode_task_event(&topic, event).await?;
    let mut record = FutureRecord::to(&topic).key(&event.task_id).payload(&bytes);
    if let Some(secret) = secret {
        record =
            record.headers(secret.headers(&event.task_id, event.step_id, event.attempt, &bytes));
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .with_context(|| format!("publishing to `{topic}`"))?;
    Ok(())
}

async fn tail(kafka: &KafkaConfig, args: TailArgs) -> Result<()> {
    let start = std::cell::Cell::new(None);
    let done = follow(kafka, &args.task_id, args.idle_timeout, |record| {
        let t0 = start.get().unwrap_or(record.at);
        start.set(Some(t0));
        println!(
            "{:>8.3}s  {}",
            (record.at - t0) as f64 / 1000.0,
            describe(record)
        );
        args.until_done && is_final(&record.decision)
    })
    .await?;
    if args.until_done && !done {
        bail!(
            "no new event for {:?}; the task has not finished",
            args.idle_timeout
        );
    }
    Ok(())
}

/// A child process started by `dev`, stopped by PID.
struct Child {
    name: String,
    child: tokio::process::Child,
}

impl Child {
    fn spawn(name: &str, args: &[String], logs: &Path) -> Result<Self> {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .args(args)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
        })
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
                .await
                .is_err()
            {
                eprintln!("{} did not stop within 15s; killing it", self.name);
                let _ = self.child.kill().await;
            }
        }
    }
}

fn scripts_dir() -> PathBuf {
    let local = PathBuf::from("scripts");
    if local.join("start-broker").exists() {
        local
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
    }
}

const SAMPLES: [&str; 2] = [
    "Hi! My order arrived yesterday. How do I change the delivery address for the next one?",
    "This is the third time my refund has failed. I am furious and I want to cancel everything.",
];

async fn dev(
    global: &Global,
    kafka: KafkaConfig,
    llm: Option<LlmConfig>,
    args: DevArgs,
) -> Result<()> {
    let workflow = Workflow::load(&args.workflow.workflow, args.workflow.rules.as_deref())?;
    println!(
        "workflow {}: {} cards, {} rules",
        workflow.dir.display(),
        workflow.cards.names().len(),
        workflow.rules.rules.len()
    );
    let mut started_broker = false;
    if kafka.wait_for_broker(Duration::from_secs(2)).is_err() {
        if kafka.bootstrap_servers != crate::kafka::DEFAULT_BOOTSTRAP {
            bail!("no broker answers at {}", kafka.bootstrap_servers);
        }
        println!("no broker at {}; starting one with scripts/start-broker (the first build takes ~17 min)", kafka.bootstrap_servers);
        let status = tokio::process::Command::new(scripts_dir().join("start-broker"))
            .status()
            .await?;
        if !status.success() {
            bail!("scripts/start-broker failed");
        }
        started_broker = true;
    }
    kafka.wait_for_broker(Duration::from_secs(30))?;
    for line in topics::apply(&kafka, &TopicSpecs::load(&args.spec)?, &workflow.cards).await? {
        println!("topic  {line}");
    }
    let (llm_args, started_llm) = dev_llm(llm.unwrap_or_default(), &workflow).await?;
    let logs = PathBuf::from(".switchyard/logs");
    std::fs::create_dir_all(&logs)?;
    let mut base = global.as_args(&kafka);
    base.extend(llm_args);
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .cloned()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let workflow_dir = workflow.dir.display().to_string();
    let mut children = Vec::new();
    let registry = global
        .registry_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    if tokio::net::TcpStream::connect(&registry).await.is_err() {
        let topic = format!("{}._schemas", kafka.topic_prefix);
        children.push(Child::spawn(
            "registry",
            &with(&["registry", "--listen", &registry, "--topic", &topic]),
            &logs,
        )?);
    }
    let schemas = registered_schemas(&global.registry_url, &kafka, &workflow).await?;
    println!(
        "schema registry at {} ({schemas} subjects registered); records are {}",
        global.registry_url, global.encoding
    );
    children.push(Child::spawn(
        "router",
        &with(&[
            "router",
            "--workflow",
            &workflow_dir,
            "--http-addr",
            "127.0.0.1:9464",
        ]),
        &logs,
    )?);
    let runnable: Vec<&Card> = workflow
        .cards
        .iter()
        .filter(|c| matches!(c.runtime, Runtime::Command { .. } | Runtime::Llm { .. }))
        .collect();
    for (port, card) in (9465..).zip(&runnable) {
        let path = workflow
            .dir
            .join("cards")
            .join(format!("{}.yaml", card.name));
        let addr = format!("127.0.0.1:{port}");
        let path = path.display().to_string();
        children.push(Child::spawn(
            &card.name,
            &with(&["agent", "--card", &path, "--http-addr", &addr]),
            &logs,
        )?);
    }
    println!(
        "started the router (metrics on http://127.0.0.1:9464/metrics) and {} agents; logs in {}",
        runnable.len(),
        logs.display()
    );
    let samples = workflow.dir.join("samples.txt");
    let messages: Vec<String> = if !args.messages.is_empty() {
        args.messages
    } else if samples.exists() {
        std::fs::read_to_string(&samples)
            .with_context(|| samples.display().to_string())?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    } else {
        SAMPLES.iter().map(|s| s.to_string()).collect()
    };
    let result = run_samples(&kafka, &global.codec(), &workflow, &messages).await;
    if args.keep_running && result.is_ok() {
        println!("running; Ctrl-C stops");
        let _ = tokio::signal::ctrl_c().await;
    }
    for child in children {
        child.stop().await;
    }
    if started_llm {
        let _ = tokio::process::Command::new(scripts_dir().join("stop-llm"))
            .status()
            .await;
    }
    if started_broker {
        let _ = tokio::process::Command::new(scripts_dir().join("stop-broker"))
            .status()
            .await;
    }
    result
}

/// Where the workflow needs an LLM (an `llm` rule or card): the configured endpoint, or the
/// local one, started with `scripts/start-llm` when nothing answers. Returns the flags that point
/// the children at it and whether dev started it.
async fn dev_llm(llm: LlmConfig, workflow: &Workflow) -> Result<(Vec<String>, bool)> {
    let llm_cards = workflow
        .cards
        .iter()
        .any(|c| matches!(c.runtime, Runtime::Llm { .. }));
    if !(workflow.rules.uses_llm() || llm_cards) {
        if answers(&llm.base_url).await {
            println!(
                "an LLM answers at {} but this workflow has no `llm` rule or card; \
                 `cargo run -- dev --workflow agents/helpdesk` runs the LLM-routed example",
                llm.base_url
            );
        }
        return Ok((Vec::new(), false));
    }
    let mut started = false;
    if !answers(&llm.base_url).await {
        if llm.base_url != LlmConfig::default().base_url {
            bail!("no LLM endpoint answers at {}", llm.base_url);
        }
        println!(
            "no LLM at {}; starting the local one with scripts/start-llm (the first time installs it, ~2 min)",
            llm.base_url
        );
        let status = tokio::process::Command::new(scripts_dir().join("start-llm"))
            .status()
            .await?;
        if !status.success() {
            bail!("scripts/start-llm failed (see its output above)");
        }
        started = true;
    }
    println!("LLM endpoint {} (model {})", llm.base_url, llm.model);
    let args = vec![
        "--llm-url".into(),
        llm.base_url.clone(),
        "--llm-model".into(),
        llm.model.clone(),
    ];
    Ok((args, started))
}

/// Whether something accepts TCP connections at the host and port of `url`.
async fn answers(url: &str) -> bool {
    let (default_port, rest) = match url.split_once("://") {
        Some(("https", rest)) => (443, rest),
        Some((_, rest)) => (80, rest),
        None => (80, url),
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let address = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    tokio::net::TcpStream::connect(address).await.is_ok()
}

/// Registers the schemas, waiting up to 30 s for the registry to come up.
async fn registered_schemas(url: &str, kafka: &KafkaConfig, workflow: &Workflow) -> Result<usize> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match crate::registry::client::register(url, kafka, &workflow.cards, Path::new("schemas"))
            .await
        {
            Ok(registered) => return Ok(registered.len()),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn run_samples(
    kafka: &KafkaConfig,
    codec: &Codec,
    workflow: &Workflow,
    messages: &[String],
) -> Result<()> {
    for message in messages {
        let task_id = format!("dev-{}", uuid::Uuid::new_v4().simple());
        let mut event = TaskEvent::new(&task_id, EventKind::Submitted, "client");
        event.payload = serde_json::json!({ "customer_message": message });
        publish(kafka, codec, &event).await?;
        println!("\ntask {task_id}: \"{message}\"");
        let mut escalated = None;
        let start = std::cell::Cell::new(None);
        let print = |record: &crate::envelope::StateEvent| {
            let t0 = start.get().unwrap_or(record.at);
            start.set(Some(t0));
            println!(
                "  {:>7.3}s  {}",
                (record.at - t0) as f64 / 1000.0,
                describe(record)
            );
        };
        let finished = follow(kafka, &task_id, Duration::from_secs(60), |record| {
            print(record);
            if let Decision::Escalated { step, .. } = &record.decision {
                escalated = Some(step.clone());
                return true;
            }
            is_final(&record.decision)
        })
        .await?;
        if !finished {
            bail!("task {task_id} made no progress for 60s; see .switchyard/logs/");
        }
        let Some(step) = escalated else { continue };
        let human = workflow
            .cards
            .get(&step.card)
            .map(|c| c.name.clone())
            .unwrap_or_default();
        println!("  (dev answers as the human `{human}`: switchyard submit --kind HUMAN_DECISION --task-id {task_id} --step-id {})", step.step_id);
        let mut decision = TaskEvent::new(&task_id, EventKind::HumanDecision, "dev-human");
        decision.step_id = Some(step.step_id);
        decision.payload = serde_json::json!({ "reply": "A supervisor will call you today and your refund is approved." });
        publish(kafka, codec, &decision).await?;
        let mut seen_escalation = false;
        follow(kafka, &task_id, Duration::from_secs(60), |record| {
            if seen_escalation {
                print(record);
            }
            seen_escalation |= matches!(record.decision, Decision::Escalated { .. });
            seen_escalation && is_final(&record.decision)
        })
        .await?;
    }
    println!("\nall sample tasks finished");
    Ok(())
}

async fn replay(kafka: &KafkaConfig, codec: &Codec, args: ReplayArgs) -> Result<()> {
    let workflow = Workflow::load(&args.workflow.workflow, args.workflow.rules.as_deref())?;
    let what_if = args.workflow.rules.is_some() && !args.verify;
    let filter = crate::replay::Filter {
        from_offset: args.from_offset,
        from_time: args.from_time.map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        }),
        tenant: args.tenant,
        task: args.task,
    };
    let state = kafka.topics().state();
    let total = {
        use rdkafka::consumer::BaseConsumer;
        let client: BaseConsumer = kafka.client_config().create()?;
        crate::kafka::high_watermark_sum(&client, &state, kafka.partition_count(&state)?)?
    };
    let bar = indicatif::ProgressBar::new(total.max(0) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} state records, {per_sec}, eta {eta}",
        )
        .expect("the template is valid"),
    );
    let started = std::time::Instant::now();
    let report = crate::replay::replay(kafka, codec, &workflow.engine(), &filter, |n| {
        if n % 1000 == 0 {
            bar.set_position(n);
        }
    })
    .await?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if what_if {
        println!(
            "what-if with {}:",
            args.workflow.rules.unwrap_or_default().display()
        );
        println!(
            "{} of {} decisions change, in {} tasks",
            report.route_changes().count(),
            report.checked,
            report.changed_tasks().len()
        );
        for ((from, to), n) in report.transitions() {
            println!("  {n:>6}  {from}  →  {to}");
        }
        println!(
            "decisions no rule would make (to the LLM where configured, else dead-lettered): {}",
            report.unmatched()
        );
        for task in report.changed_tasks() {
            println!("  task {task}");
        }
    } else {
        for d in &report.divergences {
            println!(
                "DIVERGENCE task {} at {}[{}]@{}: recorded {} / replayed {}{}",
                d.task_id,
                state,
                d.partition,
                d.offset,
                serde_json::to_string(&d.recorded)?,
                serde_json::to_string(&d.replayed)?,
                d.note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            );
        }
    }
    eprintln!(
        "replayed {} state records in {seconds:.2}s ({:.0}/s): {} decisions checked ({} from recorded LLM answers, no LLM called; {} from recorded timer firings, no clock read; {} following refused writes), {} divergences, {} fenced records ignored, {} inputs missing",
        report.records,
        report.records as f64 / seconds.max(1e-9),
        report.checked,
        report.llm_recorded,
        report.timers_fired,
        report.refused_writes,
        report.divergences.len(),
        report.fenced,
        report.inputs_missing
    );
    if report.signatures_unchecked > 0 {
        eprintln!(
            "{} signed answers were not checked: set the cards' `secret_env` variables to check them",
            report.signatures_unchecked
        );
    }
    if args.verify && !report.divergences.is_empty() {
        bail!(
            "{} recorded decisions do not follow from the recorded events and rules",
            report.divergences.len()
        );
    }
    Ok(())
}

async fn dlq(kafka: &KafkaConfig, command: DlqCommand) -> Result<()> {
    match command {
        DlqCommand::List { filter } => {
            let letters = crate::dlq::list(kafka, &filter.selection())?;
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for d in &letters {
                *counts.entry(d.reason.as_str()).or_default() += 1;
                println!(
                    "{}:{}  {:<16} key={} from {}[{}]@{}  {}",
                    d.partition,
                    d.offset,
                    d.reason,
                    d.key,
                    d.source_topic,
                    d.source_partition,
                    d.source_offset,
                    d.message
                );
            }
            println!("{} dead letters", letters.len());
            for (reason, n) in counts {
                println!("  {n:>6}  {reason}");
            }
        }
        DlqCommand::Show {
            position: (partition, offset),
        } => {
            let d = crate::dlq::show(kafka, partition, offset)?;
            println!("{}", serde_json::to_string_pretty(&d)?);
            match &d.payload {
                Some(bytes) if d.truncated() => println!(
                    "payload (the first {} bytes; the original is at its source position): {}",
                    bytes.len(),
                    String::from_utf8_lossy(bytes)
                ),
                Some(bytes) => println!("payload: {}", String::from_utf8_lossy(bytes)),
                None => println!("payload: none (a tombstone)"),
            }
        }
        DlqCommand::Redrive {
            filter,
            max_redrives,
        } => {
            for r in crate::dlq::redrive(kafka, &filter.selection(), max_redrives).await? {
                match r {
                    crate::dlq::Redriven::Sent { dead_letter: d } => {
                        println!(
                            "redriven {}:{} ({}) to {}",
                            d.partition, d.offset, d.reason, d.source_topic
                        )
                    }
                    crate::dlq::Redriven::Refused {
                        dead_letter: d,
                        max,
                    } => println!(
                        "refused  {}:{} ({}): redriven {} times already, the limit is {max}",
                        d.partition, d.offset, d.reason, d.redrives
                    ),
                    crate::dlq::Redriven::NotSent {
                        dead_letter: d,
                        why,
                    } => println!(
                        "not sent {}:{} ({}): {why}",
                        d.partition, d.offset, d.reason
                    ),
                }
            }
        }
    }
    Ok(())
}

//! `switchyard router` and `switchyard agent`: the long-running services.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::{shutdown_signal, Global, WorkflowArgs};
use crate::agent::{self, AgentConfig};
use crate::cards::{Card, Runtime};
use crate::kafka::KafkaConfig;
use crate::kafka::DEFAULT_SESSION_TIMEOUT;
use crate::llm::{LlmClient, LlmConfig, LlmHandler};
use crate::metrics::{AgentMetrics, RouterMetrics};
use crate::router::service::{DEFAULT_COMMIT_INTERVAL, DEFAULT_MAX_BATCH};
use crate::router::snapshot::{self, SnapshotConfig};
use crate::router::{ConsistencyMode, Router, RouterConfig};
use crate::runtime::{A2aHandler, CommandHandler, HttpHandler};
use crate::workflow::Workflow;

/// The flags every Kafka service shares (router and agent).
#[derive(Debug, Args)]
struct ServiceArgs {
    /// This instance's id (default: random). Give each instance a stable one (e.g. the pod
    /// name of a StatefulSet): a restarted router then takes its partitions back at once
    /// (static group membership) instead of after the session timeout. With exactly-once it
    /// names the transactional id.
    #[arg(long, env = "SWITCHYARD_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Consumer session timeout: how soon a crashed instance's partitions move to another.
    #[arg(long, default_value_t = DEFAULT_SESSION_TIMEOUT.into())]
    session_timeout: humantime::Duration,
    /// The processing guarantee: `exactly-once` (Kafka transactions: a router's batch, an
    /// agent's result and its offset, in one transaction) or `effectively-once`.
    #[arg(long, env = "SWITCHYARD_CONSISTENCY", default_value_t)]
    consistency: ConsistencyMode,
}

#[derive(Debug, Args)]
pub(super) struct RouterArgs {
    #[command(flatten)]
    workflow: WorkflowArgs,
    #[command(flatten)]
    service: ServiceArgs,
    /// Serve /metrics, /health and /ready here.
    #[arg(long, default_value = "127.0.0.1:9464")]
    http_addr: SocketAddr,
    /// Most events decided per batch.
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH)]
    max_batch: usize,
    /// Exactly-once: how long a batch gathers events before its transaction commits.
    #[arg(long, default_value_t = DEFAULT_COMMIT_INTERVAL.into())]
    commit_interval: humantime::Duration,
    /// Snapshot a partition's state after this many decisions on it, or as many as it has
    /// open tasks if that is more (0: not by count). A restore reads the newest snapshot and the
    /// decisions after it.
    #[arg(long, default_value_t = snapshot::DEFAULT_EVERY_RECORDS)]
    snapshot_every_records: u64,
    /// Snapshot a partition's state this long after its last snapshot, if it changed (0s: not
    /// by time). With `--snapshot-every-records 0` too, no snapshots are written or read.
    #[arg(long, default_value_t = snapshot::DEFAULT_INTERVAL.into())]
    snapshot_interval: humantime::Duration,
    /// Largest slice of a snapshot in one record; keep it under the snapshot topic's
    /// `max.message.bytes`.
    #[arg(long, default_value_t = snapshot::DEFAULT_CHUNK_BYTES)]
    snapshot_chunk_bytes: usize,
}

#[derive(Debug, Args)]
pub(super) struct AgentArgs {
    /// The card file.
    #[arg(long)]
    card: PathBuf,
    #[command(flatten)]
    service: ServiceArgs,
    /// Serve /metrics, /health and /ready here.
    #[arg(long)]
    http_addr: Option<SocketAddr>,
}

pub(super) async fn run_router(
    kafka: KafkaConfig,
    llm: Option<LlmConfig>,
    global: &Global,
    args: RouterArgs,
) -> Result<()> {
    let workflow = Workflow::load(&args.workflow.workflow, args.workflow.rules.as_deref())?;
    kafka.wait_for_broker(Duration::from_secs(30))?;
    let mut config = RouterConfig::new(kafka);
    if let Some(id) = args.service.instance_id {
        config.instance_id = id;
        config.static_membership = true;
    }
    config.http_addr = Some(args.http_addr);
    config.max_batch = args.max_batch;
    config.session_timeout = args.service.session_timeout.into();
    config.consistency = args.service.consistency;
    config.commit_interval = args.commit_interval.into();
    config.snapshots = SnapshotConfig {
        every_records: args.snapshot_every_records,
        interval: args.snapshot_interval.into(),
        chunk_bytes: args.snapshot_chunk_bytes,
    };
    config.encoding = global.encoding;
    config.registry_url = global.registry_url.clone();
    config.llm = llm;
    let router = Router::new(config, workflow.engine(), RouterMetrics::new()?).await?;
    router.run(shutdown_signal()?).await?;
    Ok(())
}

pub(super) async fn run_agent(
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
    config.session_timeout = args.service.session_timeout.into();
    config.consistency = args.service.consistency;
    config.encoding = global.encoding;
    config.registry_url = global.registry_url.clone();
    if let Some(id) = args.service.instance_id {
        config.instance_id = id;
    }
    let stop = shutdown_signal()?;
    match (llm, &config.card.runtime) {
        (Some(handler), _) => agent::run(config, Arc::new(handler), metrics, stop).await?,
        (None, Runtime::Http { .. }) => {
            let handler = HttpHandler::new(&config.card)?;
            agent::run(config, Arc::new(handler), metrics, stop).await?
        }
        (None, Runtime::A2a { .. }) => {
            let handler = A2aHandler::new(&config.card)?;
            agent::run(config, Arc::new(handler), metrics, stop).await?
        }
        (None, _) => {
            let handler = CommandHandler::new(&config.card, dir)?;
            agent::run(config, Arc::new(handler), metrics, stop).await?
        }
    }
    Ok(())
}

//! `switchyard console`: the web console (see [`crate::console`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::{shutdown_signal, Global, WorkflowArgs};
use crate::console::{self, ConsoleConfig};
use crate::kafka::KafkaConfig;
use crate::workflow::Workflow;

/// The console's flags, shared with `switchyard dev`.
#[derive(Debug, Args)]
pub(super) struct ConsoleArgs {
    /// Serve the console here (loopback by default; bind another address deliberately).
    #[arg(long = "console-listen", default_value = console::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// The environment variable that holds the token allowing redrive, answer and cancel
    /// (the token is never printed). Without it the console is read-only.
    #[arg(
        long = "console-token-env",
        value_name = "NAME",
        default_value = "SWITCHYARD_CONSOLE_TOKEN"
    )]
    pub token_env: String,
    /// Directory of the console's index (default `$SWITCHYARD_HOME/console/<topic prefix>`,
    /// `SWITCHYARD_HOME` defaulting to `.switchyard`).
    #[arg(long = "console-data-dir")]
    pub data_dir: Option<PathBuf>,
    /// Refuse redriving a dead letter redriven this many times already.
    #[arg(long = "console-max-redrives", default_value_t = crate::dlq::DEFAULT_MAX_REDRIVES)]
    pub max_redrives: u32,
}

impl ConsoleArgs {
    /// Starts the console for `workflow`; a listen address in use falls back to a free port.
    pub(super) async fn start(
        &self,
        global: &Global,
        kafka: &KafkaConfig,
        workflow: Workflow,
    ) -> Result<console::Running> {
        let data_dir = self.data_dir.clone().unwrap_or_else(|| {
            let home =
                std::env::var_os("SWITCHYARD_HOME").map_or(".switchyard".into(), PathBuf::from);
            home.join("console").join(&kafka.topic_prefix)
        });
        let config = |listen| ConsoleConfig {
            kafka: kafka.clone(),
            codec: global.codec(),
            workflow: workflow.clone(),
            listen,
            data_dir: data_dir.clone(),
            token: std::env::var(&self.token_env).ok(),
            max_redrives: self.max_redrives,
        };
        match console::serve(config(self.listen)).await {
            Err(crate::error::Error::Bind { addr, source }) if addr.port() != 0 => {
                tracing::warn!(%addr, error = %source, "console address in use; taking a free port");
                let free = SocketAddr::new(addr.ip(), 0);
                Ok(console::serve(config(free)).await?)
            }
            started => started.context("starting the console"),
        }
    }

    /// What to print about a started console: its address and whether it writes.
    pub(super) fn describe(&self, running: &console::Running) -> String {
        let mode = match std::env::var(&self.token_env) {
            Ok(_) => format!("writes allowed with the token in {}", self.token_env),
            Err(_) => format!(
                "read-only: set {} to a token to allow redrive, answer and cancel",
                self.token_env
            ),
        };
        format!("console http://{} ({mode})", running.addr)
    }
}

/// `switchyard console` flags.
#[derive(Debug, Args)]
pub(super) struct Command {
    #[command(flatten)]
    workflow: WorkflowArgs,
    #[command(flatten)]
    console: ConsoleArgs,
}

/// Runs the console until SIGINT or SIGTERM.
pub(super) async fn run(global: &Global, kafka: KafkaConfig, args: Command) -> Result<()> {
    let workflow = Workflow::load(&args.workflow.workflow, args.workflow.rules.as_deref())?;
    let mut stop = shutdown_signal()?;
    let running = args.console.start(global, &kafka, workflow).await?;
    println!("{}", args.console.describe(&running));
    let _ = stop.changed().await;
    running.stop();
    Ok(())
}

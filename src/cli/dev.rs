//! `switchyard dev`: the whole stack locally (broker, registry, topics, router, agents) with
//! sample tasks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use super::console::ConsoleArgs;
use super::task::{publish, timeline_printer};
use super::{Global, WorkflowArgs};
use crate::cards::{Card, Runtime};
use crate::codec::Codec;
use crate::envelope::{Decision, EventKind, TaskEvent};
use crate::journey::{follow, is_final};
use crate::kafka::KafkaConfig;
use crate::llm::LlmConfig;
use crate::topics::{self, TopicSpecs};
use crate::workflow::Workflow;

#[derive(Debug, Args)]
pub(super) struct DevArgs {
    #[command(flatten)]
    workflow: WorkflowArgs,
    /// Topic spec file.
    #[arg(long, default_value = "topics/switchyard.yaml")]
    spec: PathBuf,
    /// A payload (JSON) to submit as a sample task, instead of the tasks of
    /// `<workflow>/samples.yaml` (repeatable).
    #[arg(long = "payload", value_name = "JSON")]
    payloads: Vec<String>,
    /// Keep the router and agents running after the samples finish (Ctrl-C stops).
    #[arg(long)]
    keep_running: bool,
    #[command(flatten)]
    console: ConsoleArgs,
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

/// Runs `scripts/<name>`; its output goes to the terminal.
async fn script(name: &str) -> Result<()> {
    let status = tokio::process::Command::new(scripts_dir().join(name))
        .status()
        .await?;
    if !status.success() {
        bail!("scripts/{name} failed (see its output above)");
    }
    Ok(())
}

/// `<workflow>/samples.yaml`: what `dev` submits as sample tasks, and how it answers as a human.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Samples {
    /// The sample tasks, submitted in order.
    tasks: Vec<Sample>,
    /// The payload of the `HUMAN_DECISION` that answers a step escalated to a human card.
    #[serde(default)]
    human_reply: serde_json::Value,
}

/// One sample task.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sample {
    /// Its payload.
    payload: serde_json::Value,
    /// Its labels.
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl Samples {
    /// The samples of `workflow`, or `payloads` (JSON) given on the command line instead.
    fn load(workflow: &Workflow, payloads: &[String]) -> Result<Self> {
        let path = workflow.dir.join("samples.yaml");
        let mut samples = match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_yaml_ng::from_str(&text).with_context(|| path.display().to_string())?
            }
            Err(_) if !payloads.is_empty() => Samples {
                tasks: Vec::new(),
                human_reply: serde_json::json!({}),
            },
            Err(e) => bail!(
                "{}: {e}; write sample tasks there or give --payload",
                path.display()
            ),
        };
        if !payloads.is_empty() {
            samples.tasks = payloads
                .iter()
                .map(|p| {
                    let payload = serde_json::from_str(p)
                        .with_context(|| format!("--payload {p}: not JSON"))?;
                    Ok(Sample {
                        payload,
                        labels: BTreeMap::new(),
                    })
                })
                .collect::<Result<_>>()?;
        }
        Ok(samples)
    }
}

pub(super) async fn dev(
    global: &Global,
    kafka: KafkaConfig,
    llm: Option<LlmConfig>,
    args: DevArgs,
) -> Result<()> {
    let workflow = Workflow::load(&args.workflow.workflow, args.workflow.rules.as_deref())?;
    let samples = Samples::load(&workflow, &args.payloads)?;
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
        script("start-broker").await?;
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
        .filter(|c| !matches!(c.runtime, Runtime::Handler | Runtime::Human))
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
    let console = args.console.start(global, &kafka, workflow.clone()).await?;
    println!("{}", args.console.describe(&console));
    let result = run_samples(&kafka, &global.codec(), &workflow, &samples).await;
    if args.keep_running && result.is_ok() {
        println!("running; Ctrl-C stops");
        let _ = tokio::signal::ctrl_c().await;
    }
    console.stop();
    for child in children {
        child.stop().await;
    }
    if started_llm {
        let _ = script("stop-llm").await;
    }
    if started_broker {
        let _ = script("stop-broker").await;
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
        script("start-llm").await?;
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
    samples: &Samples,
) -> Result<()> {
    for sample in &samples.tasks {
        let task_id = format!("dev-{}", uuid::Uuid::new_v4().simple());
        let mut event = TaskEvent::new(&task_id, EventKind::Submitted, "client");
        event.payload = sample.payload.clone();
        event.labels = sample.labels.clone();
        publish(kafka, codec, &event).await?;
        println!("\ntask {task_id}: {}", sample.payload);
        let mut escalated = None;
        let print = timeline_printer("  ");
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
        decision.payload = samples.human_reply.clone();
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

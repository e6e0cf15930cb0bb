//! `switchyard submit` and `switchyard tail`: publish a task event, follow a task.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::codec::Codec;
use crate::envelope::{EventKind, StateEvent, TaskEvent};
use crate::journey::{describe, follow, is_final};
use crate::kafka::KafkaConfig;
use crate::signing::Secret;

#[derive(Debug, Args)]
pub(super) struct SubmitArgs {
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
    /// Continue this W3C trace (`00-<trace id>-<span id>-<flags>`) instead of starting one.
    #[arg(long)]
    traceparent: Option<String>,
}

#[derive(Debug, Args)]
pub(super) struct TailArgs {
    /// The task id.
    task_id: String,
    /// Stop when the task completes, is cancelled or is dead-lettered.
    #[arg(long)]
    until_done: bool,
    /// Give up after this long without a new event.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
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

pub(super) async fn submit(kafka: &KafkaConfig, codec: &Codec, args: SubmitArgs) -> Result<String> {
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
    let span = tracing::info_span!("submit", task_id = %task_id, kind = %event.kind.as_str());
    let parent = args.traceparent.as_deref().map(crate::trace::context_of);
    let trace = crate::trace::hop(&span, parent.unwrap_or_default());
    crate::publish::publish(kafka, codec, &event, secret.as_ref(), &trace).await?;
    Ok(task_id)
}

/// Publishes a task event to the tasks topic, keyed by its task id.
pub(super) async fn publish(kafka: &KafkaConfig, codec: &Codec, event: &TaskEvent) -> Result<()> {
    let span = tracing::info_span!("submit", task_id = %event.task_id, kind = %event.kind.as_str());
    let trace = crate::trace::hop(&span, Default::default());
    Ok(crate::publish::publish(kafka, codec, event, None, &trace).await?)
}

/// Prints each record of a task's timeline after `indent`, with the seconds since the first one.
pub(super) fn timeline_printer(indent: &str) -> impl Fn(&StateEvent) + '_ {
    let start = std::cell::Cell::new(None);
    move |record| {
        let t0 = start.get().unwrap_or(record.at);
        start.set(Some(t0));
        println!(
            "{indent}{:>8.3}s  {}",
            (record.at - t0) as f64 / 1000.0,
            describe(record)
        );
    }
}

pub(super) async fn tail(kafka: &KafkaConfig, args: TailArgs) -> Result<()> {
    let print = timeline_printer("");
    let done = follow(kafka, &args.task_id, args.idle_timeout, |record| {
        print(record);
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

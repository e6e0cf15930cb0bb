//! `switchyard audit`, `replay` and `dlq`: reading what happened, and repairing it.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use super::WorkflowArgs;
use crate::codec::Codec;
use crate::kafka::KafkaConfig;
use crate::workflow::Workflow;

#[derive(Debug, Args)]
pub(super) struct AuditArgs {
    /// The task id.
    task_id: String,
    /// Print JSON for tools.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(super) struct ReplayArgs {
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
pub(super) struct DlqFilter {
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
pub(super) enum DlqCommand {
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
        #[arg(long, default_value_t = crate::dlq::DEFAULT_MAX_REDRIVES)]
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

/// Prints a task's whole timeline.
pub(super) fn audit(kafka: &KafkaConfig, args: AuditArgs) -> Result<()> {
    let timeline = crate::journey::audit(kafka, &args.task_id)?;
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

pub(super) async fn replay(kafka: &KafkaConfig, codec: &Codec, args: ReplayArgs) -> Result<()> {
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

pub(super) async fn dlq(kafka: &KafkaConfig, command: DlqCommand) -> Result<()> {
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
                let (verb, d, outcome) = match r {
                    crate::dlq::Redriven::Sent { dead_letter } => {
                        let to = format!(" to {}", dead_letter.source_topic);
                        ("redriven", dead_letter, to)
                    }
                    crate::dlq::Redriven::Refused { dead_letter, max } => {
                        let why = format!(
                            ": redriven {} times already, the limit is {max}",
                            dead_letter.redrives
                        );
                        ("refused ", dead_letter, why)
                    }
                    crate::dlq::Redriven::NotSent { dead_letter, why } => {
                        ("not sent", dead_letter, format!(": {why}"))
                    }
                };
                println!(
                    "{verb} {}:{} ({}){outcome}",
                    d.partition, d.offset, d.reason
                );
            }
        }
    }
    Ok(())
}

//! A task's journey: following it live, its full audit timeline, and describing decisions for people.

use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::envelope::{
    BreakerPhase, DecidedBy, Decision, EventKind, Firing, StateEvent, TimerKind,
};
use crate::kafka::{self, partition_for_key, KafkaConfig};
use crate::state_record;

/// Whether a decision ends the task.
pub fn is_final(decision: &Decision) -> bool {
    matches!(
        decision,
        Decision::Completed { .. }
            | Decision::Cancelled
            | Decision::DeadLettered {
                ends_task: true,
                ..
            }
    )
}

/// One line describing a state event: the input it answers and what was decided.
pub fn describe(record: &StateEvent) -> String {
    let input = match &record.event {
        Some(e) => {
            let step = e.step_id.map(|s| format!(" step {s}")).unwrap_or_default();
            let attempt = e
                .attempt
                .filter(|a| *a > 1)
                .map(|a| format!(" attempt {a}"))
                .unwrap_or_default();
            let confidence = e
                .confidence
                .map(|c| format!(" confidence {c:.2}"))
                .unwrap_or_default();
            let from = match e.kind {
                EventKind::Submitted | EventKind::Cancel => format!("from {}", e.source),
                _ => format!("from {}{step}{attempt}", e.source),
            };
            if record.input.is_none() && record.llm.is_some() {
                format!("{:<15} for the {} {from}", "LLM ANSWER", e.kind.as_str())
            } else {
                format!("{:<15} {from}{confidence}", e.kind.as_str())
            }
        }
        None => match (&record.timer, &record.rejected, &record.input) {
            (Some(firing), _, _) => timer(firing),
            (None, Some(r), _) => format!("WRITE REFUSED   {} bytes for `{}`", r.bytes, r.topic),
            (None, None, Some(i)) => format!(
                "NOT COPIED      {}[{}]@{}, {} bytes",
                i.topic,
                i.partition,
                i.offset,
                i.size.unwrap_or_default()
            ),
            (None, None, None) => "UNDECODABLE".to_string(),
        },
    };
    let decision = match &record.decision {
        Decision::Routed { steps, decided_by } => {
            let to: Vec<String> = steps
                .iter()
                .map(|s| match &s.instead_of {
                    Some(card) => format!(
                        "{} (step {}; BREAKER OPEN {card} ⇒ fallback)",
                        s.card, s.step_id
                    ),
                    None => format!("{} (step {})", s.card, s.step_id),
                })
                .collect();
            let by = match decided_by {
                DecidedBy::Rule { rule_id } => format!("rule {rule_id}"),
                DecidedBy::Fallback { failed_card } => format!("fallback for {failed_card}"),
                DecidedBy::Llm { rule_id } => format!("LLM via rule {rule_id}"),
                DecidedBy::LlmFallback { rule_id, reason } => {
                    format!("rule {rule_id} fallback: LLM {reason}")
                }
            };
            format!("ROUTED → {}   [{by}]", to.join(", "))
        }
        Decision::Escalated { step, rule_id } => format!(
            "ESCALATED → {} (step {})   [rule {rule_id}]",
            step.card, step.step_id
        ),
        Decision::Completed { rule_id } => format!("COMPLETED   [rule {rule_id}]"),
        Decision::RetryScheduled { step } => format!(
            "RETRY{} → {} (step {} attempt {})",
            in_(step.delay_ms),
            step.card,
            step.step_id,
            step.attempt
        ),
        Decision::Dispatched { step } => match step.delay_ms {
            Some(wait) => format!(
                "WAIT {} more: BREAKER OPEN {} (step {})",
                seconds(wait),
                step.card,
                step.step_id
            ),
            None => format!(
                "SENT → {} (step {} attempt {})",
                step.card, step.step_id, step.attempt
            ),
        },
        Decision::Reminded { step } => {
            format!("REMINDED → {} (step {})", step.card, step.step_id)
        }
        Decision::DeadLettered {
            reason, message, ..
        } => format!("DEAD_LETTERED {reason}: {message}"),
        Decision::Dropped { reason } => format!("DROPPED {reason}"),
        Decision::Recorded => "RECORDED (waiting for the other branches)".to_string(),
        Decision::Cancelled => "CANCELLED".to_string(),
        Decision::Owned { instance } => format!("OWNED by {instance}"),
        Decision::AwaitingLlm { rule_id } => format!("AWAITING_LLM   [rule {rule_id}]"),
        Decision::Queued => "QUEUED (behind the LLM decision)".to_string(),
    };
    let llm = record.llm.as_ref().map_or_else(String::new, |c| {
        let answer = match (&c.agent, &c.error) {
            (Some(agent), _) => format!("chose {agent}"),
            (None, Some(error)) => format!("failed: {error}"),
            (None, None) => "no answer".into(),
        };
        let reason = c
            .reason
            .as_deref()
            .map(|r| format!(" — {r:?}"))
            .unwrap_or_default();
        let confidence = c
            .confidence
            .map(|x| format!(" confidence {x:.2}"))
            .unwrap_or_default();
        format!(
            "\n{:<50}   LLM {} {answer}{confidence}, {} attempt(s), {} ms, {} tokens{reason}",
            "",
            c.model,
            c.attempts,
            c.latency_ms,
            c.usage.tokens()
        )
    });
    let breakers: String = record
        .breakers
        .iter()
        .map(|b| {
            let phase = match b.phase {
                BreakerPhase::Open => "OPEN",
                BreakerPhase::HalfOpen => "HALF-OPEN (probe)",
                BreakerPhase::Closed => "CLOSED",
            };
            let until = b
                .until
                .map(|u| format!(" for {}", seconds(u - record.at)))
                .unwrap_or_default();
            format!("\n{:<50}   BREAKER {phase} {}{until}", "", b.card)
        })
        .collect();
    format!("{input:<50} ⇒ {decision}{llm}{breakers}")
}

/// How a timer that fell due reads in a timeline.
fn timer(firing: &Firing) -> String {
    let late = firing
        .waited_ms
        .map(|w| format!(" after {}", seconds(w)))
        .unwrap_or_default();
    let step = firing.step_id.unwrap_or_default();
    match firing.kind {
        TimerKind::Deadline => "DEADLINE EXCEEDED".to_string(),
        TimerKind::StepTimeout => {
            let of = firing
                .max_attempts
                .map(|m| format!("/{m}"))
                .unwrap_or_default();
            let attempt = firing.attempt.unwrap_or(1);
            format!("TIMED OUT{late} (step {step} attempt {attempt}{of})")
        }
        TimerKind::Dispatch => format!("WAIT OVER (step {step})"),
        TimerKind::HumanTimeout => format!("NO HUMAN ANSWER{late} (step {step})"),
        TimerKind::Reminder => format!("STILL WAITING (step {step})"),
    }
}

/// ` in 4s` for a delay, nothing without one.
fn in_(delay_ms: Option<i64>) -> String {
    delay_ms
        .map(|d| format!(" in {}", seconds(d)))
        .unwrap_or_default()
}

/// A duration in ms as people read it: `4s`, `1.5s`, `2m 30s`.
fn seconds(ms: i64) -> String {
    let ms = ms.max(0) as u64;
    if ms % 1000 != 0 && ms < 10_000 {
        return format!("{:.1}s", ms as f64 / 1000.0);
    }
    humantime::format_duration(std::time::Duration::from_secs(ms.div_ceil(1000))).to_string()
}

/// Reads the state events of `task_id` from the start of its partition and calls `on` for each,
/// until `stop` says so or `timeout` passes without one.
pub async fn follow(
    kafka: &KafkaConfig,
    task_id: &str,
    timeout: Duration,
    mut on: impl FnMut(&StateEvent) -> bool,
) -> kafka::Result<bool> {
    let topic = kafka.topics().state();
    let partitions = kafka.partition_count(&topic)?;
    let partition = partition_for_key(task_id.as_bytes(), partitions);
    let mut config = kafka.client_config();
    config
        .set("group.id", "switchyard-tail")
        .set("enable.auto.commit", "false");
    let consumer: StreamConsumer = config.create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, partition, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    loop {
        let Some(message) = kafka::recv_within(&consumer, timeout).await else {
            return Ok(false);
        };
        let message = message?;
        let records = message.payload().and_then(|b| state_record::decode(b).ok());
        for record in records.unwrap_or_default() {
            if record.task_id == task_id && on(&record) {
                return Ok(true);
            }
        }
    }
}

/// A task's whole history: every decision (with the input it answered) and its dead letters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Timeline {
    /// The task.
    pub task_id: String,
    /// The partition of the tasks and state topics that holds it.
    pub partition: i32,
    /// State events in order, with the state-topic offsets of their records.
    pub decisions: Vec<(i64, StateEvent)>,
    /// Its dead letters.
    pub dead_letters: Vec<crate::dlq::DeadLetter>,
}

/// Reads a task's timeline, touching only the partitions its key maps to.
pub fn audit(kafka: &KafkaConfig, task_id: &str) -> Result<Timeline, crate::kafka::Error> {
    use rdkafka::message::Message;
    let topics = kafka.topics();
    let partition = partition_for_key(task_id.as_bytes(), kafka.partition_count(&topics.state())?);
    let mut decisions = Vec::new();
    kafka::read_topic(kafka, &topics.state(), Some(&[partition]), |m| {
        let records = m.payload().and_then(|b| state_record::decode(b).ok());
        for record in records.unwrap_or_default() {
            if record.task_id == task_id {
                decisions.push((m.offset(), record));
            }
        }
    })?;
    let dlq_partition =
        partition_for_key(task_id.as_bytes(), kafka.partition_count(&topics.dlq())?);
    let selection = crate::dlq::Selection {
        task: Some(task_id.to_string()),
        ..Default::default()
    };
    let dead_letters = crate::dlq::list(kafka, &selection)?
        .into_iter()
        .filter(|d| d.partition == dlq_partition)
        .collect();
    Ok(Timeline {
        task_id: task_id.to_string(),
        partition,
        decisions,
        dead_letters,
    })
}

impl Timeline {
    /// The timeline for people: one line per decision, then the dead letters.
    pub fn render(&self) -> String {
        let mut out = format!("task {} (partition {})\n", self.task_id, self.partition);
        for (offset, record) in &self.decisions {
            let at = humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + Duration::from_millis(record.at.max(0) as u64),
            );
            out.push_str(&format!(
                "{at}  #{:<3} @{offset:<6} {}\n",
                record.seq,
                describe(record)
            ));
        }
        if self.dead_letters.is_empty() {
            out.push_str("no dead letters\n");
        }
        for d in &self.dead_letters {
            let kept = if d.truncated() {
                let size = d.headers.get(crate::dlq::headers::ORIGINAL_SIZE);
                format!(
                    "; keeps a prefix of the {} bytes, the original stays at its source",
                    size.map_or("?", String::as_str)
                )
            } else {
                String::new()
            };
            out.push_str(&format!(
                "dead letter {}@{}: {} ({}) from {}[{}]@{}, redriven {} times{kept}\n",
                d.partition,
                d.offset,
                d.reason,
                d.message,
                d.source_topic,
                d.source_partition,
                d.source_offset,
                d.redrives
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{BreakerChange, Step};

    fn record(decision: Decision, timer: Option<Firing>) -> StateEvent {
        StateEvent {
            timer,
            ..StateEvent::new("t", 2, (0, "i"), decision, 1_000)
        }
    }

    #[test]
    fn timers_retries_and_breakers_read_as_people_say_them() {
        let mut retry = Step::new(1, "billing", 2);
        retry.delay_ms = Some(4_000);
        let timed_out = Firing {
            kind: TimerKind::StepTimeout,
            due: 1_000,
            step_id: Some(1),
            attempt: Some(1),
            waited_ms: Some(30_000),
            max_attempts: Some(3),
        };
        let line = describe(&record(
            Decision::RetryScheduled { step: retry },
            Some(timed_out),
        ));
        assert!(
            line.starts_with("TIMED OUT after 30s (step 1 attempt 1/3)")
                && line.contains("⇒ RETRY in 4s → billing (step 1 attempt 2)"),
            "{line}"
        );
        let mut fallback = Step::new(2, "human_agent", 1);
        fallback.instead_of = Some("billing".into());
        let mut routed = record(
            Decision::Routed {
                steps: vec![fallback],
                decided_by: DecidedBy::Rule {
                    rule_id: "triage".into(),
                },
            },
            None,
        );
        routed.breakers.push(BreakerChange {
            card: "billing".into(),
            phase: BreakerPhase::Open,
            until: Some(61_000),
            probe: None,
        });
        let line = describe(&routed);
        assert!(
            line.contains("human_agent (step 2; BREAKER OPEN billing ⇒ fallback)")
                && line.contains("BREAKER OPEN billing for 1m"),
            "{line}"
        );
        assert_eq!(seconds(1_500), "1.5s");
        assert_eq!(seconds(90_000), "1m 30s");
    }
}

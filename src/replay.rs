//! Replay: re-run the router's decisions over recorded history, offline.
//!
//! The state topic is folded partition by partition exactly as a restoring router does. For each
//! recorded decision in range, the input is read again from the tasks topic, decoded and decided
//! anew with the given engine, and compared with what was recorded; the state then advances with
//! the *recorded* decision, so every later decision is judged against the history that really
//! happened. Decisions the LLM made are checked from the answer recorded with them: the answer
//! must still be allowed and lead to the same decision. Records that follow from a write the
//! broker refused are recorded facts, folded like the rest. Inputs are admitted as the router
//! admits them (size, signature); an input the state record refers to instead of copying must
//! still have the recorded SHA-256. Nothing is written to Kafka and no LLM is called.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rdkafka::message::Message;
use serde::Serialize;

use crate::codec::Codec;
use crate::envelope::{Decision, DecodeError, LlmRecord, StateEvent, TaskEvent};
use crate::error::{Error, Result};
use crate::kafka::{self, read_topic, KafkaConfig};
use crate::router::{Engine, Outcome, Raw};
use crate::signing::{sha256_hex, SIGNATURE_HEADER};
use crate::state::PartitionState;
use crate::state_record;

/// Which recorded decisions to check. The fold always starts at the beginning of each partition.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only decisions recorded at or after this state-topic offset (in every partition).
    pub from_offset: Option<i64>,
    /// Only decisions recorded at or after this time, ms since the Unix epoch.
    pub from_time: Option<i64>,
    /// Only this tenant's tasks.
    pub tenant: Option<String>,
    /// Only this task.
    pub task: Option<String>,
}

impl Filter {
    fn admits(&self, offset: i64, record: &StateEvent) -> bool {
        let tenant = record.event.as_ref().map(|e| e.tenant.as_str());
        self.from_offset.is_none_or(|o| offset >= o)
            && self.from_time.is_none_or(|t| record.at >= t)
            && self.tenant.as_deref().is_none_or(|t| tenant == Some(t))
            && self.task.as_deref().is_none_or(|t| record.task_id == t)
    }
}

/// One decision that the replay decided differently from the record.
#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    /// The task.
    pub task_id: String,
    /// State-topic partition.
    pub partition: i32,
    /// State-topic offset of the recorded decision.
    pub offset: i64,
    /// What was recorded.
    pub recorded: Decision,
    /// What the replay decided.
    pub replayed: Decision,
    /// A route-level summary of each, e.g. `ROUTED message_sender`.
    pub change: (String, String),
    /// Why the two differ when the decisions themselves agree (e.g. the recorded input copy).
    pub note: Option<String>,
}

/// What a replay found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// State records read.
    pub records: u64,
    /// Decisions decided again and compared.
    pub checked: u64,
    /// Records of fenced owners, ignored as a restoring router ignores them.
    pub fenced: u64,
    /// Decisions whose input was no longer in the tasks topic (the recorded copy was used).
    pub inputs_missing: u64,
    /// LLM decisions checked against their recorded answer (the LLM is never called).
    pub llm_recorded: u64,
    /// Decisions that follow from a write the broker refused (recorded facts, not re-decided).
    pub refused_writes: u64,
    /// Answers whose signature could not be checked: their card's secret is not set here.
    pub signatures_unchecked: u64,
    /// Decisions that follow from a recorded timer firing (decided again from the firing,
    /// never from the clock).
    pub timers_fired: u64,
    /// Every divergence.
    pub divergences: Vec<Divergence>,
}

impl Report {
    /// Divergences whose route-level summary differs (what a what-if rule change would alter).
    pub fn route_changes(&self) -> impl Iterator<Item = &Divergence> {
        self.divergences.iter().filter(|d| d.change.0 != d.change.1)
    }

    /// The tasks whose route changes, sorted.
    pub fn changed_tasks(&self) -> BTreeSet<&str> {
        self.route_changes().map(|d| d.task_id.as_str()).collect()
    }

    /// How often each route-level change happens: (recorded, replayed) → count.
    pub fn transitions(&self) -> BTreeMap<(String, String), u64> {
        let mut out = BTreeMap::new();
        for d in self.route_changes() {
            *out.entry(d.change.clone()).or_default() += 1;
        }
        out
    }

    /// Decisions that no rule of the replayed table would make (they would fall through to the
    /// LLM decider where one is configured, else to the dead-letter topic).
    pub fn unmatched(&self) -> u64 {
        self.route_changes()
            .filter(|d| matches!(&d.replayed, Decision::DeadLettered { reason, .. } if reason == "no_rule_matched"))
            .count() as u64
    }
}

/// A route-level summary of a decision: its type and the cards it sends work to.
pub fn summary(decision: &Decision) -> String {
    match decision {
        Decision::Routed { steps, .. } => {
            let cards: Vec<&str> = steps.iter().map(|s| s.card.as_str()).collect();
            format!("ROUTED {}", cards.join("+"))
        }
        Decision::Escalated { step, .. } => format!("ESCALATED {}", step.card),
        Decision::RetryScheduled { step } => format!("RETRY {}", step.card),
        Decision::DeadLettered { reason, .. } => format!("DEAD_LETTERED {reason}"),
        Decision::Dropped { reason } => format!("DROPPED {reason}"),
        other => other.name().to_string(),
    }
}

/// Replays the history of `kafka`'s topics with `engine`; `progress` is told the number of
/// records read so far and the total.
pub async fn replay(
    kafka: &KafkaConfig,
    codec: &Codec,
    engine: &Engine,
    filter: &Filter,
    mut progress: impl FnMut(u64),
) -> Result<Report> {
    let topics = kafka.topics();
    let mut raw: Vec<RawRecord> = Vec::new();
    read_topic(kafka, &topics.tasks(), None, |m| {
        let signature = kafka::header(m, SIGNATURE_HEADER).map(<[u8]>::to_vec);
        raw.push((
            (m.partition(), m.offset()),
            m.payload().map(<[u8]>::to_vec),
            signature,
        ));
    })?;
    let mut inputs: HashMap<(i32, i64), Input> = HashMap::with_capacity(raw.len());
    for (at, value, signature) in raw {
        let bytes = value.as_deref().unwrap_or_default();
        let decoded = match engine.too_large(bytes.len()) {
            Some(too_large) => Err(too_large),
            None => codec.decode_task_event(bytes).await,
        };
        let sha256 = decoded.is_err().then(|| sha256_hex(bytes));
        let size = bytes.len();
        let signed = signature.map(|s| (value.unwrap_or_default(), s));
        inputs.insert(
            at,
            Input {
                size,
                decoded,
                sha256,
                signed,
            },
        );
    }
    let state_topic = topics.state();
    let mut report = Report::default();
    let mut states: HashMap<i32, PartitionState> = HashMap::new();
    let mut corrupt = None;
    read_topic(kafka, &state_topic, None, |m| {
        if corrupt.is_some() {
            return;
        }
        let (partition, offset) = (m.partition(), m.offset());
        report.records += 1;
        progress(report.records);
        let records = match state_record::decode(m.payload().unwrap_or_default()) {
            Ok(r) => r,
            Err(e) => {
                corrupt = Some(Error::Corrupt {
                    topic: state_topic.clone(),
                    partition,
                    offset,
                    what: "state record",
                    message: e.to_string(),
                });
                return;
            }
        };
        let state = states.entry(partition).or_default();
        for record in records {
            let owned = matches!(record.decision, Decision::Owned { .. });
            if !owned
                && filter.admits(offset, &record)
                && state.epoch.is_none_or(|e| e == record.epoch)
            {
                report.checked += 1;
                let divergence = match (&record.input, &record.llm) {
                    _ if record.rejected.is_some() => {
                        report.refused_writes += 1;
                        None
                    }
                    _ if record.timer.is_some() => {
                        report.timers_fired += 1;
                        check_timer(engine, state, &record, (partition, offset))
                    }
                    (None, Some(call)) => {
                        report.llm_recorded += 1;
                        check_llm(engine, state, &record, call, (partition, offset))
                    }
                    _ => {
                        let input = record
                            .input
                            .as_ref()
                            .and_then(|i| inputs.get(&(i.partition, i.offset)));
                        if input.is_none() {
                            report.inputs_missing += 1;
                        }
                        let unchecked = input
                            .and_then(|i| i.decoded.as_ref().ok())
                            .is_some_and(|e| !record.dequeued && engine.unverifiable(state, e));
                        if unchecked {
                            report.signatures_unchecked += 1;
                        }
                        check(engine, state, &record, input, partition, offset)
                    }
                };
                report.divergences.extend(divergence);
            }
            if !state.restore(&record, offset) {
                report.fenced += 1;
            }
        }
    })?;
    match corrupt {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// Checks a decision that follows from a timer: the recorded firing, decided again against the
/// task as it was, must lead to the recorded decision.
fn check_timer(
    engine: &Engine,
    state: &PartitionState,
    record: &StateEvent,
    at: (i32, i64),
) -> Option<Divergence> {
    let firing = record.timer.as_ref()?;
    let outcome = match state.tasks.get(&record.task_id) {
        Some(task) => engine.fire(task, firing),
        None => Outcome::dead_letter(
            "not_active",
            "the recorded timer belongs to no active task",
            false,
        ),
    };
    let note = format!(
        "recorded firing: {} due at {}",
        firing.kind.as_str(),
        firing.due
    );
    judge(engine, state, record, outcome, (Some(note), None), at)
}

/// Checks a decision resolved by the LLM: the recorded answer, validated against the rule as it
/// is now, must lead to the recorded decision.
fn check_llm(
    engine: &Engine,
    state: &PartitionState,
    record: &StateEvent,
    call: &LlmRecord,
    at: (i32, i64),
) -> Option<Divergence> {
    let task = state.tasks.get(&record.task_id);
    let outcome = match task.filter(|t| t.awaiting.is_some()) {
        Some(task) => engine.resolve(task, call),
        None => Outcome::dead_letter(
            "not_awaiting_llm",
            "the recorded LLM answer belongs to no pending LLM decision",
            false,
        ),
    };
    let answer = call.agent.as_deref().or(call.error.as_deref());
    let note = format!("recorded LLM answer: {}", answer.unwrap_or("none"));
    judge(engine, state, record, outcome, (Some(note), None), at)
}

/// Compares `outcome`, decided again for `record` at `at` (state partition, offset), with what
/// was recorded, after the cards' circuit breakers as they stood at the record's time. It
/// diverges when the decision, the answered step or the breaker changes differ, or when
/// `problem` says something else does (e.g. the recorded input copy); `context` says what a
/// differing decision was decided from.
fn judge(
    engine: &Engine,
    state: &PartitionState,
    record: &StateEvent,
    outcome: Outcome,
    (context, problem): (Option<String>, Option<String>),
    (partition, offset): (i32, i64),
) -> Option<Divergence> {
    let cause = (record.event.as_ref().map(|e| e.kind), record.timer.as_ref());
    let outcome = engine.breakers(state, &record.task_id, cause, record.at, outcome);
    let problem = problem
        .or_else(|| {
            (outcome.answers_step != record.answers_step).then(|| {
                format!(
                    "answered step {:?} was recorded as {:?}",
                    outcome.answers_step, record.answers_step
                )
            })
        })
        .or_else(|| {
            (outcome.breakers != record.breakers).then(|| {
                format!(
                    "breaker changes {:?} were recorded as {:?}",
                    outcome.breakers, record.breakers
                )
            })
        });
    if outcome.decision == record.decision && problem.is_none() {
        return None;
    }
    Some(Divergence {
        task_id: record.task_id.clone(),
        partition,
        offset,
        change: (summary(&record.decision), summary(&outcome.decision)),
        recorded: record.decision.clone(),
        replayed: outcome.decision,
        note: problem.or(context),
    })
}

/// Why the state record's copy of its input does not match the input as read, if it does not.
fn copy_note(record: &StateEvent, event: &TaskEvent) -> Option<String> {
    (record.event.as_ref() != Some(event))
        .then(|| "the input copy in the state record differs from the tasks topic".to_string())
}

/// A tasks-topic record as read: position, value and signature header.
type RawRecord = ((i32, i64), Option<Vec<u8>>, Option<Vec<u8>>);

/// A tasks-topic record as replay keeps it.
struct Input {
    /// Its value's size.
    size: usize,
    /// The event, or why it could not be decoded (or was too large to try).
    decoded: Result<TaskEvent, DecodeError>,
    /// Its value's SHA-256, for the records a state record refers to instead of copying.
    sha256: Option<String>,
    /// Its value and signature header, when it is signed.
    signed: Option<(Vec<u8>, Vec<u8>)>,
}

fn check(
    engine: &Engine,
    state: &PartitionState,
    record: &StateEvent,
    input: Option<&Input>,
    partition: i32,
    offset: i64,
) -> Option<Divergence> {
    let (outcome, note) = match input {
        Some(input) if record.dequeued => match &input.decoded {
            Ok(event) => (
                engine.decide_dequeued(state, event),
                copy_note(record, event),
            ),
            Err(e) => (Outcome::undecodable(e), None),
        },
        Some(input) => {
            let raw = Raw {
                size: input.size,
                value: input.signed.as_ref().map(|(v, _)| v.as_slice()),
                signature: input.signed.as_ref().map(|(_, s)| s.as_slice()),
                // Admission measures the event's JSON form: what it decides is the same.
                json: false,
            };
            let moved = record
                .input
                .as_ref()
                .and_then(|i| i.sha256.as_ref())
                .filter(|recorded| input.sha256.as_ref() != Some(*recorded))
                .map(|_| {
                    "the input at this position is not the one recorded (its SHA-256 differs)"
                        .to_string()
                });
            match (
                engine.refusal(state, raw, input.decoded.as_ref()),
                &input.decoded,
            ) {
                (Some((_, outcome)), _) => (outcome, moved),
                (None, Ok(event)) => {
                    let note = moved.or_else(|| copy_note(record, event));
                    (engine.decide(state, event), note)
                }
                (None, Err(e)) => (Outcome::undecodable(e), moved),
            }
        }
        None => match &record.event {
            Some(event) if record.dequeued => (engine.decide_dequeued(state, event), None),
            Some(event) => (engine.decide(state, event), None),
            None => (
                Outcome::undecodable(&DecodeError::NotJson("input missing".into())),
                None,
            ),
        },
    };
    judge(
        engine,
        state,
        record,
        outcome,
        (None, note),
        (partition, offset),
    )
}

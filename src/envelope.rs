//! The records that travel on switchyard's topics: task events, work items, state events and the
//! headers of dead letters.
//!
//! Records are JSON in this version (`content-type: application/json`). Unknown fields are ignored so
//! that newer producers do not break older routers; the Avro schemas in `schemas/` describe the
//! same records.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The content type of JSON payloads, the default.
pub const JSON: &str = "application/json";

/// What a task event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    /// A client submitted a new task.
    Submitted,
    /// An agent finished a step.
    Result,
    /// An agent gave up on a step.
    Failed,
    /// A human answered an escalated step.
    HumanDecision,
    /// A client cancelled the task.
    Cancel,
}

impl EventKind {
    /// Every kind, in the spelling used on the wire.
    pub const ALL: [&'static str; 5] =
        ["SUBMITTED", "RESULT", "FAILED", "HUMAN_DECISION", "CANCEL"];

    /// The kind as spelled on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Submitted => "SUBMITTED",
            EventKind::Result => "RESULT",
            EventKind::Failed => "FAILED",
            EventKind::HumanDecision => "HUMAN_DECISION",
            EventKind::Cancel => "CANCEL",
        }
    }
}

/// Tokens and cost reported with a result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Usage {
    /// Prompt tokens.
    #[serde(default)]
    pub tokens_in: u64,
    /// Completion tokens.
    #[serde(default)]
    pub tokens_out: u64,
    /// Cost in the operator's currency.
    #[serde(default)]
    pub cost: f64,
}

impl Usage {
    /// Adds `other` to this usage.
    pub fn add(&mut self, other: &Usage) {
        self.tokens_in += other.tokens_in;
        self.tokens_out += other.tokens_out;
        self.cost += other.cost;
    }

    /// Prompt and completion tokens.
    pub fn tokens(&self) -> u64 {
        self.tokens_in + self.tokens_out
    }
}

/// An event on the tasks topic: a submission, an agent's result or failure, a human decision, a
/// cancellation. Keyed by `task_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskEvent {
    /// Unique id of this event.
    pub event_id: String,
    /// The task this event belongs to; the record key.
    pub task_id: String,
    /// Tenant that owns the task.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// What happened.
    pub kind: EventKind,
    /// `client` or the name of the card that produced the event.
    #[serde(default)]
    pub source: String,
    /// The step this event answers (results, failures, human decisions).
    #[serde(default)]
    pub step_id: Option<u32>,
    /// The attempt of that step this event answers.
    #[serde(default)]
    pub attempt: Option<u32>,
    /// The user-defined payload: task input or agent output.
    #[serde(default)]
    pub payload: Value,
    /// The payload's content type.
    #[serde(default = "default_content_type")]
    pub content_type: String,
    /// The producer's confidence in a result, 0 to 1.
    #[serde(default)]
    pub confidence: Option<f64>,
    /// Tokens and cost spent on this event.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Higher runs first where agents honour it.
    #[serde(default)]
    pub priority: i32,
    /// Deadline, milliseconds since the Unix epoch.
    #[serde(default)]
    pub deadline: Option<i64>,
    /// Free-form labels rules can match on.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Creation time, milliseconds since the Unix epoch.
    #[serde(default)]
    pub created_at: i64,
}

fn default_tenant() -> String {
    "default".to_string()
}

fn default_content_type() -> String {
    JSON.to_string()
}

impl TaskEvent {
    /// A new event of `kind` for `task_id` with a fresh event id and the current time.
    pub fn new(task_id: impl Into<String>, kind: EventKind, source: impl Into<String>) -> Self {
        Self {
            event_id: uuid::Uuid::new_v4().to_string(),
            task_id: task_id.into(),
            tenant: default_tenant(),
            kind,
            source: source.into(),
            step_id: None,
            attempt: None,
            payload: Value::Null,
            content_type: default_content_type(),
            confidence: None,
            usage: None,
            priority: 0,
            deadline: None,
            labels: BTreeMap::new(),
            created_at: now_ms(),
        }
    }
}

/// Why a task event could not be decoded; the `reason` is the dead-letter reason code.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a JSON object.
    #[error("record is not a JSON object: {0}")]
    NotJson(String),
    /// `kind` holds a value outside [`EventKind::ALL`].
    #[error(
        "unknown event kind `{0}`; allowed: SUBMITTED, RESULT, FAILED, HUMAN_DECISION, CANCEL"
    )]
    UnknownKind(String),
    /// A field is missing or has the wrong type.
    #[error("invalid task event: {0}")]
    Invalid(String),
    /// Avro: not in the Confluent wire format.
    #[error("not an Avro record in the Confluent wire format: {0}")]
    BadMagic(String),
    /// Avro: the schema id is not in the registry.
    #[error("unknown schema: {0}")]
    UnknownSchema(String),
    /// Avro: the datum does not decode with its schema.
    #[error("corrupt Avro datum: {0}")]
    CorruptDatum(String),
    /// The event is larger than the rule table's `max_event_bytes`, as read or as it would be
    /// recorded.
    #[error("the event is {size} bytes {form}, over the limit of {limit} (`max_event_bytes` of the rule table)")]
    TooLarge {
        /// Its size.
        size: usize,
        /// `as read` or `as recorded`.
        form: &'static str,
        /// The limit.
        limit: usize,
    },
}

impl DecodeError {
    /// The dead-letter reason code of this error.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::NotJson(_) => "deserialization",
            DecodeError::UnknownKind(_) => "unknown_kind",
            DecodeError::Invalid(_) => "invalid_event",
            DecodeError::BadMagic(_) => "bad_magic_byte",
            DecodeError::UnknownSchema(_) => "unknown_schema_id",
            DecodeError::CorruptDatum(_) => "corrupt_datum",
            DecodeError::TooLarge { .. } => "too_large",
        }
    }
}

/// `bytes` decoded as JSON, as `serde_json::from_slice` does. UTF-8 text is checked once, as a
/// whole, and decoded as text: decoding bytes checks each string on its own, which cost about a
/// quarter of decoding the routing benchmark's events (`scripts/bench-decide --instructions`).
/// Bytes that are not UTF-8 fail as they always did.
pub fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

/// Decodes a task event, telling garbage, unknown kinds and invalid fields apart.
pub fn decode_task_event(bytes: &[u8]) -> Result<TaskEvent, DecodeError> {
    read_task_event(bytes).map(|(event, _)| event)
}

/// [`decode_task_event`], and whether `bytes` are the event's JSON text as a state record may
/// copy it: they decoded in one pass as the event, as the event nested in a state record is
/// decoded again (a text with a field given twice, say, decodes only the long way, and is not).
pub fn read_task_event(bytes: &[u8]) -> Result<(TaskEvent, bool), DecodeError> {
    // The common case in one pass: a well-formed object straight into the struct. Anything it
    // does not take (and a struct written as an array, which only this pass would) goes the
    // long way, which accepts the same events and names what is wrong with the others.
    // Only UTF-8 text: decoding bytes into the struct skips an unknown field's string without
    // checking it, where the long way refuses it (see [`from_json`] for the cost of checking).
    let text = std::str::from_utf8(bytes).ok();
    if let Some(text) = text.filter(|t| t.trim_ascii_start().starts_with('{')) {
        if let Ok(event) = serde_json::from_str::<TaskEvent>(text) {
            if !event.task_id.is_empty() {
                return Ok((event, true));
            }
        }
    }
    let value: Value = from_json(bytes).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let Some(object) = value.as_object() else {
        return Err(DecodeError::NotJson("top level is not an object".into()));
    };
    if let Some(kind) = object.get("kind").and_then(Value::as_str) {
        if !EventKind::ALL.contains(&kind) {
            return Err(DecodeError::UnknownKind(kind.to_string()));
        }
    }
    let event: TaskEvent =
        serde_json::from_value(value).map_err(|e| DecodeError::Invalid(e.to_string()))?;
    if event.task_id.is_empty() {
        return Err(DecodeError::Invalid("`task_id` is empty".into()));
    }
    Ok((event, false))
}

/// A unit of work for one agent card, written to the card's inbox topic. Keyed by `task_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkItem {
    /// The task.
    pub task_id: String,
    /// Tenant that owns the task.
    pub tenant: String,
    /// Stable id of the step within the task; agents and the router dedupe on (task, step, attempt).
    pub step_id: u32,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// The card that should act.
    pub card: String,
    /// The task's input payload.
    pub input: Value,
    /// Bounded context: the latest output of each card that has answered so far.
    pub context: BTreeMap<String, Value>,
    /// The task's labels.
    pub labels: BTreeMap<String, String>,
    /// Deadline, milliseconds since the Unix epoch.
    pub deadline: Option<i64>,
    /// The tasks-topic partition to publish the result to (the task's partition).
    pub reply_partition: i32,
}

impl WorkItem {
    /// The item borrowed.
    pub fn borrowed(&self) -> WorkItemRef<'_> {
        WorkItemRef {
            task_id: &self.task_id,
            tenant: &self.tenant,
            step_id: self.step_id,
            attempt: self.attempt,
            card: &self.card,
            input: &self.input,
            context: &self.context,
            labels: &self.labels,
            deadline: self.deadline,
            reply_partition: self.reply_partition,
        }
    }
}

/// A [`WorkItem`] borrowed from the task it is for, so that the router writes it without copying
/// the task's input, context and labels; it serializes to the same JSON as the owned item. Its
/// context is the task's outputs, or `C`: any other map that serializes as the context would
/// (admission measures a work item with an answer not yet folded in, see `router::guard`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WorkItemRef<'a, C = &'a BTreeMap<String, Value>> {
    /// The task.
    pub task_id: &'a str,
    /// Tenant that owns the task.
    pub tenant: &'a str,
    /// Stable id of the step within the task.
    pub step_id: u32,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// The card that should act.
    pub card: &'a str,
    /// The task's input payload.
    pub input: &'a Value,
    /// The latest output of each card that has answered so far.
    pub context: C,
    /// The task's labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Deadline, milliseconds since the Unix epoch.
    pub deadline: Option<i64>,
    /// The tasks-topic partition to publish the result to.
    pub reply_partition: i32,
}

impl WorkItemRef<'_> {
    /// The owned work item.
    pub fn to_item(self) -> WorkItem {
        WorkItem {
            task_id: self.task_id.to_string(),
            tenant: self.tenant.to_string(),
            step_id: self.step_id,
            attempt: self.attempt,
            card: self.card.to_string(),
            input: self.input.clone(),
            context: self.context.clone(),
            labels: self.labels.clone(),
            deadline: self.deadline,
            reply_partition: self.reply_partition,
        }
    }
}

/// Where a state event's input came from. A record that does not copy its input (it could not
/// be decoded, or it is too large to copy) refers to it by position, size and SHA-256, which
/// replay, audit and redrive follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InputRef {
    /// The input event's id, when it could be decoded.
    pub event_id: Option<String>,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Size of the record's value in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Hex SHA-256 of the record's value, when the state record does not copy the input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// What kind of timer fell due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// The task's `deadline` passed.
    Deadline,
    /// A step's attempt got no answer within its card's `timeout`.
    StepTimeout,
    /// A step waiting to be sent (a retry's backoff, or its card's open breaker) may go now.
    Dispatch,
    /// A human card's step got no answer within its escalation's `timeout`.
    HumanTimeout,
    /// A human card's step waits longer than its escalation's `remind_every`: notify again.
    Reminder,
}

impl TimerKind {
    /// The kind as written on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            TimerKind::Deadline => "deadline",
            TimerKind::StepTimeout => "step_timeout",
            TimerKind::Dispatch => "dispatch",
            TimerKind::HumanTimeout => "human_timeout",
            TimerKind::Reminder => "reminder",
        }
    }
}

/// A timer that fell due, recorded as the input of the decision that follows from it: restore
/// and replay read the firing, never the clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Firing {
    /// What fell due.
    pub kind: TimerKind,
    /// When it was due, milliseconds since the Unix epoch (the record's `at` is when it fired).
    pub due: i64,
    /// The step the timer belongs to (every kind but a deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<u32>,
    /// The step's attempt the timer belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// How long the step had to answer, ms (a step or human timeout), for the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<i64>,
    /// The attempts the step's card allows in all (a step timeout), for the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// A record the broker refused for good (too large for the topic, invalid, no such topic),
/// recorded with the decision that follows from it, so that restore and replay know that the
/// earlier decision's writes did not all happen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Rejection {
    /// The topic the record was for.
    pub topic: String,
    /// The step whose work item it was.
    pub step_id: Option<u32>,
    /// The record's size in bytes.
    pub bytes: u64,
    /// The producer's error.
    pub error: String,
}

/// One step a decision creates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Step {
    /// Step id within the task.
    pub step_id: u32,
    /// The card that acts.
    pub card: String,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// When set, the work item is sent this many ms after the decision, not at once: a retry's
    /// backoff, or the open circuit breaker of the step's card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<i64>,
    /// The card whose open circuit breaker sent this step to `card`, its fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instead_of: Option<String>,
}

impl Step {
    /// A step whose work item is sent at once.
    pub fn new(step_id: u32, card: impl Into<String>, attempt: u32) -> Self {
        Self {
            step_id,
            card: card.into(),
            attempt,
            delay_ms: None,
            instead_of: None,
        }
    }
}

/// Who made a routing decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum DecidedBy {
    /// A rule of the rule table.
    Rule {
        /// The rule's id.
        rule_id: String,
    },
    /// The card's failure policy sent the step to its fallback card.
    Fallback {
        /// The card that failed.
        failed_card: String,
    },
    /// The LLM decider chose the card, as the rule allowed; the call is in the record's `llm`.
    Llm {
        /// The rule that asked the LLM.
        rule_id: String,
    },
    /// The LLM decider failed and the rule's fallback decided.
    LlmFallback {
        /// The rule that asked the LLM.
        rule_id: String,
        /// Why the LLM's answer was not used, e.g. `timeout` or `unknown_agent`.
        reason: String,
    },
}

impl DecidedBy {
    /// What decided, as a metric label: `rule`, `fallback`, `llm` or `llm_fallback`.
    pub fn source(&self) -> &'static str {
        match self {
            DecidedBy::Rule { .. } => "rule",
            DecidedBy::Fallback { .. } => "fallback",
            DecidedBy::Llm { .. } => "llm",
            DecidedBy::LlmFallback { .. } => "llm_fallback",
        }
    }

    /// The rule that decided, or the card whose failure sent the step to its fallback.
    pub fn subject(&self) -> &str {
        match self {
            DecidedBy::Rule { rule_id }
            | DecidedBy::Llm { rule_id }
            | DecidedBy::LlmFallback { rule_id, .. } => rule_id,
            DecidedBy::Fallback { failed_card } => failed_card,
        }
    }
}

/// What the router decided for one input event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Decision {
    /// An instance took over the partition; the record's offset is its epoch.
    Owned {
        /// The instance that took over.
        instance: String,
    },
    /// New steps were created and work items sent to their cards.
    Routed {
        /// The new steps.
        steps: Vec<Step>,
        /// Rule or policy that decided.
        decided_by: DecidedBy,
    },
    /// A result was recorded; the task waits for other steps (a join).
    Recorded,
    /// A rule asked the LLM decider; the decision follows in a later record of the same task
    /// (one with `llm` set). Later events of the task are queued until then.
    AwaitingLlm {
        /// The rule that asked.
        rule_id: String,
    },
    /// The task is waiting for the LLM; the event is decided, in order, once the answer is
    /// recorded (by a record with `dequeued` set).
    Queued,
    /// The task completed.
    Completed {
        /// The rule that completed it.
        rule_id: String,
    },
    /// The task was escalated to a human card.
    Escalated {
        /// The human card's step.
        step: Step,
        /// The rule that escalated.
        rule_id: String,
    },
    /// A failed or timed-out step is tried again: at once, or after the step's `delay_ms` (its
    /// card's backoff).
    RetryScheduled {
        /// The step with its new attempt number.
        step: Step,
    },
    /// A step that waited (backoff, open breaker) was sent, or, with `delay_ms` set again,
    /// waits longer because its card's breaker is still open.
    Dispatched {
        /// The step.
        step: Step,
    },
    /// A human card's step still has no answer: its work item is sent again as a reminder.
    Reminded {
        /// The step.
        step: Step,
    },
    /// The input went to the dead-letter topic.
    DeadLettered {
        /// Reason code.
        reason: String,
        /// Human-readable explanation.
        message: String,
        /// Whether the task ended with this decision.
        ends_task: bool,
    },
    /// A stale or duplicate result, counted and dropped.
    Dropped {
        /// Reason code.
        reason: String,
    },
    /// The task was cancelled.
    Cancelled,
}

impl Decision {
    /// The steps this decision creates, tries again or sends again.
    pub fn steps(&self) -> &[Step] {
        match self {
            Decision::Routed { steps, .. } => steps,
            Decision::Escalated { step, .. }
            | Decision::RetryScheduled { step }
            | Decision::Dispatched { step }
            | Decision::Reminded { step } => std::slice::from_ref(step),
            _ => &[],
        }
    }

    /// The decision's type as written on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Owned { .. } => "OWNED",
            Decision::Routed { .. } => "ROUTED",
            Decision::Recorded => "RECORDED",
            Decision::AwaitingLlm { .. } => "AWAITING_LLM",
            Decision::Queued => "QUEUED",
            Decision::Completed { .. } => "COMPLETED",
            Decision::Escalated { .. } => "ESCALATED",
            Decision::RetryScheduled { .. } => "RETRY_SCHEDULED",
            Decision::Dispatched { .. } => "DISPATCHED",
            Decision::Reminded { .. } => "REMINDED",
            Decision::DeadLettered { .. } => "DEAD_LETTERED",
            Decision::Dropped { .. } => "DROPPED",
            Decision::Cancelled => "CANCELLED",
        }
    }
}

/// One decision about one input event, as the state topic records it: a record's value is one
/// state event, or a JSON array of several of one partition (see [`crate::state_record`]). The
/// state topic is the event-sourced source of truth of the router; folding it restores every
/// task's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StateEvent {
    /// The task (empty for ownership records and undecodable input).
    pub task_id: String,
    /// Per-task sequence number, from 1.
    pub seq: u64,
    /// Ownership epoch of the writer: the offset of its ownership record.
    pub epoch: i64,
    /// The instance that wrote this record.
    pub instance: String,
    /// The input this decision answers.
    pub input: Option<InputRef>,
    /// The input event. Written as the input's own text when that was JSON read in one pass
    /// (fields switchyard does not know stay in it; it decodes to the same event), else encoded.
    pub event: Option<TaskEvent>,
    /// The step the input answered, as resolved by the router.
    pub answers_step: Option<u32>,
    /// What was decided.
    pub decision: Decision,
    /// The LLM call this decision resolves, when it resolves an `AWAITING_LLM` record: the
    /// decision is taken from this record on restore and replay, never asked again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmRecord>,
    /// Whether this decides a queued event (the oldest of its task's queue).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dequeued: bool,
    /// The write the broker refused, when this record decides what follows from that (it has
    /// no input of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Rejection>,
    /// The timer that fell due, when this record decides what follows from that (it has no
    /// input of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer: Option<Firing>,
    /// Circuit breakers this decision opened or closed (see [`BreakerChange`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub breakers: Vec<BreakerChange>,
    /// The W3C `traceparent` of this decision's span: decisions that follow without an input of
    /// their own (timers, LLM answers) continue the trace from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// When, milliseconds since the Unix epoch.
    pub at: i64,
}

/// Where a card's circuit breaker stands after a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BreakerPhase {
    /// Work goes to the card.
    Closed,
    /// Work goes to the card's fallback, or waits, until `until`.
    Open,
    /// One probe step was let through; other work is held back as while open.
    HalfOpen,
}

/// A change of one card's circuit breaker in this partition, recorded with the decision that
/// made it, so that restore and replay hold the same breakers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BreakerChange {
    /// The card.
    pub card: String,
    /// Where the breaker stands now.
    pub phase: BreakerPhase,
    /// Until when an open breaker stays open, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// The probe step of a half-open breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<u32>,
}

impl StateEvent {
    /// The record of `decision` about `task_id`, number `seq`, written by `instance` in `epoch`
    /// at `at`, with no input, event, LLM call, refusal, timer or breaker change.
    pub fn new(
        task_id: impl Into<String>,
        seq: u64,
        (epoch, instance): (i64, &str),
        decision: Decision,
        at: i64,
    ) -> Self {
        Self {
            task_id: task_id.into(),
            seq,
            epoch,
            instance: instance.to_string(),
            input: None,
            event: None,
            answers_step: None,
            decision,
            llm: None,
            dequeued: false,
            rejected: None,
            timer: None,
            breakers: Vec::new(),
            trace: None,
            at,
        }
    }

    /// The ownership record of `instance` taking a partition over at `at`: its offset becomes
    /// the new owner's epoch.
    pub fn owned(instance: &str, at: i64) -> Self {
        let decision = Decision::Owned {
            instance: instance.to_string(),
        };
        Self::new("", 0, (-1, instance), decision, at)
    }

    /// Whether this record resolves a pending LLM decision (rather than deciding an input): it
    /// has the call and no input of its own. Its event is the one that asked, already counted.
    pub fn resolves_llm(&self) -> bool {
        self.llm.is_some() && self.input.is_none()
    }

    /// The event's own usage that this record adds to its task: none for a resolution (its event
    /// was counted when it asked) or a queued event (counted when it is dequeued). The LLM call's
    /// usage, in `llm`, is added besides.
    pub fn event_usage(&self) -> Option<&Usage> {
        let counted_elsewhere = self.resolves_llm() || self.decision == Decision::Queued;
        self.event
            .as_ref()
            .and_then(|e| e.usage.as_ref())
            .filter(|_| !counted_elsewhere)
    }
}

/// One call of the LLM decider, as recorded with the decision it led to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LlmRecord {
    /// The model that answered (as the endpoint named it).
    pub model: String,
    /// The last raw answer, truncated to 2,000 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// The validated choice: a candidate card, `COMPLETE` or `HUMAN`. `None` when the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The model's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The model's confidence, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
    /// Tokens and cost of every attempt (cost from the configured prices).
    #[serde(flatten)]
    pub usage: Usage,
    /// Time from the first request to the last answer, milliseconds.
    #[serde(default)]
    pub latency_ms: u64,
    /// Requests made (0 when the circuit breaker or the budget short-cut the call).
    #[serde(default)]
    pub attempts: u32,
    /// Why the answer was not used: `timeout`, `http_error`, `invalid_json`, `unknown_agent`,
    /// `circuit_open`, `budget_exceeded`. `None` when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last error's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_unknown_kind_and_invalid_events_are_told_apart() {
        assert_eq!(
            decode_task_event(b"\x00\xff").unwrap_err().reason(),
            "deserialization"
        );
        let unknown = br#"{"event_id":"e","task_id":"t","kind":"EXPLODE"}"#;
        assert_eq!(
            decode_task_event(unknown).unwrap_err().reason(),
            "unknown_kind"
        );
        let no_task = br#"{"event_id":"e","kind":"SUBMITTED"}"#;
        assert_eq!(
            decode_task_event(no_task).unwrap_err().reason(),
            "invalid_event"
        );
    }

    /// The one-pass decode accepts and refuses exactly what parsing into a `Value` first does.
    #[test]
    fn the_one_pass_decode_agrees_with_the_long_way() {
        fn long_way(bytes: &[u8]) -> Result<TaskEvent, String> {
            let value: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
            if !value.is_object() {
                return Err("not an object".into());
            }
            let event: TaskEvent = serde_json::from_value(value).map_err(|e| e.to_string())?;
            match event.task_id.is_empty() {
                true => Err("empty task".into()),
                false => Ok(event),
            }
        }
        let cases: [&[u8]; 11] = [
            br#"{"event_id":"e","task_id":"t","kind":"SUBMITTED","payload":{"a":[1,2.5,"x"]}}"#,
            b"{\"event_id\":\"e\",\"task_id\":\"t\xff\",\"kind\":\"SUBMITTED\"}",
            b"{\"event_id\":\"e\",\"task_id\":\"t\",\"kind\":\"SUBMITTED\",\"x\":\"\xc3\"}",
            "{\"event_id\":\"\u{e9}\u{1f600}\",\"task_id\":\"t\",\"kind\":\"SUBMITTED\"}"
                .as_bytes(),
            br#"  {"event_id":"e","task_id":"t","kind":"SUBMITTED"}"#,
            br#"{"event_id":"e","task_id":"t","task_id":"u","kind":"SUBMITTED"}"#,
            br#"["e","t","default","SUBMITTED"]"#,
            br#"{"event_id":"e","task_id":"","kind":"SUBMITTED"}"#,
            br#"{"event_id":"e","task_id":"t","kind":"EXPLODE"}"#,
            br#"{"event_id":"e","task_id":"t","kind":"SUBMITTED"} trailing"#,
            br#"{"event_id":"e","task_id":"t","kind":"SUBMITTED","surprise":1}"#,
        ];
        for bytes in cases {
            let text = String::from_utf8_lossy(bytes);
            let (one, long) = (decode_task_event(bytes).ok(), long_way(bytes).ok());
            assert_eq!(one, long, "{text}");
        }
    }

    #[test]
    fn only_a_text_read_in_one_pass_may_be_copied() {
        let one = br#"{"event_id":"e","task_id":"t","kind":"SUBMITTED","surprise":1}"#;
        assert!(read_task_event(one).unwrap().1);
        let twice = br#"{"event_id":"e","task_id":"t","task_id":"u","kind":"SUBMITTED"}"#;
        let (event, verbatim) = read_task_event(twice).unwrap();
        assert_eq!(event.task_id, "u", "the long way takes the last");
        assert!(
            !verbatim,
            "a state record could not be read back with the field twice"
        );
        assert!(serde_json::from_slice::<TaskEvent>(twice).is_err());
    }

    #[test]
    fn minimal_event_gets_defaults() {
        let e = decode_task_event(br#"{"event_id":"e","task_id":"t","kind":"SUBMITTED"}"#).unwrap();
        assert_eq!(e.tenant, "default");
        assert_eq!(e.content_type, JSON);
        assert_eq!(e.kind, EventKind::Submitted);
    }

    #[test]
    fn state_event_round_trips() {
        let s = StateEvent {
            task_id: "t".into(),
            seq: 1,
            epoch: 7,
            instance: "i".into(),
            input: None,
            event: None,
            answers_step: Some(2),
            decision: Decision::Routed {
                steps: vec![Step::new(3, "a", 1)],
                decided_by: DecidedBy::Rule {
                    rule_id: "r".into(),
                },
            },
            llm: None,
            dequeued: false,
            rejected: None,
            timer: None,
            breakers: Vec::new(),
            trace: None,
            at: 0,
        };
        let bytes = serde_json::to_vec(&s).unwrap();
        assert_eq!(serde_json::from_slice::<StateEvent>(&bytes).unwrap(), s);
    }
}

//! The rule table: what happens after each event.
//!
//! Rules are checked in order and the first whose `when` holds decides (`then`). The table is
//! checked at load time: unknown cards, rules that an earlier rule always shadows, cards that are
//! routed to but whose results no rule handles, and cycles with no way out are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use schemars::JsonSchema;
use serde::de::{self, Deserializer, IntoDeserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cards::Cards;
use crate::envelope::EventKind;

/// Errors loading a rule table: the file and what is wrong.
pub use crate::files::{Error, Result};

/// A numeric comparison; every bound that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Compare {
    /// Greater than.
    pub gt: Option<f64>,
    /// Greater than or equal.
    pub gte: Option<f64>,
    /// Less than.
    pub lt: Option<f64>,
    /// Less than or equal.
    pub lte: Option<f64>,
    /// Equal.
    pub eq: Option<f64>,
}

impl Compare {
    fn is_empty(&self) -> bool {
        self.gt.is_none()
            && self.gte.is_none()
            && self.lt.is_none()
            && self.lte.is_none()
            && self.eq.is_none()
    }

    /// Whether `x` satisfies every bound.
    pub fn holds(&self, x: f64) -> bool {
        self.gt.is_none_or(|b| x > b)
            && self.gte.is_none_or(|b| x >= b)
            && self.lt.is_none_or(|b| x < b)
            && self.lte.is_none_or(|b| x <= b)
            && self.eq.is_none_or(|b| x == b)
    }
}

/// A condition on one field of the payload, addressed by a JSON pointer (RFC 6901).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PayloadCondition {
    /// JSON pointer into the payload, e.g. `/intent` or `/scores/0`.
    pub pointer: String,
    /// The field equals this value.
    pub eq: Option<Value>,
    /// The field differs from this value (or is absent).
    pub ne: Option<Value>,
    /// The field is one of these values.
    #[serde(rename = "in")]
    pub one_of: Option<Vec<Value>>,
    /// The field is present (`true`) or absent (`false`).
    pub exists: Option<bool>,
    /// The field is a number that satisfies these bounds.
    #[serde(flatten)]
    pub number: Compare,
}

impl PayloadCondition {
    /// Whether `payload` satisfies the condition.
    pub fn holds(&self, payload: &Value) -> bool {
        let field = payload.pointer(&self.pointer);
        self.exists.is_none_or(|e| e == field.is_some())
            && self.eq.as_ref().is_none_or(|v| field == Some(v))
            && self.ne.as_ref().is_none_or(|v| field != Some(v))
            && self
                .one_of
                .as_ref()
                .is_none_or(|vs| field.is_some_and(|f| vs.contains(f)))
            && (self.number.is_empty()
                || field
                    .and_then(Value::as_f64)
                    .is_some_and(|x| self.number.holds(x)))
    }
}

/// What a rule can be about: the kind of a task event, or what a timer made of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Kind {
    /// A client submitted a new task.
    Submitted,
    /// An agent finished a step.
    Result,
    /// An agent gave up on a step, and its card has no attempt or fallback left.
    Failed,
    /// A human answered an escalated step.
    HumanDecision,
    /// A client cancelled the task (always cancels; listed for completeness).
    Cancel,
    /// A step got no answer in time, and its card has no attempt or fallback left. The default
    /// without a rule: dead letter `step_timeout`.
    TimedOut,
    /// The task's `deadline` passed; its pending steps are abandoned. The default without a
    /// rule: dead letter `deadline_exceeded`.
    DeadlineExceeded,
}

impl From<EventKind> for Kind {
    fn from(kind: EventKind) -> Self {
        match kind {
            EventKind::Submitted => Kind::Submitted,
            EventKind::Result => Kind::Result,
            EventKind::Failed => Kind::Failed,
            EventKind::HumanDecision => Kind::HumanDecision,
            EventKind::Cancel => Kind::Cancel,
        }
    }
}

impl Kind {
    /// Whether a rule about this kind starts work of its own rather than answering a card:
    /// a submission or a timer.
    fn starts(self) -> bool {
        matches!(
            self,
            Kind::Submitted | Kind::TimedOut | Kind::DeadlineExceeded
        )
    }
}

/// When a rule applies. Every condition that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// Kinds (one or a list): `SUBMITTED`, `RESULT`, `FAILED`, `HUMAN_DECISION`, `CANCEL`,
    /// `TIMED_OUT`, `DEADLINE_EXCEEDED`. Default: `RESULT` and `HUMAN_DECISION`.
    #[serde(default, deserialize_with = "one_or_many")]
    #[schemars(with = "crate::schema::OneOrMany<Kind>")]
    pub kind: Vec<Kind>,
    /// The card whose step the event answers (one or a list).
    #[serde(default, deserialize_with = "one_or_many")]
    #[schemars(with = "crate::schema::OneOrMany<String>")]
    pub source: Vec<String>,
    /// Join after fan-out: the event answers one of these cards and the latest step of every one
    /// of them has finished.
    #[serde(default)]
    pub join: Vec<String>,
    /// Task labels that must be present with these values.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Bounds on the attempt number of the answered step.
    pub attempt: Option<Compare>,
    /// Bounds on the event's confidence (an event without one never matches).
    pub confidence: Option<Compare>,
    /// Conditions on payload fields.
    #[serde(default)]
    pub payload: Vec<PayloadCondition>,
}

impl When {
    /// The kinds this condition matches, with the default applied.
    pub fn kinds(&self) -> Vec<Kind> {
        if self.kind.is_empty() {
            vec![Kind::Result, Kind::HumanDecision]
        } else {
            self.kind.clone()
        }
    }

    /// The cards whose results this condition can match; `None` means any card.
    fn sources(&self) -> Option<BTreeSet<&str>> {
        let sources: BTreeSet<&str> = self.source.iter().map(String::as_str).collect();
        let join: BTreeSet<&str> = self.join.iter().map(String::as_str).collect();
        match (sources.is_empty(), join.is_empty()) {
            (true, true) => None,
            (false, true) => Some(sources),
            (true, false) => Some(join),
            (false, false) => Some(sources.intersection(&join).copied().collect()),
        }
    }

    /// Whether `self` matches every event that `other` matches.
    fn covers(&self, other: &When) -> bool {
        let kinds = self.kinds();
        let sources_cover = match (self.sources(), other.sources()) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => theirs.is_subset(&mine),
        };
        other.kinds().iter().all(|k| kinds.contains(k))
            && sources_cover
            && (self.join.is_empty() || self.join == other.join)
            && self
                .labels
                .iter()
                .all(|(k, v)| other.labels.get(k) == Some(v))
            && (self.attempt.is_none() || self.attempt == other.attempt)
            && (self.confidence.is_none() || self.confidence == other.confidence)
            && self.payload.iter().all(|c| other.payload.contains(c))
    }
}

/// What a rule does: `complete`, `{route: [cards]}`, `{escalate: card}`, `{dead_letter: reason}`
/// or `{llm: {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Send work items to these cards (several = fan-out).
    Route(Vec<String>),
    /// The task is done.
    Complete,
    /// Hand the task to a (human) card: `{escalate: card}`, or `{escalate: {card, timeout,
    /// then, remind_every}}` to bound the wait.
    Escalate(Escalation),
    /// Send the event to the dead-letter topic with this reason and end the task.
    DeadLetter(String),
    /// Ask the LLM decider which of the candidate cards acts next.
    Llm(Box<LlmRoute>),
}

const ACTIONS: &[&str] = &["route", "complete", "escalate", "dead_letter", "llm"];

/// An escalation to a (human) card, and how long it may wait for the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Escalation {
    /// The card that answers.
    pub card: String,
    /// How long the card has to answer, e.g. `4h`; no limit when absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<crate::schema::HumanDuration>")]
    pub timeout: Option<std::time::Duration>,
    /// What happens when `timeout` passes without an answer: `{route: [card]}`, `complete`,
    /// `{escalate: ...}`, `{dead_letter: reason}`, or `dead_letter` (reason `human_timeout`,
    /// the default). A late answer is then dropped as stale.
    #[serde(
        default,
        deserialize_with = "timeout_action",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<crate::schema::TimeoutAction>")]
    pub then: Option<Box<Action>>,
    /// Send the work item again this often while no answer came (before `timeout`), e.g. `1h`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<crate::schema::HumanDuration>")]
    pub remind_every: Option<std::time::Duration>,
}

impl Escalation {
    /// An escalation to `card` that waits without limit.
    pub fn to(card: impl Into<String>) -> Self {
        Self {
            card: card.into(),
            timeout: None,
            then: None,
            remind_every: None,
        }
    }
}

/// The dead-letter reason of an escalation whose timeout passed.
pub const HUMAN_TIMEOUT: &str = "human_timeout";

/// `then` of an escalation: an action, where the bare word `dead_letter` means reason
/// [`HUMAN_TIMEOUT`].
fn timeout_action<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<Box<Action>>, D::Error> {
    struct ThenVisitor;
    impl<'de> Visitor<'de> for ThenVisitor {
        type Value = Action;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(
                "`complete`, `dead_letter` or a map with one of `route`, `escalate`, `dead_letter`",
            )
        }
        fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Action, E> {
            match v {
                "dead_letter" => Ok(Action::DeadLetter(HUMAN_TIMEOUT.into())),
                other => Action::deserialize(other.into_deserializer()),
            }
        }
        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> std::result::Result<Action, A::Error> {
            Action::deserialize(de::value::MapAccessDeserializer::new(map))
        }
    }
    deserializer
        .deserialize_any(ThenVisitor)
        .map(|action| Some(Box::new(action)))
}

/// `escalate:` takes a card name or a map of [`Escalation`] fields.
fn escalation<'de, A: de::MapAccess<'de>>(
    map: &mut A,
) -> std::result::Result<Escalation, A::Error> {
    struct Repr(Escalation);
    impl<'de> Deserialize<'de> for Repr {
        fn deserialize<D: Deserializer<'de>>(
            deserializer: D,
        ) -> std::result::Result<Self, D::Error> {
            struct EscalationVisitor;
            impl<'de> Visitor<'de> for EscalationVisitor {
                type Value = Escalation;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str(
                        "a card name or a map with `card`, `timeout`, `then`, `remind_every`",
                    )
                }
                fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Escalation, E> {
                    Ok(Escalation::to(v))
                }
                fn visit_map<A: de::MapAccess<'de>>(
                    self,
                    map: A,
                ) -> std::result::Result<Escalation, A::Error> {
                    Escalation::deserialize(de::value::MapAccessDeserializer::new(map))
                }
            }
            deserializer.deserialize_any(EscalationVisitor).map(Repr)
        }
    }
    Ok(map.next_value::<Repr>()?.0)
}

/// An LLM routing decision: the model chooses among `candidates` (and `COMPLETE` / `HUMAN` where
/// allowed). Its answer is validated against exactly this set; anything else, an error, a timeout
/// or an open circuit breaker ends in `fallback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmRoute {
    /// The cards the model may choose from (at least one).
    pub candidates: Vec<String>,
    /// Whether the model may answer `COMPLETE`: the task is done.
    #[serde(default)]
    pub complete: bool,
    /// A human card the model may hand the task to by answering `HUMAN`.
    #[serde(default)]
    pub human: Option<String>,
    /// What to do when the LLM cannot decide (after its retries): `{route: card}`,
    /// `{escalate: card}`, `complete` or `{dead_letter: reason}`. Default: dead-letter the task
    /// with reason `llm_<why>`, e.g. `llm_timeout`.
    #[serde(default)]
    pub fallback: Option<Action>,
    /// Extra instructions for the model, appended to the system prompt.
    #[serde(default)]
    pub instructions: Option<String>,
}

impl LlmRoute {
    /// The answers the model may give: the candidates, then `COMPLETE` and `HUMAN` if allowed.
    pub fn allowed(&self) -> Vec<String> {
        let mut out = self.candidates.clone();
        if self.complete {
            out.push(COMPLETE.into());
        }
        if self.human.is_some() {
            out.push(HUMAN.into());
        }
        out
    }
}

/// The LLM's answer that completes the task.
pub const COMPLETE: &str = "COMPLETE";
/// The LLM's answer that hands the task to the rule's human card.
pub const HUMAN: &str = "HUMAN";

/// Tokens and cost one task may spend, counted from the usage of agents' results and of the LLM
/// decider's calls.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Most tokens (prompt + completion).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Most cost, in the currency of the configured prices.
    #[serde(default)]
    pub max_cost: Option<f64>,
    /// What happens to a task whose agent results take it over budget: `{escalate: card}`,
    /// `{route: card}`, `complete` or `{dead_letter: reason}`. Default: dead-letter with reason
    /// `budget_exceeded`. (An LLM rule of a task over budget uses the rule's own fallback.)
    #[serde(default)]
    pub fallback: Option<Action>,
}

impl Budget {
    /// Whether `tokens` and `cost` are over this budget.
    pub fn exceeded(&self, tokens: u64, cost: f64) -> bool {
        self.max_tokens.is_some_and(|m| tokens > m) || self.max_cost.is_some_and(|m| cost > m)
    }
}

impl Action {
    /// The cards this action may send work to.
    pub fn targets(&self) -> Vec<&str> {
        match self {
            Action::Route(t) => t.iter().map(String::as_str).collect(),
            Action::Escalate(e) => {
                let then = e.then.iter().flat_map(|a| a.targets());
                std::iter::once(e.card.as_str()).chain(then).collect()
            }
            Action::Complete | Action::DeadLetter(_) => vec![],
            Action::Llm(llm) => llm
                .candidates
                .iter()
                .chain(&llm.human)
                .map(String::as_str)
                .chain(llm.fallback.iter().flat_map(|f| f.targets()))
                .collect(),
        }
    }

    /// Whether this action may finish the task by itself.
    fn can_finish(&self) -> bool {
        match self {
            Action::Complete | Action::DeadLetter(_) => true,
            Action::Route(_) | Action::Escalate(_) => false,
            Action::Llm(llm) => {
                llm.complete || llm.fallback.as_ref().is_none_or(Action::can_finish)
            }
        }
    }
}

/// Checks a fallback action: any action but `llm`, naming known cards.
fn check_fallback(
    at: &str,
    action: &Action,
    known: &impl Fn(String, &str) -> std::result::Result<(), String>,
) -> std::result::Result<(), String> {
    match action {
        Action::Llm(_) => Err(format!(
            "field `{at}`: a fallback cannot ask the LLM; use route, escalate, complete or dead_letter"
        )),
        Action::Route(targets) if targets.is_empty() => {
            Err(format!("field `{at}.route`: name at least one card"))
        }
        Action::Route(targets) => targets
            .iter()
            .enumerate()
            .try_for_each(|(j, t)| known(format!("{at}.route[{j}]"), t)),
        Action::Escalate(e) => check_escalation(&format!("{at}.escalate"), e, known),
        Action::Complete | Action::DeadLetter(_) => Ok(()),
    }
}

/// Checks an escalation: a known card, a `then` that is a fallback, a reminder shorter than
/// the timeout.
fn check_escalation(
    at: &str,
    escalation: &Escalation,
    known: &impl Fn(String, &str) -> std::result::Result<(), String>,
) -> std::result::Result<(), String> {
    known(format!("{at}.card"), &escalation.card)?;
    if let Some(then) = &escalation.then {
        if escalation.timeout.is_none() {
            return Err(format!(
                "field `{at}.then`: it happens when `timeout` passes; set `{at}.timeout`"
            ));
        }
        check_fallback(&format!("{at}.then"), then, known)?;
    }
    if escalation.timeout.is_some_and(|t| t.is_zero()) {
        return Err(format!("field `{at}.timeout`: must be more than 0s"));
    }
    if let Some(every) = escalation.remind_every {
        if every.is_zero() || escalation.timeout.is_some_and(|t| every >= t) {
            return Err(format!(
                "field `{at}.remind_every`: must be more than 0s and shorter than `timeout`"
            ));
        }
    }
    Ok(())
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct ActionVisitor;
        impl<'de> Visitor<'de> for ActionVisitor {
            type Value = Action;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`complete` or a map with one of `route`, `escalate`, `dead_letter`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Action, E> {
                match v {
                    "complete" => Ok(Action::Complete),
                    other => Err(E::unknown_variant(other, ACTIONS)),
                }
            }
            fn visit_map<A: de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Action, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::invalid_length(0, &self));
                };
                let action = match key.as_str() {
                    "route" => Action::Route(map.next_value::<OneOrMany<String>>()?.0),
                    "escalate" => Action::Escalate(escalation(&mut map)?),
                    "dead_letter" => Action::DeadLetter(map.next_value()?),
                    "llm" => Action::Llm(Box::new(map.next_value()?)),
                    "complete" => {
                        map.next_value::<de::IgnoredAny>()?;
                        Action::Complete
                    }
                    other => return Err(de::Error::unknown_variant(other, ACTIONS)),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "a rule does one thing; remove `{extra}`"
                    )));
                }
                Ok(action)
            }
        }
        deserializer.deserialize_any(ActionVisitor)
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique id, recorded with every decision the rule makes.
    pub id: String,
    /// When it applies; empty = every result.
    #[serde(default)]
    pub when: When,
    /// What it does.
    pub then: Action,
}

/// The facts about one event that rules are matched against.
pub struct Facts<'a> {
    /// The event's kind, or what a timer made of the task.
    pub kind: Kind,
    /// The card of the step the event answers.
    pub source: Option<&'a str>,
    /// The task's labels.
    pub labels: &'a BTreeMap<String, String>,
    /// The attempt of the answered step.
    pub attempt: u32,
    /// The event's confidence.
    pub confidence: Option<f64>,
    /// The event's payload.
    pub payload: &'a Value,
}

/// A rule table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleTable {
    /// Most steps one task may take; a task that would take more is dead-lettered.
    #[serde(default = "default_hop_limit")]
    pub hop_limit: u32,
    /// Tokens and cost one task may spend (no limit when absent).
    #[serde(default)]
    pub budget: Option<Budget>,
    /// Largest task event the router decides, in bytes: as read, and as recorded on the state
    /// topic (its JSON form). A larger event is dead-lettered `too_large` and recorded by
    /// reference (position, size, SHA-256), never copied, so every state record stays well under
    /// the broker's default record limit of 1 MiB. Default 256 KiB.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Largest work item the router writes, in bytes (its JSON form: the task's input and the
    /// latest output of every card so far). A decision whose work item would be larger
    /// dead-letters the task `too_large`. Keep it under the agent topics' `max.message.bytes`
    /// and the producer's `message.max.bytes` (librdkafka's default: 1,000,000). Default 900,000.
    #[serde(default = "default_max_work_item_bytes")]
    pub max_work_item_bytes: usize,
    /// The rules, first match wins.
    pub rules: Vec<Rule>,
}

fn default_hop_limit() -> u32 {
    25
}

/// The default of [`RuleTable::max_event_bytes`].
pub const DEFAULT_MAX_EVENT_BYTES: usize = 256 * 1024;

fn default_max_event_bytes() -> usize {
    DEFAULT_MAX_EVENT_BYTES
}

fn default_max_work_item_bytes() -> usize {
    900_000
}

impl RuleTable {
    /// Loads a rule table from `path` and checks it against `cards`.
    pub fn load(path: &Path, cards: &Cards) -> Result<RuleTable> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| Error::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let table: RuleTable =
            serde_yaml_ng::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        table.validate(cards).map_err(invalid)?;
        Ok(table)
    }

    /// The first rule that matches, given whether the latest step of a card has finished.
    pub fn decide(&self, facts: &Facts<'_>, finished: impl Fn(&str) -> bool) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|rule| matches(&rule.when, facts, &finished))
    }

    /// The rule with this id.
    pub fn rule(&self, id: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.id == id)
    }

    /// The escalation to `card` that `rule_id` made (its own action, or the fallback of its LLM
    /// call; `budget` names the budget's fallback), with its timeout and what follows it.
    pub fn escalation(&self, rule_id: &str, card: &str) -> Option<&Escalation> {
        let action = match rule_id {
            "budget" => self.budget.as_ref()?.fallback.as_ref()?,
            _ => match &self.rule(rule_id)?.then {
                Action::Llm(llm) => llm.fallback.as_ref()?,
                action => action,
            },
        };
        match action {
            Action::Escalate(e) if e.card == card => Some(e),
            _ => None,
        }
    }

    /// Whether any rule asks the LLM decider.
    pub fn uses_llm(&self) -> bool {
        self.rules.iter().any(|r| matches!(r.then, Action::Llm(_)))
    }

    /// Checks the table against the cards.
    pub fn validate(&self, cards: &Cards) -> std::result::Result<(), String> {
        if self.hop_limit == 0 {
            return Err("field `hop_limit`: must be at least 1".into());
        }
        if self.max_event_bytes < 1024 {
            return Err("field `max_event_bytes`: must be at least 1024".into());
        }
        if self.max_work_item_bytes <= self.max_event_bytes {
            return Err(format!(
                "field `max_work_item_bytes`: {} must be more than `max_event_bytes` ({}): a work item carries the task's input",
                self.max_work_item_bytes, self.max_event_bytes
            ));
        }
        let known = |field: String, name: &str| {
            if cards.get(name).is_some() {
                Ok(())
            } else {
                Err(format!(
                    "field `{field}`: no card named `{name}`; known cards: {}",
                    cards.names().join(", ")
                ))
            }
        };
        if let Some(f) = self.budget.as_ref().and_then(|b| b.fallback.as_ref()) {
            check_fallback("budget.fallback", f, &known)?;
        }
        let mut ids = BTreeSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            if rule.id.is_empty() || !ids.insert(rule.id.as_str()) {
                return Err(format!(
                    "field `{at}.id`: `{}` is empty or used twice; ids must be unique",
                    rule.id
                ));
            }
            for (j, s) in rule.when.source.iter().enumerate() {
                known(format!("{at}.when.source[{j}]"), s)?;
            }
            for (j, s) in rule.when.join.iter().enumerate() {
                known(format!("{at}.when.join[{j}]"), s)?;
            }
            if rule.when.join.len() == 1 {
                return Err(format!(
                    "field `{at}.when.join`: a join needs at least two cards; use `source` for one"
                ));
            }
            for (j, c) in rule.when.payload.iter().enumerate() {
                if !(c.pointer.is_empty() || c.pointer.starts_with('/')) {
                    return Err(format!(
                        "field `{at}.when.payload[{j}].pointer`: `{}` is not a JSON pointer; it must be empty or start with `/`",
                        c.pointer
                    ));
                }
            }
            let timers = rule
                .when
                .kinds()
                .into_iter()
                .any(|k| matches!(k, Kind::TimedOut | Kind::DeadlineExceeded));
            if timers && matches!(rule.then, Action::Llm(_)) {
                return Err(format!(
                    "field `{at}.then`: a rule about `TIMED_OUT` or `DEADLINE_EXCEEDED` cannot ask the LLM (no event to show it); use route, escalate, complete or dead_letter"
                ));
            }
            match &rule.then {
                Action::Route(targets) if targets.is_empty() => {
                    return Err(format!("field `{at}.then.route`: name at least one card"));
                }
                Action::Route(targets) => {
                    for (j, t) in targets.iter().enumerate() {
                        known(format!("{at}.then.route[{j}]"), t)?;
                    }
                }
                Action::Escalate(e) => check_escalation(&format!("{at}.then.escalate"), e, &known)?,
                Action::Complete | Action::DeadLetter(_) => {}
                Action::Llm(llm) => {
                    if llm.candidates.is_empty() {
                        return Err(format!(
                            "field `{at}.then.llm.candidates`: name at least one card"
                        ));
                    }
                    for (j, t) in llm.candidates.iter().enumerate() {
                        known(format!("{at}.then.llm.candidates[{j}]"), t)?;
                    }
                    if let Some(h) = &llm.human {
                        known(format!("{at}.then.llm.human"), h)?;
                    }
                    if let Some(f) = &llm.fallback {
                        check_fallback(&format!("{at}.then.llm.fallback"), f, &known)?;
                    }
                }
            }
            if let Some(k) = self.rules[..i]
                .iter()
                .position(|earlier| earlier.when.covers(&rule.when))
            {
                return Err(format!(
                    "field `{at}`: rule `{}` is unreachable: rule `{}` (rules[{k}]) matches every event it matches",
                    rule.id, self.rules[k].id
                ));
            }
        }
        self.check_flow(cards)
    }

    /// Every card reached from a submission must have a rule for its results, and every card must
    /// have a way to finish (complete, escalate to a human, dead-letter).
    fn check_flow(&self, cards: &Cards) -> std::result::Result<(), String> {
        let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let mut exits: BTreeSet<&str> = BTreeSet::new();
        let mut handled: BTreeSet<&str> = BTreeSet::new();
        let mut reached: Vec<(&str, &str)> = Vec::new();
        for rule in &self.rules {
            let targets = rule.then.targets();
            let kinds = rule.when.kinds();
            if kinds.iter().any(|k| k.starts()) {
                reached.extend(targets.iter().map(|t| (*t, rule.id.as_str())));
            }
            if !kinds
                .iter()
                .any(|k| matches!(k, Kind::Result | Kind::HumanDecision))
            {
                continue;
            }
            let sources: Vec<&str> = match rule.when.sources() {
                Some(s) => s.into_iter().collect(),
                None => cards.names(),
            };
            for source in sources {
                handled.insert(source);
                if rule.then.can_finish() {
                    exits.insert(source);
                }
                edges
                    .entry(source)
                    .or_default()
                    .extend(targets.iter().copied());
                reached.extend(targets.iter().map(|t| (*t, rule.id.as_str())));
            }
        }
        if !self
            .rules
            .iter()
            .any(|r| r.when.kinds().contains(&Kind::Submitted))
        {
            return Err(
                "field `rules`: no rule matches `kind: SUBMITTED`, so no task could start".into(),
            );
        }
        if let Some((card, rule)) = reached.iter().find(|(card, _)| !handled.contains(card)) {
            return Err(format!(
                "field `rules`: rule `{rule}` routes to `{card}` but no rule handles `{card}`'s results"
            ));
        }
        let mut can_finish = exits;
        loop {
            let before = can_finish.len();
            for (source, targets) in &edges {
                if targets.iter().any(|t| can_finish.contains(t)) {
                    can_finish.insert(source);
                }
            }
            if can_finish.len() == before {
                break;
            }
        }
        let stuck: Vec<&str> = handled
            .iter()
            .copied()
            .filter(|c| !can_finish.contains(c))
            .collect();
        if !stuck.is_empty() {
            return Err(format!(
                "field `rules`: cards {} route among themselves with no rule that completes, escalates or dead-letters: a cycle without an exit",
                stuck.join(", ")
            ));
        }
        Ok(())
    }
}

fn matches(when: &When, facts: &Facts<'_>, finished: &impl Fn(&str) -> bool) -> bool {
    let source_ok = |list: &[String]| facts.source.is_some_and(|s| list.iter().any(|c| c == s));
    when.kinds().contains(&facts.kind)
        && (when.source.is_empty() || source_ok(&when.source))
        && (when.join.is_empty()
            || (source_ok(&when.join) && when.join.iter().all(|c| finished(c))))
        && when
            .labels
            .iter()
            .all(|(k, v)| facts.labels.get(k) == Some(v))
        && when
            .attempt
            .as_ref()
            .is_none_or(|c| c.holds(f64::from(facts.attempt)))
        && when
            .confidence
            .as_ref()
            .is_none_or(|c| facts.confidence.is_some_and(|x| c.holds(x)))
        && when.payload.iter().all(|c| c.holds(facts.payload))
}

/// One value or a list of values.
struct OneOrMany<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        one_or_many(deserializer).map(OneOrMany)
    }
}

/// Accepts one value or a list of values.
fn one_or_many<'de, D, T>(deserializer: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Visit<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Visit<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("one value or a list")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Vec<T>, E> {
            T::deserialize(v.into_deserializer()).map(|t| vec![t])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(t) = seq.next_element()? {
                out.push(t);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_any(Visit(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cards::{Card, Runtime};

    fn cards(names: &[&str]) -> Cards {
        let mut cards = Cards::default();
        for name in names {
            let card: Card =
                serde_yaml_ng::from_str(&format!("name: {name}\nruntime: {{kind: handler}}"))
                    .unwrap();
            cards
                .insert(card, std::path::PathBuf::from(format!("{name}.yaml")))
                .unwrap();
        }
        assert!(cards.iter().all(|c| c.runtime == Runtime::Handler));
        cards
    }

    fn parse(yaml: &str) -> RuleTable {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    const FLOW: &str = r#"
rules:
  - id: start
    when: { kind: SUBMITTED }
    then: { route: [a, b] }
  - id: joined
    when: { join: [a, b] }
    then: { route: [c] }
  - id: sure
    when: { source: c, confidence: { gt: 0.8 } }
    then: complete
  - id: unsure
    when: { source: c }
    then: { escalate: h }
  - id: human
    when: { kind: HUMAN_DECISION }
    then: complete
"#;

    #[test]
    fn example_flow_validates_and_decides() {
        let cards = cards(&["a", "b", "c", "h"]);
        let table = parse(FLOW);
        table.validate(&cards).unwrap();
        let labels = BTreeMap::new();
        let payload = Value::Null;
        let facts = |kind, source, confidence| Facts {
            kind,
            source,
            labels: &labels,
            attempt: 1,
            confidence,
            payload: &payload,
        };
        let submitted = facts(Kind::Submitted, None, None);
        assert_eq!(table.decide(&submitted, |_| false).unwrap().id, "start");
        let a_done = facts(Kind::Result, Some("a"), None);
        assert!(
            table.decide(&a_done, |c| c == "a").is_none(),
            "join waits for b"
        );
        assert_eq!(table.decide(&a_done, |_| true).unwrap().id, "joined");
        let sure = facts(Kind::Result, Some("c"), Some(0.9));
        assert_eq!(table.decide(&sure, |_| true).unwrap().id, "sure");
        let unsure = facts(Kind::Result, Some("c"), Some(0.8));
        assert_eq!(table.decide(&unsure, |_| true).unwrap().id, "unsure");
    }

    #[test]
    fn payload_conditions() {
        let cond: PayloadCondition = serde_yaml_ng::from_str("{pointer: /score, gte: 2}").unwrap();
        assert!(cond.holds(&serde_json::json!({"score": 2})));
        assert!(!cond.holds(&serde_json::json!({"score": 1})));
        assert!(!cond.holds(&serde_json::json!({})));
        let cond: PayloadCondition =
            serde_yaml_ng::from_str("{pointer: /intent, in: [refund, cancel]}").unwrap();
        assert!(cond.holds(&serde_json::json!({"intent": "refund"})));
        assert!(!cond.holds(&serde_json::json!({"intent": "hello"})));
        let cond: PayloadCondition =
            serde_yaml_ng::from_str("{pointer: /x, exists: false}").unwrap();
        assert!(cond.holds(&serde_json::json!({})));
    }

    #[test]
    fn unknown_card_names_the_field() {
        let err = parse(&FLOW.replace("route: [c]", "route: [ghost]"))
            .validate(&cards(&["a", "b", "c", "h"]))
            .unwrap_err();
        assert!(
            err.contains("rules[1].then.route[0]") && err.contains("ghost"),
            "{err}"
        );
    }

    #[test]
    fn llm_rules_name_known_cards_and_fall_back_without_the_llm() {
        let table = |then: &str| {
            format!(
                "rules:\n  - {{ id: ask, when: {{ kind: SUBMITTED }}, then: {{ llm: {then} }} }}\n  - {{ id: done, when: {{ source: [a, b, h] }}, then: complete }}\n"
            )
        };
        let known = cards(&["a", "b", "h"]);
        parse(&table(
            "{ candidates: [a, b], human: h, fallback: { escalate: h } }",
        ))
        .validate(&known)
        .unwrap();
        let err = parse(&table("{ candidates: [a, ghost] }"))
            .validate(&known)
            .unwrap_err();
        assert!(
            err.contains("rules[0].then.llm.candidates[1]") && err.contains("ghost"),
            "{err}"
        );
        let err = parse(&table(
            "{ candidates: [a], fallback: { llm: { candidates: [b] } } }",
        ))
        .validate(&known)
        .unwrap_err();
        assert!(
            err.contains("rules[0].then.llm.fallback") && err.contains("cannot ask the LLM"),
            "{err}"
        );
        let err =
            serde_yaml_ng::from_str::<RuleTable>(&table("{ candidates: [a], temprature: 0 }"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("temprature"), "{err}");
    }

    #[test]
    fn shadowed_rule_is_unreachable() {
        let yaml = FLOW.replace(
            "  - id: sure\n    when: { source: c, confidence: { gt: 0.8 } }",
            "  - id: any-c\n    when: { source: c }\n    then: complete\n  - id: sure\n    when: { source: c, confidence: { gt: 0.8 } }",
        );
        let err = parse(&yaml)
            .validate(&cards(&["a", "b", "c", "h"]))
            .unwrap_err();
        assert!(
            err.contains("`sure` is unreachable") && err.contains("`any-c`"),
            "{err}"
        );
    }

    #[test]
    fn cycle_without_exit_is_refused_but_cycle_with_exit_is_fine() {
        let cards = cards(&["a", "b"]);
        let with_exit = parse(
            r#"
rules:
  - { id: s, when: { kind: SUBMITTED }, then: { route: [a] } }
  - { id: ab, when: { source: a }, then: { route: [b] } }
  - { id: done, when: { source: b, payload: [{ pointer: /done, eq: true }] }, then: complete }
  - { id: ba, when: { source: b }, then: { route: [a] } }
"#,
        );
        with_exit.validate(&cards).unwrap();
        let mut without = with_exit.clone();
        without.rules.remove(2);
        let err = without.validate(&cards).unwrap_err();
        assert!(
            err.contains("cycle without an exit") && err.contains("a, b"),
            "{err}"
        );
    }

    #[test]
    fn dead_end_card_is_refused() {
        let table =
            parse("rules:\n  - { id: s, when: { kind: SUBMITTED }, then: { route: [a] } }\n");
        let err = table.validate(&cards(&["a"])).unwrap_err();
        assert!(err.contains("no rule handles `a`'s results"), "{err}");
    }

    #[test]
    fn bad_action_and_kind_list_what_is_allowed() {
        let err = serde_yaml_ng::from_str::<RuleTable>("rules: [{id: x, then: {teleport: a}}]")
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("`route`, `complete`, `escalate`, `dead_letter`"),
            "{err}"
        );
        let err = serde_yaml_ng::from_str::<RuleTable>(
            "rules: [{id: x, when: {kind: DONE}, then: complete}]",
        )
        .unwrap_err();
        assert!(err.to_string().contains("SUBMITTED"), "{err}");
    }

    fn check(yaml: &str) -> std::result::Result<RuleTable, String> {
        let table: RuleTable = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        table.validate(&cards(&["a", "h", "b"]))?;
        Ok(table)
    }

    #[test]
    fn escalations_bound_the_wait_and_name_what_follows() {
        let table = check(
            "rules:
  - { id: s, when: { kind: SUBMITTED }, then: { route: [a] } }
  - { id: late, when: { kind: DEADLINE_EXCEEDED }, then: { escalate: h } }
  - { id: ask, when: { source: a }, then: { escalate: { card: h, timeout: 2s, then: dead_letter, remind_every: 500ms } } }
  - { id: routed, when: { kind: TIMED_OUT }, then: { escalate: { card: h, timeout: 1h, then: { route: [b] } } } }
  - { id: done, when: { source: [h, b] }, then: complete }
",
        )
        .unwrap();
        let ask = table.escalation("ask", "h").unwrap();
        assert_eq!(ask.timeout, Some(std::time::Duration::from_secs(2)));
        assert_eq!(
            ask.then.as_deref(),
            Some(&Action::DeadLetter(HUMAN_TIMEOUT.into()))
        );
        assert_eq!(table.escalation("late", "h"), Some(&Escalation::to("h")));
        assert_eq!(table.escalation("ask", "b"), None, "another card");
        let routed = table.escalation("routed", "h").unwrap();
        assert_eq!(
            routed.then.as_deref(),
            Some(&Action::Route(vec!["b".into()]))
        );
    }

    #[test]
    fn bad_escalations_and_timer_rules_say_what_is_allowed() {
        let head = "rules:\n  - { id: s, when: { kind: SUBMITTED }, then: { route: [a] } }\n";
        let tail = "  - { id: done, when: { source: [a, h] }, then: complete }\n";
        for (rule, expected) in [
            (
                "{ id: x, when: { source: a }, then: { escalate: { card: h, wait: 2s } } }",
                "unknown field `wait`, expected one of `card`, `timeout`, `then`, `remind_every`",
            ),
            (
                "{ id: x, when: { source: a }, then: { escalate: { card: h, then: complete } } }",
                "field `rules[1].then.escalate.then`: it happens when `timeout` passes",
            ),
            (
                "{ id: x, when: { source: a }, then: { escalate: { card: h, timeout: 1s, remind_every: 2s } } }",
                "field `rules[1].then.escalate.remind_every`: must be more than 0s and shorter than `timeout`",
            ),
            (
                "{ id: x, when: { source: a }, then: { escalate: { card: ghost } } }",
                "field `rules[1].then.escalate.card`: no card named `ghost`",
            ),
            (
                "{ id: x, when: { kind: TIMED_OUT }, then: { llm: { candidates: [a] } } }",
                "field `rules[1].then`: a rule about `TIMED_OUT` or `DEADLINE_EXCEEDED` cannot ask the LLM",
            ),
            (
                "{ id: x, when: { kind: TIMEOUT }, then: complete }",
                "unknown variant `TIMEOUT`, expected one of `SUBMITTED`",
            ),
        ] {
            let err = check(&format!("{head}  - {rule}\n{tail}")).unwrap_err();
            assert!(err.contains(expected), "{rule}: {err}");
        }
    }
}

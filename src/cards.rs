//! Agent cards: what each agent is, where its work arrives and how it runs.
//!
//! A card is one YAML file. Its fields follow the A2A AgentCard where they mean the same thing, plus
//! what a Kafka agent needs. Unknown fields and bad values are refused with the file, the field and
//! what is allowed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::signing::{Secret, Secrets};

/// Errors loading cards: the file and what is wrong.
pub use crate::files::{Error, Result};

/// One skill of an agent (A2A `AgentSkill`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Skill {
    /// Unique id of the skill.
    pub id: String,
    /// Short name.
    pub name: String,
    /// What the skill does.
    #[serde(default)]
    pub description: String,
    /// Keywords.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Example requests.
    #[serde(default)]
    pub examples: Vec<String>,
}

/// How an agent runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Runtime {
    /// A program that reads one JSON work item on stdin and writes one JSON result on stdout.
    /// A non-zero exit or output that is not JSON is a failure.
    Command {
        /// Program and arguments; a relative program path is resolved against the card's directory.
        command: Vec<String>,
        /// Extra environment variables.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Keep one process per concurrency slot running instead of one per work item: it reads
        /// one work item per line on stdin and answers one JSON line on stdout. A process that
        /// dies or overruns the card's timeout fails that item and is replaced.
        #[serde(default)]
        long_lived: bool,
    },
    /// An HTTP service: the work item is sent as JSON; a 2xx JSON object is the result, a 4xx a
    /// failure that is not retried, a 5xx, a timeout or a refused connection a failure the
    /// card's retry policy applies to. Answers over 4 MiB are failures.
    Http {
        /// Where to send it.
        url: String,
        /// The method (default `POST`).
        #[serde(default = "default_method")]
        method: String,
        /// Request headers, each taken from an environment variable: `{Authorization:
        /// SHIPPING_API_AUTH}` sends the variable's value. Values are never logged.
        #[serde(default)]
        headers: BTreeMap<String, String>,
        /// How long one request may take (default: the card's `timeout`).
        #[serde(default, with = "humantime_serde")]
        #[schemars(with = "Option<crate::schema::HumanDuration>")]
        timeout: Option<Duration>,
    },
    /// An A2A agent: the work item's input goes as a data part of a JSON-RPC `message/send`
    /// (the task id is the context id); a completed task or a message is the result, a failed
    /// or rejected task a failure, and a task that needs input is a result with `a2a_state:
    /// input-required` that a rule can escalate to a human card.
    A2a {
        /// The agent's JSON-RPC endpoint (its agent card's `url`).
        url: String,
    },
    /// A handler written in Rust against `switchyard::agent`; `switchyard agent` cannot run it.
    Handler,
    /// A human: work items wait in the card's topic and are answered with a `HUMAN_DECISION` event.
    Human,
    /// An LLM call defined by the card alone: `switchyard agent` sends the work item to the
    /// configured endpoint (the `llm:` section) and publishes the completion, with its usage.
    Llm {
        /// The system prompt: the agent's job.
        system_prompt: String,
        /// The model (default: `llm.model` of the config).
        #[serde(default)]
        model: Option<String>,
        /// A model to try when the first fails after its retries.
        #[serde(default)]
        fallback_model: Option<String>,
        /// A JSON schema the completion must follow; the result's payload is then the parsed
        /// object. Without one the payload is `{"text": ..., "model": ...}`.
        #[serde(default)]
        output_schema: Option<serde_json::Value>,
    },
}

fn default_method() -> String {
    "POST".into()
}

/// Retry policy of a card: what happens when an attempt fails (`FAILED`) or times out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, including the first (1 = no retry).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// How long the router waits before it sends the next attempt.
    #[serde(default)]
    pub backoff: Backoff,
}

fn default_attempts() -> u32 {
    3
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_attempts(),
            backoff: Backoff::default(),
        }
    }
}

/// The wait before a retry: `initial` before the second attempt, multiplied by `multiplier` for
/// each later one, at most `max`. The wait is a durable timer, recorded on the state topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// The wait before the second attempt, e.g. `1s`; `0s` retries at once.
    #[serde(default = "default_initial", with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub initial: Duration,
    /// What each later wait is multiplied by (at least 1).
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// The longest wait.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub max: Duration,
    /// Shortens each wait by up to this fraction (0 to 1), so that many retries of one card do
    /// not arrive together. The amount is derived from the task, step and attempt, never drawn
    /// at random, so that replay computes the same due time.
    #[serde(default)]
    pub jitter: f64,
}

fn default_initial() -> Duration {
    Duration::from_secs(1)
}

fn default_multiplier() -> f64 {
    2.0
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: default_initial(),
            multiplier: default_multiplier(),
            max: default_max_backoff(),
            jitter: 0.0,
        }
    }
}

impl Backoff {
    /// The wait before `attempt` (2 or more) of `step_id` of `task_id`, in ms.
    pub fn delay_ms(&self, task_id: &str, step_id: u32, attempt: u32) -> i64 {
        let exponent = attempt.saturating_sub(2).min(64) as i32;
        let base = self.initial.as_millis() as f64 * self.multiplier.powi(exponent);
        let capped = base.min(self.max.as_millis() as f64);
        let key = format!("{task_id}/{step_id}/{attempt}");
        let digest = Sha256::digest(key.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let unit = u64::from_be_bytes(first) as f64 / u64::MAX as f64;
        (capped * (1.0 - self.jitter * unit)).round() as i64
    }
}

/// What a card's open circuit breaker does with new work for the card.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WhenOpen {
    /// Send it to the card's `fallback` card.
    #[default]
    Fallback,
    /// Hold it until the breaker lets work through again.
    Wait,
}

/// A card's circuit breaker: after `failures` failures or timeouts in a row, each within
/// `window` of the last, new work for the card goes to its fallback (or waits) for `open_for`;
/// then one probe step is let through, and its answer closes the breaker (or opens it again).
/// Each router partition keeps its own breakers, recorded on its state topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerPolicy {
    /// Consecutive failures that open the breaker (1 to 100).
    #[serde(default = "default_breaker_failures")]
    pub failures: u32,
    /// How recent the failures must be, e.g. `1m`.
    #[serde(default = "default_breaker_window", with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub window: Duration,
    /// How long the breaker stays open before a probe, e.g. `30s`.
    #[serde(default = "default_open_for", with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub open_for: Duration,
    /// `fallback` (the card's `fallback` card takes the work) or `wait`.
    #[serde(default)]
    pub when_open: WhenOpen,
}

fn default_breaker_failures() -> u32 {
    5
}

fn default_breaker_window() -> Duration {
    Duration::from_secs(60)
}

fn default_open_for() -> Duration {
    Duration::from_secs(30)
}

/// An agent card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Card {
    /// Unique name: lower-case letters, digits, `_` and `-`. Also names the inbox topic.
    pub name: String,
    /// What the agent does; shown to people and to the LLM decider.
    #[serde(default)]
    pub description: String,
    /// Version of the card.
    #[serde(default = "default_version")]
    pub version: String,
    /// The agent's skills.
    #[serde(default)]
    pub skills: Vec<Skill>,
    /// Media types the agent accepts.
    #[serde(default = "default_modes")]
    pub input_modes: Vec<String>,
    /// Media types the agent produces.
    #[serde(default = "default_modes")]
    pub output_modes: Vec<String>,
    /// Inbox topic; defaults to `<prefix>.agent.<name>`.
    #[serde(default)]
    pub topic: Option<String>,
    /// How the agent runs.
    pub runtime: Runtime,
    /// Work items one replica handles at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// How long one attempt may take, e.g. `30s`.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub timeout: Duration,
    /// What happens when an attempt fails.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Card that takes over when this card's attempts are exhausted (and, with a `breaker`,
    /// while the breaker is open).
    #[serde(default)]
    pub fallback: Option<String>,
    /// A circuit breaker for this card (none when absent).
    #[serde(default)]
    pub breaker: Option<BreakerPolicy>,
    /// Cost of one call, in the operator's currency.
    #[serde(default)]
    pub cost_per_call: f64,
    /// The environment variable that holds this card's signing secret. When set, every answer to
    /// a step of this card must carry a valid `switchyard.signature` header (see
    /// [`crate::signing`]); unsigned or wrongly signed answers are dead-lettered `bad_signature`.
    /// `switchyard agent` signs with it. The secret itself never appears in a file or a log.
    #[serde(default)]
    pub secret_env: Option<String>,
}

fn default_version() -> String {
    "1.0.0".into()
}

fn default_modes() -> Vec<String> {
    vec![crate::envelope::JSON.to_string()]
}

fn default_concurrency() -> usize {
    1
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Card {
    /// The card's inbox topic under `prefix`.
    pub fn topic(&self, prefix: &str) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("{prefix}.agent.{}", self.name))
    }

    /// Whether this card is answered by a human.
    pub fn is_human(&self) -> bool {
        matches!(self.runtime, Runtime::Human)
    }

    /// Parses and checks one card file.
    pub fn load(path: &Path) -> Result<Card> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| Error::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let card: Card = serde_yaml_ng::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        card.validate().map_err(invalid)?;
        Ok(card)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if !valid_name(&self.name) {
            return Err(format!(
                "field `name`: `{}` is not allowed; use 1-100 lower-case letters, digits, `_` or `-`",
                self.name
            ));
        }
        if self.concurrency == 0 {
            return Err("field `concurrency`: must be at least 1".into());
        }
        if self.retry.max_attempts == 0 {
            return Err("field `retry.max_attempts`: must be at least 1".into());
        }
        if self.timeout.is_zero() {
            return Err("field `timeout`: must be more than 0s".into());
        }
        if !(self.cost_per_call.is_finite() && self.cost_per_call >= 0.0) {
            return Err("field `cost_per_call`: must be a number >= 0".into());
        }
        if let Runtime::Command { command, .. } = &self.runtime {
            if command.is_empty() {
                return Err("field `runtime.command`: must name a program".into());
            }
        }
        if let Some(var) = &self.secret_env {
            let valid = !var.is_empty()
                && var
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if !valid {
                return Err(format!(
                    "field `secret_env`: `{var}` is not an environment variable name; use upper-case letters, digits and `_` (the secret itself goes in that variable, never in the card)"
                ));
            }
        }
        if self.fallback.as_deref() == Some(self.name.as_str()) {
            return Err("field `fallback`: a card cannot be its own fallback".into());
        }
        let backoff = &self.retry.backoff;
        if !(backoff.multiplier.is_finite() && backoff.multiplier >= 1.0) {
            return Err("field `retry.backoff.multiplier`: must be a number >= 1".into());
        }
        if !(0.0..=1.0).contains(&backoff.jitter) {
            return Err("field `retry.backoff.jitter`: must be a fraction from 0 to 1".into());
        }
        if backoff.max < backoff.initial {
            return Err(format!(
                "field `retry.backoff.max`: {} is shorter than `initial` ({})",
                humantime::format_duration(backoff.max),
                humantime::format_duration(backoff.initial)
            ));
        }
        if let Some(breaker) = &self.breaker {
            if self.is_human() {
                return Err("field `breaker`: a human card has no breaker; give its escalation a `timeout` instead".into());
            }
            if !(1..=100).contains(&breaker.failures) {
                return Err("field `breaker.failures`: must be from 1 to 100".into());
            }
            if breaker.window.is_zero() || breaker.open_for.is_zero() {
                return Err("field `breaker`: `window` and `open_for` must be more than 0s".into());
            }
            if breaker.when_open == WhenOpen::Fallback && self.fallback.is_none() {
                return Err("field `breaker.when_open`: `fallback` needs the card's `fallback` field; name a fallback card or use `when_open: wait`".into());
            }
        }
        Ok(())
    }
}

/// Whether `name` may name a card (and so a topic).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A loaded set of cards, keyed by name, with the file each came from.
#[derive(Debug, Clone, Default)]
pub struct Cards {
    cards: BTreeMap<String, (Card, PathBuf)>,
}

impl Cards {
    /// Loads every `*.yaml` / `*.yml` file of `dir` as a card.
    pub fn load_dir(dir: &Path) -> Result<Cards> {
        let io = |source| Error::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .map_err(io)?;
        paths.retain(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")));
        paths.sort();
        let mut cards = Cards::default();
        for path in paths {
            let card = Card::load(&path)?;
            cards.insert(card, path)?;
        }
        cards.check_fallbacks()?;
        Ok(cards)
    }

    /// Adds a card loaded from `path`, refusing a second card of the same name.
    pub fn insert(&mut self, card: Card, path: PathBuf) -> Result<()> {
        if let Some((_, first)) = self.cards.get(&card.name) {
            return Err(Error::Invalid {
                path,
                message: format!(
                    "field `name`: `{}` is already used by {}",
                    card.name,
                    first.display()
                ),
            });
        }
        self.cards.insert(card.name.clone(), (card, path));
        Ok(())
    }

    fn check_fallbacks(&self) -> Result<()> {
        for (card, path) in self.cards.values() {
            if let Some(fallback) = &card.fallback {
                if !self.cards.contains_key(fallback) {
                    return Err(Error::Invalid {
                        path: path.clone(),
                        message: format!(
                            "field `fallback`: no card named `{fallback}`; known cards: {}",
                            self.names().join(", ")
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// The card called `name`.
    pub fn get(&self, name: &str) -> Option<&Card> {
        self.cards.get(name).map(|(card, _)| card)
    }

    /// Every card.
    pub fn iter(&self) -> impl Iterator<Item = &Card> {
        self.cards.values().map(|(card, _)| card)
    }

    /// The signing secrets of the cards that declare `secret_env`, read from the environment.
    pub fn secrets(&self) -> Secrets {
        let mut secrets = Secrets::default();
        for card in self.iter() {
            if let Some(var) = &card.secret_env {
                secrets.insert(&card.name, Secret::from_env(var));
            }
        }
        secrets
    }

    /// The names of every card, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.cards.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn unknown_field_names_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "a.yaml",
            "name: a\nruntime: {kind: human}\ncolour: red\n",
        );
        let err = Card::load(&path).unwrap_err().to_string();
        assert!(err.contains("a.yaml"), "{err}");
        assert!(err.contains("unknown field `colour`"), "{err}");
        assert!(err.contains("expected one of"), "{err}");
    }

    #[test]
    fn bad_runtime_kind_lists_the_allowed_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "a.yaml", "name: a\nruntime: {kind: quantum}\n");
        let err = Card::load(&path).unwrap_err().to_string();
        assert!(err.contains("runtime"), "{err}");
        assert!(
            err.contains("`command`, `http`, `a2a`, `handler`, `human`, `llm`"),
            "{err}"
        );
    }

    #[test]
    fn bad_name_and_zero_concurrency_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "a.yaml",
            "name: Big Agent\nruntime: {kind: human}\n",
        );
        assert!(Card::load(&path)
            .unwrap_err()
            .to_string()
            .contains("field `name`"));
        let path = write(
            dir.path(),
            "b.yaml",
            "name: b\nconcurrency: 0\nruntime: {kind: human}\n",
        );
        assert!(Card::load(&path)
            .unwrap_err()
            .to_string()
            .contains("field `concurrency`"));
    }

    #[test]
    fn unknown_fallback_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            "name: a\nfallback: ghost\nruntime: {kind: human}\n",
        );
        let err = Cards::load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("a.yaml") && err.contains("field `fallback`"),
            "{err}"
        );
    }

    #[test]
    fn card_defaults_and_topic() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "a.yaml",
            "name: a\ntimeout: 5s\nruntime: {kind: command, command: [./run.sh]}\n",
        );
        let card = Card::load(&path).unwrap();
        assert_eq!(card.timeout, Duration::from_secs(5));
        assert_eq!(card.retry.max_attempts, 3);
        assert_eq!(card.topic("sy"), "sy.agent.a");
    }

    #[test]
    fn backoff_and_breaker_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        for (extra, expected) in [
            (
                "retry: {backoff: {multiplier: 0.5}}",
                "field `retry.backoff.multiplier`: must be a number >= 1",
            ),
            (
                "retry: {backoff: {jitter: 2}}",
                "field `retry.backoff.jitter`: must be a fraction from 0 to 1",
            ),
            (
                "retry: {backoff: {initial: 1m, max: 10s}}",
                "field `retry.backoff.max`: 10s is shorter than `initial` (1m)",
            ),
            (
                "breaker: {failures: 3}",
                "field `breaker.when_open`: `fallback` needs the card's `fallback` field",
            ),
            (
                "breaker: {failures: 0, when_open: wait}",
                "field `breaker.failures`: must be from 1 to 100",
            ),
            (
                "breaker: {when_open: later}",
                "unknown variant `later`, expected `fallback` or `wait`",
            ),
        ] {
            let path = write(
                dir.path(),
                "a.yaml",
                &format!("name: a\n{extra}\nruntime: {{kind: handler}}\n"),
            );
            let err = Card::load(&path).unwrap_err().to_string();
            assert!(
                err.contains("a.yaml") && err.contains(expected),
                "{extra}: {err}"
            );
        }
        let path = write(
            dir.path(),
            "b.yaml",
            "name: b\nfallback: a\nbreaker: {}\nretry: {backoff: {initial: 500ms}}\nruntime: {kind: handler}\n",
        );
        let card = Card::load(&path).unwrap();
        let breaker = card.breaker.unwrap();
        assert_eq!(
            (breaker.failures, breaker.when_open),
            (5, WhenOpen::Fallback)
        );
        assert_eq!(card.retry.backoff.delay_ms("t", 1, 2), 500);
        assert_eq!(card.retry.backoff.delay_ms("t", 1, 4), 2_000);
    }
}

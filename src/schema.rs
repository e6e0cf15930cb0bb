//! JSON Schemas of the files users write (cards, rule tables, topic specs, the config file) and
//! of the records other tools read (state events, dead-letter headers), generated from the types
//! that load them, so that they cannot drift. `switchyard schemas export` writes them under
//! `schemas/`; editors that speak the YAML language server validate against them.

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde_json::Value;

use crate::dlq::headers;
use crate::rules::{Action, Escalation, LlmRoute};

/// Every schema, with the file name it is published under.
pub fn all() -> Vec<(&'static str, Value)> {
    let value = |schema: Schema| schema.to_value();
    vec![
        (
            "card.schema.json",
            value(schemars::schema_for!(crate::cards::Card)),
        ),
        (
            "rules.schema.json",
            value(schemars::schema_for!(crate::rules::RuleTable)),
        ),
        (
            "topics.schema.json",
            value(schemars::schema_for!(crate::topics::TopicSpecs)),
        ),
        (
            "config.schema.json",
            value(schemars::schema_for!(crate::cli::FileConfig)),
        ),
        (
            "state-event.schema.json",
            value(schemars::schema_for!(crate::envelope::StateEvent)),
        ),
        ("dlq-headers.schema.json", dead_letter_headers()),
    ]
}

/// The headers of a dead letter, as an object of their (UTF-8) values.
fn dead_letter_headers() -> Value {
    let header =
        |description: &str| serde_json::json!({ "type": "string", "description": description });
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "DeadLetterHeaders",
        "description": "The headers of a record on `<prefix>.dlq`; the record keeps the original key and value (a prefix of at most 64 KiB when it was too large).",
        "type": "object",
        "properties": {
            headers::REASON: header("Reason code, e.g. `deserialization`, `no_rule_matched`, `agent_failed`, `too_large`."),
            headers::MESSAGE: header("Human-readable error message."),
            headers::TOPIC: header("Source topic."),
            headers::PARTITION: header("Source partition (decimal)."),
            headers::OFFSET: header("Source offset (decimal)."),
            headers::ROUTER_VERSION: header("Version of the router that dead-lettered the record."),
            headers::TIME: header("Time of dead-lettering, milliseconds since the Unix epoch (decimal)."),
            headers::REDRIVES: header("How often the record has been redriven from the dead-letter topic (decimal)."),
            headers::TRUNCATED: header("Present when the dead letter carries only a prefix of the original: `value`, `key` or `key,value`."),
            headers::ORIGINAL_SIZE: header("Size of the original value in bytes (when truncated)."),
            headers::ORIGINAL_SHA256: header("Hex SHA-256 of the original value (when truncated)."),
            headers::ORIGINAL_KEY_SIZE: header("Size of the original key in bytes (when truncated)."),
        },
        "required": [headers::REASON, headers::MESSAGE, headers::TOPIC, headers::PARTITION, headers::OFFSET]
    })
}

/// A duration written the way `humantime` reads it: `30s`, `5m`, `1h 30m`, `250ms`.
pub struct HumanDuration;

impl JsonSchema for HumanDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration: a number and a unit (ms, s, m, h, d), e.g. `30s`, `5m`, `1h 30m`.",
            "pattern": "^\\s*[0-9]+\\s*[a-zA-Z]+(\\s*[0-9]+\\s*[a-zA-Z]+)*\\s*$"
        })
    }
}

/// One value or a list of them (`kind: RESULT` or `kind: [RESULT, FAILED]`).
pub struct OneOrMany<T>(std::marker::PhantomData<T>);

impl<T: JsonSchema> JsonSchema for OneOrMany<T> {
    fn schema_name() -> Cow<'static, str> {
        format!("OneOrMany_{}", T::schema_name()).into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let one = generator.subschema_for::<T>();
        json_schema!({
            "anyOf": [one.clone(), { "type": "array", "items": one }]
        })
    }
}

/// A rule's `then` (see [`Action`]'s `Deserialize`): `complete`, or a map with exactly one of
/// `route` (a card or a list), `escalate` (a card or an [`Escalation`]), `dead_letter` (a reason)
/// or `llm` (an [`LlmRoute`]).
impl JsonSchema for Action {
    fn schema_name() -> Cow<'static, str> {
        "Action".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let one = |key: &str, value: Schema| {
            json_schema!({
                "type": "object",
                "properties": { key: value },
                "required": [key],
                "additionalProperties": false
            })
        };
        let escalate = json_schema!({
            "anyOf": [{ "type": "string" }, generator.subschema_for::<Escalation>()]
        });
        json_schema!({
            "description": "What the rule does: `complete`, `{route: card or [cards]}`, `{escalate: card or {card, timeout, then, remind_every}}`, `{dead_letter: reason}` or `{llm: {...}}`.",
            "oneOf": [
                { "const": "complete" },
                one("route", generator.subschema_for::<OneOrMany<String>>()),
                one("escalate", escalate),
                one("dead_letter", json_schema!({ "type": "string" })),
                one("llm", generator.subschema_for::<LlmRoute>()),
            ]
        })
    }
}

/// An escalation's `then`: an [`Action`], or the bare word `dead_letter` (reason
/// `human_timeout`).
pub struct TimeoutAction;

impl JsonSchema for TimeoutAction {
    fn schema_name() -> Cow<'static, str> {
        "TimeoutAction".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "anyOf": [{ "const": "dead_letter" }, generator.subschema_for::<Action>()]
        })
    }
}

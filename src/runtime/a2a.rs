//! The `a2a` runtime and `switchyard cards import`. A work item goes to an A2A agent as a
//! JSON-RPC `message/send` whose message holds the input as a data part, with the task id as its
//! context id. The answer is a message (its result) or a task: completed (its artifacts are the
//! result), failed or rejected (a failure; rejected is not retried), or waiting for input (a
//! result with `a2a_state: input-required`, which a rule escalates to a human card); a task still
//! working is asked for again with `tasks/get` until it ends or the card's timeout passes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::agent::{not_runnable, Failure, Reply};
use crate::cards::{Card, Runtime, Skill};
use crate::envelope::WorkItem;
use crate::error::{Error, Result};

/// Runs a card's `a2a` runtime.
#[derive(Debug, Clone)]
pub struct A2aHandler {
    client: reqwest::Client,
    url: String,
    timeout: Duration,
}

impl A2aHandler {
    /// The handler for `card`.
    pub fn new(card: &Card) -> Result<Self> {
        let Runtime::A2a { url } = &card.runtime else {
            return Err(not_runnable(card));
        };
        let client = reqwest::Client::builder()
            .timeout(card.timeout)
            .build()
            .map_err(|e| Error::Setup(format!("card `{}`: HTTP client: {e}", card.name)))?;
        Ok(Self {
            client,
            url: url.clone(),
            timeout: card.timeout,
        })
    }

    async fn call(&self, method: &str, params: Value) -> Result<Value, Failure> {
        let request = json!({
            "jsonrpc": "2.0",
            "id": uuid::Uuid::new_v4().to_string(),
            "method": method,
            "params": params,
        });
        let answer = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .body(request.to_string())
            .send()
            .await
            .map_err(|e| format!("{method} to {}: {}", self.url, e.without_url()))?;
        let status = answer.status();
        let bytes = answer
            .bytes()
            .await
            .map_err(|e| format!("reading the answer: {}", e.without_url()))?;
        if bytes.len() > super::http::MAX_ANSWER_BYTES {
            return Err("the answer is over 4 MiB".into());
        }
        if !status.is_success() {
            return Err(format!("{method}: HTTP {status}").into());
        }
        let mut body: Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{method}: the answer is not JSON: {e}"))?;
        if let Some(error) = body.get("error") {
            let code = error["code"].as_i64().unwrap_or_default();
            let why = format!(
                "{method}: error {code}: {}",
                error["message"].as_str().unwrap_or("?")
            );
            // Invalid request or params: the same request fails again.
            return Err(match (-32602..=-32600).contains(&code) {
                true => Failure::permanent(why),
                false => why.into(),
            });
        }
        Ok(body["result"].take())
    }

    async fn answer(&self, item: &WorkItem) -> Result<Reply, Failure> {
        let message = json!({
            "kind": "message",
            "role": "user",
            "messageId": uuid::Uuid::new_v4().to_string(),
            "contextId": item.task_id,
            "parts": [{ "kind": "data", "data": item.input }],
            "metadata": {
                "switchyard": {
                    "step_id": item.step_id,
                    "attempt": item.attempt,
                    "context": item.context,
                },
            },
        });
        let started = Instant::now();
        let mut result = self
            .call("message/send", json!({ "message": message }))
            .await?;
        loop {
            match answer(&result)? {
                Some(reply) => return Ok(reply),
                None if started.elapsed() >= self.timeout => {
                    return Err(format!("the A2A task still works after {:?}", self.timeout).into())
                }
                None => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let id = result["id"].clone();
                    result = self.call("tasks/get", json!({ "id": id })).await?;
                }
            }
        }
    }
}

/// The data of the first data part of `parts`, or their text joined as `{"text": …}`.
fn content(parts: &[Value]) -> Value {
    if let Some(data) = parts
        .iter()
        .find(|p| p["kind"] == "data")
        .map(|p| &p["data"])
    {
        if data.is_object() {
            return data.clone();
        }
        return json!({ "data": data });
    }
    let text: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
    json!({ "text": text.join("\n") })
}

/// What an A2A result means: a reply, a failure, or `None` while the task still works.
fn answer(result: &Value) -> Result<Option<Reply>, Failure> {
    let parts = |v: &Value| v["parts"].as_array().cloned().unwrap_or_default();
    let reply = |payload: Value| {
        let confidence = payload.get("confidence").and_then(Value::as_f64);
        Ok(Some(Reply {
            payload,
            confidence,
            usage: None,
        }))
    };
    if result["kind"] == "message" {
        return reply(content(&parts(result)));
    }
    let state = result["status"]["state"].as_str().unwrap_or("unknown");
    let said = content(&parts(&result["status"]["message"]));
    match state {
        "completed" => {
            let artifacts: Vec<Value> = result["artifacts"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(parts)
                .collect();
            reply(if artifacts.is_empty() {
                said
            } else {
                content(&artifacts)
            })
        }
        "input-required" | "auth-required" => {
            let mut payload = Map::new();
            payload.insert("a2a_state".into(), state.into());
            payload.insert("a2a_task_id".into(), result["id"].clone());
            payload.insert("message".into(), said);
            reply(Value::Object(payload))
        }
        "failed" | "canceled" => Err(format!("the A2A task {state}: {said}").into()),
        "rejected" => Err(Failure::permanent(format!(
            "the A2A agent rejected the task: {said}"
        ))),
        "submitted" | "working" => Ok(None),
        other => Err(format!("the A2A task is in an unknown state `{other}`").into()),
    }
}

/// Where an agent card is: the URL itself when it names a `.json` file, else the well-known
/// path under it.
pub fn agent_card_url(url: &str) -> String {
    match url.ends_with(".json") {
        true => url.to_string(),
        false => format!("{}/.well-known/agent-card.json", url.trim_end_matches('/')),
    }
}

/// A switchyard card from an A2A agent card: name (made a card name), description, version,
/// skills with tags and examples, input and output modes, and the `a2a` runtime at its `url`.
pub fn card_from_agent_card(agent: &Value) -> std::result::Result<Card, String> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let name: String = text(&agent["name"])
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect::<String>()
        .trim_matches('_')
        .to_string();
    if name.is_empty() {
        return Err("the agent card has no `name`".into());
    }
    let url = text(&agent["url"]);
    if url.is_empty() {
        return Err("the agent card has no `url` (its JSON-RPC endpoint)".into());
    }
    let skills = agent["skills"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| Skill {
            id: text(&s["id"]),
            name: text(&s["name"]),
            description: text(&s["description"]),
            tags: strings(&s["tags"]),
            examples: strings(&s["examples"]),
        })
        .collect();
    let mut yaml = BTreeMap::new();
    yaml.insert("name", Value::String(name));
    yaml.insert("description", agent["description"].clone());
    yaml.insert("runtime", json!({ "kind": "a2a", "url": url }));
    let mut card: Card =
        serde_json::from_value(serde_json::to_value(yaml).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    if let Some(version) = agent["version"].as_str() {
        card.version = version.to_string();
    }
    card.skills = skills;
    for (modes, key) in [
        (&mut card.input_modes, "defaultInputModes"),
        (&mut card.output_modes, "defaultOutputModes"),
    ] {
        let given = strings(&agent[key]);
        if !given.is_empty() {
            *modes = given;
        }
    }
    Ok(card)
}

impl super::Runner for A2aHandler {
    async fn run(&self, item: &WorkItem) -> Result<Reply, Failure> {
        self.answer(item).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_results_failures_and_escalations() {
        let message = json!({"kind": "message", "parts": [{"kind": "data", "data": {"x": 1}}]});
        assert_eq!(answer(&message).unwrap().unwrap().payload, json!({"x": 1}));
        let done = json!({"kind": "task", "id": "a", "status": {"state": "completed"},
            "artifacts": [{"parts": [{"kind": "text", "text": "hello"}]}]});
        assert_eq!(
            answer(&done).unwrap().unwrap().payload,
            json!({"text": "hello"})
        );
        let waiting = json!({"kind": "task", "id": "a", "status": {"state": "input-required",
            "message": {"parts": [{"kind": "text", "text": "which order?"}]}}});
        let asked = answer(&waiting).unwrap().unwrap().payload;
        assert_eq!(asked["a2a_state"], "input-required");
        assert_eq!(asked["message"]["text"], "which order?");
        let working = json!({"kind": "task", "id": "a", "status": {"state": "working"}});
        assert!(answer(&working).unwrap().is_none());
        let rejected = json!({"kind": "task", "id": "a", "status": {"state": "rejected"}});
        assert!(!answer(&rejected).unwrap_err().retryable);
        let failed = json!({"kind": "task", "id": "a", "status": {"state": "failed"}});
        assert!(answer(&failed).unwrap_err().retryable);
    }

    #[test]
    fn an_agent_card_becomes_a_card() {
        let agent = json!({
            "name": "Currency Agent", "description": "Converts money.", "url": "http://h/a2a",
            "version": "2.1.0", "defaultInputModes": ["text/plain"], "defaultOutputModes": ["application/json"],
            "skills": [{"id": "convert", "name": "Convert", "description": "d", "tags": ["fx"], "examples": ["10 USD in EUR"]}]
        });
        let card = card_from_agent_card(&agent).unwrap();
        assert_eq!(card.name, "currency_agent");
        assert_eq!(card.version, "2.1.0");
        assert_eq!(card.skills[0].tags, vec!["fx"]);
        assert_eq!(card.input_modes, vec!["text/plain"]);
        assert_eq!(
            card.runtime,
            Runtime::A2a {
                url: "http://h/a2a".into()
            }
        );
        assert_eq!(
            agent_card_url("http://h/"),
            "http://h/.well-known/agent-card.json"
        );
    }
}

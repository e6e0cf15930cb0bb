//! The pages that write: Dead letters (redrive), the Inbox (answer an escalation), and a task's
//! cancel button. Each action needs the token ([`super::auth`]) and publishes exactly what the CLI
//! would: `switchyard dlq redrive`, `switchyard submit --kind HUMAN_DECISION`, `--kind CANCEL`.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::auth::{Access, WriteForm};
use super::html::{esc, page, payload, time, url};
use super::pages::Flash;
use super::{failed, Console};
use crate::dlq::{self, Redriven, Selection};
use crate::envelope::{EventKind, TaskEvent};

/// Filters of the Dead letters page.
#[derive(Debug, Default, Deserialize)]
pub struct LetterFilter {
    reason: Option<String>,
    topic: Option<String>,
    task: Option<String>,
    flash: Option<String>,
}

fn some(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

/// `GET /dead-letters`: filter by reason, topic and task; headers and payload; redrive.
pub async fn dead_letters(
    State(console): State<Arc<Console>>,
    Query(filter): Query<LetterFilter>,
    headers: HeaderMap,
) -> Response {
    let letters = match console.index.dead_letters(
        some(&filter.reason),
        some(&filter.topic),
        some(&filter.task),
    ) {
        Ok(l) => l,
        Err(e) => return failed(e),
    };
    let writer = console.auth.access(&headers) == Access::Writer;
    let mut rows = String::new();
    for d in &letters {
        let pick = if writer {
            format!(
                "<input type=\"checkbox\" name=\"at\" value=\"{}:{}\">",
                d.partition, d.offset
            )
        } else {
            String::new()
        };
        let value = d
            .payload
            .as_deref()
            .map_or("(none: a tombstone)".to_string(), |p| {
                String::from_utf8_lossy(p).into_owned()
            });
        let _ = write!(
            rows,
            "<tr data-at=\"{p}:{o}\"><td>{pick}</td><td>{p}@{o}</td><td><a href=\"/tasks/{link}\">{task}</a></td>\
             <td class=\"reason\">{reason}</td><td>{message}</td><td>{topic}</td><td>{redrives}</td><td>{when}</td>\
             <td>{headers}{value}</td></tr>",
            p = d.partition,
            o = d.offset,
            link = url(&d.task_id),
            task = esc(&d.task_id),
            reason = esc(&d.reason),
            message = esc(&d.message),
            topic = esc(&d.source_topic),
            redrives = d.redrives + d.redriven,
            when = time(d.time),
            headers = payload("headers", &d.headers),
            value = payload("payload", &value),
        );
    }
    let head = "<tr><th></th><th>at</th><th>task</th><th>reason</th><th>message</th><th>from</th><th>redrives</th><th>when</th><th>record</th></tr>";
    let table =
        format!("<table id=\"dead-letters\"><thead>{head}</thead><tbody>{rows}</tbody></table>");
    let value = |v: &Option<String>| esc(v.as_deref().unwrap_or_default());
    let filters = format!(
        "<form method=\"get\" action=\"/dead-letters\"><input name=\"reason\" placeholder=\"reason\" value=\"{}\"> \
         <input name=\"topic\" placeholder=\"source topic\" value=\"{}\"> \
         <input name=\"task\" placeholder=\"task id\" value=\"{}\"> <button type=\"submit\">Filter</button></form>",
        value(&filter.reason),
        value(&filter.topic),
        value(&filter.task)
    );
    let body = if writer {
        format!(
            "{filters}<form method=\"post\" action=\"/dead-letters/redrive\" id=\"redrive-form\">{}{table}\
             <button type=\"submit\" id=\"redrive\">Redrive the selected</button> \
             <span class=\"muted\">at most {} redrives per record</span></form>",
            console.auth.csrf_input(),
            console.max_redrives
        )
    } else {
        format!("{filters}{table}")
    };
    Html(page(
        "Dead letters",
        "/dead-letters",
        filter.flash.as_deref(),
        &body,
    ))
    .into_response()
}

/// The positions a redrive form selected (`at=partition:offset`, repeated).
fn positions(form: &[(String, String)]) -> Vec<(i32, i64)> {
    form.iter()
        .filter(|(k, _)| k == "at")
        .filter_map(|(_, v)| {
            let (p, o) = v.split_once(':')?;
            Some((p.parse().ok()?, o.parse().ok()?))
        })
        .collect()
}

/// `POST /dead-letters/redrive`: sends the selected dead letters back to their source topics,
/// refusing those redriven `max_redrives` times already (counting redrives from this console).
pub async fn redrive(State(console): State<Arc<Console>>, form: WriteForm) -> Response {
    let mut said = Vec::new();
    for (partition, offset) in positions(&form.0) {
        let known = console
            .index
            .dead_letters(None, None, None)
            .unwrap_or_default()
            .into_iter()
            .find(|d| d.partition == partition && d.offset == offset);
        if let Some(d) = known.filter(|d| d.redrives + d.redriven >= console.max_redrives) {
            said.push(format!(
                "refused {partition}:{offset}: redriven {} times already, the limit is {}",
                d.redrives + d.redriven,
                console.max_redrives
            ));
            continue;
        }
        let selection = Selection {
            positions: vec![(partition, offset)],
            ..Selection::default()
        };
        match dlq::redrive(&console.kafka, &selection, console.max_redrives).await {
            Ok(outcomes) => {
                for outcome in outcomes {
                    said.push(match outcome {
                        Redriven::Sent { dead_letter: d } => {
                            let _ = console.index.redriven(d.partition, d.offset);
                            format!(
                                "redriven {}:{} to {}",
                                d.partition, d.offset, d.source_topic
                            )
                        }
                        Redriven::Refused {
                            dead_letter: d,
                            max,
                        } => format!(
                            "refused {}:{}: redriven {} times already, the limit is {max}",
                            d.partition, d.offset, d.redrives
                        ),
                        Redriven::NotSent {
                            dead_letter: d,
                            why,
                        } => {
                            format!("not sent {}:{}: {why}", d.partition, d.offset)
                        }
                    });
                }
            }
            Err(e) => said.push(format!("redrive of {partition}:{offset} failed: {e}")),
        }
    }
    if said.is_empty() {
        said.push("nothing selected".into());
    }
    Redirect::to(&format!("/dead-letters?flash={}", url(&said.join("; ")))).into_response()
}

/// `GET /inbox`: escalated tasks waiting for a person, with their context and an answer form.
pub async fn inbox(
    State(console): State<Arc<Console>>,
    Query(flash): Query<Flash>,
    headers: HeaderMap,
) -> Response {
    let filter = super::index::TaskFilter {
        status: Some("escalated".into()),
        ..Default::default()
    };
    let waiting = match console.index.tasks(&filter, crate::envelope::now_ms()) {
        Ok((rows, _)) => rows,
        Err(e) => return failed(e),
    };
    let writer = console.auth.access(&headers) == Access::Writer;
    let mut body = String::new();
    if waiting.is_empty() {
        body += "<p id=\"empty\">No task waits for a person.</p>";
    }
    for t in &waiting {
        let _ = write!(
            body,
            "<section class=\"escalation\" data-task=\"{id}\"><h2><a href=\"/tasks/{link}\">{id}</a></h2>\
             <p>waits for <b>{card}</b> (step {step}) since {since}</p>{context}",
            id = esc(&t.task_id),
            link = url(&t.task_id),
            card = esc(&t.card),
            step = t.waiting_step.map_or("?".into(), |s| s.to_string()),
            since = time(t.updated_at),
            context = payload("submitted with", t.payload.as_deref().unwrap_or("null")),
        );
        if writer {
            let _ = write!(
                body,
                "<form method=\"post\" action=\"/inbox/{link}/answer\">{csrf}\
                 <textarea name=\"payload\" rows=\"3\" cols=\"60\">{{\"approved\": true}}</textarea><br>\
                 <button type=\"submit\" class=\"answer\">Answer</button></form>",
                link = url(&t.task_id),
                csrf = console.auth.csrf_input()
            );
        }
        body += "</section>";
    }
    Html(page("Inbox", "/inbox", flash.flash.as_deref(), &body)).into_response()
}

/// Publishes `event` as the console, back to `to` with what happened.
async fn publish(console: &Console, event: TaskEvent, to: &str, done: &str) -> Response {
    let span =
        tracing::info_span!("console", task_id = %event.task_id, kind = %event.kind.as_str());
    let trace = crate::trace::hop(&span, Default::default());
    let said =
        match crate::publish::publish(&console.kafka, &console.codec, &event, None, &trace).await {
            Ok(()) => done.to_string(),
            Err(e) => format!("not published: {e}"),
        };
    Redirect::to(&format!("{to}?flash={}", url(&said))).into_response()
}

/// `POST /inbox/{id}/answer`: publishes the `HUMAN_DECISION` for the escalated step.
pub async fn answer(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    form: WriteForm,
) -> Response {
    let task = match console.index.task(&id) {
        Ok(Some(t)) if t.status == "escalated" => t,
        Ok(_) => {
            return Redirect::to("/inbox?flash=that%20task%20waits%20for%20nobody").into_response()
        }
        Err(e) => return failed(e),
    };
    let text = form.field("payload").unwrap_or("{}");
    let Ok(answer) = serde_json::from_str::<serde_json::Value>(text) else {
        return Redirect::to("/inbox?flash=the%20answer%20is%20not%20JSON").into_response();
    };
    let mut event = TaskEvent::new(&id, EventKind::HumanDecision, "console");
    event.step_id = task.waiting_step;
    event.tenant = task.tenant;
    event.payload = answer;
    let done = format!("answered {id}");
    publish(&console, event, "/inbox", &done).await
}

/// `POST /tasks/{id}/cancel`: publishes a `CANCEL` event for the task.
pub async fn cancel(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    _allowed: WriteForm,
) -> Response {
    let mut event = TaskEvent::new(&id, EventKind::Cancel, "console");
    if let Ok(Some(task)) = console.index.task(&id) {
        event.tenant = task.tenant;
    }
    let to = format!("/tasks/{}", url(&id));
    publish(&console, event, &to, "cancel requested").await
}

//! The read pages: Overview, Tasks (live), a task's timeline, and Agents.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;

use super::auth::Access;
use super::html::{esc, page, payload, time, url};
use super::index::{TaskFilter, TaskRow};
use super::{failed, Console};
use crate::envelope::{now_ms, StateEvent};
use crate::journey::describe;

/// Query of read pages: a flash message after an action.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Flash {
    /// The message.
    pub flash: Option<String>,
}

fn table(head: &[&str], rows: &str, id: &str) -> String {
    let head: String = head.iter().map(|h| format!("<th>{h}</th>")).collect();
    format!("<table id=\"{id}\"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
}

/// `GET /`: activity per minute, tasks by status, dead letters by reason, spend, slow cards.
pub async fn overview(State(console): State<Arc<Console>>) -> Response {
    let index = &console.index;
    let since = now_ms() - 30 * 60_000;
    let (minutes, statuses, reasons, spend, cards) = match (
        index.minutes(since),
        index.statuses(),
        index.reasons(),
        index.spend(),
        index.cards(now_ms() - 60 * 60_000),
    ) {
        (Ok(m), Ok(s), Ok(r), Ok(p), Ok(c)) => (m, s, r, p, c),
        _ => return failed("the index did not answer"),
    };
    let mut body = String::from("<h2>Tasks per minute (last 30 minutes)</h2>");
    let peak = minutes
        .iter()
        .map(|m| m.started.max(m.completed).max(m.failed))
        .max()
        .unwrap_or(1)
        .max(1);
    let bar = |n: i64| {
        format!(
            "<span class=\"bar\" style=\"width:{}px\"></span> {n}",
            n * 200 / peak
        )
    };
    let rows: String = minutes
        .iter()
        .map(|m| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                time(m.at),
                bar(m.started),
                bar(m.completed),
                bar(m.failed)
            )
        })
        .collect();
    body += &table(
        &["minute", "started", "completed", "failed"],
        &rows,
        "minutes",
    );
    let pairs = |list: &[(String, i64)]| -> String {
        list.iter()
            .map(|(k, n)| format!("<tr><td>{}</td><td>{n}</td></tr>", esc(k)))
            .collect()
    };
    let in_flight: i64 = statuses
        .iter()
        .filter(|(s, _)| matches!(s.as_str(), "running" | "awaiting_llm" | "escalated"))
        .map(|(_, n)| n)
        .sum();
    let _ = write!(
        body,
        "<p id=\"in-flight\"><b>{in_flight}</b> tasks in flight</p>"
    );
    body += "<h2>Tasks by status</h2>";
    body += &table(&["status", "tasks"], &pairs(&statuses), "statuses");
    body += "<h2>Dead letters by reason</h2>";
    body += &table(&["reason", "dead letters"], &pairs(&reasons), "reasons");
    body += "<h2>LLM decisions and spend by tenant</h2>";
    let rows: String = spend
        .iter()
        .map(|s| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td></tr>",
                esc(&s.tenant),
                esc(&s.by),
                s.calls,
                s.tokens,
                s.cost
            )
        })
        .collect();
    body += &table(
        &["tenant", "by", "decisions or results", "tokens", "cost"],
        &rows,
        "spend",
    );
    body += "<h2>Slowest cards (last hour)</h2>";
    body += &cards_table(&cards, &[]);
    Html(page("Overview", "/", None, &body)).into_response()
}

fn cards_table(cards: &[super::index::CardStats], extra: &[(String, String)]) -> String {
    let rows: String = cards
        .iter()
        .map(|c| {
            let more = extra
                .iter()
                .find(|(card, _)| *card == c.card)
                .map_or(String::new(), |(_, v)| format!("<td>{v}</td>"));
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td>{more}</tr>",
                esc(&c.card),
                c.results,
                c.failures,
                c.mean_ms.map_or("-".into(), |m| format!("{m:.0} ms"))
            )
        })
        .collect();
    table(
        &["card", "results", "failures", "mean step time"],
        &rows,
        "cards",
    )
}

/// The rows of the Tasks table.
fn task_rows_html(rows: &[TaskRow]) -> String {
    let mut out = String::new();
    for t in rows {
        let _ = write!(
            out,
            "<tr data-task=\"{id}\"><td><a href=\"/tasks/{link}\">{id}</a></td><td>{tenant}</td>\
             <td class=\"status-{status}\">{status}</td><td>{card}</td><td>{events}</td><td>{updated}</td></tr>",
            id = esc(&t.task_id),
            link = url(&t.task_id),
            tenant = esc(&t.tenant),
            status = esc(&t.status),
            card = esc(&t.card),
            events = t.events,
            updated = time(t.updated_at),
        );
    }
    out
}

/// `GET /tasks/rows`: the rows of the Tasks table for the same filters, which the page polls.
pub async fn task_rows(
    State(console): State<Arc<Console>>,
    Query(filter): Query<TaskFilter>,
) -> Response {
    match console.index.tasks(&filter, now_ms()) {
        Ok((rows, _)) => Html(task_rows_html(&rows)).into_response(),
        Err(e) => failed(e),
    }
}

/// `GET /tasks`: the list with filters and paging; new tasks appear without a reload.
pub async fn tasks(
    State(console): State<Arc<Console>>,
    Query(filter): Query<TaskFilter>,
) -> Response {
    let (rows, more) = match console.index.tasks(&filter, now_ms()) {
        Ok(found) => found,
        Err(e) => return failed(e),
    };
    let value = |v: &Option<String>| esc(v.as_deref().unwrap_or_default());
    let statuses = [
        "",
        "running",
        "awaiting_llm",
        "escalated",
        "completed",
        "cancelled",
        "dead_lettered",
    ];
    let options: String = statuses
        .iter()
        .map(|s| {
            let selected = if filter.status.as_deref().unwrap_or_default() == *s {
                " selected"
            } else {
                ""
            };
            format!(
                "<option value=\"{s}\"{selected}>{}</option>",
                if s.is_empty() { "any status" } else { s }
            )
        })
        .collect();
    let page_no = filter.page.unwrap_or(0);
    let link = |page: u32| {
        let mut q = String::new();
        for (k, v) in [
            ("status", &filter.status),
            ("card", &filter.card),
            ("tenant", &filter.tenant),
            ("q", &filter.q),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                let _ = write!(q, "{k}={}&", url(v));
            }
        }
        if let Some(age) = filter.max_age_minutes {
            let _ = write!(q, "max_age_minutes={age}&");
        }
        format!("/tasks?{q}page={page}")
    };
    let mut paging = String::new();
    if page_no > 0 {
        let _ = write!(
            paging,
            "<a id=\"prev\" href=\"{}\">← newer</a> ",
            esc(&link(page_no - 1))
        );
    }
    if more {
        let _ = write!(
            paging,
            "<a id=\"next\" href=\"{}\">older →</a>",
            esc(&link(page_no + 1))
        );
    }
    let body = format!(
        "<form method=\"get\" action=\"/tasks\" id=\"filters\">\
         <select name=\"status\">{options}</select> \
         <input name=\"card\" placeholder=\"card\" value=\"{card}\"> \
         <input name=\"tenant\" placeholder=\"tenant\" value=\"{tenant}\"> \
         <input name=\"max_age_minutes\" placeholder=\"updated within (minutes)\" value=\"{age}\"> \
         <input name=\"q\" placeholder=\"text in the task id\" value=\"{q}\"> \
         <button type=\"submit\">Filter</button></form>\
         {table}<p>{paging}</p>\
         <script>\
         const rows = document.querySelector('#tasks tbody');\
         const src = '/tasks/rows' + location.search;\
         setInterval(async () => {{\
           const r = await fetch(src); if (r.ok) {{ const t = await r.text(); if (rows.innerHTML !== t) rows.innerHTML = t; }}\
         }}, 1000);\
         </script>",
        card = value(&filter.card),
        tenant = value(&filter.tenant),
        age = filter.max_age_minutes.map_or(String::new(), |a| a.to_string()),
        q = value(&filter.q),
        table = table(
            &["task", "tenant", "status", "waiting for", "events", "updated"],
            &task_rows_html(&rows),
            "tasks"
        ),
    );
    Html(page("Tasks", "/tasks", None, &body)).into_response()
}

/// One decision of a task's timeline as an item.
fn decision_html(offset: i64, record: &StateEvent) -> String {
    let mut out = format!(
        "<li class=\"decision\" data-seq=\"{}\"><span class=\"muted\">{} #{} @{offset}</span> <code>{}</code>",
        record.seq,
        time(record.at),
        record.seq,
        esc(&describe(record))
    );
    if let Some(llm) = &record.llm {
        let _ = write!(
            out,
            "<div class=\"llm\">LLM <b>{model}</b> chose <b class=\"llm-choice\">{choice}</b>; \
             reason: <span class=\"llm-reason\">{reason}</span>; confidence {confidence}; \
             tokens {tin} in / {tout} out; {latency} ms{error}</div>",
            model = esc(&llm.model),
            choice = esc(llm.agent.as_deref().unwrap_or("nothing")),
            reason = esc(llm.reason.as_deref().unwrap_or("-")),
            confidence = llm.confidence.map_or("-".into(), |c| format!("{c:.2}")),
            tin = llm.usage.tokens_in,
            tout = llm.usage.tokens_out,
            latency = llm.latency_ms,
            error = llm
                .error
                .as_deref()
                .map_or(String::new(), |e| format!("; error: {}", esc(e))),
        );
    }
    if let Some(event) = &record.event {
        out += &payload(
            &format!("{} payload", event.kind.as_str()),
            &event.payload.to_string(),
        );
    }
    out += "</li>";
    out
}

/// `GET /tasks/{id}`: the task's timeline, as `switchyard audit` prints it, with payloads.
pub async fn task(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    Query(flash): Query<Flash>,
    headers: HeaderMap,
) -> Response {
    let (task, timeline, letters) = match (
        console.index.task(&id),
        console.index.timeline(&id),
        console.index.dead_letters(None, None, Some(&id)),
    ) {
        (Ok(t), Ok(l), Ok(d)) => (t, l, d),
        _ => return failed("the index did not answer"),
    };
    let Some(task) = task else {
        let body = format!(
            "<p>No task <code>{}</code> in the index (yet).</p>",
            esc(&id)
        );
        return (
            axum::http::StatusCode::NOT_FOUND,
            Html(page("Task", "/tasks", None, &body)),
        )
            .into_response();
    };
    let mut body = format!(
        "<p>Task <code id=\"task-id\">{}</code>, tenant {}, status <b id=\"status\" class=\"status-{}\">{}</b>, \
         {} records.</p>",
        esc(&task.task_id),
        esc(&task.tenant),
        esc(&task.status),
        esc(&task.status),
        task.events
    );
    let open = !matches!(
        task.status.as_str(),
        "completed" | "cancelled" | "dead_lettered"
    );
    if open && console.auth.access(&headers) == Access::Writer {
        let _ = write!(
            body,
            "<form class=\"inline\" method=\"post\" action=\"/tasks/{}/cancel\">{}\
             <button type=\"submit\" id=\"cancel\">Cancel the task</button></form>",
            url(&task.task_id),
            console.auth.csrf_input()
        );
    }
    body += "<ol id=\"timeline\">";
    for (offset, record) in &timeline {
        body += &decision_html(*offset, record);
    }
    body += "</ol>";
    if !letters.is_empty() {
        body += "<h2>Dead letters</h2><ul>";
        for d in &letters {
            let _ = write!(
                body,
                "<li><a href=\"/dead-letters?task={}\">{}@{}</a> {}: {}</li>",
                url(&d.task_id),
                d.partition,
                d.offset,
                esc(&d.reason),
                esc(&d.message)
            );
        }
        body += "</ul>";
    }
    Html(page(
        &format!("Task {}", task.task_id),
        "/tasks",
        flash.flash.as_deref(),
        &body,
    ))
    .into_response()
}

/// The lag of `group` on `topic`: high watermarks minus committed offsets, summed.
fn lag(console: &Console, group: &str, topic: &str) -> Option<i64> {
    let mut config = console.kafka.client_config();
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = config.create().ok()?;
    let partitions = console.kafka.partition_count(topic).ok()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let timeout = std::time::Duration::from_secs(3);
    let committed = consumer.committed_offsets(tpl, timeout).ok()?;
    let mut total = 0;
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout).ok()?;
        let at = committed
            .find_partition(topic, p)
            .and_then(|e| e.offset().to_raw())
            .filter(|o| *o >= 0)
            .unwrap_or(low);
        total += (high - at).max(0);
    }
    Some(total)
}

/// `GET /agents`: per card, its topic's lag, results and failures, and its breaker.
pub async fn agents(State(console): State<Arc<Console>>) -> Response {
    let since = now_ms() - 60 * 60_000;
    let (stats, breakers) = match (console.index.cards(since), console.index.breakers()) {
        (Ok(s), Ok(b)) => (s, b),
        _ => return failed("the index did not answer"),
    };
    let probe = console.clone();
    let lags = tokio::task::spawn_blocking(move || {
        let prefix = probe.kafka.topic_prefix.clone();
        probe
            .workflow
            .cards
            .iter()
            .map(|c| {
                let group = format!("{prefix}.agent.{}", c.name);
                (
                    c.name.clone(),
                    c.topic(&prefix),
                    lag(&probe, &group, &c.topic(&prefix)),
                )
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut rows = String::new();
    for (card, topic, lag) in lags {
        let s = stats.iter().find(|s| s.card == card);
        let breaker = breakers
            .iter()
            .find(|(c, _)| *c == card)
            .map_or("Closed", |(_, phase)| phase.as_str());
        let _ = write!(
            rows,
            "<tr data-card=\"{c}\"><td>{c}</td><td>{t}</td><td class=\"lag\">{lag}</td><td>{r}</td><td>{f}</td><td>{m}</td><td>{b}</td></tr>",
            c = esc(&card),
            t = esc(&topic),
            lag = lag.map_or("?".into(), |l| l.to_string()),
            r = s.map_or(0, |s| s.results),
            f = s.map_or(0, |s| s.failures),
            m = s.and_then(|s| s.mean_ms).map_or("-".into(), |m| format!("{m:.0} ms")),
            b = esc(breaker),
        );
    }
    let body = table(
        &[
            "card",
            "topic",
            "lag",
            "results (1 h)",
            "failures (1 h)",
            "mean step time",
            "breaker",
        ],
        &rows,
        "agents",
    );
    Html(page("Agents", "/agents", None, &body)).into_response()
}

//! The console's index: an SQLite file that holds what the console shows, built from the state
//! and dead-letter topics, with the next offset of every partition it has read, so that a
//! restarted console goes on where it stopped. Every write of a batch of records is one SQLite
//! transaction together with the positions it advances: the index never holds a record twice
//! nor skips one.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::dlq::DeadLetter;
use crate::envelope::{Decision, EventKind, StateEvent};

/// The version of [`SCHEMA`]; an index of another version is built again.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA cache_size = -65536;
PRAGMA mmap_size = 1073741824;
PRAGMA temp_store = MEMORY;
CREATE TABLE IF NOT EXISTS positions (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next INTEGER NOT NULL,
    PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, status TEXT NOT NULL, card TEXT NOT NULL,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, events INTEGER NOT NULL,
    waiting_step INTEGER, payload TEXT, sent_at INTEGER);
CREATE INDEX IF NOT EXISTS tasks_updated ON tasks (updated_at);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status, updated_at);
CREATE INDEX IF NOT EXISTS tasks_card ON tasks (card, updated_at);
CREATE INDEX IF NOT EXISTS tasks_tenant ON tasks (tenant, updated_at);
CREATE TABLE IF NOT EXISTS events (
    partition INTEGER NOT NULL, offset INTEGER NOT NULL, idx INTEGER NOT NULL,
    task_id TEXT NOT NULL, at INTEGER NOT NULL, kind TEXT NOT NULL, decision TEXT NOT NULL,
    record TEXT NOT NULL, PRIMARY KEY (partition, offset, idx));
CREATE INDEX IF NOT EXISTS events_task ON events (task_id);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE TABLE IF NOT EXISTS edges (at INTEGER NOT NULL, source TEXT NOT NULL, target TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS edges_at ON edges (at);
CREATE TABLE IF NOT EXISTS answers (
    at INTEGER NOT NULL, card TEXT NOT NULL, ok INTEGER NOT NULL, latency_ms INTEGER);
CREATE INDEX IF NOT EXISTS answers_at ON answers (at);
CREATE TABLE IF NOT EXISTS spend (
    at INTEGER NOT NULL, tenant TEXT NOT NULL, who TEXT NOT NULL, tokens INTEGER NOT NULL,
    cost REAL NOT NULL);
CREATE TABLE IF NOT EXISTS breakers (card TEXT PRIMARY KEY, phase TEXT NOT NULL, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    partition INTEGER NOT NULL, offset INTEGER NOT NULL, task_id TEXT NOT NULL,
    reason TEXT NOT NULL, message TEXT NOT NULL, source_topic TEXT NOT NULL,
    redrives INTEGER NOT NULL, time INTEGER NOT NULL, headers TEXT NOT NULL, payload BLOB,
    redriven INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (partition, offset));
";

/// Errors of the index: SQLite's.
pub type Error = rusqlite::Error;

/// What a task's page and list show of it.
#[derive(Debug, Clone, Serialize)]
pub struct TaskRow {
    /// The task.
    pub task_id: String,
    /// Its tenant.
    pub tenant: String,
    /// `running`, `awaiting_llm`, `escalated`, `completed`, `cancelled` or `dead_lettered`.
    pub status: String,
    /// The card(s) it waits for now.
    pub card: String,
    /// First record, ms since the Unix epoch.
    pub created_at: i64,
    /// Last record, ms since the Unix epoch.
    pub updated_at: i64,
    /// How many state records it has.
    pub events: i64,
    /// The escalated step waiting for a person.
    pub waiting_step: Option<u32>,
    /// The payload it was submitted with (JSON).
    pub payload: Option<String>,
}

/// The filters of the Tasks page.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct TaskFilter {
    /// Only this status.
    pub status: Option<String>,
    /// Only tasks waiting for this card.
    pub card: Option<String>,
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only tasks updated within this many minutes.
    pub max_age_minutes: Option<i64>,
    /// Only task ids that contain this text.
    pub q: Option<String>,
    /// Page number, from 0.
    pub page: Option<u32>,
}

/// One dead letter as the index keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct LetterRow {
    /// Partition of the dead-letter topic.
    pub partition: i32,
    /// Offset there.
    pub offset: i64,
    /// Its key (the task id where there was one).
    pub task_id: String,
    /// Reason code.
    pub reason: String,
    /// Explanation.
    pub message: String,
    /// The topic it came from.
    pub source_topic: String,
    /// Redrives before it was dead-lettered.
    pub redrives: u32,
    /// Redrives of this record from the console.
    pub redriven: u32,
    /// When, ms since the Unix epoch.
    pub time: i64,
    /// Its headers, as JSON.
    pub headers: String,
    /// Its value (a prefix when truncated).
    pub payload: Option<Vec<u8>>,
}

/// One minute of the Overview's activity chart.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Minute {
    /// Minute start, ms since the Unix epoch.
    pub at: i64,
    /// Tasks submitted.
    pub started: i64,
    /// Tasks completed.
    pub completed: i64,
    /// Tasks dead-lettered or cancelled.
    pub failed: i64,
}

/// What one tenant spent through one kind of caller.
#[derive(Debug, Clone, Serialize)]
pub struct Spend {
    /// The tenant.
    pub tenant: String,
    /// `llm_decider` or `agents`.
    pub by: String,
    /// LLM decisions, or results that reported usage.
    pub calls: i64,
    /// Tokens in and out.
    pub tokens: i64,
    /// Cost.
    pub cost: f64,
}

/// A card's answers over a window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CardStats {
    /// The card.
    pub card: String,
    /// Results.
    pub results: i64,
    /// Failures.
    pub failures: i64,
    /// Mean step latency in ms (work item sent to result recorded), when known.
    pub mean_ms: Option<f64>,
}

/// The index file.
pub struct Index {
    db: Mutex<Connection>,
}

/// One page of rows with the page size used.
pub const PAGE: u32 = 50;

impl Index {
    /// Opens (or creates) the index at `path`. An index written by another version of the
    /// schema is built again from the topics: it holds nothing they do not.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let mut db = Connection::open(path)?;
        let version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let tables: i64 = db.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
        if version != SCHEMA_VERSION && tables > 0 {
            tracing::warn!(path = %path.display(), version, "the console index has another schema; building it again");
            drop(db);
            for suffix in ["", "-wal", "-shm"] {
                let mut file = path.as_os_str().to_owned();
                file.push(suffix);
                let _ = std::fs::remove_file(file);
            }
            db = Connection::open(path)?;
        }
        db.execute_batch(SCHEMA)?;
        db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next offset to read of each partition of `topic` that the index has read.
    pub fn positions(&self, topic: &str) -> Result<Vec<(i32, i64)>, Error> {
        let db = self.db();
        let mut q = db.prepare("SELECT partition, next FROM positions WHERE topic = ?1")?;
        let rows = q.query_map([topic], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// Adds state records `(partition, offset, events)` read from `topic` (records that are not
    /// state records are passed without events and only advance the position), in one
    /// transaction.
    pub fn add_state(
        &self,
        topic: &str,
        records: &[(i32, i64, Vec<StateEvent>)],
    ) -> Result<(), Error> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for (partition, offset, events) in records {
            for (idx, record) in events.iter().enumerate() {
                if !record.task_id.is_empty() {
                    add_event(&tx, (*partition, *offset, idx), record)?;
                }
            }
            advance(&tx, topic, *partition, *offset)?;
        }
        tx.commit()
    }

    /// Adds dead letters read from `topic`, in one transaction.
    pub fn add_dead_letters(&self, topic: &str, letters: &[DeadLetter]) -> Result<(), Error> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for d in letters {
            tx.execute(
                "INSERT OR IGNORE INTO dead_letters (partition, offset, task_id, reason, message,
                 source_topic, redrives, time, headers, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    d.partition,
                    d.offset,
                    d.key,
                    d.reason,
                    d.message,
                    d.source_topic,
                    d.redrives,
                    d.time,
                    serde_json::to_string(&d.headers).unwrap_or_default(),
                    d.payload
                ],
            )?;
            advance(&tx, topic, d.partition, d.offset)?;
        }
        tx.commit()
    }

    /// Counts a redrive of the dead letter at `partition`/`offset` made from the console.
    pub fn redriven(&self, partition: i32, offset: i64) -> Result<(), Error> {
        self.db().execute(
            "UPDATE dead_letters SET redriven = redriven + 1 WHERE partition = ?1 AND offset = ?2",
            params![partition, offset],
        )?;
        Ok(())
    }

    /// How many tasks and state records the index holds.
    pub fn counts(&self) -> Result<(i64, i64), Error> {
        let db = self.db();
        let tasks = db.query_row("SELECT count(*) FROM tasks", [], |r| r.get(0))?;
        let events = db.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
        Ok((tasks, events))
    }

    /// One page of tasks, newest first, that pass `filter`, and whether there are more.
    pub fn tasks(&self, filter: &TaskFilter, now: i64) -> Result<(Vec<TaskRow>, bool), Error> {
        let mut sql = String::from("SELECT * FROM tasks WHERE 1 = 1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut arg = |sql: &mut String, clause: &str, value: rusqlite::types::Value| {
            args.push(value);
            sql.push_str(&format!(" AND {clause} ?{}", args.len()));
        };
        let text = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        if let Some(status) = text(&filter.status) {
            arg(&mut sql, "status =", status.into());
        }
        if let Some(card) = text(&filter.card) {
            arg(&mut sql, "card =", card.into());
        }
        if let Some(tenant) = text(&filter.tenant) {
            arg(&mut sql, "tenant =", tenant.into());
        }
        if let Some(minutes) = filter.max_age_minutes.filter(|m| *m > 0) {
            arg(&mut sql, "updated_at >=", (now - minutes * 60_000).into());
        }
        if let Some(q) = text(&filter.q) {
            arg(&mut sql, "instr(task_id,", q.into());
            sql.push_str(") > 0");
        }
        let page = filter.page.unwrap_or(0);
        sql.push_str(&format!(
            " ORDER BY updated_at DESC, task_id LIMIT {} OFFSET {}",
            PAGE + 1,
            page * PAGE
        ));
        let db = self.db();
        let mut q = db.prepare(&sql)?;
        let mut rows: Vec<TaskRow> = q
            .query_map(rusqlite::params_from_iter(args), task_row)?
            .collect::<Result<_, _>>()?;
        let more = rows.len() > PAGE as usize;
        rows.truncate(PAGE as usize);
        Ok((rows, more))
    }

    /// The task `task_id`, if indexed.
    pub fn task(&self, task_id: &str) -> Result<Option<TaskRow>, Error> {
        self.db()
            .query_row(
                "SELECT * FROM tasks WHERE task_id = ?1",
                [task_id],
                task_row,
            )
            .optional()
    }

    /// The state records of `task_id` in order, with their offsets.
    pub fn timeline(&self, task_id: &str) -> Result<Vec<(i64, StateEvent)>, Error> {
        let db = self.db();
        let mut q = db.prepare(
            "SELECT offset, record FROM events WHERE task_id = ?1 ORDER BY partition, offset, idx",
        )?;
        let rows = q.query_map([task_id], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (offset, json) = row?;
            if let Ok(record) = serde_json::from_str(&json) {
                out.push((offset, record));
            }
        }
        Ok(out)
    }

    /// Dead letters, newest first, with this reason and source topic when given.
    pub fn dead_letters(
        &self,
        reason: Option<&str>,
        topic: Option<&str>,
        task: Option<&str>,
    ) -> Result<Vec<LetterRow>, Error> {
        let db = self.db();
        let mut q = db.prepare(
            "SELECT partition, offset, task_id, reason, message, source_topic, redrives, redriven,
                    time, headers, payload
             FROM dead_letters
             WHERE (?1 IS NULL OR reason = ?1) AND (?2 IS NULL OR source_topic = ?2)
               AND (?3 IS NULL OR task_id = ?3)
             ORDER BY time DESC LIMIT 500",
        )?;
        let rows = q.query_map(params![reason, topic, task], |r| {
            Ok(LetterRow {
                partition: r.get(0)?,
                offset: r.get(1)?,
                task_id: r.get(2)?,
                reason: r.get(3)?,
                message: r.get(4)?,
                source_topic: r.get(5)?,
                redrives: r.get(6)?,
                redriven: r.get(7)?,
                time: r.get(8)?,
                headers: r.get(9)?,
                payload: r.get(10)?,
            })
        })?;
        rows.collect()
    }

    /// Tasks started, completed and failed per minute since `since`.
    pub fn minutes(&self, since: i64) -> Result<Vec<Minute>, Error> {
        let db = self.db();
        let mut q = db.prepare(
            "SELECT at / 60000 * 60000 AS minute,
                    sum(kind = 'SUBMITTED' AND decision NOT IN ('DROPPED', 'DEAD_LETTERED')),
                    sum(decision = 'COMPLETED'),
                    sum(decision IN ('CANCELLED', 'DEAD_LETTERED'))
             FROM events WHERE at >= ?1 GROUP BY minute ORDER BY minute",
        )?;
        let rows = q.query_map([since], |r| {
            Ok(Minute {
                at: r.get(0)?,
                started: r.get(1)?,
                completed: r.get(2)?,
                failed: r.get(3)?,
            })
        })?;
        rows.collect()
    }

    /// How many tasks have each status.
    pub fn statuses(&self) -> Result<Vec<(String, i64)>, Error> {
        self.grouped(
            "SELECT status, count(*) FROM tasks GROUP BY status ORDER BY status",
            [],
        )
    }

    /// Dead letters by reason.
    pub fn reasons(&self) -> Result<Vec<(String, i64)>, Error> {
        self.grouped(
            "SELECT reason, count(*) FROM dead_letters GROUP BY reason ORDER BY count(*) DESC",
            [],
        )
    }

    /// Calls (LLM decisions, or agents' results with usage), tokens and cost by tenant and by
    /// whom (`llm_decider` or `agents`).
    pub fn spend(&self) -> Result<Vec<Spend>, Error> {
        let db = self.db();
        let mut q = db.prepare(
            "SELECT tenant, who, count(*), sum(tokens), sum(cost) FROM spend GROUP BY tenant, who
             ORDER BY tenant, who",
        )?;
        let rows = q.query_map([], |r| {
            Ok(Spend {
                tenant: r.get(0)?,
                by: r.get(1)?,
                calls: r.get(2)?,
                tokens: r.get(3)?,
                cost: r.get(4)?,
            })
        })?;
        rows.collect()
    }

    /// Results, failures and mean latency per card since `since`, slowest first.
    pub fn cards(&self, since: i64) -> Result<Vec<CardStats>, Error> {
        let db = self.db();
        let mut q = db.prepare(
            "SELECT card, sum(ok), sum(NOT ok), avg(latency_ms) FROM answers WHERE at >= ?1
             GROUP BY card ORDER BY avg(latency_ms) DESC",
        )?;
        let rows = q.query_map([since], |r| {
            Ok(CardStats {
                card: r.get(0)?,
                results: r.get(1)?,
                failures: r.get(2)?,
                mean_ms: r.get(3)?,
            })
        })?;
        rows.collect()
    }

    /// How many tasks took each edge (`source` card → `target` card) since `since`.
    pub fn edges(&self, since: i64) -> Result<Vec<(String, String, i64)>, Error> {
        let db = self.db();
        let mut q = db.prepare(
            "SELECT source, target, count(*) FROM edges WHERE at >= ?1 GROUP BY source, target",
        )?;
        let rows = q.query_map([since], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect()
    }

    /// Each card's breaker as last recorded.
    pub fn breakers(&self) -> Result<Vec<(String, String)>, Error> {
        self.grouped("SELECT card, phase FROM breakers ORDER BY card", [])
    }

    fn grouped<T: rusqlite::types::FromSql>(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<(String, T)>, Error> {
        let db = self.db();
        let mut q = db.prepare(sql)?;
        let rows = q.query_map(args, |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }
}

fn task_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRow> {
    Ok(TaskRow {
        task_id: r.get("task_id")?,
        tenant: r.get("tenant")?,
        status: r.get("status")?,
        card: r.get("card")?,
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
        events: r.get("events")?,
        waiting_step: r.get("waiting_step")?,
        payload: r.get("payload")?,
    })
}

fn advance(
    tx: &rusqlite::Transaction<'_>,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO positions (topic, partition, next) VALUES (?1, ?2, ?3)
         ON CONFLICT (topic, partition) DO UPDATE SET next = max(next, excluded.next)",
        params![topic, partition, offset + 1],
    )?;
    Ok(())
}

/// What a decision makes of the task: its new status and the card(s) it waits for, and the
/// escalated step; `None` leaves the task as it was.
fn status_of(decision: &Decision) -> Option<(&'static str, String, Option<u32>)> {
    let cards = |steps: &[crate::envelope::Step]| {
        steps
            .iter()
            .map(|s| s.card.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    Some(match decision {
        Decision::Routed { steps, .. } => ("running", cards(steps), None),
        Decision::RetryScheduled { step }
        | Decision::Dispatched { step }
        | Decision::Reminded { step } => ("running", step.card.clone(), None),
        Decision::Escalated { step, .. } => ("escalated", step.card.clone(), Some(step.step_id)),
        Decision::AwaitingLlm { .. } => ("awaiting_llm", String::new(), None),
        Decision::Completed { .. } => ("completed", String::new(), None),
        Decision::Cancelled => ("cancelled", String::new(), None),
        Decision::DeadLettered {
            ends_task: true, ..
        } => ("dead_lettered", String::new(), None),
        _ => return None,
    })
}

fn add_event(
    tx: &rusqlite::Transaction<'_>,
    (partition, offset, idx): (i32, i64, usize),
    record: &StateEvent,
) -> Result<(), Error> {
    let kind = record.event.as_ref().map_or("", |e| e.kind.as_str());
    let decision = record.decision.name();
    let json = serde_json::to_string(record).unwrap_or_default();
    let added = tx.execute(
        "INSERT OR IGNORE INTO events (partition, offset, idx, task_id, at, kind, decision, record)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            partition,
            offset,
            idx as i64,
            record.task_id,
            record.at,
            kind,
            decision,
            json
        ],
    )?;
    if added == 0 {
        return Ok(());
    }
    let tenant = record.event.as_ref().map(|e| e.tenant.as_str());
    let submitted = record
        .event
        .as_ref()
        .filter(|e| e.kind == EventKind::Submitted)
        .map(|e| e.payload.to_string());
    tx.execute(
        "INSERT INTO tasks (task_id, tenant, status, card, created_at, updated_at, events, payload)
         VALUES (?1, coalesce(?2, 'default'), 'running', '', ?3, ?3, 1, ?4)
         ON CONFLICT (task_id) DO UPDATE SET
             tenant = coalesce(?2, tenant), updated_at = max(updated_at, ?3),
             events = events + 1, payload = coalesce(payload, ?4)",
        params![record.task_id, tenant, record.at, submitted],
    )?;
    let from = match &record.event {
        Some(e) if e.kind == EventKind::Submitted => "start".to_string(),
        Some(e) => e.source.clone(),
        None => String::new(),
    };
    let targets: Vec<String> = match &record.decision {
        Decision::Routed { steps, .. } => steps.iter().map(|s| s.card.clone()).collect(),
        Decision::Escalated { step, .. } => vec![step.card.clone()],
        Decision::Completed { .. } => vec!["done".into()],
        _ => vec![],
    };
    if !from.is_empty() {
        for target in targets {
            tx.execute(
                "INSERT INTO edges (at, source, target) VALUES (?1, ?2, ?3)",
                params![record.at, from, target],
            )?;
        }
    }
    if let Some(e) = record.event.as_ref().filter(|e| {
        matches!(e.kind, EventKind::Result | EventKind::Failed) && record.answers_step.is_some()
    }) {
        // From the latest decision that sent the task's work (this record's own comes later).
        let sent: Option<i64> = tx.query_row(
            "SELECT sent_at FROM tasks WHERE task_id = ?1",
            [&record.task_id],
            |r| r.get(0),
        )?;
        let latency = sent.map(|sent| record.at - sent);
        tx.execute(
            "INSERT INTO answers (at, card, ok, latency_ms) VALUES (?1, ?2, ?3, ?4)",
            params![record.at, e.source, e.kind == EventKind::Result, latency],
        )?;
        if let Some(usage) = &e.usage {
            tx.execute(
                "INSERT INTO spend (at, tenant, who, tokens, cost) VALUES (?1, ?2, 'agents', ?3, ?4)",
                params![
                    record.at,
                    e.tenant,
                    (usage.tokens_in + usage.tokens_out) as i64,
                    usage.cost
                ],
            )?;
        }
    }
    if let Some(llm) = &record.llm {
        tx.execute(
            "INSERT INTO spend (at, tenant, who, tokens, cost) VALUES (?1, ?2, 'llm_decider', ?3, ?4)",
            params![
                record.at,
                tenant.unwrap_or("default"),
                (llm.usage.tokens_in + llm.usage.tokens_out) as i64,
                llm.usage.cost
            ],
        )?;
    }
    if let Some((status, card, waiting)) = status_of(&record.decision) {
        let sends = matches!(
            record.decision,
            Decision::Routed { .. }
                | Decision::Dispatched { .. }
                | Decision::RetryScheduled { .. }
                | Decision::Escalated { .. }
        );
        tx.execute(
            "UPDATE tasks SET status = ?2, card = ?3, waiting_step = ?4,
             sent_at = CASE WHEN ?5 THEN ?6 ELSE sent_at END WHERE task_id = ?1",
            params![record.task_id, status, card, waiting, sends, record.at],
        )?;
    }
    for b in &record.breakers {
        tx.execute(
            "INSERT INTO breakers (card, phase, at) VALUES (?1, ?2, ?3)
             ON CONFLICT (card) DO UPDATE SET phase = ?2, at = ?3",
            params![b.card, format!("{:?}", b.phase), record.at],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{DecidedBy, Step, TaskEvent};

    fn record(task: &str, seq: u64, decision: Decision, tenant: &str, at: i64) -> StateEvent {
        let mut event = TaskEvent::new(task, EventKind::Submitted, "client");
        event.tenant = tenant.into();
        StateEvent {
            event: Some(event),
            ..StateEvent::new(task, seq, (0, "t"), decision, at)
        }
    }

    #[test]
    fn each_decision_of_a_record_that_holds_several_is_indexed_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("i.sqlite")).unwrap();
        let together = vec![
            record("t", 1, Decision::Queued, "a", 5),
            record("u", 1, Decision::Queued, "a", 5),
            record("t", 2, Decision::Cancelled, "a", 5),
        ];
        let records = [(1, 7, together)];
        index.add_state("s", &records).unwrap();
        index.add_state("s", &records).unwrap();
        assert_eq!(index.counts().unwrap(), (2, 3));
        assert_eq!(index.positions("s").unwrap(), vec![(1, 8)]);
        let timeline = index.timeline("t").unwrap();
        let seqs: Vec<_> = timeline.iter().map(|(o, r)| (*o, r.seq)).collect();
        assert_eq!(seqs, [(7, 1), (7, 2)]);
    }

    #[test]
    fn tasks_are_filtered_paged_and_never_indexed_twice() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("i.sqlite")).unwrap();
        let routed = |card: &str| Decision::Routed {
            steps: vec![Step::new(1, card, 1)],
            decided_by: DecidedBy::Rule {
                rule_id: "r".into(),
            },
        };
        let mut records = Vec::new();
        for i in 0..120 {
            let tenant = if i % 2 == 0 { "even" } else { "odd" };
            let decision = if i % 3 == 0 {
                Decision::Completed {
                    rule_id: "done".into(),
                }
            } else {
                routed("billing")
            };
            records.push((
                0,
                i,
                vec![record(&format!("task-{i}"), 1, decision, tenant, i)],
            ));
        }
        records.push((0, 120, Vec::new()));
        index.add_state("s", &records).unwrap();
        index.add_state("s", &records[..10]).unwrap();
        assert_eq!(index.counts().unwrap(), (120, 120));
        assert_eq!(index.positions("s").unwrap(), vec![(0, 121)]);
        let filter = |f: TaskFilter| index.tasks(&f, 1_000).unwrap();
        let (all, more) = filter(TaskFilter::default());
        assert_eq!((all.len(), more), (PAGE as usize, true));
        assert_eq!(all[0].task_id, "task-119", "newest first");
        let (last, more) = filter(TaskFilter {
            page: Some(2),
            ..Default::default()
        });
        assert_eq!((last.len(), more), (20, false));
        let (done, _) = filter(TaskFilter {
            status: Some("completed".into()),
            tenant: Some("even".into()),
            ..Default::default()
        });
        assert_eq!(done.len(), 20);
        assert!(done
            .iter()
            .all(|t| t.status == "completed" && t.tenant == "even"));
        let (waiting, _) = filter(TaskFilter {
            card: Some("billing".into()),
            q: Some("task-1".into()),
            ..Default::default()
        });
        assert!(!waiting.is_empty());
        assert!(waiting
            .iter()
            .all(|t| t.card == "billing" && t.task_id.contains("task-1")));
        let (none, _) = filter(TaskFilter {
            q: Some("%".into()),
            ..Default::default()
        });
        assert!(none.is_empty(), "the text filter is literal");
    }
}

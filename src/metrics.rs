//! Prometheus metrics and the `/metrics`, `/health` and `/ready` endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::error::Result;

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauges(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(registry: &Registry, name: &str, help: &str) -> Result<Histogram> {
    let buckets = prometheus::exponential_buckets(0.0005, 2.0, 16)?;
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

/// Metrics of LLM calls (the router's decider and `llm` agents).
#[derive(Clone)]
pub struct LlmMetrics {
    /// Requests, by outcome: `ok` or the failure's reason.
    pub calls: IntCounterVec,
    /// Failed attempts, by reason (`timeout`, `http_error`, `invalid_json`, `unknown_agent`...).
    pub errors: IntCounterVec,
    /// Time of one request.
    pub latency: Histogram,
    /// Tokens, by kind (`prompt`, `completion`).
    pub tokens: IntCounterVec,
    /// Cost, from the configured prices.
    pub cost: prometheus::Counter,
    /// Decisions handed to a rule's fallback, by reason.
    pub fallbacks: IntCounterVec,
    /// 1 while the circuit breaker on the endpoint is open.
    pub breaker_open: IntGauge,
}

impl LlmMetrics {
    /// Creates the LLM metrics in `r`.
    pub fn new(r: &Registry) -> Result<Self> {
        let latency = Histogram::with_opts(
            HistogramOpts::new("switchyard_llm_request_seconds", "Time of one LLM request")
                .buckets(prometheus::exponential_buckets(0.01, 2.0, 14)?),
        )?;
        r.register(Box::new(latency.clone()))?;
        let cost = prometheus::Counter::new(
            "switchyard_llm_cost_total",
            "LLM cost from the configured prices",
        )?;
        r.register(Box::new(cost.clone()))?;
        Ok(Self {
            calls: counter(
                r,
                "switchyard_llm_requests_total",
                "LLM requests by outcome",
                &["outcome"],
            )?,
            errors: counter(
                r,
                "switchyard_llm_errors_total",
                "Failed LLM attempts by reason",
                &["reason"],
            )?,
            latency,
            tokens: {
                let tokens = counter(
                    r,
                    "switchyard_llm_tokens_total",
                    "LLM tokens by kind",
                    &["kind"],
                )?;
                // Both kinds exist from the start, at 0, so dashboards see them before a call.
                for kind in ["prompt", "completion"] {
                    tokens.with_label_values(&[kind]);
                }
                tokens
            },
            cost,
            fallbacks: counter(
                r,
                "switchyard_llm_fallbacks_total",
                "LLM decisions handed to the rule's fallback, by reason",
                &["reason"],
            )?,
            breaker_open: gauge(
                r,
                "switchyard_llm_breaker_open",
                "1 while the LLM circuit breaker is open",
            )?,
        })
    }
}

/// The router's metrics.
#[derive(Clone)]
pub struct RouterMetrics {
    /// The registry they are in.
    pub registry: Registry,
    /// Task events consumed, by kind (`undecodable` for records that could not be decoded).
    pub events: IntCounterVec,
    /// Decisions, by decision type, deciding source (rule, fallback, policy) and card.
    pub decisions: IntCounterVec,
    /// Dead letters written, by reason.
    pub dead_letters: IntCounterVec,
    /// Stale or duplicate results dropped, by reason.
    pub dropped: IntCounterVec,
    /// Tasks active in this instance.
    pub inflight_tasks: IntGauge,
    /// Task events in the owned tasks partitions past the committed positions (librdkafka's
    /// statistics, every 5 s).
    pub consumer_lag: IntGauge,
    /// Partitions this instance owns.
    pub partitions: IntGauge,
    /// Time from reading an event to its work items being acknowledged.
    pub routing_latency: Histogram,
    /// Time to write one batch (dead letters, state events, work items).
    pub commit_latency: Histogram,
    /// Time to restore one partition from the state topic.
    pub restore_seconds: Histogram,
    /// Task partitions restored from the state topic (a partition kept across a rebalance is
    /// not restored again).
    pub partitions_restored: IntCounter,
    /// Size of each partition snapshot written, in bytes (before compression).
    pub snapshot_bytes: Histogram,
    /// Time from a snapshot's start (its partition copied) to its end: the check for a foreign
    /// owner, the encoding at low CPU priority, the writes.
    pub snapshot_seconds: Histogram,
    /// Snapshots taken, by outcome (`written`; `fenced`: another instance owns the partition;
    /// `failed`: the broker refused).
    pub snapshots: IntCounterVec,
    /// Snapshots a restore passed over, by reason (`incomplete`, `checksum`, `unknown_version`,
    /// `unreadable`, `body`, `fenced`).
    pub snapshots_skipped: IntCounterVec,
    /// State records a restore read after its snapshot (or from the start).
    pub restore_records: IntCounter,
    /// Work items sent again after a restore.
    pub reemitted: IntCounterVec,
    /// Holes in a tasks partition accepted after fetching them again did not fill them.
    pub gaps: IntCounter,
    /// Exactly-once: transactions aborted (and their batches read again).
    pub aborted: IntCounter,
    /// Effectively-once: times the router started over with a new producer after its producer
    /// failed fatally (every owned partition taken over again).
    pub producer_restarts: IntCounter,
    /// Records the broker refused for good, by what they were (`dead_letter`, `work_item`).
    pub rejected_records: IntCounterVec,
    /// Timers that fell due and were recorded, by kind (`deadline`, `step_timeout`,
    /// `dispatch`, `human_timeout`, `reminder`).
    pub timers_fired: IntCounterVec,
    /// Timers pending in this instance's partitions.
    pub timers_pending: IntGauge,
    /// Steps that timed out, by card.
    pub step_timeouts: IntCounterVec,
    /// Owned partitions in which a card's circuit breaker holds work back (open or half-open),
    /// by card.
    pub breaker_open: IntGaugeVec,
    /// LLM decider calls.
    pub llm: LlmMetrics,
    /// LLM decisions waiting for an answer.
    pub llm_pending: IntGauge,
    /// Tokens spent, by tenant and by whom (`llm_decider`, or `agents` from results' usage).
    pub tokens: IntCounterVec,
    /// Cost spent, by tenant and by whom.
    pub cost: prometheus::CounterVec,
}

impl RouterMetrics {
    /// Creates and registers the router's metrics.
    pub fn new() -> Result<Self> {
        let r = Registry::new();
        Ok(Self {
            events: counter(
                &r,
                "switchyard_events_consumed_total",
                "Task events consumed",
                &["kind"],
            )?,
            decisions: counter(
                &r,
                "switchyard_decisions_total",
                "Router decisions",
                &["decision", "source", "card"],
            )?,
            dead_letters: counter(
                &r,
                "switchyard_dead_letters_total",
                "Records dead-lettered",
                &["reason"],
            )?,
            dropped: counter(
                &r,
                "switchyard_dropped_results_total",
                "Stale or duplicate results dropped",
                &["reason"],
            )?,
            inflight_tasks: gauge(
                &r,
                "switchyard_inflight_tasks",
                "Active tasks held by this instance",
            )?,
            consumer_lag: gauge(
                &r,
                "switchyard_consumer_lag",
                "Task events in the owned partitions not decided yet",
            )?,
            partitions: gauge(
                &r,
                "switchyard_partitions_owned",
                "Task partitions owned by this instance",
            )?,
            routing_latency: histogram(
                &r,
                "switchyard_routing_latency_seconds",
                "Event read to work items acknowledged",
            )?,
            commit_latency: histogram(
                &r,
                "switchyard_batch_commit_seconds",
                "Time to write one batch of decisions",
            )?,
            restore_seconds: histogram(
                &r,
                "switchyard_restore_seconds",
                "Time to restore one partition",
            )?,
            partitions_restored: {
                let c = IntCounter::new(
                    "switchyard_partitions_restored_total",
                    "Task partitions restored from the state topic",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            snapshot_bytes: {
                let buckets = prometheus::exponential_buckets(1024.0, 4.0, 12)?;
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "switchyard_snapshot_bytes",
                        "Size of each partition snapshot written (before compression)",
                    )
                    .buckets(buckets),
                )?;
                r.register(Box::new(h.clone()))?;
                h
            },
            snapshot_seconds: histogram(
                &r,
                "switchyard_snapshot_seconds",
                "Time to take one partition snapshot, after its copy",
            )?,
            snapshots: counter(
                &r,
                "switchyard_snapshots_total",
                "Partition snapshots taken, by outcome",
                &["outcome"],
            )?,
            snapshots_skipped: counter(
                &r,
                "switchyard_snapshots_skipped_total",
                "Snapshots a restore passed over, by reason",
                &["reason"],
            )?,
            restore_records: {
                let c = IntCounter::new(
                    "switchyard_restore_records_total",
                    "State records a restore read after its snapshot (or from the start)",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            reemitted: counter(
                &r,
                "switchyard_reemitted_work_items_total",
                "Pending work items re-sent after a restore",
                &["card"],
            )?,
            aborted: {
                let c = IntCounter::new(
                    "switchyard_transactions_aborted_total",
                    "Transactions aborted and re-processed",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            producer_restarts: {
                let c = IntCounter::new(
                    "switchyard_producer_restarts_total",
                    "Fresh producers after a fatal producer error, each followed by a take-over of every owned partition",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            gaps: {
                let c = IntCounter::new(
                    "switchyard_accepted_gaps_total",
                    "Offset holes accepted in the tasks topic",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            rejected_records: counter(
                &r,
                "switchyard_rejected_records_total",
                "Records the broker refused for good (too large, invalid, no topic)",
                &["record"],
            )?,
            timers_fired: counter(
                &r,
                "switchyard_timers_fired_total",
                "Timers that fell due and were recorded",
                &["kind"],
            )?,
            timers_pending: gauge(
                &r,
                "switchyard_timers_pending",
                "Timers pending in the owned partitions",
            )?,
            step_timeouts: counter(
                &r,
                "switchyard_step_timeouts_total",
                "Steps that timed out",
                &["card"],
            )?,
            breaker_open: gauges(
                &r,
                "switchyard_card_breaker_open",
                "Owned partitions in which the card's circuit breaker is open or half-open",
                &["card"],
            )?,
            llm: LlmMetrics::new(&r)?,
            llm_pending: gauge(
                &r,
                "switchyard_llm_pending_decisions",
                "LLM decisions waiting for an answer",
            )?,
            tokens: counter(
                &r,
                "switchyard_spent_tokens_total",
                "Tokens spent on tasks, by tenant and spender",
                &["tenant", "by"],
            )?,
            cost: {
                let c = prometheus::CounterVec::new(
                    Opts::new(
                        "switchyard_spent_cost_total",
                        "Cost spent on tasks, by tenant and spender",
                    ),
                    &["tenant", "by"],
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            registry: r,
        })
    }
}

/// The counters of one labelled family, each resolved from its labels once. The router counts
/// every event and decision: resolving a counter from its labels (hashing them, a read lock, a
/// reference count) was 2.4 % of the samples in a profile of `scripts/bench-routing`.
pub struct CounterCache {
    family: IntCounterVec,
    hasher: ahash::RandomState,
    /// By the hash of their labels; a hash that two label sets share holds both.
    resolved: HashMap<u64, Vec<(Labels, IntCounter)>>,
}

/// A counter's label values.
type Labels = Box<[Box<str>]>;

impl CounterCache {
    /// An empty cache of `family`'s counters.
    pub fn new(family: IntCounterVec) -> Self {
        Self {
            family,
            hasher: ahash::RandomState::new(),
            resolved: HashMap::new(),
        }
    }

    /// The counter of `labels` (as many as the family has).
    pub fn get(&mut self, labels: &[&str]) -> &IntCounter {
        let same = |held: &[Box<str>]| held.iter().map(|l| &**l).eq(labels.iter().copied());
        let family = &self.family;
        let held = self
            .resolved
            .entry(self.hasher.hash_one(labels))
            .or_default();
        let at = match held.iter().position(|(l, _)| same(l)) {
            Some(at) => at,
            None => {
                let counter = family.with_label_values(labels);
                held.push((labels.iter().map(|&l| l.into()).collect(), counter));
                held.len() - 1
            }
        };
        &held[at].1
    }
}

/// An agent's metrics.
#[derive(Clone)]
pub struct AgentMetrics {
    /// The registry they are in.
    pub registry: Registry,
    /// Work items handled, by card and outcome (result, failed, duplicate).
    pub work_items: IntCounterVec,
    /// Work items being handled now.
    pub inflight: IntGauge,
    /// Time to handle one work item.
    pub handle_seconds: HistogramVec,
}

impl AgentMetrics {
    /// Creates and registers an agent's metrics.
    pub fn new() -> Result<Self> {
        let r = Registry::new();
        let buckets = prometheus::exponential_buckets(0.001, 2.0, 16)?;
        let handle_seconds = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_agent_handle_seconds",
                "Time to handle one work item",
            )
            .buckets(buckets),
            &["card"],
        )?;
        r.register(Box::new(handle_seconds.clone()))?;
        Ok(Self {
            work_items: counter(
                &r,
                "switchyard_agent_work_items_total",
                "Work items handled",
                &["card", "outcome"],
            )?,
            inflight: gauge(&r, "switchyard_agent_inflight", "Work items being handled")?,
            handle_seconds,
            registry: r,
        })
    }
}

#[derive(Clone)]
struct Shared {
    registry: Registry,
    ready: Arc<AtomicBool>,
}

/// Serves `/metrics`, `/health` (always 200 while the process runs) and `/ready` (200 once
/// `ready` is set) on `addr`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    ready: Arc<AtomicBool>,
) -> Result<SocketAddr> {
    let (listener, bound) = crate::http::listen(addr).await?;
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready_handler))
        .with_state(Shared { registry, ready });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

async fn metrics(State(shared): State<Shared>) -> (StatusCode, String) {
    let mut out = Vec::new();
    match TextEncoder::new().encode(&shared.registry.gather(), &mut out) {
        Ok(()) => (StatusCode::OK, String::from_utf8_lossy(&out).into_owned()),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn ready_handler(State(shared): State<Shared>) -> (StatusCode, &'static str) {
    if shared.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_counters_are_the_familys() {
        let family = IntCounterVec::new(Opts::new("t", "t"), &["a", "b"]).unwrap();
        let mut cache = CounterCache::new(family.clone());
        cache.get(&["x", "y"]).inc();
        cache.get(&["x", "y"]).inc();
        cache.get(&["x", "z"]).inc();
        assert_eq!(family.with_label_values(&["x", "y"]).get(), 2);
        assert_eq!(family.with_label_values(&["x", "z"]).get(), 1);
        family.with_label_values(&["x", "y"]).inc();
        assert_eq!(
            cache.get(&["x", "y"]).get(),
            3,
            "one counter, cached or not"
        );
    }
}

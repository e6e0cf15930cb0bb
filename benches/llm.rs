//! LLM decision throughput, in one invocation against the broker on 127.0.0.1:9092:
//! (a) the baseline: tasks routed by a rule, no LLM;
//! (b) tasks decided by the LLM decider against a fixed-latency OpenAI-compatible endpoint served
//!     in this process (`BENCH_LLM_LATENCY_MS`, default 200), `BENCH_LLM_CONCURRENCY` (default 8)
//!     decisions in flight;
//! (c) rule-decided tasks submitted behind `BENCH_LLM_BACKLOG` (default 500) tasks waiting on a
//!     2-second LLM: how long they take, compared with (a);
//! (d) with `BENCH_LLM_URL` (e.g. the local model, http://127.0.0.1:8089/v1), `BENCH_LLM_REAL`
//!     tasks (default 10) decided by that endpoint.
//! Prints decisions/s and ratios. Run with `scripts/bench-llm`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::producer::FutureRecord;
use serde_json::json;
use switchyard::envelope::{EventKind, TaskEvent};
use switchyard::kafka::KafkaConfig;
use switchyard::llm::LlmConfig;
use switchyard::metrics::RouterMetrics;
use switchyard::router::{Engine, Router, RouterConfig};
use switchyard::topics::{self, TopicSpecs};
use switchyard::workflow::Workflow;
use tokio::sync::watch;

/// The tests' OpenAI-compatible endpoint, here answering `billing` after a fixed latency.
#[allow(dead_code)]
#[path = "../tests/common/llm.rs"]
mod fake;

use fake::{choose, Behaviour, FakeLlm};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An endpoint that always chooses `billing` after `latency`.
async fn fixed_latency_endpoint(latency: Duration) -> FakeLlm {
    FakeLlm::start(Arc::new(move |_: &str, _: &str| {
        Behaviour::Answer(choose("billing"), latency)
    }))
    .await
}

struct Bench {
    kafka: KafkaConfig,
    metrics: RouterMetrics,
    stop: watch::Sender<bool>,
}

impl Bench {
    async fn start(
        name: &str,
        engine: &Engine,
        workflow: &Workflow,
        llm: Option<LlmConfig>,
    ) -> Self {
        let kafka = KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topic_prefix: format!(
                "bench-llm-{name}-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            options: Default::default(),
        };
        let specs = TopicSpecs::load(Path::new("topics/switchyard.yaml")).unwrap();
        topics::apply(&kafka, &specs, &workflow.cards)
            .await
            .unwrap();
        let metrics = RouterMetrics::new().unwrap();
        let mut config = RouterConfig::new(kafka.clone());
        config.llm = llm;
        let router = Router::new(config, engine.clone(), metrics.clone())
            .await
            .unwrap();
        let (stop, rx) = watch::channel(false);
        tokio::spawn(async move { router.run(rx).await.unwrap() });
        let bench = Self {
            kafka,
            metrics,
            stop,
        };
        // Ready once the router owns its partitions: a first express task is routed.
        bench.submit("warm", 1, true).await;
        bench.wait("rule", "shipping", 1, Instant::now()).await;
        bench
    }

    async fn submit(&self, prefix: &str, count: u64, express: bool) {
        let producer = self.kafka.producer().unwrap();
        let topic = self.kafka.topics().tasks();
        let events: Vec<TaskEvent> = (0..count)
            .map(|i| {
                let mut e = TaskEvent::new(format!("{prefix}-{i}"), EventKind::Submitted, "bench");
                e.payload = json!({"customer_message": "I was charged twice this month, please refund one payment"});
                if express {
                    e.labels.insert("lane".into(), "express".into());
                }
                e
            })
            .collect();
        let sends = events.iter().map(|e| {
            let bytes = serde_json::to_vec(e).unwrap();
            let producer = producer.clone();
            let topic = topic.clone();
            async move {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&e.task_id).payload(&bytes),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| e)
                    .unwrap();
            }
        });
        join_all(sends).await;
    }

    fn routed(&self, by: &str, card: &str) -> u64 {
        self.metrics
            .decisions
            .with_label_values(&["ROUTED", by, card])
            .get()
    }

    /// Seconds until `count` decisions of `by` to `card` have been made.
    async fn wait(&self, by: &str, card: &str, count: u64, since: Instant) -> f64 {
        while self.routed(by, card) < count {
            assert!(
                since.elapsed() < Duration::from_secs(1800),
                "the bench made no progress"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        since.elapsed().as_secs_f64()
    }

    fn stop(self) {
        let _ = self.stop.send(true);
    }
}

#[tokio::main]
async fn main() {
    let rules = Path::new("tests/fixtures/llm-rules.yaml");
    let workflow = Workflow::load(Path::new("agents/helpdesk"), Some(rules)).unwrap();
    let engine = workflow.engine();
    let tasks = env("BENCH_LLM_TASKS", 200);
    let latency = Duration::from_millis(env("BENCH_LLM_LATENCY_MS", 200));
    let concurrency = env("BENCH_LLM_CONCURRENCY", 8) as usize;
    let backlog = env("BENCH_LLM_BACKLOG", 500);
    let endpoint = |url: &str| LlmConfig {
        base_url: url.to_string(),
        concurrency,
        timeout: Duration::from_secs(600),
        ..LlmConfig::default()
    };

    // (a) rule-decided tasks (the endpoint is configured but never asked).
    let fixed = fixed_latency_endpoint(latency).await;
    let bench = Bench::start("rules", &engine, &workflow, Some(endpoint(&fixed.url))).await;
    let t = Instant::now();
    bench.submit("rule", tasks, true).await;
    let rule_secs = bench.wait("rule", "shipping", tasks + 1, t).await;
    bench.stop();
    let rule_rate = tasks as f64 / rule_secs;
    println!("(a) {tasks} tasks decided by a rule: {rule_secs:.2}s, {rule_rate:.0} decisions/s");

    // (b) LLM-decided tasks against a fixed-latency endpoint.
    let bench = Bench::start("fixed", &engine, &workflow, Some(endpoint(&fixed.url))).await;
    let t = Instant::now();
    bench.submit("llm", tasks, false).await;
    let llm_secs = bench.wait("llm", "billing", tasks, t).await;
    bench.stop();
    let llm_rate = tasks as f64 / llm_secs;
    let bound = concurrency as f64 / latency.as_secs_f64();
    println!(
        "(b) {tasks} tasks decided by the LLM ({} ms endpoint, concurrency {concurrency}): {llm_secs:.2}s, {llm_rate:.1} decisions/s (bound {bound:.1}/s, {:.0}% of it); ratio to (a): {:.4}",
        latency.as_millis(),
        100.0 * llm_rate / bound,
        llm_rate / rule_rate
    );

    // (c) rule-decided tasks behind a backlog waiting on a 2-second LLM.
    let slow = fixed_latency_endpoint(Duration::from_secs(2)).await;
    let bench = Bench::start("backlog", &engine, &workflow, Some(endpoint(&slow.url))).await;
    bench.submit("backlog", backlog, false).await;
    let t = Instant::now();
    bench.submit("rule", tasks, true).await;
    let behind_secs = bench.wait("rule", "shipping", tasks + 1, t).await;
    let llm_done = bench.routed("llm", "billing");
    bench.stop();
    println!(
        "(c) {tasks} rule-decided tasks behind {backlog} tasks waiting on a 2 s LLM: {behind_secs:.2}s ({:.0} decisions/s; {llm_done} of the backlog decided meanwhile); ratio to (a): {:.2}",
        tasks as f64 / behind_secs,
        rule_secs / behind_secs
    );

    // (d) a real endpoint.
    if let Ok(url) = std::env::var("BENCH_LLM_URL") {
        let real = env("BENCH_LLM_REAL", 10);
        let mut config = endpoint(&url);
        config.model = std::env::var("BENCH_LLM_MODEL").unwrap_or(config.model);
        let bench = Bench::start("real", &engine, &workflow, Some(config)).await;
        let t = Instant::now();
        bench.submit("real", real, false).await;
        let decided = || {
            ["billing", "shipping", "tech_support", "sales"]
                .iter()
                .map(|c| bench.routed("llm", c))
                .sum::<u64>()
                + bench
                    .metrics
                    .decisions
                    .with_label_values(&["ESCALATED", "rule", "human_agent"])
                    .get()
        };
        while decided() < real {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let secs = t.elapsed().as_secs_f64();
        bench.stop();
        println!(
            "(d) {real} tasks decided by {url}: {secs:.1}s, {:.2} decisions/s; ratio to (b): {:.4}",
            real as f64 / secs,
            (real as f64 / secs) / llm_rate
        );
    }
}

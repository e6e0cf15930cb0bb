//! Command-runtime benchmark (run with `scripts/bench-agents`, on a fresh broker): the example
//! workflow's six Python agents (`agents/customer-service`) with the `command` runtime, one
//! process per work item against long-lived processes, alternated twice. Each run publishes
//! `BENCH_TASKS` calm tasks (default 100, six agent steps each) at once to a router and the six
//! agents in this process, and times them from the first publish to the last completion (this
//! process's clock at the consumer). Prints tasks/s of each run and the ratio.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use switchyard::agent::{self, AgentConfig};
use switchyard::envelope::{Decision, EventKind, StateEvent, TaskEvent};
use switchyard::metrics::AgentMetrics;
use switchyard::runtime::CommandHandler;
use switchyard::state_record;
use switchyard::topics::{self, TopicSpecs};
use switchyard::workflow::Workflow;

#[path = "support/env.rs"]
mod env;
#[path = "support/router.rs"]
mod router;

/// A copy of the example workflow whose command cards run `long_lived` or one process per item.
fn example(dir: &Path, long_lived: bool) {
    let from = Path::new("agents/customer-service");
    for sub in ["cards", "bin"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for entry in std::fs::read_dir(from.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            let mut text = std::fs::read_to_string(&path).unwrap();
            if !long_lived {
                text = text.replace("  long_lived: true\n", "");
            }
            std::fs::write(dir.join(sub).join(path.file_name().unwrap()), text).unwrap();
        }
    }
    std::fs::copy(from.join("rules.yaml"), dir.join("rules.yaml")).unwrap();
}

/// Tasks per second of `tasks` tasks through the workflow in `dir`.
async fn run(dir: &Path, tasks: usize, name: &str) -> f64 {
    let kafka = env::kafka(name);
    let workflow = Workflow::load(dir, None).unwrap();
    let specs = TopicSpecs::load(Path::new("topics/switchyard.yaml")).unwrap();
    topics::apply(&kafka, &specs, &workflow.cards)
        .await
        .unwrap();
    let router = router::Running::start(&kafka, &workflow).await;
    router.restored().await;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let agents: Vec<_> = workflow
        .cards
        .iter()
        .filter(|c| !c.is_human())
        .map(|card| {
            let config = AgentConfig::new(kafka.clone(), card.clone());
            let handler = Arc::new(CommandHandler::new(card, dir.join("cards")).unwrap());
            let rx = rx.clone();
            tokio::spawn(async move {
                agent::run(config, handler, AgentMetrics::new().unwrap(), rx)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut config = kafka.client_config();
    config
        .set("group.id", format!("{}.bench", kafka.topic_prefix))
        .set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer = config.create().unwrap();
    consumer.subscribe(&[&kafka.topics().state()]).unwrap();
    let producer = kafka.producer().unwrap();
    let topic = kafka.topics().tasks();
    let started = Instant::now();
    for i in 0..tasks {
        let mut event = TaskEvent::new(format!("bench-{i}"), EventKind::Submitted, "bench");
        event.payload = serde_json::json!({ "customer_message": "Hi! Where is my order? Thanks" });
        let bytes = serde_json::to_vec(&event).unwrap();
        let record = rdkafka::producer::FutureRecord::to(&topic)
            .key(&event.task_id)
            .payload(&bytes);
        producer
            .send(record, Duration::from_secs(30))
            .await
            .unwrap();
    }
    let mut completed = 0;
    while completed < tasks {
        let message = tokio::time::timeout(Duration::from_secs(600), consumer.recv())
            .await
            .expect("tasks complete within 10 minutes")
            .unwrap();
        let events = state_record::decode(message.payload().unwrap()).unwrap();
        let done = |e: &&StateEvent| matches!(e.decision, Decision::Completed { .. });
        completed += events.iter().filter(done).count();
    }
    let rate = tasks as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    for agent in agents {
        agent.await.unwrap();
    }
    router.stop().await;
    rate
}

#[tokio::main]
async fn main() {
    let tasks = env::number("BENCH_TASKS", 100);
    let (per_item, long_lived) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    example(per_item.path(), false);
    example(long_lived.path(), true);
    for round in 1..=2 {
        let once = run(per_item.path(), tasks, "agents-per-item").await;
        let kept = run(long_lived.path(), tasks, "agents-long-lived").await;
        println!(
            "round {round}: {tasks} tasks, one process per item {once:.1} tasks/s, long-lived {kept:.1} tasks/s, ratio {:.1}",
            kept / once
        );
    }
}

//! Crashes: 2,000 tasks through the example workflow while the router process is killed with
//! SIGKILL three times and restarted. Every task must finish and the state topic must hold
//! exactly one routing decision per (task, step): effectively-once on the local broker, and
//! exactly-once on the transactional one, where a read_committed reader also sees each work
//! item exactly once.

mod common;

use std::collections::HashMap;

use common::*;
use switchyard::envelope::{Decision, WorkItem};
use switchyard::kafka::KafkaConfig;
use switchyard::router::ConsistencyMode;
use switchyard::workflow::Workflow;

const TASKS: usize = 2_000;
const KILLS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_router_loses_and_duplicates_no_decision() {
    let kafka = kafka("crash");
    let dir = example_with_timeout("10m");
    let workflow = setup(&kafka, dir.path()).await;
    let agents = RunningAgents::example(&kafka, &workflow, |_| {});
    let humans = RunningAgents::start(&kafka, &workflow, &["human_agent"], |_| {
        Human(kafka.clone())
    });
    run_tasks_through_sigkills(
        &kafka,
        dir.path(),
        &["--max-batch", "50"],
        TASKS,
        KILLS,
        |_| async {},
    )
    .await;
    agents.stop().await;
    humans.stop().await;

    let events = state_events(&kafka);
    let owners = events
        .iter()
        .filter(|e| matches!(e.decision, Decision::Owned { .. }))
        .count();
    assert!(
        owners >= 3 * (KILLS + 1),
        "each of the {} router runs took over the 3 partitions; saw {owners} ownership records",
        KILLS + 1
    );
    assert_each_step_decided_once(&events, TASKS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_exactly_once_router_writes_each_work_item_once() {
    let kafka = txn_kafka("crash-eos");
    let dir = example_with_timeout("10m");
    let workflow = setup(&kafka, dir.path()).await;
    let transactional =
        |c: &mut switchyard::agent::AgentConfig| c.consistency = ConsistencyMode::ExactlyOnce;
    let agents = RunningAgents::example(&kafka, &workflow, transactional);
    let humans = RunningAgents::start_with(
        &kafka,
        &workflow,
        &["human_agent"],
        |_| Human(kafka.clone()),
        transactional,
    );
    // A stable instance id, as the README asks: a restarted router fences the killed one's
    // transaction at once instead of waiting for the broker to time it out.
    let args = [
        "--max-batch",
        "50",
        "--consistency",
        "exactly-once",
        "--instance-id",
        "router-eos",
    ];
    run_tasks_through_sigkills(&kafka, dir.path(), &args, TASKS, KILLS, |_| async {}).await;
    agents.stop().await;
    humans.stop().await;

    assert_each_step_decided_once(&state_events(&kafka), TASKS);
    let copies = work_item_copies(&kafka, &workflow);
    let repeated: Vec<_> = copies.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        repeated.is_empty(),
        "a read_committed reader saw these work items (task, step, attempt) more than once: {repeated:?}"
    );
    assert!(copies.len() >= 5 * TASKS, "{} work items", copies.len());
}

/// How often a read_committed reader of every card's topic sees each (task, step, attempt).
fn work_item_copies(
    kafka: &KafkaConfig,
    workflow: &Workflow,
) -> HashMap<(String, u32, u32), usize> {
    let mut copies = HashMap::new();
    for card in workflow.cards.iter() {
        for message in read_all(kafka, &card.topic(&kafka.topic_prefix)) {
            let item: WorkItem =
                serde_json::from_slice(rdkafka::Message::payload(&message).unwrap())
                    .expect("work items are JSON");
            *copies
                .entry((item.task_id, item.step_id, item.attempt))
                .or_default() += 1;
        }
    }
    copies
}

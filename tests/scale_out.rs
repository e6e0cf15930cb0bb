//! Scale-out under crashes: three router processes share a 6-partition tasks topic while 2,000
//! tasks run through the example workflow; each router is SIGKILLed and restarted once in turn,
//! and a fourth joins midway. No task may be lost and no step decided twice.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use switchyard::envelope::Decision;

const TASKS: usize = 2_000;
const WAIT: Duration = Duration::from_secs(300);

fn six_partitions(specs: &mut switchyard::topics::TopicSpecs) {
    specs.set_partitions(6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routers_killed_in_turn_and_one_added_lose_and_duplicate_nothing() {
    let kafka = kafka("scale-out");
    let workflow = setup_with(
        &kafka,
        &root().join("agents/customer-service"),
        six_partitions,
    )
    .await;
    let agents = RunningAgents::example(&kafka, &workflow, |_| {});
    let humans = RunningAgents::start(&kafka, &workflow, &["human_agent"], |_| {
        Human(kafka.clone())
    });
    let workflow_dir = Path::new("agents/customer-service");
    let spawn = |n| spawn_router(&kafka, workflow_dir, n, &["--max-batch", "100"]);
    let mut routers: Vec<Spawned> = (0..3).map(spawn).collect();

    publish_example_tasks(&kafka, TASKS).await;
    let mut next = 3;
    for turn in 0..3 {
        let target = TASKS * (turn + 1) / 5;
        eventually_or_report(
            WAIT,
            &format!("{target} tasks to complete"),
            || async { (completed_tasks(&kafka) >= target).then_some(()) },
            || stall::report(&kafka),
        )
        .await;
        routers[turn].kill().unwrap();
        routers[turn].wait().unwrap();
        routers[turn] = spawn(next);
        next += 1;
        if turn == 1 {
            routers.push(spawn(next));
            next += 1;
        }
    }
    eventually_or_report(
        WAIT,
        "every task to complete",
        || async { (completed_tasks(&kafka) >= TASKS).then_some(()) },
        || stall::report(&kafka),
    )
    .await;
    for router in &mut routers {
        router.kill().unwrap();
        router.wait().unwrap();
    }
    agents.stop().await;
    humans.stop().await;

    let events = state_events(&kafka);
    assert_each_step_decided_once(&events, TASKS);
    let owned = events
        .iter()
        .filter(|e| matches!(e.decision, Decision::Owned { .. }))
        .count();
    eprintln!("{owned} ownership records over 7 router runs and 6 partitions");
}

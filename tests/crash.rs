//! Effectively-once under crashes: 2,000 tasks through the example workflow while the router
//! process is killed with SIGKILL several times and restarted. Every task must finish and the
//! state topic must hold exactly one routing decision per (task, step).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use switchyard::envelope::Decision;

const TASKS: usize = 2_000;
const KILLS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_router_loses_and_duplicates_no_decision() {
    let kafka = kafka("crash");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let agents = RunningAgents::example(&kafka, &workflow, |_| {});
    let humans = RunningAgents::start(&kafka, &workflow, &["human_agent"], |_| {
        Human(kafka.clone())
    });

    let mut router = spawn_router(
        &kafka,
        Path::new("agents/customer-service"),
        0,
        &["--max-batch", "50"],
    );
    publish_example_tasks(&kafka, TASKS).await;
    for kill in 1..=KILLS {
        let target = TASKS * kill / (KILLS + 1);
        eventually(
            Duration::from_secs(300),
            &format!("{target} tasks to finish before kill {kill}"),
            || async { (completed_tasks(&kafka) >= target).then_some(()) },
        )
        .await;
        router.kill().unwrap();
        router.wait().unwrap();
        router = spawn_router(
            &kafka,
            Path::new("agents/customer-service"),
            kill,
            &["--max-batch", "50"],
        );
    }
    eventually(Duration::from_secs(300), "every task to finish", || async {
        (completed_tasks(&kafka) >= TASKS).then_some(())
    })
    .await;
    router.kill().unwrap();
    router.wait().unwrap();
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

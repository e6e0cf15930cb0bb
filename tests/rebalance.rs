//! Incremental rebalancing: when a second router joins, the first keeps the partitions it still
//! owns, in memory, without restoring them again; only the moved partitions are restored.

mod common;

use std::time::Duration;

use common::*;
use switchyard::envelope::Decision;

const WAIT: Duration = Duration::from_secs(60);

fn six_partitions(specs: &mut switchyard::topics::TopicSpecs) {
    specs.set_partitions(6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joining_router_takes_only_moved_partitions_and_nothing_is_restored_twice() {
    let kafka = kafka("rebalance");
    let dir = idle_workflow();
    let workflow = setup_with(&kafka, dir.path(), six_partitions).await;
    let first = RunningRouter::start(&kafka, &workflow).await;
    let owned = |r: &RunningRouter| r.metrics.partitions.get();
    let restored = |r: &RunningRouter| r.metrics.partitions_restored.get();
    eventually(WAIT, "the first router to own all 6 partitions", || async {
        (owned(&first) == 6 && restored(&first) == 6).then_some(())
    })
    .await;
    for i in 0..100 {
        publish(&kafka, &submission(&format!("before-{i}"), "hello")).await;
    }
    let routed = |prefix: &'static str| {
        let kafka = kafka.clone();
        move || {
            state_events(&kafka)
                .iter()
                .filter(|e| e.task_id.starts_with(prefix))
                .filter(|e| matches!(e.decision, Decision::Routed { .. }))
                .count()
        }
    };
    let before = routed("before-");
    eventually(WAIT, "the first tasks to be routed", || async {
        (before() == 100).then_some(())
    })
    .await;

    let second = RunningRouter::start(&kafka, &workflow).await;
    eventually(WAIT, "the partitions to be shared", || async {
        (owned(&first) + owned(&second) == 6 && owned(&second) > 0 && owned(&first) > 0)
            .then_some(())
    })
    .await;
    assert_eq!(
        restored(&first),
        6,
        "the first router restored none of the partitions it kept"
    );
    assert_eq!(
        restored(&second),
        owned(&second) as u64,
        "the second restored only what it took"
    );
    for i in 0..100 {
        publish(&kafka, &submission(&format!("after-{i}"), "hello")).await;
    }
    let after = routed("after-");
    eventually(WAIT, "the later tasks to be routed by both", || async {
        (after() == 100).then_some(())
    })
    .await;
    assert_eq!(before(), 100, "each task routed once");
    second.stop().await;
    first.stop().await;
}

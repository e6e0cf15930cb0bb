//! A router and agents told to stop while their broker is gone stop in bounded time: a deployment
//! that shuts down during a broker outage must not hang until it is killed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use switchyard::workflow::Workflow;

#[test]
fn a_router_and_agents_told_to_stop_while_the_broker_is_gone_stop() {
    // Its own runtime, shut down with a bound: a hang must fail this test, not hold the binary.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let took = runtime.block_on(async {
        let workflow = Workflow::load(&root().join("agents/customer-service"), None).unwrap();
        let (cluster, kafka) = mock_cluster_with(&workflow, "shutdown");
        let router = RunningRouter::start(&kafka, &workflow).await;
        let agents = RunningAgents::example(&kafka, &workflow, |_| {});
        publish(&kafka, &submission("t1", "where is my parcel?")).await;
        eventually(Duration::from_secs(60), "t1 to complete", || async {
            task_events(&kafka, "t1")
                .iter()
                .any(|e| matches!(e.decision, switchyard::envelope::Decision::Completed { .. }))
                .then_some(())
        })
        .await;
        let started = Instant::now();
        let stopping = tokio::spawn(async {
            tokio::join!(agents.stop(), router.stop());
        });
        tokio::task::yield_now().await;
        drop(cluster);
        let stopped = tokio::time::timeout(Duration::from_secs(60), stopping).await;
        stopped.map(|joined| {
            joined.unwrap();
            started.elapsed()
        })
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    let took = took.expect("the router and the agents stopped within 60 s of being told to");
    assert!(took < Duration::from_secs(30), "stopping took {took:?}");
}

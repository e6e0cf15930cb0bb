//! Fairness under backlog: with a backlog on every tasks partition, the router decides events of
//! every partition in turn, so no partition's tasks wait for another partition's backlog.
//! Progress is counted in decisions (state events) per partition and 10 s window: a task's
//! completion waits behind its own partition's backlog whatever the order, decisions do not.

mod common;

use std::time::{Duration, Instant};

use common::*;
use switchyard::envelope::TaskEvent;
use switchyard::kafka::{partition_for_key, KafkaConfig};

const PER_PARTITION: usize = 40_000;
const WINDOW: Duration = Duration::from_secs(10);

/// The decisions recorded in each partition so far (ownership records included).
struct Decided {
    tail: StateTail,
    per: Vec<i64>,
}

impl Decided {
    fn new(kafka: &KafkaConfig, partitions: i32) -> Self {
        let tail = StateTail::new(kafka);
        let per = vec![0; partitions as usize];
        Self { tail, per }
    }

    fn counts(&mut self) -> Vec<i64> {
        let per = &mut self.per;
        self.tail.read(|p, _| per[p as usize] += 1);
        self.per.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_partition_progresses_in_every_window_under_backlog() {
    let kafka = kafka("fairness");
    let dir = idle_workflow();
    let _workflow = setup(&kafka, dir.path()).await;
    let partitions = kafka.partition_count(&kafka.topics().tasks()).unwrap();
    assert!(
        partitions >= 3,
        "the tasks topic has {partitions} partitions"
    );

    // The same backlog on every partition, published before any router runs.
    let mut per: Vec<Vec<TaskEvent>> = vec![Vec::new(); partitions as usize];
    let mut i = 0;
    while per.iter().any(|p| p.len() < PER_PARTITION) {
        let id = format!("task-{i}");
        let p = partition_for_key(id.as_bytes(), partitions) as usize;
        if per[p].len() < PER_PARTITION {
            per[p].push(submission(&id, "hello"));
        }
        i += 1;
    }
    let all: Vec<&TaskEvent> = per.iter().flatten().collect();
    for chunk in all.chunks(2_000) {
        futures::future::join_all(chunk.iter().map(|e| publish(&kafka, e))).await;
    }

    let mut router = spawn_router(&kafka, dir.path(), 0, &[]);
    let target = PER_PARTITION as i64 + 1;
    let started = Instant::now();
    let mut windows = Vec::new();
    let mut decided = Decided::new(&kafka, partitions);
    let mut before = decided.counts();
    loop {
        tokio::time::sleep(WINDOW).await;
        let now = decided.counts();
        windows.push((before.clone(), now.clone()));
        if now.iter().all(|w| *w >= target) || started.elapsed() > Duration::from_secs(600) {
            break;
        }
        before = now;
    }
    router.kill().unwrap();
    router.wait().unwrap();
    eprintln!("decisions per partition at each window's end: {windows:?}");
    for (n, (before, after)) in windows.iter().enumerate() {
        let busy: Vec<usize> = (0..partitions as usize)
            .filter(|p| after[*p] < target)
            .collect();
        let decided: i64 = busy.iter().map(|p| after[*p] - before[*p]).sum();
        for p in 0..partitions as usize {
            let backlog = before[p] < target;
            let progressed = after[p] > before[p];
            assert!(
                !backlog || progressed,
                "window {n}: partition {p} made no progress with a backlog ({} of {target} decided); windows: {windows:?}",
                before[p]
            );
            // A partition that still has a backlog at the window's end gets at least half its
            // fair share of the window's decisions.
            let share = (after[p] - before[p]) as f64 / decided.max(1) as f64;
            assert!(
                !busy.contains(&p) || share >= 0.5 / busy.len() as f64,
                "window {n}: partition {p} got {:.0}% of the decisions; windows: {windows:?}",
                share * 100.0
            );
        }
    }
    let last = &windows.last().unwrap().1;
    assert!(
        last.iter().all(|w| *w >= target),
        "every backlog was decided: {last:?}"
    );
}

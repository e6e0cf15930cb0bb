//! The router's own CPU work per event, without Kafka (run with `scripts/bench-decide`).
//!
//! `scripts/bench-routing` times the router against a broker that shares this machine's cores,
//! and its figures move by 15-30 % from one run to the next: too much to see a change that saves
//! a tenth of the router's work. This benchmark takes the route task's steps for an event read,
//! in one thread, on the example workflow's cards with the one-rule table of the routing
//! benchmark (`benches/fixtures/one-work-item.yaml`: a state event and one work item per event),
//! over the routing benchmark's 371-byte submissions, in cumulative stages:
//!
//! 1. `decode`: the JSON codec's decoding of the record (and whether the state record may copy
//!    its text);
//! 2. `decide`: + admission, the rule decision and the fold into the partition's state
//!    ([`Partition::decide`]);
//! 3. `timers`: + the timer index's refresh ([`TimerIndex::refresh`]);
//! 4. `writes`: + the work item encoded as the JSON codec writes it, the state event encoded into
//!    its partition's record as the router does ([`state_record::Records`], room reserved for
//!    [`DEFAULT_MAX_BATCH`] events, finished every [`DEFAULT_MAX_BATCH`] events).
//!
//! What it leaves out: Kafka (fetching, producing, acknowledgements), metrics, trace spans.
//! Each stage runs `BENCH_DECIDE_EVENTS` events (default 100,000) on a fresh partition state,
//! `BENCH_DECIDE_ROUNDS` times (default 3) alternated; it prints each run's µs per event, then
//! the medians and each stage's share.
//!
//! Instructions, not time: `BENCH_DECIDE_STAGE=<stage>` runs that stage once and nothing else
//! (`setup` only builds the events), so that `scripts/bench-decide --instructions` can count
//! each stage's instructions under valgrind, a figure that does not move with the machine.

use std::path::Path;
use std::time::Instant;

use switchyard::commit::Outgoing;
use switchyard::envelope::read_task_event;
use switchyard::router::service::DEFAULT_MAX_BATCH;
use switchyard::router::timers::TimerIndex;
use switchyard::router::{Engine, Partition, Position, Raw};
use switchyard::state::PartitionState;
use switchyard::state_record;
use switchyard::workflow::Workflow;

/// The binary's allocator, so that the work is measured as it ships.
#[global_allocator]
static GLOBAL: switchyard::allocator::Allocator = switchyard::allocator::Allocator {};

#[path = "support/env.rs"]
mod env;
#[path = "support/events.rs"]
mod events;

/// How far a run takes each event.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Stage {
    Setup,
    Decode,
    Decide,
    Timers,
    Writes,
}

impl Stage {
    const ALL: [Stage; 4] = [Stage::Decode, Stage::Decide, Stage::Timers, Stage::Writes];

    fn name(self) -> &'static str {
        match self {
            Stage::Setup => "setup",
            Stage::Decode => "decode",
            Stage::Decide => "decide",
            Stage::Timers => "timers",
            Stage::Writes => "writes",
        }
    }
}

/// Takes every event of `events` as far as `stage`, on a fresh partition state; returns the
/// bytes written (so that nothing is optimised away).
fn run(engine: &Engine, events: &[Vec<u8>], stage: Stage) -> usize {
    let mut state = PartitionState::default();
    let mut timers = TimerIndex::default();
    let room = |bytes: &[u8]| DEFAULT_MAX_BATCH * (bytes.len() + state_record::ROOM_PER_DECISION);
    let mut states = state_record::Records::new(engine.rules.max_event_bytes);
    let mut batched = 0;
    let mut written = 0;
    for (offset, bytes) in events.iter().enumerate() {
        let (decoded, text) = match read_task_event(bytes) {
            Ok((event, text)) => (Ok(event), text),
            Err(e) => (Err(e), false),
        };
        if stage == Stage::Decode {
            written += decoded.map_or(0, |e| e.task_id.len());
            continue;
        }
        let mut partition = Partition {
            engine,
            state: &mut state,
            instance: "bench",
            now: 1_700_000_000_000,
            keep_undo: false,
            trace: None,
        };
        let at = Position {
            topic: "tasks",
            partition: 0,
            offset: offset as i64,
        };
        let mut raw = Raw::new(Some(bytes), None);
        raw.json = text;
        let record = partition.decide(at, raw, decoded).record;
        let task = state.tasks.get_key_value(&record.task_id);
        if stage >= Stage::Timers {
            timers.refresh(
                engine,
                &record.task_id,
                task.map(|(id, t)| (id, t.as_ref())),
            );
        }
        if stage < Stage::Writes {
            written += record.seq as usize;
            continue;
        }
        for item in task
            .into_iter()
            .flat_map(|(_, t)| engine.work_items(t, &record.decision, 0))
        {
            let mut bytes = Vec::with_capacity(512);
            serde_json::to_writer(&mut bytes, &item).unwrap();
            written += bytes.len();
        }
        let text = text.then_some(bytes.as_slice());
        if batched == 0 {
            states.reserve(0, room(bytes));
        }
        states.push(0, record, text);
        batched += 1;
        if batched == DEFAULT_MAX_BATCH {
            let full = state_record::Records::new(engine.rules.max_event_bytes);
            let records = std::mem::replace(&mut states, full).finish("state");
            written += records.records.iter().map(Outgoing::size).sum::<usize>();
            batched = 0;
        }
    }
    written
}

fn main() {
    switchyard::allocator::configure();
    let events = env::number("BENCH_DECIDE_EVENTS", 100_000);
    let rounds = env::number("BENCH_DECIDE_ROUNDS", 3);
    let workflow = Workflow::load(
        Path::new("agents/customer-service"),
        Some(Path::new("benches/fixtures/one-work-item.yaml")),
    )
    .unwrap();
    let engine = workflow.engine();
    let input: Vec<Vec<u8>> = events::submissions("bench", events)
        .into_iter()
        .map(|(_, value)| value)
        .collect();
    if let Ok(name) = std::env::var("BENCH_DECIDE_STAGE") {
        let stage = [Stage::Setup]
            .into_iter()
            .chain(Stage::ALL)
            .find(|s| s.name() == name)
            .unwrap_or_else(|| {
                panic!("BENCH_DECIDE_STAGE={name}: one of setup, decode, decide, timers, writes")
            });
        if stage != Stage::Setup {
            println!("{} bytes written", run(&engine, &input, stage));
        }
        return;
    }
    println!(
        "{events} events of {} bytes, one thread, no Kafka; µs per event, cumulative:",
        input[0].len()
    );
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); Stage::ALL.len()];
    for round in 1..=rounds {
        let mut line = format!("round {round}:");
        for (i, stage) in Stage::ALL.into_iter().enumerate() {
            let started = Instant::now();
            let written = run(&engine, &input, stage);
            let us = started.elapsed().as_secs_f64() * 1e6 / events as f64;
            assert!(written > 0, "{} wrote nothing", stage.name());
            times[i].push(us);
            line += &format!("  {} {us:.2}", stage.name());
        }
        println!("{line}");
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect();
    let total = medians[medians.len() - 1];
    println!("medians of {rounds} (each stage's own share of the whole):");
    let mut before = 0.0;
    for (stage, median) in Stage::ALL.into_iter().zip(&medians) {
        println!(
            "  {:<7} {median:6.2} µs/event cumulative, {:5.2} µs its own ({:4.1} %)",
            stage.name(),
            median - before,
            100.0 * (median - before) / total
        );
        before = *median;
    }
}

//! Feeds arbitrary bytes through the router's per-record step, as records of one partition of
//! the example workflow: the first byte picks whether the record carries a signature header (the
//! next 64 bytes) and whether it is a tombstone. `Engine::decide_record` panics when an invariant
//! breaks; libFuzzer reports it with the input.
#![no_main]

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use switchyard::router::Engine;
use switchyard::signing::Secret;
use switchyard::state::PartitionState;
use switchyard::workflow::Workflow;

fn engine() -> &'static (Engine, Mutex<PartitionState>) {
    static ENGINE: OnceLock<(Engine, Mutex<PartitionState>)> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agents/customer-service");
        let mut engine = Workflow::load(&dir, None).expect("the example workflow loads").engine();
        engine
            .secrets
            .insert("quality_controller", Some(Secret::new("fuzz")));
        (engine, Mutex::new(PartitionState::default()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (signature, value) = match flags & 1 {
        1 if rest.len() >= 64 => (Some(&rest[..64]), &rest[64..]),
        _ => (None, rest),
    };
    let value = (flags & 2 == 0).then_some(value);
    let (engine, state) = engine();
    let mut state = state.lock().unwrap();
    if state.tasks.len() > 10_000 {
        *state = PartitionState::default();
    }
    engine.decide_record(&mut state, value, signature);
});

//! The task events benchmarks feed the router. Include it with
//! `#[path = "support/events.rs"] mod events;`.

use switchyard::envelope::{EventKind, TaskEvent};

/// `count` submissions of tasks `<prefix>-0`, `<prefix>-1`, …, each with the same short customer
/// message (371 bytes encoded with the prefix `bench`), as (key, JSON value).
pub fn submissions(prefix: &str, count: usize) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let mut e = TaskEvent::new(format!("{prefix}-{i}"), EventKind::Submitted, "bench");
            e.payload = serde_json::json!({ "customer_message": "where is my order? it should have arrived by now" });
            (e.task_id.clone(), serde_json::to_vec(&e).unwrap())
        })
        .collect()
}

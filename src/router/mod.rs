//! The router: reads task events, decides with the rule table, records decisions on the state
//! topic and sends work items to agents.

mod asking;
pub mod breaker;
pub mod engine;
pub mod guard;
pub mod inbox;
pub mod partition;
pub mod pipeline;
pub mod resend;
pub mod service;
pub mod snapshot;
#[cfg(test)]
pub(crate) mod testkit;
pub mod timers;

pub use crate::commit::ConsistencyMode;
pub use engine::{Engine, Outcome};
pub use guard::Raw;
pub use partition::{Partition, Position, Step};
pub use service::{Router, RouterConfig};

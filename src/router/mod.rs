//! The router: reads task events, decides with the rule table, records decisions on the state
//! topic and sends work items to agents.

pub mod commit;
pub mod engine;
pub mod service;

pub use commit::ConsistencyMode;
pub use engine::{Engine, Outcome};
pub use service::{Router, RouterConfig};

//! The handlers of the card runtimes that `switchyard agent` runs: [`command`] (a program per
//! work item, or long-lived), [`http`] (an HTTP service) and [`a2a`] (an A2A agent). The `llm`
//! runtime is [`crate::llm::LlmHandler`].

pub mod a2a;
pub mod command;
pub mod http;

pub use a2a::A2aHandler;
pub use command::CommandHandler;
pub use http::HttpHandler;

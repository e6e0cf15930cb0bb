//! The handlers of the card runtimes that `switchyard agent` runs: [`command`] (a program per
//! work item, or long-lived), [`http`] (an HTTP service) and [`a2a`] (an A2A agent). The `llm`
//! runtime is [`crate::llm::LlmHandler`].

pub mod a2a;
pub mod command;
pub mod http;

pub use a2a::A2aHandler;
pub use command::CommandHandler;
pub use http::HttpHandler;

use std::future::Future;

use crate::agent::{Failure, Handler, Reply};
use crate::envelope::WorkItem;

/// A runtime's handler: cheap to clone, answering one work item at a time through `&self`.
/// Every `Runner` is a [`Handler`] whose futures own a clone of it.
pub trait Runner: Clone + Send + Sync + 'static {
    /// Answers one work item.
    fn run(&self, item: &WorkItem) -> impl Future<Output = Result<Reply, Failure>> + Send;
}

impl<R: Runner> Handler for R {
    fn handle(&self, item: WorkItem) -> impl Future<Output = Result<Reply, Failure>> + Send {
        let this = self.clone();
        async move { this.run(&item).await }
    }
}

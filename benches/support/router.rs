//! A router run in the benchmark's process. Include it with
//! `#[path = "support/router.rs"] mod router;`. Not every benchmark uses all of it.
#![allow(dead_code)]

use std::time::Duration;

use switchyard::kafka::KafkaConfig;
use switchyard::metrics::RouterMetrics;
use switchyard::router::{Router, RouterConfig};
use switchyard::workflow::Workflow;

/// A router running on `kafka` with `workflow`'s defaults.
pub struct Running {
    /// Its metrics.
    pub metrics: RouterMetrics,
    stop: tokio::sync::watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Starts it.
    pub async fn start(kafka: &KafkaConfig, workflow: &Workflow) -> Self {
        Self::start_with(kafka, workflow, |_| {}).await
    }

    /// Starts it with its config changed by `edit`.
    pub async fn start_with(
        kafka: &KafkaConfig,
        workflow: &Workflow,
        edit: impl FnOnce(&mut RouterConfig),
    ) -> Self {
        let metrics = RouterMetrics::new().unwrap();
        let mut config = RouterConfig::new(kafka.clone());
        edit(&mut config);
        let router = Router::new(config, workflow.engine(), metrics.clone())
            .await
            .unwrap();
        let (stop, rx) = tokio::sync::watch::channel(false);
        let handle = tokio::spawn(async move { router.run(rx).await.unwrap() });
        Self {
            metrics,
            stop,
            handle,
        }
    }

    /// Waits until it has taken its partitions over (restored them).
    pub async fn restored(&self) {
        while self.metrics.restore_seconds.get_sample_count() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops it and waits.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.handle.await.unwrap();
    }
}

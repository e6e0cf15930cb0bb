//! The router's consumer of the tasks topic: rebalance events, librdkafka's statistics, and one
//! queue per owned partition, read in turn so that a batch takes from every partition that has
//! records (a backlog on one partition does not hold back the others).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::mpsc;

/// A change of the partitions this instance owns.
pub enum RebalanceEvent {
    /// Partitions assigned (paused until restored).
    Assigned(Vec<i32>),
    /// Partitions taken away.
    Revoked(Vec<i32>),
}

/// The consumer's context: forwards rebalances, sets the lag gauge.
pub struct RebalanceContext {
    /// Where rebalances go.
    pub events: mpsc::UnboundedSender<RebalanceEvent>,
    /// `switchyard_consumer_lag`, set from librdkafka's statistics.
    pub lag: prometheus::IntGauge,
}

impl ClientContext for RebalanceContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): the consumer lag of the owned
    /// partitions, from the broker's high watermark and the committed positions.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.lag.set(lag);
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let _ = self.events.send(RebalanceEvent::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Nothing is processed from a partition before its state is restored.
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error = %e, "could not pause newly assigned partitions");
            }
            let _ = self.events.send(RebalanceEvent::Assigned(partitions(tpl)));
        }
    }
}

/// The router's consumer of the tasks topic.
pub type TasksConsumer = StreamConsumer<RebalanceContext>;

/// The queues of the owned tasks partitions, split from the consumer's own queue.
#[derive(Default)]
pub struct Inbox {
    queues: BTreeMap<i32, StreamPartitionQueue<RebalanceContext>>,
}

impl Inbox {
    /// Reads `parts` of `topic` from queues of their own from now on.
    pub fn split(&mut self, consumer: &Arc<TasksConsumer>, topic: &str, parts: &[i32]) {
        for p in parts {
            match consumer.split_partition_queue(topic, *p) {
                Some(queue) => {
                    self.queues.insert(*p, queue);
                }
                None => tracing::warn!(
                    partition = p,
                    "could not split the partition's queue; its records come through the consumer"
                ),
            }
        }
    }

    /// Stops reading `parts` (revoked).
    pub fn remove(&mut self, parts: &[i32]) {
        for p in parts {
            self.queues.remove(p);
        }
    }

    /// Whether no partition queue is open.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// The next record of any owned partition. Cancel-safe.
    pub async fn next(&self) -> Result<OwnedMessage, KafkaError> {
        let receives = self
            .queues
            .values()
            .map(|q| async move { q.recv().await.map(|m| m.detach()) }.boxed());
        futures::future::select_all(receives).await.0
    }

    /// Adds to `batch`, up to `max` records, what the partition queues already hold, one record
    /// of each partition in turn.
    pub fn take_ready(&self, batch: &mut Vec<OwnedMessage>, max: usize) {
        let mut streams: Vec<_> = self.queues.values().map(|q| q.stream()).collect();
        while !streams.is_empty() && batch.len() < max {
            streams.retain_mut(|stream| {
                if batch.len() >= max {
                    return true;
                }
                match stream.next().now_or_never() {
                    Some(Some(Ok(m))) => {
                        batch.push(m.detach());
                        true
                    }
                    Some(Some(Err(e))) => {
                        tracing::warn!(error = %e, "consumer error");
                        true
                    }
                    _ => false,
                }
            });
        }
    }
}

//! Publishing task events to the tasks topic, as `switchyard submit`, `switchyard dev` and the
//! console do: keyed by task id, encoded by the codec, optionally signed, with trace context.

use std::time::Duration;

use rdkafka::producer::FutureRecord;

use crate::codec::Codec;
use crate::envelope::TaskEvent;
use crate::error::Result;
use crate::kafka::{self, KafkaConfig};
use crate::signing::Secret;

/// Publishes `event`, signed with `secret` when given (see [`crate::signing`]), carrying
/// `traceparent` (see [`crate::trace::hop`]); returns once the broker acknowledged it.
pub async fn publish(
    kafka: &KafkaConfig,
    codec: &Codec,
    event: &TaskEvent,
    secret: Option<&Secret>,
    traceparent: &str,
) -> Result<()> {
    let producer = kafka.producer()?;
    let topic = kafka.topics().tasks();
    let bytes = codec.encode_task_event(&topic, event).await?;
    let signed = secret.map(|s| s.headers(&event.task_id, event.step_id, event.attempt, &bytes));
    let record = FutureRecord::to(&topic)
        .key(&event.task_id)
        .payload(&bytes)
        .headers(crate::trace::add(signed, traceparent));
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(source, _)| kafka::Error::Produce { topic, source })?;
    Ok(())
}

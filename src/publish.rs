//! Publishing task events to the tasks topic, as `switchyard submit`, `switchyard dev` and the
//! console do: keyed by task id, encoded by the codec, optionally signed, with trace context.

use std::time::Duration;

use rdkafka::producer::FutureRecord;

use crate::codec::Codec;
use crate::envelope::TaskEvent;
use crate::error::Result;
use crate::kafka::{self, KafkaConfig};
use crate::signing::Secret;

/// Publishes `event`, signed with `secret` when given (see [`crate::signing`]), with the trace
/// context of `span`; returns once the broker acknowledged it.
pub async fn publish(
    kafka: &KafkaConfig,
    codec: &Codec,
    event: &TaskEvent,
    secret: Option<&Secret>,
    span: &tracing::Span,
) -> Result<()> {
    let producer = kafka.producer()?;
    let topic = kafka.topics().tasks();
    let bytes = codec.encode_task_event(&topic, event).await?;
    let mut record = FutureRecord::to(&topic).key(&event.task_id).payload(&bytes);
    let signed = secret.map(|s| s.headers(&event.task_id, event.step_id, event.attempt, &bytes));
    if let Some(headers) = crate::trace::inject(span, signed) {
        record = record.headers(headers);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(source, _)| kafka::Error::Produce { topic, source })?;
    Ok(())
}

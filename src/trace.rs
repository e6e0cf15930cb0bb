//! W3C trace context across Kafka, and its export over OTLP.
//!
//! `switchyard submit` starts a trace (or continues one given with `--traceparent`), the router
//! continues it in a span per decision, agents in a span per work item; each puts its span's
//! context in the `traceparent` and `tracestate` headers of the records it writes. Spans are
//! exported over OTLP/HTTP only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or `--otlp-endpoint`) is set; otherwise they are kept
//! in process for their context alone and nothing connects anywhere.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::layer::{Filter, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The header that carries the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";

/// The header that carries the W3C trace state.
pub const TRACESTATE: &str = "tracestate";

/// The name of the span each router decision is made in. One is built per event and none is
/// ever entered, so no log line falls inside one: [`Tracing::install`] keeps them out of the log
/// layer, which would otherwise format their fields for nothing on every event.
pub const DECISION_SPAN: &str = "decide";

/// This process's tracer provider; [`Tracing::shutdown`] exports what is left.
pub struct Tracing {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Tracing {
    /// A provider for `service` (its `service.name`), exporting to `endpoint` (a base URL, as
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`) or to what the standard variables name, if anything.
    /// `OTEL_EXPORTER_OTLP_PROTOCOL=http/json` sends JSON, anything else protobuf.
    pub fn init(service: &str, endpoint: Option<&str>) -> Result<Self, String> {
        let configured = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()));
        let resource = Resource::builder()
            .with_service_name(service.to_string())
            .build();
        let mut builder = SdkTracerProvider::builder().with_resource(resource);
        let exporting = endpoint.is_some() || configured;
        if exporting {
            let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
                Ok("http/json") => Protocol::HttpJson,
                _ => Protocol::HttpBinary,
            };
            let mut exporter = SpanExporter::builder().with_http().with_protocol(protocol);
            if let Some(url) = endpoint {
                exporter =
                    exporter.with_endpoint(format!("{}/v1/traces", url.trim_end_matches('/')));
            }
            let exporter = exporter
                .build()
                .map_err(|e| format!("OTLP exporter: {e}"))?;
            builder = builder.with_batch_exporter(exporter);
        }
        Ok(Self {
            provider: builder.build(),
            exporting,
        })
    }

    /// Whether spans leave the process.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// The `tracing` layer that turns this crate's spans into OpenTelemetry spans.
    fn layer<S>(&self) -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        use tracing_subscriber::Layer;
        let tracer = self.provider.tracer("switchyard");
        let only_ours = tracing_subscriber::filter::Targets::new()
            .with_target("switchyard", tracing::Level::INFO);
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(only_ours)
    }

    /// Installs this process's subscriber: log lines to stderr through `filter` (without the
    /// decision spans, [`DECISION_SPAN`]), and the spans of this crate as OpenTelemetry spans.
    pub fn install(&self, filter: EnvFilter) {
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(logged(filter)),
            )
            .with(self.layer())
            .init();
    }

    /// Exports what is left and stops.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            if self.exporting {
                eprintln!("OTLP export at shutdown: {e}");
            }
        }
    }
}

/// What the log layer sees: what `filter` lets through, but the decision spans.
fn logged<S>(filter: EnvFilter) -> impl Filter<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    filter.and(filter_fn(|meta| {
        !(meta.is_span() && meta.name() == DECISION_SPAN && meta.target().starts_with("switchyard"))
    }))
}

/// `span`'s context as W3C headers (`traceparent`, and `tracestate` when not empty).
fn carrier(span: &tracing::Span) -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.retain(|_, v| !v.is_empty());
    carrier
}

/// `span`'s `traceparent`, when it has a valid context.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    carrier(span).remove(TRACEPARENT)
}

/// `headers` with `span`'s trace context added.
pub fn inject(span: &tracing::Span, headers: Option<OwnedHeaders>) -> Option<OwnedHeaders> {
    let carrier = carrier(span);
    if carrier.is_empty() {
        return headers;
    }
    let mut headers = headers.unwrap_or_default();
    for key in [TRACEPARENT, TRACESTATE] {
        if let Some(value) = carrier.get(key) {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
    }
    Some(headers)
}

/// Headers that carry `traceparent`.
pub fn headers(traceparent: &str) -> OwnedHeaders {
    add(None, traceparent)
}

/// `headers` with `traceparent` added.
pub fn add(headers: Option<OwnedHeaders>, traceparent: &str) -> OwnedHeaders {
    headers.unwrap_or_default().insert(Header {
        key: TRACEPARENT,
        value: Some(traceparent.as_bytes()),
    })
}

/// The trace context in a record's headers (an empty context when there is none).
pub fn extract(headers: Option<&impl Headers>) -> Context {
    let mut carrier = HashMap::new();
    if let Some(headers) = headers {
        for h in headers.iter() {
            if h.key == TRACEPARENT || h.key == TRACESTATE {
                if let Some(v) = h.value.and_then(|v| std::str::from_utf8(v).ok()) {
                    carrier.insert(h.key.to_string(), v.to_string());
                }
            }
        }
    }
    TraceContextPropagator::new().extract(&carrier)
}

/// The context a `traceparent` names (an empty context when it is not valid).
pub fn context_of(traceparent: &str) -> Context {
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// Continues `parent` in `span`, when `parent` carries a valid span context.
pub fn continue_in(span: &tracing::Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_endpoint_nothing_is_exported() {
        if std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok() {
            return;
        }
        let tracing = Tracing::init("test", None).unwrap();
        assert!(!tracing.exporting());
        tracing.shutdown();
    }

    #[test]
    fn the_log_layer_builds_no_decision_span_but_the_others() {
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(logged(EnvFilter::new("info")));
        let subscriber = tracing_subscriber::registry().with(logs);
        tracing::subscriber::with_default(subscriber, || {
            let decision = tracing::info_span!(DECISION_SPAN, task_id = "t-1");
            assert!(
                decision.is_disabled(),
                "decision spans are left out of the logs"
            );
            let step = tracing::info_span!("agent_step", task_id = "t-1");
            assert!(
                !step.is_disabled(),
                "other spans give log lines their context"
            );
        });
    }

    #[test]
    fn a_traceparent_round_trips_through_the_propagator() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cx = context_of(tp);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid());
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert!(!context_of("garbage").span().span_context().is_valid());
    }
}

//! W3C trace context across Kafka, and its export over OTLP.
//!
//! `switchyard submit` starts a trace (or continues one given with `--traceparent`), the router
//! continues it in a span per decision, agents in a span per work item; each puts its span's
//! context in the `traceparent` header of the records it writes. Spans are
//! exported over OTLP/HTTP only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or `--otlp-endpoint`) is set; otherwise no
//! OpenTelemetry span is built, each hop carries the trace on with a span id of its own ([`hop`]),
//! and nothing connects anywhere.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TraceFlags, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
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
    /// decision spans, [`DECISION_SPAN`]), and, when spans are exported, the spans of this crate
    /// as OpenTelemetry spans. Without export no decision span is built at all.
    pub fn install(&self, filter: EnvFilter) {
        self.subscriber(filter).init();
    }

    /// The subscriber [`Tracing::install`] installs. Without export no layer wants a decision
    /// span, so none is built: [`hop`] carries the trace on by itself. (An absent layer is left
    /// out rather than added as `None`: tracing-subscriber takes a `None` layer for one that
    /// wants every span.)
    fn subscriber(&self, filter: EnvFilter) -> Box<dyn tracing::Subscriber + Send + Sync> {
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(logged(filter));
        let registry = tracing_subscriber::registry().with(logs);
        match self.exporting {
            true => Box::new(registry.with(self.layer())),
            false => Box::new(registry),
        }
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

/// `span`'s `traceparent`, when it is an OpenTelemetry span with a valid context.
fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT).filter(|v| !v.is_empty())
}

/// Continues `parent` in `span`, the span of one hop (a decision, an agent step, a submission),
/// and returns the `traceparent` that the records the hop writes carry. When spans are exported
/// that is the span's own context. Otherwise no OpenTelemetry span is built (the layer is not
/// installed, see [`Tracing::install`]) and the hop is a new span id in `parent`'s trace, or the
/// root of a new trace when `parent` is empty: the trace still links every hop of a task.
pub fn hop(span: &tracing::Span, parent: Context) -> String {
    let context = parent.span().span_context().clone();
    continue_in(span, parent);
    if let Some(own) = traceparent(span) {
        return own;
    }
    let ids = RandomIdGenerator::default();
    let (trace_id, flags) = match context.is_valid() {
        true => (context.trace_id(), context.trace_flags()),
        false => (ids.new_trace_id(), TraceFlags::SAMPLED),
    };
    traceparent_of(
        &trace_id.to_bytes(),
        &ids.new_span_id().to_bytes(),
        flags.to_u8(),
    )
}

/// The W3C `traceparent` (version 00) of a trace id, span id and flags: what `format!` with
/// the ids' `Display` writes, without the formatting machinery (once per decision).
fn traceparent_of(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> String {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    for (bytes, digits) in [
        (&trace_id[..], 3..35),
        (&span_id[..], 36..52),
        (&[flags], 53..55),
    ] {
        hex::encode_to_slice(bytes, &mut out[digits]).expect("room for two digits a byte");
    }
    String::from_utf8(out.to_vec()).expect("hex digits are ASCII")
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
    match headers {
        Some(headers) => TraceContextPropagator::new().extract(&Carried(headers)),
        None => Context::new(),
    }
}

/// A record's headers as what the propagator reads the trace context from.
struct Carried<'a, H>(&'a H);

impl<H: Headers> Extractor for Carried<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        let header = self.0.iter().find(|h| h.key == key)?;
        std::str::from_utf8(header.value?).ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|h| h.key).collect()
    }
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
    fn without_export_the_subscriber_builds_no_decision_span_but_the_others() {
        let tracing = Tracing::init("test", None).unwrap();
        let subscriber = tracing.subscriber(EnvFilter::new("info"));
        tracing::subscriber::with_default(subscriber, || {
            let decision = tracing::info_span!(DECISION_SPAN, task_id = "t-1");
            assert!(
                decision.is_disabled(),
                "decision spans are neither logged nor exported"
            );
            let step = tracing::info_span!("agent_step", task_id = "t-1");
            assert!(
                !step.is_disabled(),
                "other spans give log lines their context"
            );
        });
        tracing.shutdown();
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

    /// The trace id, span id and flags of a `traceparent`.
    fn parts(traceparent: &str) -> (String, String, String) {
        let sc = context_of(traceparent).span().span_context().clone();
        assert!(sc.is_valid(), "`{traceparent}` is a valid traceparent");
        let flags = format!("{:02x}", sc.trace_flags().to_u8());
        (sc.trace_id().to_string(), sc.span_id().to_string(), flags)
    }

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";

    #[test]
    fn a_traceparent_is_written_as_the_ids_display_it() {
        let ids = RandomIdGenerator::default();
        for flags in [TraceFlags::SAMPLED, TraceFlags::default()] {
            let (trace, span) = (ids.new_trace_id(), ids.new_span_id());
            let written = traceparent_of(&trace.to_bytes(), &span.to_bytes(), flags.to_u8());
            let formatted = format!("00-{trace}-{span}-{:02x}", flags.to_u8());
            assert_eq!(written, formatted);
            assert_eq!(written.len(), 55);
        }
    }

    #[test]
    fn without_export_a_hop_continues_the_trace_with_a_span_id_of_its_own() {
        let span = tracing::info_span!(DECISION_SPAN, task_id = "t-1");
        assert!(span.is_disabled(), "no subscriber builds the span");
        let (trace, id, flags) = parts(&hop(&span, context_of(PARENT)));
        assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
        assert_ne!(id, "b7ad6b7169203331");
        assert_eq!(flags, "00", "the parent's sampling decision is kept");
        let (root, _, flags) = parts(&hop(&span, Context::new()));
        assert_ne!(root, trace, "without a parent the hop starts a trace");
        assert_eq!(flags, "01");
        assert_ne!(hop(&span, Context::new()), hop(&span, Context::new()));
    }

    #[test]
    fn with_export_a_hop_is_its_opentelemetry_span() {
        let tracing = Tracing::init("test", None).unwrap();
        let subscriber = tracing_subscriber::registry().with(tracing.layer());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(DECISION_SPAN, task_id = "t-1");
            let own = hop(&span, context_of(PARENT));
            assert_eq!(traceparent(&span).as_deref(), Some(own.as_str()));
            let (trace, id, _) = parts(&own);
            assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
            assert_ne!(id, "b7ad6b7169203331");
        });
        tracing.shutdown();
    }
}

//! W3C trace context in Kafka message headers: the producer writes the `traceparent` (and
//! `tracestate`) of its publish span, and the consumer continues or links to it.

use opentelemetry::propagation::text_map_propagator::FieldIter;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use rdkafka::message::{Headers, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Maximum `tracestate` kept, in bytes. W3C Trace Context limits it to 32 members and lets
/// a receiver drop one over 512 characters. A larger one would be copied into every span
/// and every Kafka message.
const MAX_TRACESTATE_BYTES: usize = 512;

/// W3C Trace Context that drops a `tracestate` over `MAX_TRACESTATE_BYTES` or 32 members,
/// keeping the `traceparent`.
#[derive(Debug, Default)]
pub struct BoundedTraceContext(TraceContextPropagator);

impl BoundedTraceContext {
    pub fn new() -> Self {
        Self::default()
    }
}

impl TextMapPropagator for BoundedTraceContext {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        self.0.inject_context(cx, injector);
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        let oversized = extractor.get("tracestate").is_some_and(|state| {
            state.len() > MAX_TRACESTATE_BYTES || state.split(',').count() > 32
        });
        if oversized {
            self.0
                .extract_with_context(cx, &WithoutTraceState(extractor))
        } else {
            self.0.extract_with_context(cx, extractor)
        }
    }

    fn fields(&self) -> FieldIter<'_> {
        self.0.fields()
    }
}

/// An extractor that hides the `tracestate` of another.
struct WithoutTraceState<'a>(&'a dyn Extractor);

impl Extractor for WithoutTraceState<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key.eq_ignore_ascii_case("tracestate") {
            None
        } else {
            self.0.get(key)
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .into_iter()
            .filter(|key| !key.eq_ignore_ascii_case("tracestate"))
            .collect()
    }
}

/// Returns the trace context headers of `span`, as `(name, value)` pairs. The list is
/// empty when the span is not recorded, because no traces are exported.
pub fn inject(span: &tracing::Span) -> Vec<(String, String)> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut carrier = std::collections::HashMap::new();
    BoundedTraceContext::new().inject_context(&context, &mut carrier);
    carrier.into_iter().collect()
}

/// Reads the trace context of a consumed message, if it carries a valid one.
pub fn extract(headers: Option<&OwnedHeaders>) -> Option<SpanContext> {
    let headers = headers?;
    let context = BoundedTraceContext::new().extract(&HeaderExtractor(headers));
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

struct HeaderExtractor<'a>(&'a OwnedHeaders);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|header| header.key.eq_ignore_ascii_case(key))
            .and_then(|header| header.value)
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|header| header.key).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Header;

    #[test]
    fn reads_a_traceparent_header() {
        let headers = OwnedHeaders::new().insert(Header {
            key: "traceparent",
            value: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".as_bytes()),
        });
        let context = extract(Some(&headers)).expect("valid context");
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled());
        assert!(context.is_remote());
    }

    #[test]
    fn drops_an_oversized_tracestate() {
        let big: Vec<String> = (0..40).map(|n| format!("k{n}=v")).collect();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "traceparent",
                value: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".as_bytes()),
            })
            .insert(Header {
                key: "tracestate",
                value: Some(big.join(",").as_bytes()),
            });
        let context = extract(Some(&headers)).expect("traceparent kept");
        assert_eq!(context.trace_state().header(), "");

        let small = OwnedHeaders::new()
            .insert(Header {
                key: "traceparent",
                value: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".as_bytes()),
            })
            .insert(Header {
                key: "tracestate",
                value: Some("vendor=abc".as_bytes()),
            });
        let context = extract(Some(&small)).expect("traceparent kept");
        assert_eq!(context.trace_state().header(), "vendor=abc");
    }

    #[test]
    fn ignores_a_malformed_traceparent() {
        let headers = OwnedHeaders::new().insert(Header {
            key: "traceparent",
            value: Some("00-not-a-trace-01".as_bytes()),
        });
        assert!(extract(Some(&headers)).is_none());
        assert!(extract(None).is_none());
    }
}

//! W3C trace context in Kafka message headers: the producer writes the `traceparent` (and
//! `tracestate`) of its publish span, and the consumer continues or links to it.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use rdkafka::message::{Headers, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Returns the trace context headers of `span`, as `(name, value)` pairs; empty when the span is
/// not recorded, which is the case when no traces are exported.
pub fn inject(span: &tracing::Span) -> Vec<(String, String)> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.into_iter().collect()
}

/// Reads the trace context of a consumed message, if it carries a valid one.
pub fn extract(headers: Option<&OwnedHeaders>) -> Option<SpanContext> {
    let headers = headers?;
    let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
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
    fn ignores_a_malformed_traceparent() {
        let headers = OwnedHeaders::new().insert(Header {
            key: "traceparent",
            value: Some("00-not-a-trace-01".as_bytes()),
        });
        assert!(extract(Some(&headers)).is_none());
        assert!(extract(None).is_none());
    }
}

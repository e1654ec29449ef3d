//! The root span of each HTTP request, as tracing-actix-web builds it, with two changes.
//! A response with a 5xx status marks the span as an error, even when the handler built
//! that response itself. The probe and scrape routes get no span, so that health checks
//! and metric scrapes do not fill the trace store.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::Error;
use tracing::Span;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};

/// Paths whose requests are not traced.
const UNTRACED: &[&str] = &["/healthz", "/readyz", "/metrics"];

/// The root span builder of logpipe's HTTP server; see the module documentation.
pub struct RootSpan;

impl RootSpanBuilder for RootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let path = request.path().trim_end_matches('/');
        if UNTRACED.contains(&path) {
            return Span::none();
        }
        DefaultRootSpanBuilder::on_request_start(request)
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        let server_error = matches!(outcome, Ok(response) if response.status().is_server_error());
        DefaultRootSpanBuilder::on_request_end(span.clone(), outcome);
        if server_error {
            span.record("otel.status_code", "ERROR");
        }
    }
}

//! `GET /metrics`: logpipe's metrics in the Prometheus text format, for scrapers that do
//! not go through an OpenTelemetry Collector. 404 when `telemetry.prometheus` is off.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::{web, HttpResponse};
use prometheus::{Encoder, TextEncoder};

use super::AppState;
use crate::error::ApiError;

/// Renders the registry.
pub async fn prometheus(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let registry = state.prometheus.as_ref().ok_or(ApiError::NotFound)?;
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    encoder
        .encode(&registry.gather(), &mut body)
        .map_err(|err| ApiError::internal("cannot render metrics", err))?;
    Ok(HttpResponse::Ok()
        .content_type(encoder.format_type())
        .body(body))
}

/// Records the duration of every request by its route pattern, so that a path with ids
/// or an unknown path never becomes a series of its own.
pub async fn record_request<B: MessageBody>(
    req: ServiceRequest,
    next: actix_web::middleware::Next<B>,
) -> Result<ServiceResponse<B>, actix_web::Error> {
    let started = Instant::now();
    let method = req.method().clone();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let response = next.call(req).await?;
    if let Some(state) = state {
        let route = response
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".to_string());
        state.metrics.http_request(
            &route,
            method.as_str(),
            response.status().as_u16(),
            started.elapsed(),
        );
    }
    Ok(response)
}

//! `POST /api/logs/`: authenticate the API key, rate-limit, validate, publish, respond 202.
//!
//! The 202 is sent only after Kafka acknowledged every event of the request. A request
//! with any invalid event is rejected whole and nothing of it is published.

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use chrono::{DateTime, TimeDelta, Utc};
use futures::StreamExt;
use serde::Serialize;
use tracing::Instrument;
use uuid::Uuid;

use super::AppState;
use crate::accounts::ApiKeyRecord;
use crate::actors::kafka_producer::{self, Publish, PublishError};
use crate::actors::rate_limiter::{api_key_subject, Check, Decision, Limit};
use crate::actors::{call, CallError};
use crate::auth;
use crate::error::ApiError;
use crate::event::{self, FieldError, Owner, ParseError};
use crate::telemetry::metrics::ActorName;
use crate::telemetry::propagation;

/// The header that carries the API key.
pub const API_KEY_HEADER: &str = "API-KEY";

/// `last_used_at` is written at most this often per key, to keep writes off the hot path.
const TOUCH_INTERVAL: TimeDelta = TimeDelta::seconds(60);

#[derive(Serialize)]
struct Accepted {
    accepted: usize,
    ids: Vec<Uuid>,
}

/// Ingests one event or an array of events.
pub async fn ingest(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let result = handle(&state, &req, payload).await;
    if let Err(err) = &result {
        state.metrics.ingest_rejected(err.code());
    }
    result
}

async fn handle(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let received_at = Utc::now();
    if state.draining.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable {
            what: "logpipe (shutting down)",
            retry_after: state.retry_after(),
        });
    }
    let _admission = state.admit(declared_length(req))?;
    let key = authenticate_key(state, req).await?;

    let decision = rate_limit(state, &key)
        .instrument(tracing::info_span!("rate_limit.check"))
        .await?;
    if !decision.allowed {
        state.metrics.ingest_rejected("rate_limited");
        return Ok(rate_limited(&decision));
    }
    let mut response = match accept(state, req, payload, &key, received_at).await {
        Ok(response) => response,
        Err(err) => {
            state.metrics.ingest_rejected(err.code());
            err.error_response()
        }
    };
    add_rate_limit_headers(&mut response, &decision);
    Ok(response)
}

/// Reads, validates and publishes the body of a request that passed the rate limit.
async fn accept(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    key: &ApiKeyRecord,
    received_at: DateTime<Utc>,
) -> Result<HttpResponse, ApiError> {
    let read_timeout = state.config.http.body_read_timeout_ms;
    let reading = read_body(req, payload, state.config.http.body_limit_bytes);
    let body = tokio::time::timeout(Duration::from_millis(read_timeout), reading)
        .await
        .map_err(|_| ApiError::RequestTimeout(read_timeout))??;
    let owner = Owner {
        user_id: key.user_id,
        api_key_id: key.id,
    };
    let events = event::parse_events(&body, owner, received_at).map_err(|err| match err {
        ParseError::InvalidJson(message) => ApiError::InvalidJson(message),
        ParseError::Empty => ApiError::field("body", err.to_string()),
        ParseError::Invalid(errors) => ApiError::InvalidEvents(errors),
    })?;

    let ids: Vec<Uuid> = events.iter().map(|event| event.id).collect();
    let span = tracing::info_span!(
        "kafka.publish",
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = %state.config.kafka.topic,
        messaging.batch.message_count = events.len(),
        otel.status_code = tracing::field::Empty,
    );
    let published = publish(state, &events, &span)
        .instrument(span.clone())
        .await;
    if published.is_err() {
        span.record("otel.status_code", "ERROR");
    }
    published?;
    state.metrics.events_ingested(
        events
            .iter()
            .map(|event| (event.service_name.as_str(), event.severity)),
    );

    Ok(HttpResponse::Accepted().json(Accepted {
        accepted: ids.len(),
        ids,
    }))
}

/// Finds the active key named by the `API-KEY` header.
async fn authenticate_key(state: &AppState, req: &HttpRequest) -> Result<ApiKeyRecord, ApiError> {
    let secret = req
        .headers()
        .get(API_KEY_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|secret| !secret.is_empty())
        .ok_or(ApiError::InvalidApiKey("missing API-KEY header"))?;
    let hash = auth::sha256(secret);
    let record = state
        .api_keys
        .find(&state.accounts, &hash)
        .await
        .map_err(|err| {
            tracing::warn!(error = %err, "cannot look up API key");
            ApiError::Unavailable {
                what: "database",
                retry_after: state.retry_after(),
            }
        })?;
    let invalid = ApiError::InvalidApiKey("invalid or revoked API key");
    let record = record.ok_or(invalid)?;
    if !auth::hashes_equal(&record.key_hash, &hash) || !record.active {
        return Err(ApiError::InvalidApiKey("invalid or revoked API key"));
    }
    touch_key(state, &record);
    Ok(record)
}

/// Records the key's use in the background when its stored `last_used_at` is older than
/// `TOUCH_INTERVAL`.
fn touch_key(state: &AppState, record: &ApiKeyRecord) {
    let recent = record
        .last_used_at
        .is_some_and(|used| Utc::now() - used < TOUCH_INTERVAL);
    if recent {
        return;
    }
    let accounts = state.accounts.clone();
    let key_id = record.id;
    actix_web::rt::spawn(async move {
        if let Err(err) = accounts.touch_api_key(key_id).await {
            tracing::debug!(key_id, error = %err, "cannot record API key use");
        }
    });
}

async fn rate_limit(state: &AppState, key: &ApiKeyRecord) -> Result<Decision, ApiError> {
    let limiter = state.rate_limiter.as_ref().ok_or_else(|| {
        ApiError::internal("rate limiter missing", "API role without RateLimiter")
    })?;
    let limits = &state.config.rate_limit;
    let limit = key
        .rate_limit_per_minute
        .and_then(|limit| u32::try_from(limit).ok())
        .unwrap_or(limits.requests_per_minute);
    let burst = if key.rate_limit_per_minute.is_some() {
        limit
    } else {
        limits.effective_burst()
    };
    let build = |reply| Check {
        subject: api_key_subject(key.id),
        limit: Limit {
            per_minute: limit,
            burst,
        },
        consume: true,
        reply,
    };
    let _pending = state.metrics.mailbox(ActorName::RateLimiter).enter();
    match call(limiter, build, state.ingest_deadline()).await {
        Ok(Ok(decision)) => Ok(decision),
        Ok(Err(err)) => {
            // The limiter logged the outage once when it began.
            tracing::debug!(error = %err, "rate limit decision failed");
            Err(ApiError::Unavailable {
                what: "rate limiter",
                retry_after: state.retry_after(),
            })
        }
        Err(err) => Err(state.unavailable("rate limiter", err)),
    }
}

/// Builds the rate-limit header fields (`RateLimit-Limit`, `-Remaining`, `-Reset`) of every
/// `/api/logs/` response, lowercase as HTTP/2 requires.
fn rate_limit_header_values(decision: &Decision) -> [(&'static str, String); 3] {
    let reset = decision.reset_after.as_secs() + u64::from(decision.reset_after.subsec_nanos() > 0);
    [
        ("ratelimit-limit", decision.limit.to_string()),
        ("ratelimit-remaining", decision.remaining.to_string()),
        ("ratelimit-reset", reset.to_string()),
    ]
}

fn add_rate_limit_headers(response: &mut HttpResponse, decision: &Decision) {
    for (name, value) in rate_limit_header_values(decision) {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
}

/// Builds the 429 response: the JSON error with `Retry-After` and the rate-limit fields.
fn rate_limited(decision: &Decision) -> HttpResponse {
    let error = ApiError::RateLimited {
        limit: decision.limit,
        retry_after: decision.retry_after,
    };
    let mut response = error.error_response();
    add_rate_limit_headers(&mut response, decision);
    response
}

/// Returns the `Content-Length` of the request, if it has a valid one.
fn declared_length(req: &HttpRequest) -> Option<usize> {
    req.headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
}

/// Reads the body, failing with 413 as soon as it exceeds `limit` bytes.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    let too_large = ApiError::PayloadTooLarge { limit };
    let declared = declared_length(req);
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large);
    }
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(8192).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|err| ApiError::InvalidJson(format!("cannot read body: {err}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Rejects the request when an event is too large for one Kafka message, before anything
/// of it is published.
fn check_message_sizes(
    records: &[kafka_producer::Record],
    trace: &[(String, String)],
    limit: usize,
) -> Result<(), ApiError> {
    // Key and headers travel in the same message: 512 bytes covers logpipe's own headers,
    // and the trace context headers count at their size.
    let overhead = 512
        + trace
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum::<usize>();
    let errors: Vec<FieldError> = records
        .iter()
        .enumerate()
        .filter(|(_, record)| record.payload.len() + record.key.len() + overhead > limit)
        .map(|(index, record)| FieldError {
            index,
            field: String::new(),
            reason: format!(
                "event is {} bytes as a Kafka message, over the limit of {limit} bytes",
                record.payload.len() + record.key.len()
            ),
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::InvalidEvents(errors))
    }
}

async fn publish(
    state: &AppState,
    events: &[event::Event],
    span: &tracing::Span,
) -> Result<(), ApiError> {
    let producer = state
        .producer
        .as_ref()
        .ok_or_else(|| ApiError::internal("producer missing", "API role without KafkaProducer"))?;
    let records = events
        .iter()
        .map(kafka_producer::encode)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| ApiError::internal("cannot encode event", err))?;
    let trace = propagation::inject(span);
    check_message_sizes(&records, &trace, state.config.producer.max_message_bytes)?;
    let build = |reply| Publish {
        records,
        trace,
        reply,
    };
    let _pending = state.metrics.mailbox(ActorName::KafkaProducer).enter();
    match call(producer, build, state.ingest_deadline()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(PublishError::QueueFull)) => Err(state.unavailable("kafka", CallError::Full)),
        Ok(Err(err)) => {
            state.note_shed("kafka", &err.to_string());
            Err(ApiError::Unavailable {
                what: "kafka",
                retry_after: state.retry_after(),
            })
        }
        Err(err) => Err(state.unavailable("kafka", err)),
    }
}

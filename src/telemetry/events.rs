//! Export of stored events as OpenTelemetry log records, so that they can be searched in
//! an OpenTelemetry backend beside logpipe's own telemetry.
//!
//! Each record has the event's `service_name` as its resource's `service.name`, and the
//! event's severity, message (as body) and attributes. Its trace context is the one the
//! client sent with the event, or else the one of the request that ingested it.
//!
//! The consumers hand records over with [`EventExporter::export`], which only calls
//! `try_send` and so never waits. The queue is bounded by `telemetry.event_queue_size`
//! records and `telemetry.event_queue_kbytes`, and a record that does not fit is dropped
//! and counted. One task sends the queue in requests of up to `telemetry.event_batch_size`
//! records and `MAX_REQUEST_BYTES`. A failed request drops its records, counts them, and
//! is reported once per outage of the collector.
//!
//! Each record's resource also carries `logpipe.user_id`, the account that sent the event,
//! so that two accounts' services of the same name can be told apart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::SpanContext;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use serde_json::Value;
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::otlp::{self, Signal};
use super::Metrics;
use crate::config::TelemetryConfig;
use crate::event::Event;

/// Maximum time a record waits for its batch to fill.
const BATCH_DELAY: Duration = Duration::from_secs(1);

/// Largest export request, in bytes of encoded records. An OpenTelemetry Collector takes
/// bodies up to 20 MiB by default.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Attribute of the event id; a client attribute of the same name is left out.
const RECORD_UID: &str = "log.record.uid";

/// Instrumentation scope of the event records.
const SCOPE_NAME: &str = "logpipe.events";

/// A record on its way out, with the service that becomes its resource.
struct Item {
    user_id: i64,
    service: String,
    record: LogRecord,
    /// Encoded size of the record.
    bytes: usize,
}

/// Hands stored events to the export task; cheap to clone.
#[derive(Clone)]
pub struct EventExporter {
    queue: mpsc::Sender<Item>,
    /// Bytes of the records in the queue.
    queued_bytes: Arc<AtomicUsize>,
    max_queued_bytes: usize,
    metrics: Metrics,
    stop: Arc<watch::Sender<bool>>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl EventExporter {
    /// Starts the export task on the current runtime; records go to `url` with the headers
    /// of the `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_EXPORTER_OTLP_LOGS_HEADERS` variables.
    pub fn start(config: &TelemetryConfig, url: String, metrics: Metrics) -> Self {
        let (queue, receiver) = mpsc::channel(config.event_queue_size);
        let (stop, stopped) = watch::channel(false);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in otlp::signal_headers(Signal::Events) {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes());
            let value = reqwest::header::HeaderValue::from_str(&value);
            match (name, value) {
                (Ok(name), Ok(value)) => {
                    headers.insert(name, value);
                }
                _ => tracing::warn!("skipping an OTLP header that is not a valid HTTP header"),
            }
        }
        let sender = Sender {
            client: reqwest::Client::builder()
                .timeout(Duration::from_millis(config.otlp_timeout_ms))
                .user_agent(concat!("logpipe/", env!("CARGO_PKG_VERSION")))
                .default_headers(headers)
                .build()
                .unwrap_or_default(),
            url,
            json: config.otlp_protocol == "http/json",
            metrics: metrics.clone(),
            queued_bytes: Arc::clone(&queued_bytes),
        };
        let batch_size = config.event_batch_size;
        let task = tokio::spawn(sender.run(receiver, stopped, batch_size));
        Self {
            queue,
            queued_bytes,
            max_queued_bytes: config.event_queue_kbytes.saturating_mul(1024),
            metrics,
            stop: Arc::new(stop),
            task: Arc::new(Mutex::new(Some(task))),
        }
    }

    /// Queues one record per event. `trace` is the trace context of the request that
    /// ingested each event, used for events that carry none of their own.
    pub fn export<'a>(
        &self,
        events: impl IntoIterator<Item = (&'a Event, Option<&'a SpanContext>)>,
    ) {
        let mut dropped = 0;
        for (event, trace) in events {
            let record = record(event, trace);
            let bytes = record.encoded_len();
            let queued = self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
            let item = Item {
                user_id: event.user_id,
                service: event.service_name.clone(),
                record,
                bytes,
            };
            if queued + bytes > self.max_queued_bytes || self.queue.try_send(item).is_err() {
                self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.metrics.event_export_dropped("queue_full", dropped);
        }
    }

    /// Sends what is queued, within `timeout`, and stops the task.
    pub async fn shutdown(&self, timeout: Duration) {
        let _ = self.stop.send(true);
        let Some(task) = self.task.lock().await.take() else {
            return;
        };
        if tokio::time::timeout(timeout, task).await.is_err() {
            tracing::warn!("event log records still queued at shutdown were dropped");
        }
    }
}

/// The export task's side.
struct Sender {
    client: reqwest::Client,
    url: String,
    json: bool,
    metrics: Metrics,
    queued_bytes: Arc<AtomicUsize>,
}

impl Sender {
    async fn run(
        self,
        mut queue: mpsc::Receiver<Item>,
        mut stop: watch::Receiver<bool>,
        batch_size: usize,
    ) {
        let mut batch = Batch::default();
        let mut stopping = false;
        while !stopping {
            tokio::select! {
                item = queue.recv() => match item {
                    Some(item) => batch.push(item),
                    None => break,
                },
                _ = stop.changed() => break,
            }
            let deadline = Instant::now() + BATCH_DELAY;
            while batch.items.len() < batch_size && batch.bytes < MAX_REQUEST_BYTES {
                tokio::select! {
                    item = queue.recv() => match item {
                        Some(item) => batch.push(item),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = stop.changed() => {
                        stopping = true;
                        break;
                    }
                }
            }
            self.send(std::mem::take(&mut batch)).await;
        }
        // Shutdown: send what is left.
        queue.close();
        while let Ok(item) = queue.try_recv() {
            batch.push(item);
            if batch.items.len() >= batch_size || batch.bytes >= MAX_REQUEST_BYTES {
                self.send(std::mem::take(&mut batch)).await;
            }
        }
        self.send(batch).await;
    }

    async fn send(&self, batch: Batch) {
        if batch.items.is_empty() {
            return;
        }
        self.queued_bytes.fetch_sub(batch.bytes, Ordering::Relaxed);
        let records = batch.items.len() as u64;
        let request = request(batch.items);
        let (body, content_type) = if self.json {
            match serde_json::to_vec(&request) {
                Ok(body) => (body, "application/json"),
                Err(err) => {
                    tracing::error!(error = %err, "cannot encode event log records as JSON");
                    self.metrics.event_export_dropped("export_failed", records);
                    return;
                }
            }
        } else {
            (request.encode_to_vec(), "application/x-protobuf")
        };
        let response = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await;
        let failure = match response {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("the endpoint answered {}", response.status())),
            Err(err) => Some(err.to_string()),
        };
        match failure {
            None => otlp::outage().succeeded(Signal::Events),
            Some(error) => {
                otlp::outage().failed(Signal::Events, &error);
                self.metrics.event_export_dropped("export_failed", records);
            }
        }
    }
}

/// Records taken from the queue for one request.
#[derive(Default)]
struct Batch {
    items: Vec<Item>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, item: Item) {
        self.bytes += item.bytes;
        self.items.push(item);
    }
}

/// Groups records by account and service into one export request.
fn request(batch: Vec<Item>) -> ExportLogsServiceRequest {
    let mut by_service: HashMap<(i64, String), Vec<LogRecord>> = HashMap::new();
    for item in batch {
        by_service
            .entry((item.user_id, item.service))
            .or_default()
            .push(item.record);
    }
    let resource_logs = by_service
        .into_iter()
        .map(|((user_id, service), log_records)| ResourceLogs {
            resource: Some(Resource {
                attributes: vec![
                    key_value("service.name", string(service)),
                    key_value(
                        "logpipe.user_id",
                        AnyValue {
                            value: Some(any_value::Value::IntValue(user_id)),
                        },
                    ),
                ],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: SCOPE_NAME.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                log_records,
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    ExportLogsServiceRequest { resource_logs }
}

/// Builds the log record of one event.
fn record(event: &Event, trace: Option<&SpanContext>) -> LogRecord {
    let mut attributes: Vec<KeyValue> = event
        .attributes
        .iter()
        .filter(|(key, _)| key.as_str() != RECORD_UID)
        .map(|(key, value)| key_value(key, any_value(value)))
        .collect();
    attributes.push(key_value(RECORD_UID, string(event.id.to_string())));
    let (trace_id, span_id, flags) = match (&event.trace_id, &event.span_id) {
        (Some(trace_id), span_id) => (
            hex_bytes(trace_id),
            span_id.as_deref().map(hex_bytes).unwrap_or_default(),
            0,
        ),
        (None, _) => match trace {
            Some(context) => (
                context.trace_id().to_bytes().to_vec(),
                context.span_id().to_bytes().to_vec(),
                u32::from(context.trace_flags().to_u8()),
            ),
            None => (Vec::new(), Vec::new(), 0),
        },
    };
    LogRecord {
        time_unix_nano: unix_nanos(event.timestamp),
        observed_time_unix_nano: unix_nanos(event.received_at),
        severity_number: event.severity_number,
        severity_text: event.level.clone(),
        body: Some(string(event.message.clone())),
        attributes,
        flags,
        trace_id,
        span_id,
        ..Default::default()
    }
}

/// Returns nanoseconds since the Unix epoch, or 0 (unknown, in OTLP) for a time before
/// 1970, which OTLP's unsigned field cannot hold.
fn unix_nanos(time: chrono::DateTime<chrono::Utc>) -> u64 {
    let Ok(seconds) = u64::try_from(time.timestamp()) else {
        return 0;
    };
    seconds
        .checked_mul(1_000_000_000)
        .and_then(|nanos| nanos.checked_add(u64::from(time.timestamp_subsec_nanos())))
        .unwrap_or(0)
}

/// Decodes hex digits that validation already checked.
fn hex_bytes(hex: &str) -> Vec<u8> {
    hex.as_bytes()
        .chunks(2)
        .filter_map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

fn key_value(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(value),
        ..Default::default()
    }
}

fn string(text: String) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(text)),
    }
}

/// Converts a JSON value to an OpenTelemetry value; `null` becomes an empty value.
fn any_value(value: &Value) -> AnyValue {
    let value = match value {
        Value::Null => None,
        Value::Bool(flag) => Some(any_value::Value::BoolValue(*flag)),
        Value::Number(number) => Some(match number.as_i64() {
            Some(int) => any_value::Value::IntValue(int),
            None => any_value::Value::DoubleValue(number.as_f64().unwrap_or_default()),
        }),
        Value::String(text) => Some(any_value::Value::StringValue(text.clone())),
        Value::Array(items) => Some(any_value::Value::ArrayValue(ArrayValue {
            values: items.iter().map(any_value).collect(),
        })),
        Value::Object(fields) => Some(any_value::Value::KvlistValue(KeyValueList {
            values: fields
                .iter()
                .map(|(key, value)| key_value(key, any_value(value)))
                .collect(),
        })),
    };
    AnyValue { value }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{parse_events, Owner};

    fn event(extra: &str) -> Event {
        let body = format!(
            r#"{{"service_name": "checkout", "log_level": "warning", "message": "slow", "timestamp": "2024-05-01T12:00:00Z", "attributes": {{"region": "eu", "attempt": 3}}{extra}}}"#
        );
        let owner = Owner {
            user_id: 1,
            api_key_id: 1,
        };
        parse_events(body.as_bytes(), owner, chrono::Utc::now())
            .expect("valid event")
            .remove(0)
    }

    #[test]
    fn record_carries_severity_body_and_attributes() {
        let event = event("");
        let record = record(&event, None);
        assert_eq!(record.severity_number, 13);
        assert_eq!(record.severity_text, "warning");
        assert_eq!(record.time_unix_nano, 1_714_564_800_000_000_000);
        assert_eq!(record.body, Some(string("slow".into())));
        let attribute = |key: &str| {
            record
                .attributes
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| kv.value.clone())
        };
        assert_eq!(attribute("region"), Some(string("eu".into())));
        assert_eq!(
            attribute("attempt").and_then(|v| v.value),
            Some(any_value::Value::IntValue(3))
        );
        assert!(record.trace_id.is_empty());
    }

    #[test]
    fn event_trace_context_wins_over_the_request_one() {
        let own = event(
            r#", "trace_id": "4BF92F3577B34DA6A3CE929D0E0E4736", "span_id": "00f067aa0ba902b7""#,
        );
        let request = SpanContext::new(
            opentelemetry::trace::TraceId::from_bytes([7; 16]),
            opentelemetry::trace::SpanId::from_bytes([9; 8]),
            opentelemetry::trace::TraceFlags::SAMPLED,
            true,
            Default::default(),
        );
        let record = record(&own, Some(&request));
        assert_eq!(
            record.trace_id,
            hex_bytes("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(record.span_id, hex_bytes("00f067aa0ba902b7"));

        let plain = event("");
        let record = super::record(&plain, Some(&request));
        assert_eq!(record.trace_id, vec![7; 16]);
        assert_eq!(record.span_id, vec![9; 8]);
        assert_eq!(record.flags, 1);
    }

    #[test]
    fn request_groups_records_by_service() {
        let items = [(1, "a"), (1, "b"), (1, "a"), (2, "a")].map(|(user_id, service)| Item {
            user_id,
            service: service.into(),
            record: LogRecord::default(),
            bytes: 0,
        });
        let request = request(items.into());
        assert_eq!(request.resource_logs.len(), 3);
        let total: usize = request
            .resource_logs
            .iter()
            .map(|r| r.scope_logs[0].log_records.len())
            .sum();
        assert_eq!(total, 4);
    }

    #[test]
    fn client_record_uid_is_replaced() {
        let event = event(r#", "log.record.uid": "spoofed""#);
        let record = record(&event, None);
        let uids: Vec<&KeyValue> = record
            .attributes
            .iter()
            .filter(|kv| kv.key == RECORD_UID)
            .collect();
        assert_eq!(uids.len(), 1);
        assert_eq!(uids[0].value, Some(string(event.id.to_string())));
    }

    #[test]
    fn times_past_the_signed_nanosecond_range_export() {
        let late = chrono::DateTime::parse_from_rfc3339("2300-01-01T00:00:00Z")
            .expect("time")
            .to_utc();
        assert_eq!(unix_nanos(late), 10_413_792_000 * 1_000_000_000);
        let early = chrono::DateTime::parse_from_rfc3339("1969-12-31T23:59:59Z")
            .expect("time")
            .to_utc();
        assert_eq!(unix_nanos(early), 0);
    }
}

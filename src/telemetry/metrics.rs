//! logpipe's metrics: OpenTelemetry instruments, read by the OTLP exporter and by
//! `GET /metrics`.
//!
//! Every attribute has a bounded set of values: routes, status codes, severities, reasons,
//! actor names, partitions, and event service names up to `telemetry.metric_service_limit`.
//! No API key, user id or event id is ever an attribute.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableGauge};
use opentelemetry::KeyValue;

use super::names;
use crate::event::Severity;

/// Bucket bounds of the duration histograms, in seconds.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket bounds of the batch size histogram, in events.
const BATCH_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];

/// The `reason` values of the publish failures metric.
pub const PUBLISH_FAILURE_REASONS: &[&str] = &[
    "queue_full",
    "rejected",
    "timeout",
    "producer_fenced",
    "broker",
    "canceled",
];

/// Series name for event services past `telemetry.metric_service_limit`.
const OTHER_SERVICE: &str = "other";

/// The actors whose mailbox depth and restarts are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorName {
    RateLimiter,
    KafkaProducer,
    Consumer,
    DbWriter,
}

impl ActorName {
    const ALL: [ActorName; 4] = [
        ActorName::RateLimiter,
        ActorName::KafkaProducer,
        ActorName::Consumer,
        ActorName::DbWriter,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ActorName::RateLimiter => "rate_limiter",
            ActorName::KafkaProducer => "kafka_producer",
            ActorName::Consumer => "consumer",
            ActorName::DbWriter => "db_writer",
        }
    }
}

/// Count of messages sent to an actor and not yet replied to.
#[derive(Debug, Default)]
pub struct MailboxDepth(AtomicI64);

impl MailboxDepth {
    /// Counts one message until the returned guard is dropped.
    pub fn enter(&self) -> DepthGuard<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        DepthGuard(&self.0)
    }
}

/// Counts a message as pending while it lives.
pub struct DepthGuard<'a>(&'a AtomicI64);

impl Drop for DepthGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `(topic, partition, lag)` of one partition.
pub type PartitionLag = (String, i32, i64);

/// Values that observable gauges read when metrics are collected.
#[derive(Debug, Default)]
struct Observed {
    rate_limiter: MailboxDepth,
    kafka_producer: MailboxDepth,
    db_writer: MailboxDepth,
    publish_in_flight: AtomicI64,
    /// Lag per consumer, from its latest statistics.
    lag: Mutex<HashMap<usize, Vec<PartitionLag>>>,
    pool: Mutex<Option<Pool>>,
}

/// The instruments; cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<Instruments>);

struct Instruments {
    http_duration: Histogram<f64>,
    events_ingested: Counter<u64>,
    ingest_rejected: Counter<u64>,
    rate_limit_decisions: Counter<u64>,
    publish_duration: Histogram<f64>,
    publish_failures: Counter<u64>,
    dead_lettered: Counter<u64>,
    db_batch_size: Histogram<u64>,
    db_insert_duration: Histogram<f64>,
    db_rows_written: Counter<u64>,
    actor_restarts: Counter<u64>,
    event_export_dropped: Counter<u64>,
    services: RwLock<HashSet<String>>,
    service_limit: usize,
    observed: Arc<Observed>,
    _gauges: Vec<ObservableGauge<i64>>,
}

impl Metrics {
    /// Creates the instruments on `meter`.
    pub fn new(meter: &Meter, service_limit: usize) -> Self {
        let observed = Arc::new(Observed::default());
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build()
        };
        let counter = |name: &'static str, unit: &'static str, description: &'static str| {
            meter
                .u64_counter(name)
                .with_unit(unit)
                .with_description(description)
                .build()
        };
        let gauges = observable_gauges(meter, &observed);
        let metrics = Self(Arc::new(Instruments {
            http_duration: seconds(names::HTTP_REQUEST_DURATION, "Duration of HTTP requests"),
            events_ingested: counter(
                names::EVENTS_INGESTED,
                "{event}",
                "Events accepted into Kafka",
            ),
            ingest_rejected: counter(
                names::INGEST_REJECTED,
                "{request}",
                "Ingest requests rejected, nothing of them kept",
            ),
            rate_limit_decisions: counter(
                names::RATE_LIMIT_DECISIONS,
                "{decision}",
                "Rate-limit decisions",
            ),
            publish_duration: seconds(
                names::KAFKA_PUBLISH_DURATION,
                "Time from queueing a batch in the producer to its last acknowledgement",
            ),
            publish_failures: counter(
                names::KAFKA_PUBLISH_FAILURES,
                "{message}",
                "Messages Kafka did not acknowledge",
            ),
            dead_lettered: counter(
                names::EVENTS_DEAD_LETTERED,
                "{message}",
                "Messages moved to the dead-letter topic",
            ),
            db_batch_size: meter
                .u64_histogram(names::DB_BATCH_SIZE)
                .with_unit("{event}")
                .with_description("Events per PostgreSQL insert batch")
                .with_boundaries(BATCH_BUCKETS.to_vec())
                .build(),
            db_insert_duration: seconds(
                names::DB_INSERT_DURATION,
                "Duration of one PostgreSQL batch insert",
            ),
            db_rows_written: counter(
                names::DB_ROWS_WRITTEN,
                "{row}",
                "Rows inserted into PostgreSQL",
            ),
            actor_restarts: counter(
                names::ACTOR_RESTARTS,
                "{restart}",
                "Actor restarts after a failure",
            ),
            event_export_dropped: counter(
                names::EVENT_EXPORT_DROPPED,
                "{event}",
                "Event log records not exported",
            ),
            services: RwLock::new(HashSet::new()),
            service_limit,
            observed,
            _gauges: gauges,
        }));
        // Series that start at zero, so that rates and absence alerts work from the start.
        for actor in ActorName::ALL {
            metrics.0.actor_restarts.add(0, &[actor_attr(actor)]);
        }
        metrics.0.dead_lettered.add(0, &[]);
        for reason in PUBLISH_FAILURE_REASONS {
            metrics
                .0
                .publish_failures
                .add(0, &[KeyValue::new("reason", *reason)]);
        }
        for reason in ["queue_full", "export_failed"] {
            metrics
                .0
                .event_export_dropped
                .add(0, &[KeyValue::new("reason", reason)]);
        }
        metrics
    }

    /// Instruments whose values go nowhere, for an actor used on its own.
    pub fn discarded() -> Self {
        Self::new(&opentelemetry::global::meter("logpipe"), 0)
    }

    /// Records one HTTP request. `route` is the matched pattern, never the raw path.
    pub fn http_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let method: &'static str = match method {
            "GET" => "GET",
            "HEAD" => "HEAD",
            "POST" => "POST",
            "PUT" => "PUT",
            "PATCH" => "PATCH",
            "DELETE" => "DELETE",
            "OPTIONS" => "OPTIONS",
            _ => "_OTHER",
        };
        self.0.http_duration.record(
            elapsed.as_secs_f64(),
            &[
                KeyValue::new("http.route", route.to_string()),
                KeyValue::new("http.request.method", method),
                KeyValue::new("http.response.status_code", i64::from(status)),
            ],
        );
    }

    /// Counts accepted events by service and severity.
    pub fn events_ingested<'a>(&self, events: impl Iterator<Item = (&'a str, Severity)>) {
        let mut counts: Vec<(&str, Severity, u64)> = Vec::new();
        for (service, severity) in events {
            match counts
                .iter_mut()
                .find(|(s, sev, _)| *s == service && *sev == severity)
            {
                Some(entry) => entry.2 += 1,
                None => counts.push((service, severity, 1)),
            }
        }
        for (service, severity, count) in counts {
            let service = self.service_series(service);
            self.0.events_ingested.add(
                count,
                &[
                    KeyValue::new("service_name", service),
                    KeyValue::new("severity", severity.as_str()),
                ],
            );
        }
    }

    /// Returns `service` while fewer than `telemetry.metric_service_limit` services have a
    /// series, and `other` after.
    fn service_series(&self, service: &str) -> String {
        let known = self
            .0
            .services
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if known.contains(service) {
            return service.to_string();
        }
        let full = known.len() >= self.0.service_limit;
        drop(known);
        if full {
            return OTHER_SERVICE.to_string();
        }
        let mut known = self
            .0
            .services
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if known.len() < self.0.service_limit {
            known.insert(service.to_string());
            service.to_string()
        } else {
            OTHER_SERVICE.to_string()
        }
    }

    /// Counts a rejected ingest request; `reason` is the error code of the response.
    pub fn ingest_rejected(&self, reason: &'static str) {
        self.0
            .ingest_rejected
            .add(1, &[KeyValue::new("reason", reason)]);
    }

    /// Counts a rate-limit decision; `fallback` when Redis could not be asked.
    pub fn rate_limit_decision(&self, allowed: bool, fallback: bool) {
        let decision = if allowed { "allowed" } else { "blocked" };
        let store = if fallback { "fallback" } else { "redis" };
        self.0.rate_limit_decisions.add(
            1,
            &[
                KeyValue::new("decision", decision),
                KeyValue::new("store", store),
            ],
        );
    }

    /// Records a published batch: its duration and, when it failed, its messages.
    pub fn publish_finished(&self, elapsed: Duration, failed: Option<(&'static str, u64)>) {
        let outcome = if failed.is_some() { "error" } else { "ok" };
        self.0
            .publish_duration
            .record(elapsed.as_secs_f64(), &[KeyValue::new("outcome", outcome)]);
        if let Some((reason, messages)) = failed {
            self.publish_failed(reason, messages);
        }
    }

    /// Counts messages that could not be published.
    pub fn publish_failed(&self, reason: &'static str, messages: u64) {
        self.0
            .publish_failures
            .add(messages, &[KeyValue::new("reason", reason)]);
    }

    /// Messages handed to the producer and not yet acknowledged.
    pub fn publish_in_flight(&self) -> &AtomicI64 {
        &self.0.observed.publish_in_flight
    }

    pub fn dead_lettered(&self) {
        self.0.dead_lettered.add(1, &[]);
    }

    /// Records one batch insert.
    pub fn db_insert(&self, events: usize, rows: Option<u64>, elapsed: Duration) {
        let outcome = if rows.is_some() { "ok" } else { "error" };
        self.0.db_batch_size.record(events as u64, &[]);
        self.0
            .db_insert_duration
            .record(elapsed.as_secs_f64(), &[KeyValue::new("outcome", outcome)]);
        if let Some(rows) = rows {
            self.0.db_rows_written.add(rows, &[]);
        }
    }

    pub fn actor_restarted(&self, actor: ActorName) {
        self.0.actor_restarts.add(1, &[actor_attr(actor)]);
    }

    /// Returns the pending-message count of an actor.
    pub fn mailbox(&self, actor: ActorName) -> &MailboxDepth {
        let observed = &self.0.observed;
        match actor {
            ActorName::RateLimiter => &observed.rate_limiter,
            ActorName::KafkaProducer => &observed.kafka_producer,
            // Consumers are tasks without a mailbox; their batches wait on DbWriter's.
            ActorName::Consumer | ActorName::DbWriter => &observed.db_writer,
        }
    }

    /// Replaces the lag that consumer `index` last reported.
    pub fn consumer_lag(&self, index: usize, partitions: Vec<PartitionLag>) {
        let mut lag = self
            .0
            .observed
            .lag
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if partitions.is_empty() {
            lag.remove(&index);
        } else {
            lag.insert(index, partitions);
        }
    }

    /// Reports the pool's connections in the pool gauge.
    pub fn watch_pool(&self, pool: Pool) {
        *self
            .0
            .observed
            .pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(pool);
    }

    /// Counts event log records that were not exported.
    pub fn event_export_dropped(&self, reason: &'static str, records: u64) {
        self.0
            .event_export_dropped
            .add(records, &[KeyValue::new("reason", reason)]);
    }
}

fn actor_attr(actor: ActorName) -> KeyValue {
    KeyValue::new("actor", actor.as_str())
}

/// Registers the gauges whose values are read at collection time.
fn observable_gauges(meter: &Meter, observed: &Arc<Observed>) -> Vec<ObservableGauge<i64>> {
    let in_flight = Arc::clone(observed);
    let mailboxes = Arc::clone(observed);
    let lag = Arc::clone(observed);
    let pool = Arc::clone(observed);
    vec![
        meter
            .i64_observable_gauge(names::KAFKA_PUBLISH_IN_FLIGHT)
            .with_unit("{message}")
            .with_description("Messages handed to the Kafka producer and not yet acknowledged")
            .with_callback(move |gauge| {
                gauge.observe(in_flight.publish_in_flight.load(Ordering::Relaxed), &[]);
            })
            .build(),
        meter
            .i64_observable_gauge(names::ACTOR_MAILBOX_DEPTH)
            .with_unit("{message}")
            .with_description("Messages sent to an actor and not yet answered")
            .with_callback(move |gauge| {
                for (actor, depth) in [
                    (ActorName::RateLimiter, &mailboxes.rate_limiter),
                    (ActorName::KafkaProducer, &mailboxes.kafka_producer),
                    (ActorName::DbWriter, &mailboxes.db_writer),
                ] {
                    gauge.observe(depth.0.load(Ordering::Relaxed), &[actor_attr(actor)]);
                }
            })
            .build(),
        meter
            .i64_observable_gauge(names::KAFKA_CONSUMER_LAG)
            .with_unit("{message}")
            .with_description("High watermark minus committed offset, per partition")
            .with_callback(move |gauge| {
                let lag = lag
                    .lag
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                for (topic, partition, value) in lag.values().flatten() {
                    gauge.observe(
                        *value,
                        &[
                            KeyValue::new("topic", topic.clone()),
                            KeyValue::new("partition", i64::from(*partition)),
                        ],
                    );
                }
            })
            .build(),
        meter
            .i64_observable_gauge(names::DB_POOL_CONNECTIONS)
            .with_unit("{connection}")
            .with_description("PostgreSQL pool connections")
            .with_callback(move |gauge| {
                let pool = pool
                    .pool
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if let Some(pool) = pool.as_ref() {
                    let status = pool.status();
                    let idle = status.available as i64;
                    let in_use = (status.size as i64 - idle).max(0);
                    gauge.observe(in_use, &[KeyValue::new("state", "in_use")]);
                    gauge.observe(idle, &[KeyValue::new("state", "idle")]);
                }
            })
            .build(),
    ]
}

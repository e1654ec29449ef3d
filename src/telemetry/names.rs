//! Names of the metrics logpipe emits, as OpenTelemetry instruments.
//!
//! `GET /metrics` shows them in Prometheus form: dots become underscores, histograms in
//! seconds gain `_seconds`, counters gain `_total`. The dashboards and alert rules in
//! `docker/signoz/` query these names, and a test keeps them in step.

/// HTTP request duration, seconds; by `http.route`, `http.request.method` and
/// `http.response.status_code`. Its count is the number of requests.
pub const HTTP_REQUEST_DURATION: &str = "http.server.request.duration";
/// Events accepted (in Kafka), by `service_name` and `severity`.
pub const EVENTS_INGESTED: &str = "logpipe.events.ingested";
/// Rejected ingest requests, by `reason`; nothing of a rejected request is kept.
pub const INGEST_REJECTED: &str = "logpipe.ingest.rejected";
/// Rate-limit decisions on ingest requests, by `decision` (`allowed`, `blocked`) and `store` (`redis`, or
/// `fallback` when Redis was unreachable).
pub const RATE_LIMIT_DECISIONS: &str = "logpipe.rate_limit.decisions";
/// Time from handing a batch to librdkafka to the last acknowledgement, seconds; by `outcome`.
pub const KAFKA_PUBLISH_DURATION: &str = "logpipe.kafka.publish.duration";
/// Messages handed to librdkafka and not yet acknowledged.
pub const KAFKA_PUBLISH_IN_FLIGHT: &str = "logpipe.kafka.publish.in_flight";
/// Messages whose publish failed, by `reason`.
pub const KAFKA_PUBLISH_FAILURES: &str = "logpipe.kafka.publish.failures";
/// High watermark minus committed offset, by `topic` and `partition`.
pub const KAFKA_CONSUMER_LAG: &str = "logpipe.kafka.consumer.lag";
/// Messages sent to the dead-letter topic.
pub const EVENTS_DEAD_LETTERED: &str = "logpipe.events.dead_lettered";
/// Events per PostgreSQL insert batch.
pub const DB_BATCH_SIZE: &str = "logpipe.db.batch.size";
/// Duration of one batch insert, seconds; by `outcome`.
pub const DB_INSERT_DURATION: &str = "logpipe.db.insert.duration";
/// Rows inserted (an event already stored is not counted again).
pub const DB_ROWS_WRITTEN: &str = "logpipe.db.rows.written";
/// PostgreSQL pool connections, by `state` (`in_use`, `idle`).
pub const DB_POOL_CONNECTIONS: &str = "logpipe.db.pool.connections";
/// Messages waiting in or being handled by an actor, by `actor`.
pub const ACTOR_MAILBOX_DEPTH: &str = "logpipe.actor.mailbox.depth";
/// Actor restarts after a failure, by `actor`.
pub const ACTOR_RESTARTS: &str = "logpipe.actor.restarts";
/// Ingested events that could not be exported as OpenTelemetry log records, by `reason`.
pub const EVENT_EXPORT_DROPPED: &str = "logpipe.telemetry.events.dropped";

/// Every metric above.
pub const ALL: &[&str] = &[
    HTTP_REQUEST_DURATION,
    EVENTS_INGESTED,
    INGEST_REJECTED,
    RATE_LIMIT_DECISIONS,
    KAFKA_PUBLISH_DURATION,
    KAFKA_PUBLISH_IN_FLIGHT,
    KAFKA_PUBLISH_FAILURES,
    KAFKA_CONSUMER_LAG,
    EVENTS_DEAD_LETTERED,
    DB_BATCH_SIZE,
    DB_INSERT_DURATION,
    DB_ROWS_WRITTEN,
    DB_POOL_CONNECTIONS,
    ACTOR_MAILBOX_DEPTH,
    ACTOR_RESTARTS,
    EVENT_EXPORT_DROPPED,
];

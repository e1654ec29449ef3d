//! logpipe: log events in over HTTP, through Kafka, into PostgreSQL.
//!
//! Services post events to `POST /api/logs/` with an API key. The [`actors`] check the
//! key's rate limit and publish the events to Kafka, and the request gets its 202 only
//! once Kafka acknowledged them. A consumer group reads the topic and writes the events
//! into PostgreSQL in batches, committing offsets only after each batch committed.
//! [`telemetry`] traces each event along that path and exports the traces, the metrics,
//! logpipe's own logs and the stored events over OpenTelemetry.

pub mod accounts;
pub mod actors;
pub mod app;
pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod event;
pub mod http;
pub mod kafka;
pub mod replay;
pub mod telemetry;

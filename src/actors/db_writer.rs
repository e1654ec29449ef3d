//! `DbWriter`: writes batches of events into PostgreSQL.
//!
//! Messages: [`WriteBatch`] (write these events, reply when committed) and [`Ping`] (does
//! PostgreSQL respond). Mailbox capacity: `mailbox.db_writer`; the consumers wait for room
//! rather than drop anything, so a full mailbox slows consumption and the backlog stays in
//! Kafka.
//!
//! A batch is one `INSERT ... SELECT FROM unnest(...)` statement, so it commits whole or
//! not at all. It is idempotent on `(user_id, id)`: an event already stored is skipped,
//! which is what makes a redelivered Kafka message harmless. Batches are written
//! concurrently, up to the pool size.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tracing::Instrument;
use uuid::Uuid;

use super::Reply;
use crate::event::Event;
use crate::telemetry::Metrics;

const INSERT_LOGS: &str = include_str!("../../sql/queries/insert_logs.sql");

/// Counts of a committed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Rows inserted.
    pub inserted: u64,
    /// Events skipped because they were already stored.
    pub duplicates: u64,
}

/// Failure to write a batch. Nothing of the batch is stored when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot get a PostgreSQL connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL error: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

/// Formats the SQLSTATE and message of a database error, which `tokio_postgres::Error`'s own
/// `Display` leaves out ("db error").
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => err.to_string(),
    }
}

impl WriteError {
    /// True when PostgreSQL rejected the data itself, which no retry can fix: SQLSTATE
    /// classes 22 (data exception, such as a NUL character in text), 23 (integrity
    /// constraint violation) and 54 (program limit exceeded).
    pub fn is_permanent(&self) -> bool {
        let Self::Postgres(err) = self else {
            return false;
        };
        err.code()
            .is_some_and(|state| matches!(&state.code()[..2], "22" | "23" | "54"))
    }
}

/// Writes `events` in one transaction and replies once it committed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WriteBatch {
    pub events: Arc<Vec<Event>>,
    /// The span the insert's span belongs under.
    pub span: tracing::Span,
    pub reply: Reply<Result<WriteOutcome, WriteError>>,
}

impl std::fmt::Debug for WriteBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBatch")
            .field("events", &self.events.len())
            .finish()
    }
}

/// Checks that PostgreSQL responds.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ping {
    pub reply: Reply<Result<(), WriteError>>,
}

/// The actor; see the module documentation.
pub struct DbWriter {
    pool: Pool,
    mailbox_capacity: usize,
    metrics: Metrics,
}

impl DbWriter {
    pub fn new(pool: Pool, mailbox_capacity: usize, metrics: Metrics) -> Self {
        Self {
            pool,
            mailbox_capacity,
            metrics,
        }
    }
}

impl Actor for DbWriter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

impl Handler<WriteBatch> for DbWriter {
    type Result = ();

    fn handle(&mut self, msg: WriteBatch, _ctx: &mut Context<Self>) {
        let pool = self.pool.clone();
        let metrics = self.metrics.clone();
        let span = tracing::info_span!(
            parent: &msg.span,
            "db.insert",
            otel.kind = "client",
            db.system.name = "postgresql",
            db.operation.name = "INSERT",
            db.collection.name = "logs",
            db.operation.batch.size = msg.events.len(),
            otel.status_code = tracing::field::Empty,
        );
        actix::spawn(
            async move {
                let started = Instant::now();
                let result = write_batch(&pool, &msg.events).await;
                let rows = result.as_ref().ok().map(|outcome| outcome.inserted);
                metrics.db_insert(msg.events.len(), rows, started.elapsed());
                if result.is_err() {
                    tracing::Span::current().record("otel.status_code", "ERROR");
                }
                let _ = msg.reply.send(result);
            }
            .instrument(span),
        );
    }
}

impl Handler<Ping> for DbWriter {
    type Result = ();

    fn handle(&mut self, msg: Ping, _ctx: &mut Context<Self>) {
        let pool = self.pool.clone();
        actix::spawn(async move {
            let result = async {
                let client = pool.get().await?;
                client.simple_query("SELECT 1").await?;
                Ok(())
            }
            .await;
            let _ = msg.reply.send(result);
        });
    }
}

/// The batch as one array per column, the shape `unnest` takes. Public for the benches.
#[derive(Default)]
pub struct Columns<'a> {
    ids: Vec<Uuid>,
    user_ids: Vec<i64>,
    api_key_ids: Vec<i64>,
    service_names: Vec<&'a str>,
    levels: Vec<&'a str>,
    severity_texts: Vec<&'static str>,
    severity_numbers: Vec<i16>,
    messages: Vec<&'a str>,
    timestamps: Vec<DateTime<Utc>>,
    received_ats: Vec<DateTime<Utc>>,
    attributes: Vec<tokio_postgres::types::Json<&'a serde_json::Map<String, serde_json::Value>>>,
    trace_ids: Vec<Option<&'a str>>,
    span_ids: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    pub fn from_events(events: &'a [Event]) -> Self {
        let mut columns = Columns::default();
        for event in events {
            columns.ids.push(event.id);
            columns.user_ids.push(event.user_id);
            columns.api_key_ids.push(event.api_key_id);
            columns.service_names.push(&event.service_name);
            columns.levels.push(&event.level);
            columns.severity_texts.push(event.severity.as_str());
            columns.severity_numbers.push(event.severity_number as i16);
            columns.messages.push(&event.message);
            columns.timestamps.push(event.timestamp);
            columns.received_ats.push(event.received_at);
            columns
                .attributes
                .push(tokio_postgres::types::Json(&event.attributes));
            columns.trace_ids.push(event.trace_id.as_deref());
            columns.span_ids.push(event.span_id.as_deref());
        }
        columns
    }
}

/// Writes one batch; the statement is prepared once per connection and cached.
pub async fn write_batch(pool: &Pool, events: &[Event]) -> Result<WriteOutcome, WriteError> {
    if events.is_empty() {
        return Ok(WriteOutcome {
            inserted: 0,
            duplicates: 0,
        });
    }
    let client = pool.get().await?;
    let statement = client.prepare_cached(INSERT_LOGS).await?;
    let c = Columns::from_events(events);
    let inserted = client
        .execute(
            &statement,
            &[
                &c.ids,
                &c.user_ids,
                &c.api_key_ids,
                &c.service_names,
                &c.levels,
                &c.severity_texts,
                &c.severity_numbers,
                &c.messages,
                &c.timestamps,
                &c.received_ats,
                &c.attributes,
                &c.trace_ids,
                &c.span_ids,
            ],
        )
        .await?;
    Ok(WriteOutcome {
        inserted,
        duplicates: events.len() as u64 - inserted,
    })
}

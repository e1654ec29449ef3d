//! One Kafka consumer of the group: reads events, groups them into batches and hands each
//! batch to `DbWriter`. Not an actor itself: `ConsumerSupervisor` runs each consumer as a
//! task in its context and restarts it when it fails.
//!
//! A batch is flushed when it contains `db_writer.batch_size` events or its oldest event has
//! waited `db_writer.flush_interval_ms`. Offsets are stored only after `DbWriter` replied
//! that the batch committed; librdkafka commits stored offsets in the background and when
//! the consumer closes. While PostgreSQL fails, the consumer retries the same batch every
//! `db_writer.retry_delay_ms` and reads nothing new, so the backlog waits in Kafka.
//!
//! A message that is not a logpipe event, and an event PostgreSQL rejects for its content,
//! goes to `kafka.dead_letter_topic` with the error in the `logpipe-error` header before its
//! offset is stored, so it is never lost and never stops its partition.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use opentelemetry::trace::{SpanContext, TraceContextExt};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::db_writer::{DbWriter, WriteBatch, WriteError, WriteOutcome};
use crate::config::{Config, DbWriterConfig};
use crate::event::Event;
use crate::kafka;
use crate::telemetry::events::EventExporter;
use crate::telemetry::metrics::{ActorName, Metrics};
use crate::telemetry::propagation;

/// Header of a dead-letter message that carries why it could not be stored.
pub const HEADER_ERROR: &str = "logpipe-error";
/// Header of a dead-letter message naming where it came from: `topic/partition/offset`.
pub const HEADER_SOURCE: &str = "logpipe-source";

/// Most traces a batch span links to; the rest of a batch's traces are not linked.
const MAX_LINKS: usize = 128;

/// The consumer's librdkafka context: turns its periodic statistics into the lag metric.
pub struct LagContext {
    index: usize,
    metrics: Metrics,
}

impl ClientContext for LagContext {
    fn stats(&self, statistics: Statistics) {
        let mut lag = Vec::new();
        for (topic, stats) in statistics.topics {
            for (partition, stats) in stats.partitions {
                // Partition -1 is librdkafka's internal one, and a lag of -1 means the
                // partition is not assigned here or its offsets are not known yet.
                if partition >= 0 && stats.consumer_lag >= 0 {
                    lag.push((topic.clone(), partition, stats.consumer_lag));
                }
            }
        }
        self.metrics.consumer_lag(self.index, lag);
    }
}

impl ConsumerContext for LagContext {}

/// Failure that stopped a consumer on its own. The supervisor then starts a new one.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot create the consumer: {0}")]
    Create(KafkaError),
    #[error("kafka error: {0}")]
    Kafka(#[from] KafkaError),
    #[error("DbWriter is stopped")]
    WriterStopped,
}

/// A batch being filled: its events and, per partition, the last offset read.
#[derive(Default)]
struct Batch {
    events: Vec<Event>,
    /// The trace context each event was published with, by position in `events`.
    traces: Vec<Option<SpanContext>>,
    offsets: HashMap<i32, i64>,
    started: Option<Instant>,
}

impl Batch {
    fn push(
        &mut self,
        partition: i32,
        offset: i64,
        event: Option<Event>,
        trace: Option<SpanContext>,
    ) {
        self.started.get_or_insert_with(Instant::now);
        self.offsets.insert(partition, offset);
        if let Some(event) = event {
            self.events.push(event);
            self.traces.push(trace);
        }
    }

    /// Creates the span of writing this batch. It is a child of the publishing span when
    /// every event came from one trace, else a new trace linked to each (up to `MAX_LINKS`).
    fn span(&self, consumer: usize) -> tracing::Span {
        let span = tracing::info_span!(
            "kafka.consume",
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.batch.message_count = self.events.len(),
            consumer,
        );
        let mut distinct: Vec<&SpanContext> = Vec::new();
        for context in self.traces.iter().flatten() {
            if distinct.len() == MAX_LINKS {
                break;
            }
            if !distinct
                .iter()
                .any(|seen| seen.trace_id() == context.trace_id())
            {
                distinct.push(context);
            }
        }
        match distinct.as_slice() {
            [] => {}
            [only] => {
                let parent =
                    opentelemetry::Context::new().with_remote_span_context((*only).clone());
                let _ = span.set_parent(parent);
            }
            many => {
                for context in many {
                    span.add_link((*context).clone());
                }
            }
        }
        span
    }

    fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }
}

/// A message on its way to the dead-letter topic.
struct DeadLetter {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Option<OwnedHeaders>,
    source: String,
    error: String,
}

/// The outcome of an attempt that shutdown may cut short.
enum Attempt<T> {
    Done(T),
    Interrupted,
}

/// One consumer; see the module documentation.
pub struct ConsumerTask {
    index: usize,
    topic: String,
    consumer: StreamConsumer<LagContext>,
    dead_letters: FutureProducer,
    dead_letter_topic: String,
    db_writer: Addr<DbWriter>,
    settings: DbWriterConfig,
    metrics: Metrics,
    events: Option<EventExporter>,
    shutdown: watch::Receiver<bool>,
}

impl ConsumerTask {
    /// Creates the consumer, subscribed to the topic, and its dead-letter producer.
    pub fn new(
        index: usize,
        config: &Config,
        db_writer: Addr<DbWriter>,
        metrics: Metrics,
        events: Option<EventExporter>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, ConsumerError> {
        let context = LagContext {
            index,
            metrics: metrics.clone(),
        };
        let consumer: StreamConsumer<LagContext> =
            kafka::consumer_config(&config.kafka, &config.consumer)
                .create_with_context(context)
                .map_err(ConsumerError::Create)?;
        consumer.subscribe(&[&config.kafka.topic])?;
        let dead_letters: FutureProducer = kafka::producer_config(&config.kafka, &config.producer)
            .create()
            .map_err(ConsumerError::Create)?;
        Ok(Self {
            index,
            topic: config.kafka.topic.clone(),
            consumer,
            dead_letters,
            dead_letter_topic: config.kafka.dead_letter_topic.clone(),
            db_writer,
            settings: config.db_writer.clone(),
            metrics,
            events,
            shutdown,
        })
    }

    /// Consumes until shutdown is signalled (`Ok`) or the consumer fails (`Err`).
    pub async fn run(mut self) -> Result<(), ConsumerError> {
        let flush_interval = Duration::from_millis(self.settings.flush_interval_ms);
        let mut batch = Batch::default();
        loop {
            let deadline = batch.started.map(|started| started + flush_interval);
            let received = tokio::select! {
                received = self.consumer.recv() => Some(received.map(|message| message.detach())),
                _ = sleep_until(deadline) => None,
                _ = self.shutdown.changed() => break,
            };
            match received {
                Some(Ok(message)) => {
                    let partition = message.partition();
                    let offset = message.offset();
                    let trace = propagation::extract(message.headers());
                    match self.decode(&message).await {
                        Attempt::Done(event) => batch.push(partition, offset, event, trace),
                        Attempt::Interrupted => break,
                    }
                }
                Some(Err(err)) => {
                    tracing::warn!(consumer = self.index, error = %err, "kafka consumer error")
                }
                None => {}
            }
            let full = batch.events.len() >= self.settings.batch_size;
            let due = deadline.is_some_and(|deadline| Instant::now() >= deadline);
            if full || due {
                self.flush(std::mem::take(&mut batch)).await?;
            }
        }
        self.flush(batch).await?;
        self.commit_stored();
        Ok(())
    }

    /// Decodes a message; one that is not an event goes to the dead-letter topic.
    async fn decode(&self, message: &rdkafka::message::OwnedMessage) -> Attempt<Option<Event>> {
        let payload = message.payload().unwrap_or_default();
        let err = match serde_json::from_slice(payload) {
            Ok(event) => return Attempt::Done(Some(event)),
            Err(err) => err,
        };
        let letter = DeadLetter {
            key: message.key().map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            headers: message.headers().cloned(),
            source: format!(
                "{}/{}/{}",
                message.topic(),
                message.partition(),
                message.offset()
            ),
            error: format!("not a logpipe event: {err}"),
        };
        match self.dead_letter(letter).await {
            Attempt::Done(()) => Attempt::Done(None),
            Attempt::Interrupted => Attempt::Interrupted,
        }
    }

    /// Publishes a message to the dead-letter topic, retrying until the broker
    /// acknowledges it or shutdown is signalled.
    async fn dead_letter(&self, letter: DeadLetter) -> Attempt<()> {
        let headers = letter
            .headers
            .unwrap_or_default()
            .insert(Header {
                key: HEADER_ERROR,
                value: Some(letter.error.as_bytes()),
            })
            .insert(Header {
                key: HEADER_SOURCE,
                value: Some(letter.source.as_bytes()),
            });
        let mut logged = false;
        loop {
            let mut record = FutureRecord::to(&self.dead_letter_topic)
                .payload(&letter.payload)
                .headers(headers.clone());
            if let Some(key) = &letter.key {
                record = record.key(key);
            }
            match self.dead_letters.send(record, Duration::from_secs(5)).await {
                Ok(_) => break,
                Err((err, _)) if !logged => {
                    tracing::warn!(consumer = self.index, error = %err, "cannot publish to the dead-letter topic, retrying");
                    logged = true;
                }
                Err(_) => {}
            }
            if self.wait_retry().await {
                return Attempt::Interrupted;
            }
        }
        self.metrics.dead_lettered();
        tracing::error!(
            consumer = self.index,
            source = %letter.source,
            topic = %self.dead_letter_topic,
            error = %letter.error,
            "moved a message that cannot be stored to the dead-letter topic"
        );
        Attempt::Done(())
    }

    /// Writes the batch, retrying while PostgreSQL fails, then stores its offsets. Gives
    /// up without storing anything when shutdown is signalled during the retries.
    async fn flush(&mut self, batch: Batch) -> Result<(), ConsumerError> {
        if batch.is_empty() {
            return Ok(());
        }
        let span = batch.span(self.index);
        let events = Arc::new(batch.events);
        let written = async {
            let written = match self.write_until_stored(Arc::clone(&events)).await? {
                Attempt::Done(Ok(_)) => true,
                Attempt::Done(Err(err)) => self.write_each(&events, &err).await?,
                Attempt::Interrupted => false,
            };
            Ok::<_, ConsumerError>(written)
        }
        .instrument(span)
        .await?;
        if written {
            if let Some(exporter) = &self.events {
                exporter.export(events.iter().zip(batch.traces.iter().map(Option::as_ref)));
            }
            self.store_offsets(&batch.offsets);
        } else {
            tracing::warn!(
                consumer = self.index,
                events = events.len(),
                "shutting down with an unwritten batch; Kafka will deliver it again"
            );
        }
        Ok(())
    }

    /// Writes a batch, retrying transient failures. Returns the error of a batch that
    /// PostgreSQL rejects for its content, which no retry can fix.
    async fn write_until_stored(
        &self,
        events: Arc<Vec<Event>>,
    ) -> Result<Attempt<Result<WriteOutcome, WriteError>>, ConsumerError> {
        let mut failures = 0u32;
        loop {
            match self.write(Arc::clone(&events)).await? {
                Ok(outcome) => {
                    if failures > 0 {
                        tracing::info!(consumer = self.index, "PostgreSQL writes succeed again");
                    }
                    return Ok(Attempt::Done(Ok(outcome)));
                }
                Err(err) if err.is_permanent() => return Ok(Attempt::Done(Err(err))),
                Err(err) => {
                    if failures == 0 {
                        tracing::warn!(consumer = self.index, error = %err, events = events.len(), "cannot write batch to PostgreSQL, retrying");
                    }
                    failures += 1;
                }
            }
            if self.wait_retry().await {
                return Ok(Attempt::Interrupted);
            }
        }
    }

    /// Writes the events of a rejected batch one by one, so that only the events
    /// PostgreSQL rejects go to the dead-letter topic. Returns false when shutdown cut it
    /// short.
    async fn write_each(
        &self,
        events: &[Event],
        batch_error: &WriteError,
    ) -> Result<bool, ConsumerError> {
        tracing::warn!(consumer = self.index, error = %batch_error, events = events.len(), "PostgreSQL rejected a batch; writing its events one by one");
        for event in events {
            let single = Arc::new(vec![event.clone()]);
            let err = match self.write_until_stored(single).await? {
                Attempt::Done(Ok(_)) => continue,
                Attempt::Done(Err(err)) => err,
                Attempt::Interrupted => return Ok(false),
            };
            let letter = DeadLetter {
                key: Some(event.service_name.as_bytes().to_vec()),
                payload: serde_json::to_vec(event).unwrap_or_default(),
                headers: None,
                source: format!("event/{}", event.id),
                error: format!("rejected by PostgreSQL: {err}"),
            };
            if let Attempt::Interrupted = self.dead_letter(letter).await {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Waits `db_writer.retry_delay_ms`; true when shutdown was signalled meanwhile.
    async fn wait_retry(&self) -> bool {
        let mut shutdown = self.shutdown.clone();
        if *shutdown.borrow() {
            return true;
        }
        let delay = Duration::from_millis(self.settings.retry_delay_ms);
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = shutdown.changed() => true,
        }
    }

    /// Sends one batch to `DbWriter`, waiting for room in its mailbox.
    async fn write(
        &self,
        events: Arc<Vec<Event>>,
    ) -> Result<Result<WriteOutcome, WriteError>, ConsumerError> {
        let (reply, answer) = oneshot::channel();
        let _pending = self.metrics.mailbox(ActorName::DbWriter).enter();
        let span = tracing::Span::current();
        self.db_writer
            .send(WriteBatch {
                events,
                span,
                reply,
            })
            .await
            .map_err(|_| ConsumerError::WriterStopped)?;
        answer.await.map_err(|_| ConsumerError::WriterStopped)
    }

    fn store_offsets(&self, offsets: &HashMap<i32, i64>) {
        for (&partition, &offset) in offsets {
            // Fails only when the partition was revoked meanwhile. Its new owner then reads
            // the batch again, which is harmless because the writes are idempotent.
            if let Err(err) = self.consumer.store_offset(&self.topic, partition, offset) {
                tracing::debug!(consumer = self.index, partition, error = %err, "cannot store offset");
            }
        }
    }

    /// Commits the stored offsets synchronously before the consumer closes. With a null
    /// list, librdkafka commits the offsets stored for the current assignment.
    fn commit_stored(&self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(())
            | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(err) => {
                tracing::warn!(consumer = self.index, error = %err, "final offset commit failed")
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

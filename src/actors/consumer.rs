//! One Kafka consumer of the group: reads events, groups them into batches and hands each
//! batch to `DbWriter`. Not an actor itself: `ConsumerSupervisor` runs each consumer as a
//! task in its context and restarts it when it fails.
//!
//! A batch is flushed when it holds `db_writer.batch_size` events or its oldest event has
//! waited `db_writer.flush_interval_ms`. Offsets are stored only after `DbWriter` replied
//! that the batch committed; librdkafka commits stored offsets in the background and when
//! the consumer closes. While PostgreSQL fails, the consumer retries the same batch every
//! `db_writer.retry_delay_ms` and reads nothing new, so the backlog waits in Kafka.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::Message;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::db_writer::{DbWriter, WriteBatch, WriteError, WriteOutcome};
use crate::config::{Config, DbWriterConfig};
use crate::event::Event;
use crate::kafka;

/// Why a consumer stopped on its own; the supervisor starts a new one.
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
    offsets: HashMap<i32, i64>,
    started: Option<Instant>,
}

impl Batch {
    fn push(&mut self, partition: i32, offset: i64, event: Option<Event>) {
        self.started.get_or_insert_with(Instant::now);
        self.offsets.insert(partition, offset);
        self.events.extend(event);
    }

    fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }
}

/// One consumer; see the module documentation.
pub struct ConsumerTask {
    index: usize,
    topic: String,
    consumer: StreamConsumer,
    db_writer: Addr<DbWriter>,
    settings: DbWriterConfig,
    shutdown: watch::Receiver<bool>,
}

impl ConsumerTask {
    /// Creates the consumer and subscribes it to the topic.
    pub fn new(
        index: usize,
        config: &Config,
        db_writer: Addr<DbWriter>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, ConsumerError> {
        let consumer: StreamConsumer = kafka::consumer_config(&config.kafka, &config.consumer)
            .create()
            .map_err(ConsumerError::Create)?;
        consumer.subscribe(&[&config.kafka.topic])?;
        Ok(Self {
            index,
            topic: config.kafka.topic.clone(),
            consumer,
            db_writer,
            settings: config.db_writer.clone(),
            shutdown,
        })
    }

    /// Consumes until shutdown is signalled (`Ok`) or the consumer fails (`Err`).
    pub async fn run(mut self) -> Result<(), ConsumerError> {
        let flush_interval = Duration::from_millis(self.settings.flush_interval_ms);
        let mut batch = Batch::default();
        loop {
            let deadline = batch.started.map(|started| started + flush_interval);
            tokio::select! {
                received = self.consumer.recv() => match received {
                    Ok(message) => {
                        let event = self.decode(&message);
                        batch.push(message.partition(), message.offset(), event);
                    }
                    Err(err) => tracing::warn!(consumer = self.index, error = %err, "kafka consumer error"),
                },
                _ = sleep_until(deadline) => {}
                _ = self.shutdown.changed() => break,
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

    /// Decodes a message; an undecodable one is logged and skipped.
    fn decode(&self, message: &rdkafka::message::BorrowedMessage<'_>) -> Option<Event> {
        let payload = message.payload().unwrap_or_default();
        match serde_json::from_slice(payload) {
            Ok(event) => Some(event),
            Err(err) => {
                // NOTE: an undecodable message is skipped after this log line and its
                // offset is committed with the batch; it is not kept anywhere else.
                tracing::error!(
                    consumer = self.index,
                    partition = message.partition(),
                    offset = message.offset(),
                    error = %err,
                    "skipped a message that is not a logpipe event"
                );
                None
            }
        }
    }

    /// Writes the batch, retrying while PostgreSQL fails, then stores its offsets. Gives
    /// up without storing anything when shutdown is signalled during the retries.
    async fn flush(&mut self, batch: Batch) -> Result<(), ConsumerError> {
        if batch.is_empty() {
            return Ok(());
        }
        let events = Arc::new(batch.events);
        let mut failures = 0u32;
        loop {
            match self.write(Arc::clone(&events)).await? {
                Ok(outcome) => {
                    if failures > 0 {
                        tracing::info!(consumer = self.index, "PostgreSQL writes succeed again");
                    }
                    tracing::debug!(
                        consumer = self.index,
                        inserted = outcome.inserted,
                        duplicates = outcome.duplicates,
                        "wrote batch"
                    );
                    self.store_offsets(&batch.offsets);
                    return Ok(());
                }
                Err(err) => {
                    if failures == 0 {
                        tracing::warn!(consumer = self.index, error = %err, events = events.len(), "cannot write batch to PostgreSQL, retrying");
                    }
                    failures += 1;
                }
            }
            let delay = Duration::from_millis(self.settings.retry_delay_ms);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.changed() => {
                    tracing::warn!(consumer = self.index, events = events.len(), "shutting down with an unwritten batch; Kafka will deliver it again");
                    return Ok(());
                }
            }
        }
    }

    /// Sends one batch to `DbWriter`, waiting for room in its mailbox.
    async fn write(
        &self,
        events: Arc<Vec<Event>>,
    ) -> Result<Result<WriteOutcome, WriteError>, ConsumerError> {
        let (reply, answer) = oneshot::channel();
        self.db_writer
            .send(WriteBatch { events, reply })
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

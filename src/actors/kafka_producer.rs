//! `KafkaProducer`: publishes events to the topic and replies once Kafka has them.
//!
//! Messages: [`Publish`] (a batch of encoded events) and [`Ping`] (can the brokers be
//! reached). Mailbox capacity: `mailbox.kafka_producer`; when it is full the request gets
//! 503.
//!
//! The producer is idempotent with `acks=all`. The reply to `Publish` is `Ok` only after
//! every event of the batch was acknowledged. If any event fails, times out
//! (`producer.delivery_timeout_ms`) or cannot be queued because librdkafka's queue is full,
//! the reply is an error and the client gets 503. Events of a failed batch may still have
//! been written, so a client retry can store an event twice unless the client sets the
//! event `id` itself, in which case the retry is harmless.
//!
//! librdkafka reconnects to the brokers by itself. When the producer hits a fatal error
//! (an idempotent producer that lost its sequence state, for example), the actor stops and
//! its supervisor starts it again with a new producer after a delay that doubles with each
//! failure in a row (`[supervision]`). The restart is logged once and counted.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{Reply, SharedStatus};
use crate::config::{Config, KafkaConfig, ProducerConfig, SupervisionConfig};
use crate::event::Event;
use crate::kafka::{self, CONTENT_TYPE_JSON, HEADER_CONTENT_TYPE, HEADER_EVENT_ID};
use crate::telemetry::metrics::{ActorName, Metrics};

/// One event ready to be published.
pub struct Record {
    /// The message key: the event's service name, so one service's events stay ordered.
    pub key: String,
    pub event_id: String,
    /// The event as JSON.
    pub payload: Vec<u8>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("event_id", &self.event_id)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

/// Builds the headers of one event's message: its id, the content type and the trace
/// context headers.
pub fn headers(record: &Record, trace: &[(String, String)]) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(2 + trace.len())
        .insert(Header {
            key: HEADER_EVENT_ID,
            value: Some(record.event_id.as_bytes()),
        })
        .insert(Header {
            key: HEADER_CONTENT_TYPE,
            value: Some(CONTENT_TYPE_JSON.as_bytes()),
        });
    for (key, value) in trace {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

/// Encodes an event as a Kafka message.
pub fn encode(event: &Event) -> Result<Record, serde_json::Error> {
    Ok(Record {
        key: event.service_name.clone(),
        event_id: event.id.to_string(),
        payload: serde_json::to_vec(event)?,
    })
}

/// Failure to publish a batch.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("producer queue is full")]
    QueueFull,
    #[error("kafka did not acknowledge: {0}")]
    Kafka(#[from] KafkaError),
    #[error("producer was dropped before delivery")]
    Canceled,
    #[error("the brokers do not know the topic {0}")]
    TopicMissing(String),
}

/// Publishes `records` and replies when all are acknowledged.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish {
    pub records: Vec<Record>,
    /// W3C trace context headers (`traceparent`, `tracestate`) added to every message.
    pub trace: Vec<(String, String)>,
    pub reply: Reply<Result<(), PublishError>>,
}

/// Checks that the brokers respond to a metadata request for the topic.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ping {
    pub reply: Reply<Result<(), PublishError>>,
}

/// Waits up to `timeout` for every queued event to be acknowledged; used at shutdown.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Flush {
    pub timeout: Duration,
    pub reply: Reply<()>,
}

/// Sent by a failed delivery: checks whether the producer hit a fatal error, or an error
/// the broker gave because it no longer accepts this producer's id or epoch.
#[derive(Message)]
#[rtype(result = "()")]
struct CheckFatal(Option<RDKafkaErrorCode>);

/// Delivery errors after which the producer's idempotence state is unusable, though
/// librdkafka does not always raise them as fatal.
fn needs_new_producer(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::InvalidProducerIdMapping
            | RDKafkaErrorCode::UnknownProducerId
            | RDKafkaErrorCode::OutOfOrderSequenceNumber
    )
}

/// Returns the `reason` of a failed delivery in the failures metric.
fn failure_reason(code: Option<RDKafkaErrorCode>) -> &'static str {
    match code {
        Some(RDKafkaErrorCode::MessageTimedOut) => "timeout",
        Some(code) if needs_new_producer(code) => "producer_fenced",
        Some(_) => "broker",
        None => "canceled",
    }
}

/// The actor; see the module documentation.
pub struct KafkaProducer {
    kafka: KafkaConfig,
    settings: ProducerConfig,
    supervision: SupervisionConfig,
    producer: FutureProducer,
    mailbox_capacity: usize,
    failures_in_row: u32,
    status: SharedStatus,
    metrics: Metrics,
}

impl KafkaProducer {
    /// Creates the producer. Connecting happens in the background, so this succeeds while
    /// the brokers are down.
    pub fn new(config: &Config, metrics: Metrics) -> Result<Self, KafkaError> {
        let producer: FutureProducer =
            kafka::producer_config(&config.kafka, &config.producer).create()?;
        // Learns the topic's partitions now, so the first requests do not spend part of
        // their deadline on the metadata lookup. A broker that is down only delays this.
        if let Err(err) = producer
            .client()
            .fetch_metadata(Some(&config.kafka.topic), Duration::from_secs(5))
        {
            tracing::warn!(error = %err, "cannot read the topic's metadata at start");
        }
        Ok(Self {
            kafka: config.kafka.clone(),
            settings: config.producer.clone(),
            supervision: config.supervision.clone(),
            producer,
            mailbox_capacity: config.mailbox.kafka_producer,
            failures_in_row: 0,
            status: SharedStatus::default(),
            metrics,
        })
    }

    /// Returns the actor's status for `/readyz`.
    pub fn status(&self) -> SharedStatus {
        self.status.clone()
    }

    /// Queues every record; stops at the first that cannot be queued.
    fn enqueue(
        &self,
        records: &[Record],
        trace: &[(String, String)],
    ) -> Result<Vec<rdkafka::producer::DeliveryFuture>, PublishError> {
        let mut deliveries = Vec::with_capacity(records.len());
        for record in records {
            let message = FutureRecord::to(&self.kafka.topic)
                .key(record.key.as_bytes())
                .payload(&record.payload)
                .headers(headers(record, trace));
            match self.producer.send_result(message) {
                Ok(delivery) => deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    return Err(PublishError::QueueFull)
                }
                Err((err, _)) => return Err(PublishError::Kafka(err)),
            }
        }
        Ok(deliveries)
    }
}

impl Actor for KafkaProducer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
        if self.failures_in_row > 0 {
            // Requests find the mailbox closed for the delay and get 503 meanwhile.
            let delay = self.supervision.restart_delay(self.failures_in_row);
            ctx.wait(tokio::time::sleep(delay).into_actor(self));
        }
        self.status.set("running", None);
    }
}

impl Supervised for KafkaProducer {
    /// Replaces the producer, whose fatal error makes it unusable, with a new one.
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.failures_in_row += 1;
        match kafka::producer_config(&self.kafka, &self.settings).create() {
            Ok(producer) => self.producer = producer,
            Err(err) => tracing::error!(error = %err, "cannot create a new Kafka producer"),
        }
    }
}

impl Handler<CheckFatal> for KafkaProducer {
    type Result = ();

    fn handle(&mut self, msg: CheckFatal, ctx: &mut Context<Self>) {
        let fatal = self.producer.client().fatal_error().or_else(|| {
            msg.0.filter(|code| needs_new_producer(*code)).map(|code| {
                (
                    code,
                    "the broker rejected the producer's id or epoch".into(),
                )
            })
        });
        let Some((code, reason)) = fatal else {
            return;
        };
        let restarts = self.status.count_restart();
        self.metrics.actor_restarted(ActorName::KafkaProducer);
        self.status.set("restarting", Some("kafka_fatal"));
        tracing::error!(%code, %reason, restarts, "Kafka producer hit a fatal error; restarting it");
        ctx.stop();
    }
}

impl Handler<Publish> for KafkaProducer {
    type Result = ();

    fn handle(&mut self, msg: Publish, ctx: &mut Context<Self>) {
        let started = Instant::now();
        let deliveries = match self.enqueue(&msg.records, &msg.trace) {
            Ok(deliveries) => deliveries,
            Err(err) => {
                let reason = match err {
                    PublishError::QueueFull => "queue_full",
                    _ => "rejected",
                };
                self.metrics
                    .publish_failed(reason, msg.records.len() as u64);
                let _ = msg.reply.send(Err(err));
                ctx.notify(CheckFatal(None));
                return;
            }
        };
        let addr = ctx.address();
        let metrics = self.metrics.clone();
        let queued = deliveries.len() as i64;
        metrics
            .publish_in_flight()
            .fetch_add(queued, Ordering::Relaxed);
        actix::spawn(async move {
            let mut result = Ok(());
            let mut code = None;
            let mut failed = 0u64;
            for delivery in join_all(deliveries).await {
                match delivery {
                    Ok(Ok(_)) => {}
                    Ok(Err((err, _))) => {
                        code = err.rdkafka_error_code().or(code);
                        result = Err(PublishError::Kafka(err));
                        failed += 1;
                    }
                    Err(_) => {
                        result = Err(PublishError::Canceled);
                        failed += 1;
                    }
                }
            }
            metrics
                .publish_in_flight()
                .fetch_sub(queued, Ordering::Relaxed);
            let failure = (failed > 0).then(|| (failure_reason(code), failed));
            metrics.publish_finished(started.elapsed(), failure);
            if result.is_err() {
                addr.do_send(CheckFatal(code));
            }
            let _ = msg.reply.send(result);
        });
    }
}

impl Handler<Flush> for KafkaProducer {
    type Result = ();

    fn handle(&mut self, msg: Flush, _ctx: &mut Context<Self>) {
        // Blocks this actor's thread, which is what shutdown wants: nothing else is sent.
        match self.producer.flush(msg.timeout) {
            Ok(()) => tracing::info!("producer flushed"),
            Err(err) => tracing::error!(
                error = %err,
                queued = self.producer.in_flight_count(),
                "events still unacknowledged at shutdown"
            ),
        }
        let _ = msg.reply.send(());
    }
}

impl Handler<Ping> for KafkaProducer {
    type Result = ();

    fn handle(&mut self, msg: Ping, _ctx: &mut Context<Self>) {
        let producer = self.producer.clone();
        let topic = self.kafka.topic.clone();
        actix::spawn(async move {
            let lookup = tokio::task::spawn_blocking(move || {
                let metadata = producer
                    .client()
                    .fetch_metadata(Some(&topic), Duration::from_secs(2))
                    .map_err(PublishError::Kafka)?;
                // A deleted topic comes back as an entry with an error or no partitions.
                let known = metadata.topics().iter().any(|entry| {
                    entry.name() == topic
                        && entry.error().is_none()
                        && !entry.partitions().is_empty()
                });
                if known {
                    Ok(())
                } else {
                    Err(PublishError::TopicMissing(topic))
                }
            });
            let result = match lookup.await {
                Ok(result) => result,
                Err(_) => Err(PublishError::Canceled),
            };
            let _ = msg.reply.send(result);
        });
    }
}

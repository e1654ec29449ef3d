//! Kafka client settings shared by the producer, the consumers and topic creation.
//!
//! Only standard Kafka protocol features are used (idempotent producer, consumer groups,
//! admin `CreateTopics`), so any Kafka-compatible broker works.

use std::time::Duration;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::config::{ConsumerConfig, KafkaConfig, ProducerConfig};

/// Header carrying the event id of a message.
pub const HEADER_EVENT_ID: &str = "logpipe-event-id";
/// Header carrying the content type of a message's value.
pub const HEADER_CONTENT_TYPE: &str = "content-type";
/// The content type of every message value: one event as JSON.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Settings common to every client.
pub fn base_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", &kafka.client_id)
        .set("log_level", "4");
    config
}

/// Producer settings: idempotent and acknowledged by all in-sync replicas, so an
/// acknowledged event is durable and a retry inside librdkafka never duplicates it.
pub fn producer_config(kafka: &KafkaConfig, producer: &ProducerConfig) -> ClientConfig {
    let mut config = base_config(kafka);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("linger.ms", producer.linger_ms.to_string())
        .set(
            "delivery.timeout.ms",
            producer.delivery_timeout_ms.to_string(),
        )
        .set(
            "queue.buffering.max.messages",
            producer.queue_max_messages.to_string(),
        )
        .set("compression.type", &producer.compression)
        .set(
            "queue.buffering.max.kbytes",
            producer.queue_max_kbytes.to_string(),
        )
        .set("message.max.bytes", producer.max_message_bytes.to_string());
    config
}

/// Consumer settings. Offsets are stored by logpipe only after the events are written to
/// PostgreSQL (`enable.auto.offset.store=false`), and librdkafka commits the stored offsets
/// in the background and on close.
pub fn consumer_config(kafka: &KafkaConfig, consumer: &ConsumerConfig) -> ClientConfig {
    let mut config = base_config(kafka);
    config
        .set("group.id", &consumer.group_id)
        .set(
            "statistics.interval.ms",
            consumer.lag_sample_interval_ms.to_string(),
        )
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            consumer.session_timeout_ms.to_string(),
        )
        .set("enable.partition.eof", "false")
        // Bounds what librdkafka prefetches per partition, so a backlog waits in Kafka
        // rather than in memory (librdkafka's default is 64 MiB).
        .set("queued.max.messages.kbytes", "16384");
    config
}

/// Creates the event topic and the dead-letter topic unless they exist.
pub async fn ensure_topic(kafka: &KafkaConfig) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = base_config(kafka)
        .create()
        .context("cannot create the Kafka admin client")?;
    let replication = || TopicReplication::Fixed(kafka.replication_factor);
    let topics = [
        NewTopic::new(&kafka.topic, kafka.partitions, replication()),
        NewTopic::new(&kafka.dead_letter_topic, kafka.partitions, replication()),
    ];
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&topics, &options)
        .await
        .with_context(|| format!("cannot create topic {}", kafka.topic))?;
    for result in results {
        match result {
            Ok(name) => {
                tracing::info!(topic = %name, partitions = kafka.partitions, "created topic")
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("cannot create topic {name}: {code}"),
        }
    }
    Ok(())
}

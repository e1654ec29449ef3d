//! The Kafka ceiling: a bare rdkafka `FutureProducer` with logpipe's client settings
//! (`logpipe::kafka::producer_config`), sending the same records with the same headers as
//! `KafkaProducer` but without the actor.

use futures::future::join_all;
use logpipe::actors::kafka_producer::{self, Record};
use logpipe::config::Config;
use logpipe::kafka;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Gives `config` a topic and dead-letter topic of its own, and creates them.
pub async fn use_own_topic(config: &mut Config, name: &str) {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    config.kafka.topic = format!("logpipe.bench.{name}.{suffix}");
    config.kafka.dead_letter_topic = format!("logpipe.bench.{name}.{suffix}.dlq");
    kafka::ensure_topic(&config.kafka)
        .await
        .expect("bench topic created");
}

/// Creates a producer with exactly the settings `KafkaProducer` uses.
pub fn bare_producer(config: &Config) -> FutureProducer {
    kafka::producer_config(&config.kafka, &config.producer)
        .create()
        .expect("Kafka producer created")
}

/// Queues every record on `topic` and waits until the broker acknowledged all of them.
pub async fn send_all(
    producer: &FutureProducer,
    topic: &str,
    records: &[Record],
) -> Result<(), String> {
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        let message = FutureRecord::to(topic)
            .key(record.key.as_bytes())
            .payload(&record.payload)
            .headers(kafka_producer::headers(record, &[]));
        let delivery = producer
            .send_result(message)
            .map_err(|(err, _)| format!("cannot queue a record: {err}"))?;
        deliveries.push(delivery);
    }
    for delivery in join_all(deliveries).await {
        match delivery {
            Ok(Ok(_)) => {}
            Ok(Err((err, _))) => return Err(format!("delivery failed: {err}")),
            Err(_) => return Err("producer dropped before delivery".into()),
        }
    }
    Ok(())
}

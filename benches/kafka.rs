//! Publishing to the real broker: the `KafkaProducer` actor publishing batches of 1 and
//! 500 sample events, next to the ceiling of a bare rdkafka producer with the same client
//! settings sending the same records. Each iteration waits until the broker acknowledged
//! the whole batch, so a batch of 1 measures mostly `producer.linger_ms` and the round trip.
//!
//! Needs the broker at `LOGPIPE_KAFKA_BROKERS` (default `127.0.0.1:9092`). Without it the
//! bench prints why and measures nothing. Each run creates a topic of its own.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use logpipe::actors::call;
use logpipe::actors::kafka_producer::{self, KafkaProducer, Publish, Record};

mod support;

use support::kafka::{bare_producer, send_all, use_own_topic};
use support::{kafka_service, load_config, sample_events, services_reachable, ActorThread};

/// How long one batch may take before the bench fails.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(30);

fn encode_all(events: &[logpipe::event::Event]) -> Vec<Record> {
    events
        .iter()
        .map(kafka_producer::encode)
        .collect::<Result<_, _>>()
        .expect("events encode")
}

async fn publish(producer: &actix::Addr<KafkaProducer>, records: Vec<Record>) {
    call(
        producer,
        |reply| Publish {
            records,
            trace: Vec::new(),
            reply,
        },
        PUBLISH_DEADLINE,
    )
    .await
    .expect("KafkaProducer replied")
    .expect("batch acknowledged");
}

fn publish_batches(c: &mut Criterion) {
    let mut config = load_config();
    if !services_reachable("kafka bench", &[kafka_service(&config)]) {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(use_own_topic(&mut config, "publish"));
    let bare = bare_producer(&config);
    let actor_config = config.clone();
    let actor = ActorThread::start(move || {
        KafkaProducer::new(&actor_config, logpipe::telemetry::Metrics::discarded())
            .expect("KafkaProducer created")
    });

    let mut group = c.benchmark_group("kafka_publish");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for size in [1, 500] {
        let events = sample_events(size);
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(format!("kafka_producer_{size}_events"), |b| {
            b.to_async(&runtime).iter_batched(
                || encode_all(&events),
                |records| publish(&actor.addr, records),
                BatchSize::SmallInput,
            )
        });
        group.bench_function(format!("bare_rdkafka_{size}_events"), |b| {
            b.to_async(&runtime).iter_batched(
                || encode_all(&events),
                |records| {
                    let (bare, topic) = (&bare, &config.kafka.topic);
                    async move { send_all(bare, topic, &records).await.expect("sent") }
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, publish_batches);
criterion_main!(benches);

//! Hot paths of the ingest request on real logs: parsing and validating a body, and
//! encoding the events for Kafka. Needs no running service.

use std::hint::black_box;
use std::path::Path;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use logpipe::actors::kafka_producer;
use logpipe::event::{parse_events, Owner};

const OWNER: Owner = Owner {
    user_id: 1,
    api_key_id: 1,
};

/// Builds a JSON array body of the first `count` events of the HDFS sample.
fn body_of(count: usize) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loghub/hdfs.ndjson");
    let text = std::fs::read_to_string(path).expect("sample file");
    let events: Vec<&str> = text.lines().take(count).collect();
    format!("[{}]", events.join(",")).into_bytes()
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_events");
    for count in [1, 500] {
        let body = body_of(count);
        group.throughput(Throughput::Elements(count as u64));
        group.bench_function(format!("{count}_events"), |b| {
            b.iter(|| parse_events(black_box(&body), OWNER, Utc::now()).expect("valid body"))
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let events = parse_events(&body_of(500), OWNER, Utc::now()).expect("valid body");
    let mut group = c.benchmark_group("encode_for_kafka");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("500_events", |b| {
        b.iter_batched(
            || events.clone(),
            |events| {
                events
                    .iter()
                    .map(kafka_producer::encode)
                    .collect::<Result<Vec<_>, _>>()
                    .expect("encodes")
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, parse, encode);
criterion_main!(benches);

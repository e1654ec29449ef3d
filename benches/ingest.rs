//! CPU-only hot paths of an event's way through logpipe, on the real logs of
//! `tests/fixtures/loghub/` (the five systems mixed): parsing and validating a request body,
//! encoding the events for Kafka, and turning consumed Kafka messages into a PostgreSQL
//! batch. Needs no running service.

use std::hint::black_box;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use logpipe::actors::db_writer::Columns;
use logpipe::actors::kafka_producer;
use logpipe::event::{parse_events, Event};

mod support;

use support::{request_body, sample_events, sample_lines, BENCH_OWNER};

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_events");
    for count in [1, 500] {
        let body = request_body(&sample_lines(count));
        group.throughput(Throughput::Elements(count as u64));
        group.bench_function(format!("{count}_events"), |b| {
            b.iter(|| parse_events(black_box(&body), BENCH_OWNER, Utc::now()).expect("valid body"))
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let events = sample_events(500);
    let mut group = c.benchmark_group("encode_for_kafka");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("500_events", |b| {
        b.iter(|| {
            black_box(&events)
                .iter()
                .map(kafka_producer::encode)
                .collect::<Result<Vec<_>, _>>()
                .expect("encodes")
        })
    });
    group.finish();
}

/// Measures what a consumer does with 1,000 messages before `DbWriter` sends them: decode
/// each payload into an event, then lay the batch out as one array per column.
fn build_postgres_batch(c: &mut Criterion) {
    let payloads: Vec<Vec<u8>> = sample_events(1000)
        .iter()
        .map(|event| serde_json::to_vec(event).expect("encodes"))
        .collect();
    let mut group = c.benchmark_group("build_postgres_batch");
    group.throughput(Throughput::Elements(payloads.len() as u64));
    group.bench_function("decode_1000_messages", |b| {
        b.iter(|| {
            black_box(&payloads)
                .iter()
                .map(|payload| serde_json::from_slice::<Event>(payload).expect("decodes"))
                .collect::<Vec<_>>()
        })
    });
    let events = sample_events(1000);
    group.bench_function("columns_of_1000_events", |b| {
        b.iter(|| Columns::from_events(black_box(&events)))
    });
    group.finish();
}

criterion_group!(benches, parse, encode, build_postgres_batch);
criterion_main!(benches);

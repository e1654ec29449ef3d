//! Batches into the real PostgreSQL: `DbWriter` writing 1, 100 and 1,000 sample events into
//! `logs`, next to the ceiling for the same rows, binary COPY into an UNLOGGED scratch table
//! without indexes or constraints beyond NOT NULL.
//!
//! Needs PostgreSQL at `LOGPIPE_POSTGRES_URL` (the default is in `config/logpipe.toml`).
//! Without it the bench prints why and measures nothing. The rows it writes into `logs`
//! belong to a negative user id that no account has, and the bench deletes them and drops
//! the scratch table when it ends.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use logpipe::actors::call;
use logpipe::actors::db_writer::{DbWriter, WriteBatch};
use logpipe::db;
use logpipe::event::Event;

mod support;

use support::copy::ScratchTable;
use support::{
    load_config, postgres_service, renew_ids, sample_events, services_reachable, ActorThread,
    BENCH_OWNER,
};

/// Mailbox capacity of the bench's `DbWriter`, the default of `mailbox.db_writer`.
const MAILBOX_CAPACITY: usize = 64;

/// How long one batch may take before the bench fails.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);

/// Returns a copy of `events` with new ids, so that each write inserts new rows.
fn fresh(events: &[Event]) -> Vec<Event> {
    let mut events = events.to_vec();
    renew_ids(&mut events);
    events
}

async fn write(writer: &actix::Addr<DbWriter>, events: Vec<Event>) {
    let build = |reply| WriteBatch {
        events: Arc::new(events),
        span: tracing::Span::none(),
        reply,
    };
    let outcome = call(writer, build, WRITE_DEADLINE)
        .await
        .expect("DbWriter replied")
        .expect("batch written");
    assert_eq!(outcome.duplicates, 0, "a fresh batch had stored ids");
}

async fn delete_bench_rows(client: &tokio_postgres::Client) {
    client
        .execute(
            "DELETE FROM logs WHERE user_id = $1",
            &[&BENCH_OWNER.user_id],
        )
        .await
        .expect("delete the bench rows");
}

fn write_batches(c: &mut Criterion) {
    let config = load_config();
    if !services_reachable("postgres bench", &[postgres_service(&config)]) {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let pool = db::pool(&config.postgres).expect("PostgreSQL pool");
    runtime
        .block_on(db::migrate(&pool))
        .expect("migrations applied");
    let scratch = runtime.block_on(ScratchTable::create(&config.postgres.url));
    runtime.block_on(delete_bench_rows(scratch.client()));
    let writer = ActorThread::start(move || {
        DbWriter::new(
            pool,
            MAILBOX_CAPACITY,
            logpipe::telemetry::Metrics::discarded(),
        )
    });
    let table = &scratch;

    let mut group = c.benchmark_group("postgres_write");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for size in [1, 100, 1000] {
        let events = sample_events(size);
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(format!("db_writer_{size}_events"), |b| {
            b.to_async(&runtime).iter_batched(
                || fresh(&events),
                |batch| write(&writer.addr, batch),
                BatchSize::SmallInput,
            )
        });
        group.bench_function(format!("binary_copy_unlogged_{size}_events"), |b| {
            b.to_async(&runtime).iter_batched(
                || fresh(&events),
                |batch| async move { table.copy(&batch).await.expect("COPY succeeded") },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    drop(writer);
    runtime.block_on(delete_bench_rows(scratch.client()));
    runtime.block_on(scratch.drop_table());
}

criterion_group!(benches, write_batches);
criterion_main!(benches);

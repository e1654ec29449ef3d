//! The limits of the components logpipe depends on, measured on this machine with the same
//! data: an empty actix-web handler, a bare rdkafka producer, binary COPY into PostgreSQL,
//! logpipe's own INSERT statement, and rate-limit decisions in Redis.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpResponse, HttpServer};
use futures::future::join_all;
use logpipe::actors::call;
use logpipe::actors::db_writer::write_batch;
use logpipe::actors::kafka_producer::Record;
use logpipe::actors::rate_limiter::{Check, Limit, Ping, RateLimiter};
use logpipe::config::Config;
use logpipe::event::Event;

use super::copy::ScratchTable;
use super::kafka::{bare_producer, send_all, use_own_topic};
use super::{renew_ids, ActorThread};

/// Largest body the empty handler reads, in bytes: logpipe's default `http.body_limit_bytes`.
const EMPTY_HANDLER_BODY_LIMIT: usize = 5 * 1024 * 1024;

/// A limit no subject reaches: one request a microsecond after a burst of a billion.
const UNREACHED_LIMIT: Limit = Limit {
    per_minute: 60_000_000,
    burst: 1_000_000_000,
};

/// How long one call may wait before the ceiling run fails.
const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// An actix-web server on a free loopback port whose `POST /api/logs/` reads the body and
/// responds 202 with no body, in a thread of its own.
pub struct EmptyServer {
    pub addr: std::net::SocketAddr,
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
}

async fn accept_and_drop(_body: web::Bytes) -> HttpResponse {
    HttpResponse::Accepted().finish()
}

impl EmptyServer {
    /// Starts the server with `workers` worker threads, as logpipe's `http.workers`.
    pub fn start(workers: usize) -> EmptyServer {
        let (sender, receiver) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(|| {
                    App::new()
                        .app_data(web::PayloadConfig::new(EMPTY_HANDLER_BODY_LIMIT))
                        .route("/api/logs/", web::post().to(accept_and_drop))
                })
                .workers(workers)
                .disable_signals()
                .bind(("127.0.0.1", 0))
                .expect("bind a loopback port");
                let addr = server.addrs()[0];
                let server = server.run();
                let _ = sender.send((addr, server.handle()));
                let _ = server.await;
            });
        });
        let (addr, handle) = receiver.recv().expect("empty server started");
        EmptyServer {
            addr,
            handle,
            thread: Some(thread),
        }
    }

    pub async fn stop(mut self) {
        self.handle.stop(false).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Runs `concurrency` copies of `task` until `duration` passed; each returns the items it
/// handled per call. Returns the items per second over the whole run.
async fn rate<F, Fut>(concurrency: usize, duration: Duration, task: F) -> f64
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let started = Instant::now();
    let deadline = started + duration;
    let done = AtomicU64::new(0);
    let loops = (0..concurrency).map(|index| {
        let (task, done) = (&task, &done);
        async move {
            while Instant::now() < deadline {
                done.fetch_add(task(index).await, Ordering::Relaxed);
            }
        }
    });
    join_all(loops).await;
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// Events per second a bare producer with logpipe's settings gets acknowledged, with
/// `concurrency` batches of `records` in flight. Uses a topic of its own.
pub async fn producer_rate(
    config: &Config,
    records: &[Record],
    concurrency: usize,
    duration: Duration,
) -> f64 {
    let mut config = config.clone();
    use_own_topic(&mut config, "ceiling").await;
    let producer = bare_producer(&config);
    let topic = config.kafka.topic.clone();
    rate(concurrency, duration, |_| async {
        send_all(&producer, &topic, records)
            .await
            .expect("bare producer delivered");
        records.len() as u64
    })
    .await
}

/// Rows per second binary COPY writes into UNLOGGED scratch tables without indexes, one
/// connection per stream, in batches of `events`.
pub async fn copy_rate(url: &str, events: &[Event], streams: usize, duration: Duration) -> f64 {
    let mut tables = Vec::with_capacity(streams);
    for _ in 0..streams {
        tables.push(ScratchTable::create(url).await);
    }
    let rows = rate(streams, duration, |index| {
        let table = &tables[index];
        async move { table.copy(events).await.expect("COPY succeeded") }
    })
    .await;
    for table in &tables {
        table.drop_table().await;
    }
    rows
}

/// Rows per second logpipe's INSERT statement (`DbWriter`'s `write_batch`) writes into
/// `logs` with `streams` batches in flight. The events must belong to the bench owner,
/// whose rows the caller deletes.
pub async fn insert_rate(
    pool: &deadpool_postgres::Pool,
    events: &[Event],
    streams: usize,
    duration: Duration,
) -> f64 {
    rate(streams, duration, |_| async {
        let mut batch = events.to_vec();
        renew_ids(&mut batch);
        let outcome = write_batch(pool, &batch).await.expect("batch written");
        outcome.inserted
    })
    .await
}

/// Decisions per second of a `RateLimiter` with logpipe's Redis and rate-limit settings,
/// with `concurrency` checks in flight on one subject, as requests with one API key make.
/// Returns `None` when Redis does not respond, since local decisions would not measure it.
pub async fn redis_decision_rate(
    config: &Config,
    concurrency: usize,
    duration: Duration,
) -> Option<f64> {
    let (redis, limits) = (config.redis.clone(), config.rate_limit.clone());
    let mailbox = 4 * concurrency.max(1);
    let limiter = ActorThread::start(move || {
        RateLimiter::new(
            redis,
            limits,
            mailbox,
            logpipe::telemetry::Metrics::discarded(),
        )
    });
    if !wait_for_redis(&limiter.addr).await {
        return None;
    }
    let subject = format!("bench:ceiling:{}", uuid::Uuid::new_v4().simple());
    let degraded = Arc::new(AtomicU64::new(0));
    let decisions = rate(concurrency, duration, |_| async {
        let build = |reply| Check {
            subject: subject.clone(),
            limit: UNREACHED_LIMIT,
            consume: true,
            reply,
        };
        let decision = call(&limiter.addr, build, CALL_DEADLINE)
            .await
            .expect("RateLimiter replied")
            .expect("RateLimiter decided");
        if decision.degraded {
            degraded.fetch_add(1, Ordering::Relaxed);
        }
        1
    })
    .await;
    (degraded.load(Ordering::Relaxed) == 0).then_some(decisions)
}

/// Polls the limiter until it reached Redis. Returns false after 5 s.
async fn wait_for_redis(limiter: &actix::Addr<RateLimiter>) -> bool {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let ping = call(limiter, |reply| Ping { reply }, CALL_DEADLINE).await;
        if matches!(ping, Ok(Ok(()))) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

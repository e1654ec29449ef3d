//! Rate-limit decisions per second through the `RateLimiter` actor on a real Redis: checks
//! coalesced into pipelines (`rate_limit.max_batch = 128`) against one Redis call per check
//! (`max_batch = 1`). Each iteration sends 1,000 checks at once, for distinct subjects and
//! under a limit none of them reaches, so every check is allowed and writes its state.
//!
//! Needs Redis at `LOGPIPE_REDIS_URL` (default `redis://127.0.0.1:6379`). Without it the
//! bench prints why and measures nothing.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, System};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::future::join_all;
use logpipe::actors::call;
use logpipe::actors::rate_limiter::{Check, Limit, Ping, RateLimiter};
use logpipe::config::Config;
use logpipe::telemetry::Metrics;
use uuid::Uuid;

/// Checks in flight at once in each iteration.
const CONCURRENT_CHECKS: usize = 1000;

/// Mailbox capacity of the actor, larger than `CONCURRENT_CHECKS` so that no check is
/// rejected.
const MAILBOX_CAPACITY: usize = 4 * CONCURRENT_CHECKS;

/// A limit no subject reaches in the bench: one request a microsecond after a burst of a
/// billion.
const UNREACHED_LIMIT: Limit = Limit {
    per_minute: 60_000_000,
    burst: 1_000_000_000,
};

/// How long one check may wait for its decision.
const CHECK_DEADLINE: Duration = Duration::from_secs(5);

/// A `RateLimiter` on an actix system in a thread of its own.
struct RunningLimiter {
    addr: Addr<RateLimiter>,
    system: System,
    thread: Option<JoinHandle<()>>,
}

impl RunningLimiter {
    fn start(config: &Config, max_batch: usize) -> RunningLimiter {
        let redis = config.redis.clone();
        let mut limits = config.rate_limit.clone();
        limits.max_batch = max_batch;
        let (sender, receiver) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runner = System::new();
            let addr = runner.block_on(async move {
                RateLimiter::new(redis, limits, MAILBOX_CAPACITY, Metrics::discarded()).start()
            });
            let _ = sender.send((addr, System::current()));
            let _ = runner.run();
        });
        let (addr, system) = receiver.recv().expect("actix system started");
        RunningLimiter {
            addr,
            system,
            thread: Some(thread),
        }
    }

    /// Polls the actor until it reaches Redis. Returns false after 5 s.
    async fn wait_for_redis(&self) -> bool {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            let ping = call(&self.addr, |reply| Ping { reply }, CHECK_DEADLINE).await;
            if matches!(ping, Ok(Ok(()))) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

impl Drop for RunningLimiter {
    fn drop(&mut self) {
        self.system.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Returns whether Redis at `url` responds to PING within a second.
async fn redis_reachable(url: &str) -> bool {
    let ping = async {
        let client = redis::Client::open(url).ok()?;
        let mut connection = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ping).await,
        Ok(Some(_))
    )
}

/// Sends one check per subject at once and waits for every decision. Panics when a check
/// is denied or decided without Redis, since the numbers would then not measure Redis.
async fn check_all(limiter: &Addr<RateLimiter>, subjects: &[String]) {
    let checks = subjects.iter().map(|subject| {
        let build = |reply| Check {
            subject: subject.clone(),
            limit: UNREACHED_LIMIT,
            consume: true,
            reply,
        };
        call(limiter, build, CHECK_DEADLINE)
    });
    for result in join_all(checks).await {
        let decision = result
            .expect("RateLimiter replied")
            .expect("RateLimiter decided");
        assert!(decision.allowed, "check denied: {decision:?}");
        assert!(!decision.degraded, "decided without Redis: {decision:?}");
    }
}

fn checks_per_second(c: &mut Criterion) {
    let config = Config::load(None, std::env::vars()).expect("configuration");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let url = config.redis.url.clone();
    if !runtime.block_on(redis_reachable(&url)) {
        println!("rate_limit bench skipped: Redis not reachable at {url}");
        return;
    }

    let run = Uuid::new_v4().simple().to_string();
    let subjects: Vec<String> = (0..CONCURRENT_CHECKS)
        .map(|index| format!("bench:{run}:{index}"))
        .collect();
    let mut group = c.benchmark_group("rate_limiter");
    group.throughput(Throughput::Elements(CONCURRENT_CHECKS as u64));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(10));
    for max_batch in [128, 1] {
        let limiter = RunningLimiter::start(&config, max_batch);
        assert!(
            runtime.block_on(limiter.wait_for_redis()),
            "RateLimiter did not reach Redis at {url} within 5 s"
        );
        group.bench_function(format!("max_batch_{max_batch}"), |b| {
            b.to_async(&runtime)
                .iter(|| check_all(&limiter.addr, &subjects))
        });
    }
    group.finish();
}

criterion_group!(benches, checks_per_second);
criterion_main!(benches);

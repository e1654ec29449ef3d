//! Redis is killed and started again under load: with `rate_limit.on_store_error = "local"`
//! requests keep getting 202 while it is down, and every event that got a 2xx must reach
//! PostgreSQL exactly once.
//!
//! The test runs a `redis-server` of its own (on `PATH`), without persistence, so that
//! killing it disturbs no other test.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::load::{assert_exactly_once, check_stored, Load, LoadOptions};
use common::process::free_port;
use common::server::ServerProcess;
use common::*;
use logpipe::app::Role;
use logpipe::config::StoreErrorPolicy;

/// Prepares a `redis-server` on `port` that keeps nothing on disk.
fn redis_server(port: u16) -> ServerProcess {
    let args = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .map(String::from);
    ServerProcess::new("redis-server", &args, port)
}

/// Returns the responses per status in `after` that were not yet in `before`.
fn statuses_since(before: &HashMap<u16, u64>, after: &HashMap<u16, u64>) -> HashMap<u16, u64> {
    after
        .iter()
        .map(|(status, count)| {
            let earlier = before.get(status).copied().unwrap_or_default();
            (*status, count - earlier)
        })
        .filter(|(_, count)| *count > 0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_loses_nothing() {
    let started = Instant::now();
    let mut redis = redis_server(free_port());
    redis.start().await;

    let mut config = test_config();
    config.redis.url = format!("redis://127.0.0.1:{}", redis.port());
    config.rate_limit.requests_per_minute = 1_000_000;
    config.rate_limit.on_store_error = StoreErrorPolicy::Local;
    let app = TestApp::start_with(config, Role::All).await;
    let (username, _, key) = app.user_with_key("redis").await;

    let load = Load::start(LoadOptions::new(vec![app.base.clone()], &key));
    assert!(
        load.wait_for_more(20, Duration::from_secs(15)).await,
        "only {} events acknowledged in 15 s before the fault",
        load.acknowledged()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    redis.kill();
    let before_outage = load.statuses();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outage = statuses_since(&before_outage, &load.statuses());
    redis.start().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = load.stop().await;
    println!("responses while Redis was down: {outage:?}");

    let server_errors: u64 = outage
        .iter()
        .filter(|(status, _)| (500..600).contains(*status))
        .map(|(_, count)| count)
        .sum();
    assert_eq!(
        server_errors, 0,
        "{server_errors} responses were 5xx while Redis was down: {outage:?}"
    );
    let accepted = outage.get(&202).copied().unwrap_or_default();
    assert!(
        accepted > 0,
        "no request got 202 while Redis was down: {outage:?}"
    );

    let db = app.db().await;
    let user = user_id(&db, &username).await;
    let report = check_stored(&db, user, &stats, "redis_restart", Duration::from_secs(60)).await;
    println!("redis test took {:?}", started.elapsed());
    assert_exactly_once(&report);
    app.stop().await;
}

//! logpipe processes killed or stopped under load: every event that got a 2xx must reach
//! PostgreSQL exactly once.
//!
//! The process under fault is the `logpipe` binary, run as a child with the test's
//! configuration in `LOGPIPE_*` variables. The rest of the pipeline runs in the test.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::load::{
    assert_exactly_once, check_stored, count_sent_missing, Load, LoadOptions, LoadStats,
};
use common::process::{user_with_key_at, ChildApp};
use common::*;
use logpipe::app::Role;
use logpipe::config::Config;

/// Time a child may take to exit after SIGTERM beyond `http.shutdown_timeout_secs`.
const EXIT_MARGIN: Duration = Duration::from_secs(5);

/// Load clients run at once against an API that gets SIGTERM, so that requests are in
/// flight when the signal arrives.
const LOAD_CLIENTS: usize = 4;

/// Builds the test configuration with room for the load and a short shutdown timeout.
fn fault_config() -> Config {
    let mut config = test_config();
    config.rate_limit.requests_per_minute = 1_000_000;
    config.http.shutdown_timeout_secs = 10;
    // A killed consumer keeps its partitions until its session times out, so a short
    // session lets its replacement take over sooner.
    config.consumer.session_timeout_ms = 6000;
    config
}

fn start_loads(options: &LoadOptions) -> Vec<Load> {
    (0..LOAD_CLIENTS)
        .map(|_| Load::start(options.clone()))
        .collect()
}

/// Stops every load and merges what they saw.
async fn stop_loads(loads: Vec<Load>) -> LoadStats {
    let mut merged = LoadStats::default();
    for load in loads {
        let stats = load.stop().await;
        merged.acknowledged.extend(stats.acknowledged);
        merged.sent.extend(stats.sent);
        merged.requests += stats.requests;
        for (status, count) in stats.statuses {
            *merged.statuses.entry(status).or_default() += count;
        }
    }
    merged
}

/// Returns the responses whose status is not 202, 503 or no response.
fn unexpected_statuses(statuses: &HashMap<u16, u64>) -> HashMap<u16, u64> {
    statuses
        .iter()
        .filter(|(status, _)| !matches!(status, 0 | 202 | 503))
        .map(|(status, count)| (*status, *count))
        .collect()
}

/// Sends SIGTERM to `api`, waits for it to exit and asserts that it exited with status 0
/// within `http.shutdown_timeout_secs` plus a margin.
async fn terminate_api(api: &mut ChildApp, config: &Config) {
    let limit = Duration::from_secs(config.http.shutdown_timeout_secs) + EXIT_MARGIN;
    api.terminate();
    let signalled = Instant::now();
    let status = api.wait_exit(limit).await;
    let took = signalled.elapsed();

    let status = status.unwrap_or_else(|| {
        panic!("{} did not exit within {limit:?} after SIGTERM", api.name);
    });
    println!("{} exited {took:?} after SIGTERM with {status}", api.name);
    assert!(
        status.success(),
        "{} exited with {status} after SIGTERM",
        api.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_kill_loses_nothing() {
    let started = Instant::now();
    let config = fault_config();
    let api = TestApp::start_with(config.clone(), Role::Api).await;
    let (username, _, key) = api.user_with_key("consumer_kill").await;
    let db = api.db().await;
    let user = user_id(&db, &username).await;
    let mut consumer = ChildApp::start("consumer", &config, Role::Consumer).await;

    let load = Load::start(LoadOptions::new(vec![api.base.clone()], &key));
    let stored = wait_for_rows(&db, user, 50, Duration::from_secs(20)).await;
    assert!(
        stored >= 50,
        "only {stored} events stored in 20 s before the fault"
    );

    consumer.kill().await;
    let rows_at_kill = log_count(&db, user).await;
    let acknowledged_at_kill = load.acknowledged();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted = ChildApp::start("consumer-restarted", &config, Role::Consumer).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = load.stop().await;
    println!(
        "consumer killed with {rows_at_kill} rows stored of {acknowledged_at_kill} \
         acknowledged"
    );

    let report = check_stored(&db, user, &stats, "consumer_kill", Duration::from_secs(40)).await;
    println!("consumer kill test took {:?}", started.elapsed());
    assert_exactly_once(&report);
    drop(restarted);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_sigterm_answers_and_stores() {
    let started = Instant::now();
    let config = fault_config();
    let consumer = TestApp::start_with(config.clone(), Role::Consumer).await;
    let mut api = ChildApp::start("api", &config, Role::Api).await;
    let (username, key) = user_with_key_at(&api.base, "api_sigterm").await;

    let mut options = LoadOptions::new(vec![api.base.clone()], &key);
    options.retry = false;
    let loads = start_loads(&options);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acknowledged_before: usize = loads.iter().map(Load::acknowledged).sum();
    terminate_api(&mut api, &config).await;
    let stats = stop_loads(loads).await;

    assert!(
        acknowledged_before > 0,
        "no event acknowledged in the 2 s before SIGTERM: {:?}",
        stats.statuses
    );
    let unexpected = unexpected_statuses(&stats.statuses);
    assert!(
        unexpected.is_empty(),
        "responses other than 202, 503 or none: {unexpected:?}"
    );
    let db = consumer.db().await;
    let user = user_id(&db, &username).await;
    let report = check_stored(&db, user, &stats, "api_sigterm", Duration::from_secs(30)).await;
    println!("api sigterm test took {:?}", started.elapsed());
    assert_exactly_once(&report);
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_sigterm_retries_store_once() {
    let started = Instant::now();
    let config = fault_config();
    // This app is the second API and runs the consumers.
    let second = TestApp::start_with(config.clone(), Role::All).await;
    let mut first = ChildApp::start("api", &config, Role::Api).await;
    let (username, _, key) = second.user_with_key("api_retry").await;

    let urls = vec![first.base.clone(), second.base.clone()];
    let loads = start_loads(&LoadOptions::new(urls, &key));
    tokio::time::sleep(Duration::from_secs(2)).await;
    terminate_api(&mut first, &config).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = stop_loads(loads).await;

    let unexpected = unexpected_statuses(&stats.statuses);
    assert!(
        unexpected.is_empty(),
        "responses other than 202, 503 or none: {unexpected:?}"
    );
    let db = second.db().await;
    let user = user_id(&db, &username).await;
    let report = check_stored(
        &db,
        user,
        &stats,
        "api_sigterm_retry",
        Duration::from_secs(30),
    )
    .await;
    let sent_missing = count_sent_missing(&db, user, &stats).await;
    println!(
        "fault api_sigterm_retry: sent {}, missing of sent {sent_missing}",
        stats.sent.len()
    );
    println!("api sigterm retry test took {:?}", started.elapsed());
    assert_exactly_once(&report);
    assert_eq!(
        sent_missing,
        0,
        "{sent_missing} of {} sent events missing from PostgreSQL",
        stats.sent.len()
    );
    second.stop().await;
}

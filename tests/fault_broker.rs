//! The broker is killed and started again under load: every event that got a 2xx must
//! reach PostgreSQL exactly once.
//!
//! The test runs a tansu broker of its own (`tansu` on `PATH`) with sqlite storage in a
//! fresh directory, so that its topics, records and committed offsets survive the restart,
//! and so that killing it disturbs no other test.

mod common;

use std::time::{Duration, Instant};

use common::load::{assert_exactly_once, check_stored, Load, LoadOptions};
use common::process::free_port;
use common::server::ServerProcess;
use common::*;
use logpipe::app::Role;

/// Variables that tansu reads in place of a missing option. Any of them set in the test's
/// environment would change the broker under test.
const TANSU_ENV: &[&str] = &[
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Prepares a tansu broker on `port` that stores everything in `data/tansu.db` under its
/// own directory.
fn tansu_broker(port: u16) -> ServerProcess {
    let url = format!("tcp://127.0.0.1:{port}");
    let args = [
        "broker",
        "--cluster-id",
        "logpipe-fault",
        "--listener-url",
        &url,
        "--advertised-listener-url",
        &url,
        "--storage-engine",
        "sqlite://data/tansu.db",
    ]
    .map(String::from);
    let broker = ServerProcess::new("tansu", &args, port).without_env(TANSU_ENV);
    // tansu 0.6.0 loads the first `.env` file found in its working directory or a parent
    // (the dotenv crate), so an empty one here keeps any other out. The sqlite storage
    // engine fails to start unless the database's directory exists.
    std::fs::write(broker.dir().join(".env"), "").expect(".env written");
    std::fs::create_dir_all(broker.dir().join("data")).expect("data directory created");
    broker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_nothing() {
    let started = Instant::now();
    let mut broker = tansu_broker(free_port());
    broker.start().await;

    let mut config = test_config();
    config.kafka.brokers = format!("127.0.0.1:{}", broker.port());
    // One partition and a light load keep the work of the sqlite-backed broker small.
    config.kafka.partitions = 1;
    config.rate_limit.requests_per_minute = 1_000_000;
    // NOTE: when events time out in librdkafka's queue, the idempotent producer bumps its
    // epoch by itself (librdkafka 2.12). tansu 0.6.0 with sqlite storage has no row for
    // the new epoch and its storage task panics, after which the broker fails every
    // request. So no event may time out here. Delivery waits out the 3 s outage and the
    // reconnect backoff, and requests get 202 late instead of 503. A request that reaches
    // the load client's 10 s timeout is sent again with the same ids. The 503 path through a
    // broker outage is therefore not covered by this test.
    config.producer.delivery_timeout_ms = 20_000;
    config.http.ingest_deadline_ms = 25_000;
    let app = TestApp::start_with(config, Role::All).await;
    let (username, _, key) = app.user_with_key("broker").await;

    let mut options = LoadOptions::new(vec![app.base.clone()], &key);
    options.interval = Duration::from_millis(50);
    let load = Load::start(options);
    assert!(
        load.wait_for_more(20, Duration::from_secs(15)).await,
        "only {} events acknowledged in 15 s before the fault",
        load.acknowledged()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    broker.kill();
    let before_outage = load.acknowledged();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during_outage = load.acknowledged() - before_outage;
    broker.start().await;
    let restarted = Instant::now();
    assert!(
        load.wait_for_more(20, Duration::from_secs(30)).await,
        "only {} events acknowledged in the 30 s after the broker restarted",
        load.acknowledged() - before_outage - during_outage
    );
    let recovery = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = load.stop().await;
    println!(
        "broker down 3 s: {during_outage} events acknowledged while down, \
         acknowledging again {recovery:?} after the restart"
    );

    let db = app.db().await;
    let user = user_id(&db, &username).await;
    let report = check_stored(&db, user, &stats, "broker_restart", Duration::from_secs(90)).await;
    println!("broker test took {:?}", started.elapsed());
    assert_exactly_once(&report);
    app.stop().await;
}

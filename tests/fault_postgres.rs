//! Fault test: PostgreSQL stops under load and starts again. The test creates a cluster of
//! its own with the machine's cluster tools (`pg_createcluster`, `pg_ctlcluster`), so that
//! stopping it disturbs nothing else, and drops it at the end, also when the test fails.

mod common;

use std::process::Command;
use std::time::Duration;

use common::load::{assert_exactly_once, check_stored, Load, LoadOptions};
use common::*;
use logpipe::app::Role;
use uuid::Uuid;

const ROLE: &str = "logpipe_fault";
const PASSWORD: &str = "logpipe_fault";

/// A PostgreSQL cluster of this test; dropped with everything in it on drop.
struct Cluster {
    version: String,
    name: String,
    port: u16,
}

impl Cluster {
    /// Creates and starts a cluster with a login role and a database, or returns `None`
    /// when this machine has no Debian cluster tools.
    fn create() -> Option<Cluster> {
        let listing = Command::new("pg_lsclusters").arg("-h").output().ok()?;
        let listing = String::from_utf8_lossy(&listing.stdout);
        let version = listing.split_whitespace().next()?.to_string();
        let port = free_port();
        let name = format!(
            "logpipe_fault_{}",
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let cluster = Cluster {
            version,
            name,
            port,
        };
        cluster.run("pg_createcluster", &["--port", &port.to_string()], &[]);
        cluster.control("start");
        cluster.psql(&format!("CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'"));
        cluster.psql(&format!("CREATE DATABASE {ROLE} OWNER {ROLE}"));
        Some(cluster)
    }

    fn url(&self) -> String {
        format!(
            "postgres://{ROLE}:{PASSWORD}@127.0.0.1:{}/{ROLE}",
            self.port
        )
    }

    fn control(&self, action: &str) {
        let extra: &[&str] = if action == "stop" {
            &["-m", "fast"]
        } else {
            &[]
        };
        let status = Command::new("pg_ctlcluster")
            .args([&self.version, &self.name, action])
            .args(extra)
            .status()
            .expect("run pg_ctlcluster");
        assert!(status.success(), "pg_ctlcluster {action} failed");
    }

    fn run(&self, program: &str, before: &[&str], after: &[&str]) {
        let status = Command::new(program)
            .args(before)
            .args([&self.version, &self.name])
            .args(after)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
        assert!(status.success(), "{program} failed");
    }

    fn psql(&self, sql: &str) {
        let status = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                "psql",
                "-q",
                "-p",
                &self.port.to_string(),
            ])
            .args(["-c", sql])
            .status()
            .expect("run psql");
        assert!(status.success(), "psql failed: {sql}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("pg_dropcluster")
            .args(["--stop", &self.version, &self.name])
            .status();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_loses_nothing() {
    let Some(cluster) = Cluster::create() else {
        println!("fault postgres: skipped, this machine has no pg_lsclusters");
        return;
    };
    let mut config = test_config();
    config.postgres.url = cluster.url();
    config.rate_limit.requests_per_minute = 1_000_000;
    config.db_writer.retry_delay_ms = 200;
    let app = TestApp::start_with(config, Role::All).await;
    let (username, _, key) = app.user_with_key("pgfault").await;
    let db = app.db().await;
    let user = user_id(&db, &username).await;
    drop(db);

    let load = Load::start(LoadOptions::new(vec![app.base.clone()], &key));
    assert!(
        load.wait_for_more(50, Duration::from_secs(20)).await,
        "load did not start"
    );
    cluster.control("stop");
    let during = load.acknowledged();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acknowledged_while_down = load.acknowledged() - during;
    cluster.control("start");
    assert!(
        load.wait_for_more(50, Duration::from_secs(30)).await,
        "load did not resume"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = load.stop().await;

    let db = app.db().await;
    let report = check_stored(&db, user, &stats, "postgres", Duration::from_secs(60)).await;
    assert!(
        acknowledged_while_down > 0,
        "known keys keep ingesting into Kafka while PostgreSQL is down"
    );
    assert_exactly_once(&report);
    let server_errors: u64 = stats
        .statuses
        .iter()
        .filter(|(status, _)| **status >= 500 && **status != 503)
        .map(|(_, count)| count)
        .sum();
    assert_eq!(server_errors, 0, "statuses {:?}", stats.statuses);
    drop(db);
    app.stop().await;
}

//! Helpers shared by the benches: the sample events of `tests/fixtures/loghub/`, checks
//! that a service is reachable, and actors run on an actix system of their own.

#![allow(dead_code)]

pub mod ceilings;
pub mod copy;
pub mod driver;
pub mod http_client;
pub mod kafka;
pub mod lag;
pub mod procstat;
pub mod report;

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use actix::{Actor, Addr, Context, System};
use chrono::Utc;
use logpipe::config::Config;
use logpipe::event::{parse_events, Event, Owner};

/// The five systems of the sample, one NDJSON file each.
pub const SAMPLE_SYSTEMS: [&str; 5] = ["apache", "hdfs", "linux", "openssh", "zookeeper"];

/// Owner of the events the benches build. No user has a negative id, so rows the benches
/// write never mix with a real user's rows and can be deleted afterwards.
pub const BENCH_OWNER: Owner = Owner {
    user_id: -7_001,
    api_key_id: -7_001,
};

/// Reads `count` sample events as JSON lines, taken in turn from each of the five systems
/// so that every body mixes their shapes. Panics when `count` exceeds the 10,000 samples.
pub fn sample_lines(count: usize) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loghub");
    let files: Vec<Vec<String>> = SAMPLE_SYSTEMS
        .iter()
        .map(|system| {
            let path = dir.join(format!("{system}.ndjson"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
            text.lines()
                .filter(|line| !line.trim().is_empty())
                .map(str::to_string)
                .collect()
        })
        .collect();
    let lines: Vec<String> = (0..count)
        .filter_map(|index| files[index % files.len()].get(index / files.len()).cloned())
        .collect();
    assert_eq!(
        lines.len(),
        count,
        "the sample has fewer than {count} events"
    );
    lines
}

/// Builds a request body: one JSON object for a single line, a JSON array otherwise.
pub fn request_body(lines: &[String]) -> Vec<u8> {
    match lines {
        [single] => single.clone().into_bytes(),
        _ => format!("[{}]", lines.join(",")).into_bytes(),
    }
}

/// Parses `count` sample events as the ingest handler does, each with a new id.
pub fn sample_events(count: usize) -> Vec<Event> {
    let body = request_body(&sample_lines(count));
    parse_events(&body, BENCH_OWNER, Utc::now()).expect("the sample events are valid")
}

/// Gives every event a new UUIDv7, so that writing them again inserts new rows.
pub fn renew_ids(events: &mut [Event]) {
    for event in events {
        event.id = uuid::Uuid::now_v7();
    }
}

/// Loads the configuration as logpipe would: defaults plus `LOGPIPE_*` variables.
pub fn load_config() -> Config {
    Config::load(None, std::env::vars()).expect("invalid LOGPIPE_* configuration")
}

/// Returns `host:port` of a URL such as `postgres://user:password@host:port/db`, with
/// `default_port` when the URL names none.
pub fn url_host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:{default_port}")
    }
}

/// Returns whether a TCP connection to `host_port` succeeds within a second.
pub fn reachable(host_port: &str) -> bool {
    let Ok(mut addrs) = host_port.to_socket_addrs() else {
        return false;
    };
    addrs.any(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok())
}

/// Prints why a bench is skipped when one of `services` (name, `host:port`) is not
/// reachable, and returns whether all are.
pub fn services_reachable(bench: &str, services: &[(&str, String)]) -> bool {
    for (name, host_port) in services {
        if !reachable(host_port) {
            println!(
                "{bench}: skipped, {name} is not reachable at {host_port} \
                 (start the services with scripts/services or scripts/bench)"
            );
            return false;
        }
    }
    true
}

/// Returns the name and address of the configuration's PostgreSQL, for
/// [`services_reachable`].
pub fn postgres_service(config: &Config) -> (&'static str, String) {
    ("PostgreSQL", url_host_port(&config.postgres.url, 5432))
}

/// Returns the name and address of the configuration's Redis.
pub fn redis_service(config: &Config) -> (&'static str, String) {
    ("Redis", url_host_port(&config.redis.url, 6379))
}

/// Returns the name and address of the configuration's first Kafka broker.
pub fn kafka_service(config: &Config) -> (&'static str, String) {
    let first = config.kafka.brokers.split(',').next().unwrap_or_default();
    ("Kafka", url_host_port(first.trim(), 9092))
}

/// An actor on an actix system in a thread of its own; dropping it stops the system.
pub struct ActorThread<A: Actor<Context = Context<A>>> {
    pub addr: Addr<A>,
    system: System,
    thread: Option<JoinHandle<()>>,
}

impl<A: Actor<Context = Context<A>>> ActorThread<A> {
    /// Starts the actor that `make` builds inside the new system.
    pub fn start(make: impl FnOnce() -> A + Send + 'static) -> Self {
        let (sender, receiver) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runner = System::new();
            let addr = runner.block_on(async move { make().start() });
            let _ = sender.send((addr, System::current()));
            let _ = runner.run();
        });
        let (addr, system) = receiver.recv().expect("actix system started");
        ActorThread {
            addr,
            system,
            thread: Some(thread),
        }
    }
}

impl<A: Actor<Context = Context<A>>> Drop for ActorThread<A> {
    fn drop(&mut self) {
        self.system.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Opens a PostgreSQL connection whose connection task runs on the current runtime.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// Returns whether Criterion runs this bench to measure (`cargo bench`) rather than once
/// as a test (`cargo test --benches`).
pub fn measuring() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

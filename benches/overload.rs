//! Overload run: drives a logpipe process with ten times the requests it can absorb and
//! reports whether every request got a response, how fast the 503s came, and the peak
//! resident memory of the logpipe process.
//!
//! Run with `cargo bench --bench overload` while PostgreSQL, Redis and the broker run
//! (`scripts/services`). It starts its own `logpipe serve` on a free loopback port with its
//! own topic, sends a bounded number of requests for a bounded time, and stops the process
//! with SIGTERM. Phase one measures what logpipe absorbs with four clients in a closed
//! loop; phase two offers ten times that rate in an open loop (a new request every
//! 1 / rate seconds whatever the responses), with at most `MAX_IN_FLIGHT` requests pending.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const EVENTS_PER_REQUEST: usize = 100;
const CAPACITY_PHASE: Duration = Duration::from_secs(8);
const OVERLOAD_PHASE: Duration = Duration::from_secs(10);
const OVERLOAD_FACTOR: f64 = 10.0;
const MAX_IN_FLIGHT: usize = 4096;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("overload: skipped outside `cargo bench --bench overload`");
        return;
    }
    for (name, addr) in [
        ("PostgreSQL", "127.0.0.1:5432"),
        ("Redis", "127.0.0.1:6379"),
        ("Kafka", "127.0.0.1:9092"),
    ] {
        if TcpStream::connect_timeout(&addr.parse().expect("address"), Duration::from_secs(1))
            .is_err()
        {
            println!("overload: skipped, {name} is not reachable at {addr} (run scripts/services)");
            return;
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

/// The logpipe process under test; stopped with SIGTERM on drop.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("free port")
            .port();
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let child = Command::new(env!("CARGO_BIN_EXE_logpipe"))
            .arg("serve")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("LOGPIPE_HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("LOGPIPE_KAFKA_TOPIC", format!("logpipe.overload.{suffix}"))
            .env(
                "LOGPIPE_KAFKA_DEAD_LETTER_TOPIC",
                format!("logpipe.overload.{suffix}.dlq"),
            )
            .env(
                "LOGPIPE_CONSUMER_GROUP_ID",
                format!("logpipe-overload-{suffix}"),
            )
            .env("LOGPIPE_RATE_LIMIT_REQUESTS_PER_MINUTE", "60000000")
            .env(
                "LOGPIPE_AUTH_JWT_SECRET",
                "overload-bench-secret-overload-bench-secret",
            )
            .env("LOGPIPE_LOG_LEVEL", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("start logpipe");
        Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

async fn run() {
    let server = Server::start();
    let client = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .build()
        .expect("client");
    wait_ready(&client, &server.base).await;
    let key = create_key(&client, &server.base).await;
    let body = Arc::new(sample_body());

    let absorbed = measure_capacity(&client, &server.base, &key, &body).await;
    let offered = absorbed * OVERLOAD_FACTOR;
    println!("overload: logpipe absorbs {absorbed:.0} requests/s of {EVENTS_PER_REQUEST} events with 4 clients");
    println!(
        "overload: offering {offered:.0} requests/s for {} s",
        OVERLOAD_PHASE.as_secs()
    );
    let results = overload(&client, &server.base, &key, &body, offered).await;
    let peak_rss_mib = server.peak_rss_kib() as f64 / 1024.0;
    report(&results, offered, peak_rss_mib);
}

async fn wait_ready(client: &reqwest::Client, base: &str) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(response) = client.get(format!("{base}/readyz")).send().await {
            if response.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("logpipe did not become ready within 60 s");
}

async fn create_key(client: &reqwest::Client, base: &str) -> String {
    let username = format!(
        "overload_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let password = "overload password";
    let post = |path: &str, body: Value| client.post(format!("{base}{path}")).json(&body).send();
    post("/api/auth/signup/", json!({"username": username, "email": format!("{username}@example.com"), "password": password}))
        .await
        .expect("signup");
    let tokens: Value = post(
        "/api/auth/login/",
        json!({"username": username, "password": password}),
    )
    .await
    .expect("login")
    .json()
    .await
    .expect("tokens");
    let access = tokens["access"].as_str().expect("access token");
    let key: Value = client
        .post(format!("{base}/api/key/"))
        .bearer_auth(access)
        .json(&json!({"name": "overload"}))
        .send()
        .await
        .expect("create key")
        .json()
        .await
        .expect("key");
    key["api_key"].as_str().expect("api key").to_string()
}

/// Builds a request body of HDFS sample events.
fn sample_body() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loghub/hdfs.ndjson");
    let text = std::fs::read_to_string(path).expect("sample file");
    let events: Vec<&str> = text.lines().take(EVENTS_PER_REQUEST).collect();
    format!("[{}]", events.join(",")).into_bytes()
}

async fn post(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    body: &Arc<Vec<u8>>,
) -> (u16, Duration) {
    let started = Instant::now();
    let response = client
        .post(format!("{base}/api/logs/"))
        .header("API-KEY", key)
        .header("Content-Type", "application/json")
        .body(body.as_ref().clone())
        .send()
        .await;
    let status = match response {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            status
        }
        Err(_) => 0,
    };
    (status, started.elapsed())
}

/// Requests per second accepted by four clients in a closed loop.
async fn measure_capacity(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    body: &Arc<Vec<u8>>,
) -> f64 {
    let accepted = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + CAPACITY_PHASE;
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (client, base, key, body, accepted) = (
                client.clone(),
                base.to_string(),
                key.to_string(),
                Arc::clone(body),
                Arc::clone(&accepted),
            );
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    if post(&client, &base, &key, &body).await.0 == 202 {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    accepted.load(Ordering::Relaxed) as f64 / CAPACITY_PHASE.as_secs_f64()
}

/// Status and latency of every request of the overload phase.
type Results = Vec<(u16, Duration)>;

async fn overload(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    body: &Arc<Vec<u8>>,
    rate: f64,
) -> Results {
    let results = Arc::new(Mutex::new(Vec::new()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let skipped = Arc::new(AtomicUsize::new(0));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let deadline = Instant::now() + OVERLOAD_PHASE;
    let mut tasks = Vec::new();
    while Instant::now() < deadline {
        ticker.tick().await;
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (client, base, key, body, results, in_flight) = (
            client.clone(),
            base.to_string(),
            key.to_string(),
            Arc::clone(body),
            Arc::clone(&results),
            Arc::clone(&in_flight),
        );
        tasks.push(tokio::spawn(async move {
            let outcome = post(&client, &base, &key, &body).await;
            results.lock().expect("results").push(outcome);
            in_flight.fetch_sub(1, Ordering::Relaxed);
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let skipped = skipped.load(Ordering::Relaxed);
    if skipped > 0 {
        println!("overload: {skipped} requests not sent because {MAX_IN_FLIGHT} were pending");
    }
    let results = results.lock().expect("results").clone();
    results
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn report(results: &Results, offered: f64, peak_rss_mib: f64) {
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for (status, _) in results {
        *by_status.entry(*status).or_default() += 1;
    }
    let latencies = |wanted: u16| {
        let mut latencies: Vec<Duration> = results
            .iter()
            .filter(|(status, _)| *status == wanted)
            .map(|(_, latency)| *latency)
            .collect();
        latencies.sort();
        latencies
    };
    let accepted = latencies(202);
    let unavailable = latencies(503);
    let sent = results.len();
    println!(
        "overload: offered {offered:.0} requests/s, sent {sent} in {} s",
        OVERLOAD_PHASE.as_secs()
    );
    println!("overload: responses by status (0 = no answer): {by_status:?}");
    println!(
        "overload: accepted {:.0} requests/s ({:.0} events/s)",
        accepted.len() as f64 / OVERLOAD_PHASE.as_secs_f64(),
        (accepted.len() * EVENTS_PER_REQUEST) as f64 / OVERLOAD_PHASE.as_secs_f64()
    );
    for (name, sorted) in [("202", &accepted), ("503", &unavailable)] {
        println!(
            "overload: {name} latency p50 {:?}, p99 {:?}, max {:?}",
            percentile(sorted, 0.50),
            percentile(sorted, 0.99),
            sorted.last().copied().unwrap_or_default()
        );
    }
    let unanswered = by_status.get(&0).copied().unwrap_or(0);
    println!("overload: requests without an answer: {unanswered}");
    println!("overload: peak RSS of logpipe: {peak_rss_mib:.1} MiB");
}

//! Load run of a running logpipe over HTTP on loopback, with the limits of the components it
//! depends on measured in the same run.
//!
//! Run it with `cargo bench --bench load` while logpipe serves with rate limits raised
//! (`scripts/bench` starts one). It starts no logpipe, only a bounded load:
//!
//! - ceilings, while logpipe is idle: an empty actix-web handler in this process, a bare
//!   rdkafka producer with logpipe's settings, binary COPY into an UNLOGGED table, logpipe's
//!   INSERT statement, and rate-limit decisions in Redis;
//! - workload A: one event per request from `BENCH_A_CONCURRENCY` connections;
//! - workload B: 500 events per request from `BENCH_B_CONCURRENCY` connections, with rows
//!   counted in PostgreSQL and the lag from 202 to visible row probed.
//!
//! Each workload stops at its request count or its duration, whichever comes first, and
//! then waits at most `BENCH_DRAIN_SECS` for its rows. The memory and CPU of the logpipe
//! processes (`BENCH_PIDS`, or whatever listens on the port of `BENCH_URL`) come from
//! `/proc`. The result is printed as Markdown tables. The run then deletes the two users it
//! signed up and their rows.
//!
//! Settings (environment, defaults in brackets): `BENCH_URL` [http://127.0.0.1:8080],
//! `BENCH_PIDS` [found by port], `BENCH_A_CONCURRENCY` [64], `BENCH_A_SECS` [20],
//! `BENCH_A_MAX_REQUESTS` [1000000], `BENCH_B_CONCURRENCY` [8], `BENCH_B_SECS` [60],
//! `BENCH_B_MAX_REQUESTS` [40000], `BENCH_CEILING_SECS` [5], `BENCH_DRAIN_SECS` [120],
//! `BENCH_CLIENT_THREADS` [1]. PostgreSQL, Redis and Kafka are found through the
//! `LOGPIPE_*` variables as logpipe finds them.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logpipe::actors::kafka_producer::{self, Record};
use logpipe::config::Config;
use logpipe::event::Event;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

mod support;

use support::ceilings::{self, EmptyServer};
use support::driver::{self, LoadOutcome, LoadSpec};
use support::lag::{self, LagOutcome};
use support::procstat::{self, RssWatch};
use support::report::{self, Ceilings, ProcessUse, Report, WorkloadB};
use support::{
    kafka_service, load_config, postgres_service, redis_service, request_body, sample_lines,
    services_reachable, BENCH_OWNER,
};

/// Events per request of workload B.
const B_EVENTS_PER_REQUEST: usize = 500;

/// Every n-th accepted request of workload B has its first event probed for lag.
const B_PROBE_EVERY: u64 = 10;

/// Settings of the run; see the module documentation.
#[derive(Debug, Clone)]
struct Options {
    url: String,
    addr: SocketAddr,
    pids: Vec<u32>,
    a_concurrency: usize,
    a_duration: Duration,
    a_max_requests: u64,
    b_concurrency: usize,
    b_duration: Duration,
    b_max_requests: u64,
    ceiling_duration: Duration,
    drain_timeout: Duration,
    client_threads: usize,
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("invalid {name}={value}: expected a positive number")),
        Err(_) => default,
    }
}

impl Options {
    fn from_env() -> Options {
        let url = std::env::var("BENCH_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
        let host_port = url.trim_start_matches("http://").trim_end_matches('/');
        let addr = host_port
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .unwrap_or_else(|| panic!("invalid BENCH_URL={url}: expected http://HOST:PORT"));
        let pids = std::env::var("BENCH_PIDS")
            .map(|pids| {
                pids.split(',')
                    .map(|pid| {
                        pid.trim()
                            .parse()
                            .expect("BENCH_PIDS: comma-separated pids")
                    })
                    .collect()
            })
            .unwrap_or_else(|_| procstat::pids_listening_on(addr.port()));
        let secs = |name, default| Duration::from_secs(env_number(name, default));
        Options {
            url: url.trim_end_matches('/').to_string(),
            addr,
            pids,
            a_concurrency: env_number("BENCH_A_CONCURRENCY", 64),
            a_duration: secs("BENCH_A_SECS", 20),
            a_max_requests: env_number("BENCH_A_MAX_REQUESTS", 1_000_000),
            b_concurrency: env_number("BENCH_B_CONCURRENCY", 8),
            b_duration: secs("BENCH_B_SECS", 60),
            b_max_requests: env_number("BENCH_B_MAX_REQUESTS", 40_000),
            ceiling_duration: secs("BENCH_CEILING_SECS", 5),
            drain_timeout: secs("BENCH_DRAIN_SECS", 120),
            client_threads: env_number("BENCH_CLIENT_THREADS", 1),
        }
    }
}

fn main() {
    if !support::measuring() {
        println!("load: skipped outside `cargo bench --bench load`");
        return;
    }
    let options = Options::from_env();
    let config = load_config();
    if !support::reachable(&options.addr.to_string()) {
        println!(
            "load: skipped, no logpipe is listening at {}; run scripts/bench, or start \
             logpipe with a raised rate limit and set BENCH_URL",
            options.url
        );
        return;
    }
    let services = [
        postgres_service(&config),
        redis_service(&config),
        kafka_service(&config),
    ];
    if !services_reachable("load", &services) {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.client_threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(&options, &config));
}

/// Measures, prints the report, then deletes the users the run created and their rows, so
/// that runs do not fill the database.
async fn run(options: &Options, config: &Config) {
    let setup = Setup::new(options, config).await;
    let report = measure(options, config, &setup).await;
    report::print(&report);

    let users = [setup.a_user_id, setup.b_user_id];
    println!("load: deleting the run's users and their rows");
    for statement in [
        "DELETE FROM logs WHERE user_id = ANY($1)",
        "DELETE FROM users WHERE id = ANY($1)",
    ] {
        if let Err(err) = setup.db.execute(statement, &[&users.as_slice()]).await {
            println!("load: cleanup failed on `{statement}`: {err}");
        }
    }
}

async fn measure(options: &Options, config: &Config, setup: &Setup) -> Report {
    if options.pids.is_empty() {
        println!("load: no logpipe process found; memory and CPU are not measured");
    }
    println!(
        "load: measuring ceilings for {:?} each",
        options.ceiling_duration
    );
    let ceilings = measure_ceilings(options, config, setup).await;

    println!("load: workload A for at most {:?}", options.a_duration);
    let (a, a_use, a_rows) = workload_a(options, setup).await;
    println!("load: workload B for at most {:?}", options.b_duration);
    let (b, b_use) = workload_b(options, setup).await;

    let hwm_kib = options
        .pids
        .iter()
        .map(|pid| procstat::status_kib(*pid, "VmHWM").unwrap_or(0))
        .collect();
    Report {
        url: options.url.clone(),
        pids: options.pids.clone(),
        a_concurrency: options.a_concurrency,
        b_concurrency: options.b_concurrency,
        b_events_per_request: B_EVENTS_PER_REQUEST,
        a,
        a_rows,
        a_use,
        b,
        b_use,
        hwm_kib,
        ceilings,
    }
}

/// Accounts, request bodies and connections the run needs.
struct Setup {
    a_key: String,
    a_user_id: i64,
    b_key: String,
    b_user_id: i64,
    a_bodies: Arc<Vec<Vec<u8>>>,
    b_bodies: Arc<Vec<Vec<u8>>>,
    b_events: Vec<Event>,
    db: tokio_postgres::Client,
    postgres_url: String,
    pool: deadpool_postgres::Pool,
}

impl Setup {
    async fn new(options: &Options, config: &Config) -> Setup {
        let client = reqwest::Client::new();
        let db = support::connect(&config.postgres.url).await;
        let (a_key, a_user_id) = create_user_with_key(&client, &options.url, &db, "a").await;
        let (b_key, b_user_id) = create_user_with_key(&client, &options.url, &db, "b").await;
        let lines = sample_lines(10_000);
        let a_bodies = lines.chunks(1).map(request_body).collect();
        let b_bodies = lines
            .chunks(B_EVENTS_PER_REQUEST)
            .map(request_body)
            .collect();
        Setup {
            a_key,
            a_user_id,
            b_key,
            b_user_id,
            a_bodies: Arc::new(a_bodies),
            b_bodies: Arc::new(b_bodies),
            b_events: support::sample_events(B_EVENTS_PER_REQUEST),
            db,
            postgres_url: config.postgres.url.clone(),
            pool: logpipe::db::pool(&config.postgres).expect("PostgreSQL pool"),
        }
    }
}

/// Signs up a new user through the API, creates an API key, and returns the key and the
/// user's id.
async fn create_user_with_key(
    client: &reqwest::Client,
    base: &str,
    db: &tokio_postgres::Client,
    workload: &str,
) -> (String, i64) {
    let username = format!(
        "bench_{workload}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let password = "load bench password";
    let post = |path: &str, body: Value| client.post(format!("{base}{path}")).json(&body).send();

    let email = format!("{username}@example.com");
    let signup = json!({"username": username, "email": email, "password": password});
    let response = post("/api/auth/signup/", signup)
        .await
        .expect("signup sent");
    assert!(
        response.status().is_success(),
        "signup failed: {}",
        response.status()
    );

    let login = json!({"username": username, "password": password});
    let tokens: Value = post("/api/auth/login/", login)
        .await
        .expect("login sent")
        .json()
        .await
        .expect("login response");
    let access = tokens["access"].as_str().expect("access token");

    let key: Value = client
        .post(format!("{base}/api/key/"))
        .bearer_auth(access)
        .json(&json!({"name": format!("load {workload}")}))
        .send()
        .await
        .expect("key request sent")
        .json()
        .await
        .expect("key response");
    let key = key["api_key"].as_str().expect("api key").to_string();

    let user_id = db
        .query_one("SELECT id FROM users WHERE username = $1", &[&username])
        .await
        .expect("user stored")
        .get(0);
    (key, user_id)
}

async fn measure_ceilings(options: &Options, config: &Config, setup: &Setup) -> Ceilings {
    let duration = options.ceiling_duration;
    let server = EmptyServer::start(http_workers(config));
    let empty = |bodies: &Arc<Vec<Vec<u8>>>, concurrency| LoadSpec {
        addr: server.addr,
        path: "/api/logs/".into(),
        headers: "Content-Type: application/json\r\n".into(),
        bodies: Arc::clone(bodies),
        concurrency,
        max_requests: u64::MAX,
        duration,
        probe: None,
    };
    let http_a = driver::run(empty(&setup.a_bodies, options.a_concurrency)).await;
    let http_b = driver::run(empty(&setup.b_bodies, options.b_concurrency)).await;
    server.stop().await;

    let single = encode(&setup.b_events[..1]);
    let batch = encode(&setup.b_events);
    let producer_a = ceilings::producer_rate(config, &single, options.a_concurrency, duration);
    let producer_a = producer_a.await;
    let producer_b = ceilings::producer_rate(config, &batch, options.b_concurrency, duration);
    let producer_b = producer_b.await;

    let streams = config.consumer.consumers;
    let copy_events = support::sample_events(config.db_writer.batch_size);
    let copy = ceilings::copy_rate(&config.postgres.url, &copy_events, streams, duration).await;
    let insert = ceilings::insert_rate(&setup.pool, &copy_events, streams, duration).await;
    setup
        .db
        .execute(
            "DELETE FROM logs WHERE user_id = $1",
            &[&BENCH_OWNER.user_id],
        )
        .await
        .expect("delete the bench rows");

    let redis_a = ceilings::redis_decision_rate(config, options.a_concurrency, duration).await;
    let redis_b = ceilings::redis_decision_rate(config, options.b_concurrency, duration).await;
    Ceilings {
        http_a: http_a.accepted_per_sec(),
        http_b: http_b.accepted_per_sec(),
        producer_a,
        producer_b,
        copy,
        insert,
        redis_a,
        redis_b,
        streams,
        batch_size: config.db_writer.batch_size,
    }
}

/// Worker threads of logpipe's HTTP server: `http.workers`, or one per core when 0.
fn http_workers(config: &Config) -> usize {
    match config.http.workers {
        0 => std::thread::available_parallelism().map_or(1, |cores| cores.get()),
        workers => workers,
    }
}

fn encode(events: &[Event]) -> Vec<Record> {
    events
        .iter()
        .map(kafka_producer::encode)
        .collect::<Result<_, _>>()
        .expect("events encode")
}

fn ingest_headers(key: &str) -> String {
    format!("API-KEY: {key}\r\nContent-Type: application/json\r\n")
}

/// The other processes whose CPU time the report shows, by process name.
const SERVICE_PROCESSES: [&str; 3] = ["postgres", "tansu", "redis-server"];

/// CPU time of the measured processes, of this process, of the services and of the whole
/// machine, and the memory peaks of the measured processes, from [`Usage::start`] to
/// [`Usage::finish`].
struct Usage {
    pids: Vec<u32>,
    started: Instant,
    cpu_before: Vec<f64>,
    own_cpu_before: f64,
    services_before: Vec<f64>,
    machine_before: (f64, f64),
    rss: RssWatch,
}

impl Usage {
    fn start(pids: &[u32]) -> Usage {
        Usage {
            pids: pids.to_vec(),
            started: Instant::now(),
            cpu_before: cpu_of(pids),
            own_cpu_before: procstat::cpu_seconds(std::process::id()).unwrap_or(0.0),
            services_before: services_cpu(),
            machine_before: procstat::machine_cpu_seconds(),
            rss: RssWatch::start(pids),
        }
    }

    fn finish(self) -> ProcessUse {
        let cpu_after = cpu_of(&self.pids);
        let own_cpu = procstat::cpu_seconds(std::process::id()).unwrap_or(0.0);
        let services = services_cpu();
        let (busy, total) = procstat::machine_cpu_seconds();
        ProcessUse {
            wall: self.started.elapsed(),
            cpu_seconds: difference(&cpu_after, &self.cpu_before),
            generator_cpu_seconds: own_cpu - self.own_cpu_before,
            services: SERVICE_PROCESSES
                .into_iter()
                .zip(difference(&services, &self.services_before))
                .collect(),
            machine_busy_seconds: busy - self.machine_before.0,
            machine_total_seconds: total - self.machine_before.1,
            peak_rss_kib: self.rss.stop(),
        }
    }
}

fn difference(after: &[f64], before: &[f64]) -> Vec<f64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

fn services_cpu() -> Vec<f64> {
    SERVICE_PROCESSES
        .iter()
        .map(|name| procstat::cpu_seconds_of_name(name))
        .collect()
}

fn cpu_of(pids: &[u32]) -> Vec<f64> {
    pids.iter()
        .map(|pid| procstat::cpu_seconds(*pid).unwrap_or(0.0))
        .collect()
}

async fn count_rows(db: &tokio_postgres::Client, user_id: i64) -> i64 {
    db.query_one("SELECT count(*) FROM logs WHERE user_id = $1", &[&user_id])
        .await
        .expect("count rows")
        .get(0)
}

/// Waits until `user_id` has `expected` rows or `timeout` passed. Returns the last count
/// and the time it took.
async fn wait_for_rows(
    db: &tokio_postgres::Client,
    user_id: i64,
    expected: i64,
    timeout: Duration,
) -> (i64, Duration) {
    let started = Instant::now();
    loop {
        let rows = count_rows(db, user_id).await;
        if rows >= expected || started.elapsed() >= timeout {
            return (rows, started.elapsed());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs workload A, then waits for its rows. Returns the load, the processes' use over
/// the load and the wait, and the rows found.
async fn workload_a(options: &Options, setup: &Setup) -> (LoadOutcome, ProcessUse, i64) {
    let usage = Usage::start(&options.pids);
    let outcome = driver::run(LoadSpec {
        addr: options.addr,
        path: "/api/logs/".into(),
        headers: ingest_headers(&setup.a_key),
        bodies: Arc::clone(&setup.a_bodies),
        concurrency: options.a_concurrency,
        max_requests: options.a_max_requests,
        duration: options.a_duration,
        probe: None,
    })
    .await;
    let expected = outcome.accepted() as i64;
    let (rows, _) =
        wait_for_rows(&setup.db, setup.a_user_id, expected, options.drain_timeout).await;
    (outcome, usage.finish(), rows)
}

/// Runs workload B with the lag probe, counts the rows when the load ends, then waits for
/// the rest. Returns the outcome and the processes' use over the load and the wait.
async fn workload_b(options: &Options, setup: &Setup) -> (WorkloadB, ProcessUse) {
    let usage = Usage::start(&options.pids);
    let (probes, probed) = mpsc::unbounded_channel();
    let (stop, stopped) = watch::channel(false);
    let (give_up, given_up) = watch::channel(false);
    let probe_db = support::connect(&setup.postgres_url).await;
    let b_user_id = setup.b_user_id;
    let prober =
        tokio::spawn(
            async move { lag::probe(&probe_db, b_user_id, probed, stopped, given_up).await },
        );

    let load = driver::run(LoadSpec {
        addr: options.addr,
        path: "/api/logs/".into(),
        headers: ingest_headers(&setup.b_key),
        bodies: Arc::clone(&setup.b_bodies),
        concurrency: options.b_concurrency,
        max_requests: options.b_max_requests,
        duration: options.b_duration,
        probe: Some((B_PROBE_EVERY, probes)),
    })
    .await;
    let rows_at_end = count_rows(&setup.db, setup.b_user_id).await;

    let _ = stop.send(true);
    let expected = (load.accepted() as usize * B_EVENTS_PER_REQUEST) as i64;
    let (rows, drain) =
        wait_for_rows(&setup.db, setup.b_user_id, expected, options.drain_timeout).await;
    // Every row is visible or the wait timed out: a few more lookups find the last probes.
    tokio::time::sleep(lag::POLL_INTERVAL * 10).await;
    let _ = give_up.send(true);
    let lag: LagOutcome = prober.await.unwrap_or_default();
    let outcome = WorkloadB {
        load,
        rows_at_end,
        rows,
        drain,
        lag,
    };
    (outcome, usage.finish())
}

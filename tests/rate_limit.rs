//! The rate limits against the real Redis, PostgreSQL and broker: one exact limit shared by
//! two instances, per-key limits, key revocation, the `RateLimit-*` header fields, the GCRA
//! window bound, local limiting while Redis is down, and the failed-login limits.
//!
//! The outage and login tests start a `redis-server` of their own (it must be on `PATH`),
//! so that they can kill it, and so that no other test shares their Redis state.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use common::*;
use futures::future::join_all;
use logpipe::actors::call;
use logpipe::actors::rate_limiter::{Check, Decision, Limit, Ping, RateLimiter};
use logpipe::app::Role;
use logpipe::config::Config;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::RwLock;
use uuid::Uuid;

/// The default per-key limit these tests set, in requests per minute. The burst is equal.
const DEFAULT_LIMIT: u64 = 100;

/// How long an instance may take to report ready, Redis connection included.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Lets three tests run alone. Two of them count exactly and assume that their requests
/// are decided within one emission interval; the Redis outage test expects no 503, which
/// a request can get when CPU starvation holds it past `http.ingest_deadline_ms`. On a
/// machine with few cores, the password hashing of other tests' signups and logins can
/// delay them that much. Those tests take the lock for writing, every other test for
/// reading.
static TIMING: RwLock<()> = RwLock::const_new(());

/// How long these tests let a rate-limit decision wait for Redis, in milliseconds.
///
/// A slower response counts as an outage, and each instance then decides by itself. These
/// tests check exact counts shared by instances, so they wait longer than the default 50,
/// but far less than `http.ingest_deadline_ms`, because during an outage a check may wait
/// for the batch in flight and then for its own.
/// A pipeline that times out may still have run in Redis, and its checks are then counted
/// once more in memory, so an outage can only make the count stricter, never looser. An
/// exact count needs no outage during the round, hence the longer wait on 2 busy cores.
const REDIS_TIMEOUT_MS: u64 = 250;

/// Builds a test configuration with the default limits set explicitly, so that a
/// `LOGPIPE_RATE_LIMIT_*` variable cannot change what these tests expect.
fn limit_config() -> Config {
    let mut config = test_config();
    config.redis.timeout_ms = REDIS_TIMEOUT_MS;
    config.rate_limit.requests_per_minute = DEFAULT_LIMIT as u32;
    config.rate_limit.burst = 0;
    config.rate_limit.login_failures_per_minute = 10;
    config
}

/// Starts one API instance and waits until its Redis, PostgreSQL and Kafka respond.
async fn start_api(config: Config) -> TestApp {
    let app = TestApp::start_with(config, Role::Api).await;
    app.wait_ready(READY_TIMEOUT).await;
    app
}

/// Time after which every instance has dropped its cached lookup of a key.
fn key_cache_expiry(config: &Config) -> Duration {
    Duration::from_millis(config.auth.api_key_cache_ms) + Duration::from_millis(500)
}

fn event_body(message: &str) -> Vec<u8> {
    serde_json::to_vec(&event(message)).expect("json")
}

/// An API key: its id and its secret.
struct ApiKey {
    id: i64,
    secret: String,
}

/// Signs up a user with a unique name and returns `(username, access token)`.
async fn new_user(app: &TestApp, stem: &str) -> (String, String) {
    let username = app.signup(stem).await;
    let (access, _) = app.login(&username).await;
    (username, access)
}

async fn new_key(app: &TestApp, access: &str) -> ApiKey {
    let created = app.create_key(access, "rate limit test").await;
    ApiKey {
        id: created["id"].as_i64().expect("key id"),
        secret: created["api_key"].as_str().expect("api_key").to_string(),
    }
}

/// Sets a key's own limit (`null`: the default) and waits until no instance caches the
/// old one.
async fn set_limit(app: &TestApp, access: &str, key: &ApiKey, limit: Value) {
    let body = json!({ "rate_limit_per_minute": limit });
    let (status, response) = app.patch_key(access, key.id, &body).await;
    assert_eq!(status, StatusCode::OK, "PATCH {body}: {response}");
    tokio::time::sleep(key_cache_expiry(&app.config)).await;
}

/// Reads a header as a whole number. Panics naming the header when it is missing or is not
/// a number.
fn header_number(response: &reqwest::Response, name: &str) -> u64 {
    let status = response.status();
    let value = response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing from a {status} response"));
    value
        .to_str()
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("{name} of a {status} response is not a number: {value:?}"))
}

/// Status codes of a set of `/api/logs/` responses.
#[derive(Debug, Default)]
struct Tally {
    accepted: usize,
    rate_limited: usize,
    server_errors: Vec<StatusCode>,
    other: Vec<StatusCode>,
}

impl Tally {
    fn add(&mut self, status: StatusCode) {
        match status {
            StatusCode::ACCEPTED => self.accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => self.rate_limited += 1,
            status if status.is_server_error() => self.server_errors.push(status),
            status => self.other.push(status),
        }
    }

    fn not_rate_limited(&self) -> usize {
        self.accepted + self.server_errors.len() + self.other.len()
    }
}

/// Builds a client that keeps a connection open for each request of a large burst.
fn burst_client(requests: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(requests)
        .build()
        .expect("HTTP client")
}

/// Sends `count` small events with one key all at once, alternating between `apps`, and
/// counts the responses by status.
async fn post_all_at_once(
    client: &reqwest::Client,
    apps: &[&TestApp],
    key: &ApiKey,
    count: usize,
) -> Tally {
    let body = event_body("burst");
    let requests = (0..count).map(|index| {
        client
            .post(apps[index % apps.len()].url("/api/logs/"))
            .header("API-KEY", &key.secret)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
    });
    let mut tally = Tally::default();
    for response in join_all(requests).await {
        tally.add(response.expect("request sent").status());
    }
    tally
}

/// Opens `count` connections of `client`, spread over `apps`, so that a later burst does
/// not wait for TCP handshakes.
async fn open_connections(client: &reqwest::Client, apps: &[&TestApp], count: usize) {
    let requests =
        (0..count).map(|index| client.get(apps[index % apps.len()].url("/healthz")).send());
    for response in join_all(requests).await {
        let status = response.expect("request sent").status();
        assert_eq!(status, StatusCode::OK, "GET /healthz");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_hold_exact_limit() {
    const ROUNDS: usize = 20;
    const REQUESTS: usize = 300;
    let interval = Duration::from_secs(60) / DEFAULT_LIMIT as u32;
    let limit = DEFAULT_LIMIT as usize;
    let _alone = TIMING.write().await;
    let config = limit_config();
    let a = start_api(config.clone()).await;
    let b = start_api(config).await;
    let (_, access) = new_user(&a, "concurrent").await;
    let client = burst_client(REQUESTS);
    open_connections(&client, &[&a, &b], REQUESTS).await;
    // One uncounted round opens the PostgreSQL and Kafka connections of both instances.
    let warm_up_key = new_key(&a, &access).await;
    post_all_at_once(&client, &[&a, &b], &warm_up_key, REQUESTS).await;

    // GCRA lets the burst of 100 through at once and the next request one interval
    // (600 ms) after the first, so a round decided within 600 ms allows exactly 100. A
    // slower round may legitimately allow one more per interval it spans.
    let mut slow_rounds = 0;
    for round in 1..=ROUNDS {
        let key = new_key(&a, &access).await;
        let started = Instant::now();
        let tally = post_all_at_once(&client, &[&a, &b], &key, REQUESTS).await;
        let elapsed = started.elapsed();
        println!("round {round}: {REQUESTS} requests in {elapsed:?}: {tally:?}");

        assert!(
            tally.server_errors.is_empty(),
            "round {round} ({elapsed:?}): 5xx responses: {tally:?}"
        );
        assert!(
            tally.other.is_empty(),
            "round {round} ({elapsed:?}): responses neither 202 nor 429: {tally:?}"
        );
        assert!(
            tally.accepted >= limit,
            "round {round} ({elapsed:?}): 202 responses: {tally:?}"
        );
        if elapsed < interval {
            assert_eq!(
                tally.not_rate_limited(),
                limit,
                "round {round} ({elapsed:?}): responses other than 429: {tally:?}"
            );
            assert_eq!(
                tally.rate_limited,
                REQUESTS - limit,
                "round {round} ({elapsed:?}): 429 responses: {tally:?}"
            );
        } else {
            slow_rounds += 1;
            let refills = (elapsed.as_millis() / interval.as_millis()) as usize;
            assert!(
                tally.accepted <= limit + refills,
                "round {round} ({elapsed:?}, {refills} refills): 202 responses: {tally:?}"
            );
        }
    }
    println!("{slow_rounds} of {ROUNDS} rounds took longer than {interval:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_limit_applies() {
    let _shared = TIMING.read().await;
    let app = start_api(limit_config()).await;
    let (_, owner) = new_user(&app, "perkey").await;
    let (_, stranger) = new_user(&app, "stranger").await;
    let key = new_key(&app, &owner).await;

    let (status, info) = app
        .patch_key(&owner, key.id, &json!({"rate_limit_per_minute": 5}))
        .await;
    assert_eq!(status, StatusCode::OK, "PATCH 5: {info}");
    assert_eq!(info["id"], key.id, "{info}");
    assert_eq!(info["rate_limit_per_minute"], 5, "{info}");
    assert_eq!(info["active"], true, "{info}");
    assert_eq!(info["name"], "rate limit test", "{info}");
    assert!(
        key.secret
            .starts_with(info["prefix"].as_str().unwrap_or("missing")),
        "prefix of {info}"
    );
    assert!(info["created_at"].is_string(), "created_at of {info}");
    assert!(info.get("last_used_at").is_some(), "last_used_at of {info}");
    assert!(
        info.get("api_key").is_none(),
        "PATCH leaks the secret: {info}"
    );
    tokio::time::sleep(key_cache_expiry(&app.config)).await;

    let body = event_body("limited");
    for attempt in 1..=5 {
        let response = app.post_logs_raw(&key.secret, body.clone()).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED, "request {attempt}");
        let limit = header_number(&response, "ratelimit-limit");
        assert_eq!(limit, 5, "RateLimit-Limit of request {attempt}");
    }
    let sixth = app.post_logs_raw(&key.secret, body.clone()).await;
    assert_eq!(sixth.status(), StatusCode::TOO_MANY_REQUESTS, "request 6");
    assert_eq!(
        header_number(&sixth, "ratelimit-limit"),
        5,
        "limit of the 429"
    );

    let raise = json!({"rate_limit_per_minute": 1000});
    let (status, response) = app.patch_key(&stranger, key.id, &raise).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "PATCH by another user: {response}"
    );
    let (status, response) = app.delete_key(&stranger, key.id).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "DELETE by another user: {response}"
    );

    for bad in [json!(0), json!(-1), json!("x"), json!(1.5)] {
        let body = json!({ "rate_limit_per_minute": bad });
        let (status, response) = app.patch_key(&owner, key.id, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {response}");
        assert_eq!(
            response["error"]["field"], "rate_limit_per_minute",
            "{body}: {response}"
        );
    }
    let (_, keys) = app.get_with_token("/api/keys/list/", &owner).await;
    assert_eq!(
        keys[0]["rate_limit_per_minute"], 5,
        "after rejected PATCHes"
    );
    assert_eq!(keys[0]["active"], true, "after another user's DELETE");

    let (status, info) = app
        .patch_key(&owner, key.id, &json!({"rate_limit_per_minute": null}))
        .await;
    assert_eq!(status, StatusCode::OK, "PATCH null: {info}");
    assert_eq!(info["rate_limit_per_minute"], Value::Null, "{info}");
    tokio::time::sleep(key_cache_expiry(&app.config)).await;
    let response = app.post_logs_raw(&key.secret, body).await;
    assert_eq!(
        header_number(&response, "ratelimit-limit"),
        DEFAULT_LIMIT,
        "RateLimit-Limit after PATCH null"
    );
    assert_eq!(
        response.status(),
        StatusCode::ACCEPTED,
        "the default limit has room again"
    );
    app.stop().await;
}

/// Posts with `key` every 25 ms until a 401 and returns the time from `since` to that 401,
/// or `None` after 3 s.
async fn time_until_unauthorized(app: &TestApp, key: &ApiKey, since: Instant) -> Option<Duration> {
    let body = event_body("after revocation");
    while since.elapsed() < Duration::from_secs(3) {
        let response = app.post_logs_raw(&key.secret, body.clone()).await;
        if response.status() == StatusCode::UNAUTHORIZED {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_key_fails_within_second() {
    let _shared = TIMING.read().await;
    let config = limit_config();
    let a = start_api(config.clone()).await;
    let b = start_api(config).await;
    let (_, access) = new_user(&a, "revoke").await;
    let key = new_key(&a, &access).await;
    for (name, app) in [("A", &a), ("B", &b)] {
        let response = app.post_logs_raw(&key.secret, event_body("before")).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED, "instance {name}");
    }

    let (status, body) = a.delete_key(&access, key.id).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "DELETE: {body}");
    let deleted = Instant::now();
    let (on_a, on_b) = tokio::join!(
        time_until_unauthorized(&a, &key, deleted),
        time_until_unauthorized(&b, &key, deleted)
    );
    println!("revoked key rejected after {on_a:?} on A, {on_b:?} on B");

    for (name, time) in [("A", on_a), ("B", on_b)] {
        let time = time.unwrap_or_else(|| panic!("instance {name} still accepts after 3 s"));
        assert!(
            time <= Duration::from_secs(1),
            "instance {name} accepted the revoked key for {time:?}"
        );
    }
    let (_, keys) = a.get_with_token("/api/keys/list/", &access).await;
    assert_eq!(keys[0]["id"], key.id, "{keys}");
    assert_eq!(keys[0]["active"], false, "listing after DELETE: {keys}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_count_down_and_agree() {
    let _alone = TIMING.write().await;
    let app = start_api(limit_config()).await;
    let (_, access) = new_user(&app, "headers").await;
    let key = new_key(&app, &access).await;
    set_limit(&app, &access, &key, json!(60)).await;
    let body = event_body("countdown");

    // With 60 a minute a slot comes back every second. Until a second has passed since the
    // first request, each request takes exactly one; later, a slot may come back between
    // two requests.
    let started = Instant::now();
    let mut previous: Option<u64> = None;
    let blocked = loop {
        let response = app.post_logs_raw(&key.secret, body.clone()).await;
        let received = started.elapsed();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            break response;
        }
        assert_eq!(response.status(), StatusCode::ACCEPTED, "at {received:?}");
        assert_eq!(header_number(&response, "ratelimit-limit"), 60);
        let reset = header_number(&response, "ratelimit-reset");
        assert!(reset >= 1, "RateLimit-Reset {reset} at {received:?}");
        assert!(reset <= 60, "RateLimit-Reset {reset} at {received:?}");

        let remaining = header_number(&response, "ratelimit-remaining");
        match previous {
            None => assert_eq!(remaining, 59, "RateLimit-Remaining of the first request"),
            Some(previous) if received < Duration::from_secs(1) => assert_eq!(
                Some(remaining),
                previous.checked_sub(1),
                "RateLimit-Remaining after {previous}, at {received:?}"
            ),
            Some(previous) => assert!(
                remaining + 1 == previous || remaining == previous,
                "RateLimit-Remaining {remaining} after {previous}, at {received:?}"
            ),
        }
        previous = Some(remaining);
        assert!(received < Duration::from_secs(30), "no 429 after 30 s");
    };
    println!("burst of 60 used up after {:?}", started.elapsed());

    let retry_after = header_number(&blocked, "retry-after");
    assert_eq!(retry_after, 1, "Retry-After of the first 429");
    assert_eq!(header_number(&blocked, "ratelimit-limit"), 60);
    assert_eq!(header_number(&blocked, "ratelimit-remaining"), 0);
    let reset = header_number(&blocked, "ratelimit-reset");
    assert!(
        reset >= retry_after,
        "RateLimit-Reset {reset} below Retry-After {retry_after}"
    );
    let (_, error) = read(blocked).await;
    assert_eq!(error["error"]["code"], "rate_limited", "{error}");

    let again = app.post_logs_raw(&key.secret, body.clone()).await;
    assert_eq!(
        again.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "request right after the 429"
    );
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let later = app.post_logs_raw(&key.secret, body).await;
    assert_eq!(
        later.status(),
        StatusCode::ACCEPTED,
        "request {retry_after} s after the 429"
    );
    app.stop().await;
}

/// Polls the limiter until it reaches Redis. Panics after 5 s.
async fn wait_for_redis(limiter: &Addr<RateLimiter>) {
    let started = Instant::now();
    loop {
        let ping = call(limiter, |reply| Ping { reply }, Duration::from_secs(1)).await;
        if matches!(ping, Ok(Ok(()))) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "RateLimiter did not reach Redis within 5 s: {ping:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends one consuming check and returns the decision with the time it arrived.
async fn timed_check(
    limiter: &Addr<RateLimiter>,
    subject: &str,
    limit: Limit,
) -> (Decision, Instant) {
    let build = |reply| Check {
        subject: subject.to_string(),
        limit,
        consume: true,
        reply,
    };
    let decision = call(limiter, build, Duration::from_secs(5))
        .await
        .expect("RateLimiter replied")
        .expect("RateLimiter decided");
    (decision, Instant::now())
}

#[actix_web::test]
async fn window_never_exceeds_limit_plus_burst() {
    let _shared = TIMING.read().await;
    const BURST: usize = 20;
    const LIMIT: Limit = Limit {
        per_minute: 600,
        burst: BURST as u32,
    };
    let interval = Duration::from_millis(100);
    let config = limit_config();
    let limiter = RateLimiter::new(
        config.redis,
        config.rate_limit,
        1024,
        logpipe::telemetry::Metrics::discarded(),
    )
    .start();
    wait_for_redis(&limiter).await;
    let subject = format!("test:window:{}", Uuid::new_v4().simple());

    let started = Instant::now();
    let burst = join_all((0..BURST).map(|_| timed_check(&limiter, &subject, LIMIT))).await;
    let burst_allowed = burst
        .iter()
        .filter(|(decision, _)| decision.allowed)
        .count();
    assert_eq!(burst_allowed, BURST, "checks allowed of {BURST} at once");
    let burst_degraded = burst
        .iter()
        .filter(|(decision, _)| decision.degraded)
        .count();
    assert_eq!(burst_degraded, 0, "burst checks decided without Redis");
    let (next, _) = timed_check(&limiter, &subject, LIMIT).await;
    assert!(!next.allowed, "check right after the burst: {next:?}");

    let mut allowed: Vec<Instant> = burst.iter().map(|(_, at)| *at).collect();
    while started.elapsed() < Duration::from_secs(4) {
        let (decision, at) = timed_check(&limiter, &subject, LIMIT).await;
        assert!(!decision.degraded, "decided without Redis: {decision:?}");
        if decision.allowed {
            allowed.push(at);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    println!("{} checks allowed in {elapsed:?}", allowed.len());

    // GCRA allows at most burst + W / interval in a window of length W, on Redis's clock.
    // The extra one absorbs the difference between Redis's clock and the time the reply
    // arrived here.
    for (first, start) in allowed.iter().enumerate() {
        for (last, end) in allowed.iter().enumerate().skip(first) {
            let window = *end - *start;
            let count = last - first + 1;
            let bound = BURST + window.as_micros().div_ceil(interval.as_micros()) as usize + 1;
            assert!(
                count <= bound,
                "{count} allowed within {window:?} (checks {first} to {last}), bound {bound}"
            );
        }
    }
    let expected = BURST + (elapsed.as_micros() / interval.as_micros()) as usize;
    assert!(
        allowed.len() + 2 >= expected,
        "only {} allowed in {elapsed:?}, expected about {expected}",
        allowed.len()
    );
}

/// A `redis-server` this test started on a free port. Dropping it kills the process.
struct RedisServer {
    port: u16,
    dir: PathBuf,
    process: Option<Child>,
}

impl RedisServer {
    async fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("free port")
            .port();
        let dir = std::env::temp_dir().join(format!("logpipe-redis-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("redis-server directory");
        let mut server = RedisServer {
            port,
            dir,
            process: None,
        };
        server.spawn().await;
        server
    }

    /// Returns the URL of database `db` of this server.
    fn url(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the process, without persistence, and waits until it responds to PING.
    async fn spawn(&mut self) {
        let process = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server started (is it on PATH?)");
        self.process = Some(process);

        let started = Instant::now();
        while db_size(&self.url(0)).await.is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "redis-server on port {} did not respond within 5 s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the process with SIGKILL and reaps it.
    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Returns the number of keys in the Redis database at `url`, or `None` when it does not
/// respond within a second.
async fn db_size(url: &str) -> Option<i64> {
    let query = async {
        let client = redis::Client::open(url).ok()?;
        let mut connection = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("DBSIZE")
            .query_async::<i64>(&mut connection)
            .await
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(1), query)
        .await
        .ok()
        .flatten()
}

/// Posts with a probe key on each instance until the Redis at `url` contains a limiter
/// state for both probes, which shows that both instances decide in that Redis again. The
/// database must contain no state of the probes at the call. Returns the time it took, or
/// `None` after 10 s.
async fn wait_until_shared(
    apps: [&TestApp; 2],
    probes: [&ApiKey; 2],
    url: &str,
) -> Option<Duration> {
    let started = Instant::now();
    let baseline = db_size(url).await.unwrap_or_default();
    while started.elapsed() < Duration::from_secs(10) {
        for (app, probe) in apps.iter().zip(probes) {
            app.post_logs_raw(&probe.secret, event_body("probe")).await;
        }
        if db_size(url).await.unwrap_or_default() >= baseline + 2 {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_limits_locally() {
    let _alone = TIMING.write().await;
    const REQUESTS: usize = 30;
    const LIMIT: usize = 20;
    let mut redis = RedisServer::start().await;
    let mut config = limit_config();
    config.redis.url = redis.url(0);
    let a = start_api(config.clone()).await;
    let b = start_api(config).await;
    let (_, access) = new_user(&a, "outage").await;
    let key = new_key(&a, &access).await;
    let probe_a = new_key(&a, &access).await;
    let probe_b = new_key(&a, &access).await;
    let probes = [&probe_a, &probe_b];
    set_limit(&a, &access, &key, json!(LIMIT)).await;
    let client = burst_client(REQUESTS);

    let waited = wait_until_shared([&a, &b], probes, &redis.url(0)).await;
    assert!(
        waited.is_some(),
        "instances not deciding in Redis after 10 s"
    );
    let shared = post_all_at_once(&client, &[&a, &b], &key, REQUESTS).await;
    assert!(shared.server_errors.is_empty(), "Redis up: {shared:?}");
    assert_eq!(
        shared.accepted, LIMIT,
        "Redis up, both instances: {shared:?}"
    );

    redis.kill();
    // Each instance goes on from the last state Redis reported to it, so the used-up key
    // gets at most what the instance saw remaining: together never more than the limit.
    let mut after_outage = 0;
    for (name, app) in [("A", &a), ("B", &b)] {
        let exhausted = post_all_at_once(&client, &[app], &key, REQUESTS).await;
        assert!(
            exhausted.server_errors.is_empty(),
            "Redis down, {name}: {exhausted:?}"
        );
        after_outage += exhausted.accepted;
    }
    assert!(
        after_outage <= LIMIT,
        "Redis down, used-up key allowed {after_outage} more over both instances"
    );
    // A fresh key gets its limit once per instance.
    let fresh = new_key(&a, &access).await;
    set_limit(&a, &access, &fresh, json!(LIMIT)).await;
    for (name, app) in [("A", &a), ("B", &b)] {
        let local = post_all_at_once(&client, &[app], &fresh, REQUESTS).await;
        println!("Redis down, instance {name}: {local:?}");
        assert!(
            local.server_errors.is_empty(),
            "Redis down, {name}: {local:?}"
        );
        assert!(local.other.is_empty(), "Redis down, {name}: {local:?}");
        assert!(
            local.accepted <= LIMIT + 1,
            "Redis down, {name} allowed {} of {REQUESTS}",
            local.accepted
        );
        assert!(
            local.accepted >= 1,
            "Redis down, {name} allowed none: {local:?}"
        );
    }

    redis.spawn().await;
    let key = new_key(&a, &access).await;
    set_limit(&a, &access, &key, json!(LIMIT)).await;
    let waited = wait_until_shared([&a, &b], probes, &redis.url(0)).await;
    println!("both instances decide in the restarted Redis after {waited:?}");
    assert!(
        waited.is_some(),
        "instances not back on Redis 10 s after its restart"
    );
    let shared = post_all_at_once(&client, &[&a, &b], &key, REQUESTS).await;
    assert!(shared.server_errors.is_empty(), "Redis back: {shared:?}");
    assert_eq!(
        shared.accepted, LIMIT,
        "Redis back, both instances: {shared:?}"
    );

    a.stop().await;
    b.stop().await;
}

/// Sends a login and returns the response.
async fn login_raw(app: &TestApp, username: &str, password: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/auth/login/"))
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .expect("request sent")
}

/// Sends `count` logins with a wrong password at once, expects 401 for each, and returns
/// the time they took. At once, because each one hashes a password, and one after the other
/// they could take longer than the interval after which a failure stops counting.
async fn fail_logins(app: &TestApp, username: &str, count: usize) -> Duration {
    let started = Instant::now();
    let attempts = (0..count).map(|_| login_raw(app, username, "wrong password!"));
    for (attempt, response) in join_all(attempts).await.into_iter().enumerate() {
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "failed login {} of {count} for {username}",
            attempt + 1
        );
    }
    started.elapsed()
}

/// Checks a 429 login response: `Retry-After` from 1 s to one emission interval of
/// `per_minute`, and the `rate_limited` error code.
async fn expect_login_limited(response: reqwest::Response, per_minute: u64, case: &str) {
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS, "{case}");
    let retry_after = header_number(&response, "retry-after");
    assert!(retry_after >= 1, "{case}: Retry-After {retry_after}");
    assert!(
        retry_after <= 60 / per_minute,
        "{case}: Retry-After {retry_after} above {} s",
        60 / per_minute
    );
    let (_, body) = read(response).await;
    assert_eq!(body["error"]["code"], "rate_limited", "{case}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_failures_limited() {
    let _shared = TIMING.read().await;
    // Every login here comes from 127.0.0.1, so a Redis of its own keeps this test's
    // per-address count apart from the failed logins of other tests.
    let redis = RedisServer::start().await;
    let mut config = limit_config();
    config.redis.url = redis.url(0);
    let app = start_api(config.clone()).await;

    let happy = app.signup("happy").await;
    for attempt in 1..=20 {
        let response = login_raw(&app, &happy, PASSWORD).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "successful login {attempt}"
        );
    }

    let target = app.signup("target").await;
    let took = fail_logins(&app, &target, 10).await;
    let eleventh = login_raw(&app, &target, PASSWORD).await;
    let case = format!("right password after 10 failures in {took:?}");
    expect_login_limited(eleventh, 10, &case).await;
    app.stop().await;

    // A second database starts the per-address count from zero.
    config.redis.url = redis.url(1);
    config.rate_limit.login_failures_per_minute = 5;
    let app = start_api(config).await;
    let users = [
        app.signup("first").await,
        app.signup("second").await,
        app.signup("third").await,
    ];
    let (first, second) = tokio::join!(
        fail_logins(&app, &users[0], 3),
        fail_logins(&app, &users[1], 2)
    );
    let took = first.max(second);
    let fresh_user = login_raw(&app, &users[2], PASSWORD).await;
    let case = format!("user without failures, 5 from the address in {took:?}");
    expect_login_limited(fresh_user, 5, &case).await;
    let second_user = login_raw(&app, &users[1], PASSWORD).await;
    let case = format!("user with 2 failures, 5 from the address in {took:?}");
    expect_login_limited(second_user, 5, &case).await;
    app.stop().await;
}

//! Shared helpers for the integration tests: a logpipe started in-process against the real
//! PostgreSQL, Redis and Kafka-compatible broker (as `scripts/services` starts them, or as
//! the `LOGPIPE_*` variables point), and an HTTP client for it.
//!
//! Each app gets its own topic and consumer group, and each test its own users, so tests
//! can run in parallel against the same services.

#![allow(dead_code)]

pub mod load;
pub mod process;
pub mod server;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use logpipe::app::{self, Role};
use logpipe::config::Config;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_postgres::NoTls;
use uuid::Uuid;

/// Signs the tests' JWTs, so that a test can forge tokens with the same secret.
pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// A password every test user shares.
pub const PASSWORD: &str = "correct horse battery staple";

/// Builds the configuration a test app starts from: defaults, the `LOGPIPE_*` variables, a free
/// port, and a topic and group of its own.
pub fn test_config() -> Config {
    let mut config = Config::load(None, std::env::vars()).expect("test configuration");
    let suffix = Uuid::new_v4().simple().to_string();
    config.http.listen = "127.0.0.1:0".into();
    config.http.workers = 2;
    config.kafka.topic = format!("logpipe.test.{suffix}");
    config.kafka.dead_letter_topic = format!("logpipe.test.{suffix}.dlq");
    config.consumer.group_id = format!("logpipe-test-{suffix}");
    config.auth.jwt_secret = JWT_SECRET.into();
    config.db_writer.flush_interval_ms = 50;
    config.postgres.pool_size = 8;
    config
}

/// A running logpipe in a thread of its own, with its own actix system.
pub struct TestApp {
    pub base: String,
    pub config: Config,
    pub client: reqwest::Client,
    handle: ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestApp {
    /// Starts logpipe with every role and the default test configuration.
    pub async fn start() -> TestApp {
        Self::start_with(test_config(), Role::All).await
    }

    pub async fn start_with(config: Config, role: Role) -> TestApp {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let app_config = config.clone();
        let thread = std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                let running = match app::start(app_config, role, false).await {
                    Ok(running) => running,
                    Err(err) => {
                        let _ = sender.send(Err(format!("{err:#}")));
                        return;
                    }
                };
                let _ = sender.send(Ok((running.addr, running.handle())));
                if let Err(err) = running.wait().await {
                    eprintln!("test app stopped with an error: {err:#}");
                }
            });
        });
        let (addr, handle) = receiver
            .await
            .expect("app thread ended")
            .unwrap_or_else(|err| panic!("logpipe did not start: {err}"));
        TestApp {
            base: format!("http://{addr}"),
            config,
            client: reqwest::Client::new(),
            handle,
            thread: Some(thread),
        }
    }

    /// Stops the app gracefully and waits for its thread.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .expect("join task")
                .expect("app thread panicked");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request sent");
        read(response).await
    }

    pub async fn get_with_token(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request sent");
        read(response).await
    }

    /// Signs up a new user with a unique name and returns the name.
    pub async fn signup(&self, stem: &str) -> String {
        let username = format!("{stem}_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let body = json!({
            "username": username,
            "email": format!("{username}@example.com"),
            "password": PASSWORD,
        });
        let (status, response) = self.post_json("/api/auth/signup/", &body).await;
        assert_eq!(status, StatusCode::CREATED, "signup failed: {response}");
        username
    }

    /// Logs in and returns `(access, refresh)`.
    pub async fn login(&self, username: &str) -> (String, String) {
        let body = json!({"username": username, "password": PASSWORD});
        let (status, response) = self.post_json("/api/auth/login/", &body).await;
        assert_eq!(status, StatusCode::OK, "login failed: {response}");
        (
            response["access"]
                .as_str()
                .expect("access token")
                .to_string(),
            response["refresh"]
                .as_str()
                .expect("refresh token")
                .to_string(),
        )
    }

    /// Creates an API key with the access token and returns the whole response.
    pub async fn create_key(&self, access: &str, name: &str) -> Value {
        let response = self
            .client
            .post(self.url("/api/key/"))
            .bearer_auth(access)
            .json(&json!({"name": name}))
            .send()
            .await
            .expect("request sent");
        let (status, body) = read(response).await;
        assert_eq!(status, StatusCode::CREATED, "key creation failed: {body}");
        body
    }

    /// Signs up, logs in and creates a key; returns `(username, access token, api key)`.
    pub async fn user_with_key(&self, stem: &str) -> (String, String, String) {
        let username = self.signup(stem).await;
        let (access, _) = self.login(&username).await;
        let key = self.create_key(&access, "test key").await;
        let secret = key["api_key"].as_str().expect("api_key").to_string();
        (username, access, secret)
    }

    /// Posts a logs body with an API key and returns the raw response.
    pub async fn post_logs_raw(&self, api_key: &str, body: Vec<u8>) -> reqwest::Response {
        self.client
            .post(self.url("/api/logs/"))
            .header("API-KEY", api_key)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_logs(&self, api_key: &str, body: &Value) -> (StatusCode, Value) {
        let body = serde_json::to_vec(body).expect("json");
        read(self.post_logs_raw(api_key, body).await).await
    }

    /// Opens a connection to the test database.
    pub async fn db(&self) -> tokio_postgres::Client {
        connect_db(&self.config).await
    }
}

pub async fn connect_db(config: &Config) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&config.postgres.url, NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// Reads status and JSON body (`Null` when the body is not JSON).
pub async fn read(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let bytes = response.bytes().await.expect("response body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Looks up the id of a user by name.
pub async fn user_id(db: &tokio_postgres::Client, username: &str) -> i64 {
    db.query_one("SELECT id FROM users WHERE username = $1", &[&username])
        .await
        .expect("user exists")
        .get(0)
}

/// Number of stored events of a user.
pub async fn log_count(db: &tokio_postgres::Client, user_id: i64) -> i64 {
    db.query_one("SELECT count(*) FROM logs WHERE user_id = $1", &[&user_id])
        .await
        .expect("count logs")
        .get(0)
}

/// Waits until the user has at least `expected` rows, or `timeout` passed; returns the
/// last count seen.
pub async fn wait_for_rows(
    db: &tokio_postgres::Client,
    user_id: i64,
    expected: i64,
    timeout: Duration,
) -> i64 {
    let started = Instant::now();
    loop {
        let count = log_count(db, user_id).await;
        if count >= expected || started.elapsed() > timeout {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lists the real-log samples shipped with the tests.
pub fn loghub_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loghub");
    ["apache", "hdfs", "linux", "openssh", "zookeeper"]
        .iter()
        .map(|name| dir.join(format!("{name}.ndjson")))
        .collect()
}

/// Reads every event of a sample file as a JSON value.
pub fn read_ndjson(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("fixture readable")
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).expect("fixture line is JSON"))
        .collect()
}

/// Builds a small valid event.
pub fn event(message: &str) -> Value {
    json!({"service_name": "checkout", "log_level": "info", "message": message})
}

impl TestApp {
    /// Sends `PATCH /api/keys/{key_id}/` with the access token and returns status and body.
    pub async fn patch_key(&self, access: &str, key_id: i64, body: &Value) -> (StatusCode, Value) {
        let response = self
            .client
            .patch(self.url(&format!("/api/keys/{key_id}/")))
            .bearer_auth(access)
            .json(body)
            .send()
            .await
            .expect("request sent");
        read(response).await
    }

    /// Sends `DELETE /api/keys/{key_id}/` with the access token and returns status and body.
    pub async fn delete_key(&self, access: &str, key_id: i64) -> (StatusCode, Value) {
        let response = self
            .client
            .delete(self.url(&format!("/api/keys/{key_id}/")))
            .bearer_auth(access)
            .send()
            .await
            .expect("request sent");
        read(response).await
    }

    /// Polls `GET /readyz` until it returns 200. Panics with the last body after `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) {
        let started = Instant::now();
        loop {
            let response = self
                .client
                .get(self.url("/readyz"))
                .send()
                .await
                .expect("request sent");
            let (status, body) = read(response).await;
            if status == StatusCode::OK {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "{} not ready after {timeout:?}: {status} {body}",
                self.base
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Writes `payloads` straight to the app's topic with message key `key`, as a program
/// other than logpipe could, and waits until the broker acknowledged each.
pub async fn produce_raw(config: &Config, key: &str, payloads: &[Vec<u8>]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .create()
        .expect("producer");
    for payload in payloads {
        let record = FutureRecord::<str, [u8]>::to(&config.kafka.topic)
            .key(key)
            .payload(payload);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("message delivered");
    }
}

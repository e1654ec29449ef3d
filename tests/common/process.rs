//! The `logpipe` binary run as a child process, for the tests that kill or signal it.
//!
//! The child gets every setting of a [`Config`] as a `LOGPIPE_<SECTION>_<KEY>` variable,
//! with a port of its own. It runs in the temporary directory, so no configuration file
//! applies. Its log lines are kept and echoed to the test output with the child's name.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use logpipe::app::Role;
use logpipe::config::{Config, ENV_PREFIX};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

use super::PASSWORD;

/// How long a child may take to respond to `/healthz` after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `logpipe serve` child process. Dropping it sends SIGKILL.
pub struct ChildApp {
    pub name: String,
    pub base: String,
    pub pid: u32,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl ChildApp {
    /// Spawns `logpipe serve --role ROLE` with `config` on a free port and waits until
    /// `/healthz` returns 200.
    pub async fn start(name: &str, config: &Config, role: Role) -> ChildApp {
        Self::start_with_env(name, config, role, &[]).await
    }

    /// Like [`ChildApp::start`], with extra environment variables for the child.
    pub async fn start_with_env(
        name: &str,
        config: &Config,
        role: Role,
        env: &[(&str, &str)],
    ) -> ChildApp {
        let mut config = config.clone();
        config.http.listen = format!("127.0.0.1:{}", free_port());
        let role_name = match role {
            Role::All => "all",
            Role::Api => "api",
            Role::Consumer => "consumer",
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_logpipe"))
            .args(["serve", "--role", role_name])
            .env_remove("LOGPIPE_CONFIG")
            .envs(config_env(&config))
            .envs(env.iter().copied())
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the logpipe binary");
        let pid = child.id().expect("child pid");
        let logs = Arc::new(Mutex::new(Vec::new()));
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(collect_lines(name.to_string(), stdout, Arc::clone(&logs)));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(collect_lines(name.to_string(), stderr, Arc::clone(&logs)));
        }
        let mut app = ChildApp {
            name: name.to_string(),
            base: format!("http://{}", config.http.listen),
            pid,
            child,
            logs,
        };
        app.wait_healthy().await;
        app
    }

    async fn wait_healthy(&mut self) {
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before /healthz returned 200; its output:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            let response = client.get(format!("{}/healthz", self.base)).send().await;
            if response.is_ok_and(|response| response.status() == StatusCode::OK) {
                return;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "{} timed out: /healthz did not return 200 within {START_TIMEOUT:?}; its output:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGKILL and waits until the process is gone.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL the child");
    }

    /// Sends SIGTERM to this child's pid only.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed: {status}", self.pid);
    }

    /// Waits up to `timeout` for the process to exit. Returns `None` when it still runs.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .map(|status| status.expect("wait for the child"))
    }

    /// Returns the lines the child wrote to stdout and stderr so far.
    pub fn log_text(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }
}

async fn collect_lines(
    name: String,
    output: impl AsyncRead + Unpin,
    logs: Arc<Mutex<Vec<String>>>,
) {
    let mut lines = BufReader::new(output).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[{name}] {line}");
        logs.lock().expect("logs").push(line);
    }
}

/// Returns a port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a free port")
        .port()
}

/// Turns every setting of `config` into its `LOGPIPE_<SECTION>_<KEY>` variable.
pub fn config_env(config: &Config) -> Vec<(String, String)> {
    let table = toml::Table::try_from(config).expect("configuration as TOML");
    let mut vars = Vec::new();
    for (section, keys) in table {
        let toml::Value::Table(keys) = keys else {
            continue;
        };
        for (key, value) in keys {
            let name = format!(
                "{ENV_PREFIX}{}_{}",
                section.to_ascii_uppercase(),
                key.to_ascii_uppercase()
            );
            let value = match value {
                toml::Value::String(text) => text,
                other => other.to_string(),
            };
            vars.push((name, value));
        }
    }
    vars
}

/// Signs up a new user through the API at `base`, logs in and creates an API key.
/// Returns `(username, api key)`.
pub async fn user_with_key_at(base: &str, stem: &str) -> (String, String) {
    let client = reqwest::Client::new();
    let username = format!("{stem}_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let signup = json!({
        "username": username,
        "email": format!("{username}@example.com"),
        "password": PASSWORD,
    });
    let response = client
        .post(format!("{base}/api/auth/signup/"))
        .json(&signup)
        .send()
        .await
        .expect("signup sent");
    assert_eq!(response.status(), StatusCode::CREATED, "signup at {base}");

    let login = json!({"username": username, "password": PASSWORD});
    let (status, tokens) = super::read(
        client
            .post(format!("{base}/api/auth/login/"))
            .json(&login)
            .send()
            .await
            .expect("login sent"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "login at {base}: {tokens}");
    let access = tokens["access"].as_str().expect("access token");

    let (status, key) = super::read(
        client
            .post(format!("{base}/api/key/"))
            .bearer_auth(access)
            .json(&json!({"name": "test key"}))
            .send()
            .await
            .expect("key request sent"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "key creation at {base}: {key}");
    let secret = key["api_key"].as_str().expect("api_key").to_string();
    (username, secret)
}

//! Servers that a fault test starts, kills and starts again on the same port: its own
//! broker or Redis, so that killing it disturbs no other test.
//!
//! A [`ServerProcess`] runs in a fresh directory of its own with its output appended to
//! `server.log` there. Dropping it kills the process it started (never another one),
//! prints the end of the log when the test is panicking, and removes the directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// How long a started server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Lines of the server log printed when a start fails or the test panics.
const LOG_TAIL_LINES: usize = 30;

/// A server process that the test owns, as the module documentation describes.
pub struct ServerProcess {
    program: String,
    args: Vec<String>,
    removed_env: Vec<String>,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    /// Prepares `program args` to listen on `127.0.0.1:port`, with a fresh empty
    /// directory as its working directory. Nothing runs until [`ServerProcess::start`].
    pub fn new(program: &str, args: &[String], port: u16) -> ServerProcess {
        let dir =
            std::env::temp_dir().join(format!("logpipe-{program}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("server directory created");
        ServerProcess {
            program: program.to_string(),
            args: args.to_vec(),
            removed_env: Vec::new(),
            port,
            dir,
            child: None,
        }
    }

    /// Removes these variables from the server's environment.
    pub fn without_env(mut self, names: &[&str]) -> ServerProcess {
        self.removed_env
            .extend(names.iter().map(|name| name.to_string()));
        self
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the server's working directory, which is removed when this value is dropped.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts the process and waits until its port accepts connections. Panics with the
    /// end of the log when it exits first or does not listen within 15 s.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.program);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("server log opened");
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("server log cloned"))
            .stderr(log);
        for name in &self.removed_env {
            command.env_remove(name);
        }
        let child = command.spawn().unwrap_or_else(|err| {
            panic!("failed to start {} (is it on PATH?): {err}", self.program)
        });
        self.child = Some(child);
        self.wait_until_listening().await;
    }

    async fn wait_until_listening(&mut self) {
        let started = Instant::now();
        let address = format!("127.0.0.1:{}", self.port);
        loop {
            if tokio::net::TcpStream::connect(&address).await.is_ok() {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                panic!(
                    "{} on port {} exited with {status} before listening:\n{}",
                    self.program,
                    self.port,
                    self.log_tail()
                );
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "{} not listening on port {} after {START_TIMEOUT:?}:\n{}",
                self.program,
                self.port,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the process with SIGKILL and reaps it. Does nothing when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// Returns the last lines of the server log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(LOG_TAIL_LINES);
        lines[start..].join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "end of the {} log (port {}):\n{}",
                self.program,
                self.port,
                self.log_tail()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

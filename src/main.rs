//! The `logpipe` command: `serve`, `migrate` and `replay`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use logpipe::app::{self, Role};
use logpipe::config::Config;
use logpipe::replay::{self, ReplayOptions};
use logpipe::{db, telemetry};

/// jemalloc in place of glibc's malloc. In the load run of `BENCHMARKS.md`, glibc's malloc
/// and free took about 29 % of logpipe's CPU samples, and its per-thread arenas raised the
/// peak resident memory.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Log ingestion: REST to Kafka to PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "logpipe", version)]
struct Cli {
    /// Configuration file. Without it, `config/logpipe.toml` is read when it exists, and
    /// the built-in defaults otherwise.
    #[arg(long, global = true, env = "LOGPIPE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Applies migrations, then runs the API, the consumers, or both.
    Serve {
        /// Part of logpipe to run.
        #[arg(long, value_enum, default_value_t = Role::All)]
        role: Role,
    },
    /// Applies the database migrations and exits.
    Migrate,
    /// Posts NDJSON event files to a running logpipe and prints a summary.
    Replay {
        /// Base URL of logpipe.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The API key to send the events with.
        #[arg(long, env = "LOGPIPE_API_KEY", hide_env_values = true)]
        api_key: String,
        /// Events per request.
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Files of one JSON event per line.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Maximum time the last traces and logs may take to export after logpipe stopped.
const TELEMETRY_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("logpipe: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { role } => {
            let config = load_config(cli.config)?;
            let telemetry = telemetry::init(&config);
            let served = actix_web::rt::System::new().block_on(async move {
                let running = app::start(config, role, true).await?;
                running.wait().await
            });
            telemetry.shutdown(TELEMETRY_FLUSH_TIMEOUT);
            served
        }
        Command::Migrate => {
            let config = load_config(cli.config)?;
            let telemetry = telemetry::init(&config);
            let migrated = tokio_runtime()?.block_on(async {
                let pool = db::pool(&config.postgres)?;
                let applied = db::migrate(&pool).await?;
                println!("applied {} migration(s)", applied.len());
                Ok(())
            });
            telemetry.shutdown(TELEMETRY_FLUSH_TIMEOUT);
            migrated
        }
        Command::Replay {
            url,
            api_key,
            batch_size,
            concurrency,
            files,
        } => {
            let options = ReplayOptions {
                url,
                api_key,
                files,
                batch_size,
                concurrency,
                progress: true,
            };
            let summary = tokio_runtime()?.block_on(replay::run(options))?;
            println!("{summary}");
            match summary.failure() {
                Some(failure) => Err(anyhow::anyhow!(failure)),
                None => Ok(()),
            }
        }
    }
}

fn load_config(path: Option<PathBuf>) -> anyhow::Result<Config> {
    let default_path = PathBuf::from("config/logpipe.toml");
    let path = path.or_else(|| default_path.exists().then_some(default_path));
    Config::load(path.as_deref(), std::env::vars()).context("configuration error")
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

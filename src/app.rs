//! Assembles a running logpipe: pool, migrations, topic, actors and the HTTP server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Arbiter, Supervisor};
use actix_web::dev::{Server, ServerHandle, Service};
use actix_web::http::ConnectionType;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use tokio::sync::oneshot;
use tracing_actix_web::TracingLogger;

use crate::accounts::{Accounts, ApiKeyCache};
use crate::actors::consumer_supervisor::{ConsumerSupervisor, Stop};
use crate::actors::db_writer::DbWriter;
use crate::actors::kafka_producer::{Flush, KafkaProducer};
use crate::actors::rate_limiter::RateLimiter;
use crate::actors::SharedStatus;
use crate::auth::{self, TokenKeys};
use crate::config::Config;
use crate::http::{self, AppState, InFlightLimits};
use crate::telemetry::events::EventExporter;
use crate::telemetry::{self, Metrics, MetricsPipeline};
use crate::{db, kafka};

/// Parts of logpipe that a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The HTTP API and the consumers.
    All,
    /// The HTTP API only: accounts, keys and ingestion into Kafka.
    Api,
    /// The consumers only, plus `/healthz` and `/readyz`.
    Consumer,
}

impl Role {
    fn runs_api(self) -> bool {
        matches!(self, Role::All | Role::Api)
    }

    fn runs_consumers(self) -> bool {
        matches!(self, Role::All | Role::Consumer)
    }
}

/// A started logpipe; [`RunningApp::wait`] runs it until it is stopped.
pub struct RunningApp {
    /// The address the HTTP server listens on.
    pub addr: SocketAddr,
    server: Server,
    supervisor: Option<Addr<ConsumerSupervisor>>,
    producer: Option<Addr<KafkaProducer>>,
    shutdown_timeout: Duration,
    arbiters: Vec<Arbiter>,
    events: Option<EventExporter>,
    metrics: Arc<MetricsPipeline>,
}

impl RunningApp {
    /// Returns a handle that stops the HTTP server, and so the app, from any thread.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until the HTTP server stops, then stops the consumers after their current
    /// batch and flushes the producer, all within `http.shutdown_timeout_secs`.
    pub async fn wait(self) -> anyhow::Result<()> {
        let served = self.server.await;
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        if let Some(supervisor) = self.supervisor {
            let (reply, stopped) = oneshot::channel();
            if supervisor.send(Stop { reply }).await.is_ok()
                && tokio::time::timeout_at(deadline, stopped).await.is_err()
            {
                tracing::error!("consumers did not stop before the shutdown deadline");
            }
        }
        if let Some(producer) = self.producer {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (reply, flushed) = oneshot::channel();
            if producer
                .send(Flush {
                    timeout: remaining,
                    reply,
                })
                .await
                .is_ok()
            {
                let _ = flushed.await;
            }
        }
        if let Some(events) = self.events {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            events.shutdown(remaining).await;
        }
        let metrics = self.metrics;
        let remaining = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(500));
        let _ = web::block(move || metrics.shutdown(remaining)).await;
        for arbiter in self.arbiters {
            arbiter.stop();
        }
        tracing::info!("logpipe stopped");
        served.context("HTTP server failed")
    }
}

/// Starts logpipe in the current actix system. `handle_signals` lets SIGINT and SIGTERM
/// stop it gracefully.
pub async fn start(config: Config, role: Role, handle_signals: bool) -> anyhow::Result<RunningApp> {
    let config = Arc::new(config);
    let pool = db::pool(&config.postgres)?;
    db::migrate(&pool)
        .await
        .context("cannot apply migrations")?;
    if config.kafka.create_topic {
        kafka::ensure_topic(&config.kafka).await?;
    }
    let pipeline = Arc::new(MetricsPipeline::new(&config.telemetry)?);
    let metrics = pipeline.metrics.clone();
    metrics.watch_pool(pool.clone());
    let settings = &config.telemetry;
    let events = telemetry::signal_url(settings, telemetry::Signal::Events)
        .filter(|_| role.runs_consumers() && settings.export_events)
        .map(|url| EventExporter::start(settings, url, metrics.clone()));

    let mut arbiters = Vec::new();
    let (rate_limiter, producer, actor_statuses) = if role.runs_api() {
        let actors = start_api_actors(&config, &metrics, &mut arbiters)?;
        (
            Some(actors.rate_limiter),
            Some(actors.producer),
            actors.statuses,
        )
    } else {
        (None, None, Vec::new())
    };
    let supervisor = if role.runs_consumers() {
        Some(start_consumer_actors(
            &config,
            &pool,
            &metrics,
            events.clone(),
            &mut arbiters,
        ))
    } else {
        None
    };

    let draining = Arc::new(AtomicBool::new(false));
    let limits = InFlightLimits::new(&config.http);
    let state = web::Data::new(AppState {
        draining: Arc::clone(&draining),
        config: Arc::clone(&config),
        accounts: Accounts::new(pool),
        api_keys: ApiKeyCache::new(Duration::from_millis(config.auth.api_key_cache_ms)),
        tokens: token_keys(&config, role),
        dummy_password_hash: dummy_password_hash().await?,
        rate_limiter,
        producer: producer.clone(),
        actor_statuses,
        request_slots: Arc::clone(&limits.request_slots),
        body_budget_kib: Arc::clone(&limits.body_budget_kib),
        shed: AtomicU64::new(0),
        shed_logged_at_ms: AtomicU64::new(0),
        started: std::time::Instant::now(),
        supervisor: supervisor.clone(),
        metrics,
        prometheus: pipeline.registry.clone(),
    });
    let (server, addr) = http_server(&config, state, role)?;
    if handle_signals {
        actix_web::rt::spawn(stop_on_signal(server.handle(), draining));
    }
    tracing::info!(%addr, ?role, "logpipe listening");
    Ok(RunningApp {
        addr,
        server,
        supervisor,
        producer,
        shutdown_timeout: Duration::from_secs(config.http.shutdown_timeout_secs),
        arbiters,
        events,
        metrics: pipeline,
    })
}

/// The API's actors and their statuses for `/readyz`.
struct ApiActors {
    rate_limiter: Addr<RateLimiter>,
    producer: Addr<KafkaProducer>,
    statuses: Vec<(&'static str, SharedStatus)>,
}

fn start_api_actors(
    config: &Config,
    metrics: &Metrics,
    arbiters: &mut Vec<Arbiter>,
) -> anyhow::Result<ApiActors> {
    let producer =
        KafkaProducer::new(config, metrics.clone()).context("cannot create the Kafka producer")?;
    let producer_status = producer.status();
    let producer_arbiter = Arbiter::new();
    let producer = Supervisor::start_in_arbiter(&producer_arbiter.handle(), move |_| producer);
    arbiters.push(producer_arbiter);

    let limiter = RateLimiter::new(
        config.redis.clone(),
        config.rate_limit.clone(),
        config.mailbox.rate_limiter,
        metrics.clone(),
    );
    let limiter_status = limiter.status();
    let limiter_arbiter = Arbiter::new();
    let rate_limiter = Supervisor::start_in_arbiter(&limiter_arbiter.handle(), move |_| limiter);
    arbiters.push(limiter_arbiter);
    Ok(ApiActors {
        rate_limiter,
        producer,
        statuses: vec![
            ("kafka_producer", producer_status),
            ("rate_limiter", limiter_status),
        ],
    })
}

fn start_consumer_actors(
    config: &Arc<Config>,
    pool: &deadpool_postgres::Pool,
    metrics: &Metrics,
    events: Option<EventExporter>,
    arbiters: &mut Vec<Arbiter>,
) -> Addr<ConsumerSupervisor> {
    let arbiter = Arbiter::new();
    let writer = DbWriter::new(pool.clone(), config.mailbox.db_writer, metrics.clone());
    let writer = DbWriter::start_in_arbiter(&arbiter.handle(), |_| writer);
    let supervisor =
        ConsumerSupervisor::new(Config::clone(config), writer, metrics.clone(), events);
    let supervisor = ConsumerSupervisor::start_in_arbiter(&arbiter.handle(), |_| supervisor);
    arbiters.push(arbiter);
    supervisor
}

fn token_keys(config: &Config, role: Role) -> TokenKeys {
    if config.auth.jwt_secret.is_empty() && role.runs_api() {
        tracing::warn!(
            "auth.jwt_secret is not set: using a random secret, so tokens stop working when \
             logpipe restarts and are not accepted by other instances"
        );
    }
    TokenKeys::new(&config.auth, &TokenKeys::random_secret())
}

async fn dummy_password_hash() -> anyhow::Result<String> {
    let hash = web::block(|| auth::hash_password("logpipe dummy password for unknown users"))
        .await
        .context("password hashing task failed")?
        .map_err(|err| anyhow::anyhow!("cannot hash the dummy password: {err}"))?;
    Ok(hash)
}

fn http_server(
    config: &Config,
    state: web::Data<AppState>,
    role: Role,
) -> anyhow::Result<(Server, SocketAddr)> {
    let ingest = role.runs_api();
    let mut server = HttpServer::new(move || {
        let draining = Arc::clone(&state.draining);
        App::new()
            .app_data(state.clone())
            .wrap_fn(move |req, service| {
                let response = service.call(req);
                let draining = Arc::clone(&draining);
                async move {
                    let mut response = response.await?;
                    // Once shutdown began, keep-alive connections close after their
                    // response instead of carrying a request into a closing server.
                    if draining.load(Ordering::Relaxed) {
                        let head = response.response_mut().head_mut();
                        head.set_connection_type(ConnectionType::Close);
                    }
                    Ok(response)
                }
            })
            .wrap(actix_web::middleware::from_fn(
                http::metrics::record_request,
            ))
            .wrap(TracingLogger::<http::spans::RootSpan>::new())
            .configure(|cfg| http::routes(cfg, ingest))
    })
    .shutdown_timeout(config.http.shutdown_timeout_secs)
    .disable_signals();
    if config.http.workers > 0 {
        server = server.workers(config.http.workers);
    }
    let server = server
        .bind(&config.http.listen)
        .with_context(|| format!("cannot listen on http.listen = {}", config.http.listen))?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .context("the HTTP server has no address")?;
    Ok((server.run(), addr))
}

/// On SIGTERM or SIGINT: new ingest requests get 503, the server stops accepting
/// connections and finishes the requests in flight. A second signal exits at once.
async fn stop_on_signal(server: ServerHandle, draining: Arc<AtomicBool>) {
    if let Err(err) = wait_for_signal().await {
        tracing::error!(error = %err, "cannot listen for shutdown signals");
        return;
    }
    tracing::info!("shutdown signal received; finishing the requests in flight");
    draining.store(true, Ordering::Relaxed);
    actix_web::rt::spawn(async {
        if wait_for_signal().await.is_ok() {
            tracing::warn!("second shutdown signal received; exiting at once");
            std::process::exit(130);
        }
    });
    server.stop(true).await;
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

//! logpipe's own telemetry: logs to stdout (text or JSON), and, when an OTLP endpoint is
//! configured, traces, metrics, logs and the ingested events exported over OTLP/HTTP.
//!
//! Without `telemetry.otlp_endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) nothing is
//! exported and no exporter is built. Metrics are collected either way, for `GET /metrics`.
//! Exports run on their own threads and tasks with bounded queues. A collector that is
//! down costs one warning per outage and never slows or fails ingestion.

pub mod events;
pub mod metrics;
pub mod names;
mod otlp;
pub mod propagation;

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub use metrics::Metrics;
pub use otlp::{outage, signal_url, Signal};

use crate::config::{Config, LogConfig, TelemetryConfig};

/// Targets whose logs never go over OTLP: the exporters' own, which would feed back into
/// themselves.
const EXPORT_TARGETS: &[&str] = &[
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "opentelemetry_http",
    "reqwest",
    "hyper",
    "hyper_util",
    "h2",
    "tower",
];

/// Directives added to `log.level`: the OpenTelemetry SDK's own logs are quiet unless
/// something is wrong.
const QUIET_SDK: &str = "opentelemetry=warn,opentelemetry_sdk=warn,opentelemetry_otlp=warn";

/// Installed exporters of traces and of logpipe's own logs, which
/// [`Telemetry::shutdown`] flushes.
#[must_use = "call shutdown before exiting, or buffered telemetry is lost"]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    logger: Option<SdkLoggerProvider>,
}

/// True when at least one signal has an OTLP endpoint.
pub fn exporting(config: &TelemetryConfig) -> bool {
    [Signal::Traces, Signal::Metrics, Signal::Logs]
        .into_iter()
        .any(|signal| signal_url(config, signal).is_some())
}

/// Builds the resource of logpipe's own telemetry. `service.instance.id` is new for each
/// process, so that the series of two processes never mix.
fn resource(config: &TelemetryConfig) -> Resource {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let instance = INSTANCE.get_or_init(|| uuid::Uuid::new_v4().to_string());
    let mut builder = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attribute(KeyValue::new("service.instance.id", instance.clone()));
    if let Some(host) = host_name() {
        builder = builder.with_attribute(KeyValue::new("host.name", host));
    }
    builder.build()
}

fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
}

/// Builds the filter of the stdout logs: `RUST_LOG` when set, else `log.level`.
fn stdout_filter(level: &str) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{QUIET_SDK},{level}")))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber: stdout, plus OTLP traces and logs when an endpoint is
/// configured.
pub fn init(config: &Config) -> Telemetry {
    let settings = &config.telemetry;
    let mut layers = vec![stdout_layer(&config.log)];
    let mut problems = Vec::new();
    if exporting(settings) {
        opentelemetry::global::set_text_map_propagator(propagation::BoundedTraceContext::new());
    }

    let mut tracer = None;
    if let Some(url) = signal_url(settings, Signal::Traces) {
        match trace_layer(settings, url) {
            Ok((layer, provider)) => {
                layers.push(layer);
                tracer = Some(provider);
            }
            Err(err) => problems.push(format!("traces: {err}")),
        }
    }
    let mut logger = None;
    if let Some(url) = signal_url(settings, Signal::Logs) {
        match log_layer(config, url) {
            Ok((layer, provider)) => {
                layers.push(layer);
                logger = Some(provider);
            }
            Err(err) => problems.push(format!("logs: {err}")),
        }
    }

    if let Err(err) = tracing_subscriber::registry().with(layers).try_init() {
        eprintln!("logpipe: cannot install the log subscriber: {err}");
    }
    for problem in problems {
        tracing::error!(%problem, "cannot build an OTLP exporter; that signal is not exported");
    }
    if exporting(settings) {
        let url = |signal| signal_url(settings, signal).unwrap_or_else(|| "off".into());
        tracing::info!(
            traces = %url(Signal::Traces),
            metrics = %url(Signal::Metrics),
            logs = %url(Signal::Logs),
            protocol = %settings.otlp_protocol,
            "exporting telemetry over OTLP"
        );
    }
    Telemetry { tracer, logger }
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Builds the stdout layer: text or JSON, colored only on a terminal.
fn stdout_layer(log: &LogConfig) -> BoxedLayer {
    let stdout: BoxedLayer = if log.format == "json" {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        let ansi = std::io::stdout().is_terminal();
        tracing_subscriber::fmt::layer().with_ansi(ansi).boxed()
    };
    stdout.with_filter(stdout_filter(&log.level)).boxed()
}

/// Builds the layer that turns spans into OpenTelemetry spans, and its provider.
fn trace_layer(
    settings: &TelemetryConfig,
    url: String,
) -> Result<(BoxedLayer, SdkTracerProvider), opentelemetry_otlp::ExporterBuildError> {
    let exporter = otlp::span_exporter(settings, url)?;
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
        settings.trace_sample_ratio,
    )));
    let provider = SdkTracerProvider::builder()
        .with_resource(resource(settings))
        .with_sampler(sampler)
        .with_batch_exporter(exporter)
        .build();

    // Spans, with the events inside them, at INFO and above. The exporters' own are left
    // out, so that exporting cannot feed back into itself.
    let spans = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_targets(EXPORT_TARGETS.iter().map(|t| (*t, LevelFilter::OFF)));
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("logpipe"))
        .with_tracked_inactivity(false)
        .with_location(false)
        .with_filter(spans)
        .boxed();
    Ok((layer, provider))
}

/// Builds the layer that sends logpipe's own logs over OTLP, and its provider.
fn log_layer(
    config: &Config,
    url: String,
) -> Result<(BoxedLayer, SdkLoggerProvider), opentelemetry_otlp::ExporterBuildError> {
    let exporter = otlp::log_exporter(&config.telemetry, url)?;
    let provider = SdkLoggerProvider::builder()
        .with_resource(resource(&config.telemetry))
        .with_batch_exporter(exporter)
        .build();

    let mut filter = stdout_filter(&config.log.level);
    for target in EXPORT_TARGETS {
        if let Ok(directive) = format!("{target}=off").parse() {
            filter = filter.add_directive(directive);
        }
    }
    let layer = OpenTelemetryTracingBridge::new(&provider)
        .with_filter(filter)
        .boxed();
    Ok((layer, provider))
}

impl Telemetry {
    /// Exports what is buffered, traces and logs at once, within `timeout`, and stops the
    /// exporters.
    pub fn shutdown(self, timeout: Duration) {
        let tracer = self.tracer.map(|tracer| {
            std::thread::spawn(move || {
                if let Err(err) = tracer.shutdown_with_timeout(timeout) {
                    eprintln!("logpipe: cannot flush traces: {err}");
                }
            })
        });
        if let Some(logger) = self.logger {
            if let Err(err) = logger.shutdown_with_timeout(timeout) {
                eprintln!("logpipe: cannot flush logs: {err}");
            }
        }
        if let Some(tracer) = tracer {
            let _ = tracer.join();
        }
    }
}

/// The metrics of one running logpipe, their provider and the `/metrics` registry.
pub struct MetricsPipeline {
    pub metrics: Metrics,
    /// Present when `telemetry.prometheus` is on.
    pub registry: Option<prometheus::Registry>,
    provider: SdkMeterProvider,
}

impl MetricsPipeline {
    /// Builds the instruments with a Prometheus reader for `/metrics` and, when an endpoint
    /// is configured, a periodic OTLP reader.
    pub fn new(config: &TelemetryConfig) -> anyhow::Result<Self> {
        let mut builder = SdkMeterProvider::builder().with_resource(resource(config));
        let registry = if config.prometheus {
            let registry = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .without_scope_info()
                .build()
                .map_err(|err| anyhow::anyhow!("cannot build the /metrics exporter: {err}"))?;
            builder = builder.with_reader(exporter);
            Some(registry)
        } else {
            None
        };
        if let Some(url) = signal_url(config, Signal::Metrics) {
            let exporter = otlp::metric_exporter(config, url)
                .map_err(|err| anyhow::anyhow!("cannot build the OTLP metric exporter: {err}"))?;
            let reader = PeriodicReader::builder(exporter)
                .with_interval(Duration::from_millis(config.metric_interval_ms))
                .build();
            builder = builder.with_reader(reader);
        }
        let provider = builder.build();
        let meter = opentelemetry::metrics::MeterProvider::meter(&provider, "logpipe");
        Ok(Self {
            metrics: Metrics::new(&meter, config.metric_service_limit),
            registry,
            provider,
        })
    }

    /// Exports the last values within `timeout` and stops the readers. Blocks, so call it
    /// off the async threads.
    pub fn shutdown(&self, timeout: Duration) {
        if let Err(err) = self.provider.shutdown_with_timeout(timeout) {
            tracing::debug!(error = %err, "cannot flush metrics");
        }
    }
}

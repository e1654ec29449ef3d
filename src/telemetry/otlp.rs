//! OTLP/HTTP exporters for traces, metrics and logs, and the collector outage tracker.
//!
//! Each exporter is wrapped so that a failed export is reported once per outage instead of
//! once per batch, and never as an error the SDK logs again: while the collector is down,
//! telemetry is dropped and ingestion goes on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{LogBatch, LogExporter};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

use crate::config::TelemetryConfig;

/// Whether the collector is unreachable, shared by every exporter of the process.
#[derive(Debug, Default)]
pub struct Outage {
    down: AtomicBool,
}

/// Returns the process's tracker, since a process has one collector endpoint.
pub fn outage() -> &'static Outage {
    static OUTAGE: OnceLock<Outage> = OnceLock::new();
    OUTAGE.get_or_init(Outage::default)
}

impl Outage {
    /// Logs the first failure of an outage; later ones stay quiet until an export succeeds.
    pub fn failed(&self, signal: &str, error: &dyn std::fmt::Display) {
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: "logpipe::telemetry",
                signal,
                %error,
                "cannot export telemetry to the OTLP endpoint; dropping telemetry until it \
                 answers, ingestion goes on"
            );
        }
    }

    /// Ends an outage, if there was one.
    pub fn succeeded(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(target: "logpipe::telemetry", "telemetry export to the OTLP endpoint succeeds again");
        }
    }

    fn observe(&self, signal: &str, result: OTelSdkResult) -> OTelSdkResult {
        match result {
            Ok(()) => self.succeeded(),
            Err(err) => self.failed(signal, &err),
        }
        Ok(())
    }
}

/// Returns the URL of one signal: `OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT` when set, else the base
/// endpoint with the signal's path.
pub fn signal_url(base: &str, signal: &str) -> String {
    let variable = format!(
        "OTEL_EXPORTER_OTLP_{}_ENDPOINT",
        signal.to_ascii_uppercase()
    );
    if let Some(url) = std::env::var(variable)
        .ok()
        .filter(|url| !url.trim().is_empty())
    {
        return url;
    }
    format!("{}/v1/{signal}", base.trim().trim_end_matches('/'))
}

fn protocol(config: &TelemetryConfig) -> Protocol {
    if config.otlp_protocol == "http/json" {
        Protocol::HttpJson
    } else {
        Protocol::HttpBinary
    }
}

/// An exporter whose failures go to the outage tracker.
#[derive(Debug)]
pub struct Watched<E>(E);

impl<E: SpanExporter> SpanExporter for Watched<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        outage().observe("traces", self.0.export(batch).await)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

impl<E: LogExporter> LogExporter for Watched<E> {
    async fn export(&self, batch: LogBatch<'_>) -> OTelSdkResult {
        outage().observe("logs", self.0.export(batch).await)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

impl<E: PushMetricExporter> PushMetricExporter for Watched<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        outage().observe("metrics", self.0.export(metrics).await)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.0.temporality()
    }
}

type BuildResult<T> = Result<Watched<T>, opentelemetry_otlp::ExporterBuildError>;

pub fn span_exporter(config: &TelemetryConfig) -> BuildResult<opentelemetry_otlp::SpanExporter> {
    opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(signal_url(&config.otlp_endpoint, "traces"))
        .with_protocol(protocol(config))
        .with_timeout(Duration::from_millis(config.otlp_timeout_ms))
        .build()
        .map(Watched)
}

pub fn log_exporter(config: &TelemetryConfig) -> BuildResult<opentelemetry_otlp::LogExporter> {
    opentelemetry_otlp::LogExporter::builder()
        .with_http()
        .with_endpoint(signal_url(&config.otlp_endpoint, "logs"))
        .with_protocol(protocol(config))
        .with_timeout(Duration::from_millis(config.otlp_timeout_ms))
        .build()
        .map(Watched)
}

pub fn metric_exporter(
    config: &TelemetryConfig,
) -> BuildResult<opentelemetry_otlp::MetricExporter> {
    opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_endpoint(signal_url(&config.otlp_endpoint, "metrics"))
        .with_protocol(protocol(config))
        .with_timeout(Duration::from_millis(config.otlp_timeout_ms))
        .with_temporality(Temporality::Cumulative)
        .build()
        .map(Watched)
}

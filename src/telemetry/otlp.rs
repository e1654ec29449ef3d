//! OTLP/HTTP exporters for traces, metrics and logs, and the collector outage tracker.
//!
//! Each exporter is wrapped so that a failed export is reported once per outage of its
//! signal instead of once per batch, and never as an error the SDK logs again. While the
//! collector is down, telemetry is dropped and ingestion goes on.

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

/// A kind of telemetry with its own OTLP endpoint and outage state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
    /// logpipe's own logs.
    Logs,
    /// The stored events, sent as log records to the logs endpoint.
    Events,
}

impl Signal {
    const ALL: [Signal; 4] = [
        Signal::Traces,
        Signal::Metrics,
        Signal::Logs,
        Signal::Events,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
            Signal::Events => "events",
        }
    }

    /// Returns the OTLP path and the variable suffix of this signal's endpoint.
    fn otlp(self) -> (&'static str, &'static str) {
        match self {
            Signal::Traces => ("traces", "TRACES"),
            Signal::Metrics => ("metrics", "METRICS"),
            Signal::Logs | Signal::Events => ("logs", "LOGS"),
        }
    }
}

/// Whether exports of each signal fail, shared by every exporter of the process.
#[derive(Debug, Default)]
pub struct Outage {
    down: [AtomicBool; 4],
}

/// Returns the process's outage tracker; a process has one set of endpoints.
pub fn outage() -> &'static Outage {
    static OUTAGE: OnceLock<Outage> = OnceLock::new();
    OUTAGE.get_or_init(Outage::default)
}

impl Outage {
    fn flag(&self, signal: Signal) -> &AtomicBool {
        let index = Signal::ALL.iter().position(|s| *s == signal).unwrap_or(0);
        &self.down[index]
    }

    /// Logs the first failure of an outage of `signal`; later ones stay quiet until an
    /// export of that signal succeeds.
    pub fn failed(&self, signal: Signal, error: &dyn std::fmt::Display) {
        if !self.flag(signal).swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: "logpipe::telemetry",
                signal = signal.name(),
                %error,
                "cannot export telemetry to the OTLP endpoint; dropping it until an export \
                 succeeds, ingestion goes on"
            );
        }
    }

    /// Ends an outage of `signal`, if there was one.
    pub fn succeeded(&self, signal: Signal) {
        if self.flag(signal).swap(false, Ordering::Relaxed) {
            tracing::info!(
                target: "logpipe::telemetry",
                signal = signal.name(),
                "telemetry export to the OTLP endpoint succeeds again"
            );
        }
    }

    fn observe(&self, signal: Signal, result: OTelSdkResult) -> OTelSdkResult {
        match result {
            Ok(()) => self.succeeded(signal),
            Err(err) => self.failed(signal, &err),
        }
        Ok(())
    }
}

/// Returns the value of a variable, unless it is unset or blank.
fn variable(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

/// Returns the URL of one signal: `OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT` when set, else
/// `telemetry.otlp_endpoint` with the signal's path, else `None` (not exported).
pub fn signal_url(config: &TelemetryConfig, signal: Signal) -> Option<String> {
    let (path, suffix) = signal.otlp();
    if let Some(url) = variable(&format!("OTEL_EXPORTER_OTLP_{suffix}_ENDPOINT")) {
        return Some(url.trim().to_string());
    }
    let base = config.otlp_endpoint.trim();
    (!base.is_empty()).then(|| format!("{}/v1/{path}", base.trim_end_matches('/')))
}

/// Returns the headers of one signal's requests: `OTEL_EXPORTER_OTLP_HEADERS`, then
/// `OTEL_EXPORTER_OTLP_<SIGNAL>_HEADERS` for the same names, as comma-separated
/// `name=value` pairs with percent-encoded values.
pub fn signal_headers(signal: Signal) -> Vec<(String, String)> {
    let (_, suffix) = signal.otlp();
    let mut headers: Vec<(String, String)> = Vec::new();
    for name in [
        "OTEL_EXPORTER_OTLP_HEADERS".to_string(),
        format!("OTEL_EXPORTER_OTLP_{suffix}_HEADERS"),
    ] {
        let Some(list) = variable(&name) else {
            continue;
        };
        for (key, value) in parse_headers(&list) {
            headers.retain(|(existing, _)| !existing.eq_ignore_ascii_case(&key));
            headers.push((key, value));
        }
    }
    headers
}

/// Parses `name=value,name=value`, skipping pairs without a name or `=`.
fn parse_headers(list: &str) -> Vec<(String, String)> {
    list.split(',')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            let key = key.trim();
            (!key.is_empty()).then(|| (key.to_string(), percent_decode(value.trim())))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escape {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
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
        outage().observe(Signal::Traces, self.0.export(batch).await)
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
        outage().observe(Signal::Logs, self.0.export(batch).await)
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
        outage().observe(Signal::Metrics, self.0.export(metrics).await)
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

pub fn span_exporter(
    config: &TelemetryConfig,
    url: String,
) -> BuildResult<opentelemetry_otlp::SpanExporter> {
    opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_protocol(protocol(config))
        .with_timeout(Duration::from_millis(config.otlp_timeout_ms))
        .build()
        .map(Watched)
}

pub fn log_exporter(
    config: &TelemetryConfig,
    url: String,
) -> BuildResult<opentelemetry_otlp::LogExporter> {
    opentelemetry_otlp::LogExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_protocol(protocol(config))
        .with_timeout(Duration::from_millis(config.otlp_timeout_ms))
        .build()
        .map(Watched)
}

pub fn metric_exporter(
    config: &TelemetryConfig,
    url: String,
) -> BuildResult<opentelemetry_otlp::MetricExporter> {
    opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_protocol(protocol(config))
        .with_timeout(Duration::from_millis(config.otlp_timeout_ms))
        .with_temporality(Temporality::Cumulative)
        .build()
        .map(Watched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_split_and_decoded() {
        let headers = parse_headers("signoz-ingestion-key=abc%3D%3D, x-team = logs ,bad,=x");
        assert_eq!(
            headers,
            [
                ("signoz-ingestion-key".to_string(), "abc==".to_string()),
                ("x-team".to_string(), "logs".to_string()),
            ]
        );
    }
}

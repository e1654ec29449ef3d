//! OpenTelemetry export, checked against an OTLP/HTTP receiver of the test's own that
//! decodes the official protobuf messages, and `GET /metrics`.
//!
//! logpipe runs as a child process, because its tracing subscriber is global to a
//! process.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpResponse, HttpServer};
use common::process::{user_with_key_at, ChildApp};
use common::{connect_db, read_ndjson, test_config, user_id, wait_for_rows, TestApp};
use logpipe::app::Role;
use logpipe::telemetry::names;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The trace the test's requests continue, as a caller's `traceparent` would carry it.
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
/// A trace id a client sends inside one event.
const EVENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const EVENT_SPAN: &str = "b7ad6b7169203331";

/// What the receiver decoded, by signal.
#[derive(Default)]
struct Received {
    /// `(resource service.name, span)`.
    spans: Vec<(String, Span)>,
    metric_names: HashSet<String>,
    /// `(resource service.name, record)`.
    logs: Vec<(String, LogRecord)>,
    /// The `x-logpipe-test` header of each logs request.
    log_headers: Vec<Option<String>>,
    /// `service.instance.id` of every resource of logpipe's own telemetry.
    instances: HashSet<String>,
}

/// An OTLP/HTTP receiver on a free loopback port, in a thread with its own actix system.
struct Receiver {
    base: String,
    received: Arc<Mutex<Received>>,
    handle: ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn service_name(attributes: &[KeyValue]) -> String {
    string_attribute(attributes, "service.name")
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> String {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|value| match &value.value {
            Some(any_value::Value::StringValue(text)) => Some(text.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

async fn receive_traces(body: web::Bytes, received: web::Data<Mutex<Received>>) -> HttpResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut received = received.lock().expect("received");
    for resource in request.resource_spans {
        let attributes = resource.resource.unwrap_or_default().attributes;
        let service = service_name(&attributes);
        received
            .instances
            .insert(string_attribute(&attributes, "service.instance.id"));
        for scope in resource.scope_spans {
            for span in scope.spans {
                received.spans.push((service.clone(), span));
            }
        }
    }
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .finish()
}

async fn receive_metrics(body: web::Bytes, received: web::Data<Mutex<Received>>) -> HttpResponse {
    let Ok(request) = ExportMetricsServiceRequest::decode(body) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut received = received.lock().expect("received");
    for resource in request.resource_metrics {
        for scope in resource.scope_metrics {
            for metric in scope.metrics {
                received.metric_names.insert(metric.name);
            }
        }
    }
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .finish()
}

async fn receive_logs(
    http: actix_web::HttpRequest,
    body: web::Bytes,
    received: web::Data<Mutex<Received>>,
) -> HttpResponse {
    let Ok(request) = ExportLogsServiceRequest::decode(body) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut received = received.lock().expect("received");
    let header = http
        .headers()
        .get("x-logpipe-test")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    received.log_headers.push(header);
    for resource in request.resource_logs {
        let service = service_name(&resource.resource.unwrap_or_default().attributes);
        for scope in resource.scope_logs {
            for record in scope.log_records {
                received.logs.push((service.clone(), record));
            }
        }
    }
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .finish()
}

impl Receiver {
    async fn start() -> Receiver {
        let received = web::Data::new(Mutex::new(Received::default()));
        let shared = received.clone().into_inner();
        let (sender, ready) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(received.clone())
                        .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
                        .route("/v1/traces", web::post().to(receive_traces))
                        .route("/v1/metrics", web::post().to(receive_metrics))
                        .route("/v1/logs", web::post().to(receive_logs))
                })
                .workers(1)
                .disable_signals()
                .bind("127.0.0.1:0")
                .expect("bind the receiver");
                let addr = server.addrs()[0];
                let server = server.run();
                let _ = sender.send((addr, server.handle()));
                let _ = server.await;
            });
        });
        let (addr, handle) = ready.await.expect("receiver started");
        Receiver {
            base: format!("http://{addr}"),
            received: shared,
            handle,
            thread: Some(thread),
        }
    }

    /// Waits until `check` holds for what was received, or fails after `timeout`.
    async fn wait_for(&self, what: &str, timeout: Duration, check: impl Fn(&Received) -> bool) {
        let started = Instant::now();
        loop {
            if check(&self.received.lock().expect("received")) {
                return;
            }
            if started.elapsed() > timeout {
                let received = self.received.lock().expect("received");
                let spans: Vec<(String, String)> = received
                    .spans
                    .iter()
                    .map(|(service, span)| (service.clone(), span.name.clone()))
                    .collect();
                panic!(
                    "timed out waiting for {what}; spans {spans:?}, metrics {:?}, {} log records",
                    received.metric_names,
                    received.logs.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(mut self) {
        self.handle.stop(false).await;
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .expect("join task")
                .expect("receiver thread");
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Returns the spans of one trace, by name.
fn trace_spans(received: &Received, trace_id: &str) -> HashMap<String, Span> {
    received
        .spans
        .iter()
        .filter(|(_, span)| hex(&span.trace_id) == trace_id)
        .map(|(_, span)| (span.name.clone(), span.clone()))
        .collect()
}

const PIPELINE_SPANS: [&str; 5] = [
    "POST /api/logs/",
    "rate_limit.check",
    "kafka.publish",
    "kafka.consume",
    "db.insert",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_traces_metrics_and_event_logs_over_otlp() {
    let receiver = Receiver::start().await;
    let mut config = test_config();
    config.telemetry.otlp_endpoint = receiver.base.clone();
    config.telemetry.metric_interval_ms = 300;
    config.consumer.lag_sample_interval_ms = 300;
    let app = ChildApp::start_with_env(
        "otlp",
        &config,
        Role::All,
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_BLRP_SCHEDULE_DELAY", "200"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-logpipe-test=ingest%20key"),
        ],
    )
    .await;
    let (username, key) = user_with_key_at(&app.base, "otlp").await;
    let client = reqwest::Client::new();

    // Real Apache events, one of which carries its own trace context.
    let mut events: Vec<Value> = read_ndjson(&common::loghub_files()[0])
        .into_iter()
        .take(4)
        .collect();
    events[0]["trace_id"] = json!(EVENT_TRACE);
    events[0]["span_id"] = json!(EVENT_SPAN);
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let response = client
        .post(format!("{}/api/logs/", app.base))
        .header("API-KEY", &key)
        .header("traceparent", &traceparent)
        .json(&events)
        .send()
        .await
        .expect("ingest request");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    // A rejected request, so that the rejection metric has a series.
    let rejected = client
        .post(format!("{}/api/logs/", app.base))
        .header("API-KEY", &key)
        .json(&json!({"service_name": "apache"}))
        .send()
        .await
        .expect("invalid request");
    assert_eq!(rejected.status(), StatusCode::BAD_REQUEST);

    let db = connect_db(&config).await;
    let user = user_id(&db, &username).await;
    assert_eq!(
        wait_for_rows(&db, user, 4, Duration::from_secs(20)).await,
        4
    );
    let stored = db
        .query_one(
            "SELECT trace_id, span_id FROM logs WHERE user_id = $1 AND trace_id IS NOT NULL",
            &[&user],
        )
        .await
        .expect("the event with its own trace context");
    assert_eq!(stored.get::<_, String>(0), EVENT_TRACE);
    assert_eq!(stored.get::<_, String>(1), EVENT_SPAN);

    // One trace, continuing the caller's, contains every stage of the pipeline.
    receiver
        .wait_for("the pipeline spans", Duration::from_secs(30), |received| {
            let spans = trace_spans(received, CALLER_TRACE);
            PIPELINE_SPANS.iter().all(|name| spans.contains_key(*name))
        })
        .await;
    {
        let received = receiver.received.lock().expect("received");
        let spans = trace_spans(&received, CALLER_TRACE);
        let id = |name: &str| hex(&spans[name].span_id);
        let parent = |name: &str| hex(&spans[name].parent_span_id);
        assert_eq!(
            parent("POST /api/logs/"),
            CALLER_SPAN,
            "root continues the caller"
        );
        assert_eq!(parent("rate_limit.check"), id("POST /api/logs/"));
        assert_eq!(parent("kafka.publish"), id("POST /api/logs/"));
        assert_eq!(parent("kafka.consume"), id("kafka.publish"));
        assert_eq!(parent("db.insert"), id("kafka.consume"));
        assert!(received
            .spans
            .iter()
            .all(|(service, _)| service == "logpipe"));
        assert_eq!(received.instances.len(), 1, "one process, one instance id");
        assert!(!received.instances.contains(""));
    }

    // Every metric logpipe defines arrives.
    receiver
        .wait_for("every metric", Duration::from_secs(30), |received| {
            names::ALL
                .iter()
                .all(|name| received.metric_names.contains(*name))
        })
        .await;

    // Every stored event arrives as a log record under its own service, and logpipe's
    // own logs arrive under logpipe.
    receiver
        .wait_for(
            "the event log records",
            Duration::from_secs(30),
            |received| {
                let events = received
                    .logs
                    .iter()
                    .filter(|(service, _)| service == "apache")
                    .count();
                let own = received
                    .logs
                    .iter()
                    .any(|(service, _)| service == "logpipe");
                events >= 4 && own
            },
        )
        .await;
    {
        let received = receiver.received.lock().expect("received");
        let records: Vec<&LogRecord> = received
            .logs
            .iter()
            .filter(|(service, _)| service == "apache")
            .map(|(_, record)| record)
            .collect();
        let error = records
            .iter()
            .find(|record| record.severity_text == "error")
            .expect("the apache error event");
        assert_eq!(error.severity_number, 17);
        assert_eq!(
            error.body.as_ref().and_then(|body| body.value.clone()),
            Some(any_value::Value::StringValue(
                "mod_jk child workerEnv in error state 6".into()
            ))
        );
        assert_eq!(hex(&error.trace_id), CALLER_TRACE);
        let notice = records
            .iter()
            .find(|record| hex(&record.trace_id) == EVENT_TRACE)
            .expect("the event with its own trace context");
        assert_eq!(notice.severity_number, 10);
        assert_eq!(hex(&notice.span_id), EVENT_SPAN);
        // Every logs request, the event records' included, carries the configured header.
        assert!(!received.log_headers.is_empty());
        assert!(received
            .log_headers
            .iter()
            .all(|header| header.as_deref() == Some("ingest key")));
    }

    // With the receiver gone, ingestion goes on, and the outage is logged once per signal.
    receiver.stop().await;
    let more: Vec<Value> = (0..5)
        .map(|n| json!({"service_name": "apache", "log_level": "info", "message": format!("after {n}")}))
        .collect();
    for _ in 0..3 {
        let response = client
            .post(format!("{}/api/logs/", app.base))
            .header("API-KEY", &key)
            .json(&more)
            .send()
            .await
            .expect("ingest request");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    assert_eq!(
        wait_for_rows(&db, user, 19, Duration::from_secs(20)).await,
        19
    );
    // Several metric intervals pass with the endpoint down.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = app.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("cannot export telemetry"))
        .collect();
    assert!(!warnings.is_empty(), "the outage is logged:\n{log}");
    for signal in ["traces", "metrics", "logs", "events"] {
        let count = warnings
            .iter()
            .filter(|line| line.contains(&format!("signal=\"{signal}\"")))
            .count();
        assert!(count <= 1, "{count} warnings for {signal}:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_buffered_telemetry() {
    let receiver = Receiver::start().await;
    let mut config = test_config();
    config.telemetry.otlp_endpoint = receiver.base.clone();
    // Nothing is exported on a timer during the test, so what arrives was flushed at exit.
    config.telemetry.metric_interval_ms = 600_000;
    let mut app = ChildApp::start_with_env(
        "otlp-exit",
        &config,
        Role::All,
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            ("OTEL_BLRP_SCHEDULE_DELAY", "600000"),
        ],
    )
    .await;
    let (username, key) = user_with_key_at(&app.base, "otlpexit").await;
    let events: Vec<Value> = read_ndjson(&common::loghub_files()[1])
        .into_iter()
        .take(3)
        .collect();
    let response = reqwest::Client::new()
        .post(format!("{}/api/logs/", app.base))
        .header("API-KEY", &key)
        .json(&events)
        .send()
        .await
        .expect("ingest request");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let db = connect_db(&config).await;
    let user = user_id(&db, &username).await;
    assert_eq!(
        wait_for_rows(&db, user, 3, Duration::from_secs(20)).await,
        3
    );
    // The event records wait at most a second for their batch. The spans and metrics wait
    // for their timers, which do not fire before the exit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(receiver
        .received
        .lock()
        .expect("received")
        .metric_names
        .is_empty());

    app.terminate();
    let status = app.wait_exit(Duration::from_secs(30)).await;
    assert!(status.is_some_and(|status| status.success()), "{status:?}");
    let (spans_flushed, metrics_flushed, hdfs) = {
        let received = receiver.received.lock().expect("received");
        let hdfs = received
            .logs
            .iter()
            .filter(|(service, _)| service == "hdfs")
            .count();
        (
            received
                .spans
                .iter()
                .any(|(_, span)| span.name == "db.insert"),
            received.metric_names.contains(names::EVENTS_INGESTED),
            hdfs,
        )
    };
    receiver.stop().await;
    assert!(spans_flushed, "spans flushed at exit");
    assert!(metrics_flushed, "metrics flushed at exit");
    assert_eq!(hdfs, 3, "event records exported");
}

/// Parses Prometheus text exposition lines into `(series, value)`, failing on any line that
/// is not a comment, a blank line or a sample.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels in {line:?}");
        }
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        samples.push((series.to_string(), value));
    }
    samples
}

/// Sums the samples of `name` whose labels contain every `label="value"` of `labels`.
fn sum(samples: &[(String, f64)], name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            series.split('{').next() == Some(name)
                && labels.iter().all(|label| series.contains(label))
        })
        .map(|(_, value)| value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_page_parses_and_moves_with_traffic() {
    let app = TestApp::start().await;
    let (_, _, key) = app.user_with_key("metrics").await;
    let service = format!("svc-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);

    let scrape = || async {
        let response = app
            .client
            .get(app.url("/metrics"))
            .send()
            .await
            .expect("metrics request");
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()["content-type"]
            .to_str()
            .expect("content type")
            .to_string();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        parse_prometheus(&response.text().await.expect("metrics body"))
    };
    let ingested = "logpipe_events_ingested_total";
    let service_label = format!("service_name=\"{service}\"");
    let before = scrape().await;
    assert_eq!(sum(&before, ingested, &[&service_label]), 0.0);

    let events: Vec<Value> = ["error", "info", "info"]
        .iter()
        .map(|level| json!({"service_name": service, "log_level": level, "message": "m"}))
        .collect();
    let (status, _) = app.post_logs(&key, &json!(events)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _) = app.post_logs(&key, &json!({"message": "no service"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let after = scrape().await;
    assert_eq!(sum(&after, ingested, &[&service_label]), 3.0);
    assert_eq!(
        sum(&after, ingested, &[&service_label, "severity=\"ERROR\""]),
        1.0
    );
    let requests = "http_server_request_duration_seconds_count";
    let logs_route = "http_route=\"/api/logs/\"";
    assert!(
        sum(
            &after,
            requests,
            &[logs_route, "http_response_status_code=\"202\""]
        ) > sum(
            &before,
            requests,
            &[logs_route, "http_response_status_code=\"202\""]
        )
    );
    let rejected = "logpipe_ingest_rejected_total";
    assert!(
        sum(&after, rejected, &["reason=\"invalid_events\""])
            > sum(&before, rejected, &["reason=\"invalid_events\""])
    );
    let decisions = "logpipe_rate_limit_decisions_total";
    assert!(
        sum(&after, decisions, &["decision=\"allowed\""])
            >= sum(&before, decisions, &["decision=\"allowed\""]) + 2.0
    );
    assert!(sum(&after, "logpipe_kafka_publish_duration_seconds_count", &[]) >= 1.0);

    // The consumers write the rows, and the insert metrics follow.
    let started = Instant::now();
    loop {
        let samples = scrape().await;
        if sum(&samples, "logpipe_db_rows_written_total", &[])
            >= sum(&before, "logpipe_db_rows_written_total", &[]) + 3.0
        {
            assert!(sum(&samples, "logpipe_db_insert_duration_seconds_count", &[]) >= 1.0);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "rows written did not move"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // No label carries a key, a user or an event id.
    let text: String = after.iter().map(|(series, _)| series.as_str()).collect();
    assert!(!text.contains(&key));
    app.stop().await;
}

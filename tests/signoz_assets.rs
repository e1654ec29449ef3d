//! The SigNoz dashboard, alert rules and notification channels in `docker/signoz/`. Every
//! JSON file parses, every query names a metric logpipe emits and only attributes logpipe
//! sets on it, the dashboard has its panels, and each alert rule has a threshold, a window
//! and channels. No SigNoz is needed.
//!
//! The assets target SigNoz 0.92 and later, whose collector (the `signozclickhousemetrics`
//! exporter, the default since SigNoz 0.88) stores metric and attribute names as sent, dots
//! included. It stores a histogram as five series named with the suffixes in
//! [`HISTOGRAM_SUFFIXES`], and [`otel_name`] maps those names back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use logpipe::telemetry::names;
use serde_json::Value;

/// The metrics in [`names::ALL`] that are histograms.
const HISTOGRAMS: &[&str] = &[
    names::HTTP_REQUEST_DURATION,
    names::KAFKA_PUBLISH_DURATION,
    names::DB_BATCH_SIZE,
    names::DB_INSERT_DURATION,
];

/// Suffixes of the series SigNoz stores for one histogram: the per-`le` bucket counts, the
/// count, sum, minimum and maximum.
const HISTOGRAM_SUFFIXES: &[&str] = &[".bucket", ".count", ".sum", ".min", ".max"];

/// Resource attributes on every metric logpipe exports.
const RESOURCE_ATTRIBUTES: &[&str] = &["service.name"];

/// Keywords of SigNoz's filter syntax. Every other bare word in a filter is an attribute key.
const FILTER_KEYWORDS: &[&str] = &[
    "AND", "OR", "NOT", "IN", "EXISTS", "LIKE", "ILIKE", "CONTAINS", "REGEXP", "BETWEEN", "HAS",
    "HASANY", "HASALL", "TRUE", "FALSE",
];

/// Maps a metric name as SigNoz stores it to the OpenTelemetry instrument name logpipe
/// emits, or `None` when logpipe emits no such series.
///
/// Counters and gauges keep their name. A histogram is stored only under its name plus one
/// of [`HISTOGRAM_SUFFIXES`], so the bare histogram name maps to `None`. So do the
/// underscore forms of SigNoz before 0.88 and of `GET /metrics`, such as
/// `logpipe_events_ingested_total` or `http_server_request_duration_bucket`.
fn otel_name(stored: &str) -> Option<&'static str> {
    for suffix in HISTOGRAM_SUFFIXES {
        if let Some(base) = stored.strip_suffix(suffix) {
            if let Some(histogram) = HISTOGRAMS.iter().find(|name| **name == base) {
                return Some(histogram);
            }
        }
    }
    names::ALL
        .iter()
        .copied()
        .find(|name| *name == stored && !HISTOGRAMS.contains(name))
}

/// Returns the data point attributes logpipe sets on a metric.
fn attributes(metric: &str) -> &'static [&'static str] {
    match metric {
        names::HTTP_REQUEST_DURATION => &[
            "http.route",
            "http.request.method",
            "http.response.status_code",
        ],
        names::EVENTS_INGESTED => &["service_name", "severity"],
        names::RATE_LIMIT_DECISIONS => &["decision", "store"],
        names::KAFKA_PUBLISH_DURATION | names::DB_INSERT_DURATION => &["outcome"],
        names::KAFKA_CONSUMER_LAG => &["topic", "partition"],
        names::DB_POOL_CONNECTIONS => &["state"],
        names::ACTOR_MAILBOX_DEPTH | names::ACTOR_RESTARTS => &["actor"],
        names::INGEST_REJECTED | names::KAFKA_PUBLISH_FAILURES | names::EVENT_EXPORT_DROPPED => {
            &["reason"]
        }
        _ => &[],
    }
}

/// Returns the values an attribute can take, for the attributes with a closed set.
fn attribute_values(attribute: &str) -> Option<&'static [&'static str]> {
    match attribute {
        "severity" => Some(&["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"]),
        "decision" => Some(&["allowed", "blocked"]),
        "store" => Some(&["redis", "fallback"]),
        "outcome" => Some(&["ok", "error"]),
        "state" => Some(&["in_use", "idle"]),
        "actor" => Some(&["rate_limiter", "kafka_producer", "consumer", "db_writer"]),
        _ => None,
    }
}

/// One metric aggregation of a query builder query.
#[derive(Debug)]
struct MetricQuery {
    /// File and panel or rule, for messages.
    origin: String,
    /// Query name, such as `A`.
    name: String,
    /// Metric name as SigNoz stores it.
    metric: String,
    time_aggregation: String,
    space_aggregation: String,
    filter: String,
    group_by: Vec<String>,
}

/// A dashboard panel or an alert rule: its queries and formula expressions.
#[derive(Debug)]
struct Queries {
    origin: String,
    metrics: Vec<MetricQuery>,
    formulas: Vec<String>,
}

/// One comparison in a filter expression: the attribute key and its string literals.
#[derive(Debug, PartialEq)]
struct Comparison {
    key: String,
    values: Vec<String>,
}

/// The keys, literals and `$variables` of a filter expression.
#[derive(Debug, Default)]
struct Filter {
    comparisons: Vec<Comparison>,
    variables: Vec<String>,
}

fn signoz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/signoz")
}

/// Lists the JSON files under `dir`, recursively, sorted.
fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).unwrap_or_else(|err| panic!("read {dir:?}: {err}"));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            files.extend(json_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "json") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Reads and parses every JSON file in a subdirectory of `docker/signoz/`, by file name.
fn load(subdir: &str) -> BTreeMap<String, Value> {
    let files = json_files(&signoz_dir().join(subdir));
    assert!(!files.is_empty(), "docker/signoz/{subdir} has no JSON file");
    files
        .iter()
        .map(|path| {
            let name = format!("{subdir}/{}", path.file_name().unwrap().to_string_lossy());
            let text = std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{name}: {err}"));
            let value = serde_json::from_str(&text)
                .unwrap_or_else(|err| panic!("{name} is not valid JSON: {err}"));
            (name, value)
        })
        .collect()
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn array<'a>(value: &'a Value, pointer: &str) -> &'a [Value] {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Reads the metric aggregations of one query builder query, in either the dashboard
/// widget shape (`queryName`, `groupBy[].key`) or the alert rule shape (`name`,
/// `groupBy[].name`).
fn metric_queries(origin: &str, query: &Value) -> Vec<MetricQuery> {
    let name = query["queryName"].as_str().or(query["name"].as_str());
    let group_by: Vec<String> = array(query, "/groupBy")
        .iter()
        .map(|key| key["key"].as_str().or(key["name"].as_str()).unwrap_or(""))
        .map(str::to_string)
        .collect();
    array(query, "/aggregations")
        .iter()
        .map(|aggregation| MetricQuery {
            origin: origin.to_string(),
            name: name.unwrap_or("").to_string(),
            metric: text(aggregation, "/metricName").to_string(),
            time_aggregation: text(aggregation, "/timeAggregation").to_string(),
            space_aggregation: text(aggregation, "/spaceAggregation").to_string(),
            filter: text(query, "/filter/expression").to_string(),
            group_by: group_by.clone(),
        })
        .collect()
}

/// Returns the panels of a dashboard, rows left out.
fn dashboard_panels(file: &str, dashboard: &Value) -> Vec<Queries> {
    array(dashboard, "/widgets")
        .iter()
        .filter(|widget| widget["panelTypes"] != "row")
        .map(|widget| {
            let origin = format!("{file}, panel {:?}", text(widget, "/title"));
            let metrics = array(widget, "/query/builder/queryData")
                .iter()
                .flat_map(|query| metric_queries(&origin, query))
                .collect();
            let formulas = array(widget, "/query/builder/queryFormulas")
                .iter()
                .map(|formula| text(formula, "/expression").to_string())
                .collect();
            Queries {
                origin,
                metrics,
                formulas,
            }
        })
        .collect()
}

/// Returns the queries of an alert rule.
fn rule_queries(file: &str, rule: &Value) -> Queries {
    let origin = format!("{file}, rule {:?}", text(rule, "/alert"));
    let mut queries = Queries {
        origin: origin.clone(),
        metrics: Vec::new(),
        formulas: Vec::new(),
    };
    for query in array(rule, "/condition/compositeQuery/queries") {
        match text(query, "/type") {
            "builder_query" => queries
                .metrics
                .extend(metric_queries(&origin, &query["spec"])),
            "builder_formula" => queries
                .formulas
                .push(text(query, "/spec/expression").to_string()),
            other => panic!("{origin}: query type {other:?} is not checked by this test"),
        }
    }
    queries
}

/// Collects the queries of every dashboard panel and every alert rule.
fn all_queries() -> Vec<Queries> {
    let mut all: Vec<Queries> = load("dashboards")
        .iter()
        .flat_map(|(file, dashboard)| dashboard_panels(file, dashboard))
        .collect();
    all.extend(
        load("alerts")
            .iter()
            .map(|(file, rule)| rule_queries(file, rule)),
    );
    all
}

/// Collects every metric name anywhere in a JSON value: builder `metricName` fields,
/// `aggregateAttribute.key` of the older builder shape, and the `metric_name` literals of
/// ClickHouse SQL in `query` and `queryValue` strings.
fn referenced_metrics(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(object) => {
            for (key, field) in object {
                match (key.as_str(), field) {
                    ("metricName", Value::String(name)) => found.push(name.clone()),
                    ("aggregateAttribute", attribute) => {
                        if let Some(name) = attribute["key"].as_str().filter(|n| !n.is_empty()) {
                            found.push(name.to_string());
                        }
                    }
                    ("query" | "queryValue", Value::String(text)) => {
                        found.extend(sql_metric_names(text));
                    }
                    _ => referenced_metrics(field, found),
                }
            }
        }
        Value::Array(items) => items
            .iter()
            .for_each(|item| referenced_metrics(item, found)),
        _ => {}
    }
}

/// Returns the string literals compared with `metric_name` (by `=` or `IN (...)`) in SQL.
fn sql_metric_names(sql: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = sql;
    while let Some(at) = rest.find("metric_name") {
        rest = &rest[at + "metric_name".len()..];
        let after = rest.trim_start();
        let list = if let Some(value) = after.strip_prefix('=') {
            value.trim_start()
        } else if let Some(value) = after.strip_prefix("IN") {
            value.trim_start().strip_prefix('(').unwrap_or("")
        } else {
            continue;
        };
        let end = if after.starts_with('=') {
            list.find(|c: char| c.is_whitespace() || c == ')')
                .unwrap_or(list.len())
        } else {
            list.find(')').unwrap_or(list.len())
        };
        for literal in list[..end].split(',') {
            let literal = literal.trim();
            if let Some(name) = literal
                .strip_prefix('\'')
                .and_then(|l| l.strip_suffix('\''))
            {
                found.push(name.to_string());
            }
        }
    }
    found
}

/// Returns the label keys that SQL reads with `JSONExtractString(labels, '<key>')`.
fn sql_label_keys(sql: &str) -> Vec<String> {
    sql.split("JSONExtractString(labels, '")
        .skip(1)
        .filter_map(|rest| rest.split('\'').next())
        .map(str::to_string)
        .collect()
}

/// Parses a SigNoz filter expression such as
/// `service.name IN $service.name AND severity IN ['ERROR', 'FATAL']`.
fn parse_filter(expression: &str) -> Filter {
    let mut filter = Filter::default();
    let mut chars = expression.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() || "()[],=!<>".contains(c) {
            chars.next();
        } else if c == '\'' || c == '"' {
            chars.next();
            let mut literal = String::new();
            while let Some(next) = chars.next() {
                match next {
                    '\\' => literal.extend(chars.next()),
                    _ if next == c => break,
                    _ => literal.push(next),
                }
            }
            let comparison = filter
                .comparisons
                .last_mut()
                .unwrap_or_else(|| panic!("literal {literal:?} without a key in {expression:?}"));
            comparison.values.push(literal);
        } else {
            let mut word = String::new();
            while let Some(&next) = chars.peek() {
                if next.is_whitespace() || "()[],=!<>'\"".contains(next) {
                    break;
                }
                word.push(next);
                chars.next();
            }
            if let Some(variable) = word.strip_prefix('$') {
                filter.variables.push(variable.to_string());
            } else if word.parse::<f64>().is_err()
                && !FILTER_KEYWORDS.contains(&word.to_uppercase().as_str())
            {
                filter.comparisons.push(Comparison {
                    key: word,
                    values: Vec::new(),
                });
            }
        }
    }
    filter
}

/// Returns the variables a dashboard defines, by name.
fn dashboard_variables(dashboard: &Value) -> BTreeMap<String, &Value> {
    dashboard["variables"]
        .as_object()
        .map(|variables| {
            variables
                .values()
                .map(|variable| (text(variable, "/name").to_string(), variable))
                .collect()
        })
        .unwrap_or_default()
}

/// Parses a Go duration such as `5m0s` or `1h`, as SigNoz writes `evalWindow`, into seconds.
fn duration_seconds(duration: &str) -> u64 {
    let mut seconds = 0;
    let mut number = String::new();
    for c in duration.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => panic!("duration {duration:?} has unit {c:?}, expected h, m or s"),
        };
        let value: u64 = number
            .parse()
            .unwrap_or_else(|_| panic!("duration {duration:?} has no number before {c:?}"));
        seconds += value * unit;
        number.clear();
    }
    assert!(
        number.is_empty(),
        "duration {duration:?} ends without a unit"
    );
    seconds
}

fn is_percentile(space_aggregation: &str) -> bool {
    matches!(space_aggregation, "p50" | "p75" | "p90" | "p95" | "p99")
}

#[test]
fn otel_name_maps_stored_names() {
    let cases = [
        ("logpipe.events.ingested", Some(names::EVENTS_INGESTED)),
        (
            "logpipe.kafka.consumer.lag",
            Some(names::KAFKA_CONSUMER_LAG),
        ),
        (
            "http.server.request.duration.bucket",
            Some(names::HTTP_REQUEST_DURATION),
        ),
        (
            "http.server.request.duration.count",
            Some(names::HTTP_REQUEST_DURATION),
        ),
        ("logpipe.db.batch.size.sum", Some(names::DB_BATCH_SIZE)),
        (
            "logpipe.db.insert.duration.max",
            Some(names::DB_INSERT_DURATION),
        ),
    ];
    for (stored, expected) in cases {
        assert_eq!(otel_name(stored), expected, "{stored}");
    }
}

#[test]
fn otel_name_rejects_unknown_names() {
    for stored in [
        "logpipe.events.ingestd",
        "logpipe.event.ingested",
        "logpipe_events_ingested_total",
        "logpipe_events_ingested",
        "http_server_request_duration_bucket",
        "http.server.request.duration_bucket",
        "http.server.request.duration",
        "logpipe.events.ingested.count",
        "logpipe.kafka.consumer.lag.bucket",
        "",
    ] {
        assert_eq!(otel_name(stored), None, "{stored:?} must not map");
    }
}

#[test]
fn every_histogram_is_emitted() {
    for histogram in HISTOGRAMS {
        assert!(
            names::ALL.contains(histogram),
            "{histogram} not in names::ALL"
        );
    }
}

#[test]
fn filter_parser_reads_keys_and_values() {
    let filter = parse_filter(
        "service.name IN $service.name AND severity IN ['ERROR', 'FATAL'] \
         AND http.response.status_code LIKE '5%' AND partition >= 3 AND NOT topic EXISTS",
    );
    let keys: Vec<&str> = filter.comparisons.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "service.name",
            "severity",
            "http.response.status_code",
            "partition",
            "topic"
        ]
    );
    assert_eq!(filter.comparisons[1].values, ["ERROR", "FATAL"]);
    assert_eq!(filter.comparisons[2].values, ["5%"]);
    assert_eq!(filter.variables, ["service.name"]);
}

#[test]
fn sql_parser_reads_metric_names_and_labels() {
    let sql = "SELECT JSONExtractString(labels, 'service_name') AS s FROM t \
               WHERE metric_name = 'logpipe.events.ingested' AND x = 1 \
               OR metric_name IN ('a.b', 'c.d') GROUP BY s";
    assert_eq!(
        sql_metric_names(sql),
        ["logpipe.events.ingested", "a.b", "c.d"]
    );
    assert_eq!(sql_label_keys(sql), ["service_name"]);
}

#[test]
fn duration_parser_reads_go_durations() {
    assert_eq!(duration_seconds("5m0s"), 300);
    assert_eq!(duration_seconds("10m"), 600);
    assert_eq!(duration_seconds("1h30m"), 5400);
}

#[test]
fn every_file_is_valid_json() {
    let files = json_files(&signoz_dir());
    assert!(!files.is_empty(), "docker/signoz has no JSON file");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{path:?}: {err}"));
        if let Err(err) = serde_json::from_str::<Value>(&text) {
            panic!("{path:?} is not valid JSON: {err}");
        }
    }
}

#[test]
fn every_query_names_an_emitted_metric() {
    for queries in all_queries() {
        assert!(
            !queries.metrics.is_empty(),
            "{} has no query",
            queries.origin
        );
        for query in &queries.metrics {
            assert!(
                otel_name(&query.metric).is_some(),
                "{}: query {} reads {:?}, which logpipe does not emit under that name \
                 (SigNoz stores histograms as <name>.bucket, .count, .sum, .min, .max)",
                query.origin,
                query.name,
                query.metric
            );
        }
    }
}

#[test]
fn every_metric_reference_is_checked() {
    // Compares the metric names in any field with those the checks above read: builder
    // queries and variable SQL. A query in a shape this test does not parse fails here.
    let dashboards = load("dashboards");
    let alerts = load("alerts");
    let mut referenced = Vec::new();
    for value in dashboards.values().chain(alerts.values()) {
        referenced_metrics(value, &mut referenced);
    }
    let mut checked: Vec<String> = all_queries()
        .into_iter()
        .flat_map(|queries| queries.metrics)
        .map(|query| query.metric)
        .collect();
    for dashboard in dashboards.values() {
        for variable in dashboard_variables(dashboard).values() {
            checked.extend(sql_metric_names(text(variable, "/queryValue")));
        }
    }
    referenced.sort();
    checked.sort();
    assert_eq!(
        referenced, checked,
        "metric names found anywhere differ from those checked"
    );
}

#[test]
fn every_attribute_is_one_logpipe_sets() {
    for queries in all_queries() {
        for query in &queries.metrics {
            let Some(metric) = otel_name(&query.metric) else {
                continue;
            };
            let allowed =
                |key: &str| attributes(metric).contains(&key) || RESOURCE_ATTRIBUTES.contains(&key);
            for key in &query.group_by {
                assert!(
                    allowed(key),
                    "{}: query {} groups {metric} by {key:?}, an attribute it does not have",
                    query.origin,
                    query.name
                );
            }
            for comparison in parse_filter(&query.filter).comparisons {
                let key = comparison.key.as_str();
                assert!(
                    allowed(key),
                    "{}: query {} filters {metric} on {key:?}, an attribute it does not have",
                    query.origin,
                    query.name
                );
                let Some(values) = attribute_values(key) else {
                    continue;
                };
                for value in &comparison.values {
                    assert!(
                        values.contains(&value.as_str()),
                        "{}: query {} compares {key} with {value:?}; it takes {values:?}",
                        query.origin,
                        query.name
                    );
                }
            }
        }
    }
}

#[test]
fn percentiles_read_histogram_buckets() {
    for queries in all_queries() {
        for query in &queries.metrics {
            let percentile = is_percentile(&query.space_aggregation);
            let bucket = query.metric.ends_with(".bucket");
            assert_eq!(
                percentile, bucket,
                "{}: query {} has space aggregation {:?} on {:?}; percentiles read \
                 <histogram>.bucket and nothing else does",
                query.origin, query.name, query.space_aggregation, query.metric
            );
        }
    }
}

#[test]
fn dashboard_variables_are_defined_and_valid() {
    for (file, dashboard) in load("dashboards") {
        let variables = dashboard_variables(&dashboard);
        for (name, variable) in &variables {
            let sql = text(variable, "/queryValue");
            let metrics: Vec<&str> = sql_metric_names(sql)
                .iter()
                .map(|stored| {
                    otel_name(stored).unwrap_or_else(|| {
                        panic!("{file}: variable {name} reads {stored:?}, not a logpipe metric")
                    })
                })
                .collect();
            assert!(
                !metrics.is_empty(),
                "{file}: variable {name} reads no metric"
            );
            for key in sql_label_keys(sql) {
                let known = RESOURCE_ATTRIBUTES.contains(&key.as_str())
                    || metrics
                        .iter()
                        .any(|m| attributes(m).contains(&key.as_str()));
                assert!(known, "{file}: variable {name} reads label {key:?}");
            }
        }
        for panel in dashboard_panels(&file, &dashboard) {
            for query in &panel.metrics {
                for variable in parse_filter(&query.filter).variables {
                    assert!(
                        variables.contains_key(&variable),
                        "{}: query {} uses ${variable}, which the dashboard does not define",
                        query.origin,
                        query.name
                    );
                }
            }
        }
    }
}

#[test]
fn dashboard_layout_places_every_widget() {
    for (file, dashboard) in load("dashboards") {
        let widgets: BTreeSet<&str> = array(&dashboard, "/widgets")
            .iter()
            .map(|widget| text(widget, "/id"))
            .collect();
        let placed: BTreeSet<&str> = array(&dashboard, "/layout")
            .iter()
            .map(|item| text(item, "/i"))
            .collect();
        assert_eq!(widgets, placed, "{file}: widgets and layout items differ");
        assert_eq!(
            widgets.len(),
            array(&dashboard, "/widgets").len(),
            "{file}: widget ids repeat"
        );
        assert_eq!(text(&dashboard, "/version"), "v5", "{file}: query version");
    }
}

#[test]
fn panels_use_only_the_query_builder() {
    // PromQL and ClickHouse SQL panels would name metrics that the checks above do not read.
    for (file, dashboard) in load("dashboards") {
        for widget in array(&dashboard, "/widgets") {
            if widget["panelTypes"] == "row" {
                continue;
            }
            let title = text(widget, "/title");
            assert_eq!(
                text(widget, "/query/queryType"),
                "builder",
                "{file}: panel {title:?} query type"
            );
            for kind in ["promql", "clickhouse_sql"] {
                for query in array(widget, &format!("/query/{kind}")) {
                    assert!(
                        text(query, "/query").trim().is_empty(),
                        "{file}: panel {title:?} has a {kind} query, which this test cannot check"
                    );
                }
            }
        }
    }
}

/// A predicate that one dashboard panel must satisfy.
type PanelCheck = Box<dyn Fn(&Queries) -> bool>;

/// Returns whether some panel has a query matching `check`.
fn has_panel(panels: &[Queries], check: impl Fn(&Queries) -> bool) -> bool {
    panels.iter().any(check)
}

fn reads(query: &MetricQuery, metric: &str) -> bool {
    query.metric == metric
}

fn groups_by(query: &MetricQuery, key: &str) -> bool {
    query.group_by.iter().any(|group| group == key)
}

fn filters_on(query: &MetricQuery, key: &str) -> bool {
    parse_filter(&query.filter)
        .comparisons
        .iter()
        .any(|comparison| comparison.key == key)
}

/// Returns whether the panel has a query on `metric` for each of `percentiles`.
fn has_percentiles(panel: &Queries, metric: &str, percentiles: &[&str]) -> bool {
    percentiles.iter().all(|percentile| {
        panel
            .metrics
            .iter()
            .any(|q| reads(q, metric) && q.space_aggregation == *percentile)
    })
}

#[test]
fn dashboard_has_every_panel() {
    let dashboards = load("dashboards");
    let panels: Vec<Queries> = dashboards
        .iter()
        .flat_map(|(file, dashboard)| dashboard_panels(file, dashboard))
        .collect();
    let http_count = "http.server.request.duration.count";
    let ingested = names::EVENTS_INGESTED;
    let required: Vec<(&str, PanelCheck)> = vec![
        (
            "request throughput by route",
            Box::new(|p| {
                p.metrics.iter().any(|q| {
                    reads(q, http_count)
                        && q.time_aggregation == "rate"
                        && groups_by(q, "http.route")
                })
            }),
        ),
        (
            "HTTP 5xx rate",
            Box::new(|p| {
                p.metrics
                    .iter()
                    .any(|q| reads(q, http_count) && filters_on(q, "http.response.status_code"))
            }),
        ),
        (
            "P95 and P99 latency of /api/logs/",
            Box::new(|p| {
                has_percentiles(p, "http.server.request.duration.bucket", &["p95", "p99"])
                    && p.metrics.iter().all(|q| q.filter.contains("'/api/logs/'"))
            }),
        ),
        (
            "error % per service (formula over ERROR+FATAL and all events)",
            Box::new(|p| {
                let by_service = p
                    .metrics
                    .iter()
                    .filter(|q| reads(q, ingested) && groups_by(q, "service_name"))
                    .count();
                let errors = p.metrics.iter().any(|q| {
                    parse_filter(&q.filter).comparisons.iter().any(|c| {
                        c.key == "severity"
                            && c.values.contains(&"ERROR".to_string())
                            && c.values.contains(&"FATAL".to_string())
                    })
                });
                by_service == 2 && errors && !p.formulas.is_empty()
            }),
        ),
        (
            "events rejected by reason",
            Box::new(|p| {
                p.metrics
                    .iter()
                    .any(|q| reads(q, names::INGEST_REJECTED) && groups_by(q, "reason"))
            }),
        ),
        (
            "allowed vs blocked rate-limit decisions",
            Box::new(|p| {
                p.metrics
                    .iter()
                    .any(|q| reads(q, names::RATE_LIMIT_DECISIONS) && groups_by(q, "decision"))
            }),
        ),
        (
            "fallback rate-limit decisions",
            Box::new(|p| {
                p.metrics
                    .iter()
                    .any(|q| reads(q, names::RATE_LIMIT_DECISIONS) && filters_on(q, "store"))
            }),
        ),
        (
            "Kafka consumer lag per partition",
            Box::new(|p| {
                p.metrics
                    .iter()
                    .any(|q| reads(q, names::KAFKA_CONSUMER_LAG) && groups_by(q, "partition"))
            }),
        ),
        (
            "Kafka publish latency",
            Box::new(|p| {
                has_percentiles(p, "logpipe.kafka.publish.duration.bucket", &["p95", "p99"])
            }),
        ),
        (
            "Kafka publish failures",
            Box::new(|p| {
                p.metrics
                    .iter()
                    .any(|q| reads(q, names::KAFKA_PUBLISH_FAILURES))
            }),
        ),
        (
            "DB insert latency P95 and P99",
            Box::new(|p| has_percentiles(p, "logpipe.db.insert.duration.bucket", &["p95", "p99"])),
        ),
        (
            "rows written per second",
            Box::new(|p| {
                p.metrics
                    .iter()
                    .any(|q| reads(q, names::DB_ROWS_WRITTEN) && q.time_aggregation == "rate")
            }),
        ),
        (
            "actor restarts",
            Box::new(|p| {
                p.metrics
                    .iter()
                    .any(|q| reads(q, names::ACTOR_RESTARTS) && groups_by(q, "actor"))
            }),
        ),
        (
            "actor mailbox depth",
            Box::new(|p| {
                p.metrics
                    .iter()
                    .any(|q| reads(q, names::ACTOR_MAILBOX_DEPTH) && groups_by(q, "actor"))
            }),
        ),
        (
            "events ingested by service",
            Box::new(|p| {
                p.formulas.is_empty()
                    && p.metrics
                        .iter()
                        .any(|q| reads(q, ingested) && groups_by(q, "service_name"))
            }),
        ),
    ];
    for (panel, check) in required {
        assert!(
            has_panel(&panels, check),
            "no dashboard panel shows {panel}"
        );
    }
}

/// Returns the names the files in `channels/` define.
fn channel_names() -> BTreeSet<String> {
    load("channels")
        .values()
        .map(|channel| text(channel, "/name").to_string())
        .collect()
}

#[test]
fn channels_are_placeholders_for_slack_email_webhook() {
    let channels = load("channels");
    let mut kinds = BTreeSet::new();
    for (file, channel) in &channels {
        assert!(!text(channel, "/name").is_empty(), "{file}: no name");
        let configs: Vec<&str> = ["slack_configs", "email_configs", "webhook_configs"]
            .into_iter()
            .filter(|kind| channel.get(*kind).is_some())
            .collect();
        assert_eq!(
            configs.len(),
            1,
            "{file}: expected one receiver kind, found {configs:?}"
        );
        kinds.insert(configs[0]);
        let placeholder = match configs[0] {
            "slack_configs" => "/slack_configs/0/api_url",
            "email_configs" => "/email_configs/0/to",
            _ => "/webhook_configs/0/url",
        };
        let value = text(channel, placeholder);
        assert!(
            value.starts_with('<') && value.ends_with('>'),
            "{file}: {placeholder} is {value:?}; expected a <PLACEHOLDER> to replace"
        );
    }
    assert_eq!(
        kinds,
        BTreeSet::from(["email_configs", "slack_configs", "webhook_configs"]),
        "channel kinds"
    );
}

#[test]
fn alerts_have_threshold_window_and_channels() {
    let channels = channel_names();
    for (file, rule) in load("alerts") {
        assert_eq!(
            text(&rule, "/alertType"),
            "METRIC_BASED_ALERT",
            "{file}: alertType"
        );
        assert_eq!(
            text(&rule, "/ruleType"),
            "threshold_rule",
            "{file}: ruleType"
        );
        assert_eq!(text(&rule, "/version"), "v5", "{file}: version");
        assert!(!text(&rule, "/alert").is_empty(), "{file}: no alert name");
        assert!(
            rule.pointer("/condition/target")
                .is_some_and(Value::is_number),
            "{file}: condition.target is not a number"
        );
        assert!(
            !text(&rule, "/condition/op").is_empty(),
            "{file}: no condition.op"
        );
        assert!(
            !text(&rule, "/condition/matchType").is_empty(),
            "{file}: no condition.matchType"
        );
        assert!(
            duration_seconds(text(&rule, "/evalWindow")) > 0,
            "{file}: no evalWindow"
        );
        assert!(
            duration_seconds(text(&rule, "/frequency")) > 0,
            "{file}: no frequency"
        );
        assert!(
            !text(&rule, "/labels/severity").is_empty(),
            "{file}: no labels.severity"
        );
        for annotation in ["summary", "description"] {
            assert!(
                !text(&rule, &format!("/annotations/{annotation}")).is_empty(),
                "{file}: no annotations.{annotation}"
            );
        }
        let queries = rule_queries(&file, &rule);
        let selected = text(&rule, "/condition/selectedQueryName");
        let names: Vec<&str> = array(&rule, "/condition/compositeQuery/queries")
            .iter()
            .map(|query| text(query, "/spec/name"))
            .collect();
        assert!(
            names.contains(&selected),
            "{file}: selectedQueryName {selected:?}"
        );
        for query in &queries.metrics {
            assert!(
                parse_filter(&query.filter).variables.is_empty(),
                "{file}: alert queries cannot use dashboard variables"
            );
        }
        let preferred: BTreeSet<String> = array(&rule, "/preferredChannels")
            .iter()
            .map(|channel| channel.as_str().unwrap_or("").to_string())
            .collect();
        for channel in &preferred {
            assert!(
                channels.contains(channel),
                "{file}: channel {channel:?} is not defined in docker/signoz/channels"
            );
        }
        assert_eq!(
            preferred, channels,
            "{file}: preferredChannels must name every channel placeholder"
        );
    }
}

/// Returns the single rule whose queries match `check`, by file name.
fn find_rule<'a>(
    rules: &'a BTreeMap<String, Value>,
    what: &str,
    check: impl Fn(&Queries) -> bool,
) -> (&'a str, &'a Value) {
    let found: Vec<(&str, &Value)> = rules
        .iter()
        .filter(|(file, rule)| check(&rule_queries(file, rule)))
        .map(|(file, rule)| (file.as_str(), rule))
        .collect();
    let files: Vec<&str> = found.iter().map(|(file, _)| *file).collect();
    assert_eq!(
        files.len(),
        1,
        "expected one alert rule for {what}, found {files:?}"
    );
    found[0]
}

#[test]
fn required_alerts_exist() {
    let rules = load("alerts");

    let (file, error_rate) = find_rule(&rules, "the error event rate", |q| {
        q.metrics
            .iter()
            .any(|m| reads(m, names::EVENTS_INGESTED) && filters_on(m, "severity"))
            && !q.formulas.is_empty()
    });
    assert_eq!(
        text(error_rate, "/condition/op"),
        "1",
        "{file}: op is above"
    );

    let (file, lag) = find_rule(&rules, "consumer lag", |q| {
        q.metrics
            .iter()
            .any(|m| reads(m, names::KAFKA_CONSUMER_LAG))
    });
    assert_eq!(
        duration_seconds(text(lag, "/evalWindow")),
        300,
        "{file}: window"
    );
    // "2" is all_the_times: above the target at every point of the window.
    assert_eq!(text(lag, "/condition/matchType"), "2", "{file}: matchType");
    assert_eq!(text(lag, "/condition/op"), "1", "{file}: op is above");

    let (file, blocked) = find_rule(&rules, "blocked requests", |q| {
        q.metrics.iter().any(|m| {
            reads(m, names::RATE_LIMIT_DECISIONS)
                && parse_filter(&m.filter)
                    .comparisons
                    .iter()
                    .any(|c| c.key == "decision" && c.values == ["blocked"])
        })
    });
    assert_eq!(text(blocked, "/condition/op"), "1", "{file}: op is above");

    let (file, silence) = find_rule(&rules, "no events ingested", |q| {
        q.formulas.is_empty()
            && q.metrics
                .iter()
                .any(|m| reads(m, names::EVENTS_INGESTED) && m.filter.is_empty())
    });
    assert_eq!(text(silence, "/condition/op"), "2", "{file}: op is below");
    assert_eq!(
        text(silence, "/condition/matchType"),
        "2",
        "{file}: matchType"
    );
    assert_eq!(
        silence.pointer("/condition/alertOnAbsent"),
        Some(&Value::Bool(true)),
        "{file}: alertOnAbsent, for a logpipe that exports nothing"
    );
    let window = duration_seconds(text(silence, "/evalWindow"));
    let absent_minutes = silence["condition"]["absentFor"].as_u64().unwrap_or(0);
    assert_eq!(
        window,
        absent_minutes * 60,
        "{file}: evalWindow and absentFor differ"
    );
}

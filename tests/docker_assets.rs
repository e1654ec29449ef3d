//! The Docker deployment: the compose file parses, and every setting it passes to logpipe
//! is one logpipe accepts. No Docker engine is needed.

use std::path::{Path, PathBuf};

use logpipe::config::Config;
use serde_yaml::Value;

fn docker_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docker")
}

fn compose() -> Value {
    let text = std::fs::read_to_string(docker_dir().join("compose.yaml")).expect("compose.yaml");
    let mut compose: Value = serde_yaml::from_str(&text).expect("compose.yaml parses");
    compose.apply_merge().expect("merge keys resolve");
    compose
}

/// Replaces the required `${LOGPIPE_AUTH_JWT_SECRET:?...}` with a stand-in secret, as
/// Docker Compose would with the variable set; other values pass unchanged.
fn interpolate(value: &str) -> String {
    if value.starts_with("${LOGPIPE_AUTH_JWT_SECRET") {
        return "compose-test-secret-compose-test-secret".into();
    }
    value.to_string()
}

/// Lists the environment of a service as name and value pairs.
fn environment(service: &Value) -> Vec<(String, String)> {
    let Some(environment) = service["environment"].as_mapping() else {
        return Vec::new();
    };
    environment
        .iter()
        .map(|(name, value)| {
            let name = name.as_str().expect("variable name").to_string();
            let value = match value {
                Value::String(text) => interpolate(text),
                Value::Number(number) => number.to_string(),
                Value::Bool(flag) => flag.to_string(),
                other => panic!("{name} has a value compose cannot pass: {other:?}"),
            };
            (name, value)
        })
        .collect()
}

#[test]
fn compose_runs_api_and_consumer() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    for name in [
        "kafka",
        "kafka-topics",
        "postgres",
        "redis",
        "otel-collector",
    ] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    for (name, role) in [("logpipe-api", "api"), ("logpipe-consumer", "consumer")] {
        let service = &compose["services"][name];
        let command: Vec<&str> = service["command"]
            .as_sequence()
            .expect("command")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(command, vec!["serve", "--role", role], "{name}");
        assert!(
            service["healthcheck"]["test"].is_sequence(),
            "{name} has a health check"
        );
        assert!(
            service["build"]["dockerfile"].is_string(),
            "{name} builds the image"
        );
    }
}

/// The standard OpenTelemetry variables logpipe reads.
const STANDARD_OTEL: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
];

#[test]
fn compose_settings_exist_in_config() {
    let compose = compose();
    for name in ["logpipe-api", "logpipe-consumer"] {
        let variables = environment(&compose["services"][name]);
        assert!(
            variables
                .iter()
                .any(|(variable, _)| variable == "LOGPIPE_POSTGRES_URL"),
            "{name} sets the database"
        );
        for (variable, _) in &variables {
            assert!(
                variable.starts_with("LOGPIPE_") || STANDARD_OTEL.contains(&variable.as_str()),
                "{name}: {variable} is not a logpipe setting"
            );
        }
        let loaded = Config::load(None, variables);
        assert!(
            loaded.is_ok(),
            "{name}: {}",
            loaded
                .as_ref()
                .err()
                .map(|err| err.to_string())
                .unwrap_or_default()
        );
        let config = loaded.expect("loaded");
        assert_eq!(
            config.telemetry.otlp_endpoint, "http://otel-collector:4318",
            "{name} exports to the collector's OTLP/HTTP port"
        );
    }
}

#[test]
fn dockerfile_runs_as_non_root() {
    let text = std::fs::read_to_string(docker_dir().join("Dockerfile")).expect("Dockerfile");
    let user = text
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("a USER instruction");
    assert_ne!(user.trim(), "root");
    assert!(text.contains("AS build"), "multi-stage build");
}

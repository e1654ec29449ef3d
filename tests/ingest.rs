//! End to end: real logs posted over HTTP land in PostgreSQL once each, intact.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

const ALL_EVENTS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loghub_events_stored_exactly_once() {
    let app = TestApp::start().await;
    let (username, _, key) = app.user_with_key("loghub").await;

    let mut sent: HashMap<Uuid, Value> = HashMap::new();
    for path in loghub_files() {
        let events = read_ndjson(&path);
        for batch in events.chunks(500) {
            let (status, body) = app.post_logs(&key, &Value::Array(batch.to_vec())).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{}: {body}", path.display());
            assert_eq!(body["accepted"], batch.len());
            let ids = body["ids"].as_array().expect("ids");
            assert_eq!(ids.len(), batch.len());
            for (id, event) in ids.iter().zip(batch) {
                let id: Uuid = id.as_str().expect("id text").parse().expect("uuid");
                assert_eq!(id.get_version_num(), 7, "server ids are UUIDv7");
                assert!(
                    sent.insert(id, event.clone()).is_none(),
                    "id {id} returned twice"
                );
            }
        }
    }
    assert_eq!(sent.len(), ALL_EVENTS);

    let db = app.db().await;
    let user = user_id(&db, &username).await;
    let count = wait_for_rows(&db, user, ALL_EVENTS as i64, Duration::from_secs(120)).await;
    assert_eq!(count, ALL_EVENTS as i64, "rows stored");

    let rows = db
        .query(
            "SELECT id, service_name, level, severity_text, severity_number, message,
                    \"timestamp\", attributes
             FROM logs WHERE user_id = $1",
            &[&user],
        )
        .await
        .expect("select logs");
    assert_eq!(rows.len(), ALL_EVENTS);
    let mut seen = std::collections::HashSet::new();
    for row in rows {
        let id: Uuid = row.get("id");
        assert!(seen.insert(id), "row {id} stored twice");
        let source = sent
            .get(&id)
            .unwrap_or_else(|| panic!("row {id} was never sent"));
        assert_eq!(row.get::<_, String>("service_name"), source["service_name"]);
        assert_eq!(row.get::<_, String>("level"), source["log_level"]);
        assert_eq!(row.get::<_, String>("message"), source["message"]);
        let timestamp: DateTime<Utc> = row.get("timestamp");
        let expected: DateTime<Utc> = source["timestamp"]
            .as_str()
            .expect("fixture timestamp")
            .parse()
            .expect("fixture timestamp parses");
        assert_eq!(timestamp, expected, "timestamp of {id}");
        let attributes: Value = row.get("attributes");
        assert_eq!(attributes, source["attributes"], "attributes of {id}");
        let severity: String = row.get("severity_text");
        let number: i16 = row.get("severity_number");
        assert_eq!(
            (severity.as_str(), number),
            expected_severity(&source["log_level"])
        );
    }
    app.stop().await;
}

/// Maps the levels that occur in the samples to their severity text and number.
fn expected_severity(level: &Value) -> (&'static str, i16) {
    match level.as_str().expect("level text") {
        "INFO" => ("INFO", 9),
        "notice" => ("INFO", 10),
        "WARN" => ("WARN", 13),
        "ERROR" | "error" => ("ERROR", 17),
        other => panic!("level {other} not expected in the samples"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_command_posts_file() {
    let app = TestApp::start().await;
    let (username, _, key) = app.user_with_key("replay").await;
    let dir = std::env::temp_dir().join(format!("logpipe-replay-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("mixed.ndjson");
    let lines = [
        json!({"service_name": "api", "log_level": "info", "message": "one"}).to_string(),
        "this line is not JSON".to_string(),
        json!({"service_name": "api", "log_level": "shouting", "message": "bad level"}).to_string(),
        json!({"service_name": "api", "log_level": "warn", "message": "two"}).to_string(),
    ];
    std::fs::write(&file, lines.join("\n")).expect("write sample");
    let zookeeper = &loghub_files()[4];

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_logpipe"))
        .args([
            "replay",
            "--url",
            &app.base,
            "--api-key",
            &key,
            "--batch-size",
            "300",
        ])
        .arg(zookeeper)
        .arg(&file)
        .output()
        .await
        .expect("run logpipe replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "replay failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("events sent:     2004"), "{stdout}");
    assert!(stdout.contains("events accepted: 2002"), "{stdout}");
    assert!(stdout.contains("events rejected: 2"), "{stdout}");
    assert!(stdout.contains("invalid log_level: 1"), "{stdout}");
    assert!(stdout.contains("invalid_json: 1"), "{stdout}");
    assert!(stdout.contains("events/s"), "{stdout}");

    let db = app.db().await;
    let user = user_id(&db, &username).await;
    let count = wait_for_rows(&db, user, 2002, Duration::from_secs(60)).await;
    assert_eq!(count, 2002);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_fails_when_nothing_accepted() {
    let app = TestApp::start().await;
    let (_, _, key) = app.user_with_key("replaynone").await;
    let dir = std::env::temp_dir().join(format!("logpipe-replay-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("invalid.ndjson");
    let line = json!({"service_name": "api", "log_level": "shouting", "message": "m"});
    std::fs::write(&file, format!("{line}\n{line}\n")).expect("write sample");

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_logpipe"))
        .args(["replay", "--url", &app.base, "--api-key", &key])
        .arg(&file)
        .output()
        .await
        .expect("run logpipe replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("events accepted: 0"), "{stdout}");
    assert!(stderr.contains("no event was accepted"), "{stderr}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rejects_bad_key() {
    let app = TestApp::start().await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_logpipe"))
        .args(["replay", "--url", &app.base, "--api-key", "lp_not_a_key"])
        .arg(&loghub_files()[0])
        .output()
        .await
        .expect("run logpipe replay");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("rejected the API key"), "{stderr}");
    app.stop().await;
}

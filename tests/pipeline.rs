//! The Kafka-to-PostgreSQL half: roles, idempotent writes, messages that are not events
//! (set aside on the dead-letter topic), and migrations run concurrently.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::*;
use logpipe::app::Role;
use logpipe::event::{Event, Severity};
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_roles_deliver_events() {
    let config = test_config();
    let api = TestApp::start_with(config.clone(), Role::Api).await;
    let consumer = TestApp::start_with(config, Role::Consumer).await;
    let (username, _, key) = api.user_with_key("roles").await;

    let events: Vec<_> = (0..20).map(|i| event(&format!("split {i}"))).collect();
    let (status, body) = api.post_logs(&key, &json!(events)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    let db = api.db().await;
    let user = user_id(&db, &username).await;
    assert_eq!(
        wait_for_rows(&db, user, 20, Duration::from_secs(60)).await,
        20
    );

    let (status, ready) = read(
        consumer
            .client
            .get(consumer.url("/readyz"))
            .send()
            .await
            .expect("sent"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"]["consumers"], "ok");
    assert!(
        ready["checks"].get("kafka").is_none(),
        "the consumer role runs no producer"
    );
    let response = consumer
        .client
        .post(consumer.url("/api/logs/"))
        .send()
        .await
        .expect("sent");
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "the consumer role serves no API"
    );
    api.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_retry_stored_once() {
    let app = TestApp::start().await;
    let (username, _, key) = app.user_with_key("retry").await;
    let (other_name, _, other_key) = app.user_with_key("retry_other").await;
    let id = Uuid::now_v7();
    let mut retried = event("sent twice");
    retried["id"] = json!(id.to_string());
    let batch = json!([retried.clone(), event("fresh one")]);

    for _ in 0..2 {
        let (status, body) = app.post_logs(&key, &batch).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["ids"][0], id.to_string(), "the client's id is echoed");
    }
    // Another user choosing the same id is a different event.
    let (status, _) = app.post_logs(&other_key, &retried).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let db = app.db().await;
    let user = user_id(&db, &username).await;
    let other = user_id(&db, &other_name).await;
    assert_eq!(
        wait_for_rows(&db, user, 3, Duration::from_secs(60)).await,
        3
    );
    assert_eq!(
        wait_for_rows(&db, other, 1, Duration::from_secs(60)).await,
        1
    );
    // Give a late duplicate time to show up before counting again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = db
        .query_one(
            "SELECT count(*) FROM logs WHERE user_id = $1 AND id = $2",
            &[&user, &id],
        )
        .await
        .expect("count");
    assert_eq!(rows.get::<_, i64>(0), 1);
    assert_eq!(
        log_count(&db, user).await,
        3,
        "two fresh events and one retried"
    );
    app.stop().await;
}

fn stored_event(user_id: i64, message: &str) -> Event {
    Event {
        id: Uuid::now_v7(),
        user_id,
        api_key_id: 0,
        service_name: "raw".into(),
        level: "warning".into(),
        severity: Severity::Warn,
        severity_number: 13,
        message: message.into(),
        timestamp: Utc::now(),
        received_at: Utc::now(),
        attributes: serde_json::Map::new(),
        trace_id: None,
        span_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_message_stored_once() {
    let app = TestApp::start().await;
    let username = app.signup("redeliver").await;
    let db = app.db().await;
    let user = user_id(&db, &username).await;

    let event = stored_event(user, "delivered three times");
    let payload = serde_json::to_vec(&event).expect("json");
    let marker = serde_json::to_vec(&stored_event(user, "marker")).expect("json");
    produce_raw(
        &app.config,
        "raw",
        &[payload.clone(), payload.clone(), payload, marker],
    )
    .await;

    assert_eq!(
        wait_for_rows(&db, user, 2, Duration::from_secs(60)).await,
        2
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(log_count(&db, user).await, 2);
    let row = db
        .query_one(
            "SELECT message, severity_text FROM logs WHERE id = $1",
            &[&event.id],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "delivered three times");
    assert_eq!(row.get::<_, String>(1), "WARN");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_message_set_aside() {
    let app = TestApp::start().await;
    let username = app.signup("poison").await;
    let db = app.db().await;
    let user = user_id(&db, &username).await;

    let after = serde_json::to_vec(&stored_event(user, "after the poison")).expect("json");
    produce_raw(
        &app.config,
        "raw",
        &[b"\xff not json".to_vec(), b"{\"id\": 1}".to_vec(), after],
    )
    .await;

    assert_eq!(
        wait_for_rows(&db, user, 1, Duration::from_secs(60)).await,
        1
    );
    let message: String = db
        .query_one("SELECT message FROM logs WHERE user_id = $1", &[&user])
        .await
        .expect("row")
        .get(0);
    assert_eq!(message, "after the poison");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_once() {
    let config = test_config();
    let pool = logpipe::db::pool(&config.postgres).expect("pool");
    let runs = (0..4).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move { logpipe::db::migrate(&pool).await })
    });
    for run in futures::future::join_all(runs).await {
        run.expect("task")
            .expect("migrate succeeds while others run");
    }
    let db = connect_db(&config).await;
    let versions: i64 = db
        .query_one(
            "SELECT count(*) FROM schema_migrations WHERE version = 1",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(versions, 1);
}

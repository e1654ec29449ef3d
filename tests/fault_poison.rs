//! Messages the consumers can never store, written straight to the topic under load: they
//! go to the dead-letter topic, and every event around them reaches PostgreSQL exactly
//! once.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::load::{assert_exactly_once, check_stored, Load, LoadOptions};
use common::*;
use logpipe::app::Role;
use logpipe::config::Config;
use logpipe::event::{Event, Severity};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use uuid::Uuid;

/// The message key of the load's events (their service name), so that the poison shares
/// their partition and lands in the same batches.
const LOAD_KEY: &str = "fault-load";

/// Valid events written to the topic after the poison.
const VALID_AFTER: usize = 5;

/// A message read back from the dead-letter topic.
struct DeadLetter {
    payload: Vec<u8>,
    headers: HashMap<String, Vec<u8>>,
}

impl DeadLetter {
    fn header(&self, name: &str) -> Option<String> {
        let value = self.headers.get(name)?;
        Some(String::from_utf8_lossy(value).into_owned())
    }
}

fn raw_event(user_id: i64, message: &str) -> Event {
    Event {
        id: Uuid::now_v7(),
        user_id,
        api_key_id: 0,
        service_name: "raw".into(),
        level: "info".into(),
        severity: Severity::Info,
        severity_number: 9,
        message: message.into(),
        timestamp: Utc::now(),
        received_at: Utc::now(),
        attributes: serde_json::Map::new(),
        trace_id: None,
        span_id: None,
    }
}

/// Reads the dead-letter topic from the beginning of every partition until `expected`
/// messages arrived and `settle` passed without another, or `timeout` passed.
async fn read_dead_letters(
    config: &Config,
    expected: usize,
    settle: Duration,
    timeout: Duration,
) -> Vec<DeadLetter> {
    let topic = &config.kafka.dead_letter_topic;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", format!("logpipe-test-dlq-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("dead-letter consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("dead-letter topic metadata");
    let mut partitions = TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        partitions
            .add_partition_offset(topic, partition.id(), Offset::Beginning)
            .expect("partition added");
    }
    consumer.assign(&partitions).expect("partitions assigned");

    let started = Instant::now();
    let mut letters = Vec::new();
    while started.elapsed() < timeout {
        let wait = if letters.len() >= expected {
            settle
        } else {
            timeout.saturating_sub(started.elapsed())
        };
        let message = match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(message) => message.expect("dead-letter message"),
            Err(_) => break,
        };
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| {
                        let value = header.value.unwrap_or_default().to_vec();
                        (header.key.to_string(), value)
                    })
                    .collect()
            })
            .unwrap_or_default();
        letters.push(DeadLetter {
            payload: message.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    letters
}

async fn count_ids(db: &tokio_postgres::Client, user_id: i64, ids: &[Uuid]) -> i64 {
    db.query_one(
        "SELECT count(*) FROM logs WHERE user_id = $1 AND id = ANY($2)",
        &[&user_id, &ids],
    )
    .await
    .expect("count events by id")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_dead_letter() {
    let started = Instant::now();
    let mut config = test_config();
    config.rate_limit.requests_per_minute = 1_000_000;
    let app = TestApp::start_with(config, Role::All).await;
    let (username, _, key) = app.user_with_key("poison").await;
    let db = app.db().await;
    let user = user_id(&db, &username).await;

    let load = Load::start(LoadOptions::new(vec![app.base.clone()], &key));
    assert!(
        load.wait_for_more(20, Duration::from_secs(15)).await,
        "only {} events acknowledged in 15 s before the poison",
        load.acknowledged()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let not_json = b"\xff{ not a logpipe event".to_vec();
    let nul_event = raw_event(user, "text with a NUL \u{0} inside");
    let valid: Vec<Event> = (0..VALID_AFTER)
        .map(|i| raw_event(user, &format!("after the poison {i}")))
        .collect();
    let mut payloads = vec![
        not_json.clone(),
        serde_json::to_vec(&nul_event).expect("json"),
    ];
    payloads.extend(
        valid
            .iter()
            .map(|event| serde_json::to_vec(event).expect("json")),
    );
    produce_raw(&app.config, LOAD_KEY, &payloads).await;
    assert!(
        load.wait_for_more(20, Duration::from_secs(15)).await,
        "only {} events acknowledged in 15 s after the poison",
        load.acknowledged()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = load.stop().await;

    let valid_ids: Vec<Uuid> = valid.iter().map(|event| event.id).collect();
    let report = check_stored(&db, user, &stats, "poison", Duration::from_secs(30)).await;
    let valid_stored = count_ids(&db, user, &valid_ids).await;
    let nul_stored = count_ids(&db, user, &[nul_event.id]).await;
    let letters = read_dead_letters(
        &app.config,
        2,
        Duration::from_secs(2),
        Duration::from_secs(20),
    )
    .await;
    println!(
        "poison: {valid_stored} of {VALID_AFTER} valid events after it stored, {} dead letters, \
         test took {:?}",
        letters.len(),
        started.elapsed()
    );

    assert_eq!(
        valid_stored, VALID_AFTER as i64,
        "valid events written after the poison that are stored"
    );
    assert_eq!(
        nul_stored, 0,
        "the event with a NUL character is not stored"
    );
    assert_exactly_once(&report);
    assert_eq!(letters.len(), 2, "messages on the dead-letter topic");

    let raw = letters.iter().find(|letter| letter.payload == not_json);
    let raw = raw.expect("the message that is not JSON, byte-identical, on the dead-letter topic");
    let raw_error = raw.header("logpipe-error").unwrap_or_default();
    assert!(
        raw_error.contains("not a logpipe event"),
        "logpipe-error of the message that is not JSON: {raw_error:?}"
    );
    assert!(
        raw.header("logpipe-source").is_some(),
        "the message that is not JSON has a logpipe-source header"
    );

    let rejected = letters.iter().find_map(|letter| {
        let event: Event = serde_json::from_slice(&letter.payload).ok()?;
        (event.id == nul_event.id).then_some((letter, event))
    });
    let (rejected, rejected_event) =
        rejected.expect("the event with a NUL character on the dead-letter topic");
    assert_eq!(
        rejected_event.message, nul_event.message,
        "the dead-lettered event keeps its message"
    );
    let rejected_error = rejected.header("logpipe-error").unwrap_or_default();
    assert!(
        rejected_error.contains("rejected by PostgreSQL"),
        "logpipe-error of the event with a NUL character: {rejected_error:?}"
    );
    assert!(
        rejected.header("logpipe-source").is_some(),
        "the event with a NUL character has a logpipe-source header"
    );
    app.stop().await;
}

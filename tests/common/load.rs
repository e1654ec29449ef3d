//! A steady load of single and batched events for the fault tests, and the check of what
//! reached PostgreSQL.
//!
//! Every event carries a unique message (`<run>-<sequence>`), so the check can tell an
//! event stored twice under two ids from one stored once. The client records the message
//! of every event that got a 2xx. After the fault is healed, the check waits for the
//! pipeline to drain. It then counts the acknowledged events that are missing (lost) and
//! the messages stored more than once (duplicated).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;
use uuid::Uuid;

/// Settings of a load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Base URLs of logpipe instances; requests go to them in turn.
    pub urls: Vec<String>,
    pub api_key: String,
    /// Time between requests.
    pub interval: Duration,
    /// Send a client-chosen `id` with every event.
    pub client_ids: bool,
    /// Retry a request that got 503 or no response, with the same body, until it gets a
    /// 2xx or `max_attempts` is reached.
    pub retry: bool,
    pub max_attempts: u32,
}

impl LoadOptions {
    pub fn new(urls: Vec<String>, api_key: &str) -> Self {
        Self {
            urls,
            api_key: api_key.to_string(),
            interval: Duration::from_millis(20),
            client_ids: true,
            retry: true,
            max_attempts: 200,
        }
    }
}

/// Counts and messages seen by the load client.
#[derive(Debug, Default, Clone)]
pub struct LoadStats {
    /// Messages of the events that got a 2xx.
    pub acknowledged: HashSet<String>,
    /// Messages of every event sent, acknowledged or not.
    pub sent: HashSet<String>,
    pub requests: u64,
    /// Responses by status (0: no response).
    pub statuses: HashMap<u16, u64>,
}

/// A running load; [`Load::stop`] ends it and returns what it saw.
pub struct Load {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<Mutex<LoadStats>>,
}

impl Load {
    /// Starts sending, alternating one event and a batch of ten.
    pub fn start(options: LoadOptions) -> Load {
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let task = tokio::spawn(run(options, stopped, Arc::clone(&stats)));
        Load { stop, task, stats }
    }

    /// Events acknowledged so far.
    pub fn acknowledged(&self) -> usize {
        self.stats.lock().expect("stats").acknowledged.len()
    }

    /// Responses by status so far (0: no response).
    pub fn statuses(&self) -> HashMap<u16, u64> {
        self.stats.lock().expect("stats").statuses.clone()
    }

    /// Waits until at least `count` more events are acknowledged, or `timeout` passes.
    pub async fn wait_for_more(&self, count: usize, timeout: Duration) -> bool {
        let target = self.acknowledged() + count;
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.acknowledged() >= target {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Stops sending, lets the request in flight finish, and returns the stats.
    pub async fn stop(self) -> LoadStats {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let stats = self.stats.lock().expect("stats").clone();
        stats
    }
}

async fn run(options: LoadOptions, stopped: watch::Receiver<bool>, stats: Arc<Mutex<LoadStats>>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let run_id = &Uuid::new_v4().simple().to_string()[..8];
    let mut sequence = 0u64;
    let mut turn = 0usize;
    while !*stopped.borrow() {
        let size = if turn % 2 == 0 { 1 } else { 10 };
        let events: Vec<Value> = (0..size)
            .map(|_| {
                sequence += 1;
                let mut event = json!({
                    "service_name": "fault-load",
                    "log_level": "info",
                    "message": format!("{run_id}-{sequence}"),
                });
                if options.client_ids {
                    event["id"] = json!(Uuid::now_v7().to_string());
                }
                event
            })
            .collect();
        let messages: Vec<String> = events
            .iter()
            .map(|event| event["message"].as_str().unwrap_or_default().to_string())
            .collect();
        stats
            .lock()
            .expect("stats")
            .sent
            .extend(messages.iter().cloned());
        let acknowledged = send(&client, &options, &events, turn, &stats).await;
        if acknowledged {
            stats.lock().expect("stats").acknowledged.extend(messages);
        }
        turn += 1;
        tokio::time::sleep(options.interval).await;
    }
}

/// Sends one body, retrying as the options set, and returns true when it got a 2xx.
async fn send(
    client: &reqwest::Client,
    options: &LoadOptions,
    events: &[Value],
    turn: usize,
    stats: &Mutex<LoadStats>,
) -> bool {
    for attempt in 0..options.max_attempts.max(1) {
        let url = &options.urls[(turn + attempt as usize) % options.urls.len()];
        let response = client
            .post(format!("{url}/api/logs/"))
            .header("API-KEY", &options.api_key)
            .json(&events)
            .send()
            .await;
        let status = response.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
        {
            let mut stats = stats.lock().expect("stats");
            stats.requests += 1;
            *stats.statuses.entry(status).or_default() += 1;
        }
        if (200..300).contains(&status) {
            return true;
        }
        let retryable = status == 503 || status == 0;
        if !options.retry || !retryable {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// The outcome of a fault test.
#[derive(Debug)]
pub struct FaultReport {
    pub acknowledged: usize,
    pub rows: usize,
    pub lost: usize,
    pub duplicated: usize,
}

/// Waits until every acknowledged event of `user_id` is stored or `timeout` passes, then
/// prints and returns the report.
pub async fn check_stored(
    db: &tokio_postgres::Client,
    user_id: i64,
    stats: &LoadStats,
    name: &str,
    timeout: Duration,
) -> FaultReport {
    let started = Instant::now();
    loop {
        let report = count_stored(db, user_id, stats).await;
        if report.lost == 0 || started.elapsed() > timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Let late duplicates show up before the final count.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = count_stored(db, user_id, stats).await;
    println!(
        "fault {name}: acknowledged {}, rows {}, lost {}, duplicated {} (requests {}, statuses {:?})",
        report.acknowledged, report.rows, report.lost, report.duplicated, stats.requests, stats.statuses
    );
    report
}

async fn count_stored(db: &tokio_postgres::Client, user_id: i64, stats: &LoadStats) -> FaultReport {
    let rows = db
        .query("SELECT message FROM logs WHERE user_id = $1", &[&user_id])
        .await
        .expect("select stored messages");
    let mut counts: HashMap<String, usize> = HashMap::new();
    for row in &rows {
        *counts.entry(row.get(0)).or_default() += 1;
    }
    FaultReport {
        acknowledged: stats.acknowledged.len(),
        rows: rows.len(),
        lost: stats
            .acknowledged
            .iter()
            .filter(|message| !counts.contains_key(*message))
            .count(),
        duplicated: counts.values().filter(|count| **count > 1).count(),
    }
}

/// Counts the events sent, acknowledged or not, that are missing from PostgreSQL. A load
/// that retries until every event gets a 2xx must lose none of them.
pub async fn count_sent_missing(
    db: &tokio_postgres::Client,
    user_id: i64,
    stats: &LoadStats,
) -> usize {
    let rows = db
        .query("SELECT message FROM logs WHERE user_id = $1", &[&user_id])
        .await
        .expect("select stored messages");
    let stored: HashSet<String> = rows.iter().map(|row| row.get(0)).collect();
    stats
        .sent
        .iter()
        .filter(|message| !stored.contains(*message))
        .count()
}

/// Asserts the promise of a 2xx: some events were acknowledged, none of them is missing
/// from PostgreSQL, and none is stored twice.
pub fn assert_exactly_once(report: &FaultReport) {
    assert!(report.acknowledged > 0, "no event acknowledged: {report:?}");
    assert_eq!(
        report.lost, 0,
        "{} of {} acknowledged events missing from PostgreSQL",
        report.lost, report.acknowledged
    );
    assert_eq!(
        report.duplicated, 0,
        "{} events stored more than once ({} rows for {} acknowledged)",
        report.duplicated, report.rows, report.acknowledged
    );
}

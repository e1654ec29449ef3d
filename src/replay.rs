//! `logpipe replay`: posts NDJSON event files to a running logpipe in batches.
//!
//! Each event without an `id` gets a UUIDv7 before it is sent, so a batch retried after a
//! 503 or a timeout is stored once. A batch rejected with 400 is sent again without the
//! events the server named, and those are counted by field. A 429 or 503 is retried after
//! the `Retry-After` the server gave; a 413 splits the batch in two.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::stream::{self, StreamExt};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::Mutex;
use uuid::Uuid;

/// Attempts per batch for 429, 503 and transport errors before its events count as failed.
const MAX_ATTEMPTS: u32 = 20;

/// Options of a replay: the target, the files and the pacing.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Base URL of logpipe, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub api_key: String,
    pub files: Vec<PathBuf>,
    /// Events per request.
    pub batch_size: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Print progress to standard error once a second.
    pub progress: bool,
}

/// The outcome of a replay.
#[derive(Debug, Default)]
pub struct Summary {
    /// Events read from the files (valid JSON lines).
    pub sent: u64,
    pub accepted: u64,
    /// Events not stored, by reason: the field the server named, `invalid_json` for lines
    /// that are not JSON objects, or the HTTP status that ended the retries.
    pub rejected: BTreeMap<String, u64>,
    /// Events of `rejected` that the server did not take after every retry, for a reason
    /// other than their content (an HTTP status or a network error).
    pub failed: u64,
    /// The ids the server acknowledged, in no particular order.
    pub ids: Vec<Uuid>,
    pub elapsed: Duration,
}

impl Summary {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// Returns why the replay as a whole failed: an event that could not be delivered, or
    /// nothing accepted at all. Events rejected for their content alone are not a failure.
    pub fn failure(&self) -> Option<String> {
        if self.failed > 0 {
            return Some(format!(
                "{} event(s) were not stored after {MAX_ATTEMPTS} attempts; see the reasons above",
                self.failed
            ));
        }
        (self.sent > 0 && self.accepted == 0).then(|| "no event was accepted".to_string())
    }

    pub fn events_per_second(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "events sent:     {}", self.sent)?;
        writeln!(f, "events accepted: {}", self.accepted)?;
        writeln!(f, "events rejected: {}", self.rejected_total())?;
        for (reason, count) in &self.rejected {
            writeln!(f, "  {reason}: {count}")?;
        }
        writeln!(f, "elapsed:         {:.2} s", self.elapsed.as_secs_f64())?;
        write!(
            f,
            "throughput:      {:.0} events/s",
            self.events_per_second()
        )
    }
}

struct Shared {
    client: reqwest::Client,
    endpoint: String,
    api_key: String,
    accepted: AtomicU64,
    summary: Mutex<Summary>,
}

/// Replays every file and returns the summary. Fails only when the files cannot be read
/// or the server rejects the API key.
pub async fn run(options: ReplayOptions) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let (events, invalid_lines) = read_events(&options.files).await?;
    let total = events.len() as u64 + invalid_lines;
    let shared = Arc::new(Shared {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .context("cannot build the HTTP client")?,
        endpoint: format!("{}/api/logs/", options.url.trim_end_matches('/')),
        api_key: options.api_key.clone(),
        accepted: AtomicU64::new(0),
        summary: Mutex::new(Summary {
            sent: total,
            ..Summary::default()
        }),
    });
    if invalid_lines > 0 {
        shared
            .summary
            .lock()
            .await
            .rejected
            .insert("invalid_json".into(), invalid_lines);
    }

    let progress = options
        .progress
        .then(|| spawn_progress(Arc::clone(&shared), total, started));
    let batches: Vec<Vec<Value>> = events
        .chunks(options.batch_size.max(1))
        .map(<[Value]>::to_vec)
        .collect();
    let results: Vec<anyhow::Result<()>> = stream::iter(batches)
        .map(|batch| send_batch(Arc::clone(&shared), batch))
        .buffer_unordered(options.concurrency.max(1))
        .collect()
        .await;
    if let Some(progress) = progress {
        progress.abort();
    }
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;

    let mut summary = std::mem::take(&mut *shared.summary.lock().await);
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Reads the files; every line that is a JSON object gets an `id` unless it has one.
async fn read_events(files: &[PathBuf]) -> anyhow::Result<(Vec<Value>, u64)> {
    let mut events = Vec::new();
    let mut invalid = 0;
    for path in files {
        let text = tokio::fs::read_to_string(path)
            .await
            .with_context(|| format!("cannot read {}", path.display()))?;
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(mut event)) => {
                    event
                        .entry("id")
                        .or_insert_with(|| Value::String(Uuid::now_v7().to_string()));
                    events.push(Value::Object(event));
                }
                _ => invalid += 1,
            }
        }
    }
    Ok((events, invalid))
}

fn spawn_progress(
    shared: Arc<Shared>,
    total: u64,
    started: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let accepted = shared.accepted.load(Ordering::Relaxed);
            let rate = accepted as f64 / started.elapsed().as_secs_f64();
            eprintln!("replay: {accepted}/{total} events accepted ({rate:.0} events/s)");
        }
    })
}

/// Sends one batch until it is accepted, split, trimmed of invalid events or given up.
async fn send_batch(shared: Arc<Shared>, batch: Vec<Value>) -> anyhow::Result<()> {
    let mut pending = vec![batch];
    while let Some(batch) = pending.pop() {
        if batch.is_empty() {
            continue;
        }
        match post_with_retries(&shared, &batch).await? {
            Outcome::Accepted(ids) => {
                shared
                    .accepted
                    .fetch_add(ids.len() as u64, Ordering::Relaxed);
                let mut summary = shared.summary.lock().await;
                summary.accepted += ids.len() as u64;
                summary.ids.extend(ids);
            }
            Outcome::Invalid(errors) => {
                let (valid, reasons) = drop_invalid(batch, &errors);
                let mut summary = shared.summary.lock().await;
                for reason in reasons {
                    *summary.rejected.entry(reason).or_default() += 1;
                }
                pending.push(valid);
            }
            Outcome::TooLarge if batch.len() > 1 => {
                let mut first = batch;
                let second = first.split_off(first.len() / 2);
                pending.push(first);
                pending.push(second);
            }
            Outcome::TooLarge => count_failed(&shared, "payload_too_large", 1).await,
            Outcome::Failed(status) => {
                count_failed(&shared, &status, batch.len() as u64).await;
                shared.summary.lock().await.failed += batch.len() as u64;
            }
        }
    }
    Ok(())
}

async fn count_failed(shared: &Shared, reason: &str, events: u64) {
    let mut summary = shared.summary.lock().await;
    *summary.rejected.entry(reason.to_string()).or_default() += events;
}

enum Outcome {
    Accepted(Vec<Uuid>),
    /// The server's list of `{index, field, reason}`.
    Invalid(Vec<Value>),
    TooLarge,
    Failed(String),
}

async fn post_with_retries(shared: &Shared, batch: &[Value]) -> anyhow::Result<Outcome> {
    let mut last_failure = String::new();
    for attempt in 1..=MAX_ATTEMPTS {
        let response = shared
            .client
            .post(&shared.endpoint)
            .header("API-KEY", &shared.api_key)
            .json(batch)
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(err) => {
                last_failure = "transport_error".into();
                tracing::debug!(attempt, error = %err, "request failed");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                continue;
            }
        };
        let status = response.status();
        let retry_after = retry_after(&response);
        let body: Value = response.json().await.unwrap_or(Value::Null);
        match status {
            status if status.is_success() => return Ok(Outcome::Accepted(ids_of(&body))),
            StatusCode::UNAUTHORIZED => bail!("the server rejected the API key (401)"),
            StatusCode::PAYLOAD_TOO_LARGE => return Ok(Outcome::TooLarge),
            StatusCode::BAD_REQUEST => match body["error"]["errors"].as_array() {
                Some(errors) if !errors.is_empty() => return Ok(Outcome::Invalid(errors.clone())),
                _ => return Ok(Outcome::Failed("bad_request".into())),
            },
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                last_failure = format!("http_{}", status.as_u16());
                tokio::time::sleep(retry_after.unwrap_or(Duration::from_secs(1))).await;
            }
            other => return Ok(Outcome::Failed(format!("http_{}", other.as_u16()))),
        }
    }
    Ok(Outcome::Failed(last_failure))
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let seconds = response
        .headers()
        .get("retry-after")?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

fn ids_of(body: &Value) -> Vec<Uuid> {
    body["ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|id| id.as_str().and_then(|id| id.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the events the server named; returns the rest and one reason per removed event.
fn drop_invalid(batch: Vec<Value>, errors: &[Value]) -> (Vec<Value>, Vec<String>) {
    let mut reasons: BTreeMap<usize, String> = BTreeMap::new();
    for error in errors {
        let Some(index) = error["index"].as_u64() else {
            continue;
        };
        let field = error["field"].as_str().unwrap_or("event");
        reasons
            .entry(index as usize)
            .or_insert_with(|| format!("invalid {field}"));
    }
    let mut valid = Vec::with_capacity(batch.len());
    for (index, event) in batch.into_iter().enumerate() {
        if !reasons.contains_key(&index) {
            valid.push(event);
        }
    }
    if reasons.is_empty() {
        // The server named no index: nothing can be trimmed, so count the whole batch.
        return (Vec::new(), vec!["invalid event".to_string(); valid.len()]);
    }
    (valid, reasons.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn drop_invalid_keeps_the_rest() {
        let batch = vec![json!({"a": 0}), json!({"a": 1}), json!({"a": 2})];
        let errors = vec![
            json!({"index": 1, "field": "log_level", "reason": "unknown level"}),
            json!({"index": 1, "field": "message", "reason": "is required"}),
        ];
        let (valid, reasons) = drop_invalid(batch, &errors);
        assert_eq!(valid, vec![json!({"a": 0}), json!({"a": 2})]);
        assert_eq!(reasons, vec!["invalid log_level".to_string()]);
    }

    #[test]
    fn ids_of_reads_accepted_body() {
        let id = Uuid::now_v7();
        let body = json!({"accepted": 1, "ids": [id.to_string()]});
        assert_eq!(ids_of(&body), vec![id]);
    }
}

//! A closed-loop HTTP load: a fixed number of connections, each sending its next request
//! as soon as the previous one got its response, until a request count or a duration is reached.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::http_client::HttpConnection;

/// Status recorded for a request that got no response (connection refused, reset or
/// closed early).
pub const NO_RESPONSE: u16 = 0;

/// A request that got 202, sent to the lag probe: the first event id of its response and
/// when the response arrived.
pub type Probe = (String, Instant);

/// Requests to send and for how long.
#[derive(Clone)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    pub path: String,
    /// Extra request header lines, each ending in CRLF.
    pub headers: String,
    /// Request bodies, used in turn.
    pub bodies: Arc<Vec<Vec<u8>>>,
    pub concurrency: usize,
    pub max_requests: u64,
    pub duration: Duration,
    /// Every `n`-th accepted request is sent to the probe channel.
    pub probe: Option<(u64, mpsc::UnboundedSender<Probe>)>,
}

/// Responses and latencies of one load.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    pub elapsed: Duration,
    /// Responses by status, with [`NO_RESPONSE`] for requests without one.
    pub statuses: BTreeMap<u16, u64>,
    /// Latency of every 202, in microseconds, sorted.
    pub accepted_latencies_us: Vec<u32>,
}

impl LoadOutcome {
    pub fn accepted(&self) -> u64 {
        self.statuses.get(&202).copied().unwrap_or(0)
    }

    pub fn sent(&self) -> u64 {
        self.statuses.values().sum()
    }

    /// Accepted requests per second.
    pub fn accepted_per_sec(&self) -> f64 {
        self.accepted() as f64 / self.elapsed.as_secs_f64()
    }

    /// Returns the latency below which `fraction` of the 202s arrived.
    pub fn percentile(&self, fraction: f64) -> Duration {
        let sorted = &self.accepted_latencies_us;
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = (sorted.len() as f64 * fraction).ceil() as usize;
        Duration::from_micros(u64::from(sorted[rank.clamp(1, sorted.len()) - 1]))
    }

    /// Formats every status other than 202 with its count, as `503: 12, 0: 1`, or `none`.
    pub fn errors(&self) -> String {
        let errors: Vec<String> = self
            .statuses
            .iter()
            .filter(|(status, _)| **status != 202)
            .map(|(status, count)| format!("{status}: {count}"))
            .collect();
        if errors.is_empty() {
            "none".into()
        } else {
            errors.join(", ")
        }
    }
}

/// Runs the load and returns what it saw.
pub async fn run(spec: LoadSpec) -> LoadOutcome {
    let started = Instant::now();
    let deadline = started + spec.duration;
    let issued = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..spec.concurrency)
        .map(|_| tokio::spawn(worker(spec.clone(), deadline, Arc::clone(&issued))))
        .collect();
    let mut outcome = LoadOutcome::default();
    for worker in workers {
        let Ok(part) = worker.await else { continue };
        for (status, count) in part.statuses {
            *outcome.statuses.entry(status).or_default() += count;
        }
        outcome
            .accepted_latencies_us
            .extend(part.accepted_latencies_us);
    }
    outcome.elapsed = started.elapsed();
    outcome.accepted_latencies_us.sort_unstable();
    outcome
}

async fn worker(spec: LoadSpec, deadline: Instant, issued: Arc<AtomicU64>) -> LoadOutcome {
    let mut connection = HttpConnection::new(spec.addr);
    let mut outcome = LoadOutcome::default();
    while Instant::now() < deadline {
        let sequence = issued.fetch_add(1, Ordering::Relaxed);
        if sequence >= spec.max_requests {
            break;
        }
        let body = &spec.bodies[sequence as usize % spec.bodies.len()];
        let sent_at = Instant::now();
        let response = connection.post(&spec.path, &spec.headers, body).await;
        let latency = sent_at.elapsed();
        let status = response
            .as_ref()
            .map_or(NO_RESPONSE, |response| response.status);
        *outcome.statuses.entry(status).or_default() += 1;
        match response {
            Ok(response) if status == 202 => {
                let micros = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
                outcome.accepted_latencies_us.push(micros);
                if let Some((every, probes)) = &spec.probe {
                    if sequence % every == 0 {
                        if let Some(id) = first_id(&response.body) {
                            let _ = probes.send((id, Instant::now()));
                        }
                    }
                }
            }
            Ok(_) => {}
            // The server is not there: wait a little rather than spin on connect.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    outcome
}

/// Returns the first event id of a 202 body such as `{"accepted":2,"ids":["…","…"]}`
/// without parsing all of it.
fn first_id(body: &[u8]) -> Option<String> {
    const MARKER: &[u8] = b"\"ids\":[\"";
    let start = body
        .windows(MARKER.len())
        .position(|window| window == MARKER)?
        + MARKER.len();
    let id = body.get(start..start + 36)?;
    String::from_utf8(id.to_vec()).ok()
}

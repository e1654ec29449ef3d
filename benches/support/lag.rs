//! End-to-end lag: how long after its 202 an event's row is visible in PostgreSQL. The
//! load sends the first event id of every n-th accepted request; the probe looks those
//! ids up every `POLL_INTERVAL` until each is found.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::driver::Probe;

/// Time between two lookups, which bounds the resolution of the lag.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Lags of the probed events, and how many were not found before the probe stopped.
#[derive(Debug, Default)]
pub struct LagOutcome {
    /// Sorted.
    pub lags: Vec<Duration>,
    pub not_found: usize,
}

impl LagOutcome {
    pub fn percentile(&self, fraction: f64) -> Duration {
        if self.lags.is_empty() {
            return Duration::ZERO;
        }
        let rank = (self.lags.len() as f64 * fraction).ceil() as usize;
        self.lags[rank.clamp(1, self.lags.len()) - 1]
    }
}

/// Looks up the probed ids of `user_id` until `stop` is set and every id was found, or
/// `give_up` is set.
pub async fn probe(
    db: &tokio_postgres::Client,
    user_id: i64,
    mut probes: mpsc::UnboundedReceiver<Probe>,
    stop: watch::Receiver<bool>,
    give_up: watch::Receiver<bool>,
) -> LagOutcome {
    let mut pending: HashMap<Uuid, Instant> = HashMap::new();
    let mut outcome = LagOutcome::default();
    loop {
        while let Ok((id, accepted_at)) = probes.try_recv() {
            if let Ok(id) = Uuid::parse_str(&id) {
                pending.insert(id, accepted_at);
            }
        }
        if *give_up.borrow() || (*stop.borrow() && pending.is_empty()) {
            break;
        }
        if !pending.is_empty() {
            let ids: Vec<Uuid> = pending.keys().copied().collect();
            let found = db
                .query(
                    "SELECT id FROM logs WHERE user_id = $1 AND id = ANY($2)",
                    &[&user_id, &ids],
                )
                .await
                .expect("look up probed ids");
            let seen_at = Instant::now();
            for row in found {
                let id: Uuid = row.get(0);
                if let Some(accepted_at) = pending.remove(&id) {
                    outcome.lags.push(seen_at - accepted_at);
                }
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    outcome.not_found = pending.len();
    outcome.lags.sort_unstable();
    outcome
}

//! `RateLimiter`: request limits per API key and per login subject, decided in Redis.
//!
//! Messages: [`Check`] (one decision for one subject) and [`Ping`] (does Redis respond).
//! Mailbox capacity: `mailbox.rate_limiter`; when it is full, the request gets 503.
//!
//! Each decision is GCRA (the generic cell rate algorithm): a subject may make `burst`
//! requests at once, then one every `60 s / limit`, so no more than `limit + burst` pass in
//! any 60 s window. Reading and updating a subject's state happen in one Lua script run
//! inside Redis, on Redis's clock, so concurrent requests, also from several logpipe
//! instances sharing the Redis, can never both take the last slot.
//!
//! Checks that arrive while a Redis call is in flight are queued and sent together as one
//! pipeline of up to `rate_limit.max_batch` script calls, so Redis round trips do not bound
//! the request rate. When Redis does not respond within `redis.timeout_ms`, the decision
//! follows `rate_limit.on_store_error`: `local` decides with the same algorithm in this
//! process's memory (each instance then limits by itself), `allow` lets the request pass,
//! `deny` fails it with 503. One warning marks the start of an outage and one line its
//! end. Reconnection is automatic, and the actor is restarted by its supervisor if it stops.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use actix::prelude::*;
use redis::aio::ConnectionManager;
use redis::Script;

use super::{Reply, SharedStatus};
use crate::config::{RateLimitConfig, RedisConfig, StoreErrorPolicy};
use crate::telemetry::metrics::{ActorName, Metrics};

/// GCRA in one atomic step. KEYS[1]: the subject's state, its theoretical arrival time in
/// microseconds. ARGV[1]: emission interval in microseconds. ARGV[2]: burst. ARGV[3]: 1 to
/// record the request when it is allowed, 0 to only look.
/// Returns {allowed, remaining, reset_after_us, retry_after_us}.
const GCRA_SCRIPT: &str = r#"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, 0, tat - now, allow_at - now}
end
if ARGV[3] == '1' then
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
  return {1, math.floor((now + tolerance - new_tat) / interval), new_tat - now, 0}
end
return {1, math.floor((now + tolerance - new_tat) / interval) + 1, tat - now, 0}
"#;

/// Gives back one request of KEYS[1] (ARGV[1]: emission interval in microseconds), for a
/// request that turned out not to count, such as a successful login.
const REFUND_SCRIPT: &str = r#"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil then
  return 0
end
local new_tat = tat - tonumber(ARGV[1])
if new_tat <= now then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 1
"#;

/// Prefix of every Redis key the limiter writes.
const KEY_PREFIX: &str = "logpipe:ratelimit:";

/// Subjects kept by the in-memory fallback before idle ones are dropped.
const LOCAL_MAX_SUBJECTS: usize = 100_000;

/// Prefix of the subjects of API keys' request limits.
const API_KEY_SUBJECT_PREFIX: &str = "key:";

/// Returns the subject of an API key's request limit.
pub fn api_key_subject(key_id: i64) -> String {
    format!("{API_KEY_SUBJECT_PREFIX}{key_id}")
}

/// True for a check of an API key's ingest limit, the only decisions the metrics count.
/// Login attempts are limited by the same actor, but they are not ingest requests.
fn is_ingest(check: &Check) -> bool {
    check.subject.starts_with(API_KEY_SUBJECT_PREFIX)
}

/// Returns the subject of the failed-login limit of a username.
pub fn login_user_subject(username: &str) -> String {
    format!("login:user:{username}")
}

/// Returns the subject of the failed-login limit of a client address.
pub fn login_addr_subject(addr: &str) -> String {
    format!("login:addr:{addr}")
}

/// A rate: `per_minute` requests a minute after a burst of `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub per_minute: u32,
    pub burst: u32,
}

impl Limit {
    fn interval_us(self) -> u64 {
        // At least 1 µs, so that the local fallback never divides by zero, whatever the
        // per-key limit stored in PostgreSQL.
        (60_000_000 / u64::from(self.per_minute.max(1))).max(1)
    }
}

/// The result of one rate-limit decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The limit applied, in requests per minute.
    pub limit: u32,
    /// Requests the subject may still make at once.
    pub remaining: u32,
    /// Time until the subject is back to its full burst.
    pub reset_after: Duration,
    /// For a denied request, time until the next request is allowed.
    pub retry_after: Duration,
    /// True when Redis was unreachable and the decision was made without it.
    pub degraded: bool,
}

/// Failure to reach a decision, only with `on_store_error = "deny"`.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("redis is not connected")]
    NotConnected,
    #[error("redis did not respond within {0:?}")]
    TimedOut(Duration),
    #[error("redis error: {0}")]
    Redis(String),
}

/// Decides whether `subject` may make one more request. With `consume` false, the
/// decision is only looked up and nothing is recorded.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Check {
    pub subject: String,
    pub limit: Limit,
    pub consume: bool,
    pub reply: Reply<Result<Decision, RateLimitError>>,
}

/// Gives back one request that `Check` recorded for `subject`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Refund {
    pub subject: String,
    pub limit: Limit,
}

/// Checks that Redis responds.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ping {
    pub reply: Reply<Result<(), RateLimitError>>,
}

/// Sets the connection once the background connect succeeded.
#[derive(Message)]
#[rtype(result = "()")]
struct Connected(ConnectionManager);

/// The actor; see the module documentation.
pub struct RateLimiter {
    redis: RedisConfig,
    limits: RateLimitConfig,
    mailbox_capacity: usize,
    connection: Option<ConnectionManager>,
    script: Script,
    pending: VecDeque<Check>,
    in_flight: bool,
    local: LocalLimiter,
    outage_since: Option<Instant>,
    metrics: Metrics,
    status: SharedStatus,
}

impl RateLimiter {
    pub fn new(
        redis: RedisConfig,
        limits: RateLimitConfig,
        mailbox_capacity: usize,
        metrics: Metrics,
    ) -> Self {
        Self {
            redis,
            limits,
            mailbox_capacity,
            connection: None,
            script: Script::new(GCRA_SCRIPT),
            pending: VecDeque::new(),
            in_flight: false,
            local: LocalLimiter::default(),
            outage_since: None,
            metrics,
            status: SharedStatus::default(),
        }
    }

    /// Returns the actor's status for `/readyz`, `degraded` while Redis is unreachable.
    pub fn status(&self) -> SharedStatus {
        self.status.clone()
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.redis.timeout_ms)
    }

    /// Connects in the background, retrying every second until Redis responds. Once
    /// connected, the connection manager reconnects by itself after a failure.
    fn connect(&self, ctx: &mut Context<Self>) {
        let url = self.redis.url.clone();
        let addr = ctx.address();
        actix::spawn(async move {
            loop {
                if let Ok(connection) = connect(&url).await {
                    let _ = addr.send(Connected(connection)).await;
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Sends the queued checks, up to `max_batch`, as one Redis pipeline.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight || self.pending.is_empty() {
            return;
        }
        let count = self.pending.len().min(self.limits.max_batch.max(1));
        let batch: Vec<Check> = self.pending.drain(..count).collect();
        let Some(mut connection) = self.connection.clone() else {
            self.decide_without_store(batch, StoreFailure::NotConnected);
            return;
        };
        let pipeline = self.pipeline(&batch);
        let hash = self.script.get_hash().to_string();
        let timeout = self.timeout();
        self.in_flight = true;
        let call = async move {
            let result =
                tokio::time::timeout(timeout, run_pipeline(&mut connection, &pipeline, &hash))
                    .await;
            match result {
                Ok(Ok(values)) => Ok(values),
                Ok(Err(err)) => Err(StoreFailure::Redis(err)),
                Err(_) => Err(StoreFailure::TimedOut(timeout)),
            }
        };
        ctx.spawn(call.into_actor(self).map(move |result, actor, ctx| {
            actor.in_flight = false;
            match result {
                Ok(values) => actor.answer_from_store(batch, values),
                Err(failure) => actor.decide_without_store(batch, failure),
            }
            actor.flush(ctx);
        }));
    }

    fn pipeline(&self, batch: &[Check]) -> redis::Pipeline {
        let mut pipeline = redis::pipe();
        for check in batch {
            pipeline
                .cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(1)
                .arg(format!("{KEY_PREFIX}{}", check.subject))
                .arg(check.limit.interval_us())
                .arg(check.limit.burst.max(1))
                .arg(if check.consume { "1" } else { "0" });
        }
        pipeline
    }

    fn answer_from_store(&mut self, batch: Vec<Check>, values: Vec<Vec<i64>>) {
        if let Some(since) = self.outage_since.take() {
            self.status.set("running", None);
            tracing::warn!(
                outage_secs = since.elapsed().as_secs(),
                "redis responds again; rate limits are shared across instances again"
            );
        }
        for (check, values) in batch.into_iter().zip(values) {
            let decision = decision_from_script(check.limit.per_minute, &values);
            self.local.observe(&check.subject, decision.reset_after);
            if is_ingest(&check) {
                self.metrics.rate_limit_decision(decision.allowed, false);
            }
            let _ = check.reply.send(Ok(decision));
        }
    }

    fn decide_without_store(&mut self, batch: Vec<Check>, failure: StoreFailure) {
        if self.outage_since.is_none() {
            self.outage_since = Some(Instant::now());
            self.status.set("degraded", Some(failure.class()));
            tracing::warn!(
                error = %failure,
                policy = ?self.limits.on_store_error,
                "redis is unreachable; rate-limit decisions follow rate_limit.on_store_error until it responds"
            );
        }
        for check in batch {
            let result = match self.limits.on_store_error {
                StoreErrorPolicy::Local => Ok(self.local.decide(&check)),
                StoreErrorPolicy::Allow => Ok(allow_all(check.limit)),
                StoreErrorPolicy::Deny => Err(failure.to_error()),
            };
            if let Ok(decision) = &result {
                if is_ingest(&check) {
                    self.metrics.rate_limit_decision(decision.allowed, true);
                }
            }
            let _ = check.reply.send(result);
        }
    }
}

/// Connects with reconnection attempts at most a second apart, so that the limiter is
/// back on Redis within about a second of Redis coming back.
async fn connect(url: &str) -> redis::RedisResult<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_factor(100)
        .set_max_delay(1000)
        .set_connection_timeout(Duration::from_secs(1));
    ConnectionManager::new_with_config(client, config).await
}

/// Runs the pipeline, loading the script first when Redis does not have it cached.
async fn run_pipeline(
    connection: &mut ConnectionManager,
    pipeline: &redis::Pipeline,
    hash: &str,
) -> redis::RedisResult<Vec<Vec<i64>>> {
    match pipeline.query_async(connection).await {
        Err(err) if err.kind() == redis::ErrorKind::NoScriptError => {
            let loaded: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(GCRA_SCRIPT)
                .query_async(connection)
                .await?;
            debug_assert_eq!(loaded, hash);
            pipeline.query_async(connection).await
        }
        result => result,
    }
}

/// Failure of Redis to reach a decision.
#[derive(Debug, thiserror::Error)]
enum StoreFailure {
    #[error("not connected")]
    NotConnected,
    #[error("no response within {0:?}")]
    TimedOut(Duration),
    #[error("{0}")]
    Redis(redis::RedisError),
}

impl StoreFailure {
    fn class(&self) -> &'static str {
        match self {
            Self::NotConnected => "redis_not_connected",
            Self::TimedOut(_) => "redis_timeout",
            Self::Redis(_) => "redis_error",
        }
    }

    fn to_error(&self) -> RateLimitError {
        match self {
            Self::NotConnected => RateLimitError::NotConnected,
            Self::TimedOut(timeout) => RateLimitError::TimedOut(*timeout),
            Self::Redis(err) => RateLimitError::Redis(err.to_string()),
        }
    }
}

impl Actor for RateLimiter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
        self.connect(ctx);
    }
}

impl Supervised for RateLimiter {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        let restarts = self.status.count_restart();
        self.metrics.actor_restarted(ActorName::RateLimiter);
        tracing::warn!(restarts, "rate limiter restarting");
        self.connection = None;
        self.in_flight = false;
    }
}

impl Handler<Connected> for RateLimiter {
    type Result = ();

    fn handle(&mut self, msg: Connected, ctx: &mut Context<Self>) {
        tracing::info!("connected to redis");
        self.connection = Some(msg.0);
        self.flush(ctx);
    }
}

impl Handler<Check> for RateLimiter {
    type Result = ();

    fn handle(&mut self, msg: Check, ctx: &mut Context<Self>) {
        self.pending.push_back(msg);
        self.flush(ctx);
    }
}

impl Handler<Refund> for RateLimiter {
    type Result = ();

    fn handle(&mut self, msg: Refund, _ctx: &mut Context<Self>) {
        self.local.refund(&msg.subject, msg.limit);
        let Some(mut connection) = self.connection.clone() else {
            return;
        };
        let timeout = self.timeout();
        actix::spawn(async move {
            let script = Script::new(REFUND_SCRIPT);
            let mut invocation = script.key(format!("{KEY_PREFIX}{}", msg.subject));
            invocation.arg(msg.limit.interval_us());
            let call = invocation.invoke_async::<i64>(&mut connection);
            if let Ok(Err(err)) = tokio::time::timeout(timeout, call).await {
                tracing::debug!(error = %err, "cannot refund a rate-limit slot");
            }
        });
    }
}

impl Handler<Ping> for RateLimiter {
    type Result = ();

    fn handle(&mut self, msg: Ping, _ctx: &mut Context<Self>) {
        let Some(mut connection) = self.connection.clone() else {
            let _ = msg.reply.send(Err(RateLimitError::NotConnected));
            return;
        };
        let timeout = self.timeout();
        actix::spawn(async move {
            let command = redis::cmd("PING");
            let ping = command.query_async::<String>(&mut connection);
            let result = match tokio::time::timeout(timeout.max(Duration::from_secs(1)), ping).await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(err)) => Err(RateLimitError::Redis(err.to_string())),
                Err(_) => Err(RateLimitError::TimedOut(timeout)),
            };
            let _ = msg.reply.send(result);
        });
    }
}

fn decision_from_script(limit: u32, values: &[i64]) -> Decision {
    let value = |index: usize| values.get(index).copied().unwrap_or_default().max(0);
    Decision {
        allowed: value(0) == 1,
        limit,
        remaining: u32::try_from(value(1)).unwrap_or(u32::MAX),
        reset_after: Duration::from_micros(value(2) as u64),
        retry_after: Duration::from_micros(value(3) as u64),
        degraded: false,
    }
}

fn allow_all(limit: Limit) -> Decision {
    Decision {
        allowed: true,
        limit: limit.per_minute,
        remaining: limit.burst,
        reset_after: Duration::ZERO,
        retry_after: Duration::ZERO,
        degraded: true,
    }
}

/// The same GCRA in this process's memory, used while Redis is unreachable.
#[derive(Default)]
struct LocalLimiter {
    /// Theoretical arrival time of each subject, in microseconds since `epoch`.
    tats: HashMap<String, u64>,
    epoch: Option<Instant>,
}

impl LocalLimiter {
    fn now(&mut self) -> u64 {
        let epoch = *self.epoch.get_or_insert_with(Instant::now);
        epoch.elapsed().as_micros() as u64
    }

    /// Mirrors a decision Redis made: the subject's state there is `reset_after` ahead of
    /// now. A fallback then goes on from where Redis was instead of granting a fresh burst
    /// to every subject, so a slow Redis reply never lets more through than the limit.
    fn observe(&mut self, subject: &str, reset_after: Duration) {
        let now = self.now();
        let tat = now + reset_after.as_micros() as u64;
        match self.tats.get_mut(subject) {
            Some(stored) => *stored = tat,
            None => {
                self.prune(now);
                self.tats.insert(subject.to_string(), tat);
            }
        }
    }

    /// Drops idle subjects once the map is full.
    fn prune(&mut self, now: u64) {
        if self.tats.len() >= LOCAL_MAX_SUBJECTS {
            self.tats.retain(|_, tat| *tat > now);
        }
    }

    fn refund(&mut self, subject: &str, limit: Limit) {
        let now = self.now();
        if let Some(tat) = self.tats.get_mut(subject) {
            *tat = tat.saturating_sub(limit.interval_us()).max(now);
        }
    }

    fn decide(&mut self, check: &Check) -> Decision {
        let now = self.now();
        self.prune(now);
        let stored = self.tats.get(&check.subject).copied().unwrap_or(now);
        let (decision, new_tat) = gcra(now, stored, check.limit, check.consume);
        if let Some(new_tat) = new_tat {
            self.tats.insert(check.subject.clone(), new_tat);
        }
        Decision {
            degraded: true,
            ..decision
        }
    }
}

/// Decides by GCRA at time `now` for a subject whose theoretical arrival time is `tat`,
/// both in microseconds. Returns the decision and the new arrival time to store, if any.
fn gcra(now: u64, tat: u64, limit: Limit, consume: bool) -> (Decision, Option<u64>) {
    let interval = limit.interval_us();
    let tolerance = interval * u64::from(limit.burst.max(1));
    let tat = tat.max(now);
    let new_tat = tat + interval;
    let allow_at = new_tat.saturating_sub(tolerance);
    if allow_at > now {
        let decision = Decision {
            allowed: false,
            limit: limit.per_minute,
            remaining: 0,
            reset_after: Duration::from_micros(tat - now),
            retry_after: Duration::from_micros(allow_at - now),
            degraded: false,
        };
        return (decision, None);
    }
    let (remaining, reset, stored) = if consume {
        (
            (now + tolerance - new_tat) / interval,
            new_tat - now,
            Some(new_tat),
        )
    } else {
        ((now + tolerance - new_tat) / interval + 1, tat - now, None)
    };
    let decision = Decision {
        allowed: true,
        limit: limit.per_minute,
        remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
        reset_after: Duration::from_micros(reset),
        retry_after: Duration::ZERO,
        degraded: false,
    };
    (decision, stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        per_minute: 60,
        burst: 3,
    };
    const SECOND: u64 = 1_000_000;

    #[test]
    fn script_output_read() {
        let allowed = decision_from_script(100, &[1, 99, 600_000, 0]);
        assert!(allowed.allowed);
        assert_eq!(allowed.remaining, 99);
        assert_eq!(allowed.reset_after, Duration::from_millis(600));

        let denied = decision_from_script(100, &[0, 0, 60_000_000, 250_000]);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Duration::from_millis(250));
    }

    #[test]
    fn short_script_output_denies() {
        let denied = decision_from_script(5, &[]);
        assert!(!denied.allowed);
        assert_eq!(denied.remaining, 0);
    }

    #[test]
    fn gcra_allows_burst_then_paces() {
        let mut tat = 0;
        for expected_remaining in [2, 1, 0] {
            let (decision, stored) = gcra(0, tat, LIMIT, true);
            assert!(decision.allowed);
            assert_eq!(decision.remaining, expected_remaining);
            tat = stored.expect("stored");
        }
        let (denied, stored) = gcra(0, tat, LIMIT, true);
        assert!(!denied.allowed);
        assert!(stored.is_none());
        assert_eq!(denied.retry_after, Duration::from_secs(1));
        let (later, _) = gcra(SECOND, tat, LIMIT, true);
        assert!(later.allowed, "one slot refills after the interval");
    }

    #[test]
    fn gcra_peek_records_nothing() {
        let (decision, stored) = gcra(0, 0, LIMIT, false);
        assert!(decision.allowed);
        assert_eq!(decision.remaining, 3);
        assert!(stored.is_none());
    }

    #[test]
    fn gcra_window_bounded_by_limit_plus_burst() {
        // Simulated time: a client sending every 10 ms for 5 minutes never gets more than
        // limit + burst requests through in any 60 s window.
        let mut tat = 0;
        let mut allowed_at = Vec::new();
        for step in 0..30_000u64 {
            let now = step * 10_000;
            let (decision, stored) = gcra(now, tat, LIMIT, true);
            if decision.allowed {
                allowed_at.push(now);
                tat = stored.expect("stored");
            }
        }
        for (index, start) in allowed_at.iter().enumerate() {
            let in_window = allowed_at[index..]
                .iter()
                .take_while(|time| **time < start + 60 * SECOND)
                .count();
            assert!(
                in_window <= (LIMIT.per_minute + LIMIT.burst) as usize,
                "{in_window}"
            );
        }
    }

    #[test]
    fn local_limiter_continues_from_redis() {
        let mut local = LocalLimiter::default();
        // Redis reported the subject's burst used up: its state is 3 s ahead of now.
        local.observe("seen", Duration::from_secs(3));
        let check = Check {
            subject: "seen".into(),
            limit: LIMIT,
            consume: true,
            reply: tokio::sync::oneshot::channel().0,
        };
        assert!(
            !local.decide(&check).allowed,
            "no fresh burst after a fallback"
        );
    }

    #[test]
    fn local_limiter_keeps_subjects_apart() {
        let mut local = LocalLimiter::default();
        let check = |subject: &str| Check {
            subject: subject.into(),
            limit: LIMIT,
            consume: true,
            reply: tokio::sync::oneshot::channel().0,
        };
        for _ in 0..3 {
            assert!(local.decide(&check("a")).allowed);
        }
        assert!(!local.decide(&check("a")).allowed);
        let other = local.decide(&check("b"));
        assert!(other.allowed);
        assert!(other.degraded);
    }
}

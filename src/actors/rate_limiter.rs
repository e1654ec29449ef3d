//! `RateLimiter`: per-API-key request limits, decided in Redis.
//!
//! Messages: [`Check`] (one decision for one key) and [`Ping`] (is Redis reachable).
//! Mailbox capacity: `mailbox.rate_limiter`; when it is full, the request gets 503.
//!
//! Each decision is one Lua script run in Redis implementing GCRA (the generic cell rate
//! algorithm): a key may make `burst` requests at once, and after that one request every
//! `60 s / limit`. Reading and updating the key's state happen inside that one script, so
//! concurrent requests, also from several logpipe instances sharing the Redis, can never
//! both take the last slot. The clock is Redis's own (`TIME`), so instances with skewed
//! clocks agree. When Redis cannot be reached within `redis.timeout_ms`, the decision
//! fails and the request gets 503; nothing is published without a decision.

use std::time::Duration;

use actix::prelude::*;
use redis::aio::ConnectionManager;
use redis::Script;

use super::Reply;
use crate::config::RedisConfig;

/// GCRA in one atomic step. KEYS[1]: the key's state (its theoretical arrival time, in
/// microseconds). ARGV[1]: emission interval in microseconds. ARGV[2]: burst.
/// Returns {allowed, remaining, reset_after_us, retry_after_us}.
const GCRA_SCRIPT: &str = r#"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tolerance = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, 0, tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
local remaining = math.floor((now + tolerance - new_tat) / interval)
return {1, remaining, new_tat - now, 0}
"#;

/// The result of one rate-limit decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The limit applied, in requests per minute.
    pub limit: u32,
    /// Requests the key may still make at once.
    pub remaining: u32,
    /// Time until the key is back to its full burst.
    pub reset_after: Duration,
    /// For a denied request, time until the next request is allowed.
    pub retry_after: Duration,
}

/// Why no decision could be made.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("redis is not connected")]
    NotConnected,
    #[error("redis did not answer within {0:?}")]
    TimedOut(Duration),
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Decides whether API key `key_id` may make one more request.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Check {
    pub key_id: i64,
    pub limit_per_minute: u32,
    pub burst: u32,
    pub reply: Reply<Result<Decision, RateLimitError>>,
}

/// Checks that Redis answers.
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
    config: RedisConfig,
    mailbox_capacity: usize,
    connection: Option<ConnectionManager>,
    script: Script,
}

impl RateLimiter {
    pub fn new(config: RedisConfig, mailbox_capacity: usize) -> Self {
        Self {
            config,
            mailbox_capacity,
            connection: None,
            script: Script::new(GCRA_SCRIPT),
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    /// Connects in the background, retrying every second until Redis answers. Once
    /// connected, the connection manager reconnects by itself after a failure.
    fn connect(&self, ctx: &mut Context<Self>) {
        let url = self.config.url.clone();
        let addr = ctx.address();
        actix::spawn(async move {
            let mut logged = false;
            loop {
                match connect(&url).await {
                    Ok(connection) => {
                        tracing::info!("connected to redis");
                        let _ = addr.send(Connected(connection)).await;
                        return;
                    }
                    Err(err) if !logged => {
                        tracing::warn!(error = %err, "cannot connect to redis, retrying every second");
                        logged = true;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

async fn connect(url: &str) -> redis::RedisResult<ConnectionManager> {
    let client = redis::Client::open(url)?;
    ConnectionManager::new(client).await
}

impl Actor for RateLimiter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
        self.connect(ctx);
    }
}

impl Handler<Connected> for RateLimiter {
    type Result = ();

    fn handle(&mut self, msg: Connected, _ctx: &mut Context<Self>) {
        self.connection = Some(msg.0);
    }
}

impl Handler<Check> for RateLimiter {
    type Result = ();

    fn handle(&mut self, msg: Check, _ctx: &mut Context<Self>) {
        let Some(mut connection) = self.connection.clone() else {
            let _ = msg.reply.send(Err(RateLimitError::NotConnected));
            return;
        };
        let timeout = self.timeout();
        let limit = msg.limit_per_minute.max(1);
        let interval_us = 60_000_000 / u64::from(limit);
        let script = self.script.clone();
        let burst = msg.burst.max(1);
        actix::spawn(async move {
            let mut invocation = script.key(state_key(msg.key_id));
            invocation.arg(interval_us).arg(burst);
            let call = invocation.invoke_async::<Vec<i64>>(&mut connection);
            let result = match tokio::time::timeout(timeout, call).await {
                Ok(Ok(values)) => Ok(decision(limit, &values)),
                Ok(Err(err)) => Err(RateLimitError::Redis(err)),
                Err(_) => Err(RateLimitError::TimedOut(timeout)),
            };
            let _ = msg.reply.send(result);
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
            let result = match tokio::time::timeout(timeout, ping).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(err)) => Err(RateLimitError::Redis(err)),
                Err(_) => Err(RateLimitError::TimedOut(timeout)),
            };
            let _ = msg.reply.send(result);
        });
    }
}

fn state_key(key_id: i64) -> String {
    format!("logpipe:ratelimit:{key_id}")
}

fn decision(limit: u32, values: &[i64]) -> Decision {
    let value = |index: usize| values.get(index).copied().unwrap_or_default().max(0);
    Decision {
        allowed: value(0) == 1,
        limit,
        remaining: u32::try_from(value(1)).unwrap_or(u32::MAX),
        reset_after: Duration::from_micros(value(2) as u64),
        retry_after: Duration::from_micros(value(3) as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_reads_script_output() {
        let allowed = decision(100, &[1, 99, 600_000, 0]);
        assert!(allowed.allowed);
        assert_eq!(allowed.remaining, 99);
        assert_eq!(allowed.reset_after, Duration::from_millis(600));

        let denied = decision(100, &[0, 0, 60_000_000, 250_000]);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Duration::from_millis(250));
    }

    #[test]
    fn decision_tolerates_short_output() {
        let denied = decision(5, &[]);
        assert!(!denied.allowed);
        assert_eq!(denied.remaining, 0);
    }
}

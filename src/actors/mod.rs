//! The actors of the ingest pipeline.
//!
//! HTTP handlers reach `RateLimiter` and `KafkaProducer`; the consumers that
//! `ConsumerSupervisor` owns reach `DbWriter`. Every mailbox is bounded by
//! `[mailbox]` in the configuration. A message that needs a result carries a [`Reply`]
//! and is sent with [`call`], which fails at once when the mailbox is full instead of
//! waiting for room, so that a saturated actor turns into a fast 503.

pub mod consumer;
pub mod consumer_supervisor;
pub mod db_writer;
pub mod kafka_producer;
pub mod rate_limiter;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::oneshot;

/// The channel on which an actor sends back the result of a message.
pub type Reply<T> = oneshot::Sender<T>;

/// Failure of a call to an actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("mailbox is full")]
    Full,
    #[error("actor is stopped")]
    Closed,
    #[error("no answer before the deadline")]
    TimedOut,
}

/// Sends the message built by `build` to `addr` and waits at most `deadline` for the reply.
pub async fn call<A, M, T>(
    addr: &Addr<A>,
    build: impl FnOnce(Reply<T>) -> M,
    deadline: Duration,
) -> Result<T, CallError>
where
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: Message<Result = ()> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    addr.try_send(build(reply)).map_err(|err| match err {
        SendError::Full(_) => CallError::Full,
        SendError::Closed(_) => CallError::Closed,
    })?;
    match tokio::time::timeout(deadline, answer).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(CallError::Closed),
        Err(_) => Err(CallError::TimedOut),
    }
}

/// The state of a supervised actor, as `/readyz` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ActorStatus {
    /// `running`, `restarting` or `degraded` (running without one of its dependencies).
    pub state: &'static str,
    /// When the actor entered this state.
    pub since: DateTime<Utc>,
    pub restarts: u64,
    /// The kind of the last failure, without its details.
    pub last_error: Option<&'static str>,
}

/// An actor's status, shared between the actor and the HTTP handlers.
#[derive(Debug, Clone)]
pub struct SharedStatus(Arc<Mutex<ActorStatus>>);

impl Default for SharedStatus {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(ActorStatus {
            state: "running",
            since: Utc::now(),
            restarts: 0,
            last_error: None,
        })))
    }
}

impl SharedStatus {
    pub fn snapshot(&self) -> ActorStatus {
        self.lock().clone()
    }

    /// Moves to `state`; `error` names the failure that caused it, if any.
    pub fn set(&self, state: &'static str, error: Option<&'static str>) {
        let mut status = self.lock();
        if status.state != state {
            status.state = state;
            status.since = Utc::now();
        }
        if error.is_some() {
            status.last_error = error;
        }
    }

    /// Counts a restart and returns the number of restarts so far.
    pub fn count_restart(&self) -> u64 {
        let mut status = self.lock();
        status.restarts += 1;
        status.restarts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActorStatus> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

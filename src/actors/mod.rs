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

use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::prelude::*;
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

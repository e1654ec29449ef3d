//! `ConsumerSupervisor`: owns the Kafka consumers of this process.
//!
//! Messages: [`Stop`] (stop every consumer after it wrote its current batch, reply when
//! all have stopped) and [`Status`] (the state of each consumer). Mailbox capacity:
//! `mailbox.consumer_supervisor`.
//!
//! It starts `consumer.consumers` consumers in the group `consumer.group_id`. A consumer
//! that fails, or cannot be created, is started again after a delay that starts at
//! `supervision.restart_initial_delay_ms` and doubles with each failure in a row up to
//! `supervision.restart_max_delay_ms`, for as long as the supervisor runs. Each restart is
//! logged once with its cause and counted.

use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;

use super::consumer::{ConsumerError, ConsumerTask};
use super::db_writer::DbWriter;
use super::Reply;
use crate::config::Config;
use crate::telemetry::events::EventExporter;
use crate::telemetry::metrics::{ActorName, Metrics};

/// A consumer that ran this long without failing starts its next restart delay over from
/// the initial one.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Stops every consumer and replies once all have stopped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop {
    pub reply: Reply<()>,
}

/// Replies with the state of each consumer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Status {
    pub reply: Reply<Vec<ConsumerStatus>>,
}

/// The state of one consumer, as `/readyz` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerStatus {
    pub index: usize,
    /// `running`, `restarting` or `stopped`.
    pub state: &'static str,
    /// When the consumer last started, or began waiting for its restart.
    pub since: DateTime<Utc>,
    pub restarts: u64,
    /// The kind of the last failure, without its details.
    pub last_error: Option<&'static str>,
}

impl ConsumerStatus {
    pub fn is_running(&self) -> bool {
        self.state == "running"
    }
}

/// The actor; see the module documentation.
pub struct ConsumerSupervisor {
    config: Config,
    db_writer: Addr<DbWriter>,
    shutdown: watch::Sender<bool>,
    consumers: Vec<Slot>,
    stop_waiters: Vec<Reply<()>>,
    metrics: Metrics,
    events: Option<EventExporter>,
}

/// State the supervisor keeps for one consumer.
struct Slot {
    status: ConsumerStatus,
    failures_in_row: u32,
    started: tokio::time::Instant,
}

impl ConsumerSupervisor {
    pub fn new(
        config: Config,
        db_writer: Addr<DbWriter>,
        metrics: Metrics,
        events: Option<EventExporter>,
    ) -> Self {
        let consumers = (0..config.consumer.consumers)
            .map(|index| Slot {
                status: ConsumerStatus {
                    index,
                    state: "restarting",
                    since: Utc::now(),
                    restarts: 0,
                    last_error: None,
                },
                failures_in_row: 0,
                started: tokio::time::Instant::now(),
            })
            .collect();
        Self {
            config,
            db_writer,
            shutdown: watch::channel(false).0,
            consumers,
            stop_waiters: Vec::new(),
            metrics,
            events,
        }
    }

    fn is_stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn running(&self) -> usize {
        self.consumers
            .iter()
            .filter(|slot| slot.status.is_running())
            .count()
    }

    fn start_consumer(&mut self, index: usize, ctx: &mut Context<Self>) {
        if self.is_stopping() {
            return;
        }
        let task = ConsumerTask::new(
            index,
            &self.config,
            self.db_writer.clone(),
            self.metrics.clone(),
            self.events.clone(),
            self.shutdown.subscribe(),
        );
        let task = match task {
            Ok(task) => task,
            Err(err) => return self.consumer_exited(index, Err(err), ctx),
        };
        let slot = &mut self.consumers[index];
        slot.status.state = "running";
        slot.status.since = Utc::now();
        slot.started = tokio::time::Instant::now();
        tracing::info!(consumer = index, group = %self.config.consumer.group_id, "consumer started");
        ctx.spawn(task.run().into_actor(self).map(move |result, actor, ctx| {
            actor.consumer_exited(index, result, ctx);
        }));
    }

    fn consumer_exited(
        &mut self,
        index: usize,
        result: Result<(), ConsumerError>,
        ctx: &mut Context<Self>,
    ) {
        let stopping = self.is_stopping();
        let slot = &mut self.consumers[index];
        slot.status.since = Utc::now();
        match result {
            Err(err) if !stopping => {
                if slot.started.elapsed() >= HEALTHY_RUN {
                    slot.failures_in_row = 0;
                }
                slot.failures_in_row += 1;
                slot.status.restarts += 1;
                self.metrics.actor_restarted(ActorName::Consumer);
                slot.status.state = "restarting";
                slot.status.last_error = Some(error_class(&err));
                let delay = self.config.supervision.restart_delay(slot.failures_in_row);
                tracing::error!(consumer = index, error = %err, restart_in_ms = delay.as_millis() as u64, "consumer failed, restarting it");
                ctx.run_later(delay, move |actor, ctx| actor.start_consumer(index, ctx));
            }
            _ => slot.status.state = "stopped",
        }
        self.answer_stop_waiters();
    }

    fn answer_stop_waiters(&mut self) {
        if self.running() == 0 && self.is_stopping() {
            for waiter in self.stop_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

fn error_class(err: &ConsumerError) -> &'static str {
    match err {
        ConsumerError::Create(_) => "create",
        ConsumerError::Kafka(_) => "kafka",
        ConsumerError::WriterStopped => "db_writer_stopped",
    }
}

impl Actor for ConsumerSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.config.mailbox.consumer_supervisor);
        for index in 0..self.consumers.len() {
            self.start_consumer(index, ctx);
        }
    }
}

impl Handler<Stop> for ConsumerSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Stop, _ctx: &mut Context<Self>) {
        self.shutdown.send_replace(true);
        for slot in &mut self.consumers {
            if !slot.status.is_running() {
                slot.status.state = "stopped";
            }
        }
        self.stop_waiters.push(msg.reply);
        self.answer_stop_waiters();
    }
}

impl Handler<Status> for ConsumerSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Status, _ctx: &mut Context<Self>) {
        let statuses = self
            .consumers
            .iter()
            .map(|slot| slot.status.clone())
            .collect();
        let _ = msg.reply.send(statuses);
    }
}

#[cfg(test)]
mod tests {
    use crate::config::SupervisionConfig;
    use std::time::Duration;

    #[test]
    fn restart_delay_doubles_to_max() {
        let supervision = SupervisionConfig {
            restart_initial_delay_ms: 500,
            restart_max_delay_ms: 3000,
        };
        let delays: Vec<u64> = (1..=6)
            .map(|failures| supervision.restart_delay(failures).as_millis() as u64)
            .collect();
        assert_eq!(delays, vec![500, 1000, 2000, 3000, 3000, 3000]);
    }

    #[test]
    fn restart_delay_survives_many_failures() {
        let supervision = SupervisionConfig::default();
        let delay = supervision.restart_delay(u32::MAX);
        assert_eq!(
            delay,
            Duration::from_millis(supervision.restart_max_delay_ms)
        );
    }
}

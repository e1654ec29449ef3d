//! `ConsumerSupervisor`: owns the Kafka consumers of this process.
//!
//! Messages: [`Stop`] (stop every consumer after it wrote its current batch, reply when
//! all have stopped) and [`Status`] (how many consumers run). Mailbox capacity:
//! `mailbox.consumer_supervisor`.
//!
//! It starts `consumer.consumers` consumers in the group `consumer.group_id`. A consumer
//! that fails, or cannot be created, is started again after `consumer.restart_delay_ms`,
//! for as long as the supervisor runs.

use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;

use super::consumer::{ConsumerError, ConsumerTask};
use super::db_writer::DbWriter;
use super::Reply;
use crate::config::Config;

/// Stops every consumer and replies once all have stopped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop {
    pub reply: Reply<()>,
}

/// Replies with the number of consumers running now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Status {
    pub reply: Reply<usize>,
}

/// The actor; see the module documentation.
pub struct ConsumerSupervisor {
    config: Config,
    db_writer: Addr<DbWriter>,
    shutdown: watch::Sender<bool>,
    running: usize,
    stop_waiters: Vec<Reply<()>>,
}

impl ConsumerSupervisor {
    pub fn new(config: Config, db_writer: Addr<DbWriter>) -> Self {
        Self {
            config,
            db_writer,
            shutdown: watch::channel(false).0,
            running: 0,
            stop_waiters: Vec::new(),
        }
    }

    fn is_stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn start_consumer(&mut self, index: usize, ctx: &mut Context<Self>) {
        if self.is_stopping() {
            return;
        }
        let task = ConsumerTask::new(
            index,
            &self.config,
            self.db_writer.clone(),
            self.shutdown.subscribe(),
        );
        let task = match task {
            Ok(task) => task,
            Err(err) => return self.consumer_exited(index, Err(err), ctx),
        };
        self.running += 1;
        tracing::info!(consumer = index, group = %self.config.consumer.group_id, "consumer started");
        ctx.spawn(task.run().into_actor(self).map(move |result, actor, ctx| {
            actor.running -= 1;
            actor.consumer_exited(index, result, ctx);
        }));
    }

    fn consumer_exited(
        &mut self,
        index: usize,
        result: Result<(), ConsumerError>,
        ctx: &mut Context<Self>,
    ) {
        if let Err(err) = result {
            tracing::error!(consumer = index, error = %err, "consumer failed, restarting it");
            if !self.is_stopping() {
                let delay = Duration::from_millis(self.config.consumer.restart_delay_ms);
                ctx.run_later(delay, move |actor, ctx| actor.start_consumer(index, ctx));
            }
        }
        self.answer_stop_waiters();
    }

    fn answer_stop_waiters(&mut self) {
        if self.running == 0 && self.is_stopping() {
            for waiter in self.stop_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

impl Actor for ConsumerSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.config.mailbox.consumer_supervisor);
        for index in 0..self.config.consumer.consumers {
            self.start_consumer(index, ctx);
        }
    }
}

impl Handler<Stop> for ConsumerSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Stop, _ctx: &mut Context<Self>) {
        self.shutdown.send_replace(true);
        self.stop_waiters.push(msg.reply);
        self.answer_stop_waiters();
    }
}

impl Handler<Status> for ConsumerSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Status, _ctx: &mut Context<Self>) {
        let _ = msg.reply.send(self.running);
    }
}

//! [`BrokerPublisher`]: the supervised actor that delivers events to one broker, at
//! least once, in order.
//!
//! The actor owns the [`EventBuffer`] and the counters; the broker client only ever
//! runs inside operations (connect, send a batch, health check) spawned on tasks of
//! their own under a timeout. So when the client fails — the connection drops, an
//! operation times out, the client panics — the actor survives with its buffer and
//! *restarts* the client: it drops it and connects afresh after a backoff. One batch
//! is in flight at a time and events leave the buffer only when acknowledged, which
//! keeps per-agent order through any number of retries.
//!
//! Supervision follows OTP: a restart is counted each time a working client is torn
//! down (lost connection, failed send or health check, panic); failed attempts to
//! reconnect during an outage are retries, not restarts, so an outage of any length
//! costs one restart. More than `events.max_restarts` restarts within
//! `events.restart_window` seconds mark the publisher failed: it stops connecting,
//! `/health` turns critical, and the server keeps serving agents.
//!
//! Close ([`Close`], or the bus's [`Flush`] at shutdown) delivers what is buffered
//! within the timeout, reports, and is idempotent; events offered after it are
//! refused with [`PublishError::Closed`].

mod handlers;
mod messages;

pub use messages::{Close, ConnectionLost, PublishError, TryDeliver};

use super::backoff::{Backoff, RestartIntensity, RestartPolicy};
use super::broker::{Broker, BrokerError, LossReporter, SendError};
use super::buffer::{Burst, EventBuffer};
use super::FlushReport;
use crate::event::SharedEvent;
use crate::settings::BufferSettings;
use actix::prelude::*;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A burst of drops still going on after this long is reported anyway.
const LONGEST_UNREPORTED_BURST: Duration = Duration::from_secs(60);
/// While closing, retries come at least this often.
const CLOSING_RETRY_CAP: Duration = Duration::from_millis(250);

/// What the publisher is doing with its broker right now (one thing at a time).
#[derive(Debug, PartialEq, Eq)]
enum Op {
    /// Nothing: ready to connect or send.
    Idle,
    /// Connecting.
    Connecting,
    /// A batch is in flight.
    Sending,
    /// Checking an idle connection.
    Checking,
    /// Waiting out a backoff before the next attempt.
    Waiting(SpawnHandle),
}

enum Closing {
    Open,
    /// Flushing; these callers get the report.
    Flushing(Vec<oneshot::Sender<FlushReport>>),
    /// Closed with this report.
    Closed(FlushReport),
}

/// How an operation ended.
enum Outcome<T, E> {
    Done(Result<T, E>),
    TimedOut(Duration),
    Panicked(String),
}

/// The publisher actor for broker `B`.
pub struct BrokerPublisher<B: Broker> {
    broker: B,
    buffer: EventBuffer,
    batch_size: usize,
    backoff: Backoff,
    /// Longest retry delay, for logs.
    retry_max: f64,
    intensity: RestartIntensity,
    max_restarts: u32,
    restart_window: f64,
    client: Option<B::Client>,
    /// Incremented per connection attempt, so late loss reports are ignored.
    generation: u64,
    op: Op,
    connected: bool,
    failed: bool,
    delivered: u64,
    retried: u64,
    restarts: u32,
    last_error: Option<String>,
    /// Connection attempts that failed since the last successful connection.
    failed_connects: u32,
    closing: Closing,
    /// Events offered after close.
    rejected: u64,
    /// Events accepted since start (acknowledged + dropped + buffered).
    accepted: u64,
    /// [`Settle`](crate::publisher::Settle) requests waiting.
    settling: Vec<Settling>,
}

/// A [`Settle`](crate::publisher::Settle) request waiting.
struct Settling {
    /// Answered once this many events are acknowledged or dropped.
    upto: u64,
    /// Events dropped when it was asked (more dropped since: not all acknowledged).
    dropped_before: u64,
    answer: oneshot::Sender<bool>,
}

impl<B: Broker> BrokerPublisher<B> {
    /// A publisher for `broker` with its section's buffering settings and the restart
    /// intensity of `[events]`.
    pub fn new(broker: B, buffer: BufferSettings, restarts: RestartPolicy) -> Self {
        Self {
            broker,
            buffer: EventBuffer::new(buffer.buffer_capacity),
            batch_size: buffer.batch_size.max(1),
            backoff: Backoff::new(buffer.retry_initial, buffer.retry_max),
            retry_max: buffer.retry_max,
            intensity: RestartIntensity::new(
                restarts.max_restarts,
                crate::settings::secs(restarts.restart_window),
            ),
            max_restarts: restarts.max_restarts,
            restart_window: restarts.restart_window,
            client: None,
            generation: 0,
            op: Op::Idle,
            connected: false,
            failed: false,
            delivered: 0,
            retried: 0,
            restarts: 0,
            last_error: None,
            failed_connects: 0,
            closing: Closing::Open,
            rejected: 0,
            accepted: 0,
            settling: Vec::new(),
        }
    }

    fn name(&self) -> &'static str {
        self.broker.name()
    }

    fn is_closed(&self) -> bool {
        matches!(self.closing, Closing::Closed(_))
    }

    /// Runs `future` on a task of its own, under `timeout`, then hands the outcome to
    /// `then` on the actor.
    fn run_op<T, E, F>(
        &mut self,
        ctx: &mut Context<Self>,
        timeout: Duration,
        future: F,
        then: impl FnOnce(&mut Self, Outcome<T, E>, &mut Context<Self>) + 'static,
    ) where
        T: 'static,
        E: 'static,
        F: Future<Output = Result<T, E>> + 'static,
    {
        let task = actix::spawn(async move { tokio::time::timeout(timeout, future).await });
        ctx.spawn(
            actix::fut::wrap_future::<_, Self>(task).map(move |joined, act, ctx| {
                let outcome = match joined {
                    Ok(Ok(result)) => Outcome::Done(result),
                    Ok(Err(_)) => Outcome::TimedOut(timeout),
                    Err(error) => Outcome::Panicked(panic_message(error)),
                };
                then(act, outcome, ctx)
            }),
        );
    }

    /// Starts whatever comes next: connect, send the next batch, or nothing.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.failed || self.op != Op::Idle || self.is_closed() {
            return;
        }
        match &self.client {
            None => self.connect(ctx),
            Some(_) if !self.buffer.is_empty() => self.send(ctx),
            Some(_) => self.maybe_finish_close(ctx),
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        self.op = Op::Connecting;
        self.generation += 1;
        let generation = self.generation;
        let lost = LossReporter {
            publisher: ctx.address().recipient(),
            generation,
        };
        let future = self.broker.connect(lost);
        let timeout = self.broker.timeouts().connect;
        self.run_op(ctx, timeout, future, move |act, outcome, ctx| {
            act.op = Op::Idle;
            match outcome {
                // A connection made after close is not kept: nothing will use it.
                Outcome::Done(Ok(client)) if generation == act.generation && !act.is_closed() => {
                    act.on_connected(client);
                    act.pump(ctx);
                }
                Outcome::Done(Ok(client)) => {
                    actix::spawn(act.broker.close(client));
                    act.pump(ctx);
                }
                Outcome::Done(Err(error)) => act.on_connect_failed(error.to_string(), ctx),
                Outcome::TimedOut(after) => act.on_connect_failed(
                    format!(
                        "connecting to {} timed out after {:.1} s",
                        act.broker.describe(),
                        after.as_secs_f64()
                    ),
                    ctx,
                ),
                Outcome::Panicked(message) => act.restart(
                    format!("the client panicked while connecting: {message}"),
                    ctx,
                ),
            }
        });
    }

    fn on_connected(&mut self, client: B::Client) {
        self.client = Some(client);
        self.connected = true;
        if self.generation == 1 && self.failed_connects == 0 {
            log::info!(
                "publisher {}: connected to {}",
                self.name(),
                self.broker.describe()
            );
        } else {
            log::info!(
                "publisher {}: connected to {} again ({} failed attempt(s) since the last connection); delivering the {} buffered events",
                self.name(),
                self.broker.describe(),
                self.failed_connects,
                self.buffer.len()
            );
        }
        self.failed_connects = 0;
    }

    fn on_connect_failed(&mut self, error: String, ctx: &mut Context<Self>) {
        self.connected = false;
        self.failed_connects += 1;
        if self.failed_connects == 1 {
            log::warn!(
                "publisher {}: cannot connect to {}: {error}; retrying with backoff (up to {:.1} s) and buffering events ({} now)",
                self.name(),
                self.broker.describe(),
                self.retry_max,
                self.buffer.len()
            );
        } else {
            log::debug!(
                "publisher {}: connection attempt {} failed: {error}",
                self.name(),
                self.failed_connects
            );
        }
        self.last_error = Some(error);
        self.retry_later(ctx);
    }

    fn send(&mut self, ctx: &mut Context<Self>) {
        let Some(client) = &self.client else { return };
        let batch = self.buffer.take_batch(self.batch_size);
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        self.op = Op::Sending;
        let future = self.broker.send(client, batch);
        let timeout = self.broker.timeouts().send;
        self.run_op(ctx, timeout, future, move |act, outcome, ctx| {
            act.op = Op::Idle;
            let (acked, error) = match outcome {
                Outcome::Done(Ok(())) => (n, None),
                Outcome::Done(Err(SendError { acked, error })) => (acked.min(n), Some(error.0)),
                Outcome::TimedOut(after) => (
                    0,
                    Some(format!(
                        "{} did not acknowledge a batch of {n} events within {:.1} s",
                        act.broker.describe(),
                        after.as_secs_f64()
                    )),
                ),
                Outcome::Panicked(message) => (
                    0,
                    Some(format!("the client panicked while sending: {message}")),
                ),
            };
            act.buffer.settle(acked);
            act.delivered += acked as u64;
            act.answer_settled();
            match error {
                None => {
                    if !act.connected {
                        log::info!(
                            "publisher {}: {} acknowledges events again; {} buffered",
                            act.name(),
                            act.broker.describe(),
                            act.buffer.len()
                        );
                    }
                    act.connected = true;
                    act.backoff.reset();
                    // A burst ends once the buffer is back to half its capacity, so
                    // a broker that is merely slow does not log once per batch.
                    if act.buffer.len() <= act.buffer.capacity() / 2 {
                        let burst = act.buffer.end_burst();
                        act.report_burst(burst);
                    }
                    act.pump(ctx);
                }
                Some(error) => {
                    act.retried += (n - acked) as u64;
                    act.restart(
                        format!(
                            "{error} ({acked} of {n} events acknowledged; the other {} will be sent again)",
                            n - acked
                        ),
                        ctx,
                    );
                }
            }
        });
    }

    fn check(&mut self, ctx: &mut Context<Self>) {
        let Some(client) = &self.client else { return };
        self.op = Op::Checking;
        let future = self.broker.check(client);
        let timeout = self.broker.timeouts().check;
        self.run_op(ctx, timeout, future, move |act, outcome, ctx| {
            act.op = Op::Idle;
            let error = match outcome {
                Outcome::Done(Ok(())) => None,
                Outcome::Done(Err(BrokerError(error))) => Some(error),
                Outcome::TimedOut(after) => Some(format!(
                    "{} did not answer a health check within {:.1} s",
                    act.broker.describe(),
                    after.as_secs_f64()
                )),
                Outcome::Panicked(message) => Some(format!(
                    "the client panicked during a health check: {message}"
                )),
            };
            match error {
                None => {
                    act.connected = true;
                    act.pump(ctx);
                }
                Some(error) => act.restart(format!("health check failed: {error}"), ctx),
            }
        });
    }

    /// Tears the client down and, unless the restart intensity is exceeded,
    /// reconnects after a backoff. The buffer is kept.
    fn restart(&mut self, reason: String, ctx: &mut Context<Self>) {
        if let Some(client) = self.client.take() {
            actix::spawn(self.broker.close(client));
        }
        self.connected = false;
        self.restarts += 1;
        self.last_error = Some(reason.clone());
        if self.is_closed() {
            return;
        }
        if !self.intensity.allow(Instant::now()) {
            self.failed = true;
            log::error!(
                "publisher {} FAILED: restarted more than {} times within {} s (events.max_restarts, events.restart_window); it stops reconnecting and /health is critical. Last error: {reason}. {} events are kept in its buffer (the oldest are dropped past its capacity) and are reported undelivered at shutdown; fix the broker and restart the server",
                self.name(),
                self.max_restarts,
                self.restart_window,
                self.buffer.len()
            );
            self.answer_settled();
            self.maybe_finish_close(ctx);
            return;
        }
        log::warn!(
            "publisher {}: {reason}; restarting its connection ({} restart(s) in the last {} s, limit {}); {} events buffered",
            self.name(),
            self.intensity.in_window(),
            self.restart_window,
            self.max_restarts,
            self.buffer.len()
        );
        self.retry_later(ctx);
    }

    fn retry_later(&mut self, ctx: &mut Context<Self>) {
        let mut delay = self.backoff.next_delay();
        if matches!(self.closing, Closing::Flushing(_)) {
            delay = delay.min(CLOSING_RETRY_CAP);
        }
        let handle = ctx.run_later(delay, |act, ctx| {
            act.op = Op::Idle;
            act.pump(ctx);
        });
        self.op = Op::Waiting(handle);
    }

    fn accept(&mut self, event: SharedEvent, ctx: &mut Context<Self>) -> Result<(), PublishError> {
        if self.is_closed() {
            self.rejected += 1;
            let error = PublishError::Closed {
                publisher: self.name(),
            };
            if self.rejected == 1 {
                log::error!(
                    "{error}: event {} ({} of {}) was not published; later ones are counted as undelivered",
                    event.id,
                    event.kind.as_str(),
                    event.key
                );
            }
            return Err(error);
        }
        self.accepted += 1;
        if let Some(dropped) = self.buffer.push(event) {
            log::debug!(
                "publisher {}: buffer full, dropped event {} ({} of {})",
                self.name(),
                dropped.id,
                dropped.kind.as_str(),
                dropped.key
            );
        }
        self.pump(ctx);
        self.answer_settled();
        Ok(())
    }

    /// Answers `Settle` once what was accepted before it is acknowledged or dropped:
    /// `true` when none was dropped meanwhile; `false` at once when nothing more can be
    /// delivered (failed or closed).
    pub(super) fn settle(&mut self, answer: oneshot::Sender<bool>) {
        self.settling.push(Settling {
            upto: self.accepted,
            dropped_before: self.buffer.dropped(),
            answer,
        });
        self.answer_settled();
    }

    fn answer_settled(&mut self) {
        if self.settling.is_empty() {
            return;
        }
        let (done, dropped) = (
            self.delivered + self.buffer.dropped(),
            self.buffer.dropped(),
        );
        let gave_up = self.failed || self.is_closed();
        for waiter in std::mem::take(&mut self.settling) {
            if gave_up {
                let _ = waiter.answer.send(false);
            } else if done >= waiter.upto {
                let _ = waiter.answer.send(dropped == waiter.dropped_before);
            } else {
                self.settling.push(waiter);
            }
        }
    }

    fn report_burst(&self, burst: Option<Burst>) {
        if let Some(burst) = burst {
            log::warn!(
                "publisher {}: buffer full ({} events, events.{}.buffer_capacity): dropped the {} oldest undelivered events over {:.1} s ({} dropped since start); consumers will see gaps in those agents' seq",
                self.name(),
                self.buffer.len(),
                self.name(),
                burst.dropped,
                burst.started.elapsed().as_secs_f64(),
                self.buffer.dropped()
            );
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let burst = self.buffer.end_burst_older_than(LONGEST_UNREPORTED_BURST);
        self.report_burst(burst);
        if self.op == Op::Idle
            && self.client.is_some()
            && self.buffer.is_empty()
            && !self.failed
            && !self.is_closed()
        {
            self.check(ctx);
        }
    }

    fn report(&self) -> FlushReport {
        FlushReport {
            name: self.name().to_owned(),
            delivered: self.delivered,
            undelivered: self.buffer.len() as u64 + self.buffer.dropped() + self.rejected,
        }
    }

    /// Finishes a close in progress once nothing is left to deliver (or nothing can
    /// be delivered any more).
    fn maybe_finish_close(&mut self, ctx: &mut Context<Self>) {
        if matches!(self.closing, Closing::Flushing(_))
            && ((self.buffer.is_empty() && self.op != Op::Sending) || self.failed)
        {
            self.finish_close(ctx);
        }
    }

    fn finish_close(&mut self, _ctx: &mut Context<Self>) {
        if !matches!(self.closing, Closing::Flushing(_)) {
            return;
        }
        let Closing::Flushing(waiters) = std::mem::replace(&mut self.closing, Closing::Open) else {
            return;
        };
        let burst = self.buffer.end_burst();
        self.report_burst(burst);
        let report = self.report();
        if self.buffer.is_empty() {
            log::info!(
                "publisher {}: closed; {} events delivered since start, {} undelivered",
                self.name(),
                report.delivered,
                report.undelivered
            );
        } else {
            log::warn!(
                "publisher {}: closed with {} events still buffered (not delivered: {}); {} delivered since start, {} undelivered in all",
                self.name(),
                self.buffer.len(),
                self.last_error.as_deref().unwrap_or("the broker did not acknowledge them in time"),
                report.delivered,
                report.undelivered
            );
        }
        for waiter in waiters {
            let _ = waiter.send(report.clone());
        }
        self.closing = Closing::Closed(report);
        self.answer_settled();
        if let Some(client) = self.client.take() {
            actix::spawn(self.broker.close(client));
        }
        self.connected = false;
    }
}

fn panic_message(error: tokio::task::JoinError) -> String {
    if !error.is_panic() {
        return "the operation was cancelled".into();
    }
    let payload = error.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

//! The publisher interface: what the event bus needs of a publisher actor.
//!
//! A publisher is any actor that handles [`Deliver`] (an event, in order), [`Flush`]
//! (deliver what is buffered within a deadline, at shutdown), [`Settle`] (answer once
//! what it was given so far is acknowledged) and [`QueryStatus`].
//! [`PublisherHandle::of`] wraps its address for the bus. The `log` publisher is here;
//! broker publishers live beside it: [`supervisor::BrokerPublisher`] delivers to any
//! [`broker::Broker`] (`redis`, `kafka`, `rabbitmq`) at least once, in order.

pub mod backoff;
pub mod broker;
pub mod buffer;
pub mod kafka;
pub mod log;
pub mod rabbitmq;
pub mod redis;
pub mod supervisor;

use crate::event::SharedEvent;
use actix::prelude::*;
use serde::Serialize;
use std::time::Duration;

/// One event for the publisher, in publication order.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Deliver(pub SharedEvent);

/// Deliver everything buffered within `timeout`, then report.
#[derive(Message)]
#[rtype(result = "FlushReport")]
pub struct Flush {
    /// Time the publisher gets.
    pub timeout: Duration,
}

/// Answered once every event the publisher was given before this message is settled:
/// acknowledged by its broker, or dropped (its buffer overflowed). `true` when all were
/// acknowledged; `false` as soon as the publisher cannot deliver any more (failed or
/// closed). The asker bounds the wait (a cross-node takeover waits
/// `cluster.takeover_timeout`).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Settle;

/// Asks a publisher how it is doing.
#[derive(Message)]
#[rtype(result = "PublisherStatus")]
pub struct QueryStatus;

/// What a publisher reports when flushed at shutdown.
#[derive(Debug, Clone, Serialize, MessageResponse)]
pub struct FlushReport {
    /// Publisher name (`log`, `redis`, ...).
    pub name: String,
    /// Events delivered (acknowledged by the broker) since start.
    pub delivered: u64,
    /// Events it could not deliver: still buffered at the deadline, plus dropped.
    pub undelivered: u64,
}

impl FlushReport {
    /// The report for a publisher that did not answer the flush.
    pub fn unanswered(name: String) -> Self {
        Self {
            name,
            delivered: 0,
            undelivered: 0,
        }
    }
}

/// What `/health` shows of one publisher.
#[derive(Debug, Clone, Serialize, MessageResponse)]
pub struct PublisherStatus {
    /// Publisher name.
    pub name: String,
    /// Whether it is connected to its broker (always true for `log`).
    pub connected: bool,
    /// Whether it exceeded its restart intensity and gave up.
    pub failed: bool,
    /// Events waiting to be delivered.
    pub buffered: usize,
    /// Events acknowledged since start.
    pub delivered: u64,
    /// Delivery attempts retried since start.
    pub retried: u64,
    /// Events dropped because the buffer overflowed.
    pub dropped: u64,
    /// Restarts since start.
    pub restarts: u32,
    /// The last error, if any.
    pub last_error: Option<String>,
}

impl PublisherStatus {
    /// A healthy status with nothing pending.
    pub fn healthy(name: &str, delivered: u64) -> Self {
        Self {
            name: name.to_owned(),
            connected: true,
            failed: false,
            buffered: 0,
            delivered,
            retried: 0,
            dropped: 0,
            restarts: 0,
            last_error: None,
        }
    }

    /// The status of a publisher that did not answer.
    pub fn unresponsive(name: String) -> Self {
        Self {
            connected: false,
            last_error: Some("publisher did not answer a status query within 2 s".into()),
            ..Self::healthy(&name, 0)
        }
    }
}

/// The bus's view of one publisher actor.
#[derive(Clone)]
pub struct PublisherHandle {
    /// Publisher name.
    pub name: String,
    /// Where events go.
    pub deliver: Recipient<Deliver>,
    /// Where flush requests go.
    pub flush: Recipient<Flush>,
    /// Where settle requests go.
    pub settle: Recipient<Settle>,
    /// Where status queries go.
    pub status: Recipient<QueryStatus>,
}

impl PublisherHandle {
    /// Wraps a publisher actor's address.
    pub fn of<A>(name: &str, addr: Addr<A>) -> Self
    where
        A: Actor + Handler<Deliver> + Handler<Flush> + Handler<Settle> + Handler<QueryStatus>,
        A::Context: actix::dev::ToEnvelope<A, Deliver>
            + actix::dev::ToEnvelope<A, Flush>
            + actix::dev::ToEnvelope<A, Settle>
            + actix::dev::ToEnvelope<A, QueryStatus>,
    {
        Self {
            name: name.to_owned(),
            deliver: addr.clone().recipient(),
            flush: addr.clone().recipient(),
            settle: addr.clone().recipient(),
            status: addr.recipient(),
        }
    }
}

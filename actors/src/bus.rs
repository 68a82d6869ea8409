//! The event bus actor: receives every lifecycle event once and fans it out, in order,
//! to the publisher actors (through their mailboxes) and to the server-sent-events
//! subscribers (through bounded channels).
//!
//! The bus knows publishers only as [`PublisherHandle`]s, so broker publishers plug in
//! without the registry or the bus changing.

use crate::event::SharedEvent;
use crate::publisher::{
    Deliver, Flush, FlushReport, PublisherHandle, PublisherStatus, QueryStatus, Settle,
};
use actix::prelude::*;
use futures_util::future::join_all;
use std::time::Duration;
use tokio::sync::mpsc;

/// Publishes one event to every publisher and subscriber.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish(pub SharedEvent);

/// Adds a publisher (at start-up).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddPublisher(pub PublisherHandle);

/// Subscribes to the event stream (for `GET /events`). Events published after this
/// message is handled are delivered, in order; a subscriber that falls more than
/// `events.sse_buffer` events behind is cut off (its channel closes) and counted.
#[derive(Message)]
#[rtype(result = "mpsc::Receiver<SharedEvent>")]
pub struct Subscribe;

/// Ends every `/events` subscription (at shutdown, after `network.stopped`): their
/// channels close once the events already queued are read.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseSubscribers;

/// Flushes every publisher within `timeout` and reports what each delivered.
#[derive(Message)]
#[rtype(result = "Vec<FlushReport>")]
pub struct FlushAll {
    /// Time each publisher gets.
    pub timeout: Duration,
}

/// Answered once every event published before this message is settled by every
/// publisher (acknowledged by its broker, or dropped), or when `timeout` passed:
/// `true` when every publisher acknowledged everything in time. Events published
/// from one actor before it sends this are covered (one mailbox, in order).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct SettleAll {
    /// Longest wait.
    pub timeout: Duration,
}

/// Asks for the bus's and every publisher's status.
#[derive(Message)]
#[rtype(result = "BusStatus")]
pub struct GetBusStatus;

/// What `/health` and `/stats` show of event publishing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BusStatus {
    /// Events published since start.
    pub published: u64,
    /// Server-sent-events subscribers connected now.
    pub sse_subscribers: usize,
    /// Subscribers cut off because they fell behind.
    pub sse_subscribers_cut_off: u64,
    /// One entry per publisher.
    pub publishers: Vec<PublisherStatus>,
}

/// The event bus actor.
pub struct EventBus {
    publishers: Vec<PublisherHandle>,
    subscribers: Vec<mpsc::Sender<SharedEvent>>,
    subscriber_buffer: usize,
    published: u64,
    cut_off: u64,
}

impl EventBus {
    /// A bus whose SSE subscribers may fall `subscriber_buffer` events behind.
    pub fn new(subscriber_buffer: usize) -> Self {
        Self {
            publishers: Vec::new(),
            subscribers: Vec::new(),
            subscriber_buffer: subscriber_buffer.max(1),
            published: 0,
            cut_off: 0,
        }
    }
}

impl Actor for EventBus {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(usize::MAX >> 4);
    }
}

impl Handler<Publish> for EventBus {
    type Result = ();

    fn handle(&mut self, msg: Publish, _ctx: &mut Self::Context) {
        self.published += 1;
        for publisher in &self.publishers {
            publisher.deliver.do_send(Deliver(msg.0.clone()));
        }
        let before = self.subscribers.len();
        self.subscribers.retain(|tx| match tx.try_send(msg.0.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                log::warn!("an event stream subscriber fell behind by more than its buffer and was cut off; it can reconnect");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        self.cut_off += before.saturating_sub(self.subscribers.len()) as u64;
    }
}

impl Handler<AddPublisher> for EventBus {
    type Result = ();

    fn handle(&mut self, msg: AddPublisher, _ctx: &mut Self::Context) {
        self.publishers.push(msg.0);
    }
}

impl Handler<Subscribe> for EventBus {
    type Result = MessageResult<Subscribe>;

    fn handle(&mut self, _msg: Subscribe, _ctx: &mut Self::Context) -> Self::Result {
        // Closed subscribers are pruned here as well as on publish.
        self.subscribers.retain(|tx| !tx.is_closed());
        let (tx, rx) = mpsc::channel(self.subscriber_buffer);
        self.subscribers.push(tx);
        MessageResult(rx)
    }
}

impl Handler<CloseSubscribers> for EventBus {
    type Result = ();

    fn handle(&mut self, _msg: CloseSubscribers, _ctx: &mut Self::Context) {
        self.subscribers.clear();
    }
}

impl Handler<FlushAll> for EventBus {
    type Result = ResponseFuture<Vec<FlushReport>>;

    fn handle(&mut self, msg: FlushAll, _ctx: &mut Self::Context) -> Self::Result {
        let flushes: Vec<_> = self
            .publishers
            .iter()
            .map(|p| {
                let name = p.name.clone();
                let request = p.flush.send(Flush {
                    timeout: msg.timeout,
                });
                async move {
                    let grace = msg.timeout + Duration::from_secs(1);
                    match tokio::time::timeout(grace, request).await {
                        Ok(Ok(report)) => report,
                        _ => FlushReport::unanswered(name),
                    }
                }
            })
            .collect();
        Box::pin(join_all(flushes))
    }
}

impl Handler<SettleAll> for EventBus {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, msg: SettleAll, _ctx: &mut Self::Context) -> Self::Result {
        let settles: Vec<_> = self
            .publishers
            .iter()
            .map(|p| p.settle.send(Settle))
            .collect();
        Box::pin(async move {
            let all = join_all(settles);
            match tokio::time::timeout(msg.timeout, all).await {
                Ok(answers) => answers.into_iter().all(|answer| answer == Ok(true)),
                Err(_) => false,
            }
        })
    }
}

impl Handler<GetBusStatus> for EventBus {
    type Result = ResponseFuture<BusStatus>;

    fn handle(&mut self, _msg: GetBusStatus, _ctx: &mut Self::Context) -> Self::Result {
        self.subscribers.retain(|tx| !tx.is_closed());
        let published = self.published;
        let sse_subscribers = self.subscribers.len();
        let sse_subscribers_cut_off = self.cut_off;
        let queries: Vec<_> = self
            .publishers
            .iter()
            .map(|p| {
                let name = p.name.clone();
                let request = p.status.send(QueryStatus);
                async move {
                    match tokio::time::timeout(Duration::from_secs(2), request).await {
                        Ok(Ok(status)) => status,
                        _ => PublisherStatus::unresponsive(name),
                    }
                }
            })
            .collect();
        Box::pin(async move {
            BusStatus {
                published,
                sse_subscribers,
                sse_subscribers_cut_off,
                publishers: join_all(queries).await,
            }
        })
    }
}

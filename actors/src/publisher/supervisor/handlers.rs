//! How a [`BrokerPublisher`] answers its messages: the actor's start, events offered,
//! close, flush, status queries and loss reports from its client.

use super::{BrokerPublisher, Close, Closing, ConnectionLost, Op, PublishError, TryDeliver};
use crate::publisher::broker::Broker;
use crate::publisher::{Deliver, Flush, FlushReport, PublisherStatus, QueryStatus, Settle};
use actix::prelude::*;
use tokio::sync::oneshot;

impl<B: Broker> Actor for BrokerPublisher<B> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.broker.health_check_interval(), |act, ctx| {
            act.tick(ctx)
        });
        self.pump(ctx);
    }
}

impl<B: Broker> Handler<Deliver> for BrokerPublisher<B> {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        let _ = self.accept(msg.0, ctx);
    }
}

impl<B: Broker> Handler<TryDeliver> for BrokerPublisher<B> {
    type Result = Result<(), PublishError>;

    fn handle(&mut self, msg: TryDeliver, ctx: &mut Self::Context) -> Self::Result {
        self.accept(msg.0, ctx)
    }
}

impl<B: Broker> Handler<Close> for BrokerPublisher<B> {
    type Result = ResponseFuture<FlushReport>;

    fn handle(&mut self, msg: Close, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        match &mut self.closing {
            Closing::Closed(report) => {
                let report = report.clone();
                return Box::pin(async move { report });
            }
            Closing::Flushing(waiters) => waiters.push(tx),
            Closing::Open => {
                self.closing = Closing::Flushing(vec![tx]);
                ctx.run_later(msg.timeout, |act, ctx| act.finish_close(ctx));
                // Retry now rather than after a long backoff: the deadline is near.
                if let Op::Waiting(handle) = self.op {
                    ctx.cancel_future(handle);
                    self.op = Op::Idle;
                }
                self.pump(ctx);
                self.maybe_finish_close(ctx);
            }
        }
        let name = self.name().to_owned();
        Box::pin(async move { rx.await.unwrap_or_else(|_| FlushReport::unanswered(name)) })
    }
}

impl<B: Broker> Handler<Flush> for BrokerPublisher<B> {
    type Result = ResponseFuture<FlushReport>;

    /// The bus flushes publishers only at shutdown: a flush closes the publisher.
    fn handle(&mut self, msg: Flush, ctx: &mut Self::Context) -> Self::Result {
        <Self as Handler<Close>>::handle(
            self,
            Close {
                timeout: msg.timeout,
            },
            ctx,
        )
    }
}

impl<B: Broker> Handler<Settle> for BrokerPublisher<B> {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, _msg: Settle, _ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.settle(tx);
        Box::pin(async move { rx.await.unwrap_or(false) })
    }
}

impl<B: Broker> Handler<QueryStatus> for BrokerPublisher<B> {
    type Result = PublisherStatus;

    fn handle(&mut self, _msg: QueryStatus, _ctx: &mut Self::Context) -> PublisherStatus {
        PublisherStatus {
            name: self.name().to_owned(),
            connected: self.connected && self.client.is_some(),
            failed: self.failed,
            buffered: self.buffer.len(),
            delivered: self.delivered,
            retried: self.retried,
            dropped: self.buffer.dropped(),
            restarts: self.restarts,
            last_error: self.last_error.clone(),
        }
    }
}

impl<B: Broker> Handler<ConnectionLost> for BrokerPublisher<B> {
    type Result = ();

    fn handle(&mut self, msg: ConnectionLost, ctx: &mut Self::Context) {
        if msg.generation != self.generation || self.client.is_none() {
            return;
        }
        let was_connected = std::mem::replace(&mut self.connected, false);
        self.last_error = Some(msg.error.clone());
        if self.op == Op::Idle {
            self.restart(format!("connection lost: {}", msg.error), ctx);
        } else if was_connected {
            // The operation in flight fails (or recovers, when the client retries
            // on its own) and decides then.
            log::warn!(
                "publisher {}: connection lost: {}; {} events buffered meanwhile",
                self.name(),
                msg.error,
                self.buffer.len()
            );
        }
    }
}

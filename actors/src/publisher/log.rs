//! The `log` publisher: writes every event as one JSON line to the log, at info level,
//! under the target `tether::events` (`RUST_LOG=tether::events=info`).

use super::{Deliver, Flush, FlushReport, PublisherStatus, QueryStatus, Settle};
use actix::prelude::*;

/// Logs events.
#[derive(Default)]
pub struct LogPublisher {
    delivered: u64,
}

impl Actor for LogPublisher {
    type Context = Context<Self>;
}

impl Handler<Deliver> for LogPublisher {
    type Result = ();

    fn handle(&mut self, msg: Deliver, _ctx: &mut Self::Context) {
        self.delivered += 1;
        log::info!(target: "tether::events", "{}", msg.0.json);
    }
}

impl Handler<Flush> for LogPublisher {
    type Result = FlushReport;

    fn handle(&mut self, _msg: Flush, _ctx: &mut Self::Context) -> FlushReport {
        FlushReport {
            name: "log".into(),
            delivered: self.delivered,
            undelivered: 0,
        }
    }
}

impl Handler<Settle> for LogPublisher {
    type Result = bool;

    /// Every event is written as it is delivered.
    fn handle(&mut self, _msg: Settle, _ctx: &mut Self::Context) -> bool {
        true
    }
}

impl Handler<QueryStatus> for LogPublisher {
    type Result = PublisherStatus;

    fn handle(&mut self, _msg: QueryStatus, _ctx: &mut Self::Context) -> PublisherStatus {
        PublisherStatus::healthy("log", self.delivered)
    }
}

//! Support shared by the integration tests of `tether-actors`: the one place that
//! constructs lifecycle events ([`event`]), awaiting a condition with a deadline
//! instead of sleeping ([`eventually`], [`wait_status`]), and an in-memory broker
//! ([`memory::MemoryBroker`]) whose faults a test scripts.
//!
//! Each test file compiles this module on its own and uses part of it, hence the
//! `dead_code` allowance.

#![allow(dead_code)]

pub mod memory;

use actix::prelude::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_actors::event::{AgentEvent, EventSource, LifecycleEvent, SharedEvent};
use tether_actors::publisher::{PublisherStatus, QueryStatus};

/// How long a test waits for a condition before failing.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// `agent.active` of agent `alice`, incarnation 1, with sequence number `seq`.
/// Every test builds its events here, so a change of the constructor is made once.
pub fn event(seq: u64) -> SharedEvent {
    let source = EventSource::new("test", "node");
    let payload = AgentEvent::Active {
        session_id: "s-1",
        inactive_secs: 0.0,
    };
    Arc::new(LifecycleEvent::agent(
        &source,
        "alice".into(),
        1,
        seq,
        &payload,
    ))
}

/// The sequence numbers of `events`, in order.
pub fn seqs<'a>(events: impl IntoIterator<Item = &'a SharedEvent>) -> Vec<u64> {
    events.into_iter().map(|e| e.seq).collect()
}

/// Polls `condition` every few milliseconds until it holds; panics with `what` after
/// [`DEADLINE`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < end, "never {what}");
        actix::clock::sleep(Duration::from_millis(2)).await;
    }
}

/// Queries the publisher's status until `condition` holds and returns that status;
/// panics with `what` and the last status after [`DEADLINE`].
pub async fn wait_status<A>(
    addr: &Addr<A>,
    what: &str,
    condition: impl Fn(&PublisherStatus) -> bool,
) -> PublisherStatus
where
    A: Actor<Context = Context<A>> + Handler<QueryStatus>,
{
    let end = Instant::now() + DEADLINE;
    loop {
        let status = addr.send(QueryStatus).await.expect("the publisher stopped");
        if condition(&status) {
            return status;
        }
        assert!(Instant::now() < end, "never {what}: {status:?}");
        actix::clock::sleep(Duration::from_millis(2)).await;
    }
}

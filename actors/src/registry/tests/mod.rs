//! In-process tests of the registry, with collectors standing in for the connections,
//! the heartbeat and the bus, and a manual clock: the harness here, the tests by
//! subject in the files beside it.

mod lifecycle;
mod registration;
mod routing;

use super::*;
use crate::clock::ManualClock;
use crate::disconnect::Disconnect;
use crate::event::EventKind;
use crate::heartbeat::{StaleReason, Verdict};
use crate::outbound::{Batches, OutFrame};
use crate::protocol::command::Registration;
use crate::protocol::{Command, MessageKind, Request};
use crate::routes::Routed;
use crate::testing::{default_settings, json_of, take, Collector};
use serde_json::json;

/// A registry with collectors around it.
pub(super) struct Harness {
    registry: Addr<Registry>,
    routes: Arc<Routes>,
    events: Addr<Collector<Publish>>,
    watch: Addr<Collector<Watch>>,
    clock: ManualClock,
    next_session: SessionId,
}

/// A fake connection: its orders, what it was sent, its liveness clock.
pub(super) struct Agent {
    session_id: SessionId,
    orders: Addr<Collector<ConnectionOrder>>,
    frames: Addr<Collector<OutFrame>>,
    clock: Arc<ConnectionClock>,
}

impl Harness {
    pub(super) fn new() -> Self {
        Self::with(|_| {})
    }

    pub(super) fn with(tune: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = default_settings();
        tune(&mut settings);
        let events = Collector::start_new();
        let watch = Collector::start_new();
        let clock = ManualClock::starting_at(1_000_000);
        let routes = Routes::new();
        let registry = Registry::new(
            Arc::new(settings),
            EventSource::new("test", "node-test"),
            events.clone().recipient(),
            watch.clone().recipient(),
            b"secret".to_vec(),
            routes.clone(),
        )
        .with_clock(Clock::Manual(clock.clone()))
        .start();
        Self {
            registry,
            routes,
            events,
            watch,
            clock,
            next_session: 1,
        }
    }

    /// Opens a socket.
    pub(super) async fn connect(&mut self) -> Agent {
        let session_id = self.next_session;
        self.next_session += 1;
        let orders = Collector::start_new();
        let frames = Collector::start_new();
        let outbox = Outbox::forwarding_to(frames.clone().recipient());
        self.registry
            .send(Connected {
                session_id,
                orders: orders.clone().recipient(),
                outbox,
                remote_addr: "127.0.0.1:9".into(),
            })
            .await
            .unwrap();
        Agent {
            session_id,
            orders,
            frames,
            clock: Arc::new(ConnectionClock::starting_at(self.clock.now_ms())),
        }
    }

    pub(super) async fn register(&self, agent: &Agent, agent_id: &str, force_reconnect: bool) {
        let registration = Registration {
            agent_id: agent_id.into(),
            metadata: json!({"name": agent_id}),
            certificate: None,
            force_reconnect,
        };
        self.registry
            .send(RegisterAgent {
                session_id: agent.session_id,
                registration,
                request_id: Some(json!("r1")),
                clock: agent.clock.clone(),
            })
            .await
            .unwrap();
    }

    /// The events published so far: type, agent, incarnation, seq.
    pub(super) async fn events(&self) -> Vec<(EventKind, String, u64, u64)> {
        take(&self.events)
            .await
            .into_iter()
            .map(|Publish(e)| (e.kind, e.key.to_string(), e.incarnation, e.seq))
            .collect()
    }

    pub(super) async fn event_documents(&self) -> Vec<Value> {
        take(&self.events)
            .await
            .into_iter()
            .map(|Publish(e)| serde_json::from_str(&e.json).unwrap())
            .collect()
    }
}

impl Agent {
    /// The text frames the agent was sent so far, parsed.
    pub(super) async fn received(&self) -> Vec<Value> {
        crate::outbound::relay::delivered().await;
        take(&self.frames).await.iter().map(json_of).collect()
    }

    pub(super) async fn orders(&self) -> Vec<ConnectionOrder> {
        crate::outbound::relay::delivered().await;
        take(&self.orders).await
    }
}

pub(super) fn closed_with(orders: &[ConnectionOrder]) -> Option<Disconnect> {
    orders.iter().find_map(|order| match order {
        ConnectionOrder::Close { disconnect, .. } => Some(*disconnect),
        _ => None,
    })
}

impl Harness {
    /// Routes a message from `sender`, registered as `sender_id`, as its connection does.
    pub(super) fn route(&self, kind: MessageKind, sender: &Agent, sender_id: &str) -> Routed {
        let frame = OutFrame::text(r#"{"type":"message","data":{}}"#);
        let mut out = Batches::default();
        let routed = self
            .routes
            .route(sender.session_id, sender_id, &kind, frame, &mut out);
        out.send();
        routed
    }
}

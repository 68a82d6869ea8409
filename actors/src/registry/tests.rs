//! In-process tests of the registry: registration races, takeover order, stale
//! holders, routing, slow consumers and inactivity, with collectors standing in for
//! the connections, the heartbeat and the bus, and a manual clock.

use super::*;
use crate::clock::ManualClock;
use crate::disconnect::Disconnect;
use crate::event::EventKind;
use crate::heartbeat::{StaleReason, Verdict};
use crate::outbound::OutFrame;
use crate::protocol::command::Registration;
use crate::protocol::{Command, MessageKind, Request};
use crate::testing::{default_settings, json_of, take, Collector};
use serde_json::json;

/// A registry with collectors around it.
struct Harness {
    registry: Addr<Registry>,
    events: Addr<Collector<Publish>>,
    watch: Addr<Collector<Watch>>,
    clock: ManualClock,
    next_session: SessionId,
}

/// A fake connection: its orders, what it was sent, its liveness clock.
struct Agent {
    session_id: SessionId,
    orders: Addr<Collector<ConnectionOrder>>,
    frames: Addr<Collector<OutFrame>>,
    clock: Arc<ConnectionClock>,
}

impl Harness {
    fn new() -> Self {
        Self::with(|_| {})
    }

    fn with(tune: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = default_settings();
        tune(&mut settings);
        let events = Collector::start_new();
        let watch = Collector::start_new();
        let clock = ManualClock::starting_at(1_000_000);
        let registry = Registry::new(
            Arc::new(settings),
            EventSource::new("test", "node-test"),
            events.clone().recipient(),
            watch.clone().recipient(),
            b"secret".to_vec(),
        )
        .with_clock(Clock::Manual(clock.clone()))
        .start();
        Self {
            registry,
            events,
            watch,
            clock,
            next_session: 1,
        }
    }

    /// Opens a socket.
    async fn connect(&mut self) -> Agent {
        let session_id = self.next_session;
        self.next_session += 1;
        let orders = Collector::start_new();
        let frames = Collector::start_new();
        let outbox = Outbox::new(frames.clone().recipient());
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

    async fn register(&self, agent: &Agent, agent_id: &str, force_reconnect: bool) {
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
    async fn events(&self) -> Vec<(EventKind, String, u64, u64)> {
        take(&self.events)
            .await
            .into_iter()
            .map(|Publish(e)| (e.kind, e.key.to_string(), e.incarnation, e.seq))
            .collect()
    }

    async fn event_documents(&self) -> Vec<Value> {
        take(&self.events)
            .await
            .into_iter()
            .map(|Publish(e)| serde_json::from_str(&e.json).unwrap())
            .collect()
    }
}

impl Agent {
    /// The text frames the agent was sent so far, parsed.
    async fn received(&self) -> Vec<Value> {
        take(&self.frames).await.iter().map(json_of).collect()
    }

    async fn orders(&self) -> Vec<ConnectionOrder> {
        take(&self.orders).await
    }
}

fn closed_with(orders: &[ConnectionOrder]) -> Option<Disconnect> {
    orders.iter().find_map(|order| match order {
        ConnectionOrder::Close { disconnect, .. } => Some(*disconnect),
        _ => None,
    })
}

#[actix::test]
async fn a_registration_is_answered_watched_and_published() {
    let mut h = Harness::new();
    let alice = h.connect().await;
    h.register(&alice, "alice", false).await;

    let orders = alice.orders().await;
    assert!(matches!(&orders[..], [ConnectionOrder::Registered(id)] if &**id == "alice"));
    let answer = &alice.received().await[0];
    assert_eq!(answer["success"], true);
    assert_eq!(answer["request_id"], "r1");
    assert_eq!(answer["incarnation"], 1);
    let watched = take(&h.watch).await;
    assert!(matches!(&watched[..], [Watch::Track { agent_id, .. }] if &**agent_id == "alice"));
    let events = h.event_documents().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "agent.registered");
    assert_eq!(events[0]["data"]["seq"], 1);
    assert_eq!(events[0]["data"]["metadata"]["name"], "alice");
    assert_eq!(events[0]["data"]["takeover"], Value::Null);
}

#[actix::test]
async fn a_live_id_without_proof_is_refused_and_the_refusal_published() {
    let mut h = Harness::new();
    let alice = h.connect().await;
    let intruder = h.connect().await;
    h.register(&alice, "alice", false).await;
    h.register(&intruder, "alice", false).await;

    assert!(matches!(
        &intruder.orders().await[..],
        [ConnectionOrder::Refused(None)]
    ));
    let answer = &intruder.received().await[0];
    assert_eq!(answer["success"], false);
    assert_eq!(answer["error_code"], "agent_id_in_use");
    let events = h.events().await;
    assert_eq!(
        events[1],
        (EventKind::RegistrationFailed, "alice".into(), 0, 0)
    );
    assert!(closed_with(&alice.orders().await).is_none());
}

#[actix::test]
async fn simultaneous_registrations_of_one_id_have_exactly_one_winner() {
    let mut h = Harness::new();
    let mut agents = Vec::new();
    for _ in 0..20 {
        agents.push(h.connect().await);
    }
    // All in the registry's mailbox before any is handled.
    let sends: Vec<_> = agents
        .iter()
        .map(|a| h.register(a, "contested", false))
        .collect();
    futures_util::future::join_all(sends).await;

    let mut winners = 0;
    for agent in &agents {
        let orders = agent.orders().await;
        winners += usize::from(matches!(&orders[..], [ConnectionOrder::Registered(_)]));
    }
    assert_eq!(winners, 1);
    let events = h.events().await;
    let registered = events
        .iter()
        .filter(|e| e.0 == EventKind::Registered)
        .count();
    let refused = events
        .iter()
        .filter(|e| e.0 == EventKind::RegistrationFailed)
        .count();
    assert_eq!((registered, refused), (1, 19));
}

#[actix::test]
async fn a_takeover_ends_the_old_incarnation_before_publishing_the_new_one() {
    let mut h = Harness::new();
    let old = h.connect().await;
    let new = h.connect().await;
    h.register(&old, "alice", false).await;
    h.register(&new, "alice", true).await;

    let events = h.events().await;
    let expected = vec![
        (EventKind::Registered, "alice".to_string(), 1, 1),
        (EventKind::Replaced, "alice".into(), 1, 2),
        (EventKind::Disconnected, "alice".into(), 1, 3),
        (EventKind::CleanedUp, "alice".into(), 1, 4),
        (EventKind::Registered, "alice".into(), 2, 1),
    ];
    assert_eq!(events, expected);
    let orders = old.orders().await;
    assert_eq!(closed_with(&orders), Some(Disconnect::REPLACED));
    let notice = orders.iter().find_map(|order| match order {
        ConnectionOrder::Close { notice, .. } => notice.clone(),
        _ => None,
    });
    let notice: Value = serde_json::from_str(&notice.expect("a takeover notice")).unwrap();
    assert_eq!(notice["event"], "connection_replaced");
    let watched: Vec<_> = take(&h.watch)
        .await
        .into_iter()
        .map(|w| match w {
            Watch::Track { session_id, .. } => ("track", session_id),
            Watch::Untrack { session_id } => ("untrack", session_id),
        })
        .collect();
    let expected = [
        ("track", old.session_id),
        ("untrack", old.session_id),
        ("track", new.session_id),
    ];
    assert_eq!(watched, expected);
}

#[actix::test]
async fn force_reconnect_is_refused_when_the_settings_forbid_it() {
    let mut h = Harness::with(|s| s.identity.allow_force_reconnect = false);
    let old = h.connect().await;
    let new = h.connect().await;
    h.register(&old, "alice", false).await;
    h.register(&new, "alice", true).await;
    assert_eq!(new.received().await[0]["error_code"], "agent_id_in_use");
    assert!(closed_with(&old.orders().await).is_none());
}

#[actix::test]
async fn a_holder_silent_past_the_stale_bound_is_declared_stale_when_its_id_is_claimed() {
    let mut h = Harness::new();
    let old = h.connect().await;
    let new = h.connect().await;
    h.register(&old, "alice", false).await;
    let rules = Liveness::new(&default_settings().heartbeat);
    h.clock.advance(rules.stale_bound_ms() + 1);
    h.register(&new, "alice", false).await;

    let kinds: Vec<_> = h.events().await.into_iter().map(|e| (e.0, e.2)).collect();
    let expected = [
        (EventKind::Registered, 1),
        (EventKind::Stale, 1),
        (EventKind::Disconnected, 1),
        (EventKind::CleanedUp, 1),
        (EventKind::Registered, 2),
    ];
    assert_eq!(kinds, expected);
    assert_eq!(closed_with(&old.orders().await), Some(Disconnect::STALE));
}

#[actix::test]
async fn a_holder_within_the_stale_bound_keeps_its_id() {
    let mut h = Harness::new();
    let old = h.connect().await;
    let new = h.connect().await;
    h.register(&old, "alice", false).await;
    let rules = Liveness::new(&default_settings().heartbeat);
    h.clock.advance(rules.stale_bound_ms());
    h.register(&new, "alice", false).await;
    assert_eq!(new.received().await[0]["error_code"], "agent_id_in_use");
}

#[actix::test]
async fn a_connection_end_is_published_once_even_if_reported_twice() {
    let mut h = Harness::new();
    let alice = h.connect().await;
    h.register(&alice, "alice", false).await;
    for _ in 0..2 {
        h.registry
            .send(ConnectionEnded {
                session_id: alice.session_id,
                agent_id: Some("alice".into()),
                disconnect: Disconnect::CLIENT_CLOSED,
            })
            .await
            .unwrap();
    }
    let documents = h.event_documents().await;
    let types: Vec<_> = documents.iter().map(|d| d["type"].clone()).collect();
    assert_eq!(
        types,
        ["agent.registered", "agent.disconnected", "agent.cleaned_up"]
    );
    assert_eq!(documents[1]["data"]["reason"], "client_closed");
    assert_eq!(documents[1]["data"]["close_code"], 1000);
    let stats = h.registry.send(GetStats).await.unwrap();
    assert_eq!((stats.registered_agents, stats.open_sockets), (0, 0));
}

fn message(kind: MessageKind, sender: &Agent, sender_id: &str) -> Route {
    Route {
        session_id: sender.session_id,
        sender_id: sender_id.into(),
        kind,
        frame: OutFrame::text(r#"{"type":"message","data":{}}"#),
        message_id: "m1".into(),
    }
}

#[actix::test]
async fn a_direct_message_reaches_its_target_and_an_unknown_target_is_answered() {
    let mut h = Harness::new();
    let alice = h.connect().await;
    let bob = h.connect().await;
    h.register(&alice, "alice", false).await;
    h.register(&bob, "bob", false).await;
    alice.received().await;
    bob.received().await;

    let to_bob = message(MessageKind::Direct("bob".into()), &alice, "alice");
    h.registry.send(to_bob).await.unwrap();
    assert_eq!(
        bob.received().await,
        [json!({"type": "message", "data": {}})]
    );

    let to_nobody = message(MessageKind::Direct("carol".into()), &alice, "alice");
    h.registry.send(to_nobody).await.unwrap();
    let error = &alice.received().await[0];
    assert_eq!(error["type"], "error");
    assert_eq!(error["error_code"], "unknown_agent");
    assert_eq!(error["message_id"], "m1");
}

#[actix::test]
async fn a_broadcast_reaches_everyone_but_the_sender_and_the_excluded() {
    let mut h = Harness::new();
    let mut agents = Vec::new();
    for id in ["a", "b", "c", "d"] {
        let agent = h.connect().await;
        h.register(&agent, id, false).await;
        agents.push(agent);
    }
    for agent in &agents {
        agent.received().await;
    }
    let broadcast = message(MessageKind::Broadcast(vec!["c".into()]), &agents[0], "a");
    h.registry.send(broadcast).await.unwrap();
    let mut counts = Vec::new();
    for agent in &agents {
        counts.push(agent.received().await.len());
    }
    assert_eq!(counts, [0, 1, 0, 1]);
}

#[actix::test]
async fn a_message_from_a_replaced_sender_is_dropped() {
    let mut h = Harness::new();
    let old = h.connect().await;
    let new = h.connect().await;
    let bob = h.connect().await;
    h.register(&old, "alice", false).await;
    h.register(&bob, "bob", false).await;
    h.register(&new, "alice", true).await;
    bob.received().await;
    let late = message(MessageKind::Direct("bob".into()), &old, "alice");
    h.registry.send(late).await.unwrap();
    assert!(bob.received().await.is_empty());
}

#[actix::test]
async fn inactivity_is_published_once_and_ended_by_activity() {
    let mut h = Harness::new();
    let alice = h.connect().await;
    h.register(&alice, "alice", false).await;
    let idle_since = alice.clock.last_activity_ms();
    let verdict = Verdict::Inactive {
        session_id: alice.session_id,
        last_activity_ms: idle_since,
        inactive_secs: 120.0,
    };
    h.registry.send(verdict.clone()).await.unwrap();
    h.registry.send(verdict).await.unwrap();
    let stats = h.registry.send(GetStats).await.unwrap();
    assert_eq!(stats.inactive_agents, 1);

    alice.clock.active(idle_since + 1);
    let resumed = ActivityResumed {
        session_id: alice.session_id,
    };
    h.registry.send(resumed).await.unwrap();
    let kinds: Vec<_> = h.events().await.into_iter().map(|e| (e.0, e.3)).collect();
    let expected = [
        (EventKind::Registered, 1),
        (EventKind::Inactive, 2),
        (EventKind::Active, 3),
    ];
    assert_eq!(kinds, expected);
    let stats = h.registry.send(GetStats).await.unwrap();
    assert_eq!(stats.inactive_agents, 0);
}

#[actix::test]
async fn an_inactive_verdict_is_void_when_activity_came_since() {
    let mut h = Harness::new();
    let alice = h.connect().await;
    h.register(&alice, "alice", false).await;
    let idle_since = alice.clock.last_activity_ms();
    // The agent spoke after the heartbeat decided, before its verdict arrived.
    alice.clock.active(idle_since + 5);
    let resumed = ActivityResumed {
        session_id: alice.session_id,
    };
    h.registry.send(resumed).await.unwrap();
    let verdict = Verdict::Inactive {
        session_id: alice.session_id,
        last_activity_ms: idle_since,
        inactive_secs: 120.0,
    };
    h.registry.send(verdict).await.unwrap();
    let kinds: Vec<_> = h.events().await.into_iter().map(|e| e.0).collect();
    assert_eq!(kinds, [EventKind::Registered]);
}

#[actix::test]
async fn a_stale_verdict_publishes_stale_then_the_end_and_closes_4002() {
    let mut h = Harness::new();
    let alice = h.connect().await;
    h.register(&alice, "alice", false).await;
    let verdict = Verdict::Stale {
        session_id: alice.session_id,
        reason: StaleReason::PingTimeout,
        last_seen_ms: h.clock.now_ms(),
    };
    h.registry.send(verdict).await.unwrap();
    let documents = h.event_documents().await;
    assert_eq!(documents[1]["type"], "agent.stale");
    assert_eq!(documents[1]["data"]["reason"], "ping_timeout");
    assert_eq!(documents[2]["data"]["reason"], "stale");
    assert_eq!(documents[2]["data"]["close_code"], 4002);
    assert_eq!(closed_with(&alice.orders().await), Some(Disconnect::STALE));
}

#[actix::test]
async fn list_agents_needs_a_registered_connection() {
    let mut h = Harness::new();
    let stranger = h.connect().await;
    let request = Request {
        command: Command::ListAgents,
        request_id: None,
    };
    let ask = SystemRequest {
        session_id: stranger.session_id,
        request,
    };
    h.registry.send(ask).await.unwrap();
    assert_eq!(stranger.received().await[0]["error_code"], "not_registered");
}

#[actix::test]
async fn shutdown_refuses_registrations_with_1001_and_close_all_closes_everyone() {
    let mut h = Harness::new();
    let alice = h.connect().await;
    let late = h.connect().await;
    h.register(&alice, "alice", false).await;
    let agents = h
        .registry
        .send(BeginShutdown { timeout_secs: 1.0 })
        .await
        .unwrap();
    assert_eq!(agents, 1);
    h.register(&late, "late", false).await;
    let refusal = late.received().await.pop().unwrap();
    assert_eq!(refusal["error_code"], "shutting_down");
    let orders = late.orders().await;
    let refused = orders
        .iter()
        .any(|o| matches!(o, ConnectionOrder::Refused(Some(d)) if *d == Disconnect::SHUTDOWN));
    assert!(refused);
    assert_eq!(h.registry.send(CloseAll).await.unwrap(), 1);
    assert_eq!(
        closed_with(&alice.orders().await),
        Some(Disconnect::SHUTDOWN)
    );
}

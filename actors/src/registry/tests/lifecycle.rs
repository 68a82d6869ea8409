//! Ends of incarnations, heartbeat verdicts, inactivity and shutdown.

use super::*;

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
async fn shutdown_refuses_registrations_with_1001_and_close_all_closes_everyone() {
    let mut h = Harness::new();
    let alice = h.connect().await;
    let late = h.connect().await;
    h.register(&alice, "alice", false).await;
    let agents = h
        .registry
        .send(BeginShutdown {
            timeout_secs: 1.0,
            reconnect_url: None,
        })
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

//! Direct and broadcast routing, and requests that need the table.

use super::*;
use crate::protocol::command::Page;

#[actix::test]
async fn a_direct_message_reaches_its_target_and_an_unknown_target_is_reported() {
    let mut h = Harness::new();
    let alice = h.connect().await;
    let bob = h.connect().await;
    h.register(&alice, "alice", false).await;
    h.register(&bob, "bob", false).await;
    alice.received().await;
    bob.received().await;

    let to_bob = h.route(MessageKind::Direct("bob".into()), &alice, "alice");
    assert_eq!(to_bob, Routed::Sent(1));
    assert_eq!(
        bob.received().await,
        [json!({"type": "message", "data": {}})]
    );

    let to_nobody = h.route(MessageKind::Direct("carol".into()), &alice, "alice");
    assert_eq!(to_nobody, Routed::UnknownTarget);
    assert!(alice.received().await.is_empty());
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
    let broadcast = h.route(MessageKind::Broadcast(vec!["c".into()]), &agents[0], "a");
    assert_eq!(broadcast, Routed::Sent(2));
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
    let late = h.route(MessageKind::Direct("bob".into()), &old, "alice");
    assert_eq!(late, Routed::SenderGone);
    assert!(bob.received().await.is_empty());
    let current = h.route(MessageKind::Direct("bob".into()), &new, "alice");
    assert_eq!(current, Routed::Sent(1));
    assert_eq!(bob.received().await.len(), 1);
}

#[actix::test]
async fn list_agents_needs_a_registered_connection() {
    let mut h = Harness::new();
    let stranger = h.connect().await;
    let request = Request {
        command: Command::ListAgents(Page {
            limit: 10,
            cursor: None,
        }),
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
async fn an_agent_leaves_the_routing_table_when_its_connection_ends_or_it_goes_stale() {
    let mut h = Harness::new();
    let alice = h.connect().await;
    let bob = h.connect().await;
    let carol = h.connect().await;
    for (agent, id) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        h.register(agent, id, false).await;
    }
    assert_eq!(h.routes.len(), 3);
    let ended = ConnectionEnded {
        session_id: bob.session_id,
        agent_id: Some("bob".into()),
        disconnect: Disconnect::CLIENT_CLOSED,
    };
    h.registry.send(ended).await.unwrap();
    let to_bob = h.route(MessageKind::Direct("bob".into()), &alice, "alice");
    assert_eq!(to_bob, Routed::UnknownTarget);

    let stale = Verdict::Stale {
        session_id: carol.session_id,
        reason: StaleReason::PingTimeout,
        last_seen_ms: h.clock.now_ms(),
    };
    h.registry.send(stale).await.unwrap();
    let to_carol = h.route(MessageKind::Direct("carol".into()), &alice, "alice");
    assert_eq!(to_carol, Routed::UnknownTarget);
    let from_carol = h.route(MessageKind::Direct("alice".into()), &carol, "carol");
    assert_eq!(from_carol, Routed::SenderGone);
    assert_eq!(h.routes.len(), 1);
}

#[actix::test]
async fn a_broadcast_with_a_long_exclusion_list_skips_every_listed_agent() {
    let mut h = Harness::new();
    let mut agents = Vec::new();
    for i in 0..20 {
        let agent = h.connect().await;
        h.register(&agent, &format!("agent-{i}"), false).await;
        agents.push(agent);
    }
    let exclude: Vec<String> = (1..16).map(|i| format!("agent-{i}")).collect();
    let broadcast = h.route(MessageKind::Broadcast(exclude), &agents[0], "agent-0");
    assert_eq!(broadcast, Routed::Sent(4));
    for (i, agent) in agents.iter().enumerate() {
        let frames = agent.received().await;
        let copies = frames.iter().filter(|f| f["type"] == "message").count();
        assert_eq!(copies, usize::from(i >= 16), "agent-{i}");
    }
}

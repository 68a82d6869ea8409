//! Direct and broadcast routing, and requests that need the table.

use super::*;

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

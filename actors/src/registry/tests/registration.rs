//! Registration, refusals, races for one id and takeover order.

use super::*;

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

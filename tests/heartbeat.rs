//! Heartbeat (PROTOCOL.md §4): pings, the stale bound, close 4002, the inactive and
//! active states, and reconnecting after being declared stale.

mod common;

use common::{agent_events, Agent, Closed, EventStream, TestServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Short heartbeat: ping after 1 s of silence, stale 0.5 s later, fine ticks.
const FAST: [(&str, &str); 4] = [
    ("TETHER__HEARTBEAT__INTERVAL", "1"),
    ("TETHER__HEARTBEAT__PING_TIMEOUT", "0.5"),
    ("TETHER__HEARTBEAT__AGENT_TIMEOUT", "3"),
    ("TETHER__HEARTBEAT__TICK", "0.05"),
];

fn is_ping(frame: &Value) -> bool {
    frame["type"] == "system_request" && frame["command"] == "ping_agent"
}

async fn admin_agent(server: &TestServer, agent_id: &str) -> Value {
    let response = common::http()
        .get(server.http(&format!("/agents/{agent_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{agent_id} is not registered");
    response.json().await.unwrap()
}

#[tokio::test]
async fn an_agent_that_answers_pings_stays_registered_over_several_intervals() {
    let server = TestServer::start(&FAST);
    let mut events = EventStream::subscribe(&server, None).await;
    let (mut alice, registered) = Agent::register(&server.ws_url(), "alice").await;
    assert_eq!(registered["heartbeat_interval"], 1.0);
    assert_eq!(registered["ping_timeout"], 0.5);
    assert_eq!(registered["agent_timeout"], 3.0);

    // Five pings at one-second intervals: well past agent_timeout (3 s) in total, so
    // only the answers keep the agent alive.
    let started = Instant::now();
    for _ in 0..5 {
        let ping = alice.wait_for(is_ping).await;
        assert_eq!(ping["agent_id"], "alice", "{ping}");
        assert!(
            ping["timestamp"].is_f64(),
            "timestamp is float epoch seconds: {ping}"
        );
        alice
            .send(
                json!({"type":"system_response","command":"ping_agent","success":true,
                         "timestamp": ping["timestamp"]}),
            )
            .await;
    }
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "pings came too fast"
    );

    let listed = alice
        .request(json!({"type":"system_request","command":"list_agents"}))
        .await;
    assert_eq!(listed["success"], true, "{listed}");
    assert_eq!(admin_agent(&server, "alice").await["incarnation"], 1);

    // A marker registration: every event published before it has been read once it
    // arrives, and none of them may be alice's end.
    let (_marker, _) = Agent::register(&server.ws_url(), "marker").await;
    let all = events
        .collect_until(|e| e["type"] == "agent.registered" && e["subject"] == "marker")
        .await;
    assert_eq!(
        agent_events(&all, "alice"),
        vec![("agent.registered".into(), 1, 1)],
        "alice must have no other event (no agent.stale)"
    );
    let stats: Value = server.get_json("/stats").await;
    assert!(
        stats["heartbeat"]["pings_sent"].as_u64() >= Some(5),
        "{stats}"
    );
    // The server measures each answered ping's round trip from the echoed timestamp:
    // the first four answers were examined before the fifth ping was sent.
    let heartbeat = &stats["heartbeat"];
    assert!(
        heartbeat["ping_rtt_samples"].as_u64() >= Some(4),
        "{heartbeat}"
    );
    let p50 = heartbeat["ping_rtt_p50_ms"]
        .as_f64()
        .expect("ping_rtt_p50_ms");
    let p99 = heartbeat["ping_rtt_p99_ms"]
        .as_f64()
        .expect("ping_rtt_p99_ms");
    assert!(0.0 < p50 && p50 <= p99, "{heartbeat}");
    assert!(p99 < 500.0, "answered within ping_timeout: {heartbeat}");
}

#[tokio::test]
async fn a_silent_agent_is_declared_stale_within_the_bound_and_closed_4002() {
    let server = TestServer::start(&FAST);
    let mut events = EventStream::subscribe(&server, None).await;
    // Measured from before the agent's last frame (its registration).
    let last_frame = Instant::now();
    let (mut alice, _) = Agent::register(&server.ws_url(), "alice").await;

    let ping = alice.wait_for(is_ping).await; // never answered
    let pinged_after = last_frame.elapsed();
    assert!(ping["timestamp"].is_f64(), "{ping}");
    assert_eq!(alice.closed().await, Closed::Code(4002));
    let closed_after = last_frame.elapsed();

    // interval + ping_timeout + 1 s
    let bound = Duration::from_secs_f64(1.0 + 0.5 + 1.0);
    assert!(
        closed_after <= bound,
        "stale after {closed_after:?}, bound {bound:?}"
    );
    assert!(
        pinged_after >= Duration::from_millis(950),
        "pinged after only {pinged_after:?} of silence"
    );
    // It was given ping_timeout to answer.
    assert!(
        closed_after >= pinged_after + Duration::from_millis(450),
        "closed {closed_after:?}, only {:?} after the ping",
        closed_after - pinged_after
    );

    let all = events
        .collect_until(|e| e["type"] == "agent.cleaned_up" && e["subject"] == "alice")
        .await;
    assert_eq!(
        agent_events(&all, "alice"),
        vec![
            ("agent.registered".into(), 1, 1),
            ("agent.stale".into(), 1, 2),
            ("agent.disconnected".into(), 1, 3),
            ("agent.cleaned_up".into(), 1, 4),
        ]
    );
    let stale = all.iter().find(|e| e["type"] == "agent.stale").unwrap();
    assert_eq!(stale["data"]["reason"], "ping_timeout", "{stale}");
    assert!(stale["data"]["last_seen"].is_number(), "{stale}");
    let disconnected = all
        .iter()
        .find(|e| e["type"] == "agent.disconnected")
        .unwrap();
    assert_eq!(disconnected["data"]["reason"], "stale", "{disconnected}");
    assert_eq!(disconnected["data"]["close_code"], 4002, "{disconnected}");

    let missing = common::http()
        .get(server.http("/agents/alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn a_stale_agent_can_register_again_with_the_same_id() {
    let server = TestServer::start(&FAST);
    let (mut alice, first) = Agent::register(&server.ws_url(), "alice").await;
    assert_eq!(alice.closed().await, Closed::Code(4002));
    // No force_reconnect, no certificate: the id is free again.
    let (mut again, second) = Agent::register(&server.ws_url(), "alice").await;
    assert_eq!(second["incarnation"], 2);
    assert_ne!(second["session_id"], first["session_id"]);
    // And the new incarnation is kept alive by its answers.
    assert_eq!(again.answer_pings(2).await, 2);
    let listed = again
        .request(json!({"type":"system_request","command":"list_agents"}))
        .await;
    assert_eq!(listed["success"], true, "{listed}");
}

#[tokio::test]
async fn a_silent_holder_does_not_block_its_id_past_the_stale_bound() {
    // The holder stops answering; a reconnecting agent without any proof gets
    // agent_id_in_use while the holder may still be alive, and the id as soon as the
    // holder has been declared stale.
    let server = TestServer::start(&FAST);
    let mut events = EventStream::subscribe(&server, None).await;
    let (mut holder, _) = Agent::register(&server.ws_url(), "alice").await;
    let mut newcomer = Agent::connect(&server.ws_url()).await;
    let refused = newcomer
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"alice"}))
        .await;
    assert_eq!(refused["error_code"], "agent_id_in_use", "{refused}");
    events
        .wait_for(|e| e["type"] == "agent.cleaned_up" && e["subject"] == "alice")
        .await;
    let accepted = newcomer
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"alice"}))
        .await;
    assert_eq!(accepted["success"], true, "{accepted}");
    assert_eq!(accepted["incarnation"], 2);
    assert_eq!(holder.closed().await, Closed::Code(4002));
}

#[tokio::test]
async fn an_agent_without_activity_becomes_inactive_then_active_again() {
    // Long heartbeat so no pings interfere; short activity timeout.
    let server = TestServer::start(&[
        ("TETHER__HEARTBEAT__INTERVAL", "20"),
        ("TETHER__HEARTBEAT__PING_TIMEOUT", "5"),
        ("TETHER__HEARTBEAT__AGENT_TIMEOUT", "60"),
        ("TETHER__HEARTBEAT__ACTIVITY_TIMEOUT", "0.5"),
        ("TETHER__HEARTBEAT__TICK", "0.05"),
    ]);
    let mut events = EventStream::subscribe(&server, None).await;
    let quiet_since = Instant::now();
    let (mut alice, _) = Agent::register(&server.ws_url(), "alice").await;

    let mut all = events
        .collect_until(|e| e["type"] == "agent.inactive" && e["subject"] == "alice")
        .await;
    let inactive = all.last().unwrap().clone();
    assert!(quiet_since.elapsed() >= Duration::from_millis(450));
    assert!(
        inactive["data"]["inactive_secs"].as_f64() >= Some(0.45),
        "{inactive}"
    );
    let info = admin_agent(&server, "alice").await;
    assert_eq!(info["state"], "inactive", "{info}");
    let stats: Value = server.get_json("/stats").await;
    assert_eq!(stats["connections"]["inactive_agents"], 1, "{stats}");

    // Inactive agents are not cleaned up: it still works, and its traffic wakes it.
    let listed = alice
        .request(json!({"type":"system_request","command":"list_agents"}))
        .await;
    assert_eq!(listed["success"], true, "{listed}");
    all.extend(
        events
            .collect_until(|e| e["type"] == "agent.active" && e["subject"] == "alice")
            .await,
    );
    let active = all.last().unwrap().clone();
    assert!(active["data"]["inactive_secs"].is_number(), "{active}");
    assert_eq!(admin_agent(&server, "alice").await["state"], "active");

    // Exactly one agent.inactive on entering the state, one agent.active on leaving it.
    let (_marker, _) = Agent::register(&server.ws_url(), "marker").await;
    all.extend(
        events
            .collect_until(|e| e["type"] == "agent.registered" && e["subject"] == "marker")
            .await,
    );
    assert_eq!(
        agent_events(&all, "alice"),
        vec![
            ("agent.registered".into(), 1, 1),
            ("agent.inactive".into(), 1, 2),
            ("agent.active".into(), 1, 3),
        ]
    );
}

#[tokio::test]
async fn pong_answers_do_not_count_as_activity() {
    // Pings every 0.3 s, answered; activity timeout 1 s: the agent must still become
    // inactive, since answering pings is not application activity.
    let server = TestServer::start(&[
        ("TETHER__HEARTBEAT__INTERVAL", "0.3"),
        ("TETHER__HEARTBEAT__PING_TIMEOUT", "0.2"),
        ("TETHER__HEARTBEAT__AGENT_TIMEOUT", "3"),
        ("TETHER__HEARTBEAT__ACTIVITY_TIMEOUT", "1"),
        ("TETHER__HEARTBEAT__TICK", "0.05"),
    ]);
    let mut events = EventStream::subscribe(&server, None).await;
    let (mut alice, _) = Agent::register(&server.ws_url(), "alice").await;
    let answering = tokio::spawn(async move {
        alice.answer_pings(usize::MAX).await;
    });
    let inactive = events
        .wait_for(|e| e["type"] == "agent.inactive" && e["subject"] == "alice")
        .await;
    assert!(
        inactive["data"]["inactive_secs"].as_f64() >= Some(0.95),
        "{inactive}"
    );
    assert_eq!(admin_agent(&server, "alice").await["state"], "inactive");
    answering.abort();
}

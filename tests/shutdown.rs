//! Graceful shutdown on SIGTERM/SIGINT (PROTOCOL.md §7, issue #2 item 7).

mod common;

use common::{agent_events, Agent, Closed, EventStream, TestServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn shutdown_notice(agent: &mut Agent) -> Value {
    let notice = agent.wait_for(|f| f["type"] == "system_notification").await;
    assert_eq!(notice["event"], "network_shutdown", "{notice}");
    assert!(notice["message"].as_str().is_some_and(|m| !m.is_empty()));
    notice
}

#[tokio::test]
async fn sigterm_notifies_agents_waits_for_them_closes_the_rest_1001_and_exits_0() {
    let mut server = TestServer::start(&[("TETHER__SHUTDOWN__TIMEOUT", "1")]);
    let mut events = EventStream::subscribe(&server, None).await;
    let (mut leaver, _) = Agent::register(&server.ws_url(), "leaver").await;
    let (mut stayer, _) = Agent::register(&server.ws_url(), "stayer").await;

    let signalled = Instant::now();
    server.signal("TERM");
    for agent in [&mut leaver, &mut stayer] {
        let notice = shutdown_notice(agent).await;
        assert_eq!(notice["timeout"], 1.0, "{notice}");
    }
    // One agent leaves on its own; the other ignores the notice.
    leaver.close().await;
    assert_eq!(stayer.closed().await, Closed::Code(1001));
    let forced_after = signalled.elapsed();
    assert!(
        forced_after >= Duration::from_millis(900),
        "closed after {forced_after:?}, before shutdown.timeout"
    );

    let code = server.wait_exit().await;
    assert_eq!(code, Some(0), "logs:\n{}", server.logs());
    assert!(signalled.elapsed() < Duration::from_secs(10));

    let all = events
        .collect_until(|e| e["type"] == "network.stopped")
        .await;
    let types: Vec<&str> = all.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let stopping = types.iter().position(|t| *t == "network.stopping");
    let stopping = stopping.expect("no network.stopping");
    assert_eq!(all[stopping]["data"]["agents"], 2, "{}", all[stopping]);
    for id in ["leaver", "stayer"] {
        let mine = agent_events(&all[stopping..], id);
        assert_eq!(
            mine,
            vec![
                ("agent.disconnected".into(), 1, 2),
                ("agent.cleaned_up".into(), 1, 3)
            ],
            "{id}"
        );
    }
    let reason = |id: &str| {
        all.iter()
            .find(|e| e["type"] == "agent.disconnected" && e["subject"] == id)
            .map(|e| (e["data"]["reason"].clone(), e["data"]["close_code"].clone()))
            .unwrap()
    };
    assert_eq!(reason("leaver").0, "client_closed");
    assert_eq!(reason("stayer"), (json!("shutdown"), json!(1001)));
    let stopped = all.last().unwrap();
    assert_eq!(stopped["data"]["left_gracefully"], 1, "{stopped}");
    assert_eq!(stopped["data"]["forced"], 1, "{stopped}");

    let logs = server.logs();
    assert!(
        logs.contains("1 left gracefully") && logs.contains("1 forced"),
        "the shutdown summary is logged:\n{logs}"
    );
    assert!(!logs.contains("panicked"), "{logs}");
}

#[tokio::test]
async fn sigint_with_agents_that_leave_exits_without_waiting_for_the_timeout() {
    let mut server = TestServer::start(&[("TETHER__SHUTDOWN__TIMEOUT", "30")]);
    let (mut a, _) = Agent::register(&server.ws_url(), "a").await;
    let (mut b, _) = Agent::register(&server.ws_url(), "b").await;
    let signalled = Instant::now();
    server.signal("INT");
    shutdown_notice(&mut a).await;
    shutdown_notice(&mut b).await;
    a.close().await;
    b.close().await;
    assert_eq!(server.wait_exit().await, Some(0), "{}", server.logs());
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "waited {:?} although every agent had left",
        signalled.elapsed()
    );
}

#[tokio::test]
async fn registrations_are_refused_during_shutdown() {
    let server = TestServer::start(&[("TETHER__SHUTDOWN__TIMEOUT", "5")]);
    let (mut holder, _) = Agent::register(&server.ws_url(), "holder").await;
    let mut late = Agent::connect(&server.ws_url()).await;
    server.signal("TERM");
    shutdown_notice(&mut holder).await;
    // An open, unregistered socket is told too, and may no longer register.
    shutdown_notice(&mut late).await;
    let answer = late
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"late"}))
        .await;
    assert_eq!(answer["success"], false, "{answer}");
    assert_eq!(answer["error_code"], "shutting_down", "{answer}");
    assert_eq!(late.closed().await, Closed::Code(1001));
    // New WebSocket connections are not accepted.
    let refused = tokio_tungstenite::connect_async(server.ws_url()).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted during shutdown"
    );
}

#[tokio::test]
async fn a_second_signal_forces_exit() {
    let mut server = TestServer::start(&[("TETHER__SHUTDOWN__TIMEOUT", "60")]);
    let (mut stayer, _) = Agent::register(&server.ws_url(), "stayer").await;
    server.signal("TERM");
    shutdown_notice(&mut stayer).await;
    let second = Instant::now();
    server.signal("TERM");
    let code = server.wait_exit().await;
    assert!(
        second.elapsed() < Duration::from_secs(10),
        "the second signal did not force the exit"
    );
    assert!(
        code.is_some(),
        "it exits by itself, not killed by the signal"
    );
}

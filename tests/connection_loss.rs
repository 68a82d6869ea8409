//! Connections that end without a goodbye (PROTOCOL.md §2, §8): an agent whose socket
//! is gone is cleaned up and can always register again.

mod common;

use common::{Agent, EventStream, TestServer};
use serde_json::json;

#[tokio::test]
async fn a_dropped_connection_ends_with_disconnected_then_cleaned_up() {
    let server = TestServer::start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let (alice, _) = Agent::register(&server.ws_url(), "alice").await;
    alice.abort(); // TCP closed without a WebSocket close frame
    let (_, disconnected) = common::expect_short_life(&mut events, "alice").await;
    // The client went away; nothing in its protocol use was wrong.
    assert_eq!(
        disconnected["data"]["reason"], "client_closed",
        "{disconnected}"
    );
    assert_eq!(disconnected["data"]["close_code"], 1006, "{disconnected}");
    let (_again, second) = Agent::register(&server.ws_url(), "alice").await;
    assert_eq!(second["incarnation"], 2);
}

#[tokio::test]
async fn an_unregistered_agent_is_closed_1000_with_reason_unregistered() {
    let server = TestServer::start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let (mut alice, _) = Agent::register(&server.ws_url(), "alice").await;
    let answer = alice
        .request(json!({"type":"system_request","command":"unregister_agent","request_id":7}))
        .await;
    assert_eq!(answer["success"], true, "{answer}");
    assert_eq!(answer["request_id"], 7);
    assert_eq!(alice.closed().await, common::Closed::Code(1000));
    let disconnected = events
        .wait_for(|e| e["type"] == "agent.disconnected" && e["subject"] == "alice")
        .await;
    assert_eq!(disconnected["data"]["reason"], "unregistered");
    assert_eq!(disconnected["data"]["close_code"], 1000);
    events
        .wait_for(|e| e["type"] == "agent.cleaned_up" && e["subject"] == "alice")
        .await;
}

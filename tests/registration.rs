//! Registration, listing, and the registration error codes of PROTOCOL.md §2.

mod common;

use common::{Agent, Closed, EventStream, TestServer};
use serde_json::json;

#[tokio::test]
async fn an_agent_registers_and_is_listed() {
    let server = TestServer::start(&[]);
    let (mut alice, response) = Agent::register(&server.ws_url(), "alice").await;
    assert_eq!(response["agent_id"], "alice");
    assert_eq!(response["incarnation"], 1);
    assert_eq!(response["network_name"], "Tether");
    assert!(response["session_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    let listed = alice
        .request(json!({"type":"system_request","command":"list_agents","request_id":"r1"}))
        .await;
    assert_eq!(listed["success"], true);
    assert_eq!(listed["request_id"], "r1");
    assert_eq!(listed["agents"][0]["agent_id"], "alice");
    assert_eq!(listed["agents"][0]["name"], "alice");
    assert_eq!(listed["agents"][0]["connected"], true);
}

#[tokio::test]
async fn every_registration_error_code_is_answered_and_the_socket_stays_open() {
    let server = TestServer::start(&[("TETHER__LIMITS__MAX_METADATA_BYTES", "64")]);
    let mut agent = Agent::connect(&server.ws_url()).await;
    let cases = [
        (json!({}), "missing_agent_id"),
        (json!({"agent_id": ""}), "missing_agent_id"),
        (json!({"agent_id": "has space"}), "invalid_agent_id"),
        (json!({"agent_id": "a".repeat(129)}), "invalid_agent_id"),
        (json!({"agent_id": 5}), "invalid_agent_id"),
        (
            json!({"agent_id": "ok", "metadata": [1]}),
            "invalid_metadata",
        ),
        (
            json!({"agent_id": "ok", "metadata": {"blob": "x".repeat(100)}}),
            "invalid_metadata",
        ),
        (
            json!({"agent_id": "ok", "certificate": {"agent_id": "ok"}}),
            "invalid_certificate",
        ),
    ];
    for (fields, code) in cases {
        let mut frame = json!({"type":"system_request","command":"register_agent"});
        frame
            .as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        let response = agent.request(frame).await;
        assert_eq!(response["success"], false, "{response}");
        assert_eq!(response["error_code"], code, "{response}");
        assert!(response["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    // Still open: a valid registration on the same socket succeeds, a second is refused.
    let ok = agent
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"ok"}))
        .await;
    assert_eq!(ok["success"], true, "{ok}");
    let again = agent
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"ok2"}))
        .await;
    assert_eq!(again["error_code"], "already_registered");
}

#[tokio::test]
async fn a_duplicate_id_is_refused_while_the_holder_is_alive() {
    let server = TestServer::start(&[]);
    let (_alice, _) = Agent::register(&server.ws_url(), "alice").await;
    let mut imposter = Agent::connect(&server.ws_url()).await;
    let response = imposter
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"alice"}))
        .await;
    assert_eq!(response["success"], false);
    assert_eq!(response["error_code"], "agent_id_in_use");
}

#[tokio::test]
async fn a_full_server_refuses_with_server_full_and_closes_1013() {
    let server = TestServer::start(&[("TETHER__NETWORK__MAX_CONNECTIONS", "2")]);
    let (_a, _) = Agent::register(&server.ws_url(), "a").await;
    let (_b, _) = Agent::register(&server.ws_url(), "b").await;
    let mut c = Agent::connect(&server.ws_url()).await;
    let response = c
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"c"}))
        .await;
    assert_eq!(response["error_code"], "server_full");
    assert_eq!(c.closed().await, Closed::Code(1013));
}

#[tokio::test]
async fn a_socket_that_never_registers_is_closed_4008() {
    let server = TestServer::start(&[("TETHER__NETWORK__REGISTRATION_TIMEOUT", "0.5")]);
    let mut idle = Agent::connect(&server.ws_url()).await;
    assert_eq!(idle.closed().await, Closed::Code(4008));
}

#[tokio::test]
async fn requests_before_registration_get_not_registered() {
    let server = TestServer::start(&[]);
    let mut agent = Agent::connect(&server.ws_url()).await;
    agent
        .send(json!({"type":"system_request","command":"list_agents"}))
        .await;
    let error = agent.next().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error_code"], "not_registered");
    agent.send(common::direct("x", json!("hi"))).await;
    assert_eq!(agent.next().await["error_code"], "not_registered");
    // Allowed before registration:
    let info = agent
        .request(json!({"type":"system_request","command":"get_network_info"}))
        .await;
    assert_eq!(info["network_info"]["mode"], "centralized");
    let pong = agent
        .request(json!({"type":"system_request","command":"ping_agent","timestamp":12.5}))
        .await;
    assert_eq!(pong["timestamp"], 12.5);
}

#[tokio::test]
async fn a_client_close_ends_with_disconnected_then_cleaned_up() {
    let server = TestServer::start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let (alice, _) = Agent::register(&server.ws_url(), "alice").await;
    alice.close().await;
    let (_, disconnected) = common::expect_short_life(&mut events, "alice").await;
    assert_eq!(disconnected["data"]["reason"], "client_closed");
}

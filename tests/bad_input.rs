//! Transport and bad input (PROTOCOL.md §1): invalid, binary, oversized and fragmented
//! frames, unknown commands, control pings. Through all of it, another agent on the
//! same server keeps working.

mod common;

use bytes::Bytes;
use common::{direct, Agent, Closed, EventStream, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

const SMALL_FRAMES: [(&str, &str); 1] = [("TETHER__LIMITS__MAX_FRAME_BYTES", "4096")];

/// Two well-behaved agents: `peer` sends to `good`.
struct Bystanders {
    peer: Agent,
    good: Agent,
    sent: u32,
}

impl Bystanders {
    async fn register(server: &TestServer) -> Self {
        let (peer, _) = Agent::register(&server.ws_url(), "peer").await;
        let (good, _) = Agent::register(&server.ws_url(), "good").await;
        Self {
            peer,
            good,
            sent: 0,
        }
    }

    /// `good` still receives what `peer` sends it.
    async fn assert_unaffected(&mut self) {
        self.sent += 1;
        let text = format!("still fine {}", self.sent);
        self.peer.send(direct("good", json!(text))).await;
        let got = self.good.wait_for(|f| f["type"] == "message").await;
        assert_eq!(got["data"]["content"], text.as_str(), "{got}");
        assert_eq!(got["data"]["sender_id"], "peer");
    }
}

/// The connection still answers requests.
async fn assert_open(agent: &mut Agent, stamp: f64) {
    let pong = agent
        .request(json!({"type":"system_request","command":"ping_agent","timestamp": stamp}))
        .await;
    assert_eq!(pong["success"], true, "{pong}");
    assert_eq!(pong["timestamp"], stamp, "{pong}");
}

fn invalid_frames() -> Vec<&'static str> {
    vec![
        "this is not json",
        "{\"type\":\"message\",",
        "[1,2,3]",
        "42",
        "\"a string\"",
        "null",
        "{\"no\":\"type\"}",
        "{\"type\":\"bogus\"}",
        "{\"type\":5}",
    ]
}

async fn expect_invalid_frame(agent: &mut Agent, sent: &str) {
    let error = agent.next().await;
    assert_eq!(error["type"], "error", "after {sent:?}: {error}");
    assert_eq!(
        error["error_code"], "invalid_frame",
        "after {sent:?}: {error}"
    );
    assert!(
        error["error"].as_str().is_some_and(|e| !e.is_empty()),
        "the error must say what was wrong: {error}"
    );
}

#[tokio::test]
async fn invalid_frames_get_invalid_frame_and_the_connection_stays_open() {
    let server = TestServer::start(&[]);
    let mut others = Bystanders::register(&server).await;
    let (mut bad, _) = Agent::register(&server.ws_url(), "bad").await;
    for (i, text) in invalid_frames().into_iter().enumerate() {
        bad.send_raw(Message::text(text)).await;
        expect_invalid_frame(&mut bad, text).await;
        assert_open(&mut bad, i as f64).await;
    }
    others.assert_unaffected().await;
    // The misbehaving agent itself still routes messages.
    bad.send(direct("good", json!("from bad"))).await;
    let got = others.good.wait_for(|f| f["type"] == "message").await;
    assert_eq!(got["data"]["sender_id"], "bad");
}

#[tokio::test]
async fn invalid_frames_before_registration_get_invalid_frame_too() {
    let server = TestServer::start(&[]);
    let mut fresh = Agent::connect(&server.ws_url()).await;
    fresh.send_raw(Message::text("{oops")).await;
    expect_invalid_frame(&mut fresh, "{oops").await;
    let response = fresh
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"late"}))
        .await;
    assert_eq!(response["success"], true, "{response}");
}

#[tokio::test]
async fn ten_invalid_frames_in_a_row_close_the_connection_1008() {
    let server = TestServer::start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let mut others = Bystanders::register(&server).await;
    let (mut bad, _) = Agent::register(&server.ws_url(), "bad").await;
    let frames = invalid_frames();

    // Nine, then a valid frame: the count starts over.
    for text in &frames[..9] {
        bad.send_raw(Message::text(*text)).await;
    }
    for text in &frames[..9] {
        expect_invalid_frame(&mut bad, text).await;
    }
    assert_open(&mut bad, 1.0).await;
    for text in &frames[..9] {
        bad.send_raw(Message::text(*text)).await;
    }
    for text in &frames[..9] {
        expect_invalid_frame(&mut bad, text).await;
    }
    others.assert_unaffected().await;

    // The tenth in a row: its error, then close 1008.
    bad.send_raw(Message::text("still not json")).await;
    expect_invalid_frame(&mut bad, "still not json").await;
    assert_eq!(bad.closed().await, Closed::Code(1008));

    let disconnected = events
        .wait_for(|e| e["type"] == "agent.disconnected" && e["subject"] == "bad")
        .await;
    assert_eq!(disconnected["data"]["close_code"], 1008, "{disconnected}");
    assert_eq!(
        disconnected["data"]["reason"], "protocol_error",
        "{disconnected}"
    );
    others.assert_unaffected().await;
}

#[tokio::test]
async fn a_binary_frame_gets_unsupported_frame_and_the_connection_stays_open() {
    let server = TestServer::start(&[]);
    let mut others = Bystanders::register(&server).await;
    let (mut bad, _) = Agent::register(&server.ws_url(), "bad").await;
    bad.send_raw(Message::binary(Bytes::from_static(b"\x00\x01binary")))
        .await;
    let error = bad.next().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["error_code"], "unsupported_frame", "{error}");
    assert_open(&mut bad, 7.0).await;
    others.assert_unaffected().await;
}

#[tokio::test]
async fn a_frame_over_the_limit_closes_the_connection_1009() {
    let server = TestServer::start(&SMALL_FRAMES);
    let mut events = EventStream::subscribe(&server, None).await;
    let mut others = Bystanders::register(&server).await;
    let (mut bad, _) = Agent::register(&server.ws_url(), "bad").await;

    // Just under the limit is fine.
    let fits = direct("good", json!("y".repeat(3900)));
    assert!(fits.to_string().len() < 4096);
    bad.send(fits).await;
    let got = others.good.wait_for(|f| f["type"] == "message").await;
    assert_eq!(got["data"]["content"].as_str().map(str::len), Some(3900));

    bad.send(direct("good", json!("z".repeat(5000)))).await;
    assert_eq!(bad.closed().await, Closed::Code(1009));
    let disconnected = events
        .wait_for(|e| e["type"] == "agent.disconnected" && e["subject"] == "bad")
        .await;
    assert_eq!(disconnected["data"]["close_code"], 1009, "{disconnected}");
    others.assert_unaffected().await;
}

#[tokio::test]
async fn continuation_frames_are_reassembled() {
    let server = TestServer::start(&SMALL_FRAMES);
    let mut others = Bystanders::register(&server).await;
    let (mut sender, _) = Agent::register(&server.ws_url(), "sender").await;
    let text = direct("good", json!({"text": "w".repeat(2500), "parts": 3})).to_string();
    let bytes = text.as_bytes();
    let (a, rest) = bytes.split_at(1000);
    let (b, c) = rest.split_at(1000);
    let fragments = [
        Frame::message(a.to_vec(), OpCode::Data(Data::Text), false),
        Frame::message(b.to_vec(), OpCode::Data(Data::Continue), false),
        Frame::message(c.to_vec(), OpCode::Data(Data::Continue), true),
    ];
    for fragment in fragments {
        sender.send_raw(Message::Frame(fragment)).await;
    }
    let got = others.good.wait_for(|f| f["type"] == "message").await;
    assert_eq!(got["data"]["content"]["parts"], 3, "{got}");
    assert_eq!(
        got["data"]["content"]["text"].as_str().map(str::len),
        Some(2500)
    );
    assert_eq!(got["data"]["sender_id"], "sender");
    assert_open(&mut sender, 4.0).await;
    others.assert_unaffected().await;
}

#[tokio::test]
async fn continuation_frames_over_the_limit_close_the_connection_1009() {
    let server = TestServer::start(&SMALL_FRAMES);
    let mut events = EventStream::subscribe(&server, None).await;
    let mut others = Bystanders::register(&server).await;
    let (mut bad, _) = Agent::register(&server.ws_url(), "bad").await;
    // Each fragment fits; together they are 6000 bytes.
    let text = direct("good", json!("v".repeat(6000))).to_string();
    let chunks: Vec<&[u8]> = text.as_bytes().chunks(2000).collect();
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let opcode = if i == 0 { Data::Text } else { Data::Continue };
        let frame = Frame::message(chunk.to_vec(), OpCode::Data(opcode), i == last);
        // The server may close before the last fragment; later sends may then fail.
        if bad.raw().send(Message::Frame(frame)).await.is_err() {
            break;
        }
    }
    assert_eq!(bad.closed().await, Closed::Code(1009));
    let disconnected = events
        .wait_for(|e| e["type"] == "agent.disconnected" && e["subject"] == "bad")
        .await;
    assert_eq!(disconnected["data"]["close_code"], 1009, "{disconnected}");
    others.assert_unaffected().await;
}

#[tokio::test]
async fn an_unknown_command_is_answered_unknown_command_with_the_command_echoed() {
    let server = TestServer::start(&[]);
    let (mut agent, _) = Agent::register(&server.ws_url(), "alice").await;
    let answer: Value = agent
        .request(json!({"type":"system_request","command":"teleport_agent","request_id":"r-9"}))
        .await;
    assert_eq!(answer["type"], "system_response");
    assert_eq!(answer["command"], "teleport_agent");
    assert_eq!(answer["success"], false);
    assert_eq!(answer["error"], "Unknown command");
    assert_eq!(answer["error_code"], "unknown_command");
    assert_eq!(answer["request_id"], "r-9");
    assert_open(&mut agent, 5.0).await;
}

#[tokio::test]
async fn a_client_websocket_ping_is_answered_with_a_pong() {
    let server = TestServer::start(&[]);
    let mut others = Bystanders::register(&server).await;
    let (mut agent, _) = Agent::register(&server.ws_url(), "alice").await;
    agent
        .send_raw(Message::Ping(Bytes::from_static(b"are you there")))
        .await;
    let pong = loop {
        let message = tokio::time::timeout(common::DEADLINE, agent.raw().next())
            .await
            .expect("no pong")
            .expect("connection ended")
            .expect("WebSocket error");
        if let Message::Pong(payload) = message {
            break payload;
        }
    };
    assert_eq!(&pong[..], b"are you there");
    assert_open(&mut agent, 6.0).await;
    others.assert_unaffected().await;
}

//! The connection path after the upgrade (PROTOCOL.md §2, §6, §7): the TCP connection
//! ends at once after a close handshake, whichever side starts it; an agent that reads
//! is never taken for a slow consumer; a frame announcing more than the limit is
//! refused before its payload arrives; text that is not UTF-8 is refused 1007; a frame
//! is not held back waiting for the agent's acknowledgement of the one before.
//!
//! These tests speak raw WebSocket over TCP where they must see what a client library
//! hides (the server's FIN, a frame header on its own).

mod common;

use common::{Agent, TestServer, DEADLINE};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tether_testkit::ws::client_frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Longest the server may take to send FIN after a close handshake. Far above the few
/// milliseconds it takes (BENCHMARKS.md), far below the second the HTTP dispatcher used
/// to wait.
const PROMPT: Duration = Duration::from_millis(500);

/// A TCP connection upgraded by hand; returns it and any bytes read past the 101.
async fn raw_upgrade(server: &TestServer) -> (TcpStream, Vec<u8>) {
    let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, tcp.read(&mut byte))
            .await
            .expect("no handshake answer")
            .unwrap();
        assert!(n > 0, "connection closed during the handshake");
        head.extend_from_slice(&byte[..n]);
    }
    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let text = String::from_utf8_lossy(&head[..end]).to_string();
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    (tcp, head[end..].to_vec())
}

/// Reads until the server ends the stream; returns what it sent and when it ended.
async fn read_to_end(tcp: &mut TcpStream, mut buf: Vec<u8>) -> (Vec<u8>, Instant) {
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(DEADLINE, tcp.read(&mut chunk))
            .await
            .expect("the server never ended the TCP connection")
            .unwrap_or(0);
        if n == 0 {
            return (buf, Instant::now());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The close code of the first close frame in what the server sent.
fn close_code(sent: &[u8]) -> Option<u16> {
    let mut at = 0;
    while at + 2 <= sent.len() {
        let (opcode, len) = (sent[at] & 0x0F, usize::from(sent[at + 1] & 0x7F));
        let (header, len) = match len {
            126 => (
                4,
                usize::from(u16::from_be_bytes([sent[at + 2], sent[at + 3]])),
            ),
            127 => (
                10,
                u64::from_be_bytes(sent[at + 2..at + 10].try_into().unwrap()) as usize,
            ),
            n => (2, n),
        };
        if opcode == 8 {
            let code = &sent[at + header..at + header + 2];
            return Some(u16::from_be_bytes([code[0], code[1]]));
        }
        at += header + len;
    }
    None
}

#[tokio::test]
async fn the_server_ends_the_tcp_connection_at_once_after_a_client_close() {
    let server = TestServer::start(&[]);
    let (mut tcp, early) = raw_upgrade(&server).await;
    let sent_at = Instant::now();
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    tcp.write_all(&client_frame(8, &close)).await.unwrap();
    let (sent, ended_at) = read_to_end(&mut tcp, early).await;
    assert_eq!(
        close_code(&sent),
        Some(1000),
        "the close handshake was answered"
    );
    let took = ended_at - sent_at;
    assert!(took < PROMPT, "FIN came {took:?} after the client's close");
}

#[tokio::test]
async fn the_server_ends_the_tcp_connection_at_once_after_its_own_close() {
    let server = TestServer::start(&[]);
    let (mut tcp, early) = raw_upgrade(&server).await;
    let register = json!({"type":"system_request","command":"register_agent","agent_id":"alice"});
    tcp.write_all(&client_frame(1, register.to_string().as_bytes()))
        .await
        .unwrap();
    // An administrator removes the agent: the server closes 1000 and, without waiting
    // for the client's close reply (this client never sends one), sends FIN.
    let removed = async {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let response = common::http()
                .delete(server.http("/agents/alice"))
                .send()
                .await
                .unwrap();
            if response.status().is_success() {
                return Instant::now();
            }
            let status = response.status();
            assert!(
                Instant::now() < deadline,
                "alice never registered: {status}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let (removed_at, (sent, ended_at)) = tokio::join!(removed, read_to_end(&mut tcp, early));
    assert_eq!(close_code(&sent), Some(1000));
    let took = ended_at.saturating_duration_since(removed_at);
    assert!(took < PROMPT, "FIN came {took:?} after the removal");
}

#[tokio::test]
async fn a_refused_registration_ends_the_tcp_connection_at_once() {
    let server = TestServer::start(&[("TETHER__NETWORK__MAX_CONNECTIONS", "1")]);
    let (_alice, _) = Agent::register(&server.ws_url(), "alice").await;
    let (mut tcp, early) = raw_upgrade(&server).await;
    let register = json!({"type":"system_request","command":"register_agent","agent_id":"bob"});
    let sent_at = Instant::now();
    tcp.write_all(&client_frame(1, register.to_string().as_bytes()))
        .await
        .unwrap();
    let (sent, ended_at) = read_to_end(&mut tcp, early).await;
    assert_eq!(close_code(&sent), Some(1013), "server full");
    let took = ended_at - sent_at;
    assert!(
        took < PROMPT,
        "FIN came {took:?} after the refused registration"
    );
}

#[tokio::test]
async fn an_agent_that_reads_is_never_a_slow_consumer_however_many_errors_it_gets() {
    let server = TestServer::start(&[]);
    let (ws, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .unwrap();
    let (mut sink, mut stream) = ws.split();
    let register = json!({"type":"system_request","command":"register_agent","agent_id":"talker"});
    sink.send(Message::text(register.to_string()))
        .await
        .unwrap();
    let answer = stream.next().await.unwrap().unwrap();
    assert!(
        answer.to_text().unwrap().contains("\"success\":true"),
        "{answer}"
    );
    // 10 000 direct messages (4 KB each) to an agent that is not there, sent as fast
    // as the socket takes them; each is answered with an error frame.
    const MESSAGES: usize = 10_000;
    let writer = tokio::spawn(async move {
        let padding = "p".repeat(4096);
        for i in 0..MESSAGES {
            let message = json!({"type":"message","data":{
                "message_type":"direct_message","target_agent_id":"gone",
                "content": i, "padding": padding}});
            sink.feed(Message::text(message.to_string())).await.unwrap();
        }
        sink.flush().await.unwrap();
        sink
    });
    let mut errors = 0;
    while errors < MESSAGES {
        let message = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("the error frames stopped coming")
            .expect("the server ended the connection")
            .expect("the connection failed");
        match message {
            Message::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(frame["error_code"], "unknown_agent", "{frame}");
                errors += 1;
            }
            Message::Close(close) => panic!("closed after {errors} errors: {close:?}"),
            _ => {}
        }
    }
    let _sink = writer.await.unwrap();
    let agents: Value = server.get_json("/agents/talker").await;
    assert_eq!(agents["agent_id"], "talker", "still registered: {agents}");
}

#[tokio::test]
async fn a_frame_announcing_more_than_the_limit_is_refused_before_its_payload() {
    let server = TestServer::start(&[]);
    let (mut tcp, early) = raw_upgrade(&server).await;
    // The header of a 1 TiB text frame, and nothing else.
    let mut header = vec![0x81u8, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    tcp.write_all(&header).await.unwrap();
    let (sent, _) = read_to_end(&mut tcp, early).await;
    assert_eq!(close_code(&sent), Some(1009));
}

#[tokio::test]
async fn text_that_is_not_utf8_is_closed_1007() {
    let server = TestServer::start(&[]);
    let (mut tcp, early) = raw_upgrade(&server).await;
    tcp.write_all(&client_frame(1, &[b'{', 0xff, 0xfe, b'}']))
        .await
        .unwrap();
    let (sent, _) = read_to_end(&mut tcp, early).await;
    assert_eq!(close_code(&sent), Some(1007));
}

#[tokio::test]
async fn upgrades_elsewhere_than_root_and_ws_are_answered_404() {
    let server = TestServer::start(&[]);
    let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
    let request = format!(
        "GET /agents HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let (sent, _) = read_to_end(&mut tcp, Vec::new()).await;
    let text = String::from_utf8_lossy(&sent);
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
}

/// Reads `agent`'s frames until the direct message carrying `n`.
async fn until_message(agent: &mut Agent, n: u32) {
    agent
        .wait_for(|f| f["type"] == "message" && f["data"]["content"]["n"] == n)
        .await;
}

#[tokio::test]
async fn a_frame_right_after_another_is_not_held_until_the_agent_acknowledges_the_first() {
    // An agent that answers what it receives makes its kernel delay its ACKs (by 40 ms
    // at least on Linux). With Nagle's algorithm on the server's socket, a frame written
    // while the previous one is still unacknowledged waited for that delayed ACK: every
    // round below took about 38 ms instead of a fraction of one.
    let server = TestServer::start(&[]);
    let (mut alice, _) = Agent::register(&server.ws_url(), "alice").await;
    let (mut bob, _) = Agent::register(&server.ws_url(), "bob").await;
    let rounds = 10;
    let mut held = 0;
    for round in 0..rounds {
        let n = round * 10;
        alice.send(common::direct("bob", json!({"n": n}))).await;
        until_message(&mut bob, n).await;
        bob.send(common::direct("alice", json!({"n": n + 1}))).await;
        until_message(&mut alice, n + 1).await;
        alice.send(common::direct("bob", json!({"n": n + 2}))).await;
        until_message(&mut bob, n + 2).await;
        // Bob's kernel has not acknowledged n + 2 yet when n + 3 is written.
        let sent = Instant::now();
        alice.send(common::direct("bob", json!({"n": n + 3}))).await;
        until_message(&mut bob, n + 3).await;
        if sent.elapsed() >= Duration::from_millis(30) {
            held += 1;
        }
    }
    assert!(
        held < rounds / 2,
        "{held} of {rounds} frames took 30 ms or more: held for the agent's delayed ACK"
    );
}

//! Messages between agents (PROTOCOL.md §5): direct and broadcast delivery, the
//! server-set sender, unknown targets, mods, and slow consumers.

mod common;

use common::{broadcast, direct, Agent, Closed, EventStream, TestServer};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

fn is_message(frame: &Value) -> bool {
    frame["type"] == "message"
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn a_direct_message_is_delivered_with_the_server_set_sender() {
    let server = TestServer::start(&[]);
    let (mut alice, _) = Agent::register(&server.ws_url(), "alice").await;
    let (mut bob, _) = Agent::register(&server.ws_url(), "bob").await;

    // Alice pretends to be mallory and adds fields the server does not know.
    let before = epoch_ms();
    alice
        .send(json!({"type":"message","trace":"top-level-extra",
                     "data":{"message_type":"direct_message","target_agent_id":"bob",
                             "sender_id":"mallory","content":{"text":"hi bob"},
                             "x_custom":{"nested":[1,2,3]},"protocol":"openagents"}}))
        .await;
    let received = bob.wait_for(is_message).await;
    let after = epoch_ms();
    let data = &received["data"];
    assert_eq!(
        data["sender_id"], "alice",
        "the sender was not enforced: {received}"
    );
    assert_eq!(data["target_agent_id"], "bob");
    assert_eq!(data["message_type"], "direct_message");
    assert_eq!(data["content"], json!({"text":"hi bob"}));
    assert_eq!(
        data["x_custom"],
        json!({"nested":[1,2,3]}),
        "unknown field lost"
    );
    assert_eq!(data["protocol"], "openagents");
    assert_eq!(received["trace"], "top-level-extra", "top-level field lost");
    let message_id = data["message_id"].as_str().expect("message_id filled");
    assert_eq!(message_id.len(), 36, "a uuid: {message_id}");
    assert_eq!(message_id.matches('-').count(), 4, "a uuid: {message_id}");
    let timestamp = data["timestamp"].as_u64().expect("integer epoch ms");
    assert!(
        (before.saturating_sub(1000)..=after + 1000).contains(&timestamp),
        "timestamp {timestamp} is not epoch milliseconds around {before}..{after}"
    );

    // Ids and timestamps the client chose are kept.
    let mut frame = direct("bob", json!("second"));
    frame["data"]["message_id"] = json!("m-2");
    frame["data"]["timestamp"] = json!(123);
    alice.send(frame).await;
    let second = bob.wait_for(is_message).await;
    assert_eq!(second["data"]["message_id"], "m-2");
    assert_eq!(second["data"]["timestamp"], 123);
    assert_eq!(second["data"]["content"], "second");
    assert_eq!(second["data"]["sender_id"], "alice");

    // Nothing went back to the sender.
    let pong = alice
        .request(json!({"type":"system_request","command":"ping_agent","timestamp":2.0}))
        .await;
    assert_eq!(pong["success"], true);
    assert!(alice.pending().is_empty(), "{:?}", alice.pending());
}

#[tokio::test]
async fn a_broadcast_reaches_everyone_but_the_sender_and_the_excluded() {
    let server = TestServer::start(&[]);
    let url = server.ws_url();
    let (mut alice, _) = Agent::register(&url, "alice").await;
    let (mut bob, _) = Agent::register(&url, "bob").await;
    let (mut carol, _) = Agent::register(&url, "carol").await;
    let (mut dave, _) = Agent::register(&url, "dave").await;
    let (mut erin, _) = Agent::register(&url, "erin").await;

    let mut frame = broadcast(&["carol", "erin"], json!({"text":"hello all"}));
    frame["data"]["sender_id"] = json!("bob"); // spoofing attempt
    alice.send(frame).await;
    for (name, agent) in [("bob", &mut bob), ("dave", &mut dave)] {
        let got = agent.wait_for(is_message).await;
        assert_eq!(
            got["data"]["message_type"], "broadcast_message",
            "{name}: {got}"
        );
        assert_eq!(got["data"]["sender_id"], "alice", "{name}: {got}");
        assert_eq!(
            got["data"]["content"],
            json!({"text":"hello all"}),
            "{name}"
        );
        assert_eq!(got["data"]["exclude_agent_ids"], json!(["carol", "erin"]));
    }

    // The broadcast has been routed (bob got it). A later direct message to each of the
    // others must be the first message they see.
    for target in ["alice", "carol", "erin"] {
        bob.send(direct(target, json!(format!("marker for {target}"))))
            .await;
    }
    for (name, agent) in [
        ("alice", &mut alice),
        ("carol", &mut carol),
        ("erin", &mut erin),
    ] {
        let first = agent.wait_for(is_message).await;
        assert_eq!(
            first["data"]["content"],
            format!("marker for {name}"),
            "{name} received the broadcast: {first}"
        );
    }
}

#[tokio::test]
async fn one_senders_broadcasts_and_direct_messages_reach_each_agent_in_the_order_sent() {
    // A broadcast to 400 agents goes through each worker's relay, which writes ~200
    // copies; the direct messages sent after it, read separately, are written by the
    // sender's own worker into the recipients' sockets. Each must still come after the
    // broadcast, even for a recipient whose copy the relay has not written yet.
    let server = TestServer::start(&[
        ("TETHER__LIMITS__MAX_BROADCAST_COPIES_PER_SECOND", "1000000"),
        ("TETHER__LIMITS__BROADCAST_COPY_BURST", "1000000"),
    ]);
    let url = server.ws_url();
    let (mut sender, _) = Agent::register(&url, "sender").await;
    let mut agents = Vec::new();
    for i in 0..400 {
        agents.push(Agent::register(&url, &format!("agent-{i}")).await.0);
    }
    const ROUNDS: u64 = 20;
    const WATCHED: usize = 20;
    let answered_by_the_connection = json!({"type":"system_request","command":"list_protocols"});
    for n in 0..ROUNDS {
        sender.send(broadcast(&[], json!([n, "broadcast"]))).await;
        // Its answer comes after the broadcast was handed out: the direct messages
        // below are read after that, not with the broadcast.
        sender.send(answered_by_the_connection.clone()).await;
        sender.wait_for(|f| f["command"] == "list_protocols").await;
        for i in 0..WATCHED {
            sender
                .send(direct(&format!("agent-{i}"), json!([n, "direct"])))
                .await;
        }
    }
    for (i, agent) in agents.iter_mut().take(WATCHED).enumerate() {
        for n in 0..ROUNDS {
            for kind in ["broadcast", "direct"] {
                let got = agent.wait_for(is_message).await;
                assert_eq!(got["data"]["content"], json!([n, kind]), "agent-{i}");
            }
        }
    }
}

#[tokio::test]
async fn a_message_to_an_unknown_agent_gets_unknown_agent_with_its_message_id() {
    let server = TestServer::start(&[]);
    let (mut alice, _) = Agent::register(&server.ws_url(), "alice").await;
    let mut frame = direct("nobody", json!("hello?"));
    frame["data"]["message_id"] = json!("m-42");
    alice.send(frame).await;
    let error = alice.next().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["error_code"], "unknown_agent", "{error}");
    assert_eq!(error["message_id"], "m-42", "{error}");
    assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()));

    // Without a message id, the error names the id the server gave the message.
    alice.send(direct("nobody", json!("hello?"))).await;
    let error = alice.next().await;
    assert_eq!(error["error_code"], "unknown_agent", "{error}");
    assert_eq!(
        error["message_id"].as_str().map(str::len),
        Some(36),
        "{error}"
    );

    // The connection is fine afterwards.
    let (mut bob, _) = Agent::register(&server.ws_url(), "bob").await;
    alice.send(direct("bob", json!("still here"))).await;
    assert_eq!(
        bob.wait_for(is_message).await["data"]["content"],
        "still here"
    );
}

#[tokio::test]
async fn a_mod_message_is_answered_with_unsupported_mod() {
    let server = TestServer::start(&[]);
    let (mut alice, _) = Agent::register(&server.ws_url(), "alice").await;
    alice
        .send(json!({"type":"message","data":{"message_type":"mod_message","mod":"openagents.mods.communication.simple_messaging",
                                              "message_id":"m-7","content":{"action":"x"}}}))
        .await;
    let error = alice.next().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["error_code"], "unsupported_mod", "{error}");
    assert_eq!(error["message_id"], "m-7", "{error}");
    let pong = alice
        .request(json!({"type":"system_request","command":"ping_agent","timestamp":3.0}))
        .await;
    assert_eq!(pong["timestamp"], 3.0);
}

// Multi-threaded, and the flood yields after each pair: the reader (whose queue holds
// only 4 frames here) must get to run while the flood goes on, or it would be the
// one cut off as slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_4003_while_the_others_keep_receiving() {
    // The close grace is long: the test reads the close frame only once it has seen the
    // cut-off on its event stream, which a loaded CI host may take seconds to deliver.
    let server = TestServer::start(&[
        ("TETHER__LIMITS__MAX_MESSAGE_QUEUE_SIZE", "4"),
        ("TETHER__LIMITS__CLOSE_GRACE", "60"),
    ]);
    let url = server.ws_url();
    let mut events = EventStream::subscribe(&server, None).await;
    // `slow` does not read until it is cut off; its small receive buffer keeps the
    // backlog it must read before the close frame small.
    let mut slow = Agent::connect_with_receive_buffer(&url, 64 * 1024).await;
    let registered = slow
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"slow"}))
        .await;
    assert_eq!(registered["success"], true, "{registered}");
    let (mut sender, _) = Agent::register(&url, "sender").await;
    let (mut reader, _) = Agent::register(&url, "reader").await;

    // The sender floods `slow` with large messages and sends `reader` a small numbered
    // message after each, until the test sees `slow` cut off. The large ones are
    // broadcasts excluding `reader`, so that once `slow` is gone they reach nobody and
    // the sender gets no unknown_agent errors it would have to read.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let big = "x".repeat(256 * 1024);
            let mut sent = 0u64;
            while !stop.load(Ordering::Acquire) && sent < 2000 {
                sender.send(broadcast(&["reader"], json!(big))).await;
                sender.send(direct("reader", json!(sent))).await;
                sent += 1;
                tokio::task::yield_now().await;
            }
            (sender, sent)
        })
    };
    // The reader keeps up the whole time.
    let reading = tokio::spawn(async move {
        let mut expected = 0u64;
        loop {
            let frame = reader.wait_for(is_message).await;
            if frame["data"]["content"] == "done" {
                return (reader, expected);
            }
            assert_eq!(frame["data"]["content"], expected, "reader lost a message");
            expected += 1;
        }
    });

    let disconnected = events
        .wait_for(|e| e["type"] == "agent.disconnected" && e["subject"] == "slow")
        .await;
    stop.store(true, Ordering::Release);
    // The slow agent starts reading now: its backlog, then the close frame. (The
    // server gives a close frame a few seconds to get through a full socket.)
    let cut_off = std::time::Instant::now();
    let slow_reads = tokio::spawn(async move { slow.closed().await });
    assert_eq!(
        disconnected["data"]["reason"], "slow_consumer",
        "{disconnected}"
    );
    assert_eq!(disconnected["data"]["close_code"], 4003, "{disconnected}");
    events
        .wait_for(|e| e["type"] == "agent.cleaned_up" && e["subject"] == "slow")
        .await;

    let (mut sender, sent) = flood.await.unwrap();
    assert!(sent < 2000, "slow was never cut off");
    sender.send(direct("reader", json!("done"))).await;
    let (mut reader, received) = reading.await.unwrap();
    assert_eq!(
        received, sent,
        "the reader must get every message meant for it"
    );

    let closed = slow_reads.await.unwrap();
    assert_eq!(
        closed,
        Closed::Code(4003),
        "the slow agent read to the end {:?} after the test saw it cut off",
        cut_off.elapsed()
    );

    // Sender and reader are unaffected.
    sender.send(direct("reader", json!("after"))).await;
    assert_eq!(
        reader.wait_for(is_message).await["data"]["content"],
        "after"
    );
    let listed = sender
        .request(json!({"type":"system_request","command":"list_agents"}))
        .await;
    let mut ids: Vec<&str> = listed["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["reader", "sender"], "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frame_sent_right_after_the_registration_response_is_handled_as_registered() {
    // Regression: the connection used to learn of its registration only after the
    // response was queued, so a frame sent at once could get `not_registered`.
    let server = TestServer::start(&[]);
    let mut clients = Vec::new();
    for client in 0..8 {
        let url = server.ws_url();
        clients.push(tokio::spawn(async move {
            for i in 0..100 {
                let (mut agent, _) = Agent::register(&url, &format!("a{client}-{i}")).await;
                agent
                    .send(json!({"type":"message","data":{"message_type":"mod_message"}}))
                    .await;
                let answer = agent.next().await;
                assert_eq!(answer["error_code"], "unsupported_mod", "{answer}");
                agent.abort();
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
}

#[tokio::test]
async fn the_registration_response_is_the_first_frame_even_amid_broadcasts() {
    let server = TestServer::start(&[
        ("TETHER__HEARTBEAT__INTERVAL", "0.2"),
        ("TETHER__HEARTBEAT__PING_TIMEOUT", "0.1"),
        ("TETHER__HEARTBEAT__AGENT_TIMEOUT", "5"),
        ("TETHER__HEARTBEAT__TICK", "0.05"),
    ]);
    let (mut chatter, _) = Agent::register(&server.ws_url(), "chatter").await;
    let stop = Arc::new(AtomicBool::new(false));
    let chatting = {
        let stop = stop.clone();
        tokio::spawn(async move {
            // A steady stream (not a flood: the newcomers must be able to keep up).
            let mut every = tokio::time::interval(std::time::Duration::from_millis(2));
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                every.tick().await;
                chatter.send(broadcast(&[], json!(n))).await;
                n += 1;
            }
            n
        })
    };
    for i in 0..30 {
        let mut newcomer = Agent::connect(&server.ws_url()).await;
        newcomer
            .send(json!({"type":"system_request","command":"register_agent",
                         "agent_id": format!("newcomer-{i}")}))
            .await;
        let first = newcomer.next().await;
        assert_eq!(first["type"], "system_response", "first frame: {first}");
        assert_eq!(first["command"], "register_agent", "first frame: {first}");
        assert_eq!(first["success"], true, "{first}");
        // It does get the broadcasts afterwards.
        newcomer.wait_for(is_message).await;
        newcomer.abort();
    }
    stop.store(true, Ordering::Release);
    assert!(chatting.await.unwrap() > 0);
}

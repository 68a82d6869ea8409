//! Direct messages across nodes when the holder a node remembered for its target is
//! out of date (the target left, or moved to a third node): the message still reaches
//! the target where it is now, or its sender gets `unknown_agent`. Real Redis; each
//! test has its own prefix and nodes.

mod common;

use common::cluster::*;
use common::takeover::{assert_replaced, certificate, register_with};
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_whose_target_left_another_node_gets_unknown_agent() {
    let (_, nodes) = cluster(2, "4").await;
    let mut events = EventStream::subscribe(&nodes[1], None).await;
    let (mut a, _) = Agent::register(&nodes[0].ws_url(), "a").await;
    let (mut b, _) = Agent::register(&nodes[1].ws_url(), "b").await;
    // Node 0 looks b's holder up, and remembers it.
    a.send(direct("b", json!("one"))).await;
    let got = b.wait_for(|f| f["type"] == "message").await;
    assert_eq!(got["data"]["content"], "one", "{got}");

    b.close().await;
    events
        .wait_for(|e| e["subject"] == "b" && e["type"] == "agent.cleaned_up")
        .await;
    a.send(direct("b", json!({"message_id": "m-2", "text": "two"})))
        .await;
    let error = a.wait_for(|f| f["type"] == "error").await;
    assert_eq!(error["error_code"], "unknown_agent", "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_an_agent_that_moved_to_a_third_node_reaches_it_there() {
    let (_, nodes) = cluster(3, "4").await;
    let (mut a, _) = Agent::register(&nodes[0].ws_url(), "a").await;
    let (mut b, _) = Agent::register(&nodes[1].ws_url(), "b").await;
    let cert = certificate(&mut b, "b", false).await;
    // Node 0 looks b's holder (node 1) up, and remembers it.
    a.send(direct("b", json!("one"))).await;
    let got = b.wait_for(|f| f["type"] == "message").await;
    assert_eq!(got["data"]["content"], "one", "{got}");

    let mut moved = Agent::connect(&nodes[2].ws_url()).await;
    let welcome = register_with(&mut moved, "b", json!({"certificate": cert})).await;
    assert_eq!(welcome["success"], true, "{welcome}");
    assert_replaced(&mut b, "b").await;
    for text in ["two", "three"] {
        a.send(direct("b", json!(text))).await;
        let got = moved.wait_for(|f| f["type"] == "message").await;
        assert_eq!(got["data"]["content"], text, "{got}");
    }
    assert!(
        a.pending().iter().all(|f| f["type"] != "error"),
        "{:?}",
        a.pending()
    );
}

//! `GET /events` (PROTOCOL.md §8, §9): the lifecycle events as server-sent events,
//! CloudEvents envelopes, and the ordering guarantees across many agents.

mod common;

use common::{Agent, EventStream, TestServer};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use tether_testkit::sse::SseDecoder;

#[tokio::test]
async fn events_are_server_sent_events_with_cloudevents_envelopes() {
    let server = TestServer::start(&[]);
    let response = common::http()
        .get(server.http("/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let mut body = response.bytes_stream();
    let mut decoder = SseDecoder::new();

    let (alice, registered) = Agent::register(&server.ws_url(), "alice").await;
    // Read blocks until alice's agent.registered arrives.
    let block = loop {
        if let Some(block) = decoder.next_block() {
            if block.text().contains("agent.registered") {
                break block;
            }
            continue;
        }
        let chunk = tokio::time::timeout(common::DEADLINE, body.next())
            .await
            .expect("no event")
            .expect("stream ended")
            .unwrap();
        decoder.push(&chunk);
    };
    let field = |name: &str| {
        block
            .field(name)
            .unwrap_or_else(|| panic!("no `{name}:` line in {:?}", block.text()))
            .to_owned()
    };
    let event: Value = serde_json::from_str(&field("data")).unwrap();
    assert_eq!(field("event"), "agent.registered");
    assert_eq!(field("id"), event["id"].as_str().unwrap());

    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["type"], "agent.registered");
    assert_eq!(event["subject"], "alice");
    assert_eq!(event["datacontenttype"], "application/json");
    assert!(
        event["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{event}"
    );
    let node_id = event["data"]["node_id"].as_str().expect("node_id");
    assert_eq!(event["source"], format!("tether://tether-1/{node_id}"));
    let data = &event["data"];
    assert_eq!(data["agent_id"], "alice");
    assert_eq!(data["session_id"], registered["session_id"]);
    assert_eq!(data["incarnation"], 1);
    assert_eq!(data["seq"], 1);
    assert_eq!(data["metadata"], json!({"name":"alice"}));
    assert_eq!(data["takeover"], Value::Null);
    assert!(
        data["remote_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{event}"
    );
    alice.close().await;
}

#[tokio::test]
async fn a_refused_registration_is_published_as_registration_failed() {
    let server = TestServer::start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let (_alice, _) = Agent::register(&server.ws_url(), "alice").await;
    let mut other = Agent::connect(&server.ws_url()).await;
    for (frame, code) in [
        (json!({"agent_id":"alice"}), "agent_id_in_use"),
        (json!({"agent_id":"bad id"}), "invalid_agent_id"),
    ] {
        let mut request = json!({"type":"system_request","command":"register_agent"});
        request
            .as_object_mut()
            .unwrap()
            .extend(frame.as_object().unwrap().clone());
        let answer = other.request(request).await;
        assert_eq!(answer["error_code"], code);
        let failed = events
            .wait_for(|e| e["type"] == "agent.registration_failed")
            .await;
        assert_eq!(failed["data"]["error_code"], code, "{failed}");
    }
}

#[tokio::test]
async fn many_agents_events_arrive_in_order_without_gaps() {
    let server = TestServer::start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    const AGENTS: usize = 24;

    // Every agent registers, half of them are taken over (force_reconnect), the
    // takeover then sends a message, and every connection leaves. All concurrently.
    let mut tasks = Vec::new();
    for n in 0..AGENTS {
        let url = server.ws_url();
        tasks.push(tokio::spawn(async move {
            let id = format!("agent-{n:02}");
            let (mut first, _) = Agent::register(&url, &id).await;
            let listed = first
                .request(json!({"type":"system_request","command":"list_agents"}))
                .await;
            assert_eq!(listed["success"], true);
            if n % 2 == 0 {
                let mut second = Agent::connect(&url).await;
                let answer = second
                    .request(json!({"type":"system_request","command":"register_agent",
                                    "agent_id": id, "force_reconnect": true}))
                    .await;
                assert_eq!(answer["success"], true, "{answer}");
                assert_eq!(
                    first.closed().await,
                    common::Closed::Code(4001),
                    "{id} not replaced"
                );
                second.close().await;
            } else {
                first.close().await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    // Expected ends: one cleaned_up per incarnation, 1.5 incarnations per agent.
    let expected_cleanups = AGENTS + AGENTS / 2;
    let seen = Cell::new(0);
    let all = events
        .collect_until(|e| {
            if e["type"] == "agent.cleaned_up" {
                seen.set(seen.get() + 1);
            }
            seen.get() == expected_cleanups
        })
        .await;

    let ids: HashSet<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), all.len(), "event ids must be unique");

    // Per agent id: the events in stream order.
    let mut per_agent: HashMap<String, Vec<(String, u64, u64)>> = HashMap::new();
    for event in &all {
        let kind = event["type"].as_str().unwrap();
        if !kind.starts_with("agent.") || kind == "agent.registration_failed" {
            continue;
        }
        assert_eq!(event["subject"], event["data"]["agent_id"], "{event}");
        per_agent
            .entry(event["subject"].as_str().unwrap().to_owned())
            .or_default()
            .push((
                kind.to_owned(),
                event["data"]["incarnation"].as_u64().unwrap(),
                event["data"]["seq"].as_u64().unwrap(),
            ));
    }
    assert_eq!(per_agent.len(), AGENTS);
    for (id, list) in &per_agent {
        let n: usize = id.trim_start_matches("agent-").parse().unwrap();
        let incarnations = if n % 2 == 0 { 2 } else { 1 };
        // Incarnations in order, each complete before the next one starts.
        let mut expected_incarnation = 1;
        let mut expected_seq = 1;
        let mut ended = Vec::new();
        for (kind, incarnation, seq) in list {
            if *incarnation != expected_incarnation {
                assert_eq!(
                    *incarnation,
                    expected_incarnation + 1,
                    "{id}: incarnation out of order: {list:?}"
                );
                assert_eq!(kind, "agent.registered", "{id}: {list:?}");
                expected_incarnation += 1;
                expected_seq = 1;
            }
            assert_eq!(*seq, expected_seq, "{id}: gap or reordering: {list:?}");
            expected_seq += 1;
            if kind == "agent.cleaned_up" {
                ended.push(*incarnation);
            }
        }
        assert_eq!(expected_incarnation, incarnations, "{id}: {list:?}");
        assert_eq!(
            ended,
            (1..=incarnations).collect::<Vec<_>>(),
            "{id}: one cleaned_up per incarnation: {list:?}"
        );
        // Each incarnation: registered first, then disconnected, cleaned_up last.
        for incarnation in 1..=incarnations {
            let kinds: Vec<&str> = list
                .iter()
                .filter(|(_, i, _)| *i == incarnation)
                .map(|(k, _, _)| k.as_str())
                .collect();
            assert_eq!(kinds.first(), Some(&"agent.registered"), "{id}: {list:?}");
            assert_eq!(
                &kinds[kinds.len() - 2..],
                ["agent.disconnected", "agent.cleaned_up"],
                "{id}: {list:?}"
            );
            let disconnected = kinds.iter().filter(|k| **k == "agent.disconnected");
            assert_eq!(disconnected.count(), 1, "{id}: {list:?}");
        }
    }
}

#[tokio::test]
async fn two_subscribers_see_the_same_events_in_the_same_order() {
    let server = TestServer::start(&[]);
    let mut first = EventStream::subscribe(&server, None).await;
    let mut second = EventStream::subscribe(&server, None).await;
    for n in 0..5 {
        let (agent, _) = Agent::register(&server.ws_url(), &format!("a{n}")).await;
        agent.close().await;
    }
    let done = |e: &Value| e["type"] == "agent.cleaned_up" && e["subject"] == "a4";
    let a: Vec<Value> = first.collect_until(done).await;
    let b: Vec<Value> = second.collect_until(done).await;
    let ids = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["type"].as_str().unwrap().starts_with("agent."))
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&a), ids(&b));
    assert_eq!(ids(&a).len(), 15, "three events for each of five agents");
}

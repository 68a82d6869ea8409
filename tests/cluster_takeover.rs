//! Takeovers across nodes (PROTOCOL.md "Clusters"): an agent id held on one node is
//! taken over on another with its certificate or `force_reconnect`; the old
//! incarnation's end comes before the new one's `agent.registered`, on the nodes'
//! event streams and on the broker they share. Real Redis; each test has its own
//! prefix and its own stream.

mod common;

use common::brokers::{redis_stream, unique, Collector, Received};
use common::cluster::*;
use common::takeover::{assert_replaced, certificate, claim, register_with};
use common::*;
use futures_util::future::join_all;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Node settings publishing to the shared Redis on `stream`.
fn publishing_to(stream: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TETHER__EVENTS__PUBLISHERS", "log,redis".into()),
        ("TETHER__EVENTS__REDIS__URL", CLUSTER_REDIS.into()),
        ("TETHER__EVENTS__REDIS__STREAM", stream.into()),
    ]
}

/// `n` nodes of a new cluster with a `lease` (seconds), publishing to `stream`.
async fn nodes_publishing(
    n: usize,
    lease: &str,
    stream: &str,
    extra: &[(&str, &str)],
) -> Vec<TestServer> {
    let prefix = fresh_prefix();
    let env = publishing_to(stream);
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend_from_slice(extra);
    join_all((0..n).map(|_| node(&prefix, lease, &env))).await
}

/// `register_agent` for `agent_id` with `extra` fields, on a new connection to `url`.
async fn register_on(url: &str, agent_id: &str, extra: Value) -> (Agent, Value) {
    let mut agent = Agent::connect(url).await;
    let response = register_with(&mut agent, agent_id, extra).await;
    (agent, response)
}

fn kinds(events: &[Value]) -> Vec<(String, u64, u64)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["data"]["incarnation"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{e}")),
                e["data"]["seq"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// An event of an incarnation (not a refused registration's `registration_failed`).
fn is_lifecycle(event: &Value) -> bool {
    event["data"]["incarnation"].is_u64()
}

fn event(kind: &str, incarnation: u64, seq: u64) -> (String, u64, u64) {
    (kind.to_owned(), incarnation, seq)
}

/// Reads `agent_id`'s events on the broker until `n` arrived; in broker order.
async fn on_broker(consumer: &mut Collector, agent_id: &str, n: usize) -> Vec<Value> {
    let of = |r: &[Received]| -> Vec<Value> {
        r.iter()
            .filter(|r| r.event["subject"] == agent_id && is_lifecycle(&r.event))
            .map(|r| r.event.clone())
            .collect()
    };
    consumer
        .until(
            Duration::from_secs(30),
            |r| of(r).len() >= n,
            |r| format!("{:?}", kinds(&of(r))),
        )
        .await;
    of(&consumer.received)
}

/// The CloudEvents `time` of an event, in its RFC 3339 text (one clock: same host).
fn time(event: &Value) -> String {
    event["time"].as_str().expect("an event time").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_taken_over_on_another_node_ends_there_before_it_registers_here() {
    let stream = unique("tether-takeover");
    let nodes = nodes_publishing(2, "4", &stream, &[]).await;
    let mut consumer = redis_stream(CLUSTER_REDIS, &stream);
    let mut sse = [
        EventStream::subscribe(&nodes[0], None).await,
        EventStream::subscribe(&nodes[1], None).await,
    ];
    let (mut first, welcome) = Agent::register(&nodes[0].ws_url(), "mover").await;
    assert_eq!(welcome["incarnation"], 1);
    let cert = certificate(&mut first, "mover", false).await;

    // No proof: refused, and no other socket can get a certificate on the other node.
    let (_, refused) = register_on(&nodes[1].ws_url(), "mover", json!({})).await;
    assert_eq!(refused["error_code"], "agent_id_in_use", "{refused}");
    let mut thief = Agent::connect(&nodes[1].ws_url()).await;
    let claim = claim(&mut thief, "mover", true).await;
    assert_eq!(claim["success"], false, "{claim}");
    assert_eq!(claim["error_code"], "agent_id_in_use", "{claim}");

    // With its certificate, on node 1.
    let (mut second, welcome) =
        register_on(&nodes[1].ws_url(), "mover", json!({"certificate": cert})).await;
    assert_eq!(welcome["success"], true, "{welcome}");
    assert_eq!(welcome["incarnation"], 2, "{welcome}");
    assert_replaced(&mut first, "mover").await;

    // Node 0 published the old incarnation's end; node 1 the new one's start, later.
    let old = sse[0]
        .collect_until(|e| e["subject"] == "mover" && e["type"] == "agent.cleaned_up")
        .await;
    let old: Vec<Value> = old
        .into_iter()
        .filter(|e| e["subject"] == "mover" && is_lifecycle(e))
        .collect();
    assert_eq!(
        kinds(&old),
        [
            event("agent.registered", 1, 1),
            event("agent.replaced", 1, 2),
            event("agent.disconnected", 1, 3),
            event("agent.cleaned_up", 1, 4),
        ]
    );
    assert_eq!(old[1]["data"]["by_incarnation"], 2, "{}", old[1]);
    assert_eq!(old[1]["data"]["proof"], "certificate", "{}", old[1]);
    assert_eq!(old[2]["data"]["close_code"], 4001, "{}", old[2]);
    let new = sse[1]
        .wait_for(|e| e["subject"] == "mover" && e["type"] == "agent.registered")
        .await;
    assert_eq!(
        kinds(std::slice::from_ref(&new)),
        [event("agent.registered", 2, 1)]
    );
    assert_eq!(new["data"]["takeover"], "certificate", "{new}");
    assert!(time(&new) >= time(&old[3]), "{new} before {}", old[3]);
    // On the broker both nodes publish to, in that order.
    let shared = on_broker(&mut consumer, "mover", 5).await;
    assert_eq!(
        kinds(&shared),
        [
            event("agent.registered", 1, 1),
            event("agent.replaced", 1, 2),
            event("agent.disconnected", 1, 3),
            event("agent.cleaned_up", 1, 4),
            event("agent.registered", 2, 1),
        ]
    );

    // Messages find it on its new node.
    let (mut peer, _) = Agent::register(&nodes[0].ws_url(), "peer").await;
    peer.send(direct("mover", json!("found you"))).await;
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        second.wait_for(|f| f["type"] == "message"),
    )
    .await;
    let got = match got {
        Ok(got) => got,
        Err(_) => {
            let answer = tokio::time::timeout(Duration::from_secs(2), peer.next()).await;
            panic!(
                "the message never reached the id on its new node; the sender got {answer:?}; \
                 the new connection had {:?}\nnode 0:\n{}\nnode 1:\n{}",
                second.pending(),
                nodes[0].logs(),
                nodes[1].logs()
            );
        }
    };
    assert_eq!(got["data"]["content"], "found you", "{got}");

    // And back to node 0 with force_reconnect.
    let (_third, welcome) = register_on(
        &nodes[0].ws_url(),
        "mover",
        json!({"force_reconnect": true}),
    )
    .await;
    assert_eq!(welcome["incarnation"], 3, "{welcome}");
    assert_replaced(&mut second, "mover").await;
    let shared = on_broker(&mut consumer, "mover", 9).await;
    assert_eq!(
        kinds(&shared[5..]),
        [
            event("agent.replaced", 2, 2),
            event("agent.disconnected", 2, 3),
            event("agent.cleaned_up", 2, 4),
            event("agent.registered", 3, 1),
        ]
    );
    assert_eq!(shared[5]["data"]["proof"], "force_reconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_from_a_killed_node_publishes_its_end_as_a_node_loss_first() {
    let stream = unique("tether-takeover-dead");
    let timeout = [("TETHER__CLUSTER__TAKEOVER_TIMEOUT", "1")];
    let mut nodes = nodes_publishing(2, "4", &stream, &timeout).await;
    let mut consumer = redis_stream(CLUSTER_REDIS, &stream);
    let (mut doomed, _) = Agent::register(&nodes[0].ws_url(), "survivor").await;
    let cert = certificate(&mut doomed, "survivor", false).await;
    // Killed once its registration reached the broker (what a killed node had not
    // yet handed to its broker is lost with it; this test is about what comes after).
    let _ = on_broker(&mut consumer, "survivor", 1).await;

    nodes[0].signal("KILL");
    let _ = nodes[0].wait_exit().await;
    let asked = Instant::now();
    let (_agent, welcome) =
        register_on(&nodes[1].ws_url(), "survivor", json!({"certificate": cert})).await;
    let took = asked.elapsed();
    assert_eq!(welcome["success"], true, "{welcome}");
    assert_eq!(welcome["incarnation"], 2, "{welcome}");
    println!("takeover from a killed node answered after {took:?} (lease 4 s)");
    assert!(
        took <= Duration::from_secs(4 + 2),
        "waited {took:?}: at most the holder's lease and a second"
    );
    let shared = on_broker(&mut consumer, "survivor", 4).await;
    assert_eq!(
        kinds(&shared),
        [
            event("agent.registered", 1, 1),
            event("agent.disconnected", 1, 2),
            event("agent.cleaned_up", 1, 3),
            event("agent.registered", 2, 1),
        ]
    );
    assert_eq!(shared[1]["data"]["reason"], "node_lost", "{}", shared[1]);
    assert!(shared[1]["data"]["close_code"].is_null());
    // Nothing of the old incarnation was published twice (the reaper found it taken).
    let mut marker = Agent::register(&nodes[1].ws_url(), "marker").await.0;
    let _ = on_broker(&mut consumer, "marker", 1).await;
    let again = consumer
        .received
        .iter()
        .filter(|r| r.event["subject"] == "survivor" && is_lifecycle(&r.event))
        .count();
    assert_eq!(again, 4, "the lost incarnation's end was published twice");
    marker.send(direct("nobody", json!("?"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_holder_that_does_not_answer_gets_the_takeover_refused_as_retryable() {
    let stream = unique("tether-takeover-frozen");
    let timeout = [("TETHER__CLUSTER__TAKEOVER_TIMEOUT", "1")];
    // A long lease: the frozen node stays a member for the whole test.
    let nodes = nodes_publishing(2, "30", &stream, &timeout).await;
    let (mut holder, _) = Agent::register(&nodes[0].ws_url(), "held").await;
    let cert = certificate(&mut holder, "held", false).await;

    nodes[0].signal("STOP");
    let (_, refused) = register_on(
        &nodes[1].ws_url(),
        "held",
        json!({"certificate": cert.clone()}),
    )
    .await;
    nodes[0].signal("CONT");
    assert_eq!(
        refused["success"],
        false,
        "{refused}\nnode0:\n{}\nnode1:\n{}",
        nodes[0].logs(),
        nodes[1].logs()
    );
    assert_eq!(refused["error_code"], "cluster_unavailable", "{refused}");

    // Once it answers again, the same registration succeeds (the late answer to the
    // refused one released the id, or the holder still has it: either way it moves).
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (agent, welcome) = register_on(
            &nodes[1].ws_url(),
            "held",
            json!({"certificate": cert.clone()}),
        )
        .await;
        if welcome["success"] == true {
            assert_replaced_or_gone(&mut holder).await;
            drop(agent);
            break;
        }
        assert!(Instant::now() < deadline, "never taken over: {welcome}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The frozen holder's connection ends (replaced, or already closed 4001 by the
/// takeover whose answer came late).
async fn assert_replaced_or_gone(old: &mut Agent) {
    assert_eq!(old.closed().await, Closed::Code(4001));
}

/// The `(from, n)` of every numbered message among `frames`.
fn numbered(frames: &[Value]) -> Vec<(u64, u64)> {
    frames
        .iter()
        .filter(|f| f["type"] == "message")
        .filter_map(|f| {
            let content = &f["data"]["content"];
            Some((content["from"].as_u64()?, content["n"].as_u64()?))
        })
        .collect()
}

/// Every frame `agent` reads until its connection closes (those already read first);
/// `ready` is told once `threshold` numbered messages arrived.
async fn read_until_closed(
    mut agent: Agent,
    threshold: usize,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Vec<Value> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut frames = agent.pending();
    let mut ready = Some(ready);
    loop {
        let message = tokio::time::timeout(DEADLINE, agent.raw().next())
            .await
            .expect("the old connection was neither closed nor sent anything");
        match message {
            Some(Ok(Message::Text(text))) => {
                frames.push(serde_json::from_str(&text).expect("JSON"));
                if numbered(&frames).len() >= threshold {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                }
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return frames,
            Some(Ok(_)) => {}
        }
    }
}

/// Messages to an id sent from every node while the id moves between nodes all reach
/// its old connection (before it closes) or its new one: none is lost (emqx#6393).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_from_every_node_while_an_id_moves_reach_its_old_or_new_connection() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stream = unique("tether-takeover-inflight");
    let nodes = nodes_publishing(3, "4", &stream, &[]).await;
    let (mut first, _) = Agent::register(&nodes[0].ws_url(), "busy").await;
    let cert = certificate(&mut first, "busy", false).await;
    let mut senders = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        senders.push(
            Agent::register(&node.ws_url(), &format!("sender-{i}"))
                .await
                .0,
        );
    }
    let (ready, flowing) = tokio::sync::oneshot::channel();
    let old = tokio::spawn(read_until_closed(first, 30, ready));
    let stop = Arc::new(AtomicBool::new(false));
    let sending: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, mut sender)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    sender
                        .send(direct("busy", json!({"from": i, "n": sent})))
                        .await;
                    sent += 1;
                    // Paced, so the stream spans the whole takeover.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                (sender, sent)
            })
        })
        .collect();
    flowing.await.expect("messages reach the holder");

    // Taken over on node 1 while all three keep sending.
    let (mut second, welcome) =
        register_on(&nodes[1].ws_url(), "busy", json!({"certificate": cert})).await;
    assert_eq!(welcome["success"], true, "{welcome}");
    let mut new = Vec::new();
    while (0..3).any(|i| numbered(&new).iter().filter(|(from, _)| *from == i).count() < 20) {
        new.push(second.next().await);
    }
    stop.store(true, Ordering::Relaxed);
    let old = old.await.unwrap();
    for (i, task) in sending.into_iter().enumerate() {
        let (mut sender, sent) = task.await.unwrap();
        sender
            .send(direct("busy", json!({"from": i, "last": sent})))
            .await;
    }
    let mut last = 0;
    while last < 3 {
        let frame = second.next().await;
        last += usize::from(frame["data"]["content"]["last"].is_u64());
        new.push(frame);
    }
    let mut sent = [0u64; 3];
    for frame in &new {
        if let (Some(from), Some(total)) = (
            frame["data"]["content"]["from"].as_u64(),
            frame["data"]["content"]["last"].as_u64(),
        ) {
            sent[from as usize] = total;
        }
    }
    let (old, new) = (numbered(&old), numbered(&new));
    for (i, sent) in sent.iter().enumerate() {
        let i = i as u64;
        let mut got: Vec<u64> = old
            .iter()
            .chain(&new)
            .filter(|m| m.0 == i)
            .map(|m| m.1)
            .collect();
        got.sort_unstable();
        let expected: Vec<u64> = (0..*sent).collect();
        assert_eq!(
            got,
            expected,
            "sender {i} (on node {i}) sent {sent}; the old connection got {}, the new one {}",
            old.iter().filter(|m| m.0 == i).count(),
            new.iter().filter(|m| m.0 == i).count()
        );
    }
}

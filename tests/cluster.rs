//! A Tether network over several nodes, coordinated through the real Redis on
//! 127.0.0.1:6379: each test starts its own nodes (the real binary, on free ports)
//! under a prefix of its own, so tests never share keys.

mod common;

use common::cluster::*;
use common::*;
use futures_util::future::join_all;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tether_testkit::{free_port, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_different_nodes_reach_each_other_directly_and_by_broadcast() {
    let (_prefix, nodes) = cluster(3, "4").await;
    let (mut a, _) = Agent::register(&nodes[0].ws_url(), "a").await;
    let (mut b, _) = Agent::register(&nodes[1].ws_url(), "b").await;
    let (mut c, _) = Agent::register(&nodes[2].ws_url(), "c").await;

    a.send(direct("b", json!("hello b"))).await;
    let got = b.wait_for(is_message).await;
    assert_eq!(got["data"]["content"], "hello b", "{got}");
    assert_eq!(
        got["data"]["sender_id"], "a",
        "the server sets the sender: {got}"
    );

    // A broadcast from b reaches a and c once each, and not b.
    b.send(broadcast(&[], json!("to all"))).await;
    b.send(direct("a", json!("after"))).await;
    b.send(direct("c", json!("after"))).await;
    for agent in [&mut a, &mut c] {
        assert_eq!(
            agent.wait_for(is_message).await["data"]["content"],
            "to all"
        );
        assert_eq!(
            agent.wait_for(is_message).await["data"]["content"],
            "after",
            "a duplicate"
        );
    }
    // Excluded on another node: c does not get it.
    a.send(broadcast(&["c"], json!("not c"))).await;
    a.send(direct("c", json!("marker"))).await;
    assert_eq!(b.wait_for(is_message).await["data"]["content"], "not c");
    assert_eq!(c.wait_for(is_message).await["data"]["content"], "marker");
    assert!(
        !b.pending().iter().any(is_message),
        "b got its own broadcast"
    );

    // An id held nowhere: unknown_agent, with the message's id.
    c.send(direct("nobody", json!("?"))).await;
    let error = c.wait_for(|f| f["type"] == "error").await;
    assert_eq!(error["error_code"], "unknown_agent", "{error}");
    assert!(error["message_id"].is_string(), "{error}");

    // Every node lists the three members with their advertise URLs.
    let listed = nodes[2].get_json("/cluster/nodes").await;
    let listed = listed["nodes"].as_array().expect("nodes").clone();
    assert_eq!(listed.len(), 3, "{listed:?}");
    for node in &nodes {
        let url = node
            .ws_url()
            .replace("ws://", "")
            .trim_end_matches('/')
            .to_owned();
        assert!(
            listed
                .iter()
                .any(|n| n["advertise_url"].as_str().unwrap().contains(&url)),
            "{url} not in {listed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_registered_on_two_nodes_at_the_same_instant_has_exactly_one_holder() {
    let (_prefix, nodes) = cluster(2, "4").await;
    assert_one_winner_per_race(&nodes[0].ws_url(), &nodes[1].ws_url(), 100).await;
}

/// Registers `agent_id` at `url`, retrying while its previous node has not released it
/// yet (a release reaches Redis just after the old incarnation's end is published).
async fn register_once_free(url: &str, agent_id: &str) -> (Agent, Value) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut agent = Agent::connect(url).await;
        let answer = agent
            .request(
                json!({"type":"system_request","command":"register_agent","agent_id":agent_id}),
            )
            .await;
        if answer["success"] == true {
            return (agent, answer);
        }
        assert_eq!(answer["error_code"], "agent_id_in_use", "{answer}");
        assert!(Instant::now() < deadline, "{agent_id} was never released");
        agent.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incarnations_of_an_id_grow_as_it_moves_between_nodes() {
    let (_prefix, nodes) = cluster(2, "4").await;
    let mut seen = Vec::new();
    for round in 0..6 {
        let (agent, welcome) = register_once_free(&nodes[round % 2].ws_url(), "wanderer").await;
        seen.push(welcome["incarnation"].as_u64().expect("incarnation"));
        agent.close().await;
    }
    assert!(seen.windows(2).all(|w| w[1] > w[0]), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_agents_are_ended_once_by_a_survivor_and_their_ids_are_free() {
    const AGENTS: usize = 1000;
    const LEASE: f64 = 2.0;
    let (_prefix, mut nodes) = cluster(3, "2").await;
    let mut streams = [
        EventStream::subscribe(&nodes[0], None).await,
        EventStream::subscribe(&nodes[1], None).await,
    ];
    let doomed_url = nodes[2].ws_url();
    let mut doomed = Vec::new();
    let mut incarnations = HashMap::new();
    for chunk in (0..AGENTS).collect::<Vec<_>>().chunks(100) {
        let registered = join_all(chunk.iter().map(|i| {
            let url = doomed_url.clone();
            async move { Agent::register(&url, &format!("lost-{i}")).await }
        }))
        .await;
        for (agent, welcome) in registered {
            let id = welcome["agent_id"].as_str().unwrap().to_owned();
            incarnations.insert(id, welcome["incarnation"].as_u64().unwrap());
            doomed.push(agent);
        }
    }
    let (bystander, _) = Agent::register(&nodes[0].ws_url(), "bystander").await;

    let killed = Instant::now();
    nodes[2].signal("KILL");
    let _ = nodes[2].wait_exit().await;

    // Every agent of the lost node: one disconnected (node_lost, no close code) and one
    // cleaned_up, published by one survivor or the other, never both.
    let mut ends: HashMap<String, Vec<Value>> = HashMap::new();
    let mut cleaned = 0;
    while cleaned < AGENTS {
        let next = {
            let (s0, s1) = streams.split_at_mut(1);
            tokio::select! {
                e = s0[0].next() => e,
                e = s1[0].next() => e,
            }
        };
        let subject = next["subject"].as_str().unwrap_or_default().to_owned();
        if !subject.starts_with("lost-") {
            continue;
        }
        if next["type"] == "agent.cleaned_up" {
            cleaned += 1;
        }
        ends.entry(subject).or_default().push(next);
    }
    let took = killed.elapsed();
    assert_eq!(ends.len(), AGENTS);
    for (id, events) in &ends {
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["agent.disconnected", "agent.cleaned_up"],
            "{id}: {events:?}"
        );
        let disconnected = &events[0]["data"];
        assert_eq!(disconnected["reason"], "node_lost", "{disconnected}");
        assert!(disconnected["close_code"].is_null(), "{disconnected}");
        assert_eq!(disconnected["incarnation"], incarnations[id]);
        assert_eq!(
            disconnected["seq"], 2,
            "registered was seq 1: {disconnected}"
        );
        assert_eq!(events[1]["data"]["seq"], 3);
    }
    println!("node loss: {AGENTS} agents cleaned up {took:?} after kill -9 (lease {LEASE} s)");
    assert!(
        took <= Duration::from_secs_f64(LEASE + 2.0),
        "the last cleaned_up came {took:?} after the kill; the contract is node_lease + 2 s"
    );
    // The ids are free at once, and their next incarnation follows the lost one.
    let (mut agent, welcome) = Agent::register(&nodes[1].ws_url(), "lost-7").await;
    assert_eq!(
        welcome["incarnation"],
        incarnations["lost-7"] + 1,
        "{welcome}"
    );
    // Nothing of the lost agents was published twice (node 1's stream, read up to the
    // new registration).
    streams[1]
        .wait_for(|e| e["subject"] == "lost-7" && e["type"] == "agent.registered")
        .await;
    let late: Vec<Value> = streams[1]
        .pending()
        .into_iter()
        .filter(|e| {
            e["subject"]
                .as_str()
                .is_some_and(|s| s.starts_with("lost-"))
        })
        .collect();
    assert!(late.is_empty(), "ends published again: {late:?}");
    // The survivors serve on: a message from the new incarnation arrives.
    let mut bystander = bystander;
    agent.send(direct("bystander", json!("still here"))).await;
    assert_eq!(
        bystander.wait_for(is_message).await["data"]["content"],
        "still here"
    );
    drop(doomed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_past_its_lease_closes_its_agents_4009_and_its_ids_move_on() {
    let (_prefix, nodes) = cluster(2, "2").await;
    let mut events = EventStream::subscribe(&nodes[0], None).await;
    let (mut frozen_x, welcome) = Agent::register(&nodes[1].ws_url(), "x").await;
    let first = welcome["incarnation"].as_u64().unwrap();

    nodes[1].signal("STOP");
    // The survivor ends x's incarnation as a node loss, and x can register there.
    let lost = events
        .wait_for(|e| e["subject"] == "x" && e["type"] == "agent.disconnected")
        .await;
    assert_eq!(lost["data"]["reason"], "node_lost", "{lost}");
    assert_eq!(lost["data"]["incarnation"], first);
    let (mut x, welcome) = Agent::register(&nodes[0].ws_url(), "x").await;
    assert_eq!(welcome["incarnation"], first + 1, "{welcome}");

    // Resumed, the frozen node knows its lease is gone: it closes x 4009 and publishes
    // nothing for it, then joins again.
    nodes[1].signal("CONT");
    assert_eq!(frozen_x.closed().await, Closed::Code(4009));
    wait_readyz(&nodes[1], 200).await;
    let (mut y, _) = Agent::register(&nodes[1].ws_url(), "y").await;
    y.send(direct("x", json!("from the rejoined node"))).await;
    assert_eq!(
        x.wait_for(is_message).await["data"]["content"],
        "from the rejoined node"
    );

    // One end of x's first incarnation in all: none came from the frozen node (which
    // publishes on its own stream, and whose reaper found nothing left to end).
    let mut again = EventStream::subscribe(&nodes[1], None).await;
    let (_z, _) = Agent::register(&nodes[1].ws_url(), "z").await;
    again
        .wait_for(|e| e["subject"] == "z" && e["type"] == "agent.registered")
        .await;
    let x_events: Vec<Value> = again
        .pending()
        .into_iter()
        .filter(|e| e["subject"] == "x")
        .collect();
    assert!(x_events.is_empty(), "{x_events:?}");
    let log = nodes[1].logs();
    assert!(log.contains("lost its lease"), "{log}");
}

#[tokio::test]
async fn a_clustered_node_without_a_shared_secret_does_not_start() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .env("TETHER__CLUSTER__ENABLED", "true")
        .env("TETHER__NETWORK__PORT", "0")
        .output()
        .expect("cannot run tether");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("identity.secret") && stderr.contains("cluster.enabled"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_redis_a_node_is_not_ready_and_refuses_registrations_as_retryable() {
    let closed_port = free_port();
    let url = format!("redis://127.0.0.1:{closed_port}");
    let server = TestServer::start(&[
        ("TETHER__CLUSTER__ENABLED", "true"),
        ("TETHER__CLUSTER__REDIS_URL", &url),
        ("TETHER__CLUSTER__NODE_LEASE", "2"),
        ("TETHER__IDENTITY__SECRET", "s"),
    ]);
    let ready = http().get(server.http("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert!(
        body["reason"].as_str().unwrap().contains("cluster"),
        "{body}"
    );

    let mut agent = Agent::connect(&server.ws_url()).await;
    let answer = agent
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"early"}))
        .await;
    assert_eq!(answer["success"], false, "{answer}");
    assert_eq!(answer["error_code"], "cluster_unavailable", "{answer}");
    // The socket stays open: the agent may retry on it.
    let pong = agent
        .request(json!({"type":"system_request","command":"ping_agent","timestamp":1.0}))
        .await;
    assert_eq!(pong["timestamp"], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_redis_cut_keeps_local_agents_served_and_nothing_is_published_twice() {
    require_redis();
    let proxy = Proxy::start("127.0.0.1:6379");
    let prefix = fresh_prefix();
    let through = [(
        "TETHER__CLUSTER__REDIS_URL",
        format!("redis://{}", proxy.addr()),
    )];
    let through: Vec<(&str, &str)> = through.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // A lease long enough that the cut stays shorter than it.
    let (n1, n2) = tokio::join!(node(&prefix, "20", &through), node(&prefix, "20", &through));
    let mut events = EventStream::subscribe(&n1, None).await;
    let (mut a, _) = Agent::register(&n1.ws_url(), "a").await;
    let (mut leaver, _) = Agent::register(&n1.ws_url(), "leaver").await;
    let (mut b, _) = Agent::register(&n2.ws_url(), "b").await;

    proxy.cut();
    wait_readyz(&n1, 503).await;
    // Agents of one node still talk to each other.
    a.send(direct("leaver", json!("local"))).await;
    assert_eq!(
        leaver.wait_for(is_message).await["data"]["content"],
        "local"
    );
    // What needs the cluster is refused, retryably.
    a.send(direct("b", json!("across"))).await;
    let error = a.wait_for(|f| f["type"] == "error").await;
    assert_eq!(error["error_code"], "cluster_unavailable", "{error}");
    let mut newcomer = Agent::connect(&n1.ws_url()).await;
    let refused = newcomer
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"new"}))
        .await;
    assert_eq!(refused["error_code"], "cluster_unavailable", "{refused}");
    // An agent leaves during the cut: its end is published now, its id freed later.
    leaver.close().await;
    for kind in ["agent.disconnected", "agent.cleaned_up"] {
        events
            .wait_for(|e| e["subject"] == "leaver" && e["type"] == kind)
            .await;
    }

    proxy.restore();
    wait_readyz(&n1, 200).await;
    wait_readyz(&n2, 200).await;
    a.send(direct("b", json!("across again"))).await;
    assert_eq!(
        b.wait_for(is_message).await["data"]["content"],
        "across again"
    );
    // The id that left during the cut is free again, on any node.
    let (_back, welcome) = register_once_free(&n2.ws_url(), "leaver").await;
    assert_eq!(welcome["incarnation"], 2, "{welcome}");
    let (_new, _) = Agent::register(&n1.ws_url(), "new").await;
    events
        .wait_for(|e| e["subject"] == "new" && e["type"] == "agent.registered")
        .await;
    let twice: Vec<Value> = events
        .pending()
        .into_iter()
        .filter(|e| e["subject"] == "leaver" || e["subject"] == "a")
        .filter(|e| e["type"] == "agent.disconnected" || e["type"] == "agent.cleaned_up")
        .collect();
    assert!(twice.is_empty(), "published again: {twice:?}");
}

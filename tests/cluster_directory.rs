//! The cluster seen from any node (PROTOCOL.md "Clusters"): listing, describing and
//! removing agents held anywhere, the cluster's totals in `/stats`, and placement
//! (`GET /connect`, `reconnect_url` on a node's shutdown). Real Redis; each test has
//! its own prefix.

mod common;

use common::cluster::*;
use common::*;
use futures_util::future::join_all;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Instant;

/// The node id of each node, as `/cluster/nodes` lists them (by advertise URL).
async fn node_ids(nodes: &[TestServer]) -> Vec<String> {
    let listed = nodes[0].get_json("/cluster/nodes").await;
    let listed = listed["nodes"].as_array().expect("nodes").clone();
    nodes
        .iter()
        .map(|node| {
            let url = node.ws_url();
            let url = url.trim_end_matches('/');
            listed
                .iter()
                .find(|n| n["advertise_url"].as_str().unwrap().starts_with(url))
                .unwrap_or_else(|| panic!("{url} not in {listed:?}"))["node_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_lists_describes_and_removes_the_agents_of_every_node() {
    let (_prefix, nodes) = cluster(3, "4").await;
    let ids = node_ids(&nodes).await;
    let mut events = EventStream::subscribe(&nodes[0], None).await;
    let mut agents = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        agents.push(Agent::register(&nodes[i].ws_url(), name).await.0);
    }

    // GET /agents on node 2: all three, in id order, each with its node.
    let listed = nodes[2].get_json("/agents").await;
    assert_eq!(listed["count"], 3, "{listed}");
    let listed: Vec<(String, String)> = listed["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let id = a["agent_id"].as_str().unwrap().to_owned();
            (id, a["node_id"].as_str().unwrap().to_owned())
        })
        .collect();
    let expected: Vec<(String, String)> = ["a", "b", "c"]
        .iter()
        .zip(&ids)
        .map(|(a, n)| (a.to_string(), n.clone()))
        .collect();
    assert_eq!(listed, expected);

    // GET /agents/a from node 2: its claim, with its node and incarnation.
    let a = nodes[2].get_json("/agents/a").await;
    assert_eq!(a["node_id"], ids[0].as_str(), "{a}");
    assert_eq!(a["incarnation"], 1, "{a}");
    assert_eq!(a["name"], "a", "{a}");
    assert!(
        a["session_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{a}"
    );
    let missing = http()
        .get(nodes[2].http("/agents/nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // list_agents from c, a page of 2 then the rest.
    let first = agents[2]
        .request(json!({"type":"system_request","command":"list_agents","limit":2}))
        .await;
    let page: Vec<&str> = first["agents"]
        .as_array()
        .unwrap_or_else(|| panic!("{first}"))
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(page, ["a", "b"], "{first}");
    assert_eq!(first["has_more"], true, "{first}");
    let rest = agents[2]
        .request(
            json!({"type":"system_request","command":"list_agents","limit":2,
                        "cursor": first["next_cursor"]}),
        )
        .await;
    assert_eq!(rest["agents"][0]["agent_id"], "c", "{rest}");
    assert_eq!(rest["has_more"], false, "{rest}");

    // /stats: this node's figures and the cluster's totals.
    let stats = nodes[1].get_json("/stats").await;
    assert_eq!(stats["connections"]["registered_agents"], 1, "{stats}");
    assert_eq!(stats["cluster"]["nodes"], 3, "{stats}");
    assert_eq!(stats["cluster"]["agents"], 3, "{stats}");

    // DELETE /agents/a on node 2: node 0 closes it (1000, admin) and publishes its end.
    let removed = http()
        .delete(nodes[2].http("/agents/a"))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204);
    assert_eq!(agents[0].closed().await, Closed::Code(1000));
    let end = events
        .wait_for(|e| e["subject"] == "a" && e["type"] == "agent.disconnected")
        .await;
    assert_eq!(end["data"]["reason"], "admin", "{end}");
    let gone = http()
        .delete(nodes[2].http("/agents/a"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404, "removed once");
    assert_eq!(nodes[1].get_json("/agents").await["count"], 2);
}

/// `GET /connect?strategy=…` on `node`.
async fn where_to_connect(node: &TestServer, strategy: &str) -> Value {
    http()
        .get(node.http(&format!("/connect?strategy={strategy}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Asks `node` where to connect, connects there and registers as `agent_id`.
async fn placed(node: &TestServer, strategy: &str, agent_id: &str) -> (String, Agent) {
    let answer = where_to_connect(node, strategy).await;
    let url = answer["url"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}"))
        .to_owned();
    let (agent, _) = Agent::register(&url, agent_id).await;
    (url, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_spreads_new_agents_evenly_and_never_to_a_node_shutting_down() {
    const AGENTS: usize = 300;
    let prefix = fresh_prefix();
    let shutdown = [("TETHER__SHUTDOWN__TIMEOUT", "5")];
    let nodes = join_all((0..3).map(|_| node(&prefix, "4", &shutdown))).await;

    let mut per_url: HashMap<String, usize> = HashMap::new();
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let (url, agent) = placed(&nodes[i % 3], "least_loaded", &format!("p-{i}")).await;
        *per_url.entry(url).or_default() += 1;
        agents.push(agent);
    }
    assert_eq!(per_url.len(), 3, "{per_url:?}");
    for (url, n) in &per_url {
        assert!(
            (90..=110).contains(n),
            "{url} got {n} of {AGENTS} agents (±10 %): {per_url:?}"
        );
    }
    let mut turns: HashMap<String, usize> = HashMap::new();
    for i in 0..30 {
        let (url, agent) = placed(&nodes[0], "round_robin", &format!("rr-{i}")).await;
        *turns.entry(url).or_default() += 1;
        agents.push(agent);
    }
    assert_eq!(
        turns.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "{turns:?}"
    );
    let bad = http()
        .get(nodes[0].http("/connect?strategy=random"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // Node 2 shuts down: its agents are told another node's URL; /connect stops
    // sending agents there.
    let leaving_url = nodes[2].ws_url();
    let leaving_url = leaving_url.trim_end_matches('/').to_owned();
    let (mut witness, _) = Agent::register(&nodes[2].ws_url(), "witness").await;
    nodes[2].signal("TERM");
    let notice = witness
        .wait_for(|f| f["type"] == "system_notification" && f["event"] == "network_shutdown")
        .await;
    let reconnect = notice["reconnect_url"]
        .as_str()
        .unwrap_or_else(|| panic!("{notice}"));
    assert!(
        !reconnect.starts_with(&leaving_url),
        "sent back to the node shutting down: {notice}"
    );
    assert!(
        [&nodes[0], &nodes[1]]
            .iter()
            .any(|n| reconnect.starts_with(n.ws_url().trim_end_matches('/'))),
        "{reconnect} is not a live node"
    );
    let deadline = Instant::now() + DEADLINE;
    loop {
        let listed = nodes[0].get_json("/cluster/nodes").await;
        let leaving = listed["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| {
                n["advertise_url"]
                    .as_str()
                    .unwrap()
                    .starts_with(&leaving_url)
            })
            .map(|n| n["shutting_down"] == true);
        if leaving != Some(false) {
            break; // Said so in its lease (or already gone).
        }
        assert!(Instant::now() < deadline, "never said it is shutting down");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for strategy in ["least_loaded", "round_robin"] {
        for _ in 0..10 {
            let answer = where_to_connect(&nodes[0], strategy).await;
            let url = answer["url"].as_str().unwrap();
            assert!(!url.starts_with(&leaving_url), "{strategy}: {answer}");
        }
    }
    witness.close().await;
    drop(agents);
}

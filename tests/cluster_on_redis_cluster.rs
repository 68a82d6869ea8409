//! A Tether cluster coordinated through a Redis Cluster (`cluster.redis_url =
//! redis+cluster://...`): three Redis masters the test starts itself, so one agent's
//! keys and another's, and the members' keys, live on different shards.

mod common;

use common::brokers::RedisClusterProcesses;
use common::cluster::{fresh_prefix, is_message, node};
use common::*;
use futures_util::future::join_all;
use serde_json::json;
use std::time::{Duration, Instant};

async fn nodes_on(redis: &RedisClusterProcesses, n: usize, lease: &str) -> Vec<TestServer> {
    let url = redis.url();
    let prefix = fresh_prefix();
    let extra = [("TETHER__CLUSTER__REDIS_URL", url.as_str())];
    join_all((0..n).map(|_| node(&prefix, lease, &extra))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_a_redis_cluster_route_list_race_and_take_over() {
    let redis = RedisClusterProcesses::start();
    let nodes = nodes_on(&redis, 2, "4").await;
    let ids: Vec<String> = (0..20).map(|n| format!("agent-{n}")).collect();
    let mut agents = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        agents.push(Agent::register(&nodes[n % 2].ws_url(), id).await.0);
    }
    // The agents' keys are spread over the shards (so pipelines crossed slots).
    let shards_with_keys = redis
        .ports
        .iter()
        .filter(|port| redis.cli(**port, &["dbsize"]).trim() != "0")
        .count();
    assert!(shards_with_keys >= 2, "keys on {shards_with_keys} shard(s)");

    // Direct across nodes, and a broadcast reaching every other agent once.
    agents[0].send(direct("agent-1", json!("across"))).await;
    let got = agents[1].wait_for(is_message).await;
    assert_eq!(
        (
            got["data"]["content"].clone(),
            got["data"]["sender_id"].clone()
        ),
        (json!("across"), json!("agent-0"))
    );
    agents[3].send(broadcast(&[], json!("all"))).await;
    for (n, agent) in agents.iter_mut().enumerate().filter(|(n, _)| *n != 3) {
        let got = agent.wait_for(is_message).await;
        assert_eq!(got["data"]["content"], "all", "agent-{n}: {got}");
    }

    // The listing is cluster-wide from either node.
    let listed = nodes[1].get_json("/agents").await;
    let listed = listed["agents"].as_array().expect("agents").len();
    assert_eq!(listed, 20);

    // One holder per id, cluster-wide, even at the same instant.
    let (url0, url1) = (nodes[0].ws_url(), nodes[1].ws_url());
    for attempt in 0..20 {
        let id = format!("race-{attempt}");
        let (mut one, mut two) = tokio::join!(Agent::connect(&url0), Agent::connect(&url1));
        let register = json!({"type":"system_request","command":"register_agent","agent_id":id});
        let (r1, r2) = tokio::join!(one.request(register.clone()), two.request(register));
        let won = [&r1, &r2].iter().filter(|r| r["success"] == true).count();
        assert_eq!(won, 1, "attempt {attempt}: {r1} / {r2}");
        tokio::join!(one.close(), two.close());
    }

    // A takeover across nodes: agent-0 (node 0) is taken by a registration on node 1.
    let mut events = EventStream::subscribe(&nodes[1], None).await;
    let mut taker = Agent::connect(&nodes[1].ws_url()).await;
    let answer = taker
        .request(json!({"type":"system_request","command":"register_agent",
                        "agent_id":"agent-0","force_reconnect":true}))
        .await;
    assert_eq!(answer["success"], true, "{answer}");
    assert_eq!(answer["incarnation"], 2, "{answer}");
    let closed = agents[0].closed().await;
    assert!(matches!(closed, Closed::Code(4001)), "{closed:?}");
    events
        .wait_for(|e| e["type"] == "agent.registered" && e["subject"] == "agent-0")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_on_a_redis_cluster_has_its_agents_ended_by_the_survivor() {
    let redis = RedisClusterProcesses::start();
    let mut nodes = nodes_on(&redis, 2, "2").await;
    let mut events = EventStream::subscribe(&nodes[1], None).await;
    let mut held = Vec::new();
    for n in 0..30 {
        held.push(
            Agent::register(&nodes[0].ws_url(), &format!("lost-{n}"))
                .await
                .0,
        );
    }
    nodes[0].signal("KILL");
    let killed = Instant::now();
    let mut cleaned = std::collections::HashSet::new();
    while cleaned.len() < 30 {
        let event = events
            .wait_for(|e| {
                e["type"] == "agent.cleaned_up"
                    && e["subject"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("lost-"))
            })
            .await;
        assert!(
            cleaned.insert(event["subject"].as_str().unwrap().to_owned()),
            "twice: {event}"
        );
    }
    // node_lease (2 s) + 2 s.
    assert!(
        killed.elapsed() < Duration::from_secs(4),
        "{:?}",
        killed.elapsed()
    );
    let (_again, answer) = Agent::register(&nodes[1].ws_url(), "lost-0").await;
    assert_eq!(
        answer["incarnation"], 2,
        "reusable at once, next incarnation: {answer}"
    );
    drop(nodes.remove(0));
}

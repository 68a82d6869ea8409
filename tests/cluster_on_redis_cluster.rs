//! A Tether cluster coordinated through a Redis Cluster (`cluster.redis_url =
//! redis+cluster://...`): three Redis masters the test starts itself, so one agent's
//! keys and another's, and the members' keys, live on different shards.

mod common;

use common::cluster::{assert_one_winner_per_race, fresh_prefix, is_message, node};
use common::redis_cluster::RedisClusterProcesses;
use common::*;
use futures_util::future::join_all;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn nodes_on(redis: &RedisClusterProcesses, n: usize, lease: &str) -> Vec<TestServer> {
    let url = redis.url();
    let prefix = fresh_prefix();
    let extra = [("TETHER__CLUSTER__REDIS_URL", url.as_str())];
    join_all((0..n).map(|_| node(&prefix, lease, &extra))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_a_redis_cluster_route_list_race_and_take_over() {
    let redis = RedisClusterProcesses::start(0);
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
    assert_one_winner_per_race(&nodes[0].ws_url(), &nodes[1].ws_url(), 20).await;

    // A takeover across nodes: agent-0 (node 0) is taken by a registration on node 1.
    let mut events = EventStream::subscribe(&nodes[1], None).await;
    let mut taker = Agent::connect(&nodes[1].ws_url()).await;
    let answer = taker
        .request(json!({"type":"system_request","command":"register_agent",
                        "agent_id":"agent-0","force_reconnect":true}))
        .await;
    assert_eq!(
        answer["success"],
        true,
        "{answer}\nnode 0:\n{}\nnode 1:\n{}",
        nodes[0].logs(),
        nodes[1].logs()
    );
    assert_eq!(answer["incarnation"], 2, "{answer}");
    let closed = agents[0].closed().await;
    assert!(matches!(closed, Closed::Code(4001)), "{closed:?}");
    events
        .wait_for(|e| e["type"] == "agent.registered" && e["subject"] == "agent-0")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_on_a_redis_cluster_has_its_agents_ended_by_the_survivor() {
    let redis = RedisClusterProcesses::start(0);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_master_that_fails_over_leaves_the_nodes_serving() {
    let mut redis = RedisClusterProcesses::start(1);
    let (url, prefix) = (redis.url(), fresh_prefix());
    let extra = [("TETHER__CLUSTER__REDIS_URL", url.as_str())];
    let nodes = join_all((0..2).map(|_| node(&prefix, "10", &extra))).await;
    let (mut a, _) = Agent::register(&nodes[0].ws_url(), "a").await;
    let (mut b, _) = Agent::register(&nodes[1].ws_url(), "b").await;
    a.send(direct("b", json!("before"))).await;
    assert_eq!(b.wait_for(is_message).await["data"]["content"], "before");

    // The first seed, a master (every node subscribed through it), dies; its replica
    // takes over.
    let master = redis.ports[0];
    assert!(redis.cli(master, &["role"]).starts_with("master"));
    redis.kill(0);
    redis.wait_failed_over(0);

    // Registrations claim through the new slot map (`cluster_unavailable`, which says
    // retry, while the client learns it).
    let deadline = Instant::now() + DEADLINE;
    let mut c = loop {
        let mut c = Agent::connect(&nodes[1].ws_url()).await;
        let answer = c
            .request(json!({"type":"system_request","command":"register_agent","agent_id":"c"}))
            .await;
        if answer["success"] == true {
            assert_eq!(answer["incarnation"], 1, "{answer}");
            break c;
        }
        assert_eq!(answer["error_code"], "cluster_unavailable", "{answer}");
        assert!(
            Instant::now() < deadline,
            "never registered after the failover: {answer}\n{}",
            nodes[1].logs()
        );
        c.close().await;
    };
    // Messages cross nodes again once the subscribers moved to a live seed (pub/sub is
    // at most once: what was published meanwhile may be lost, so probe until one lands).
    let deadline = Instant::now() + DEADLINE;
    let mut probe = 0;
    let landed = loop {
        probe += 1;
        a.send(direct("c", json!({"probe": probe}))).await;
        let got = tokio::time::timeout(Duration::from_millis(200), c.wait_for(is_message)).await;
        if let Ok(got) = got {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "no message crossed after the failover"
        );
    };
    assert!(landed["data"]["content"]["probe"].is_number(), "{landed}");
    // And the other way, to the node of before (it may still be moving its
    // subscription: a message meanwhile is lost, or refused `cluster_unavailable`).
    let deadline = Instant::now() + DEADLINE;
    let mut round = 1000;
    while !arrived_or_retryable(&mut b, &mut a, "a", round).await {
        round += 1;
        assert!(
            Instant::now() < deadline,
            "no message crossed to a after the failover"
        );
    }
    // Neither node lost its lease: the agents of before are still connected.
    for (node, id) in [(&nodes[0], "a"), (&nodes[1], "b")] {
        let shown = node.get_json(&format!("/agents/{id}")).await;
        assert_eq!(shown["incarnation"], 1, "{shown}");
    }

    // The dead seed comes back (a replica now) and a third node starts, subscribing
    // where the first two do. Messages cross both ways, never refused `unknown_agent`
    // (the count a PUBLISH answers covers one Redis node's subscribers only; a node may
    // still be moving its subscription, see below).
    redis.restart(0);
    let third = node(&prefix, "10", &extra).await;
    let (mut d, _) = Agent::register(&third.ws_url(), "d").await;
    let deadline = Instant::now() + DEADLINE;
    let mut round = 0;
    while !(arrived_or_retryable(&mut d, &mut a, "a", round).await
        && arrived_or_retryable(&mut a, &mut d, "d", round).await)
    {
        round += 1;
        assert!(
            Instant::now() < deadline,
            "messages never crossed to the third node"
        );
    }

    // Now the old master takes slot 0 back while the master it replaced stays alive
    // (a manual failover): every node's subscription moves to it. Meanwhile no message
    // is refused `unknown_agent`: pub/sub is at most once, so one published while a
    // subscription moves may be lost, and is then refused `cluster_unavailable` (retry)
    // or silently lost. It ends with every inbox subscribed there and messages crossing.
    let back = redis.ports[0];
    let mut failover = redis.start_failover(0);
    let inboxes = format!("{prefix}:to:*");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let there = arrived_or_retryable(&mut d, &mut a, "a", round).await;
        let back_again = arrived_or_retryable(&mut a, &mut d, "d", round).await;
        round += 1;
        failover.nudge();
        let subscribed = redis.cli(back, &["pubsub", "channels", &inboxes]);
        if there && back_again && subscribed.lines().filter(|l| !l.is_empty()).count() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the nodes never subscribed through slot 0's new master: {subscribed:?}\n{}\n{}",
            redis.cli(back, &["cluster", "nodes"]),
            [&nodes[0], &nodes[1], &third]
                .iter()
                .map(|n| n.logs())
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
    }
    // No refusal other than `cluster_unavailable` is left unread either.
    for agent in [&mut a, &mut d] {
        let late: Vec<Value> = agent
            .pending()
            .into_iter()
            .filter(|f| f["type"] == "error" && f["error_code"] != "cluster_unavailable")
            .collect();
        assert!(late.is_empty(), "{late:?}");
    }
}

/// Sends a direct message from `from` to `to` (agent `target`) while a subscription may
/// be moving: whether it arrived within a second; a refusal must be the retryable
/// `cluster_unavailable`, never `unknown_agent`.
async fn arrived_or_retryable(from: &mut Agent, to: &mut Agent, target: &str, round: u32) -> bool {
    match one_way(from, to, target, round, Duration::from_secs(1)).await {
        Ok(arrived) => arrived,
        Err(refused) => {
            assert_eq!(refused["error_code"], "cluster_unavailable", "{refused}");
            false
        }
    }
}

/// Sends a direct message from `from` to `to` (agent `target`): whether it arrived
/// within `wait`, or the error frame that refused it.
async fn one_way(
    from: &mut Agent,
    to: &mut Agent,
    target: &str,
    round: u32,
    wait: Duration,
) -> Result<bool, Value> {
    let message_id = format!("round-{round}-to-{target}");
    let mut frame = direct(target, json!({"round": round}));
    frame["data"]["message_id"] = json!(message_id);
    from.send(frame).await;
    // An error answers the sender; the message reaches the target.
    let answer = async {
        loop {
            tokio::select! {
                got = to.wait_for(is_message) => {
                    if got["data"]["content"]["round"] == round {
                        return Ok(());
                    }
                }
                error = from.wait_for(|f| f["type"] == "error") => {
                    // Any refusal, also a late one of an earlier round, is the caller's.
                    if error["message_id"] == message_id
                        || error["error_code"] != "cluster_unavailable"
                    {
                        return Err(error);
                    }
                }
            }
        }
    };
    match tokio::time::timeout(wait, answer).await {
        Ok(result) => result.map(|()| true),
        Err(_) => Ok(false),
    }
}

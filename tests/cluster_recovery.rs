//! A cluster whose Redis restarts without its data (no persistence): the nodes
//! re-assert their leases and their agents' claims instead of closing every agent, and
//! nothing of those agents is published as ended. Each test owns its `redis-server`.

mod common;

use common::brokers::RedisProcess;
use common::cluster::{fresh_prefix, node, wait_readyz};
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Waits until the Redis at `url` holds a claim of `agent_id` under `prefix` again.
async fn claimed_again(url: &str, prefix: &str, agent_id: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{prefix}:agent:{{{agent_id}}}");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let holder: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("node")
            .query_async(&mut redis)
            .await
            .unwrap_or(None);
        if holder.is_some() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{agent_id} was never claimed again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_restarts_empty_gets_every_claim_back_and_no_agent_is_closed() {
    let mut redis = RedisProcess::start();
    let prefix = fresh_prefix();
    let env = [("TETHER__CLUSTER__REDIS_URL", redis.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let nodes = [
        node(&prefix, "3", &env).await,
        node(&prefix, "3", &env).await,
    ];
    let mut events = [
        EventStream::subscribe(&nodes[0], None).await,
        EventStream::subscribe(&nodes[1], None).await,
    ];
    let (mut a, _) = Agent::register(&nodes[0].ws_url(), "a").await;
    let (mut b, _) = Agent::register(&nodes[1].ws_url(), "b").await;

    redis.wipe_and_restart();
    claimed_again(&redis.url(), &prefix, "a").await;
    claimed_again(&redis.url(), &prefix, "b").await;
    wait_readyz(&nodes[0], 200).await;
    wait_readyz(&nodes[1], 200).await;

    // Both still connected, and still reachable from the other node.
    a.send(direct("b", json!("still here?"))).await;
    let got = b.wait_for(|f| f["type"] == "message").await;
    assert_eq!(got["data"]["content"], "still here?", "{got}");
    b.send(direct("a", json!("yes"))).await;
    let got = a.wait_for(|f| f["type"] == "message").await;
    assert_eq!(got["data"]["content"], "yes", "{got}");
    // The claims hold: the id cannot be registered on the other node without proof.
    let mut thief = Agent::connect(&nodes[1].ws_url()).await;
    thief
        .send(
            json!({"type":"system_request","command":"register_agent","agent_id":"a",
                     "metadata":{}}),
        )
        .await;
    let refused = thief.wait_for(|f| f["command"] == "register_agent").await;
    assert_eq!(refused["error_code"], "agent_id_in_use", "{refused}");
    // New agents register on both (the nodes are members again).
    let (_c, _) = Agent::register(&nodes[0].ws_url(), "c").await;
    let (_d, _) = Agent::register(&nodes[1].ws_url(), "d").await;

    // Nothing of a or b was published as ended, on either node.
    for (stream, last) in events.iter_mut().zip(["c", "d"]) {
        let seen = stream
            .collect_until(|e| e["subject"] == last && e["type"] == "agent.registered")
            .await;
        let ended: Vec<&Value> = seen
            .iter()
            .filter(|e| e["subject"] == "a" || e["subject"] == "b")
            // (The thief's refusal is `agent.registration_failed`, of no incarnation.)
            .filter(|e| e["data"]["incarnation"].is_u64() && e["type"] != "agent.registered")
            .collect();
        assert!(ended.is_empty(), "published after the restart: {ended:?}");
    }
    let logs = nodes[0].logs();
    assert!(
        logs.contains("re-asserted"),
        "node 0 did not re-assert:\n{logs}"
    );
}

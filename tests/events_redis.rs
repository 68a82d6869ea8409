//! Lifecycle events on Redis (PROTOCOL.md §8, issue #3), against a real Redis: every
//! event reaches the stream exactly as on the SSE stream; events published while
//! Redis is down (a `redis-server` the test owns, killed and restarted on the same
//! port) arrive after it is back, in order, with no gap; an overflowing buffer drops
//! the oldest events and says how many, once; `tether events --from redis` prints
//! them.

mod common;

use common::brokers::{
    health, redis_channel, redis_stream, require, sse, tether_events, unique, wait_publisher,
    RedisProcess, DRAIN_DEADLINE, REDIS,
};
use common::lifecycle::{
    assert_same_per_agent, events_of, ids, scenario, start_with_short_heartbeat, wait_cleaned_up,
    Flow, Outage, SCENARIO_AGENTS,
};
use common::DEADLINE;
use serde_json::Value;
use std::collections::HashSet;

/// Environment for a server publishing to Redis at `url` on `stream`, retrying fast.
fn redis_env(url: &str, stream: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    [
        ("TETHER__EVENTS__PUBLISHERS", "log,redis"),
        ("TETHER__EVENTS__REDIS__URL", url),
        ("TETHER__EVENTS__REDIS__STREAM", stream),
        ("TETHER__EVENTS__REDIS__RETRY_INITIAL", "0.05"),
        ("TETHER__EVENTS__REDIS__RETRY_MAX", "0.5"),
        ("TETHER__EVENTS__REDIS__HEALTH_CHECK_INTERVAL", "0.2"),
        ("TETHER__EVENTS__REDIS__CONNECTION_TIMEOUT", "1"),
        ("TETHER__EVENTS__REDIS__RESPONSE_TIMEOUT", "1"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_stream_consumer_receives_every_lifecycle_event_as_on_the_sse_stream() {
    require(REDIS, "Redis");
    let url = format!("redis://{REDIS}");
    let stream = unique("tether-test");
    let channel = unique("tether-channel");
    let mut subscriber = redis_channel(&url, &channel).await;
    let server = start_with_short_heartbeat(&redis_env(
        &url,
        &stream,
        &[("TETHER__EVENTS__REDIS__PUBLISH_CHANNEL", &channel)],
    ));
    let mut consumer = redis_stream(&url, &stream);
    let mut sse = sse(&server).await;

    let events = scenario(&server, &mut sse).await;
    consumer.until_ids(&ids(&events), DEADLINE).await;
    let duplicates = assert_same_per_agent(&events, &consumer.events(), &SCENARIO_AGENTS);
    assert_eq!(duplicates, 0, "no outage, so no event should come twice");
    // With publish_channel set, every event is also PUBLISHed.
    subscriber.until_ids(&ids(&events), DEADLINE).await;
    assert_same_per_agent(&events, &subscriber.events(), &SCENARIO_AGENTS);
    // Every entry is `event <json>` only.
    assert!(consumer.received.iter().all(|r| r.meta["fields"] == 1));
    assert_eq!(consumer.received[0].event["type"], "network.started");

    let check = wait_publisher(&server, "redis", DEADLINE, "caught up", |c| {
        c["delivered"].as_u64().unwrap() >= consumer.received.len() as u64
    })
    .await;
    assert_eq!(check["status"], "healthy", "{check}");
    assert_eq!(check["connected"], true, "{check}");
    assert_eq!(check["dropped"], 0, "{check}");

    // `tether events --from redis --since beginning` prints the same events.
    let printed = tether_events(
        &["--from", "redis", "--since", "beginning"],
        &[
            ("TETHER__EVENTS__REDIS__URL", &url),
            ("TETHER__EVENTS__REDIS__STREAM", &stream),
        ],
        consumer.received.len(),
    )
    .await;
    let printed: Vec<String> = printed
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let consumed: Vec<String> = consumer
        .received
        .iter()
        .map(|r| r.id().to_owned())
        .collect();
    assert_eq!(
        printed, consumed,
        "tether events --from redis printed other events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_published_while_redis_is_down_arrive_after_it_restarts_in_order_without_gaps() {
    let mut redis = RedisProcess::start();
    let stream = unique("tether-outage");
    let server = start_with_short_heartbeat(&redis_env(&redis.url(), &stream, &[]));
    let mut consumer = redis_stream(&redis.url(), &stream);
    let outage = Outage::begin(&server, "redis", &mut consumer, || redis.kill()).await;
    assert!(
        outage.during["last_error"].as_str().is_some(),
        "{}",
        outage.during
    );
    // ... and comes back on the same port.
    let after = outage
        .end(&server, "redis", &mut consumer, || redis.restart())
        .await;
    assert!(after["restarts"].as_u64().unwrap() >= 1, "{after}");
    assert_eq!(after["status"], "healthy", "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overflowing_buffer_drops_the_oldest_events_counts_them_and_logs_the_burst_once() {
    let mut redis = RedisProcess::start();
    let stream = unique("tether-overflow");
    let server = start_with_short_heartbeat(&redis_env(
        &redis.url(),
        &stream,
        &[
            ("TETHER__EVENTS__REDIS__BUFFER_CAPACITY", "20"),
            ("TETHER__EVENTS__REDIS__BATCH_SIZE", "5"),
        ],
    ));
    let mut consumer = redis_stream(&redis.url(), &stream);
    let mut sse = sse(&server).await;
    let agents = ["over-a", "over-b"];
    let mut flow = Flow::start(&server, &agents);
    flow.wait_cycles(3).await;

    redis.kill();
    wait_publisher(&server, "redis", DEADLINE, "disconnected", |c| {
        c["connected"] == false
    })
    .await;
    // 3 events per cycle: far more than 20 while Redis is down.
    flow.wait_cycles(30).await;
    let full = wait_publisher(&server, "redis", DEADLINE, "dropping", |c| {
        c["dropped"].as_u64().unwrap() > 0
    })
    .await;
    assert_eq!(full["status"], "warning", "{full}");
    assert_eq!(full["buffered"], 20, "{full}");
    let ends = flow.stop().await;
    wait_cleaned_up(&mut sse, &ends).await;

    redis.restart();
    let after = wait_publisher(&server, "redis", DRAIN_DEADLINE, "drained", |c| {
        c["buffered"] == 0 && c["connected"] == true
    })
    .await;
    let dropped = after["dropped"].as_u64().unwrap();
    let stats: Value = reqwest::get(server.http("/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let published = stats["events"]["published"].as_u64().unwrap();
    let stats_redis = stats["events"]["publishers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "redis")
        .unwrap()
        .clone();
    assert_eq!(
        stats_redis["dropped"], dropped,
        "/stats and /health disagree"
    );

    // Everything published was either delivered or counted as dropped. (A dropped
    // event may still have reached Redis: one whose batch Redis wrote but could not
    // acknowledge before it was killed.)
    let want = (published - dropped) as usize;
    let unique_ids =
        |r: &[common::brokers::Received]| r.iter().map(|e| e.id()).collect::<HashSet<_>>().len();
    consumer
        .until(
            DRAIN_DEADLINE,
            |r| unique_ids(r) >= want,
            |r| format!("{} of {want} events", unique_ids(r)),
        )
        .await;
    consumer.drain();
    let got = unique_ids(&consumer.received);
    assert!(
        got >= want && got as u64 <= published,
        "published {published}, dropped {dropped}, delivered {got}"
    );
    let received: HashSet<&str> = consumer.received.iter().map(|r| r.id()).collect();
    let missing = events_of(&sse, &agents)
        .iter()
        .filter(|e| !received.contains(e["id"].as_str().unwrap()))
        .count();
    assert!(
        missing as u64 <= dropped,
        "{missing} events never arrived but only {dropped} were dropped"
    );
    // What was delivered is in order: each agent's events are the SSE ones minus drops.
    let sse_events = events_of(&sse, &agents);
    for agent in agents {
        let order: Vec<&str> = sse_events
            .iter()
            .filter(|e| e["subject"] == agent)
            .map(|e| e["id"].as_str().unwrap())
            .collect();
        let mut position = 0;
        for event in consumer
            .received
            .iter()
            .filter(|r| r.event["subject"] == agent)
        {
            let at = order[position..].iter().position(|id| *id == event.id());
            let at = at.unwrap_or_else(|| panic!("{agent}: event {} out of order", event.id()));
            position += at + 1;
        }
    }
    // One burst, logged once, with its count.
    let logs = server.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("buffer full")).collect();
    assert_eq!(lines.len(), 1, "the burst is logged once: {lines:?}");
    assert!(
        lines[0].contains(&format!("dropped the {dropped} oldest")),
        "{}",
        lines[0]
    );
    assert_eq!(
        health(&server).await["checks"]["publisher_redis"]["status"],
        "warning"
    );
}

//! Lifecycle events on Kafka (PROTOCOL.md §8, issue #3), against a real Kafka-compatible
//! broker (tansu): the server creates the topic, every event arrives keyed by agent
//! id with the CloudEvents content-type header, exactly as on the SSE stream; while
//! the broker is unreachable (a tansu the test owns, behind a proxy the test cuts)
//! events are kept and arrive afterwards in order with no gap; `tether events --from
//! kafka` prints them.

mod common;

use common::brokers::{kafka_topic, require, sse, tether_events, unique, wait_publisher, KAFKA};
use common::lifecycle::{
    assert_same_per_agent, ids, scenario, start_with_short_heartbeat, Outage, SCENARIO_AGENTS,
};
use common::DEADLINE;
use std::collections::HashMap;
use tether_testkit::{tansu, Tansu};

fn kafka_env(bootstrap: &str, topic: &str) -> Vec<(String, String)> {
    [
        ("TETHER__EVENTS__PUBLISHERS", "log,kafka"),
        ("TETHER__EVENTS__KAFKA__BOOTSTRAP_SERVERS", bootstrap),
        ("TETHER__EVENTS__KAFKA__TOPIC", topic),
        ("TETHER__EVENTS__KAFKA__CREATE_TOPIC", "true"),
        ("TETHER__EVENTS__KAFKA__RETRY_INITIAL", "0.05"),
        ("TETHER__EVENTS__KAFKA__RETRY_MAX", "0.5"),
        ("TETHER__EVENTS__KAFKA__REQUEST_TIMEOUT", "2"),
        ("TETHER__EVENTS__KAFKA__DELIVERY_TIMEOUT", "5"),
        ("TETHER__EVENTS__KAFKA__HEALTH_CHECK_INTERVAL", "0.5"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kafka_consumer_receives_every_lifecycle_event_keyed_by_agent_as_on_the_sse_stream() {
    require(KAFKA, "Kafka (tansu)");
    let topic = unique("tether-test");
    let server = start_with_short_heartbeat(&kafka_env(KAFKA, &topic));
    let mut consumer = kafka_topic(KAFKA, &topic);
    let mut sse = sse(&server).await;

    let events = scenario(&server, &mut sse).await;
    consumer.until_ids(&ids(&events), DEADLINE).await;
    let duplicates = assert_same_per_agent(&events, &consumer.events(), &SCENARIO_AGENTS);
    assert_eq!(duplicates, 0, "no outage, so no event should come twice");

    // Key = agent id (node id for network events), the content-type header, and all
    // of an agent's events in one partition (which is what keeps them in order).
    let mut partition_of: HashMap<String, i64> = HashMap::new();
    for record in &consumer.received {
        let subject = record.event["subject"].as_str().unwrap();
        assert_eq!(record.meta["key"], subject, "{:?}", record.meta);
        assert_eq!(
            record.meta["headers"]["content-type"], "application/cloudevents+json",
            "{:?}",
            record.meta
        );
        let partition = record.meta["partition"].as_i64().unwrap();
        assert_eq!(
            *partition_of.entry(subject.to_owned()).or_insert(partition),
            partition,
            "{subject}'s events are spread over partitions"
        );
    }
    assert!(consumer
        .received
        .iter()
        .any(|r| r.event["type"] == "network.started"));

    let check = wait_publisher(&server, "kafka", DEADLINE, "caught up", |c| {
        c["delivered"].as_u64().unwrap() >= consumer.received.len() as u64
    })
    .await;
    assert_eq!(check["status"], "healthy", "{check}");
    assert_eq!(check["dropped"], 0, "{check}");

    // `tether events --from kafka --since beginning` prints the same events.
    let mut printed: Vec<String> = tether_events(
        &["--from", "kafka", "--since", "beginning"],
        &[
            ("TETHER__EVENTS__KAFKA__BOOTSTRAP_SERVERS", KAFKA),
            ("TETHER__EVENTS__KAFKA__TOPIC", &topic),
        ],
        consumer.received.len(),
    )
    .await
    .iter()
    .map(|e| e["id"].as_str().unwrap().to_owned())
    .collect();
    let mut consumed: Vec<String> = consumer
        .received
        .iter()
        .map(|r| r.id().to_owned())
        .collect();
    printed.sort();
    consumed.sort();
    assert_eq!(
        printed, consumed,
        "tether events --from kafka printed other events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_published_while_kafka_is_unreachable_arrive_afterwards_in_order_without_gaps() {
    // A tansu of the test's own, reachable only through a proxy the test cuts.
    let binary = tansu::binary().unwrap_or_else(|e| panic!("{e}"));
    let (_tansu, proxy) = Tansu::behind_proxy(&binary).unwrap_or_else(|e| panic!("{e}"));
    let topic = unique("tether-outage");
    // Short timeouts so the outage outlasts the producer's own retries and the
    // publisher has to restart it.
    let mut env = kafka_env(&proxy.addr(), &topic);
    env.push(("TETHER__EVENTS__KAFKA__REQUEST_TIMEOUT".into(), "1".into()));
    env.push(("TETHER__EVENTS__KAFKA__DELIVERY_TIMEOUT".into(), "1".into()));
    let server = start_with_short_heartbeat(&env);
    let mut consumer = kafka_topic(&proxy.addr(), &topic);
    let outage = Outage::begin(&server, "kafka", &mut consumer, || proxy.cut()).await;
    wait_publisher(&server, "kafka", DEADLINE, "restarted", |c| {
        c["restarts"].as_u64().unwrap() >= 1
    })
    .await;
    let after = outage
        .end(&server, "kafka", &mut consumer, || proxy.restore())
        .await;
    assert_eq!(after["status"], "healthy", "{after}");
}

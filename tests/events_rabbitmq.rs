//! Lifecycle events on RabbitMQ (PROTOCOL.md §8, issue #3), against a real RabbitMQ:
//! a durable topic exchange, routing key = event type, persistent messages with
//! `message_id` = event id, every event exactly as on the SSE stream; while RabbitMQ
//! is unreachable (through a proxy the test cuts) events are kept and arrive
//! afterwards in order with no gap; `tether events --from rabbitmq --binding agent.#`
//! prints the agent events.

mod common;

use common::brokers::{rabbitmq_exchange, require, sse, unique, wait_publisher, RABBITMQ};
use common::lifecycle::{
    assert_same_per_agent, ids, scenario, start_with_short_heartbeat, Outage, SCENARIO_AGENTS,
};
use common::DEADLINE;
use serde_json::Value;
use std::collections::HashSet;
use std::process::Stdio;
use tether_testkit::rabbitmq::amqp_url;
use tether_testkit::Proxy;
use tokio::io::{AsyncBufReadExt, BufReader};

fn rabbitmq_env(url: &str, exchange: &str) -> Vec<(String, String)> {
    [
        ("TETHER__EVENTS__PUBLISHERS", "log,rabbitmq"),
        ("TETHER__EVENTS__RABBITMQ__URL", url),
        ("TETHER__EVENTS__RABBITMQ__EXCHANGE", exchange),
        ("TETHER__EVENTS__RABBITMQ__RETRY_INITIAL", "0.05"),
        ("TETHER__EVENTS__RABBITMQ__RETRY_MAX", "0.5"),
        ("TETHER__EVENTS__RABBITMQ__CONNECTION_TIMEOUT", "2"),
        ("TETHER__EVENTS__RABBITMQ__CONFIRM_TIMEOUT", "3"),
        ("TETHER__EVENTS__RABBITMQ__HEALTH_CHECK_INTERVAL", "0.2"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_bound_to_the_exchange_receives_every_lifecycle_event_as_on_the_sse_stream() {
    require(RABBITMQ, "RabbitMQ");
    let url = amqp_url(RABBITMQ);
    let exchange = unique("tether-test");
    // Bound before the server starts, so even network.started arrives.
    let mut consumer = rabbitmq_exchange(&url, &exchange).await;
    let server = start_with_short_heartbeat(&rabbitmq_env(&url, &exchange));
    let mut sse = sse(&server).await;

    // `tether events --from rabbitmq --binding agent.#`, subscribed before the scenario.
    let mut cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["events", "--from", "rabbitmq", "--binding", "agent.#"])
        .env("TETHER__EVENTS__RABBITMQ__URL", &url)
        .env("TETHER__EVENTS__RABBITMQ__EXCHANGE", &exchange)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut cli_err = BufReader::new(cli.stderr.take().unwrap()).lines();
    // Logs may come first; the subscription is announced on a line of its own.
    let announced = tokio::time::timeout(DEADLINE, async {
        loop {
            match cli_err.next_line().await.unwrap() {
                Some(line) if line.contains("tether events: subscribed") => return,
                Some(_) => continue,
                None => panic!("tether events exited before subscribing"),
            }
        }
    });
    announced.await.expect("tether events did not subscribe");

    let events = scenario(&server, &mut sse).await;
    consumer.until_ids(&ids(&events), DEADLINE).await;
    let duplicates = assert_same_per_agent(&events, &consumer.events(), &SCENARIO_AGENTS);
    assert_eq!(duplicates, 0, "no outage, so no event should come twice");
    for message in &consumer.received {
        let event = &message.event;
        assert_eq!(
            message.meta["routing_key"], event["type"],
            "{:?}",
            message.meta
        );
        assert_eq!(
            message.meta["message_id"], event["id"],
            "{:?}",
            message.meta
        );
        assert_eq!(
            message.meta["content_type"], "application/cloudevents+json",
            "{:?}",
            message.meta
        );
        assert_eq!(
            message.meta["delivery_mode"], 2,
            "persistent: {:?}",
            message.meta
        );
    }
    assert_eq!(consumer.received[0].event["type"], "network.started");

    let check = wait_publisher(&server, "rabbitmq", DEADLINE, "caught up", |c| {
        c["delivered"].as_u64().unwrap() >= consumer.received.len() as u64
    })
    .await;
    assert_eq!(check["status"], "healthy", "{check}");

    // The CLI printed the agent events (and only those), in order.
    let mut cli_out = BufReader::new(cli.stdout.take().unwrap()).lines();
    let wanted: Vec<String> = consumer
        .received
        .iter()
        .filter(|r| r.event["type"].as_str().unwrap().starts_with("agent."))
        .map(|r| r.id().to_owned())
        .collect();
    let mut printed = Vec::new();
    while printed.len() < wanted.len() {
        let line = tokio::time::timeout(DEADLINE, cli_out.next_line())
            .await
            .expect("tether events stopped printing")
            .unwrap()
            .expect("tether events exited");
        let event: Value = serde_json::from_str(&line).unwrap();
        printed.push(event["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        printed, wanted,
        "tether events --from rabbitmq printed other events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_published_while_rabbitmq_is_unreachable_arrive_afterwards_in_order_without_gaps() {
    require(RABBITMQ, "RabbitMQ");
    let proxy = Proxy::start(RABBITMQ);
    let exchange = unique("tether-outage");
    let mut consumer = rabbitmq_exchange(&amqp_url(RABBITMQ), &exchange).await;
    let server = start_with_short_heartbeat(&rabbitmq_env(&amqp_url(&proxy.addr()), &exchange));
    let outage = Outage::begin(&server, "rabbitmq", &mut consumer, || proxy.cut()).await;
    let after = outage
        .end(&server, "rabbitmq", &mut consumer, || proxy.restore())
        .await;
    assert!(after["restarts"].as_u64().unwrap() >= 1, "{after}");
    let ids: HashSet<&str> = consumer.received.iter().map(|r| r.id()).collect();
    assert!(ids.len() <= consumer.received.len());
}

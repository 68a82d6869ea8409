//! What issue #3 promises beyond one broker at a time: a graceful shutdown flushes
//! what was buffered (or reports what it could not deliver) within the timeout; the
//! log and SSE paths keep working while every broker is down; one broker's outage
//! does not hold up another; and a publisher that keeps failing is marked failed
//! (critical in `/health`) while the server keeps serving agents.

mod common;

use common::brokers::{
    health, rabbitmq_exchange, redis_stream, require, sse, unique, wait_publisher, Received,
    DRAIN_DEADLINE, RABBITMQ, REDIS,
};
use common::lifecycle::{
    assert_same_per_agent, events_of, ids, wait_cleaned_up, Flow, SHORT_HEARTBEAT,
};
use common::{direct, Agent, TestServer, DEADLINE};
use serde_json::json;
use std::time::{Duration, Instant};
use tether_testkit::rabbitmq::amqp_url;
use tether_testkit::{free_port, Proxy};

fn start(pairs: &[(&str, String)]) -> TestServer {
    let mut env: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend(SHORT_HEARTBEAT);
    TestServer::start(&env)
}

/// Fast retries and checks for every broker publisher.
fn fast(broker: &str) -> Vec<(String, String)> {
    let section = broker.to_uppercase();
    [
        ("RETRY_INITIAL", "0.05"),
        ("RETRY_MAX", "0.5"),
        ("HEALTH_CHECK_INTERVAL", "0.2"),
    ]
    .iter()
    .map(|(k, v)| (format!("TETHER__EVENTS__{section}__{k}"), v.to_string()))
    .collect()
}

fn with_fast(mut pairs: Vec<(&'static str, String)>, brokers: &[&str]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = pairs.drain(..).map(|(k, v)| (k.to_owned(), v)).collect();
    for broker in brokers {
        env.extend(fast(broker));
    }
    env
}

fn start_owned(env: &[(String, String)]) -> TestServer {
    let pairs: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    start(&pairs)
}

/// Waits until a line of the server's logs contains every one of `needles` (the logs
/// are read in the background) and returns it.
async fn wait_log(server: &TestServer, needles: &[&str]) -> String {
    let end = Instant::now() + DEADLINE;
    loop {
        let logs = server.logs();
        if let Some(line) = logs.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < end,
            "the server never logged a line with {needles:?}; logs:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_shutdown_flushes_events_buffered_during_an_outage_before_exiting() {
    require(REDIS, "Redis");
    let proxy = Proxy::start(REDIS);
    let stream = unique("tether-flush");
    let server = start_owned(&with_fast(
        vec![
            ("TETHER__EVENTS__PUBLISHERS", "log,redis".into()),
            (
                "TETHER__EVENTS__REDIS__URL",
                format!("redis://{}", proxy.addr()),
            ),
            ("TETHER__EVENTS__REDIS__STREAM", stream.clone()),
            ("TETHER__SHUTDOWN__TIMEOUT", "10".into()),
        ],
        &["redis"],
    ));
    let mut consumer = redis_stream(&format!("redis://{REDIS}"), &stream);
    let mut sse = sse(&server).await;
    let agents = ["flush-a", "flush-b"];
    let mut flow = Flow::start(&server, &agents);
    flow.wait_cycles(5).await;
    proxy.cut();
    wait_publisher(&server, "redis", DEADLINE, "disconnected", |c| {
        c["connected"] == false
    })
    .await;
    flow.wait_cycles(30).await;
    let ends = flow.stop().await;
    wait_cleaned_up(&mut sse, &ends).await;
    let expected = events_of(&sse, &agents);
    let buffered = wait_publisher(&server, "redis", DEADLINE, "buffering", |c| {
        c["buffered"].as_u64().unwrap() > 0
    })
    .await;

    // The broker is back just as the server is told to stop.
    proxy.restore();
    server.signal("TERM");
    let mut server = server;
    assert_eq!(server.wait_exit().await, Some(0));

    consumer.until_ids(&ids(&expected), DRAIN_DEADLINE).await;
    consumer
        .until(
            DEADLINE,
            |r| r.iter().any(|e| e.event["type"] == "network.stopped"),
            |_| "no network.stopped".into(),
        )
        .await;
    assert_same_per_agent(&expected, &consumer.events(), &agents);
    let report = wait_log(&server, &["publisher redis: ", "events delivered,"]).await;
    assert!(
        report.contains(" 0 undelivered"),
        "{report} (buffered before: {buffered})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_with_the_broker_down_reports_what_it_could_not_deliver_within_the_timeout() {
    require(REDIS, "Redis");
    let proxy = Proxy::start(REDIS);
    let server = start_owned(&with_fast(
        vec![
            ("TETHER__EVENTS__PUBLISHERS", "log,redis".into()),
            (
                "TETHER__EVENTS__REDIS__URL",
                format!("redis://{}", proxy.addr()),
            ),
            (
                "TETHER__EVENTS__REDIS__STREAM",
                unique("tether-undelivered"),
            ),
            ("TETHER__SHUTDOWN__TIMEOUT", "2".into()),
        ],
        &["redis"],
    ));
    let mut sse = sse(&server).await;
    wait_publisher(&server, "redis", DEADLINE, "connected", |c| {
        c["connected"] == true
    })
    .await;
    proxy.cut();
    wait_publisher(&server, "redis", DEADLINE, "disconnected", |c| {
        c["connected"] == false
    })
    .await;
    let agents = ["gone-a"];
    let mut flow = Flow::start(&server, &agents);
    flow.wait_cycles(10).await;
    let ends = flow.stop().await;
    wait_cleaned_up(&mut sse, &ends).await;
    wait_publisher(&server, "redis", DEADLINE, "buffering", |c| {
        c["buffered"].as_u64().unwrap() >= 30
    })
    .await;

    let stopping = Instant::now();
    server.signal("TERM");
    let mut server = server;
    assert_eq!(server.wait_exit().await, Some(0));
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "shutdown took {took:?} with a 2 s timeout"
    );
    let report = wait_log(&server, &["publisher redis: closed with"]).await;
    assert!(report.contains("still buffered"), "{report}");
    let summary = wait_log(&server, &["publisher redis: ", "events delivered,"]).await;
    let undelivered: u64 = summary
        .split(" events delivered, ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no undelivered count in {summary:?}"));
    // 10 cycles of 3 events, plus network.stopping / network.stopped.
    assert!(undelivered >= 30, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_log_and_sse_keep_working_while_every_broker_is_down() {
    let (redis, kafka, rabbit) = (free_port(), free_port(), free_port());
    let server = start_owned(&with_fast(
        vec![
            (
                "TETHER__EVENTS__PUBLISHERS",
                "log,redis,kafka,rabbitmq".into(),
            ),
            (
                "TETHER__EVENTS__REDIS__URL",
                format!("redis://127.0.0.1:{redis}"),
            ),
            (
                "TETHER__EVENTS__KAFKA__BOOTSTRAP_SERVERS",
                format!("127.0.0.1:{kafka}"),
            ),
            ("TETHER__EVENTS__KAFKA__REQUEST_TIMEOUT", "1".into()),
            ("TETHER__EVENTS__KAFKA__DELIVERY_TIMEOUT", "2".into()),
            (
                "TETHER__EVENTS__RABBITMQ__URL",
                amqp_url(&format!("127.0.0.1:{rabbit}")),
            ),
            ("TETHER__EVENTS__RABBITMQ__CONNECTION_TIMEOUT", "1".into()),
        ],
        &["redis", "kafka", "rabbitmq"],
    ));
    let mut sse = sse(&server).await;
    let url = server.ws_url();
    let started = Instant::now();
    let (mut alice, _) = Agent::register(&url, "alice").await;
    let (mut bob, _) = Agent::register(&url, "bob").await;
    alice.send(direct("bob", json!("hello"))).await;
    bob.wait_for(|f| f["type"] == "message").await;
    let served_in = started.elapsed();
    assert!(
        served_in < Duration::from_secs(2),
        "two registrations and a message took {served_in:?}"
    );
    alice.close().await;
    bob.close().await;
    wait_cleaned_up(&mut sse, &[("alice".into(), 1), ("bob".into(), 1)]).await;
    let events = events_of(&sse, &["alice", "bob"]);
    assert_eq!(
        events.len(),
        6,
        "registered, disconnected, cleaned_up each: {events:?}"
    );

    // The log publisher wrote every one of them.
    for event in &events {
        wait_log(&server, &["tether::events", event["id"].as_str().unwrap()]).await;
    }
    // Every broker publisher is disconnected and keeping the events, not failed.
    for name in ["redis", "kafka", "rabbitmq"] {
        // Its first connection attempt may still be running when the events arrive
        // (a loaded machine): wait for it to have failed and said why.
        let check = wait_publisher(
            &server,
            name,
            DEADLINE,
            "buffering all 6, with its error",
            |c| {
                c["buffered"].as_u64().unwrap() >= 6
                    && c["last_error"].as_str().is_some_and(|e| !e.is_empty())
            },
        )
        .await;
        assert_eq!(check["connected"], false, "{check}");
        assert_eq!(check["failed"], false, "{check}");
        assert_eq!(check["status"], "warning", "{check}");
        assert!(
            check["last_error"].as_str().is_some_and(|e| !e.is_empty()),
            "{check}"
        );
    }
    assert_eq!(health(&server).await["status"], "warning");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_broker_down_does_not_hold_up_another() {
    require(REDIS, "Redis");
    require(RABBITMQ, "RabbitMQ");
    let proxy = Proxy::start(REDIS);
    let (stream, exchange) = (unique("tether-indep"), unique("tether-indep"));
    let mut rabbit = rabbitmq_exchange(&amqp_url(RABBITMQ), &exchange).await;
    let mut redis = redis_stream(&format!("redis://{REDIS}"), &stream);
    let server = start_owned(&with_fast(
        vec![
            ("TETHER__EVENTS__PUBLISHERS", "log,redis,rabbitmq".into()),
            (
                "TETHER__EVENTS__REDIS__URL",
                format!("redis://{}", proxy.addr()),
            ),
            ("TETHER__EVENTS__REDIS__STREAM", stream.clone()),
            ("TETHER__EVENTS__RABBITMQ__URL", amqp_url(RABBITMQ)),
            ("TETHER__EVENTS__RABBITMQ__EXCHANGE", exchange.clone()),
        ],
        &["redis", "rabbitmq"],
    ));
    let mut sse = sse(&server).await;
    wait_publisher(&server, "redis", DEADLINE, "connected", |c| {
        c["connected"] == true
    })
    .await;
    proxy.cut();
    wait_publisher(&server, "redis", DEADLINE, "disconnected", |c| {
        c["connected"] == false
    })
    .await;

    let agents = ["indep-a", "indep-b"];
    let mut flow = Flow::start(&server, &agents);
    flow.wait_cycles(50).await;
    // RabbitMQ got the events of those 50 cycles while Redis is still cut off.
    let during = events_of(&sse, &agents);
    rabbit
        .until_ids(&ids(&during[..during.len().min(150)]), DEADLINE)
        .await;
    let redis_check = wait_publisher(&server, "redis", DEADLINE, "still cut off", |c| {
        c["connected"] == false
    })
    .await;
    assert!(
        redis_check["buffered"].as_u64().unwrap() >= 150,
        "{redis_check}"
    );
    let rabbit_check = wait_publisher(&server, "rabbitmq", DEADLINE, "healthy", |c| {
        c["status"] == "healthy"
    })
    .await;
    assert_eq!(rabbit_check["connected"], true);

    proxy.restore();
    let ends = flow.stop().await;
    wait_cleaned_up(&mut sse, &ends).await;
    let expected = events_of(&sse, &agents);
    for consumer in [&mut rabbit, &mut redis] {
        consumer.until_ids(&ids(&expected), DRAIN_DEADLINE).await;
        assert_same_per_agent(&expected, &consumer.events(), &agents);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publisher_restarted_past_its_intensity_is_failed_while_the_server_keeps_serving() {
    require(REDIS, "Redis");
    let proxy = Proxy::start(REDIS);
    let server = start_owned(&with_fast(
        vec![
            ("TETHER__EVENTS__PUBLISHERS", "log,redis".into()),
            (
                "TETHER__EVENTS__REDIS__URL",
                format!("redis://{}", proxy.addr()),
            ),
            ("TETHER__EVENTS__REDIS__STREAM", unique("tether-flapping")),
            ("TETHER__EVENTS__MAX_RESTARTS", "2".into()),
            ("TETHER__EVENTS__RESTART_WINDOW", "60".into()),
        ],
        &["redis"],
    ));
    // The broker flaps: each loss of a working connection is one restart.
    for restart in 1..=3u64 {
        wait_publisher(&server, "redis", DEADLINE, "connected", |c| {
            c["connected"] == true
        })
        .await;
        proxy.cut();
        wait_publisher(&server, "redis", DEADLINE, "restarted", |c| {
            c["restarts"].as_u64().unwrap() >= restart
        })
        .await;
        proxy.restore();
    }
    let failed = wait_publisher(&server, "redis", DEADLINE, "failed", |c| {
        c["failed"] == true
    })
    .await;
    assert_eq!(failed["status"], "critical", "{failed}");
    let response = reqwest::get(server.http("/health")).await.unwrap();
    assert_eq!(response.status(), 503);
    wait_log(&server, &["publisher redis FAILED"]).await;
    let metrics = reqwest::get(server.http("/metrics")).await.unwrap();
    let metrics = metrics.text().await.unwrap();
    for line in [
        r#"tether_publisher_failed{publisher="redis"} 1"#,
        r#"tether_publisher_up{publisher="redis"} 0"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in:\n{metrics}"
        );
    }

    // It stays failed (no reconnection) and the server keeps serving agents.
    let mut sse = sse(&server).await;
    let (carol, reply) = Agent::register(&server.ws_url(), "carol").await;
    assert_eq!(reply["success"], true);
    sse.until(
        DEADLINE,
        |r: &[Received]| r.iter().any(|e| e.event["type"] == "agent.registered"),
        |_| "no agent.registered".into(),
    )
    .await;
    carol.close().await;
    let still = health(&server).await["checks"]["publisher_redis"].clone();
    assert_eq!(still["failed"], true, "{still}");
    assert_eq!(still["connected"], false, "{still}");
}

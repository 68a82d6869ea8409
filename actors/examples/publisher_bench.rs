//! Measures the broker publishers against real brokers (not run by the tests):
//!
//! 1. throughput: N events handed to a publisher at once, timed until every one is
//!    acknowledged by the broker (events per second, sustained, acknowledged);
//! 2. drain: events keep coming at a steady rate while the broker is unreachable for a
//!    while (a TCP proxy in front of it is cut), then the time from restoring the
//!    proxy until the backlog is delivered.
//!
//! ```text
//! cargo run --release -p tether-actors --example publisher_bench -- [redis|kafka|rabbitmq ...]
//!   BENCH_EVENTS=200000 BENCH_OUTAGE_SECS=30 BENCH_RATE=1000
//! ```
//! Brokers: Redis 127.0.0.1:6379, Kafka 127.0.0.1:9092, RabbitMQ 127.0.0.1:5672.

use actix::prelude::*;
use serde_json::{json, Map};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_actors::event::{EventKind, EventSource, LifecycleEvent, SharedEvent};
use tether_actors::publisher::backoff::RestartPolicy;
use tether_actors::publisher::broker::Broker;
use tether_actors::publisher::kafka::KafkaBroker;
use tether_actors::publisher::rabbitmq::RabbitMqBroker;
use tether_actors::publisher::redis::RedisBroker;
use tether_actors::publisher::supervisor::BrokerPublisher;
use tether_actors::publisher::{Deliver, QueryStatus};
use tether_actors::settings::{BufferSettings, KafkaSettings, RabbitMqSettings, RedisSettings};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn events(n: usize) -> Vec<SharedEvent> {
    let source = EventSource::new("bench", "node-bench");
    (0..n)
        .map(|i| {
            let mut data = Map::new();
            data.insert("session_id".into(), json!(format!("s-{i}")));
            data.insert("reason".into(), json!("client_closed"));
            data.insert(
                "metadata".into(),
                json!({"name": "bench agent", "version": "1.0"}),
            );
            Arc::new(LifecycleEvent::new(
                &source,
                EventKind::Disconnected,
                format!("agent-{}", i % 1000).into(),
                1,
                (i / 1000 + 1) as u64,
                data,
            ))
        })
        .collect()
}

/// A proxy that can be cut (connections dropped, new ones refused) and restored.
struct Proxy {
    port: u16,
    cut: Arc<watch::Sender<bool>>,
}

impl Proxy {
    fn start(target: String) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(watch::channel(false).0);
        let control = cut.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        continue;
                    };
                    if *control.borrow() {
                        continue;
                    }
                    let mut cut = control.subscribe();
                    let target = target.clone();
                    tokio::spawn(async move {
                        let Ok(mut upstream) = TcpStream::connect(&target).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = upstream.set_nodelay(true);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                            _ = cut.wait_for(|c| *c) => {}
                        }
                    });
                }
            });
        });
        Self { port, cut }
    }
}

fn buffer(capacity: usize, batch: usize) -> BufferSettings {
    BufferSettings {
        buffer_capacity: capacity,
        batch_size: batch,
        retry_initial: 0.1,
        retry_max: 1.0,
    }
}

fn redis(addr: &str, capacity: usize) -> (RedisBroker, BufferSettings) {
    let settings = RedisSettings {
        url: format!("redis://{addr}"),
        stream: format!("tether-bench-{}", uuid::Uuid::new_v4().simple()),
        maxlen: 100_000,
        publish_channel: None,
        connection_timeout: 2.0,
        response_timeout: 2.0,
        health_check_interval: 0.5,
        buffer_capacity: capacity,
        batch_size: 500,
        retry_initial: 0.1,
        retry_max: 1.0,
    };
    (RedisBroker::new(settings), buffer(capacity, 500))
}

fn kafka(addr: &str, capacity: usize) -> (KafkaBroker, BufferSettings) {
    let settings = KafkaSettings {
        bootstrap_servers: addr.to_owned(),
        topic: format!("tether-bench-{}", uuid::Uuid::new_v4().simple()),
        create_topic: true,
        partitions: 3,
        linger_ms: 5,
        compression: "lz4".into(),
        acks: "all".into(),
        request_timeout: 5.0,
        delivery_timeout: 10.0,
        idempotence: true,
        replication_factor: -1,
        health_check_interval: 0.5,
        buffer_capacity: capacity,
        batch_size: 1000,
        retry_initial: 0.1,
        retry_max: 1.0,
    };
    (KafkaBroker::new(settings), buffer(capacity, 1000))
}

fn rabbitmq(addr: &str, capacity: usize) -> (RabbitMqBroker, BufferSettings) {
    let settings = RabbitMqSettings {
        url: format!("amqp://guest:guest@{addr}/%2f"),
        exchange: format!("tether-bench-{}", uuid::Uuid::new_v4().simple()),
        connection_timeout: 2.0,
        heartbeat: 5,
        confirm_timeout: 5.0,
        health_check_interval: 0.5,
        buffer_capacity: capacity,
        batch_size: 500,
        retry_initial: 0.1,
        retry_max: 1.0,
    };
    (RabbitMqBroker::new(settings), buffer(capacity, 500))
}

fn start<B: Broker + Send>(broker: B, buffer: BufferSettings) -> Addr<BrokerPublisher<B>> {
    let policy = RestartPolicy {
        max_restarts: 100,
        restart_window: 60.0,
    };
    BrokerPublisher::start_in_arbiter(&Arbiter::new().handle(), move |_| {
        BrokerPublisher::new(broker, buffer, policy)
    })
}

async fn wait_delivered<B: Broker>(addr: &Addr<BrokerPublisher<B>>, n: u64) {
    loop {
        let status = addr.send(QueryStatus).await.unwrap();
        if status.delivered >= n {
            return;
        }
        assert!(!status.failed, "publisher failed: {status:?}");
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
}

async fn throughput<B: Broker>(addr: Addr<BrokerPublisher<B>>, n: usize) -> f64 {
    // Warm up (connect, create the topic) with one event.
    addr.do_send(Deliver(events(1).remove(0)));
    wait_delivered(&addr, 1).await;
    let batch = events(n);
    let started = Instant::now();
    for event in batch {
        addr.do_send(Deliver(event));
    }
    wait_delivered(&addr, n as u64 + 1).await;
    n as f64 / started.elapsed().as_secs_f64()
}

async fn drain<B: Broker>(
    addr: Addr<BrokerPublisher<B>>,
    proxy: &Proxy,
    outage: Duration,
    rate: u64,
) -> (u64, Duration) {
    addr.do_send(Deliver(events(1).remove(0)));
    wait_delivered(&addr, 1).await;
    let feed = events((rate as f64 * (outage.as_secs_f64() + 60.0)) as usize);
    let mut feed = feed.into_iter();
    let mut sent = 1u64;
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let mut interval = actix::clock::interval(tick);
    proxy.cut.send_replace(true);
    let cut_at = Instant::now();
    while cut_at.elapsed() < outage {
        interval.tick().await;
        for event in feed.by_ref().take(per_tick as usize) {
            addr.do_send(Deliver(event));
            sent += 1;
        }
    }
    let backlog = addr.send(QueryStatus).await.unwrap().buffered as u64;
    proxy.cut.send_replace(false);
    let restored = Instant::now();
    // Events keep coming at the same rate while the backlog drains.
    loop {
        interval.tick().await;
        for event in feed.by_ref().take(per_tick as usize) {
            addr.do_send(Deliver(event));
            sent += 1;
        }
        let status = addr.send(QueryStatus).await.unwrap();
        if status.buffered as u64 <= per_tick * 2 && status.delivered + per_tick * 2 >= sent {
            return (backlog, restored.elapsed());
        }
    }
}

#[actix::main]
async fn main() {
    let n: usize = env_or("BENCH_EVENTS", 200_000);
    let outage = Duration::from_secs(env_or("BENCH_OUTAGE_SECS", 30));
    let rate: u64 = env_or("BENCH_RATE", 1000);
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    let capacity = n + 10;
    if run("redis") {
        let (broker, buf) = redis("127.0.0.1:6379", capacity);
        let rate_ = throughput(start(broker, buf), n).await;
        println!("redis    throughput: {rate_:>9.0} events/s acknowledged ({n} events)");
        let proxy = Proxy::start("127.0.0.1:6379".into());
        let (broker, buf) = redis(&format!("127.0.0.1:{}", proxy.port), 100_000);
        let (backlog, took) = drain(start(broker, buf), &proxy, outage, rate).await;
        println!(
            "redis    {}s outage at {rate}/s: backlog {backlog}, drained in {:.2} s",
            outage.as_secs(),
            took.as_secs_f64()
        );
    }
    if run("kafka") {
        let (broker, buf) = kafka("127.0.0.1:9092", capacity);
        let rate_ = throughput(start(broker, buf), n).await;
        println!("kafka    throughput: {rate_:>9.0} events/s acknowledged ({n} events)");
        // Kafka clients follow the advertised address: a tansu of our own advertises
        // the proxy in front of it.
        let tansu_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let proxy = Proxy::start(format!("127.0.0.1:{tansu_port}"));
        let tansu = std::env::var("TETHER_TEST_TANSU").unwrap_or_else(|_| "tansu".into());
        let mut tansu = std::process::Command::new(tansu)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{tansu_port}"),
            ])
            .args([
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{}", proxy.port),
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cannot start tansu (set TETHER_TEST_TANSU)");
        while std::net::TcpStream::connect(("127.0.0.1", tansu_port)).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (broker, buf) = kafka(&format!("127.0.0.1:{}", proxy.port), 100_000);
        let (backlog, took) = drain(start(broker, buf), &proxy, outage, rate).await;
        println!(
            "kafka    {}s outage at {rate}/s: backlog {backlog}, drained in {:.2} s",
            outage.as_secs(),
            took.as_secs_f64()
        );
        let _ = tansu.kill();
        let _ = tansu.wait();
    }
    if run("rabbitmq") {
        let (broker, buf) = rabbitmq("127.0.0.1:5672", capacity);
        let rate_ = throughput(start(broker, buf), n).await;
        println!("rabbitmq throughput: {rate_:>9.0} events/s acknowledged ({n} events)");
        let proxy = Proxy::start("127.0.0.1:5672".into());
        let (broker, buf) = rabbitmq(&format!("127.0.0.1:{}", proxy.port), 100_000);
        let (backlog, took) = drain(start(broker, buf), &proxy, outage, rate).await;
        println!(
            "rabbitmq {}s outage at {rate}/s: backlog {backlog}, drained in {:.2} s",
            outage.as_secs(),
            took.as_secs_f64()
        );
    }
    System::current().stop();
}

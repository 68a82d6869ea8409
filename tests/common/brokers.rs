//! Real brokers for the event tests: consumers that read what the server published
//! (a Redis stream, a Kafka topic, a RabbitMQ exchange, or the server's own SSE
//! stream) into a [`Collector`], and a `redis-server` a test owns (it can kill and
//! restart it on the same port). The proxy that cuts brokers off, the tansu
//! launcher, the SSE decoder, the RabbitMQ queue and the Redis stream reader are
//! `tether-testkit`'s, shared with the benchmark harness.
//!
//! The shared brokers are Redis at 127.0.0.1:6379, RabbitMQ at 127.0.0.1:5672 and
//! tansu at 127.0.0.1:9092 (`scripts/test.sh` starts them). A test that needs one
//! that is not there fails at once, saying so. Each consumer runs on a thread of its
//! own, so it keeps reading while the test blocks.

use super::{TestServer, DEADLINE};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::TcpStream as StdTcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tether_testkit::rabbitmq::{BoundQueue, QueueKind};
use tether_testkit::redis_stream::{StreamReader, StreamStart};
use tether_testkit::sse::SseDecoder;
use tether_testkit::{free_port, wait_listening};
use tokio::sync::mpsc;

/// The shared Redis.
pub const REDIS: &str = "127.0.0.1:6379";
/// The shared RabbitMQ.
pub const RABBITMQ: &str = "127.0.0.1:5672";
/// The shared Kafka (tansu).
pub const KAFKA: &str = "127.0.0.1:9092";

/// How long a consumer may take to see everything after an outage ends.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(60);

/// Panics with a clear message unless something listens on `addr`.
pub fn require(addr: &str, what: &str) {
    if StdTcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)).is_err() {
        panic!(
            "{what} is not running at {addr}: this test needs the real broker. Run the tests with scripts/test.sh, which starts Redis, RabbitMQ and tansu (Kafka)"
        );
    }
}

/// A name no other test uses (streams, topics, exchanges).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// One event a consumer received, with what the broker said about it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The CloudEvents document.
    pub event: Value,
    /// Broker details: Kafka key, headers and partition; RabbitMQ routing key and
    /// properties; the Redis entry id.
    pub meta: Value,
}

impl Received {
    /// The event id.
    pub fn id(&self) -> &str {
        self.event["id"].as_str().unwrap_or_default()
    }
}

/// Events from a consumer running in the background, in arrival order.
pub struct Collector {
    what: String,
    rx: mpsc::UnboundedReceiver<Result<Received, String>>,
    /// Everything received so far.
    pub received: Vec<Received>,
}

impl Collector {
    fn new(what: String) -> (Self, mpsc::UnboundedSender<Result<Received, String>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                what,
                rx,
                received: Vec::new(),
            },
            tx,
        )
    }

    /// Reads until `done(received)` holds; panics after `deadline`, saying what is
    /// missing (`describe`).
    pub async fn until(
        &mut self,
        deadline: Duration,
        done: impl Fn(&[Received]) -> bool,
        describe: impl Fn(&[Received]) -> String,
    ) {
        let end = Instant::now() + deadline;
        while !done(&self.received) {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Ok(received))) => self.received.push(received),
                Ok(Some(Err(error))) => panic!("{} failed: {error}", self.what),
                Ok(None) => panic!("{} stopped", self.what),
                Err(_) => panic!(
                    "{} did not get what the test waits for within {:.0} s: {}",
                    self.what,
                    deadline.as_secs_f64(),
                    describe(&self.received)
                ),
            }
        }
    }

    /// Reads until every id in `ids` has arrived.
    pub async fn until_ids(&mut self, ids: &[String], deadline: Duration) {
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let count = |received: &[Received]| {
            let got: HashSet<&str> = received.iter().map(Received::id).collect();
            wanted.iter().filter(|id| got.contains(**id)).count()
        };
        self.until(
            deadline,
            |r| count(r) == wanted.len(),
            |r| format!("{} of {} events arrived", count(r), wanted.len()),
        )
        .await;
    }

    /// Takes whatever has arrived without waiting.
    pub fn drain(&mut self) {
        while let Ok(item) = self.rx.try_recv() {
            match item {
                Ok(received) => self.received.push(received),
                Err(error) => panic!("{} failed: {error}", self.what),
            }
        }
    }

    /// The events received, in order.
    pub fn events(&self) -> Vec<Value> {
        self.received.iter().map(|r| r.event.clone()).collect()
    }
}

/// Runs `reader` on a thread with a runtime of its own.
fn spawn_reader<F, Fut>(name: &str, reader: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(reader())
        })
        .unwrap();
}

/// Reads the server's `GET /events` stream.
pub async fn sse(server: &TestServer) -> Collector {
    let url = server.http("/events");
    let (collector, tx) = Collector::new(format!("the SSE stream {url}"));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    spawn_reader("sse-reader", move || async move {
        let response = match reqwest::Client::new().get(&url).send().await {
            Ok(response) if response.status().is_success() => response,
            other => {
                let _ = tx.send(Err(format!("cannot subscribe: {other:?}")));
                return;
            }
        };
        let mut body = response.bytes_stream();
        let mut decoder = SseDecoder::new();
        let mut ready = Some(ready_tx);
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            decoder.push(&chunk);
            while let Some(block) = decoder.next_block() {
                if let Some(ready) = ready.take() {
                    // The first block is the subscription comment.
                    let _ = ready.send(());
                }
                if let Some(data) = block.data() {
                    let event = serde_json::from_str(data).expect("an SSE event is not JSON");
                    if tx
                        .send(Ok(Received {
                            event,
                            meta: Value::Null,
                        }))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Err("the SSE stream ended".into()));
    });
    tokio::time::timeout(DEADLINE, ready_rx)
        .await
        .expect("the SSE subscription was not confirmed")
        .expect("the SSE subscription failed");
    collector
}

/// Reads a Redis stream from its start with `XREAD BLOCK`, reconnecting (and going on
/// from the last entry) when Redis goes away.
pub fn redis_stream(url: &str, stream: &str) -> Collector {
    let (collector, tx) = Collector::new(format!("the consumer of Redis stream {stream}"));
    let (url, stream) = (url.to_owned(), stream.to_owned());
    spawn_reader("redis-reader", move || async move {
        let mut reader = StreamReader::new(&url, &stream, StreamStart::Beginning).unwrap();
        while !tx.is_closed() {
            let Ok(entries) = reader.read(Duration::from_secs(1), 1000).await else {
                // Redis is down (a test killed it): try again shortly.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            for entry in entries {
                let json: String = entry.get("event").expect("entry without `event`");
                let received = Received {
                    event: serde_json::from_str(&json).expect("event is not JSON"),
                    meta: json!({"entry_id": entry.id, "fields": entry.map.len()}),
                };
                if tx.send(Ok(received)).is_err() {
                    return;
                }
            }
        }
    });
    collector
}

/// Receives what is `PUBLISH`ed on a Redis channel. Returns once subscribed.
pub async fn redis_channel(url: &str, channel: &str) -> Collector {
    let (collector, tx) = Collector::new(format!("the subscriber of Redis channel {channel}"));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let (url, channel) = (url.to_owned(), channel.to_owned());
    spawn_reader("redis-subscriber", move || async move {
        let subscribed = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = match subscribed.await {
            Ok(pubsub) => {
                let _ = ready_tx.send(Ok(()));
                pubsub
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let json: String = message.get_payload().expect("payload is not text");
            let event = serde_json::from_str(&json).expect("message is not JSON");
            if tx
                .send(Ok(Received {
                    event,
                    meta: Value::Null,
                }))
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(Err("the subscription ended".into()));
    });
    tokio::time::timeout(DEADLINE, ready_rx)
        .await
        .expect("subscribing timed out")
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot subscribe to Redis: {e}"));
    collector
}

/// Consumes a RabbitMQ topic exchange through an exclusive queue bound with `#`.
/// Returns once the queue is bound, so every event published afterwards arrives.
pub async fn rabbitmq_exchange(url: &str, exchange: &str) -> Collector {
    use lapin::options::BasicAckOptions;
    let (collector, tx) = Collector::new(format!("the consumer of RabbitMQ exchange {exchange}"));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let (url, exchange) = (url.to_owned(), exchange.to_owned());
    spawn_reader("rabbitmq-reader", move || async move {
        let setup = async {
            let queue = BoundQueue::bind(&url, &exchange, QueueKind::Exclusive, "#").await?;
            let consumer = queue.consume("test", false).await?;
            Ok::<_, String>((queue, consumer))
        };
        let (_queue, mut consumer) = match setup.await {
            Ok(parts) => {
                let _ = ready_tx.send(Ok(()));
                parts
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        while let Some(delivery) = consumer.next().await {
            let delivery = match delivery {
                Ok(delivery) => delivery,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let p = &delivery.properties;
            let meta = json!({
                "routing_key": delivery.routing_key.as_str(),
                "message_id": p.message_id().as_ref().map(|s| s.as_str().to_owned()),
                "content_type": p.content_type().as_ref().map(|s| s.as_str().to_owned()),
                "delivery_mode": p.delivery_mode(),
            });
            let event = serde_json::from_slice(&delivery.data).expect("message is not JSON");
            let _ = delivery.ack(BasicAckOptions::default()).await;
            if tx.send(Ok(Received { event, meta })).is_err() {
                return;
            }
        }
        let _ = tx.send(Err("the RabbitMQ consumer ended".into()));
    });
    tokio::time::timeout(DEADLINE, ready_rx)
        .await
        .expect("binding a queue to the exchange timed out")
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot consume from RabbitMQ: {e}"));
    collector
}

/// Consumes every partition of a Kafka topic from the beginning (no consumer group).
/// Waits up to the deadline for the topic to exist (the server creates it).
pub fn kafka_topic(bootstrap: &str, topic: &str) -> Collector {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let (collector, tx) = Collector::new(format!("the consumer of Kafka topic {topic}"));
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    spawn_reader("kafka-reader", move || async move {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique("test"))
            .set("enable.auto.commit", "false")
            .set("reconnect.backoff.max.ms", "200")
            .set("log_level", "3")
            .create()
            .unwrap();
        let end = Instant::now() + DEADLINE;
        let partitions = loop {
            let found = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .ok()
                .and_then(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
                })
                .filter(|p| !p.is_empty());
            match found {
                Some(partitions) => break partitions,
                None if Instant::now() > end => {
                    let _ = tx.send(Err(format!("topic {topic} never appeared at {bootstrap}")));
                    return;
                }
                // The server has not created the topic yet.
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let mut assignment = TopicPartitionList::new();
        for p in partitions {
            assignment
                .add_partition_offset(&topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        loop {
            let message = match consumer.recv().await {
                Ok(message) => message,
                // Transient while a test cuts the broker off.
                Err(_) => continue,
            };
            let headers: HashMap<String, String> = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let value = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                            (h.key.to_owned(), value.unwrap_or_default())
                        })
                        .collect()
                })
                .unwrap_or_default();
            let meta = json!({
                "key": message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                "headers": headers,
                "partition": message.partition(),
            });
            let event = serde_json::from_slice(message.payload().unwrap_or_default())
                .expect("record is not JSON");
            if tx.send(Ok(Received { event, meta })).is_err() {
                return;
            }
        }
    });
    collector
}

/// A temporary directory removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `redis-server` the test owns, with an append-only file synced on every write so
/// what it acknowledged survives [`RedisProcess::kill`].
pub struct RedisProcess {
    /// Its port.
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl RedisProcess {
    /// Starts one on a free port.
    pub fn start() -> Self {
        let mut process = Self {
            port: free_port(),
            dir: TempDir::new("tether-redis"),
            child: None,
        };
        process.restart();
        process
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it and starts it again on the same port with no data (as a Redis without
    /// persistence comes back).
    pub fn wipe_and_restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir.0);
        std::fs::create_dir_all(&self.dir.0).expect("cannot recreate the Redis directory");
        self.restart();
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start redis-server: is Redis installed? (scripts/test.sh installs it)");
        self.child = Some(child);
        wait_listening(self.port, "redis-server", DEADLINE).unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET /health` (whatever its status code).
pub async fn health(server: &TestServer) -> Value {
    reqwest::get(server.http("/health"))
        .await
        .expect("cannot reach /health")
        .json()
        .await
        .expect("/health is not JSON")
}

/// The `/health` check of publisher `name`.
pub async fn publisher_health(server: &TestServer, name: &str) -> Value {
    health(server).await["checks"][format!("publisher_{name}")].clone()
}

/// Polls `/health` until `condition` holds on publisher `name`'s check; panics with
/// the last check after `deadline`.
pub async fn wait_publisher(
    server: &TestServer,
    name: &str,
    deadline: Duration,
    what: &str,
    condition: impl Fn(&Value) -> bool,
) -> Value {
    let end = Instant::now() + deadline;
    loop {
        let check = publisher_health(server, name).await;
        if condition(&check) {
            return check;
        }
        assert!(
            Instant::now() < end,
            "publisher {name} never became {what}; last /health check: {check}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `tether events <args> --count n` with `env` set and returns the events it
/// printed (one JSON object per line); fails the test if it did not stop by itself.
pub async fn tether_events(args: &[&str], env: &[(&str, &str)], n: usize) -> Vec<Value> {
    let output = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("events")
            .args(args)
            .args(["--count", &n.to_string()])
            .envs(env.iter().copied())
            .output(),
    )
    .await
    .expect("tether events did not stop after --count events")
    .unwrap();
    assert!(
        output.status.success(),
        "tether events failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("tether events printed a line that is not JSON"))
        .collect()
}

//! Publisher throughput: Tether's own `BrokerPublisher` actor (the one the server
//! runs per broker, from `tether-actors`) driven directly, without WebSockets, so the
//! publisher's ceiling is measured rather than the load generator's.
//!
//! 1. Throughput: `--events` events handed to the actor at once, timed until the
//!    broker acknowledged the last one (XADD reply, Kafka delivery report, RabbitMQ
//!    publisher confirm); then the broker is asked how many it holds (XLEN, sum of the
//!    topic's high watermarks, the bound queue's message count), so an event counted as
//!    acknowledged but not stored would show.
//! 2. Drain: events keep coming at `--rate` per second while a TCP proxy in front of
//!    the broker is cut for `--outage` seconds (Kafka: a tansu of the harness's own
//!    behind the proxy, since Kafka clients follow the advertised address), then the
//!    time from restoring the proxy until the backlog is delivered.
//!
//! Settings are `config/default.toml`'s except the buffer (large enough to hold the
//! throughput run's events) and `retry_max` (`--retry-max`).

use super::{finish, na, num, text, BrokerAddrs, Ctx};
use crate::stats::{merge_repeats, Cell, Row, Table};
use actix::prelude::*;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_actors::event::{AgentEvent, EventSource, LifecycleEvent, SharedEvent};
use tether_actors::publisher::backoff::RestartPolicy;
use tether_actors::publisher::broker::Broker;
use tether_actors::publisher::kafka::KafkaBroker;
use tether_actors::publisher::rabbitmq::RabbitMqBroker;
use tether_actors::publisher::redis::RedisBroker;
use tether_actors::publisher::supervisor::BrokerPublisher;
use tether_actors::publisher::{Deliver, QueryStatus};
use tether_actors::settings::{BufferSettings, KafkaSettings, RabbitMqSettings, RedisSettings};
use tether_testkit::rabbitmq::{amqp_url, BoundQueue, QueueKind};
use tether_testkit::{tansu, Proxy, Tansu};

/// Options of `publisher-throughput`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Brokers to measure.
    #[arg(long, value_delimiter = ',', default_value = "redis,kafka,rabbitmq")]
    pub brokers: Vec<String>,
    /// Events handed to the publisher at once in the throughput run.
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// Seconds the broker is unreachable in the drain run (0 skips the drain run).
    #[arg(long, default_value_t = 30.0)]
    pub outage: f64,
    /// Events per second produced during and after the outage.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Longest reconnect backoff, seconds (default.toml has 5).
    #[arg(long, default_value_t = 1.0)]
    pub retry_max: f64,
    /// Where the brokers listen.
    #[command(flatten)]
    pub at: BrokerAddrs,
    /// The tansu binary, for the Kafka drain run (default: `$TETHER_TEST_TANSU`,
    /// else `tansu` on the PATH, else `~/.cargo/bin/tansu`).
    #[arg(long)]
    pub tansu: Option<String>,
}

/// One measured configuration: a broker and, for RabbitMQ, what is bound to the
/// exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Redis,
    Kafka,
    /// RabbitMQ with a transient queue bound (`#`), like `tether events` or a live
    /// consumer's exclusive queue.
    RabbitMqTransient,
    /// RabbitMQ with a durable queue bound (`#`): persistent messages are written
    /// to disk before they are confirmed.
    RabbitMqDurable,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Redis => "Redis (XADD pipelined, MAXLEN ~)",
            Target::Kafka => "Kafka (tansu in-memory; idempotent, acks=all, lz4)",
            Target::RabbitMqTransient => "RabbitMQ (confirms; transient queue bound)",
            Target::RabbitMqDurable => "RabbitMQ (confirms; durable queue bound)",
        }
    }
}

/// Runs the workload and returns its table.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<Vec<Table>, String> {
    let mut targets = Vec::new();
    for broker in &args.brokers {
        match broker.as_str() {
            "redis" => targets.push(Target::Redis),
            "kafka" => targets.push(Target::Kafka),
            "rabbitmq" => {
                targets.push(Target::RabbitMqTransient);
                targets.push(Target::RabbitMqDurable);
            }
            other => {
                return Err(format!(
                    "unknown broker {other:?}: use redis, kafka, rabbitmq"
                ))
            }
        }
    }
    let mut runs: Vec<(Target, Vec<Row>, Vec<String>)> = targets
        .iter()
        .map(|t| (*t, Vec::new(), Vec::new()))
        .collect();
    for rep in 0..ctx.repeat {
        for (target, rows, errors) in runs.iter_mut() {
            eprintln!(
                "tether-bench publisher-throughput: {} run {}/{}",
                target.label(),
                rep + 1,
                ctx.repeat
            );
            let (target, args) = (*target, args.clone());
            // The publisher is an actix actor: each run gets an actix system of its own
            // on a thread of its own, torn down with everything it started.
            let result = tokio::task::spawn_blocking(move || {
                actix::System::new().block_on(measure(target, args))
            })
            .await
            .map_err(|e| format!("the measuring thread panicked: {e}"))
            .and_then(|r| r);
            match result {
                Ok(row) => rows.push(row),
                Err(e) => {
                    eprintln!(
                        "tether-bench publisher-throughput: {} failed: {e}",
                        target.label()
                    );
                    errors.push(e);
                }
            }
        }
    }
    let mut table = Table::new(format!(
        "Publisher throughput ({} events at once; drain after a {} s outage at {} events/s)",
        args.events, args.outage, args.rate
    ));
    let mut any_ok = false;
    for (target, rows, errors) in runs {
        if rows.is_empty() {
            let error = errors.first().cloned().unwrap_or_default();
            ctx.failures
                .lock()
                .unwrap()
                .push(format!("publisher-throughput: {}: {error}", target.label()));
            table.rows.push(vec![
                text("broker", target.label()),
                na("acknowledged events/s", &format!("could not run: {error}")),
            ]);
            continue;
        }
        any_ok = true;
        let mut row = merge_repeats(&rows);
        if !errors.is_empty() {
            row.push((
                "failed runs".into(),
                Cell::Text(format!("{} ({})", errors.len(), errors[0])),
            ));
        }
        row.push(("runs".into(), Cell::Num(rows.len() as f64, 0)));
        table.rows.push(row);
    }
    table.notes.push(format!(
        "One `BrokerPublisher` actor (tether-actors, the code the server runs per broker) per row, on an arbiter of its own, driven directly: no server, no WebSockets. Throughput = {} events delivered to the actor at once, timed until the broker acknowledged the last; `stored on broker` = what the broker holds afterwards (Redis XLEN, Kafka distinct event ids read back by a consumer, RabbitMQ bound queue's message count), which must equal the events sent (+1 warm-up event). Drain = {} events/s keep coming while a TCP proxy in front of the broker is cut for {} s, then the time from restoring it until the backlog is delivered (includes up to {} s of reconnect backoff). Settings are config/default.toml's (batch 500 / 1000 / 500), buffer enlarged to hold the throughput run, retry_max {} s.",
        args.events, args.rate, args.outage, args.retry_max, args.retry_max
    ));
    finish(ctx, &mut table);
    if any_ok {
        Ok(vec![table])
    } else {
        Err("publisher-throughput: no broker could be measured".into())
    }
}

/// One throughput run and one drain run of `target`.
async fn measure(target: Target, args: Args) -> Result<Row, String> {
    let name = format!("tether-bench-{}", uuid::Uuid::new_v4().simple());
    let capacity = args.events + 10;
    let mut row = vec![text("broker", target.label())];
    let (rate, stored) = match target {
        Target::Redis => {
            let addr = args.at.redis.clone();
            let (rate, _) = throughput(redis(&addr, &name, capacity, &args), args.events).await?;
            let stored = redis_len(&addr, &name).await?;
            (rate, stored)
        }
        Target::Kafka => {
            let addr = args.at.kafka.clone();
            let (rate, _) = throughput(kafka(&addr, &name, capacity, &args), args.events).await?;
            let stored = kafka_len(&addr, &name, args.events as u64 + 1);
            kafka_delete(&addr, &name).await;
            (rate, stored?)
        }
        Target::RabbitMqTransient | Target::RabbitMqDurable => {
            let durable = target == Target::RabbitMqDurable;
            let url = amqp_url(&args.at.rabbitmq);
            let subscriber = BoundQueue::bind(&url, &name, kind(durable), "#").await?;
            let (rate, _) = throughput(
                rabbitmq(&args.at.rabbitmq, &name, capacity, &args),
                args.events,
            )
            .await?;
            let stored = subscriber.count_and_delete().await?;
            (rate, stored)
        }
    };
    row.push(num("acknowledged events/s", rate, 0));
    row.push(num("stored on broker", stored as f64, 0));
    row.push(num("events sent", args.events as f64 + 1.0, 0));
    if args.outage <= 0.0 {
        row.push(na("drained in s", "--outage 0"));
        return Ok(row);
    }
    let outage = Duration::from_secs_f64(args.outage);
    let drain_name = format!("{name}-drain");
    let (backlog, took) = match target {
        Target::Redis => {
            let proxy = Proxy::start(&args.at.redis);
            let result = drain(
                redis(&proxy.addr(), &drain_name, 100_000, &args),
                &proxy,
                outage,
                args.rate,
            )
            .await;
            let _ = redis_del(&args.at.redis, &[&name, &drain_name]).await;
            result?
        }
        Target::Kafka => {
            let binary = match &args.tansu {
                Some(path) => PathBuf::from(path),
                None => tansu::binary().map_err(|e| format!("{e}, or pass --tansu PATH"))?,
            };
            let (_tansu, proxy) = Tansu::behind_proxy(&binary)
                .map_err(|e| format!("{e}; pass --tansu PATH to use another tansu"))?;
            // The harness's own tansu is killed afterwards, and its topics with it.
            drain(
                kafka(&proxy.addr(), &drain_name, 100_000, &args),
                &proxy,
                outage,
                args.rate,
            )
            .await?
        }
        Target::RabbitMqTransient | Target::RabbitMqDurable => {
            let durable = target == Target::RabbitMqDurable;
            let url = amqp_url(&args.at.rabbitmq);
            let subscriber = BoundQueue::bind(&url, &drain_name, kind(durable), "#").await?;
            let proxy = Proxy::start(&args.at.rabbitmq);
            let result = drain(
                rabbitmq(&proxy.addr(), &drain_name, 100_000, &args),
                &proxy,
                outage,
                args.rate,
            )
            .await;
            let _ = subscriber.count_and_delete().await;
            result?
        }
    };
    row.push(num("outage backlog", backlog as f64, 0));
    row.push(num("drained in s", took.as_secs_f64(), 2));
    Ok(row)
}

/// The queue a RabbitMQ row binds: named after the exchange, durable or not.
fn kind(durable: bool) -> QueueKind {
    if durable {
        QueueKind::Durable
    } else {
        QueueKind::Transient
    }
}

/// `n` distinct `agent.disconnected` events over 1 000 agents.
fn events(n: usize) -> Vec<SharedEvent> {
    let source = EventSource::new("bench", "node-bench");
    let metadata =
        serde_json::value::to_raw_value(&json!({"name": "bench agent", "version": "1.0"}))
            .expect("a JSON object serializes");
    (0..n)
        .map(|i| {
            let session_id = format!("s-{i}");
            let payload = AgentEvent::Disconnected {
                session_id: &session_id,
                reason: "client_closed",
                close_code: Some(1000),
                metadata: &metadata,
            };
            let agent_id = format!("agent-{}", i % 1000).into();
            let seq = (i / 1000 + 1) as u64;
            Arc::new(LifecycleEvent::agent(&source, agent_id, 1, seq, &payload))
        })
        .collect()
}

fn buffer(capacity: usize, batch: usize, args: &Args) -> BufferSettings {
    BufferSettings {
        buffer_capacity: capacity,
        batch_size: batch,
        retry_initial: 0.1,
        retry_max: args.retry_max,
    }
}

/// A publisher started on an arbiter of its own, stopped when dropped.
struct Started<B: Broker> {
    addr: Addr<BrokerPublisher<B>>,
    arbiter: Arbiter,
}

impl<B: Broker> Drop for Started<B> {
    fn drop(&mut self) {
        self.arbiter.stop();
    }
}

fn start<B: Broker + Send>(broker: B, buffer: BufferSettings) -> Started<B> {
    let policy = RestartPolicy {
        max_restarts: 100,
        restart_window: 60.0,
    };
    let arbiter = Arbiter::new();
    let addr = BrokerPublisher::start_in_arbiter(&arbiter.handle(), move |_| {
        BrokerPublisher::new(broker, buffer, policy)
    });
    Started { addr, arbiter }
}

fn redis(addr: &str, stream: &str, capacity: usize, args: &Args) -> Started<RedisBroker> {
    let settings = RedisSettings {
        url: format!("redis://{addr}"),
        stream: stream.to_owned(),
        maxlen: capacity as u64,
        publish_channel: None,
        connection_timeout: 5.0,
        response_timeout: 5.0,
        health_check_interval: 10.0,
        buffer_capacity: capacity,
        batch_size: 500,
        retry_initial: 0.1,
        retry_max: args.retry_max,
    };
    start(RedisBroker::new(settings), buffer(capacity, 500, args))
}

fn kafka(addr: &str, topic: &str, capacity: usize, args: &Args) -> Started<KafkaBroker> {
    let settings = KafkaSettings {
        bootstrap_servers: addr.to_owned(),
        topic: topic.to_owned(),
        create_topic: true,
        partitions: 3,
        linger_ms: 5,
        compression: "lz4".into(),
        acks: "all".into(),
        request_timeout: 10.0,
        delivery_timeout: 30.0,
        idempotence: true,
        replication_factor: -1,
        health_check_interval: 10.0,
        buffer_capacity: capacity,
        batch_size: 1000,
        retry_initial: 0.1,
        retry_max: args.retry_max,
    };
    start(KafkaBroker::new(settings), buffer(capacity, 1000, args))
}

fn rabbitmq(addr: &str, exchange: &str, capacity: usize, args: &Args) -> Started<RabbitMqBroker> {
    let settings = RabbitMqSettings {
        url: amqp_url(addr),
        exchange: exchange.to_owned(),
        connection_timeout: 5.0,
        heartbeat: 10,
        confirm_timeout: 10.0,
        health_check_interval: 5.0,
        buffer_capacity: capacity,
        batch_size: 500,
        retry_initial: 0.1,
        retry_max: args.retry_max,
    };
    start(RabbitMqBroker::new(settings), buffer(capacity, 500, args))
}

/// Waits until the publisher reports `n` events acknowledged.
async fn wait_delivered<B: Broker>(
    addr: &Addr<BrokerPublisher<B>>,
    n: u64,
    deadline: Duration,
) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let status = addr
            .send(QueryStatus)
            .await
            .map_err(|e| format!("the publisher stopped: {e}"))?;
        if status.delivered >= n {
            return Ok(());
        }
        if status.failed {
            return Err(format!("the publisher failed: {:?}", status.last_error));
        }
        if started.elapsed() > deadline {
            return Err(format!(
                "{} of {n} events acknowledged after {deadline:?} (last error: {:?})",
                status.delivered, status.last_error
            ));
        }
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
}

/// Acknowledged events per second of `n` events handed at once (after one warm-up
/// event that connects and creates the topic/exchange).
async fn throughput<B: Broker>(publisher: Started<B>, n: usize) -> Result<(f64, u64), String> {
    let addr = &publisher.addr;
    addr.do_send(Deliver(events(1).remove(0)));
    wait_delivered(addr, 1, Duration::from_secs(30)).await?;
    let batch = events(n);
    let started = Instant::now();
    for event in batch {
        addr.do_send(Deliver(event));
    }
    wait_delivered(addr, n as u64 + 1, Duration::from_secs(300)).await?;
    Ok((n as f64 / started.elapsed().as_secs_f64(), n as u64 + 1))
}

/// Backlog at the end of the outage, and the time from restoring the proxy until
/// it is delivered while events keep coming at `rate`.
async fn drain<B: Broker>(
    publisher: Started<B>,
    proxy: &Proxy,
    outage: Duration,
    rate: u64,
) -> Result<(u64, Duration), String> {
    let addr = &publisher.addr;
    addr.do_send(Deliver(events(1).remove(0)));
    wait_delivered(addr, 1, Duration::from_secs(30)).await?;
    let mut feed = events((rate as f64 * (outage.as_secs_f64() + 120.0)) as usize).into_iter();
    let mut sent = 1u64;
    let per_tick = (rate / 100).max(1);
    let mut interval = actix::clock::interval(Duration::from_millis(10));
    proxy.cut();
    let cut_at = Instant::now();
    while cut_at.elapsed() < outage {
        interval.tick().await;
        for event in feed.by_ref().take(per_tick as usize) {
            addr.do_send(Deliver(event));
            sent += 1;
        }
    }
    let backlog = addr
        .send(QueryStatus)
        .await
        .map_err(|e| e.to_string())?
        .buffered as u64;
    proxy.restore();
    let restored = Instant::now();
    loop {
        interval.tick().await;
        for event in feed.by_ref().take(per_tick as usize) {
            addr.do_send(Deliver(event));
            sent += 1;
        }
        let status = addr.send(QueryStatus).await.map_err(|e| e.to_string())?;
        if status.buffered as u64 <= per_tick * 2 && status.delivered + per_tick * 2 >= sent {
            return Ok((backlog, restored.elapsed()));
        }
        if status.failed || restored.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "backlog not drained 120 s after the outage: {status:?}"
            ));
        }
    }
}

async fn redis_connection(addr: &str) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(format!("redis://{addr}")).map_err(|e| e.to_string())?;
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot connect to Redis at {addr}: {e}"))
}

async fn redis_len(addr: &str, stream: &str) -> Result<u64, String> {
    let mut conn = redis_connection(addr).await?;
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())
}

async fn redis_del(addr: &str, keys: &[&str]) -> Result<(), String> {
    let mut conn = redis_connection(addr).await?;
    redis::cmd("DEL")
        .arg(keys)
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| e.to_string())
}

/// Distinct events on `topic`, read from the beginning by a consumer until
/// `expected` were seen or nothing more arrived for 5 s. (tansu's reported high
/// watermarks lag the last batch, so they cannot be used to count.)
fn kafka_len(addr: &str, topic: &str, expected: u64) -> Result<u64, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message as _;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set(
            "group.id",
            format!("tether-bench-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    consumer
        .subscribe(&[topic])
        .map_err(|e| format!("cannot subscribe to {topic}: {e}"))?;
    let mut ids = std::collections::HashSet::new();
    let mut last_message = Instant::now();
    while (ids.len() as u64) < expected && last_message.elapsed() < Duration::from_secs(5) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                last_message = Instant::now();
                let id = message
                    .payload()
                    .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                    .and_then(|v| v["id"].as_str().map(str::to_owned));
                if let Some(id) = id {
                    ids.insert(id);
                }
            }
            Some(Err(e)) => return Err(format!("cannot read {topic}: {e}")),
            None => {}
        }
    }
    Ok(ids.len() as u64)
}

/// Deletes `topic` so repeated runs do not fill the shared broker (best effort).
async fn kafka_delete(addr: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: Result<AdminClient<DefaultClientContext>, _> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", addr)
        .create();
    if let Ok(admin) = admin {
        let _ = admin.delete_topics(&[topic], &AdminOptions::new()).await;
    }
}

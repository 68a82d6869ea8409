//! Supervision of a broker publisher, against the real Redis at 127.0.0.1:6379 (a
//! fault is injected into the client where a test needs one): a panicking client is
//! restarted with the buffer kept and delivered in order; past the restart intensity
//! the publisher is failed and its close reports what it kept; close is idempotent and
//! a closed publisher refuses events with a clear error.

use actix::prelude::*;
use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_actors::event::{AgentEvent, EventSource, LifecycleEvent, SharedEvent};
use tether_actors::publisher::backoff::RestartPolicy;
use tether_actors::publisher::broker::{Broker, BrokerError, LossReporter, SendError, Timeouts};
use tether_actors::publisher::redis::RedisBroker;
use tether_actors::publisher::supervisor::{BrokerPublisher, Close, PublishError, TryDeliver};
use tether_actors::publisher::{PublisherStatus, QueryStatus};
use tether_actors::settings::{BufferSettings, RedisSettings};

const REDIS: &str = "127.0.0.1:6379";

fn require_redis() {
    if std::net::TcpStream::connect(REDIS).is_err() {
        panic!("Redis is not running at {REDIS}: this test needs the real broker. Run the tests with scripts/test.sh, which starts it");
    }
}

fn settings(stream: &str) -> RedisSettings {
    RedisSettings {
        url: format!("redis://{REDIS}"),
        stream: stream.to_owned(),
        maxlen: 1000,
        publish_channel: None,
        connection_timeout: 2.0,
        response_timeout: 2.0,
        health_check_interval: 0.2,
        buffer_capacity: 1000,
        batch_size: 3,
        retry_initial: 0.02,
        retry_max: 0.1,
    }
}

fn buffer(s: &RedisSettings) -> BufferSettings {
    s.buffer()
}

fn unique_stream() -> String {
    format!("tether-supervision-{}", uuid::Uuid::new_v4().simple())
}

fn event(seq: u64) -> SharedEvent {
    let source = EventSource::new("test", "node");
    let payload = AgentEvent::Active {
        session_id: "s-1",
        inactive_secs: 0.0,
    };
    Arc::new(LifecycleEvent::agent(
        &source,
        "alice".into(),
        1,
        seq,
        &payload,
    ))
}

/// The real Redis broker, with the next `panics` sends panicking instead.
struct Faulty {
    inner: RedisBroker,
    panics: Arc<AtomicU32>,
}

impl Broker for Faulty {
    type Client = <RedisBroker as Broker>::Client;

    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn timeouts(&self) -> Timeouts {
        self.inner.timeouts()
    }
    fn health_check_interval(&self) -> Duration {
        self.inner.health_check_interval()
    }
    fn connect(
        &self,
        lost: LossReporter,
    ) -> LocalBoxFuture<'static, Result<Self::Client, BrokerError>> {
        self.inner.connect(lost)
    }
    fn send(
        &self,
        client: &Self::Client,
        batch: Vec<SharedEvent>,
    ) -> LocalBoxFuture<'static, Result<(), SendError>> {
        let fault = self
            .panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fault {
            return async { panic!("injected fault in the Redis client") }.boxed_local();
        }
        self.inner.send(client, batch)
    }
    fn check(&self, client: &Self::Client) -> LocalBoxFuture<'static, Result<(), BrokerError>> {
        self.inner.check(client)
    }
    fn close(&self, client: Self::Client) -> LocalBoxFuture<'static, ()> {
        self.inner.close(client)
    }
}

async fn wait_status<A>(
    addr: &Addr<A>,
    what: &str,
    condition: impl Fn(&PublisherStatus) -> bool,
) -> PublisherStatus
where
    A: Actor<Context = Context<A>> + Handler<QueryStatus>,
{
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let status = addr.send(QueryStatus).await.unwrap();
        if condition(&status) {
            return status;
        }
        assert!(Instant::now() < end, "never {what}: {status:?}");
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
}

async fn stream_seqs(stream: &str) -> Vec<u64> {
    let client = redis::Client::open(format!("redis://{REDIS}")).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(stream)
        .query_async(&mut connection)
        .await
        .unwrap();
    reply
        .ids
        .iter()
        .map(|entry| {
            let json: String = entry.get("event").unwrap();
            let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
            doc["data"]["seq"].as_u64().unwrap()
        })
        .collect()
}

#[actix::test]
async fn closing_twice_gives_the_same_report_and_a_closed_publisher_refuses_events_clearly() {
    require_redis();
    let stream = unique_stream();
    let s = settings(&stream);
    let policy = RestartPolicy {
        max_restarts: 5,
        restart_window: 60.0,
    };
    let publisher = BrokerPublisher::new(RedisBroker::new(s.clone()), buffer(&s), policy).start();
    for seq in 1..=4 {
        publisher
            .send(TryDeliver(event(seq)))
            .await
            .unwrap()
            .unwrap();
    }
    let first = publisher
        .send(Close {
            timeout: Duration::from_secs(5),
        })
        .await
        .unwrap();
    assert_eq!((first.delivered, first.undelivered), (4, 0), "{first:?}");
    let second = publisher
        .send(Close {
            timeout: Duration::from_secs(5),
        })
        .await
        .unwrap();
    assert_eq!(
        (second.delivered, second.undelivered),
        (first.delivered, first.undelivered)
    );

    let refused = publisher.send(TryDeliver(event(5))).await.unwrap();
    assert_eq!(refused, Err(PublishError::Closed { publisher: "redis" }));
    let message = refused.unwrap_err().to_string();
    assert!(
        message.contains("publisher `redis` is closed") && message.contains("accepts no more"),
        "{message}"
    );
    assert_eq!(stream_seqs(&stream).await, [1, 2, 3, 4]);
}

#[actix::test]
async fn a_client_that_panics_is_restarted_and_its_buffer_delivered_in_order() {
    require_redis();
    let stream = unique_stream();
    let s = settings(&stream);
    let panics = Arc::new(AtomicU32::new(2));
    let broker = Faulty {
        inner: RedisBroker::new(s.clone()),
        panics: panics.clone(),
    };
    let policy = RestartPolicy {
        max_restarts: 5,
        restart_window: 60.0,
    };
    let publisher = BrokerPublisher::new(broker, buffer(&s), policy).start();
    for seq in 1..=10 {
        publisher
            .send(TryDeliver(event(seq)))
            .await
            .unwrap()
            .unwrap();
    }
    let status = wait_status(&publisher, "delivered all 10", |s| s.delivered == 10).await;
    assert_eq!(status.restarts, 2, "{status:?}");
    assert!(!status.failed, "{status:?}");
    assert_eq!(status.buffered, 0);
    assert!(status.retried >= 2, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("panicked") && e.contains("injected fault")),
        "{status:?}"
    );
    assert_eq!(panics.load(Ordering::SeqCst), 0);
    assert_eq!(stream_seqs(&stream).await, (1..=10).collect::<Vec<_>>());
}

#[actix::test]
async fn past_its_restart_intensity_a_publisher_is_failed_and_close_reports_what_it_kept() {
    require_redis();
    let stream = unique_stream();
    let s = settings(&stream);
    let broker = Faulty {
        inner: RedisBroker::new(s.clone()),
        panics: Arc::new(AtomicU32::new(u32::MAX)),
    };
    let policy = RestartPolicy {
        max_restarts: 2,
        restart_window: 60.0,
    };
    let publisher = BrokerPublisher::new(broker, buffer(&s), policy).start();
    for seq in 1..=5 {
        publisher
            .send(TryDeliver(event(seq)))
            .await
            .unwrap()
            .unwrap();
    }
    let status = wait_status(&publisher, "failed", |s| s.failed).await;
    assert_eq!(status.restarts, 3, "{status:?}");
    assert_eq!(status.buffered, 5, "the buffer is kept: {status:?}");
    // A failed publisher still takes events into its buffer (to report them).
    publisher.send(TryDeliver(event(6))).await.unwrap().unwrap();
    let report = publisher
        .send(Close {
            timeout: Duration::from_secs(1),
        })
        .await
        .unwrap();
    assert_eq!((report.delivered, report.undelivered), (0, 6), "{report:?}");
    assert!(stream_seqs(&stream).await.is_empty());
}

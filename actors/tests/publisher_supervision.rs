//! Supervision of a broker publisher against the real Redis at 127.0.0.1:6379 (a fault
//! is injected into the client where a test needs one): a panicking Redis client is
//! restarted with the buffer kept and delivered in order to the stream, and close
//! delivers the buffer to the stream and reports it. The supervision logic itself
//! (failures, partial acknowledgements, timeouts, restart intensity, overflow, close)
//! is tested in process on the in-memory broker, in `broker_publisher.rs`.

mod support;

use actix::prelude::*;
use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::{event, wait_status};
use tether_actors::event::SharedEvent;
use tether_actors::publisher::backoff::RestartPolicy;
use tether_actors::publisher::broker::{Broker, BrokerError, LossReporter, SendError, Timeouts};
use tether_actors::publisher::redis::RedisBroker;
use tether_actors::publisher::supervisor::{BrokerPublisher, Close, TryDeliver};
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
async fn closing_delivers_the_buffer_to_the_stream_and_reports_it() {
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
    let report = publisher
        .send(Close {
            timeout: Duration::from_secs(5),
        })
        .await
        .unwrap();
    assert_eq!((report.delivered, report.undelivered), (4, 0), "{report:?}");
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

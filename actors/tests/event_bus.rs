//! The event bus, in process: every event reaches every publisher in order; `/events`
//! subscribers receive in order, one that falls more than its buffer behind is cut off
//! and counted, and closing subscribers ends their streams; `FlushAll` reports per
//! publisher, with [`FlushReport::unanswered`] for one that does not answer. Publishers
//! are small recording actors here, plus one real [`BrokerPublisher`] on the in-memory
//! broker of `support::memory`.

mod support;

use actix::prelude::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::memory::MemoryBroker;
use support::{event, eventually};
use tether_actors::bus::{
    AddPublisher, CloseSubscribers, EventBus, FlushAll, GetBusStatus, Publish, SettleAll, Subscribe,
};
use tether_actors::publisher::backoff::RestartPolicy;
use tether_actors::publisher::supervisor::BrokerPublisher;
use tether_actors::publisher::{
    Deliver, Flush, FlushReport, PublisherHandle, PublisherStatus, QueryStatus, Settle,
};
use tether_actors::settings::BufferSettings;

/// A publisher that records the sequence numbers it is given; it answers flushes
/// with what it recorded, or never (`answers_flush: false`).
struct Recorder {
    name: &'static str,
    seen: Arc<Mutex<Vec<u64>>>,
    answers_flush: bool,
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<Deliver> for Recorder {
    type Result = ();

    fn handle(&mut self, msg: Deliver, _ctx: &mut Self::Context) {
        self.seen.lock().unwrap().push(msg.0.seq);
    }
}

impl Handler<Flush> for Recorder {
    type Result = ResponseFuture<FlushReport>;

    fn handle(&mut self, _msg: Flush, _ctx: &mut Self::Context) -> Self::Result {
        if !self.answers_flush {
            return Box::pin(std::future::pending());
        }
        let report = FlushReport {
            name: self.name.to_owned(),
            delivered: self.seen.lock().unwrap().len() as u64,
            undelivered: 0,
        };
        Box::pin(async move { report })
    }
}

impl Handler<Settle> for Recorder {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, _msg: Settle, _ctx: &mut Self::Context) -> Self::Result {
        if !self.answers_flush {
            return Box::pin(std::future::pending());
        }
        Box::pin(async { true })
    }
}

impl Handler<QueryStatus> for Recorder {
    type Result = PublisherStatus;

    fn handle(&mut self, _msg: QueryStatus, _ctx: &mut Self::Context) -> PublisherStatus {
        PublisherStatus::healthy(self.name, self.seen.lock().unwrap().len() as u64)
    }
}

/// Starts a recorder, adds it to `bus` and returns what it records.
fn add_recorder(
    bus: &Addr<EventBus>,
    name: &'static str,
    answers_flush: bool,
) -> Arc<Mutex<Vec<u64>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder {
        name,
        seen: seen.clone(),
        answers_flush,
    }
    .start();
    bus.do_send(AddPublisher(PublisherHandle::of(name, recorder)));
    seen
}

fn publish(bus: &Addr<EventBus>, seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        bus.do_send(Publish(event(seq)));
    }
}

fn recorded(seen: &Arc<Mutex<Vec<u64>>>) -> Vec<u64> {
    seen.lock().unwrap().clone()
}

#[actix::test]
async fn every_event_reaches_every_publisher_in_order() {
    let bus = EventBus::new(16).start();
    let one = add_recorder(&bus, "one", true);
    let two = add_recorder(&bus, "two", true);
    publish(&bus, 1..=50);

    eventually("both publishers got 50 events", || {
        recorded(&one).len() == 50 && recorded(&two).len() == 50
    })
    .await;
    let all: Vec<u64> = (1..=50).collect();
    assert_eq!(recorded(&one), all);
    assert_eq!(recorded(&two), all);

    let status = bus.send(GetBusStatus).await.unwrap();
    assert_eq!(status.published, 50);
    let publishers: Vec<_> = status
        .publishers
        .iter()
        .map(|p| (p.name.as_str(), p.delivered))
        .collect();
    assert_eq!(publishers, [("one", 50), ("two", 50)]);
}

#[actix::test]
async fn subscribers_receive_in_order_every_event_published_after_they_subscribe() {
    let bus = EventBus::new(64).start();
    publish(&bus, 1..=1);
    let mut first = bus.send(Subscribe).await.unwrap();
    let mut second = bus.send(Subscribe).await.unwrap();
    publish(&bus, 2..=20);

    for subscriber in [&mut first, &mut second] {
        let mut got = Vec::new();
        while got.len() < 19 {
            got.push(subscriber.recv().await.expect("the stream ended").seq);
        }
        assert_eq!(got, (2..=20).collect::<Vec<_>>());
    }
    let status = bus.send(GetBusStatus).await.unwrap();
    assert_eq!((status.published, status.sse_subscribers), (20, 2));
}

#[actix::test]
async fn a_subscriber_that_falls_behind_by_more_than_its_buffer_is_cut_off_and_counted() {
    let bus = EventBus::new(4).start();
    let mut slow = bus.send(Subscribe).await.unwrap();
    let mut keeping_up = bus.send(Subscribe).await.unwrap();
    for seq in 1..=6 {
        bus.send(Publish(event(seq))).await.unwrap();
        assert_eq!(keeping_up.recv().await.map(|e| e.seq), Some(seq));
    }

    // The slow one had room for 4: the 5th cut it off; it reads those 4, then the end.
    let mut got = Vec::new();
    while let Some(event) = slow.recv().await {
        got.push(event.seq);
    }
    assert_eq!(got, [1, 2, 3, 4]);
    let status = bus.send(GetBusStatus).await.unwrap();
    assert_eq!(status.sse_subscribers_cut_off, 1, "{status:?}");
    assert_eq!(status.sse_subscribers, 1, "{status:?}");
}

#[actix::test]
async fn closing_subscribers_ends_their_streams_after_the_events_already_queued() {
    let bus = EventBus::new(16).start();
    let mut subscriber = bus.send(Subscribe).await.unwrap();
    publish(&bus, 1..=2);
    bus.send(CloseSubscribers).await.unwrap();
    publish(&bus, 3..=3);

    assert_eq!(subscriber.recv().await.map(|e| e.seq), Some(1));
    assert_eq!(subscriber.recv().await.map(|e| e.seq), Some(2));
    assert!(subscriber.recv().await.is_none(), "the stream ended");
    let status = bus.send(GetBusStatus).await.unwrap();
    assert_eq!(status.sse_subscribers, 0);
    assert_eq!(
        status.sse_subscribers_cut_off, 0,
        "closing is not cutting off"
    );
}

#[actix::test]
async fn flush_all_reports_per_publisher_and_an_unanswering_one_as_unanswered() {
    let bus = EventBus::new(16).start();
    add_recorder(&bus, "one", true);
    let silent = add_recorder(&bus, "silent", false);
    add_recorder(&bus, "two", true);
    publish(&bus, 1..=3);

    let started = Instant::now();
    let reports = bus
        .send(FlushAll {
            timeout: Duration::from_millis(50),
        })
        .await
        .unwrap();
    let reports: Vec<_> = reports
        .iter()
        .map(|r| (r.name.as_str(), r.delivered, r.undelivered))
        .collect();
    assert_eq!(reports, [("one", 3, 0), ("silent", 0, 0), ("two", 3, 0)]);
    assert_eq!(
        recorded(&silent),
        [1, 2, 3],
        "it got the events, but did not answer"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the bus waits the timeout plus a 1 s grace, not forever: {:?}",
        started.elapsed()
    );
}

/// A bus with one broker publisher on `broker` (sending `batch_size` events at a time,
/// retrying within milliseconds).
fn bus_with_memory_broker(broker: MemoryBroker, batch_size: usize) -> Addr<EventBus> {
    let buffering = BufferSettings {
        buffer_capacity: 100,
        batch_size,
        retry_initial: 0.002,
        retry_max: 0.01,
    };
    let policy = RestartPolicy {
        max_restarts: 10,
        restart_window: 60.0,
    };
    let publisher = BrokerPublisher::new(broker, buffering, policy).start();
    let bus = EventBus::new(16).start();
    bus.do_send(AddPublisher(PublisherHandle::of("memory", publisher)));
    bus
}

#[actix::test]
async fn events_published_on_the_bus_reach_a_broker_publisher_in_order_through_a_fault() {
    let (broker, fake) = MemoryBroker::new();
    fake.fail_next_send(2);
    let bus = bus_with_memory_broker(broker, 5);
    publish(&bus, 1..=20);

    let reports = bus
        .send(FlushAll {
            timeout: Duration::from_secs(5),
        })
        .await
        .unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(
        (
            reports[0].name.as_str(),
            reports[0].delivered,
            reports[0].undelivered
        ),
        ("memory", 20, 0)
    );
    assert_eq!(fake.accepted_seqs(), (1..=20).collect::<Vec<_>>());
}

#[actix::test]
async fn settle_all_answers_once_the_events_before_it_are_acknowledged_and_not_before() {
    let (broker, fake) = MemoryBroker::new();
    let gate = fake.hold_next_send();
    let bus = bus_with_memory_broker(broker, 50);
    publish(&bus, 1..=3);

    let held = bus
        .send(SettleAll {
            timeout: Duration::from_millis(100),
        })
        .await
        .unwrap();
    assert!(!held, "the broker has not acknowledged the held batch");

    let settling = bus.send(SettleAll {
        timeout: Duration::from_secs(10),
    });
    gate.open();
    assert!(
        settling.await.unwrap(),
        "settled once the broker acknowledged"
    );
    assert_eq!(fake.accepted_seqs(), [1, 2, 3]);
}

#[actix::test]
async fn settle_all_gives_up_after_its_timeout_on_a_publisher_that_never_answers() {
    let bus = EventBus::new(16).start();
    add_recorder(&bus, "one", true);
    add_recorder(&bus, "silent", false);
    publish(&bus, 1..=2);
    let settled = bus
        .send(SettleAll {
            timeout: Duration::from_millis(50),
        })
        .await
        .unwrap();
    assert!(!settled);

    let bus = EventBus::new(16).start();
    add_recorder(&bus, "one", true);
    publish(&bus, 1..=2);
    let settled = bus
        .send(SettleAll {
            timeout: Duration::from_secs(5),
        })
        .await
        .unwrap();
    assert!(settled, "a publisher that answers settles");
}

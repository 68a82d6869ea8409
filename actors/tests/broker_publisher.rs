//! The supervision logic of [`BrokerPublisher`], in process, on the scripted in-memory
//! broker of `support::memory` (no real broker): at-least-once delivery in order
//! through send failures, partial acknowledgements, hung sends and panics; restart
//! counting (an outage costs one restart, reconnect attempts are retries) and the
//! restart intensity; buffer overflow; flush and close; connection losses reported by
//! the client. Backoffs and timeouts are milliseconds, so the file runs in about a
//! second. The real-broker counterparts are in `publisher_supervision.rs`.

mod support;

use actix::prelude::*;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};
use support::memory::MemoryBroker;
use support::{event, eventually, wait_status};
use tether_actors::publisher::backoff::RestartPolicy;
use tether_actors::publisher::supervisor::{BrokerPublisher, Close, PublishError, TryDeliver};
use tether_actors::publisher::{Deliver, Flush, FlushReport, QueryStatus};
use tether_actors::settings::BufferSettings;

type Publisher = Addr<BrokerPublisher<MemoryBroker>>;

/// Buffering with retries after 2 to 10 ms.
fn buffering(capacity: usize, batch_size: usize) -> BufferSettings {
    BufferSettings {
        buffer_capacity: capacity,
        batch_size,
        retry_initial: 0.002,
        retry_max: 0.01,
    }
}

fn at_most(max_restarts: u32) -> RestartPolicy {
    RestartPolicy {
        max_restarts,
        restart_window: 60.0,
    }
}

/// A publisher on `broker` with a buffer of 100, batches of 3 and at most 10 restarts.
fn start(broker: MemoryBroker) -> Publisher {
    BrokerPublisher::new(broker, buffering(100, 3), at_most(10)).start()
}

/// Offers events `seqs` as the bus does. They are all queued in the mailbox at once,
/// so events offered before the publisher first runs are buffered before it connects
/// and the batches are full.
fn offer(publisher: &Publisher, seqs: RangeInclusive<u64>) {
    for seq in seqs {
        publisher.do_send(Deliver(event(seq)));
    }
}

fn close(
    publisher: &Publisher,
    timeout: Duration,
) -> Request<BrokerPublisher<MemoryBroker>, Close> {
    publisher.send(Close { timeout })
}

fn counts(report: &FlushReport) -> (u64, u64) {
    (report.delivered, report.undelivered)
}

fn ids(events: &[tether_actors::event::SharedEvent]) -> Vec<&str> {
    events.iter().map(|e| e.id.as_str()).collect()
}

#[actix::test]
async fn a_panicking_client_is_restarted_and_the_buffer_is_delivered_in_order() {
    let (broker, fake) = MemoryBroker::new();
    fake.panic_sends(2);
    let publisher = start(broker);
    offer(&publisher, 1..=10);

    let status = wait_status(&publisher, "delivered all 10", |s| s.delivered == 10).await;
    assert_eq!(status.restarts, 2, "{status:?}");
    assert_eq!(status.retried, 6, "two batches of 3 sent again: {status:?}");
    assert!(!status.failed && status.connected, "{status:?}");
    assert_eq!(status.buffered, 0);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("panicked") && e.contains("injected fault")),
        "{status:?}"
    );
    assert_eq!(
        fake.batches(),
        [vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9], vec![10]]
    );
    assert_eq!(fake.connections(), 3, "one connection per restart");
    assert_eq!(fake.open_connections(), 1, "restarted clients are closed");
}

#[actix::test]
async fn a_client_that_panics_while_connecting_is_restarted() {
    let (broker, fake) = MemoryBroker::new();
    fake.panic_next_connect();
    let publisher = start(broker);
    offer(&publisher, 1..=2);

    let status = wait_status(&publisher, "delivered both", |s| s.delivered == 2).await;
    assert_eq!(status.restarts, 1, "{status:?}");
    assert_eq!(fake.connect_attempts(), 2);
    assert_eq!(fake.accepted_seqs(), [1, 2]);
}

#[actix::test]
async fn partially_acknowledged_batches_are_resent_from_the_first_unacknowledged_event() {
    let (broker, fake) = MemoryBroker::new();
    fake.fail_next_send(1);
    fake.fail_next_send(2);
    fake.fail_next_send(0);
    let publisher = start(broker);
    offer(&publisher, 1..=10);

    let status = wait_status(&publisher, "delivered all 10", |s| s.delivered == 10).await;
    // [1 2 3] → 1 acked; [2 3 4] → 2 acked; [4 5 6] → none acked; then all accepted.
    assert_eq!(
        fake.batches(),
        [vec![1], vec![2, 3], vec![4, 5, 6], vec![7, 8, 9], vec![10]]
    );
    assert_eq!(
        fake.accepted_seqs(),
        (1..=10).collect::<Vec<_>>(),
        "no gap, no reordering, no duplicate"
    );
    assert_eq!(status.retried, 2 + 1 + 3, "{status:?}");
    assert_eq!(status.restarts, 3, "{status:?}");
}

#[actix::test]
async fn a_hung_send_times_out_and_is_retried() {
    let (broker, fake) = MemoryBroker::new();
    let broker = broker.send_timeout(Duration::from_millis(50));
    fake.hang_next_send();
    let publisher = start(broker);
    offer(&publisher, 1..=5);

    let status = wait_status(&publisher, "delivered all 5", |s| s.delivered == 5).await;
    assert_eq!(status.restarts, 1, "{status:?}");
    assert_eq!(status.retried, 3, "{status:?}");
    assert!(
        status.last_error.as_deref().is_some_and(
            |e| e.contains("memory://test did not acknowledge a batch of 3 events within")
        ),
        "{status:?}"
    );
    assert_eq!(fake.batches(), [vec![1, 2, 3], vec![4, 5]]);
    assert_eq!(fake.send_attempts(), 3);
}

#[actix::test]
async fn a_batch_written_but_never_acknowledged_is_the_only_one_delivered_twice() {
    let (broker, fake) = MemoryBroker::new();
    let broker = broker.send_timeout(Duration::from_millis(50));
    fake.write_next_send_then_hang();
    let publisher = start(broker);
    offer(&publisher, 1..=5);

    let status = wait_status(&publisher, "delivered all 5", |s| s.delivered == 5).await;
    assert_eq!(fake.batches(), [vec![1, 2, 3], vec![1, 2, 3], vec![4, 5]]);
    let accepted = fake.accepted();
    assert_eq!(
        ids(&accepted[..3]),
        ids(&accepted[3..6]),
        "the same events (same ids) are sent again, so consumers can drop the copies"
    );
    assert_eq!(status.delivered, 5, "acknowledged events are counted once");
    assert_eq!((status.restarts, status.retried), (1, 3), "{status:?}");
}

#[actix::test]
async fn failing_to_connect_at_start_costs_no_restart() {
    let (broker, fake) = MemoryBroker::new();
    fake.fail_connects(4);
    let publisher = start(broker);
    offer(&publisher, 1..=3);

    let status = wait_status(&publisher, "delivered all 3", |s| s.delivered == 3).await;
    assert_eq!(status.restarts, 0, "{status:?}");
    assert!(status.connected);
    assert_eq!(fake.connect_attempts(), 5);
    assert_eq!(fake.accepted_seqs(), [1, 2, 3]);
}

#[actix::test]
async fn a_hung_connection_attempt_times_out_and_is_retried_without_a_restart() {
    let (broker, fake) = MemoryBroker::new();
    let broker = broker.connect_timeout(Duration::from_millis(50));
    fake.hang_next_connect();
    let publisher = start(broker);
    offer(&publisher, 1..=1);

    let status = wait_status(&publisher, "delivered the event", |s| s.delivered == 1).await;
    assert_eq!(status.restarts, 0, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("connecting to memory://test timed out")),
        "{status:?}"
    );
    assert_eq!(fake.connect_attempts(), 2);
}

#[actix::test]
async fn an_outage_costs_one_restart_and_its_reconnect_attempts_are_retries() {
    let (broker, fake) = MemoryBroker::new();
    // One restart allowed: a long outage must not fail the publisher.
    let publisher = BrokerPublisher::new(broker, buffering(100, 3), at_most(1)).start();
    offer(&publisher, 1..=1);
    wait_status(&publisher, "delivered the first event", |s| {
        s.delivered == 1
    })
    .await;

    fake.fail_connects(5);
    fake.report_loss("the socket closed");
    offer(&publisher, 2..=4);

    let status = wait_status(&publisher, "delivered all 4", |s| s.delivered == 4).await;
    assert_eq!(status.restarts, 1, "{status:?}");
    assert!(!status.failed && status.connected, "{status:?}");
    assert_eq!(fake.connect_attempts(), 1 + 5 + 1);
    assert_eq!(fake.connections(), 2);
    assert_eq!(fake.accepted_seqs(), [1, 2, 3, 4]);
}

#[actix::test]
async fn past_its_restart_intensity_a_publisher_is_failed_keeps_its_buffer_and_stops_connecting() {
    let (broker, fake) = MemoryBroker::new();
    fake.panic_sends(100);
    let publisher = BrokerPublisher::new(broker, buffering(100, 3), at_most(2)).start();
    offer(&publisher, 1..=5);

    let status = wait_status(&publisher, "failed", |s| s.failed).await;
    assert_eq!(
        status.restarts, 3,
        "the third restart exceeds 2: {status:?}"
    );
    assert_eq!(status.buffered, 5, "the buffer is kept: {status:?}");
    assert!(!status.connected);
    assert_eq!(fake.connect_attempts(), 3);

    // A failed publisher still buffers events (to report them), and does not
    // reconnect: several retry delays (at most 10 ms each) pass without an attempt.
    offer(&publisher, 6..=6);
    actix::clock::sleep(Duration::from_millis(50)).await;
    let status = publisher.send(QueryStatus).await.unwrap();
    assert_eq!(status.buffered, 6, "{status:?}");
    assert_eq!(
        fake.connect_attempts(),
        3,
        "a failed publisher stopped connecting"
    );

    let report = close(&publisher, Duration::from_secs(1)).await.unwrap();
    assert_eq!(counts(&report), (0, 6), "{report:?}");
    assert!(fake.accepted().is_empty());
}

#[actix::test]
async fn a_full_buffer_drops_the_oldest_events_not_in_flight_and_counts_them() {
    let (broker, fake) = MemoryBroker::new();
    let held = fake.hold_next_send();
    let publisher = BrokerPublisher::new(broker, buffering(4, 2), at_most(10)).start();
    offer(&publisher, 1..=2);
    eventually("sent the first batch", || fake.send_attempts() == 1).await;

    // [1 2] is in flight; 3 to 8 overflow a buffer of 4, so 3 to 6 are dropped.
    offer(&publisher, 3..=8);
    let status = wait_status(&publisher, "took all 8", |s| {
        s.buffered + s.dropped as usize == 8
    })
    .await;
    assert_eq!((status.buffered, status.dropped), (4, 4), "{status:?}");

    held.open();
    wait_status(&publisher, "delivered what it kept", |s| s.buffered == 0).await;
    assert_eq!(fake.accepted_seqs(), [1, 2, 7, 8]);
    let report = publisher
        .send(Flush {
            timeout: Duration::from_secs(1),
        })
        .await
        .unwrap();
    assert_eq!(
        counts(&report),
        (4, 4),
        "dropped events are undelivered: {report:?}"
    );
}

#[actix::test]
async fn flush_delivers_what_is_buffered_and_reports_it() {
    let (broker, fake) = MemoryBroker::new();
    let held = fake.hold_next_connect();
    let publisher = start(broker);
    offer(&publisher, 1..=7);
    let flush = publisher.send(Flush {
        timeout: Duration::from_secs(5),
    });
    held.open();

    let report = flush.await.unwrap();
    assert_eq!(report.name, "memory");
    assert_eq!(counts(&report), (7, 0), "{report:?}");
    assert_eq!(fake.accepted_seqs(), (1..=7).collect::<Vec<_>>());
    assert_eq!(
        fake.open_connections(),
        0,
        "a closed publisher closes its connection"
    );
}

#[actix::test]
async fn flush_with_the_broker_down_reports_the_buffer_undelivered_at_its_deadline() {
    let (broker, fake) = MemoryBroker::new();
    fake.set_down(true);
    let publisher = start(broker);
    offer(&publisher, 1..=5);

    let started = Instant::now();
    let report = publisher
        .send(Flush {
            timeout: Duration::from_millis(100),
        })
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(counts(&report), (0, 5), "{report:?}");
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_secs(1),
        "it retries until the deadline, then reports: {took:?}"
    );
    assert!(
        fake.connect_attempts() > 2,
        "it kept retrying while flushing"
    );
}

#[actix::test]
async fn closing_retries_at_once_instead_of_waiting_out_the_backoff() {
    let (broker, fake) = MemoryBroker::new();
    fake.fail_connects(1);
    let slow_retries = BufferSettings {
        retry_initial: 30.0,
        retry_max: 30.0,
        ..buffering(100, 3)
    };
    let publisher = BrokerPublisher::new(broker, slow_retries, at_most(10)).start();
    offer(&publisher, 1..=3);
    wait_status(&publisher, "failed to connect", |s| s.last_error.is_some()).await;

    let started = Instant::now();
    let report = close(&publisher, Duration::from_secs(5)).await.unwrap();
    assert_eq!(counts(&report), (3, 0), "{report:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fake.accepted_seqs(), [1, 2, 3]);
}

#[actix::test]
async fn closing_twice_gives_the_same_report_and_concurrent_closes_share_it() {
    let (broker, fake) = MemoryBroker::new();
    let held = fake.hold_next_send();
    let publisher = start(broker);
    offer(&publisher, 1..=3);
    eventually("sent the batch", || fake.send_attempts() == 1).await;

    let first = close(&publisher, Duration::from_secs(5));
    let concurrent = close(&publisher, Duration::from_secs(5));
    held.open();
    let (first, concurrent) = (first.await.unwrap(), concurrent.await.unwrap());
    let again = close(&publisher, Duration::from_secs(5)).await.unwrap();
    assert_eq!(counts(&first), (3, 0), "{first:?}");
    assert_eq!(counts(&concurrent), counts(&first));
    assert_eq!(counts(&again), counts(&first));
    assert_eq!(fake.send_attempts(), 1, "closing again sends nothing");
}

#[actix::test]
async fn a_closed_publisher_refuses_events_with_publish_error_closed() {
    let (broker, fake) = MemoryBroker::new();
    let publisher = start(broker);
    offer(&publisher, 1..=2);
    let report = close(&publisher, Duration::from_secs(5)).await.unwrap();
    assert_eq!(counts(&report), (2, 0));

    let refused = publisher.send(TryDeliver(event(3))).await.unwrap();
    assert_eq!(
        refused,
        Err(PublishError::Closed {
            publisher: "memory"
        })
    );
    let message = refused.unwrap_err().to_string();
    assert!(
        message.contains("publisher `memory` is closed") && message.contains("accepts no more"),
        "{message}"
    );
    // The bus's fire-and-forget delivery is refused as well.
    offer(&publisher, 4..=4);
    let status = publisher.send(QueryStatus).await.unwrap();
    assert_eq!(status.buffered, 0, "{status:?}");
    assert_eq!(fake.accepted_seqs(), [1, 2]);
}

#[actix::test]
async fn a_connection_loss_reported_by_the_client_triggers_a_reconnect() {
    let (broker, fake) = MemoryBroker::new();
    // Health checks are off (hourly): only the report can make it reconnect.
    let publisher = start(broker);
    offer(&publisher, 1..=1);
    wait_status(&publisher, "delivered the first event", |s| {
        s.delivered == 1
    })
    .await;

    fake.report_loss("the broker went away");
    reconnected_once_because(&publisher, "connection lost: the broker went away").await;
    assert_eq!(fake.connections(), 2);
    assert_eq!(fake.open_connections(), 1, "the lost connection is closed");

    offer(&publisher, 2..=2);
    wait_status(&publisher, "delivered the second event", |s| {
        s.delivered == 2
    })
    .await;
    assert_eq!(fake.accepted_seqs(), [1, 2]);
}

#[actix::test]
async fn a_loss_report_from_an_earlier_connection_is_ignored() {
    let (broker, fake) = MemoryBroker::new();
    let publisher = start(broker);
    offer(&publisher, 1..=1);
    wait_status(&publisher, "delivered", |s| s.delivered == 1).await;
    fake.report_loss("first loss");
    wait_status(&publisher, "reconnected", |s| {
        s.restarts == 1 && s.connected
    })
    .await;

    fake.report_loss_on(0, "a late report about the first connection");
    // The report is ahead of this query in the mailbox.
    let status = publisher.send(QueryStatus).await.unwrap();
    assert_eq!(status.restarts, 1, "{status:?}");
    assert!(status.connected, "{status:?}");
    assert_eq!(fake.connections(), 2);
}

#[actix::test]
async fn a_failing_health_check_restarts_an_idle_connection() {
    let (broker, fake) = MemoryBroker::new();
    let broker = broker.health_checks_every(Duration::from_millis(5));
    fake.fail_checks(1);
    let publisher = start(broker);

    reconnected_once_because(&publisher, "health check failed").await;
    assert_eq!(fake.connections(), 2);
    eventually("checked the new connection", || fake.checks() >= 2).await;
    let status = publisher.send(QueryStatus).await.unwrap();
    assert_eq!(
        status.restarts, 1,
        "a passing check restarts nothing: {status:?}"
    );
}

#[actix::test]
async fn a_connection_made_after_close_is_closed_at_once() {
    let (broker, fake) = MemoryBroker::new();
    let held = fake.hold_next_connect();
    let publisher = start(broker);
    eventually("started connecting", || fake.connect_attempts() == 1).await;

    let report = close(&publisher, Duration::from_secs(1)).await.unwrap();
    assert_eq!(counts(&report), (0, 0));
    held.open();
    eventually("connected", || fake.connections() == 1).await;

    eventually("closed the late connection", || {
        fake.open_connections() == 0
    })
    .await;
    let status = publisher.send(QueryStatus).await.unwrap();
    assert!(
        !status.connected,
        "a closed publisher is not connected: {status:?}"
    );
}

/// Waits until `publisher` has restarted once and is connected again, and checks that
/// its last error says `why`.
async fn reconnected_once_because(publisher: &Publisher, why: &str) {
    let status = wait_status(publisher, "reconnected", |s| s.restarts == 1 && s.connected).await;
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains(why)),
        "{status:?}"
    );
}

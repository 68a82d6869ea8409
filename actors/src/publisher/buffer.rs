//! The bounded, ordered buffer of a broker publisher.
//!
//! Events wait here, in publication order, until their broker acknowledges them. The
//! front of the buffer may be *in flight* (sent, not yet acknowledged); an event
//! leaves the buffer only when acknowledged, so a failed batch is retried from its
//! first unacknowledged event and per-agent order survives retries.
//!
//! Past `capacity` the oldest event that is not in flight is dropped. Drops come in
//! bursts (while the broker is down and events keep coming); each burst is counted
//! so the publisher can log it once, with its size, when it ends.

use crate::event::SharedEvent;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A burst of drops that has not been reported yet.
#[derive(Debug, Clone, Copy)]
pub struct Burst {
    /// Events dropped in this burst.
    pub dropped: u64,
    /// When the first of them was dropped.
    pub started: Instant,
}

/// Bounded FIFO of events waiting for acknowledgement.
#[derive(Debug)]
pub struct EventBuffer {
    events: VecDeque<SharedEvent>,
    capacity: usize,
    /// Events at the front currently sent and awaiting acknowledgement.
    in_flight: usize,
    /// Events dropped since start.
    dropped: u64,
    burst: Option<Burst>,
}

impl EventBuffer {
    /// A buffer holding at most `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            events: VecDeque::new(),
            capacity: capacity.max(1),
            in_flight: 0,
            dropped: 0,
            burst: None,
        }
    }

    /// Appends an event; when the buffer is over capacity, drops the oldest event
    /// that is not in flight and returns it.
    pub fn push(&mut self, event: SharedEvent) -> Option<SharedEvent> {
        self.events.push_back(event);
        if self.events.len() <= self.capacity {
            return None;
        }
        // `in_flight <= capacity < len`, so this index exists (at worst it is the
        // event just pushed).
        let dropped = self.events.remove(self.in_flight);
        self.dropped += 1;
        self.burst
            .get_or_insert(Burst {
                dropped: 0,
                started: Instant::now(),
            })
            .dropped += 1;
        dropped
    }

    /// Marks up to `max` events at the front in flight and returns them (empty when
    /// a batch is already in flight or nothing waits).
    pub fn take_batch(&mut self, max: usize) -> Vec<SharedEvent> {
        if self.in_flight > 0 {
            return Vec::new();
        }
        let n = max.min(self.capacity).min(self.events.len());
        self.in_flight = n;
        self.events.iter().take(n).cloned().collect()
    }

    /// The broker acknowledged the first `acked` events of the batch in flight; the
    /// rest of the batch (if any) goes back to waiting, at the front, in order.
    pub fn settle(&mut self, acked: usize) {
        let acked = acked.min(self.in_flight);
        self.events.drain(..acked);
        self.in_flight = 0;
    }

    /// Events waiting or in flight.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether nothing waits and nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Most events it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Events in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Events dropped since start.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether a burst of drops is going on.
    pub fn in_burst(&self) -> bool {
        self.burst.is_some()
    }

    /// Ends the current burst (if any) and returns it for reporting.
    pub fn end_burst(&mut self) -> Option<Burst> {
        self.burst.take()
    }

    /// Ends the current burst if it has lasted at least `longest`, so a burst that
    /// goes on for hours is still reported regularly.
    pub fn end_burst_older_than(&mut self, longest: Duration) -> Option<Burst> {
        match self.burst {
            Some(burst) if burst.started.elapsed() >= longest => self.burst.take(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{AgentEvent, EventSource, LifecycleEvent};
    use std::sync::Arc;

    fn event(seq: u64) -> SharedEvent {
        let source = EventSource::new("net", "node");
        let payload = AgentEvent::Active {
            session_id: "s-1",
            inactive_secs: 0.0,
        };
        Arc::new(LifecycleEvent::agent(&source, "a".into(), 1, seq, &payload))
    }

    fn seqs(events: &[SharedEvent]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn a_failed_batch_is_retried_from_its_first_unacknowledged_event_in_order() {
        let mut buffer = EventBuffer::new(10);
        for seq in 1..=5 {
            assert!(buffer.push(event(seq)).is_none());
        }
        assert_eq!(seqs(&buffer.take_batch(3)), [1, 2, 3]);
        assert!(
            buffer.take_batch(3).is_empty(),
            "one batch in flight at a time"
        );
        buffer.settle(1);
        assert_eq!(seqs(&buffer.take_batch(3)), [2, 3, 4]);
        buffer.settle(3);
        assert_eq!(seqs(&buffer.take_batch(3)), [5]);
        buffer.settle(1);
        assert!(buffer.is_empty());
    }

    #[test]
    fn overflow_drops_the_oldest_event_not_in_flight_and_counts_the_burst() {
        let mut buffer = EventBuffer::new(3);
        for seq in 1..=3 {
            buffer.push(event(seq));
        }
        assert_eq!(seqs(&buffer.take_batch(2)), [1, 2]);
        assert_eq!(buffer.push(event(4)).map(|e| e.seq), Some(3));
        assert_eq!(buffer.push(event(5)).map(|e| e.seq), Some(4));
        assert_eq!(buffer.dropped(), 2);
        buffer.settle(2);
        assert_eq!(seqs(&buffer.take_batch(10)), [5]);
        let burst = buffer.end_burst().unwrap();
        assert_eq!(burst.dropped, 2);
        assert!(buffer.end_burst().is_none());
    }

    #[test]
    fn a_full_buffer_with_everything_in_flight_drops_the_newest() {
        let mut buffer = EventBuffer::new(2);
        buffer.push(event(1));
        buffer.push(event(2));
        buffer.take_batch(5);
        assert_eq!(buffer.push(event(3)).map(|e| e.seq), Some(3));
        assert_eq!(buffer.len(), 2);
    }
}

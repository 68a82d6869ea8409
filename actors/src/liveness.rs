//! What "alive", "stale" and "inactive" mean, in one place.
//!
//! Each connection has a [`ConnectionClock`]: the connection actor writes the time of
//! every frame it reads; the heartbeat and the registry read it without a message round
//! trip. [`Liveness`] holds the heartbeat settings in milliseconds and is the one owner
//! of the rules: when a silent agent is pinged, when it is past the stale bound, when
//! it counts as inactive. The *published* state (whether consumers were told
//! `agent.inactive`) is the registry's alone.

use crate::settings::{secs, HeartbeatSettings};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Identifies one WebSocket connection for the lifetime of the process.
pub type SessionId = u64;

/// Liveness timestamps of one connection, on the monotonic clock
/// ([`crate::clock::Clock`]).
#[derive(Debug)]
pub struct ConnectionClock {
    /// Last frame of any kind received from the agent.
    last_seen_ms: AtomicU64,
    /// Last application frame (message or system request, not a ping answer).
    last_activity_ms: AtomicU64,
    /// Round trip of the last answered ping in microseconds (now − the echoed ping
    /// timestamp); `u32::MAX` when none was measured since the heartbeat last read it.
    ping_rtt_us: AtomicU32,
    /// Round trip of the last answered ping in microseconds, kept (`u32::MAX`: none).
    last_ping_rtt_us: AtomicU32,
    /// Outbound frames the kernel has not accepted yet (shown as `queue_length`).
    queued_frames: AtomicU32,
}

impl ConnectionClock {
    /// A clock whose agent was seen and active at `now_ms`.
    pub fn starting_at(now_ms: u64) -> Self {
        Self {
            last_seen_ms: AtomicU64::new(now_ms),
            last_activity_ms: AtomicU64::new(now_ms),
            ping_rtt_us: AtomicU32::new(u32::MAX),
            last_ping_rtt_us: AtomicU32::new(u32::MAX),
            queued_frames: AtomicU32::new(0),
        }
    }

    /// Records a sign of life.
    pub fn seen(&self, now_ms: u64) {
        self.last_seen_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Records application activity (which is also a sign of life). Returns the time
    /// of the activity before this one, so the caller can tell whether this activity
    /// ends an inactive period ([`Liveness::is_idle`]).
    pub fn active(&self, now_ms: u64) -> u64 {
        self.last_seen_ms.store(now_ms, Ordering::Relaxed);
        self.last_activity_ms.swap(now_ms, Ordering::Relaxed)
    }

    /// Records the round trip of an answered ping, in seconds. Values outside
    /// 0..1 hour (a wrong echo, a wall-clock step) are ignored.
    pub fn answered_ping(&self, rtt_secs: f64) {
        if (0.0..3600.0).contains(&rtt_secs) {
            let rtt_us = (rtt_secs * 1e6) as u32;
            self.ping_rtt_us.store(rtt_us, Ordering::Relaxed);
            self.last_ping_rtt_us.store(rtt_us, Ordering::Relaxed);
        }
    }

    /// The round trip of the last answered ping, in milliseconds.
    pub fn last_ping_rtt_ms(&self) -> Option<f64> {
        match self.last_ping_rtt_us.load(Ordering::Relaxed) {
            u32::MAX => None,
            rtt => Some(f64::from(rtt) / 1000.0),
        }
    }

    /// Takes the round trip recorded by [`answered_ping`](Self::answered_ping) since
    /// the last call, in microseconds.
    pub fn take_ping_rtt_us(&self) -> Option<u32> {
        match self.ping_rtt_us.swap(u32::MAX, Ordering::Relaxed) {
            u32::MAX => None,
            rtt => Some(rtt),
        }
    }

    /// Records how many outbound frames the kernel has not accepted.
    pub fn set_queued_frames(&self, frames: usize) {
        let frames = u32::try_from(frames).unwrap_or(u32::MAX);
        self.queued_frames.store(frames, Ordering::Relaxed);
    }

    /// Outbound frames the kernel has not accepted.
    pub fn queued_frames(&self) -> usize {
        self.queued_frames.load(Ordering::Relaxed) as usize
    }

    /// Last frame of any kind.
    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }

    /// Last application frame.
    pub fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }
}

/// The heartbeat settings in milliseconds, and the rules built on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// A silent agent is pinged this long after its last frame.
    pub interval: u64,
    /// A ping unanswered this long makes the agent stale.
    pub ping_timeout: u64,
    /// An agent silent this long is stale, pinged or not.
    pub agent_timeout: u64,
    /// An agent without application frames this long is inactive.
    pub activity_timeout: u64,
    /// The heartbeat's sweep period.
    pub tick: u64,
}

fn millis(seconds: f64) -> u64 {
    secs(seconds).as_millis() as u64
}

impl Liveness {
    /// The rules of `settings`.
    pub fn new(settings: &HeartbeatSettings) -> Self {
        Self {
            interval: millis(settings.interval),
            ping_timeout: millis(settings.ping_timeout),
            agent_timeout: millis(settings.agent_timeout),
            activity_timeout: millis(settings.activity_timeout),
            tick: millis(settings.tick).max(1),
        }
    }

    /// The contract's stale bound (PROTOCOL.md §4): an agent that answers pings is
    /// never silent longer than `interval + ping_timeout + 1 s`.
    pub fn stale_bound_ms(&self) -> u64 {
        self.interval + self.ping_timeout + 1000
    }

    /// Whether an agent last seen at `last_seen_ms` is silent past the stale bound at
    /// `now_ms`, so it is certainly dead (the heartbeat is about to say so anyway).
    pub fn is_past_stale_bound(&self, last_seen_ms: u64, now_ms: u64) -> bool {
        now_ms.saturating_sub(last_seen_ms) > self.stale_bound_ms()
    }

    /// Whether an agent whose last application frame was at `last_activity_ms` is
    /// inactive at `now_ms`.
    pub fn is_idle(&self, last_activity_ms: u64, now_ms: u64) -> bool {
        now_ms.saturating_sub(last_activity_ms) >= self.activity_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn liveness() -> Liveness {
        Liveness {
            interval: 5_000,
            ping_timeout: 30_000,
            agent_timeout: 60_000,
            activity_timeout: 120_000,
            tick: 100,
        }
    }

    #[test]
    fn the_stale_bound_is_interval_plus_ping_timeout_plus_a_second() {
        let rules = liveness();
        assert_eq!(rules.stale_bound_ms(), 36_000);
        assert!(!rules.is_past_stale_bound(1_000, 37_000));
        assert!(rules.is_past_stale_bound(1_000, 37_001));
    }

    #[test]
    fn activity_returns_the_previous_activity_so_the_end_of_idleness_is_seen() {
        let (rules, clock) = (liveness(), ConnectionClock::starting_at(0));
        assert_eq!(clock.active(1_000), 0);
        assert!(!rules.is_idle(clock.active(2_000), 2_000));
        let previous = clock.active(200_000);
        assert!(rules.is_idle(previous, 200_000));
        assert_eq!(clock.last_seen_ms(), 200_000);
    }
}

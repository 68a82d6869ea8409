//! Time sources shared by the actors.
//!
//! Liveness is measured on a monotonic clock in milliseconds since the process started,
//! so that wall-clock jumps can never make an agent look stale. Connection actors write
//! their [`ConnectionClock`] on every frame; the heartbeat actor reads it without a
//! message round trip.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Milliseconds on the monotonic clock since the process started.
pub fn monotonic_ms() -> u64 {
    origin().elapsed().as_millis() as u64
}

/// Seconds since the Unix epoch, as a float (the protocol's timestamp format).
pub fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Milliseconds since the Unix epoch (the protocol's message timestamp format).
pub fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Converts a monotonic instant (from [`monotonic_ms`]) to epoch seconds.
pub fn monotonic_to_epoch_secs(at_ms: u64) -> f64 {
    let now = monotonic_ms();
    epoch_secs() - (now.saturating_sub(at_ms)) as f64 / 1000.0
}

/// Liveness timestamps of one connection, written by its actor and read by the
/// heartbeat actor and the registry.
#[derive(Debug)]
pub struct ConnectionClock {
    /// Last frame of any kind received from the agent ([`monotonic_ms`]).
    last_seen_ms: AtomicU64,
    /// Last application frame (message or system request, not a ping answer).
    last_activity_ms: AtomicU64,
    /// Set by the heartbeat actor when the agent is reported inactive; cleared by the
    /// connection actor when activity resumes.
    inactive: AtomicBool,
    /// Round trip of the last answered ping in microseconds (now − the echoed ping
    /// timestamp); `u32::MAX` when none was measured since the heartbeat last read it.
    ping_rtt_us: AtomicU32,
}

impl ConnectionClock {
    /// A clock whose agent was seen and active just now.
    pub fn new() -> Self {
        let now = monotonic_ms();
        Self {
            last_seen_ms: AtomicU64::new(now),
            last_activity_ms: AtomicU64::new(now),
            inactive: AtomicBool::new(false),
            ping_rtt_us: AtomicU32::new(u32::MAX),
        }
    }

    /// Records a sign of life. Returns nothing: the heartbeat actor reads it lazily.
    pub fn seen(&self, now_ms: u64) {
        self.last_seen_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Records the round trip of an answered ping, in seconds. Values outside
    /// 0..1 hour (a wrong echo, a wall-clock step) are ignored.
    pub fn answered_ping(&self, rtt_secs: f64) {
        if (0.0..3600.0).contains(&rtt_secs) {
            self.ping_rtt_us
                .store((rtt_secs * 1e6) as u32, Ordering::Relaxed);
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

    /// Records application activity (which is also a sign of life). Returns true when
    /// this activity ends an inactive period, so the caller can report `agent.active`.
    pub fn active(&self, now_ms: u64) -> bool {
        self.last_seen_ms.store(now_ms, Ordering::Relaxed);
        self.last_activity_ms.store(now_ms, Ordering::Relaxed);
        self.inactive.load(Ordering::Relaxed) && self.inactive.swap(false, Ordering::AcqRel)
    }

    /// Last frame of any kind, in [`monotonic_ms`].
    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }

    /// Last application frame, in [`monotonic_ms`].
    pub fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    /// Whether the agent is currently reported inactive.
    pub fn is_inactive(&self) -> bool {
        self.inactive.load(Ordering::Relaxed)
    }

    /// Marks the agent inactive; returns false if it already was.
    pub fn mark_inactive(&self) -> bool {
        !self.inactive.swap(true, Ordering::AcqRel)
    }
}

impl Default for ConnectionClock {
    fn default() -> Self {
        Self::new()
    }
}

//! Time sources shared by the actors.
//!
//! Liveness is measured on a monotonic clock in milliseconds since the process started,
//! so that wall-clock jumps can never make an agent look stale. The actors that decide
//! on time (the heartbeat, the registry) read it through a [`Clock`], which tests replace
//! with a manual one to reach deadlines without waiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
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

/// The monotonic clock an actor decides by: the process's own, or a manual one that a
/// test advances.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// [`monotonic_ms`].
    #[default]
    Monotonic,
    /// A time that moves only when [`ManualClock::advance`] is called.
    Manual(ManualClock),
}

impl Clock {
    /// Now, in milliseconds on this clock.
    pub fn now_ms(&self) -> u64 {
        match self {
            Self::Monotonic => monotonic_ms(),
            Self::Manual(manual) => manual.now_ms(),
        }
    }
}

/// A clock for tests: starts at a given instant and moves only when told.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock reading `start_ms`.
    pub fn starting_at(start_ms: u64) -> Self {
        Self(Arc::new(AtomicU64::new(start_ms)))
    }

    /// The time it reads.
    pub fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Moves it forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

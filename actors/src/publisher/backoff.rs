//! Retry timing for broker publishers: exponential backoff with jitter, and the
//! OTP-style restart intensity (at most N restarts within T seconds).

use crate::settings::EventsSettings;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The restart intensity of publishers (`events.max_restarts` within
/// `events.restart_window` seconds).
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Most restarts allowed within the window.
    pub max_restarts: u32,
    /// The window, in seconds.
    pub restart_window: f64,
}

impl From<&EventsSettings> for RestartPolicy {
    fn from(events: &EventsSettings) -> Self {
        Self {
            max_restarts: events.max_restarts,
            restart_window: events.restart_window,
        }
    }
}

/// Exponential backoff with "equal jitter": the n-th delay is drawn uniformly from
/// `[d/2, d]` where `d = min(initial * 2^n, max)`, so publishers that lost the same
/// broker do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: f64,
    max: f64,
    /// Failures since the last success.
    attempt: u32,
}

impl Backoff {
    /// Delays start at `initial` seconds and double up to `max` seconds.
    pub fn new(initial: f64, max: f64) -> Self {
        let initial = initial.max(0.001);
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The delay before the next attempt; each call doubles the next one.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = (self.initial * 2f64.powi(self.attempt.min(60) as i32)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_secs_f64(ceiling / 2.0 + ceiling / 2.0 * unit_random())
    }

    /// Failures since the last success.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts over from `initial` (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A uniformly distributed number in `[0, 1)`.
fn unit_random() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// Counts restarts in a sliding window: more than `max_restarts` within `window`
/// means the publisher has failed for good (until the server restarts).
#[derive(Debug, Clone)]
pub struct RestartIntensity {
    max_restarts: u32,
    window: Duration,
    /// When the restarts still inside the window happened, oldest first.
    recent: VecDeque<Instant>,
}

impl RestartIntensity {
    /// At most `max_restarts` restarts within `window`.
    pub fn new(max_restarts: u32, window: Duration) -> Self {
        Self {
            max_restarts,
            window,
            recent: VecDeque::new(),
        }
    }

    /// Records a restart at `now`; returns false when it exceeds the intensity.
    pub fn allow(&mut self, now: Instant) -> bool {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        self.recent.len() <= self.max_restarts as usize
    }

    /// Restarts inside the window now.
    pub fn in_window(&self) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_with_jitter_in_the_upper_half() {
        let mut backoff = Backoff::new(0.1, 1.0);
        let ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0];
        for ceiling in ceilings {
            let delay = backoff.next_delay().as_secs_f64();
            assert!(
                delay >= ceiling / 2.0 - 1e-9 && delay <= ceiling + 1e-9,
                "{delay} not in [{}, {ceiling}]",
                ceiling / 2.0
            );
        }
        backoff.reset();
        assert!(backoff.next_delay().as_secs_f64() <= 0.1 + 1e-9);
    }

    #[test]
    fn jitter_spreads_delays() {
        let delays: std::collections::HashSet<u128> = (0..20)
            .map(|_| Backoff::new(1.0, 1.0).next_delay().as_nanos())
            .collect();
        assert!(delays.len() > 1, "twenty delays were all equal");
    }

    #[test]
    fn restart_intensity_allows_n_restarts_within_the_window_and_forgets_old_ones() {
        let start = Instant::now();
        let mut intensity = RestartIntensity::new(2, Duration::from_secs(10));
        assert!(intensity.allow(start));
        assert!(intensity.allow(start + Duration::from_secs(1)));
        assert!(!intensity.allow(start + Duration::from_secs(2)));
        let mut intensity = RestartIntensity::new(2, Duration::from_secs(10));
        assert!(intensity.allow(start));
        assert!(intensity.allow(start + Duration::from_secs(1)));
        // The first restart left the window.
        assert!(intensity.allow(start + Duration::from_secs(11)));
        assert_eq!(intensity.in_window(), 2);
    }
}

//! The reconnect delays of one agent, carried across connections that did not last,
//! so a server that accepts and then drops at once is not hammered.

use crate::config::ReconnectPolicy;
use std::time::Duration;

/// Where the agent is in its [`ReconnectPolicy`].
pub(crate) struct Backoff {
    policy: ReconnectPolicy,
    delays: Box<dyn Iterator<Item = Duration> + Send + Sync>,
    attempts: usize,
}

impl Backoff {
    pub(crate) fn new(policy: ReconnectPolicy) -> Self {
        Self {
            policy,
            delays: Box::new(policy.delays()),
            attempts: 0,
        }
    }

    /// A connection lasted `lived`: one that lasted at least `max_delay` starts the
    /// delays over; a shorter one carries on where the last reconnection left off.
    pub(crate) fn connection_lasted(&mut self, lived: Duration) {
        if lived >= self.policy.max_delay {
            *self = Self::new(self.policy);
        }
    }

    /// The delay before the next attempt; `None` once `max_attempts` are spent.
    pub(crate) fn next_delay(&mut self) -> Option<Duration> {
        let delay = self.delays.next()?;
        self.attempts += 1;
        Some(delay)
    }

    /// Attempts made since the delays last started over.
    pub(crate) fn attempts(&self) -> usize {
        self.attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ReconnectPolicy {
        ReconnectPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(800),
            factor: 2.0,
            jitter: false,
            max_attempts: Some(5),
        }
    }

    fn millis(backoff: &mut Backoff) -> Option<u128> {
        backoff.next_delay().map(|d| d.as_millis())
    }

    #[test]
    fn connections_that_do_not_last_keep_the_delays_growing() {
        let mut backoff = Backoff::new(policy());
        assert_eq!(millis(&mut backoff), Some(100));
        backoff.connection_lasted(Duration::from_millis(20));
        assert_eq!(millis(&mut backoff), Some(200));
        backoff.connection_lasted(Duration::from_millis(799));
        assert_eq!(millis(&mut backoff), Some(400));
        assert_eq!(millis(&mut backoff), Some(800));
        assert_eq!(millis(&mut backoff), Some(800));
        assert_eq!(backoff.attempts(), 5);
        assert_eq!(millis(&mut backoff), None, "max_attempts spans them too");
    }

    #[test]
    fn a_long_outage_keeps_the_delays_at_the_maximum() {
        let policy = ReconnectPolicy::default();
        let mut backoff = Backoff::new(policy);
        for attempt in 0..10_000 {
            let delay = backoff.next_delay().expect("never gives up by default");
            assert!(delay < 2 * policy.max_delay, "attempt {attempt}: {delay:?}");
        }
    }

    #[test]
    fn a_connection_that_lasted_max_delay_starts_the_delays_over() {
        let mut backoff = Backoff::new(policy());
        for _ in 0..4 {
            backoff.next_delay();
        }
        backoff.connection_lasted(Duration::from_millis(800));
        assert_eq!(backoff.attempts(), 0);
        assert_eq!(millis(&mut backoff), Some(100));
    }
}

//! A connection's budgets: its system requests (`limits.max_requests_per_second`,
//! `request_burst`) and its broadcast copies (`limits.max_broadcast_copies_per_second`,
//! `broadcast_copy_burst`), each a `governor` limiter (GCRA).
//!
//! A broadcast is charged every copy it makes, even one to more agents than the burst
//! holds: such a broadcast goes when the whole burst is there, and the connection's next
//! broadcast waits until its copies have taken their time at the rate. So the sustained
//! rate holds for a fleet of any size, while the burst bounds how many copies one agent
//! can have the workers write back to back (what holds every other agent's messages up).

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::Duration;

/// A limiter of `per_second` a second, `burst` at once, on `clock`.
type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// A budget of `per_second` a second, `burst` at once (each at least 1).
pub(super) fn budget(per_second: u32, burst: u32) -> governor::DefaultDirectRateLimiter {
    RateLimiter::direct(quota(per_second, burst))
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(per_second.max(1)).expect("≥ 1");
    let burst = NonZeroU32::new(burst.max(1)).expect("≥ 1");
    Quota::per_second(rate).allow_burst(burst)
}

/// The copies one connection's broadcasts may make.
pub(super) struct BroadcastBudget<C: Clock = DefaultClock> {
    limiter: Limiter<C>,
    per_second: u32,
    burst: NonZeroU32,
    /// The end of the time an earlier broadcast past the burst takes at the rate: no
    /// broadcast goes before it.
    busy_until: Option<C::Instant>,
}

impl BroadcastBudget {
    /// `per_second` copies a second, `burst` at once.
    pub(super) fn new(per_second: u32, burst: u32) -> Self {
        Self::with_clock(per_second, burst, DefaultClock::default())
    }
}

impl<C: Clock> BroadcastBudget<C> {
    fn with_clock(per_second: u32, burst: u32, clock: C) -> Self {
        Self {
            limiter: RateLimiter::direct_with_clock(quota(per_second, burst), clock),
            per_second: per_second.max(1),
            burst: NonZeroU32::new(burst.max(1)).expect("≥ 1"),
            busy_until: None,
        }
    }

    /// Takes `copies` (zero: nothing to take) if the budget holds them. False, and
    /// nothing taken, when it does not.
    pub(super) fn take(&mut self, copies: u32) -> bool {
        let Some(at_once) = NonZeroU32::new(copies.min(self.burst.get())) else {
            return true;
        };
        let now = self.limiter.clock().now();
        if self.busy_until.is_some_and(|until| now < until) {
            return false;
        }
        if !matches!(self.limiter.check_n(at_once), Ok(Ok(()))) {
            return false;
        }
        self.busy_until = (copies > at_once.get()).then(|| {
            let takes = Duration::from_secs_f64(f64::from(copies) / f64::from(self.per_second));
            now + Nanos::from(takes)
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn budget(
        per_second: u32,
        burst: u32,
    ) -> (BroadcastBudget<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (
            BroadcastBudget::with_clock(per_second, burst, clock.clone()),
            clock,
        )
    }

    #[test]
    fn broadcasts_go_within_the_burst_then_at_the_rate() {
        let (mut budget, clock) = budget(1000, 2000);
        assert!(budget.take(1000));
        assert!(budget.take(1000));
        assert!(!budget.take(1000), "the burst is spent");
        clock.advance(Duration::from_millis(999));
        assert!(!budget.take(1000), "not refilled yet");
        clock.advance(Duration::from_millis(1));
        assert!(budget.take(1000), "a second refills a thousand copies");
    }

    #[test]
    fn a_broadcast_past_the_burst_goes_and_the_next_waits_the_time_its_copies_take() {
        let (mut budget, clock) = budget(1000, 1000);
        assert!(
            budget.take(5000),
            "a fleet larger than the burst can be reached"
        );
        // 5000 copies at 1000 a second: five seconds before another copy goes.
        clock.advance(Duration::from_millis(4999));
        assert!(!budget.take(1));
        clock.advance(Duration::from_millis(1));
        assert!(budget.take(1000), "then the burst, refilled meanwhile");
        assert!(!budget.take(1));
    }

    #[test]
    fn a_refused_broadcast_takes_nothing_of_its_own() {
        let (mut budget, clock) = budget(1000, 1000);
        assert!(budget.take(1000));
        for _ in 0..100 {
            assert!(!budget.take(1000));
        }
        clock.advance(Duration::from_secs(1));
        assert!(budget.take(1000), "refusals did not use the refill");
    }

    #[test]
    fn a_broadcast_to_nobody_costs_nothing() {
        let (mut budget, _clock) = budget(1, 1);
        assert!(budget.take(1));
        assert!(budget.take(0));
        assert!(!budget.take(1));
    }
}

//! Connection metrics kept by the registry, and the snapshot served at `/stats`.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// Counts of events in the last 60 seconds, in one-second buckets.
#[derive(Debug, Clone)]
pub struct RateWindow {
    buckets: [u32; 60],
    /// The second (since start) the newest bucket belongs to.
    current: u64,
}

impl RateWindow {
    fn new() -> Self {
        Self {
            buckets: [0; 60],
            current: 0,
        }
    }

    fn advance(&mut self, second: u64) {
        if second > self.current {
            let gap = (second - self.current).min(60);
            for step in 1..=gap {
                self.buckets[((self.current + step) % 60) as usize] = 0;
            }
            self.current = second;
        }
    }

    /// Counts one occurrence at `second`.
    pub fn record(&mut self, second: u64) {
        self.advance(second);
        self.buckets[(second % 60) as usize] += 1;
    }

    /// Occurrences in the 60 seconds up to `second`.
    pub fn last_minute(&mut self, second: u64) -> u64 {
        self.advance(second);
        self.buckets.iter().map(|&n| u64::from(n)).sum()
    }
}

/// Running totals of the registry.
#[derive(Debug, Clone)]
pub struct Stats {
    started: Instant,
    /// WebSocket connections accepted.
    pub sockets_opened: u64,
    /// `register_agent` requests answered.
    pub registrations_attempted: u64,
    /// Successful registrations.
    pub registrations_succeeded: u64,
    /// Refused registrations.
    pub registrations_failed: u64,
    /// Registrations that took over a live agent id.
    pub takeovers: u64,
    /// Incarnations ended (`agent.disconnected` published).
    pub disconnections: u64,
    /// Incarnations cleaned up (`agent.cleaned_up` published).
    pub cleanups: u64,
    /// Agents declared stale by the heartbeat.
    pub stale_declared: u64,
    /// Disconnections by reason.
    pub disconnections_by_reason: BTreeMap<&'static str, u64>,
    /// Most agents registered at once.
    pub peak_concurrent: usize,
    /// Seconds registered, summed over the incarnations that ended.
    pub connected_secs_total: f64,
    registrations_window: RateWindow,
    cleanups_window: RateWindow,
    stale_window: RateWindow,
    connections_window: RateWindow,
}

impl Stats {
    /// Empty statistics starting now.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            sockets_opened: 0,
            registrations_attempted: 0,
            registrations_succeeded: 0,
            registrations_failed: 0,
            takeovers: 0,
            disconnections: 0,
            cleanups: 0,
            stale_declared: 0,
            disconnections_by_reason: BTreeMap::new(),
            peak_concurrent: 0,
            connected_secs_total: 0.0,
            registrations_window: RateWindow::new(),
            cleanups_window: RateWindow::new(),
            stale_window: RateWindow::new(),
            connections_window: RateWindow::new(),
        }
    }

    fn second(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Records a successful registration with `concurrent` agents now registered.
    pub fn registered(&mut self, concurrent: usize) {
        self.registrations_attempted += 1;
        self.registrations_succeeded += 1;
        self.peak_concurrent = self.peak_concurrent.max(concurrent);
        let second = self.second();
        self.registrations_window.record(second);
    }

    /// Records an agent declared stale.
    pub fn stale(&mut self) {
        self.stale_declared += 1;
        let second = self.second();
        self.stale_window.record(second);
    }

    /// Records a refused registration.
    pub fn refused(&mut self) {
        self.registrations_attempted += 1;
        self.registrations_failed += 1;
    }

    /// Records a WebSocket connection accepted.
    pub fn socket_opened(&mut self) {
        self.sockets_opened += 1;
        let second = self.second();
        self.connections_window.record(second);
    }

    /// Records the end of an incarnation that lasted `connected_secs`.
    pub fn ended(&mut self, reason: &'static str, connected_secs: f64) {
        self.connected_secs_total += connected_secs;
        self.disconnections += 1;
        self.cleanups += 1;
        *self.disconnections_by_reason.entry(reason).or_default() += 1;
        let second = self.second();
        self.cleanups_window.record(second);
    }

    /// A snapshot for `/stats`, with the current state counts.
    pub fn snapshot(
        &mut self,
        registered: usize,
        inactive: usize,
        sockets: usize,
    ) -> StatsSnapshot {
        let second = self.second();
        let attempted = self.registrations_attempted;
        StatsSnapshot {
            uptime_secs: self.started.elapsed().as_secs_f64(),
            open_sockets: sockets,
            registered_agents: registered,
            active_agents: registered - inactive,
            inactive_agents: inactive,
            stale_declared: self.stale_declared,
            stale_per_minute: self.stale_window.last_minute(second),
            total_connections: self.sockets_opened,
            registrations_attempted: attempted,
            successful_registrations: self.registrations_succeeded,
            failed_registrations: self.registrations_failed,
            takeovers: self.takeovers,
            disconnections: self.disconnections,
            cleanups: self.cleanups,
            disconnections_by_reason: self.disconnections_by_reason.clone(),
            peak_concurrent: self.peak_concurrent,
            registrations_per_minute: self.registrations_window.last_minute(second),
            cleanups_per_minute: self.cleanups_window.last_minute(second),
            success_rate: if attempted == 0 {
                100.0
            } else {
                self.registrations_succeeded as f64 * 100.0 / attempted as f64
            },
            connections_per_minute: self.connections_window.last_minute(second),
            average_connection_secs: if self.disconnections == 0 {
                0.0
            } else {
                self.connected_secs_total / self.disconnections as f64
            },
            connected_secs_total: self.connected_secs_total,
            metadata_bytes: 0,
            remembered_agent_ids: 0,
            shutting_down: false,
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

/// Connection metrics at one moment (`GET /stats`).
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    /// Seconds since the registry started.
    pub uptime_secs: f64,
    /// WebSocket connections open now, registered or not.
    pub open_sockets: usize,
    /// Agents registered now.
    pub registered_agents: usize,
    /// Registered agents with recent application activity.
    pub active_agents: usize,
    /// Registered agents without application activity for `activity_timeout`.
    pub inactive_agents: usize,
    /// Agents declared stale since start.
    pub stale_declared: u64,
    /// Agents declared stale in the last minute.
    pub stale_per_minute: u64,
    /// WebSocket connections accepted since start.
    pub total_connections: u64,
    /// `register_agent` requests answered since start.
    pub registrations_attempted: u64,
    /// Successful registrations since start.
    pub successful_registrations: u64,
    /// Refused registrations since start.
    pub failed_registrations: u64,
    /// Takeovers since start.
    pub takeovers: u64,
    /// Incarnations ended since start.
    pub disconnections: u64,
    /// Incarnations cleaned up since start.
    pub cleanups: u64,
    /// Disconnections by reason since start.
    pub disconnections_by_reason: BTreeMap<&'static str, u64>,
    /// Most agents registered at once.
    pub peak_concurrent: usize,
    /// Successful registrations in the last minute.
    pub registrations_per_minute: u64,
    /// Cleanups in the last minute.
    pub cleanups_per_minute: u64,
    /// Successful registrations / attempted, in percent.
    pub success_rate: f64,
    /// WebSocket connections accepted in the last minute.
    pub connections_per_minute: u64,
    /// Mean seconds an ended incarnation was registered.
    pub average_connection_secs: f64,
    /// Seconds registered, summed over the incarnations that ended.
    pub connected_secs_total: f64,
    /// Whether the server is shutting down (it accepts no agents).
    pub shutting_down: bool,
    /// Bytes of registration metadata held (`limits.max_metadata_bytes_total`).
    pub metadata_bytes: usize,
    /// Ids that left whose last incarnation is remembered (`limits.remembered_agent_ids`);
    /// an id that registered again stays counted until it leaves again or is forgotten.
    pub remembered_agent_ids: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_window_forgets_what_is_older_than_a_minute() {
        let mut window = RateWindow::new();
        window.record(0);
        window.record(30);
        window.record(30);
        assert_eq!(window.last_minute(30), 3);
        assert_eq!(window.last_minute(61), 2);
        assert_eq!(window.last_minute(200), 0);
    }
}

/// Ping round trips of the last one to two minutes (two one-minute windows of
/// `hdrhistogram`, three significant digits), kept by the heartbeat actor for
/// `/stats`. Prometheus gets every round trip through `metrics` as well.
#[derive(Debug, Clone)]
pub struct RttHistogram {
    /// The window being filled.
    current: Histogram<u64>,
    /// The window before it.
    previous: Histogram<u64>,
    /// When `current` started.
    current_since: Instant,
}

/// Longest round trip kept, in microseconds (an hour; longer ones are clamped).
const RTT_MAX_US: u64 = 3_600_000_000;

impl Default for RttHistogram {
    fn default() -> Self {
        let window =
            || Histogram::new_with_bounds(1, RTT_MAX_US, 3).expect("1 ≤ low < high, 3 digits");
        Self {
            current: window(),
            previous: window(),
            current_since: Instant::now(),
        }
    }
}

/// How long one window of [`RttHistogram`] lasts.
const RTT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl RttHistogram {
    /// Starts a new window when the current one is a minute old. Called by the owner
    /// once per sweep (and by [`summary`](Self::summary)), not per sample.
    pub fn rotate(&mut self) {
        let age = self.current_since.elapsed();
        if age < RTT_WINDOW {
            return;
        }
        if age >= RTT_WINDOW * 2 {
            self.previous.reset();
        } else {
            std::mem::swap(&mut self.previous, &mut self.current);
        }
        self.current.reset();
        self.current_since = Instant::now();
    }

    /// Records one round trip in the current window.
    pub fn record(&mut self, rtt_us: u32) {
        self.current
            .saturating_record(u64::from(rtt_us).clamp(1, RTT_MAX_US));
    }

    /// Samples in the window and their p50 and p99 in milliseconds (`None` without
    /// samples).
    pub fn summary(&mut self) -> (u64, Option<f64>, Option<f64>) {
        self.rotate();
        let mut both = self.current.clone();
        both.add(&self.previous)
            .expect("windows share their bounds");
        let total = both.len();
        if total == 0 {
            return (0, None, None);
        }
        let ms = |q: f64| Some(both.value_at_quantile(q) as f64 / 1000.0);
        (total, ms(0.50), ms(0.99))
    }
}

#[cfg(test)]
mod rtt_tests {
    use super::RttHistogram;

    #[test]
    fn percentiles_are_within_a_thousandth_of_the_samples() {
        let mut histogram = RttHistogram::default();
        for us in 1..=1000u32 {
            histogram.record(us * 10); // 10 µs .. 10 ms
        }
        let (samples, p50, p99) = histogram.summary();
        assert_eq!(samples, 1000);
        let (p50, p99) = (p50.unwrap(), p99.unwrap());
        assert!((p50 - 5.0).abs() <= 5.0 / 1000.0, "p50 {p50}");
        assert!((p99 - 9.9).abs() <= 9.9 / 1000.0, "p99 {p99}");
    }

    #[test]
    fn an_empty_histogram_has_no_percentiles() {
        assert_eq!(RttHistogram::default().summary(), (0, None, None));
    }
}

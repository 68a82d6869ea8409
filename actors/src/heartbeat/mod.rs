//! The heartbeat actor: pings silent agents, declares the unresponsive ones stale, and
//! tracks the inactive state.
//!
//! It runs on an arbiter of its own and keeps a timer wheel (a sorted map from due
//! tick to the sessions due then), so each tick touches only the agents whose deadline
//! has come, never the whole fleet. An agent's deadline is the earliest of: its next
//! ping (`last_seen + interval`), its ping's expiry (`pinged_at + ping_timeout`), its
//! `agent_timeout`, and its `activity_timeout`. Liveness is read from each
//! connection's [`ConnectionClock`], so frames never cost a message to this actor.
//!
//! Guarantee (PROTOCOL.md §4): a silent agent is pinged at most one tick after
//! `last_seen + interval` and declared stale at most one tick after the ping's
//! `ping_timeout`: within `interval + ping_timeout + 2 ticks`, under the contract's
//! `+ 1 s` for any tick up to 0.5 s. An answer (any frame) before the ping expires
//! clears it, so an agent that answers in time is never declared stale.
//!
//! It knows nothing of the registry: it is built with the [`Recipient`] of its
//! [`Verdict`]s. Time comes from a [`Clock`]; with a manual clock it sweeps only when
//! sent [`Tick`], so tests reach deadlines without waiting.

use crate::clock::{Clock, ManualClock};
use crate::liveness::{ConnectionClock, Liveness, SessionId};
use crate::outbound::{Batches, OutFrame, Outbox};
use crate::protocol;
use crate::stats::RttHistogram;
use actix::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The heartbeat's findings about one tracked agent, sent to the recipient it was
/// built with (the registry).
#[derive(Message, Debug, Clone, PartialEq)]
#[rtype(result = "()")]
pub enum Verdict {
    /// The agent is stale (it is no longer tracked).
    Stale {
        /// The connection.
        session_id: SessionId,
        /// Ping unanswered, or silent past `agent_timeout`.
        reason: StaleReason,
        /// Last frame received, on the heartbeat's clock.
        last_seen_ms: u64,
    },
    /// The agent has had no application frame for `activity_timeout`.
    Inactive {
        /// The connection.
        session_id: SessionId,
        /// Its last application frame, on the heartbeat's clock: if the connection's
        /// clock shows a later one when the verdict arrives, activity has resumed and
        /// the verdict is void.
        last_activity_ms: u64,
        /// Seconds since that frame.
        inactive_secs: f64,
    },
}

/// Sweeps the due agents now (sent by the heartbeat's own timer, or by a test that
/// drives a manual clock).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Tick;

/// Why the heartbeat declared an agent stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StaleReason {
    /// A ping went unanswered for `ping_timeout`.
    PingTimeout,
    /// The agent was silent for `agent_timeout`.
    AgentTimeout,
}

impl StaleReason {
    /// The `reason` string of `agent.stale`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PingTimeout => "ping_timeout",
            Self::AgentTimeout => "agent_timeout",
        }
    }
}

/// Starts or stops watching a registered agent (sent by the registry).
#[derive(Message)]
#[rtype(result = "()")]
pub enum Watch {
    /// Starts watching an agent that just registered.
    Track {
        /// Its connection.
        session_id: SessionId,
        /// Its id (written into pings).
        agent_id: Arc<str>,
        /// Its liveness clock.
        clock: Arc<ConnectionClock>,
        /// Where pings go.
        outbox: Outbox,
    },
    /// Stops watching an agent (its incarnation ended).
    Untrack {
        /// Its connection.
        session_id: SessionId,
    },
}

/// Counters of the heartbeat actor.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, MessageResponse)]
pub struct HeartbeatStats {
    /// Answered pings measured over the last one to two minutes.
    pub ping_rtt_samples: u64,
    /// Median round trip of those pings (ping sent → answer read), milliseconds.
    pub ping_rtt_p50_ms: Option<f64>,
    /// 99th percentile of the same.
    pub ping_rtt_p99_ms: Option<f64>,
    /// Agents watched now.
    pub tracked: usize,
    /// Pings sent since start.
    pub pings_sent: u64,
    /// Agents declared stale since start.
    pub stale_declared: u64,
    /// Agents reported inactive since start.
    pub inactive_reported: u64,
}

/// Asks for the heartbeat's counters.
#[derive(Message)]
#[rtype(result = "HeartbeatStats")]
pub struct GetHeartbeatStats;

struct Tracked {
    /// Its id, for pings (shared with the registry's table).
    agent_id: Arc<str>,
    clock: Arc<ConnectionClock>,
    outbox: Outbox,
    /// When the outstanding ping was sent, if one is.
    pinged_at: Option<u64>,
    /// The last-activity time of the inactive verdict sent, if one was and no activity
    /// came since.
    reported_idle_at: Option<u64>,
    /// Distinguishes this tracking from an earlier one of the same session in the wheel.
    generation: u32,
}

/// The heartbeat actor.
pub struct Heartbeat {
    rules: Liveness,
    verdicts: Recipient<Verdict>,
    clock: Clock,
    agents: HashMap<SessionId, Tracked>,
    /// Due tick → sessions (with generation) to look at then.
    wheel: BTreeMap<u64, Vec<(SessionId, u32)>>,
    next_generation: u32,
    stats: HeartbeatStats,
    /// Round trips of answered pings.
    ping_rtt: RttHistogram,
    /// A buffer for the text of a tick's pings, reused.
    ping_text: Vec<u8>,
}

impl Heartbeat {
    /// A heartbeat applying `rules` on the process's monotonic clock, sweeping every
    /// `rules.tick`, and sending its verdicts to `verdicts`.
    pub fn new(rules: Liveness, verdicts: Recipient<Verdict>) -> Self {
        Self {
            rules,
            verdicts,
            clock: Clock::Monotonic,
            agents: HashMap::new(),
            wheel: BTreeMap::new(),
            next_generation: 0,
            stats: HeartbeatStats::default(),
            ping_rtt: RttHistogram::default(),
            ping_text: Vec::new(),
        }
    }

    /// The same heartbeat on a manual clock: it sweeps only when sent [`Tick`].
    pub fn with_manual_clock(mut self, clock: ManualClock) -> Self {
        self.clock = Clock::Manual(clock);
        self
    }

    fn schedule(&mut self, session_id: SessionId, generation: u32, at_ms: u64) {
        let tick = at_ms.div_ceil(self.rules.tick);
        self.wheel
            .entry(tick)
            .or_default()
            .push((session_id, generation));
    }

    fn on_tick(&mut self) {
        let now = self.clock.now_ms();
        let now_tick = now / self.rules.tick;
        self.ping_rtt.rotate();
        let later = self.wheel.split_off(&(now_tick + 1));
        let due = std::mem::replace(&mut self.wheel, later);
        // The tick's pings go out in one message per worker thread, stamped once.
        let mut pings = Batches::default();
        let stamp = crate::clock::epoch_secs();
        for (session_id, generation) in due.into_values().flatten() {
            self.examine(session_id, generation, now, stamp, &mut pings);
        }
        pings.send();
    }

    /// Looks at one due agent: ping (stamped `stamp`, epoch seconds), stale, inactive,
    /// and its next deadline.
    fn examine(
        &mut self,
        session_id: SessionId,
        generation: u32,
        now: u64,
        stamp: f64,
        pings: &mut Batches,
    ) {
        let t = self.rules;
        let Some(agent) = self.agents.get_mut(&session_id) else {
            return;
        };
        if agent.generation != generation {
            return;
        }
        let last_seen = agent.clock.last_seen_ms();
        if now.saturating_sub(last_seen) >= t.agent_timeout {
            return self.stale(session_id, StaleReason::AgentTimeout, last_seen);
        }
        if let Some(pinged_at) = agent.pinged_at {
            if last_seen >= pinged_at {
                agent.pinged_at = None;
                if let Some(rtt_us) = agent.clock.take_ping_rtt_us() {
                    self.ping_rtt.record(rtt_us);
                    crate::metrics::ping_answered(u64::from(rtt_us));
                }
            } else if now >= pinged_at + t.ping_timeout {
                return self.stale(session_id, StaleReason::PingTimeout, last_seen);
            }
        }
        if agent.pinged_at.is_none() && now.saturating_sub(last_seen) >= t.interval {
            protocol::write_ping_frame(&mut self.ping_text, &agent.agent_id, stamp);
            pings.push(&agent.outbox, OutFrame::text_bytes(&self.ping_text));
            agent.pinged_at = Some(now);
            self.stats.pings_sent += 1;
        }
        let last_activity = agent.clock.last_activity_ms();
        let reported = agent.reported_idle_at == Some(last_activity);
        if !reported && t.is_idle(last_activity, now) {
            agent.reported_idle_at = Some(last_activity);
            self.stats.inactive_reported += 1;
            self.verdicts.do_send(Verdict::Inactive {
                session_id,
                last_activity_ms: last_activity,
                inactive_secs: now.saturating_sub(last_activity) as f64 / 1000.0,
            });
        }
        let mut next = last_seen + t.agent_timeout;
        next = next.min(match agent.pinged_at {
            Some(pinged_at) => pinged_at + t.ping_timeout,
            None => last_seen + t.interval,
        });
        if agent.reported_idle_at != Some(last_activity) {
            next = next.min(last_activity + t.activity_timeout);
        }
        self.schedule(session_id, generation, next.max(now + 1));
    }

    fn stale(&mut self, session_id: SessionId, reason: StaleReason, last_seen_ms: u64) {
        self.agents.remove(&session_id);
        self.stats.stale_declared += 1;
        self.verdicts.do_send(Verdict::Stale {
            session_id,
            reason,
            last_seen_ms,
        });
    }
}

impl Actor for Heartbeat {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Clock::Monotonic = self.clock {
            let tick = std::time::Duration::from_millis(self.rules.tick);
            ctx.run_interval(tick, |act, _ctx| act.on_tick());
        }
    }
}

impl Handler<Tick> for Heartbeat {
    type Result = ();

    fn handle(&mut self, _msg: Tick, _ctx: &mut Self::Context) {
        self.on_tick();
    }
}

impl Handler<Watch> for Heartbeat {
    type Result = ();

    fn handle(&mut self, msg: Watch, _ctx: &mut Self::Context) {
        match msg {
            Watch::Track {
                session_id,
                agent_id,
                clock,
                outbox,
            } => {
                self.next_generation = self.next_generation.wrapping_add(1);
                let generation = self.next_generation;
                let t = self.rules;
                let first =
                    clock.last_seen_ms() + t.interval.min(t.agent_timeout).min(t.activity_timeout);
                self.agents.insert(
                    session_id,
                    Tracked {
                        agent_id,
                        clock,
                        outbox,
                        pinged_at: None,
                        reported_idle_at: None,
                        generation,
                    },
                );
                self.schedule(session_id, generation, first);
            }
            Watch::Untrack { session_id } => {
                self.agents.remove(&session_id);
            }
        }
    }
}

impl Handler<GetHeartbeatStats> for Heartbeat {
    type Result = HeartbeatStats;

    fn handle(&mut self, _msg: GetHeartbeatStats, _ctx: &mut Self::Context) -> HeartbeatStats {
        let (samples, p50, p99) = self.ping_rtt.summary();
        HeartbeatStats {
            tracked: self.agents.len(),
            ping_rtt_samples: samples,
            ping_rtt_p50_ms: p50,
            ping_rtt_p99_ms: p99,
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests;

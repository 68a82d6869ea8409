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

use crate::clock::{monotonic_ms, ConnectionClock};
use crate::connection::SessionId;
use crate::outbound::{Outbox, PushError};
use crate::protocol;
use crate::registry::{Registry, Verdict};
use crate::settings::{secs, HeartbeatSettings};
use crate::stats::RttHistogram;
use actix::prelude::*;
use bytestring::ByteString;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Why the heartbeat declared an agent stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Starts watching a registered agent.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Track {
    /// Its connection.
    pub session_id: SessionId,
    /// Its id (written into pings).
    pub agent_id: Arc<str>,
    /// Its liveness clock.
    pub clock: Arc<ConnectionClock>,
    /// Where pings go.
    pub outbox: Outbox,
}

/// Stops watching an agent (its incarnation ended).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Untrack {
    /// Its connection.
    pub session_id: SessionId,
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
    ping: protocol::PingTemplate,
    clock: Arc<ConnectionClock>,
    outbox: Outbox,
    /// When the outstanding ping was sent, if one is.
    pinged_at: Option<u64>,
    /// Distinguishes this tracking from an earlier one of the same session in the wheel.
    generation: u32,
}

/// Timeouts in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    interval: u64,
    ping_timeout: u64,
    agent_timeout: u64,
    activity_timeout: u64,
    tick: u64,
}

/// The heartbeat actor.
pub struct Heartbeat {
    timeouts: Timeouts,
    registry: Addr<Registry>,
    agents: HashMap<SessionId, Tracked>,
    /// Due tick → sessions (with generation) to look at then.
    wheel: BTreeMap<u64, Vec<(SessionId, u32)>>,
    next_generation: u32,
    stats: HeartbeatStats,
    /// Round trips of answered pings.
    ping_rtt: RttHistogram,
}

fn millis(seconds: f64) -> u64 {
    secs(seconds).as_millis() as u64
}

impl Heartbeat {
    /// A heartbeat reporting to `registry`.
    pub fn new(settings: &HeartbeatSettings, registry: Addr<Registry>) -> Self {
        Self {
            timeouts: Timeouts {
                interval: millis(settings.interval),
                ping_timeout: millis(settings.ping_timeout),
                agent_timeout: millis(settings.agent_timeout),
                activity_timeout: millis(settings.activity_timeout),
                tick: millis(settings.tick).max(1),
            },
            registry,
            agents: HashMap::new(),
            wheel: BTreeMap::new(),
            next_generation: 0,
            stats: HeartbeatStats::default(),
            ping_rtt: RttHistogram::default(),
        }
    }

    fn schedule(&mut self, session_id: SessionId, generation: u32, at_ms: u64) {
        let tick = at_ms.div_ceil(self.timeouts.tick);
        self.wheel
            .entry(tick)
            .or_default()
            .push((session_id, generation));
    }

    fn on_tick(&mut self) {
        let now = monotonic_ms();
        let now_tick = now / self.timeouts.tick;
        self.ping_rtt.rotate();
        let later = self.wheel.split_off(&(now_tick + 1));
        let due = std::mem::replace(&mut self.wheel, later);
        for (session_id, generation) in due.into_values().flatten() {
            self.examine(session_id, generation, now);
        }
    }

    /// Looks at one due agent: ping, stale, inactive, and its next deadline.
    fn examine(&mut self, session_id: SessionId, generation: u32, now: u64) {
        let t = self.timeouts;
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
                }
            } else if now >= pinged_at + t.ping_timeout {
                return self.stale(session_id, StaleReason::PingTimeout, last_seen);
            }
        }
        if agent.pinged_at.is_none() && now.saturating_sub(last_seen) >= t.interval {
            let ping = ByteString::from(agent.ping.frame());
            match agent.outbox.push(ping) {
                Ok(()) => {
                    agent.pinged_at = Some(now);
                    self.stats.pings_sent += 1;
                }
                Err(PushError::Full) => {
                    self.agents.remove(&session_id);
                    self.registry.do_send(Verdict::SlowConsumer { session_id });
                    return;
                }
                Err(PushError::Closed) => {} // The connection is ending; the registry hears of it.
            }
        }
        let last_activity = agent.clock.last_activity_ms();
        if !agent.clock.is_inactive()
            && now.saturating_sub(last_activity) >= t.activity_timeout
            && agent.clock.mark_inactive()
        {
            self.stats.inactive_reported += 1;
            self.registry.do_send(Verdict::Inactive {
                session_id,
                inactive_secs: now.saturating_sub(last_activity) as f64 / 1000.0,
            });
        }
        let mut next = last_seen + t.agent_timeout;
        next = next.min(match agent.pinged_at {
            Some(pinged_at) => pinged_at + t.ping_timeout,
            None => last_seen + t.interval,
        });
        if !agent.clock.is_inactive() {
            next = next.min(last_activity + t.activity_timeout);
        }
        self.schedule(session_id, generation, next.max(now + 1));
    }

    fn stale(&mut self, session_id: SessionId, reason: StaleReason, last_seen_ms: u64) {
        self.agents.remove(&session_id);
        self.stats.stale_declared += 1;
        self.registry.do_send(Verdict::Stale {
            session_id,
            reason,
            last_seen_ms,
        });
    }
}

impl Actor for Heartbeat {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let tick = std::time::Duration::from_millis(self.timeouts.tick);
        ctx.run_interval(tick, |act, _ctx| act.on_tick());
    }
}

impl Handler<Track> for Heartbeat {
    type Result = ();

    fn handle(&mut self, msg: Track, _ctx: &mut Self::Context) {
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let t = self.timeouts;
        let first =
            msg.clock.last_seen_ms() + t.interval.min(t.agent_timeout).min(t.activity_timeout);
        self.agents.insert(
            msg.session_id,
            Tracked {
                ping: protocol::PingTemplate::new(&msg.agent_id),
                clock: msg.clock,
                outbox: msg.outbox,
                pinged_at: None,
                generation,
            },
        );
        self.schedule(msg.session_id, generation, first);
    }
}

impl Handler<Untrack> for Heartbeat {
    type Result = ();

    fn handle(&mut self, msg: Untrack, _ctx: &mut Self::Context) {
        self.agents.remove(&msg.session_id);
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

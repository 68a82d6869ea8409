//! In-process tests of the heartbeat on a manual clock: pings, stale deadlines and
//! inactivity are reached by advancing the clock and sending [`Tick`], without waiting.

use super::*;
use crate::outbound::OutFrame;
use crate::testing::{json_of, take, Collector};
use serde_json::Value;

const START: u64 = 1_000_000;

fn rules() -> Liveness {
    Liveness {
        interval: 5_000,
        ping_timeout: 3_000,
        agent_timeout: 60_000,
        activity_timeout: 20_000,
        tick: 100,
    }
}

struct Harness {
    heartbeat: Addr<Heartbeat>,
    verdicts: Addr<Collector<Verdict>>,
    clock: ManualClock,
}

struct Watched {
    clock: Arc<ConnectionClock>,
    frames: Addr<Collector<OutFrame>>,
}

impl Watched {
    /// The pings received so far.
    async fn pings(&self) -> Vec<Value> {
        crate::outbound::relay::delivered().await;
        take(&self.frames).await.iter().map(json_of).collect()
    }
}

impl Harness {
    fn new(rules: Liveness) -> Self {
        let verdicts = Collector::start_new();
        let clock = ManualClock::starting_at(START);
        let heartbeat = Heartbeat::new(rules, verdicts.clone().recipient())
            .with_manual_clock(clock.clone())
            .start();
        Self {
            heartbeat,
            verdicts,
            clock,
        }
    }

    async fn track(&self, session_id: SessionId) -> Watched {
        let clock = Arc::new(ConnectionClock::starting_at(self.clock.now_ms()));
        let frames = Collector::start_new();
        let outbox = Outbox::forwarding_to(frames.clone().recipient());
        let watch = Watch::Track {
            session_id,
            agent_id: format!("agent-{session_id}").into(),
            clock: clock.clone(),
            outbox,
        };
        self.heartbeat.send(watch).await.unwrap();
        Watched { clock, frames }
    }

    /// Advances the clock by `ms` one tick at a time, sweeping after each, and returns
    /// the verdicts made.
    async fn run_for(&self, ms: u64) -> Vec<Verdict> {
        let tick = rules().tick;
        for _ in 0..ms.div_ceil(tick) {
            self.clock.advance(tick);
            self.heartbeat.send(Tick).await.unwrap();
        }
        take(&self.verdicts).await
    }
}

#[actix::test]
async fn a_silent_agent_is_pinged_one_interval_after_its_last_frame() {
    let h = Harness::new(rules());
    let agent = h.track(1).await;
    assert!(h.run_for(4_900).await.is_empty());
    assert!(agent.pings().await.is_empty());
    h.run_for(100).await;
    let pings = agent.pings().await;
    assert_eq!(pings.len(), 1);
    assert_eq!(pings[0]["command"], "ping_agent");
    assert_eq!(pings[0]["agent_id"], "agent-1");
}

#[actix::test]
async fn an_unanswered_ping_makes_the_agent_stale_after_ping_timeout() {
    let h = Harness::new(rules());
    let _agent = h.track(1).await;
    assert!(h.run_for(5_000 + 2_900).await.is_empty());
    let verdicts = h.run_for(100).await;
    let expected = Verdict::Stale {
        session_id: 1,
        reason: StaleReason::PingTimeout,
        last_seen_ms: START,
    };
    assert_eq!(verdicts, [expected]);
    // Declared once: it is no longer tracked.
    assert!(h.run_for(10_000).await.is_empty());
    let stats = h.heartbeat.send(GetHeartbeatStats).await.unwrap();
    assert_eq!((stats.tracked, stats.stale_declared), (0, 1));
}

#[actix::test]
async fn an_agent_that_answers_its_pings_is_never_stale() {
    let h = Harness::new(rules());
    let agent = h.track(1).await;
    let mut verdicts = Vec::new();
    for _ in 0..10 {
        verdicts.extend(h.run_for(5_000).await);
        assert_eq!(agent.pings().await.len(), 1);
        verdicts.extend(h.run_for(1_000).await); // The answer takes a second.
        agent.clock.seen(h.clock.now_ms());
    }
    // Only its lack of application frames is reported.
    assert!(matches!(&verdicts[..], [Verdict::Inactive { .. }]));
}

#[actix::test]
async fn an_agent_silent_past_agent_timeout_is_stale_without_a_ping() {
    let quick = Liveness {
        agent_timeout: 2_000,
        ..rules()
    };
    let h = Harness::new(quick);
    let agent = h.track(1).await;
    let verdicts = h.run_for(2_000).await;
    assert!(matches!(
        &verdicts[..],
        [Verdict::Stale {
            reason: StaleReason::AgentTimeout,
            ..
        }]
    ));
    assert!(agent.pings().await.is_empty());
}

#[actix::test]
async fn inactivity_is_reported_once_per_idle_period() {
    let h = Harness::new(rules());
    let agent = h.track(1).await;
    let mut reports = Vec::new();
    // Pings are answered; no application frame comes.
    for _ in 0..10 {
        let verdicts = h.run_for(5_000).await;
        agent.clock.seen(h.clock.now_ms());
        reports.extend(verdicts);
    }
    assert!(matches!(
        &reports[..],
        [Verdict::Inactive {
            last_activity_ms: START,
            ..
        }]
    ));
    // Activity ends the period; a new silence is reported again.
    agent.clock.active(h.clock.now_ms());
    let resumed_at = h.clock.now_ms();
    let mut reports = Vec::new();
    for _ in 0..5 {
        reports.extend(h.run_for(5_000).await);
        agent.clock.seen(h.clock.now_ms());
    }
    assert!(matches!(
        &reports[..],
        [Verdict::Inactive { last_activity_ms, .. }] if *last_activity_ms == resumed_at
    ));
}

#[actix::test]
async fn an_untracked_agent_gets_no_verdict() {
    let h = Harness::new(rules());
    let _agent = h.track(1).await;
    let untrack = Watch::Untrack { session_id: 1 };
    h.heartbeat.send(untrack).await.unwrap();
    assert!(h.run_for(70_000).await.is_empty());
}

#[actix::test]
async fn a_retracked_session_is_judged_by_its_new_clock_only() {
    let h = Harness::new(rules());
    let _old = h.track(1).await;
    h.run_for(4_000).await;
    let _new = h.track(1).await;
    // The old tracking's deadlines (ping at 5 s, stale at 8 s) must not apply: the new
    // one is pinged at 9 s and stale at 12 s.
    assert!(h.run_for(7_900).await.is_empty());
    let verdicts = h.run_for(100).await;
    assert!(
        matches!(&verdicts[..], [Verdict::Stale { last_seen_ms, .. }] if *last_seen_ms == START + 4_000)
    );
}

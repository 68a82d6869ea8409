//! Producing lifecycle events for the broker tests, and comparing what a broker
//! delivered with what the SSE stream showed.
//!
//! - [`scenario`]: agents register, exchange messages, disconnect, unregister, get
//!   taken over (force_reconnect) and go stale — every kind of agent event.
//! - [`Flow`]: a steady stream of events in the background (agents registering and
//!   leaving in turn, several incarnations per agent id) while a test breaks things.
//! - [`assert_same_per_agent`]: the broker delivered the SSE stream's events, the same
//!   documents, in the same per-agent order, with no gap in any `seq`.

use super::brokers::{Collector, Received};
use super::{agent_events, direct, Agent, TestServer};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Heartbeat settings under which a silent agent goes stale within about 2 s.
pub const SHORT_HEARTBEAT: [(&str, &str); 3] = [
    ("TETHER__HEARTBEAT__INTERVAL", "1"),
    ("TETHER__HEARTBEAT__PING_TIMEOUT", "0.5"),
    ("TETHER__HEARTBEAT__AGENT_TIMEOUT", "3"),
];

/// Agents of [`scenario`].
pub const SCENARIO_AGENTS: [&str; 4] = ["alice", "bob", "carol", "dave"];

fn is_cleaned_up(event: &Value, agent: &str, incarnation: u64) -> bool {
    event["type"] == "agent.cleaned_up"
        && event["subject"] == agent
        && event["data"]["incarnation"] == incarnation
}

/// Waits on the SSE collector until every `(agent, incarnation)` is cleaned up.
pub async fn wait_cleaned_up(sse: &mut Collector, ends: &[(String, u64)]) {
    let missing = |received: &[Received]| {
        ends.iter()
            .filter(|(agent, inc)| {
                !received
                    .iter()
                    .any(|r| is_cleaned_up(&r.event, agent, *inc))
            })
            .map(|(agent, inc)| format!("{agent}#{inc}"))
            .collect::<Vec<_>>()
    };
    sse.until(
        super::brokers::DRAIN_DEADLINE,
        |r| missing(r).is_empty(),
        |r| format!("no agent.cleaned_up yet for {:?}", missing(r)),
    )
    .await;
}

/// Runs the scenario (the server needs [`SHORT_HEARTBEAT`]) and returns, once the SSE
/// stream has shown every incarnation's end, the SSE events of [`SCENARIO_AGENTS`].
pub async fn scenario(server: &TestServer, sse: &mut Collector) -> Vec<Value> {
    let url = server.ws_url();
    let (mut alice, _) = Agent::register(&url, "alice").await;
    let (mut bob, _) = Agent::register(&url, "bob").await;
    alice.send(direct("bob", json!({"text": "hi bob"}))).await;
    bob.wait_for(|f| f["type"] == "message").await;
    bob.send(direct("alice", json!({"text": "hi alice"}))).await;
    alice.wait_for(|f| f["type"] == "message").await;
    alice.close().await;
    let bye = bob
        .request(json!({"type":"system_request","command":"unregister_agent"}))
        .await;
    assert_eq!(bye["success"], true, "{bye}");
    bob.closed().await;

    let (mut carol, _) = Agent::register(&url, "carol").await;
    let mut carol2 = Agent::connect(&url).await;
    let taken = carol2
        .request(json!({"type":"system_request","command":"register_agent",
                        "agent_id":"carol","force_reconnect":true}))
        .await;
    assert_eq!(taken["success"], true, "{taken}");
    carol.closed().await;
    carol2.close().await;

    // Dave never answers ping_agent: the heartbeat declares him stale.
    let (dave, _) = Agent::register(&url, "dave").await;
    let ends: Vec<(String, u64)> = [
        ("alice", 1),
        ("bob", 1),
        ("carol", 1),
        ("carol", 2),
        ("dave", 1),
    ]
    .iter()
    .map(|(a, i)| (a.to_string(), *i))
    .collect();
    wait_cleaned_up(sse, &ends).await;
    drop(dave);

    let events: Vec<Value> = sse
        .events()
        .into_iter()
        .filter(|e| {
            SCENARIO_AGENTS.contains(&e["subject"].as_str().unwrap_or_default())
                && e["type"].as_str().unwrap_or_default().starts_with("agent.")
        })
        .collect();
    let reasons: HashSet<&str> = events
        .iter()
        .filter(|e| e["type"] == "agent.disconnected")
        .filter_map(|e| e["data"]["reason"].as_str())
        .collect();
    for reason in ["client_closed", "unregistered", "replaced", "stale"] {
        assert!(
            reasons.contains(reason),
            "no disconnection for {reason}: {events:?}"
        );
    }
    for kind in [
        "agent.registered",
        "agent.replaced",
        "agent.stale",
        "agent.cleaned_up",
    ] {
        assert!(events.iter().any(|e| e["type"] == kind), "no {kind} event");
    }
    events
}

/// Ids of `events`.
pub fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts that `broker` holds every SSE event of `agents`, as the same documents, in
/// the same per-agent order, with `seq` running 1, 2, 3... in every incarnation and
/// nothing else for those agents. Returns how many duplicates (same id again, which
/// at-least-once delivery allows) it saw.
pub fn assert_same_per_agent(sse: &[Value], broker: &[Value], agents: &[&str]) -> usize {
    let mut duplicates = 0;
    for agent in agents {
        let of = |events: &[Value]| -> Vec<Value> {
            events
                .iter()
                .filter(|e| {
                    e["subject"] == *agent
                        && e["type"].as_str().unwrap_or_default().starts_with("agent.")
                })
                .cloned()
                .collect()
        };
        let expected = of(sse);
        let mut seen = HashSet::new();
        let mut delivered = Vec::new();
        for event in of(broker) {
            if seen.insert(event["id"].as_str().unwrap().to_owned()) {
                delivered.push(event);
            } else {
                duplicates += 1;
            }
        }
        assert_eq!(
            agent_events(&delivered, agent),
            agent_events(&expected, agent),
            "the broker's events of {agent} (left) differ from the SSE stream's (right)"
        );
        for (got, want) in delivered.iter().zip(&expected) {
            assert_eq!(got, want, "the broker changed an event of {agent}");
        }
        let mut next_seq: HashMap<u64, u64> = HashMap::new();
        for (kind, incarnation, seq) in agent_events(&delivered, agent) {
            if incarnation == 0 {
                continue;
            }
            let want = next_seq.entry(incarnation).or_insert(1);
            assert_eq!(
                seq, *want,
                "gap in {agent}#{incarnation}: {kind} has seq {seq}, expected {want}"
            );
            *want += 1;
        }
    }
    duplicates
}

/// Agents registering and leaving in turn, in the background, until stopped. Each
/// cycle takes an id (round robin), registers it (`force_reconnect`, so a late
/// cleanup of the previous incarnation never refuses it), and closes: a close frame,
/// then the socket is dropped.
pub struct Flow {
    stop: Arc<AtomicBool>,
    cycles: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<HashMap<String, u64>>,
}

impl Flow {
    /// Starts cycling through `agents` on `server`.
    pub fn start(server: &TestServer, agents: &[&str]) -> Self {
        let url = server.ws_url();
        let agents: Vec<String> = agents.iter().map(|a| a.to_string()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let (count, cycles) = watch::channel(0u64);
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut last = HashMap::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = &agents[(n as usize) % agents.len()];
                    let mut agent = Agent::connect(&url).await;
                    let response = agent
                        .request(json!({"type":"system_request","command":"register_agent",
                                        "agent_id": id, "force_reconnect": true}))
                        .await;
                    assert_eq!(response["success"], true, "{response}");
                    last.insert(id.clone(), response["incarnation"].as_u64().unwrap());
                    // Close frame, then hang up without waiting for the server's
                    // side of the close handshake.
                    let _ = agent.raw().close(None).await;
                    agent.abort();
                    n += 1;
                    count.send_replace(n);
                }
                last
            })
        };
        Self { stop, cycles, task }
    }

    /// Cycles completed so far.
    pub fn cycles(&self) -> u64 {
        *self.cycles.borrow()
    }

    /// Waits until `more` further cycles have completed.
    pub async fn wait_cycles(&mut self, more: u64) {
        let target = self.cycles() + more;
        tokio::time::timeout(
            Duration::from_secs(60),
            self.cycles.wait_for(|n| *n >= target),
        )
        .await
        .expect("the flow of agents stalled")
        .expect("the flow of agents stopped");
    }

    /// Stops and returns each agent id's last incarnation.
    pub async fn stop(self) -> Vec<(String, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let last = self.task.await.expect("the flow of agents failed");
        let mut ends: Vec<_> = last.into_iter().collect();
        ends.sort();
        ends
    }
}

/// Agent events of `agents` among the SSE events.
pub fn events_of(sse: &Collector, agents: &[&str]) -> Vec<Value> {
    sse.events()
        .into_iter()
        .filter(|e| {
            agents.contains(&e["subject"].as_str().unwrap_or_default())
                && e["type"].as_str().unwrap_or_default().starts_with("agent.")
        })
        .collect()
}

/// Starts a server with `env` (owned pairs, as the broker tests build them) plus the
/// short heartbeat of [`SHORT_HEARTBEAT`].
pub fn start_with_short_heartbeat(env: &[(String, String)]) -> TestServer {
    let mut pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    pairs.extend(SHORT_HEARTBEAT);
    TestServer::start(&pairs)
}

/// Agents of the outage scenario.
pub const OUTAGE_AGENTS: [&str; 3] = ["flow-a", "flow-b", "flow-c"];

/// A broker outage in progress: events keep flowing while the broker is unreachable.
pub struct Outage {
    sse: Collector,
    flow: Flow,
    /// The publisher's `/health` check once it was buffering during the outage.
    pub during: Value,
}

impl Outage {
    /// Starts the outage scenario every broker test runs: agents cycle, the consumer
    /// sees the first events, `cut` makes the broker unreachable, and the publisher
    /// reports it disconnected and buffers (health `warning`) while events keep coming.
    pub async fn begin(
        server: &TestServer,
        publisher: &str,
        consumer: &mut Collector,
        cut: impl FnOnce(),
    ) -> Self {
        use super::brokers::{sse, wait_publisher};
        use super::DEADLINE;
        let sse = sse(server).await;
        let mut flow = Flow::start(server, &OUTAGE_AGENTS);
        flow.wait_cycles(10).await;
        consumer
            .until(
                DEADLINE,
                |r| r.len() >= 10,
                |r| format!("{} events", r.len()),
            )
            .await;
        cut();
        wait_publisher(server, publisher, DEADLINE, "disconnected", |c| {
            c["connected"] == false
        })
        .await;
        flow.wait_cycles(100).await;
        let during = wait_publisher(server, publisher, DEADLINE, "buffering", |c| {
            c["buffered"].as_u64().unwrap() > 0
        })
        .await;
        assert_eq!(during["status"], "warning", "{during}");
        Self { sse, flow, during }
    }

    /// Ends the outage: `restore` brings the broker back, the agents stop, and every
    /// event the SSE stream saw must reach the consumer in the same per-agent order
    /// with nothing dropped. Returns the publisher's `/health` check after the drain.
    pub async fn end(
        mut self,
        server: &TestServer,
        publisher: &str,
        consumer: &mut Collector,
        restore: impl FnOnce(),
    ) -> Value {
        use super::brokers::{wait_publisher, DRAIN_DEADLINE};
        use super::DEADLINE;
        restore();
        self.flow.wait_cycles(10).await;
        let ends = self.flow.stop().await;
        wait_cleaned_up(&mut self.sse, &ends).await;
        let expected = events_of(&self.sse, &OUTAGE_AGENTS);
        consumer.until_ids(&ids(&expected), DRAIN_DEADLINE).await;
        assert_same_per_agent(&expected, &consumer.events(), &OUTAGE_AGENTS);
        let after = wait_publisher(server, publisher, DEADLINE, "drained", |c| {
            c["buffered"] == 0 && c["connected"] == true
        })
        .await;
        assert_eq!(after["dropped"], 0, "{after}");
        after
    }
}

//! The line protocol between the harness and its `client-worker` processes: one JSON
//! object per line, commands on the worker's stdin, replies on its stdout, matched by
//! `id` (a worker runs several commands at once).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A command with its id.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// Echoed in the reply.
    pub id: u64,
    /// What to do.
    #[serde(flatten)]
    pub cmd: Cmd,
}

/// A reply with the id of its command.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    /// The command's id.
    pub id: u64,
    /// The outcome.
    #[serde(flatten)]
    pub reply: Reply,
}

/// Commands a worker understands.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    /// Connects and registers agents `{prefix}{start}` .. `{prefix}{start+count-1}` with
    /// `dialers` concurrent dialers, and holds them (answering pings) until `close_all`.
    Hold {
        /// Server WebSocket URL.
        url: String,
        /// Agent id prefix.
        prefix: String,
        /// First agent number.
        start: u64,
        /// How many agents.
        count: u64,
        /// Concurrent dialers.
        dialers: usize,
        /// Seconds allowed per connect + register.
        timeout_s: f64,
    },
    /// Stops answering pings (and sending anything) on every held socket.
    Silence,
    /// Reports ping counters and close codes; drains the ping-lag samples.
    Report,
    /// Closes every held socket from the client side and waits for them to end.
    CloseAll,
    /// Held sockets currently open.
    Count,
    /// Registers `count` fresh agents one after another, every `interval_ms`, each
    /// closed right after its answer; reports their registration latencies.
    Probe {
        /// Server WebSocket URL.
        url: String,
        /// Agent id prefix.
        prefix: String,
        /// How many probes.
        count: u64,
        /// Pause between probes.
        interval_ms: u64,
    },
    /// Asks the server for its agent list (`list_agents`) through a fresh agent and
    /// reports the list's length.
    ListCount {
        /// Server WebSocket URL.
        url: String,
        /// Probe agent id.
        agent_id: String,
    },
    /// Opens agents at `rate` per second for `duration_s`; each lives `lifetime_ms`
    /// (answering pings) and then closes.
    Churn {
        /// Server WebSocket URL.
        url: String,
        /// Agent id prefix (ids are unique per connection).
        prefix: String,
        /// Connections per second from this worker.
        rate: f64,
        /// Seconds of churn.
        duration_s: f64,
        /// Lifetime of each connection.
        lifetime_ms: u64,
    },
    /// Connects `pairs` agent pairs for the routing workload.
    RouteSetup {
        /// Server WebSocket URL.
        url: String,
        /// Pairs of agents (`ra-i` talks to `rb-i`).
        pairs: u64,
        /// True for the floor server, which echoes a message to its sender instead of
        /// routing it.
        echo: bool,
        /// Cluster: when not empty, `ra-i` dials `urls[i % n]` and `rb-i` dials
        /// `urls[(i + 1) % n]` (so each pair spans two nodes) instead of `url`.
        #[serde(default)]
        urls: Vec<String>,
    },
    /// Closed loop: `window` messages in flight per pair, every receipt answered.
    RouteClosed {
        /// Messages in flight per pair.
        window: u64,
        /// Seconds before counting starts.
        warmup_s: f64,
        /// Seconds counted.
        duration_s: f64,
    },
    /// Open loop: the `ra-*` agents send `rate` messages per second in total.
    RouteOpen {
        /// Messages per second, all pairs together.
        rate: f64,
        /// Seconds before recording starts.
        warmup_s: f64,
        /// Seconds recorded.
        duration_s: f64,
    },
    /// Closes the routing agents.
    RouteTeardown,
    /// Connects `agents` agents; `bc-0` broadcasts `rate` times per second.
    Broadcast {
        /// Server WebSocket URL.
        url: String,
        /// Agents, sender included.
        agents: u64,
        /// Broadcasts per second.
        rate: f64,
        /// Seconds before recording starts.
        warmup_s: f64,
        /// Seconds recorded.
        duration_s: f64,
    },
    /// Ends the worker.
    Exit,
}

/// Replies.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// `hold` finished dialing.
    Held {
        /// Agents registered.
        ok: u64,
        /// Agents that could not register.
        failed: u64,
        /// The first few errors.
        errors: Vec<String>,
        /// Connect-to-register-answer latencies, µs.
        lat_us: Vec<u32>,
        /// When dialing started, epoch µs.
        start_us: u64,
        /// When the last dial ended, epoch µs.
        end_us: u64,
    },
    /// `silence` done.
    Silenced {
        /// Each agent's last frame sent, epoch µs.
        last_sent: Vec<(String, u64)>,
    },
    /// `report`.
    Report {
        /// Held sockets still open.
        open: u64,
        /// Server pings received since the last report.
        pings: u64,
        /// Server ping timestamp to receipt, µs, since the last report.
        ping_lag_us: Vec<u32>,
        /// Ended sockets by close code (`eof`, `error` when there was none).
        closes: BTreeMap<String, u64>,
    },
    /// `close_all` done.
    Closed {
        /// Sockets closed.
        closed: u64,
    },
    /// `count`.
    Count {
        /// Held or churning sockets open now.
        open: u64,
    },
    /// `probe` done.
    Probe {
        /// Registration latencies, µs.
        lat_us: Vec<u32>,
        /// Probes that failed.
        failed: u64,
        /// The first few errors.
        errors: Vec<String>,
    },
    /// `list_count`.
    ListCount {
        /// Agents in the server's list, the probe included.
        agents: u64,
    },
    /// `churn` done.
    Churn {
        /// Connections registered.
        opened: u64,
        /// Connections that failed to register.
        failed: u64,
        /// Connections closed by the client after their lifetime.
        closed: u64,
        /// Connections the server closed before their lifetime ended, by code.
        server_closed: BTreeMap<String, u64>,
        /// The first few errors.
        errors: Vec<String>,
        /// Registration latencies, µs.
        lat_us: Vec<u32>,
    },
    /// `route_setup` done.
    RouteReady {
        /// Agents registered.
        ok: u64,
        /// Agents that failed.
        failed: u64,
        /// The first few errors.
        errors: Vec<String>,
    },
    /// A routing phase done.
    Routed {
        /// Messages received in the recorded window.
        received: u64,
        /// Seconds recorded.
        seconds: f64,
        /// Send-to-receipt latencies in the window, µs.
        lat_us: Vec<u32>,
        /// Sockets the server closed during the phase, by code.
        closes: BTreeMap<String, u64>,
        /// Open loop: messages sent in the window that had not arrived one second after
        /// the last send (in-flight messages are not counted).
        #[serde(default)]
        lost: Option<u64>,
    },
    /// `broadcast` done.
    Broadcasted {
        /// Broadcasts sent in the recorded window.
        sent: u64,
        /// Deliveries received for them.
        delivered: u64,
        /// Recipients per broadcast.
        recipients: u64,
        /// Seconds recorded.
        seconds: f64,
        /// Per-delivery latencies, µs.
        lat_us: Vec<u32>,
        /// Per-broadcast time until the last recipient had it, µs (complete ones only).
        completion_us: Vec<u32>,
        /// Agents that failed to register.
        failed: u64,
    },
    /// Generic success.
    #[default]
    Done,
    /// The command failed.
    Error {
        /// Why.
        message: String,
    },
}

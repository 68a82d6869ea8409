//! The registry's interface: what connections and the admin API send it, and the
//! [`ConnectionOrder`]s it sends connections.
//!
//! The registry knows a connection only by the [`Recipient`] of its orders and its
//! [`Outbox`], never by the connection actor's type.

use crate::disconnect::Disconnect;
use crate::liveness::{ConnectionClock, SessionId};
use crate::outbound::Outbox;
use crate::protocol::command::{Registration, Request};
use crate::protocol::ErrorCode;
use crate::stats::StatsSnapshot;
use actix::prelude::*;
use bytestring::ByteString;
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::oneshot;

/// What the registry tells a connection.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum ConnectionOrder {
    /// Registered as this agent id; the response is already in the outbox.
    Registered(Arc<str>),
    /// The registration was refused; the response is already in the outbox. Close
    /// the connection this way if set.
    Refused(Option<Disconnect>),
    /// Close: the registry has already ended the incarnation's lifecycle.
    Close {
        /// How.
        disconnect: Disconnect,
        /// A notification written before the close frame (the takeover notice).
        notice: Option<ByteString>,
    },
}

/// A connection started (sent by the connection itself).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connected {
    /// The connection.
    pub session_id: SessionId,
    /// Where the registry's orders go.
    pub orders: Recipient<ConnectionOrder>,
    /// Its outbound queue.
    pub outbox: Outbox,
    /// Peer address.
    pub remote_addr: Arc<str>,
}

/// A connection ended (sent from its `stopped()` or `Drop`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionEnded {
    /// The connection.
    pub session_id: SessionId,
    /// The agent id it was registered as, if any.
    pub agent_id: Option<Arc<str>>,
    /// How it ended.
    pub disconnect: Disconnect,
}

/// A `register_agent` whose id and metadata the connection checked.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RegisterAgent {
    /// The connection asking.
    pub session_id: SessionId,
    /// What it asks for.
    pub registration: Registration,
    /// Echoed in the answer.
    pub request_id: Option<Value>,
    /// The connection's liveness clock.
    pub clock: Arc<ConnectionClock>,
}

/// A registration the connection refused itself (bad id or metadata): counted and
/// published as `agent.registration_failed`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RegistrationRefused {
    /// The agent id, if one was given.
    pub agent_id: Option<String>,
    /// The error code sent to the agent.
    pub error_code: ErrorCode,
}

/// A system request that needs the registry (claims, certificates, lists, network info).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SystemRequest {
    /// The connection asking; the answer goes to its outbox.
    pub session_id: SessionId,
    /// The request.
    pub request: Request,
}

/// Application activity ended a silence longer than `activity_timeout` (sent by the
/// connection).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ActivityResumed {
    /// The connection.
    pub session_id: SessionId,
}

/// What `GET /agents` shows of one agent.
#[derive(Debug, Clone, Serialize)]
pub struct AgentInfo {
    /// The agent id.
    pub agent_id: String,
    /// `metadata.name` or the id.
    pub name: String,
    /// Unique id of the connection.
    pub session_id: String,
    /// Registration count of this id.
    pub incarnation: u64,
    /// `active` or `inactive`.
    pub state: &'static str,
    /// RFC 3339 time of registration.
    pub connected_at: String,
    /// Epoch seconds of the last frame received.
    pub last_seen: f64,
    /// Epoch seconds of the last application frame received.
    pub last_activity: f64,
    /// Registration metadata.
    pub metadata: Box<serde_json::value::RawValue>,
    /// Peer address of the socket.
    pub remote_addr: String,
    /// Frames waiting in the outbound queue.
    pub queue_length: usize,
    /// The node the agent is connected to.
    pub node_id: String,
    /// Round trip of its last answered ping, in milliseconds.
    pub round_trip_ms: Option<f64>,
}

/// Lists registered agents (admin API).
#[derive(Message)]
#[rtype(result = "Vec<AgentInfo>")]
pub struct ListAgents;

/// Describes one registered agent (admin API).
#[derive(Message)]
#[rtype(result = "Option<AgentInfo>")]
pub struct GetAgent(pub String);

/// Removes an agent administratively: close 1000, reason `admin`. True if it existed.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct RemoveAgent(pub String);

/// Current connection metrics.
#[derive(Message)]
#[rtype(result = "StatsSnapshot")]
pub struct GetStats;

/// Starts a graceful shutdown: refuse registrations, notify every socket. Returns the
/// number of agents registered at that moment.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct BeginShutdown {
    /// Seconds the agents are given to leave (sent in the notification).
    pub timeout_secs: f64,
    /// Another live node of the cluster, for the agents to reconnect to (sent in the
    /// notification).
    pub reconnect_url: Option<String>,
}

/// Resolves when the condition holds.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WaitFor {
    /// What to wait for.
    pub condition: Drained,
    /// Resolved (or dropped) when it holds.
    pub reply: oneshot::Sender<()>,
}

/// Conditions [`WaitFor`] can wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// No agent is registered.
    NoAgents,
    /// No socket is open.
    NoSockets,
}

/// Closes every remaining connection with 1001 (reason `shutdown`). Returns how many
/// registered agents were closed this way.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseAll;

/// Asked by the cluster actor after Redis lost its data: the claims of every agent
/// registered here, to claim again (`cluster::recovery`).
#[derive(Message)]
#[rtype(result = "Vec<HeldClaim>")]
pub struct HeldClaims;

/// One registered agent's claim, as Redis held it.
#[derive(Debug, Clone)]
pub struct HeldClaim {
    /// The id.
    pub agent_id: Arc<str>,
    /// Its incarnation.
    pub incarnation: u64,
    /// The seq of its last event.
    pub seq: u64,
    /// The protocol session id.
    pub session: String,
    /// Its registration metadata (JSON text).
    pub metadata: String,
    /// When the incarnation began (epoch seconds).
    pub at: f64,
}

/// Told by the cluster actor: what became of the claims it re-asserted, each with the
/// incarnation it was re-asserted for.
#[derive(Message, Debug, Default)]
#[rtype(result = "()")]
pub struct ClaimsReasserted {
    /// This node's again (an agent among them that ended meanwhile is released again).
    pub kept: Vec<(Arc<str>, u64)>,
    /// Ended by a survivor meanwhile (its end published there): closed 4009 unpublished.
    pub reaped: Vec<(Arc<str>, u64)>,
    /// Registered on another node meanwhile: ended here (published), closed 4009.
    pub taken: Vec<(Arc<str>, u64)>,
}

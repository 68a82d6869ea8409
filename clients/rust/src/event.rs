//! The typed values an agent hands the application: what the server sent it
//! ([`Message`], [`Notification`], [`Instruction`], [`ServerError`]) and what happened
//! to its connection ([`Registration`], [`Disconnect`]).

use crate::error::ErrorCode;
use serde_json::Value;
use std::time::Duration;

/// One thing for the application, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A message from another agent.
    Message(Message),
    /// A `system_notification` (`network_shutdown`, `connection_replaced`, …).
    Notification(Notification),
    /// An instruction to carry out and acknowledge with
    /// [`AgentHandle::ack`](crate::AgentHandle::ack). Each instruction comes once per process.
    Instruction(Instruction),
    /// An `error` frame: something the agent sent could not be done.
    Error(ServerError),
    /// The agent registered again after losing its connection.
    Reconnected(Registration),
    /// The connection ended; `reconnecting` says whether the agent goes on. When it
    /// does not, this is the last event.
    Disconnected(Disconnect),
}

/// The server's answer to a successful registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// The registered id.
    pub agent_id: String,
    /// Unique per connection.
    pub session_id: String,
    /// Registrations of this id on the network so far; grows with every one.
    pub incarnation: u64,
    /// The server pings an agent silent this long.
    pub heartbeat_interval: Duration,
    /// The time the server gives an agent to answer its ping.
    pub ping_timeout: Duration,
    /// An agent silent this long is stale, whatever else happened.
    pub agent_timeout: Duration,
    /// `network_name`.
    pub network_name: String,
    /// `network_id`.
    pub network_id: String,
    /// Whether the registration presented this agent's certificate (and the server took it).
    pub with_certificate: bool,
}

impl Registration {
    /// Reads a successful `register_agent` answer.
    pub(crate) fn from_answer(answer: &Value, with_certificate: bool) -> Self {
        let text = |key: &str| answer[key].as_str().unwrap_or_default().to_owned();
        let secs = |key: &str, default: f64| {
            Duration::from_secs_f64(answer[key].as_f64().unwrap_or(default).max(0.0))
        };
        Self {
            agent_id: text("agent_id"),
            session_id: text("session_id"),
            incarnation: answer["incarnation"].as_u64().unwrap_or(0),
            heartbeat_interval: secs("heartbeat_interval", 30.0),
            ping_timeout: secs("ping_timeout", 5.0),
            agent_timeout: secs("agent_timeout", 90.0),
            network_name: text("network_name"),
            network_id: text("network_id"),
            with_certificate,
        }
    }
}

/// Direct or broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageKind {
    /// `direct_message`: sent to this agent alone.
    Direct,
    /// `broadcast_message`: sent to every agent.
    Broadcast,
    /// Another `message_type`, as sent.
    Other(String),
}

/// A message from another agent (`{"type":"message","data":{...}}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `data.message_id`.
    pub message_id: String,
    /// `data.sender_id`, set by the server: who really sent it.
    pub sender_id: String,
    /// `data.message_type`.
    pub kind: MessageKind,
    /// `data.content`, as the sender wrote it.
    pub content: Value,
    /// `data.timestamp`, epoch milliseconds.
    pub timestamp: Option<u64>,
    /// The whole `data` object, unknown fields included.
    pub data: Value,
}

/// A `system_notification` frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// `event`: `network_shutdown`, `connection_replaced`, …
    pub event: String,
    /// `message`, when there is one.
    pub message: Option<String>,
    /// `reconnect_url` of `network_shutdown` in a cluster: the node to move to.
    pub reconnect_url: Option<String>,
    /// The whole frame.
    pub frame: Value,
}

/// An instruction (`{"type":"instruction",...}`, PROTOCOL.md §11).
#[derive(Debug, Clone, PartialEq)]
pub struct Instruction {
    /// The same on every delivery of this instruction.
    pub instruction_id: String,
    /// The session it belongs to.
    pub session_id: Option<String>,
    /// What to do, as given when it was created.
    pub payload: Value,
    /// Which delivery this is (1, 2, …).
    pub attempt: u32,
    /// RFC 3339 time after which it expires if unfinished.
    pub expires_at: String,
}

/// An `error` frame.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerError {
    /// `error_code`.
    pub code: ErrorCode,
    /// `error`.
    pub message: String,
    /// `message_id` of the message it is about.
    pub message_id: Option<String>,
    /// `instruction_id` of the acknowledgement it is about.
    pub instruction_id: Option<String>,
}

/// The end of a connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Disconnect {
    /// The WebSocket close code, when the server sent one.
    pub close_code: Option<u16>,
    /// What happened.
    pub reason: String,
    /// Whether the agent is reconnecting.
    pub reconnecting: bool,
}

/// How an instruction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStatus {
    /// The work is done.
    Done,
    /// The agent tried and failed.
    Failed,
    /// The agent will not do it.
    Rejected,
}

impl AckStatus {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
        }
    }
}

/// One entry of `list_agents`.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentInfo {
    /// Its id.
    pub agent_id: String,
    /// `metadata.name`, or the id.
    pub name: String,
    /// Its registration metadata.
    pub metadata: Value,
    /// The node holding it, in a cluster.
    pub node_id: Option<String>,
}

impl AgentInfo {
    pub(crate) fn from_entry(entry: &Value) -> Self {
        let agent_id = entry["agent_id"].as_str().unwrap_or_default().to_owned();
        Self {
            name: entry["name"].as_str().unwrap_or(&agent_id).to_owned(),
            metadata: entry.get("metadata").cloned().unwrap_or(Value::Null),
            node_id: entry["node_id"].as_str().map(str::to_owned),
            agent_id,
        }
    }
}

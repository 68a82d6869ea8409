//! The lifecycle event type (PROTOCOL.md §8): CloudEvents 1.0 in JSON structured mode.
//!
//! Each event's `data` is a typed payload ([`AgentEvent`], [`NetworkEvent`]) whose
//! variant decides the event `type`, so a type and its fields can never disagree.
//! Events are created by the registry (the one owner of per-agent sequence numbers) and
//! by the server's start-up and shutdown code, serialized once, and shared between
//! publishers as `Arc<LifecycleEvent>`.

use serde::Serialize;
use serde_json::value::RawValue;
#[cfg(test)]
use serde_json::Value;
use std::sync::Arc;
use std::time::SystemTime;

pub use crate::disconnect::EndReason;

/// The `type` of a lifecycle event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// `agent.registered`
    Registered,
    /// `agent.registration_failed`
    RegistrationFailed,
    /// `agent.inactive`
    Inactive,
    /// `agent.active`
    Active,
    /// `agent.stale`
    Stale,
    /// `agent.replaced`
    Replaced,
    /// `agent.disconnected`
    Disconnected,
    /// `agent.cleaned_up`
    CleanedUp,
    /// `network.started`
    NetworkStarted,
    /// `network.stopping`
    NetworkStopping,
    /// `network.stopped`
    NetworkStopped,
    /// `instruction.created`
    InstructionCreated,
    /// `instruction.delivered`
    InstructionDelivered,
    /// `instruction.done`
    InstructionDone,
    /// `instruction.failed`
    InstructionFailed,
    /// `instruction.rejected`
    InstructionRejected,
    /// `instruction.expired`
    InstructionExpired,
    /// `instruction.cancelled`
    InstructionCancelled,
    /// `session.opened`
    SessionOpened,
    /// `session.closed`
    SessionClosed,
}

impl EventKind {
    /// The CloudEvents `type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registered => "agent.registered",
            Self::RegistrationFailed => "agent.registration_failed",
            Self::Inactive => "agent.inactive",
            Self::Active => "agent.active",
            Self::Stale => "agent.stale",
            Self::Replaced => "agent.replaced",
            Self::Disconnected => "agent.disconnected",
            Self::CleanedUp => "agent.cleaned_up",
            Self::NetworkStarted => "network.started",
            Self::NetworkStopping => "network.stopping",
            Self::NetworkStopped => "network.stopped",
            Self::InstructionCreated => "instruction.created",
            Self::InstructionDelivered => "instruction.delivered",
            Self::InstructionDone => "instruction.done",
            Self::InstructionFailed => "instruction.failed",
            Self::InstructionRejected => "instruction.rejected",
            Self::InstructionExpired => "instruction.expired",
            Self::InstructionCancelled => "instruction.cancelled",
            Self::SessionOpened => "session.opened",
            Self::SessionClosed => "session.closed",
        }
    }
}

/// The steps of a cleanup, listed in `agent.cleaned_up`.
pub const CLEANUP_STEPS: [&str; 3] = [
    "registry_entry_removed",
    "heartbeat_untracked",
    "connection_closed",
];

/// The payload of an `agent.*` event (its `data`, less the fields every agent event
/// carries: `agent_id`, `incarnation`, `seq`, `node_id`).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum AgentEvent<'a> {
    /// `agent.registered`.
    Registered {
        /// The connection's unique id.
        session_id: &'a str,
        /// Registration metadata.
        metadata: &'a RawValue,
        /// Peer address of the socket.
        remote_addr: &'a str,
        /// `certificate` or `force_reconnect` when this registration took the id over.
        takeover: Option<&'static str>,
    },
    /// `agent.registration_failed`.
    RegistrationFailed {
        /// Why it was refused.
        error_code: &'static str,
    },
    /// `agent.inactive`.
    Inactive {
        /// The connection's unique id.
        session_id: &'a str,
        /// Seconds since its last application frame.
        inactive_secs: f64,
    },
    /// `agent.active`.
    Active {
        /// The connection's unique id.
        session_id: &'a str,
        /// Seconds it had been inactive.
        inactive_secs: f64,
    },
    /// `agent.stale`.
    Stale {
        /// The connection's unique id.
        session_id: &'a str,
        /// `ping_timeout` or `agent_timeout`.
        reason: &'static str,
        /// Epoch seconds of its last frame.
        last_seen: f64,
    },
    /// `agent.replaced`.
    Replaced {
        /// The replaced connection's unique id.
        session_id: &'a str,
        /// Incarnation of the registration that took over.
        by_incarnation: u64,
        /// Its connection's unique id.
        by_session_id: &'a str,
        /// `certificate` or `force_reconnect`.
        proof: &'static str,
    },
    /// `agent.disconnected`.
    Disconnected {
        /// The connection's unique id.
        session_id: &'a str,
        /// Why the incarnation ended.
        reason: &'static str,
        /// The close code sent to the agent (none when its node was lost).
        close_code: Option<u16>,
        /// Registration metadata.
        metadata: &'a RawValue,
    },
    /// `agent.cleaned_up`.
    CleanedUp {
        /// The connection's unique id.
        session_id: &'a str,
        /// Seconds the incarnation lasted.
        connected_secs: f64,
        /// What the cleanup did ([`CLEANUP_STEPS`]).
        steps: [&'static str; 3],
    },
}

impl AgentEvent<'_> {
    /// The event type this payload belongs to.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::Registered { .. } => EventKind::Registered,
            Self::RegistrationFailed { .. } => EventKind::RegistrationFailed,
            Self::Inactive { .. } => EventKind::Inactive,
            Self::Active { .. } => EventKind::Active,
            Self::Stale { .. } => EventKind::Stale,
            Self::Replaced { .. } => EventKind::Replaced,
            Self::Disconnected { .. } => EventKind::Disconnected,
            Self::CleanedUp { .. } => EventKind::CleanedUp,
        }
    }
}

/// The payload of a `network.*` event (its `data`, less `node_id`).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum NetworkEvent<'a> {
    /// `network.started`.
    Started {
        /// `network.name`.
        name: &'a str,
        /// `network.max_connections`.
        max_connections: usize,
    },
    /// `network.stopping`.
    Stopping {
        /// Agents registered when shutdown began.
        agents: usize,
        /// Sockets open then.
        open_sockets: usize,
        /// Seconds the agents are given to leave.
        timeout: f64,
    },
    /// `network.stopped`.
    Stopped {
        /// Agents registered when shutdown began.
        agents_at_start: usize,
        /// Agents that left before the timeout.
        left_gracefully: usize,
        /// Agents closed at the timeout.
        forced: usize,
        /// Seconds the shutdown took.
        duration_secs: f64,
    },
}

impl NetworkEvent<'_> {
    /// The event type this payload belongs to.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::Started { .. } => EventKind::NetworkStarted,
            Self::Stopping { .. } => EventKind::NetworkStopping,
            Self::Stopped { .. } => EventKind::NetworkStopped,
        }
    }
}

/// Where events come from: the network id and this process's node id.
#[derive(Debug, Clone)]
pub struct EventSource {
    /// `network.id`.
    pub network_id: Arc<str>,
    /// Unique id of this server process.
    pub node_id: Arc<str>,
    /// `tether://<network_id>/<node_id>`.
    pub uri: Arc<str>,
}

impl EventSource {
    /// The source of events of network `network_id` on node `node_id`.
    pub fn new(network_id: &str, node_id: &str) -> Self {
        Self {
            network_id: network_id.into(),
            node_id: node_id.into(),
            uri: format!("tether://{network_id}/{node_id}").into(),
        }
    }
}

/// One lifecycle event, serialized once at creation.
#[derive(Debug)]
pub struct LifecycleEvent {
    /// Unique event id (a UUID).
    pub id: String,
    /// The event type.
    pub kind: EventKind,
    /// The agent id for `agent.*` events, the node id for `network.*` events. Used as
    /// the Kafka key and the CloudEvents `subject`.
    pub key: Arc<str>,
    /// Incarnation of the agent (0 for network events and refused registrations).
    pub incarnation: u64,
    /// Per-incarnation sequence number (0 for network events and refused registrations).
    pub seq: u64,
    /// The CloudEvents JSON document.
    pub json: String,
}

/// An event's `data`: the payload and the fields every event of its family carries.
#[derive(Serialize)]
struct Data<'a, P: Serialize> {
    #[serde(flatten)]
    payload: &'a P,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    incarnation: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    node_id: &'a str,
}

/// The CloudEvents envelope.
#[derive(Serialize)]
struct Envelope<'a, P: Serialize> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    subject: &'a str,
    datacontenttype: &'static str,
    data: Data<'a, P>,
}

impl LifecycleEvent {
    /// An event of incarnation `incarnation` of agent `agent_id`, numbered `seq`
    /// (both 0 for a refused registration, which belongs to no incarnation).
    pub fn agent(
        source: &EventSource,
        agent_id: Arc<str>,
        incarnation: u64,
        seq: u64,
        payload: &AgentEvent<'_>,
    ) -> Self {
        let numbered = incarnation > 0;
        let data = Data {
            payload,
            agent_id: Some(&agent_id),
            incarnation: numbered.then_some(incarnation),
            seq: numbered.then_some(seq),
            node_id: &source.node_id,
        };
        Self::build(
            source,
            payload.kind(),
            agent_id.clone(),
            incarnation,
            seq,
            data,
        )
    }

    /// A `network.*` event of this node.
    pub fn network(source: &EventSource, payload: &NetworkEvent<'_>) -> Self {
        let data = Data {
            payload,
            agent_id: None,
            incarnation: None,
            seq: None,
            node_id: &source.node_id,
        };
        Self::build(source, payload.kind(), source.node_id.clone(), 0, 0, data)
    }

    /// An `instruction.*` or `session.*` event: `key` is the instruction's (or
    /// session's) id, `seq` the number of its change (consumers order by it), and
    /// `payload` the rest of its `data`.
    pub fn work<P: Serialize>(
        source: &EventSource,
        kind: EventKind,
        key: Arc<str>,
        seq: u64,
        payload: &P,
    ) -> Self {
        let data = Data {
            payload,
            agent_id: None,
            incarnation: None,
            seq: Some(seq),
            node_id: &source.node_id,
        };
        Self::build(source, kind, key, 0, seq, data)
    }

    fn build<P: Serialize>(
        source: &EventSource,
        kind: EventKind,
        key: Arc<str>,
        incarnation: u64,
        seq: u64,
        data: Data<'_, P>,
    ) -> Self {
        let id = uuid::Uuid::new_v4().to_string();
        let envelope = Envelope {
            specversion: "1.0",
            id: &id,
            source: &source.uri,
            kind: kind.as_str(),
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            subject: &key,
            datacontenttype: "application/json",
            data,
        };
        let json = serde_json::to_string(&envelope).expect("an event always serializes");
        Self {
            id,
            kind,
            key,
            incarnation,
            seq,
            json,
        }
    }
}

/// A shared, immutable event.
pub type SharedEvent = Arc<LifecycleEvent>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn agent_events_are_cloudevents_with_sequence_data() {
        let source = EventSource::new("tether-1", "node-a");
        let metadata = serde_json::value::to_raw_value(&json!({"name": "Alice"})).unwrap();
        let payload = AgentEvent::Disconnected {
            session_id: "s-1",
            reason: EndReason::Stale.as_str(),
            close_code: Some(4002),
            metadata: &metadata,
        };
        let event = LifecycleEvent::agent(&source, "alice".into(), 3, 4, &payload);
        let doc: Value = serde_json::from_str(&event.json).unwrap();
        assert_eq!(doc["specversion"], "1.0");
        assert_eq!(doc["type"], "agent.disconnected");
        assert_eq!(doc["source"], "tether://tether-1/node-a");
        assert_eq!(doc["subject"], "alice");
        assert_eq!(doc["datacontenttype"], "application/json");
        let data = &doc["data"];
        assert_eq!(data["agent_id"], "alice");
        assert_eq!(data["incarnation"], 3);
        assert_eq!(data["seq"], 4);
        assert_eq!(data["node_id"], "node-a");
        assert_eq!(data["reason"], "stale");
        assert_eq!(data["close_code"], 4002);
        assert_eq!(data["metadata"]["name"], "Alice");
        assert_eq!(doc["id"], event.id.as_str());
        assert!(doc["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn a_refused_registration_has_no_incarnation_and_a_network_event_no_agent() {
        let source = EventSource::new("n", "node-a");
        let payload = AgentEvent::RegistrationFailed {
            error_code: "agent_id_in_use",
        };
        let event = LifecycleEvent::agent(&source, "bob".into(), 0, 0, &payload);
        let doc: Value = serde_json::from_str(&event.json).unwrap();
        assert_eq!(doc["type"], "agent.registration_failed");
        assert!(doc["data"].get("incarnation").is_none());
        assert!(doc["data"].get("seq").is_none());
        assert_eq!(doc["data"]["error_code"], "agent_id_in_use");

        let payload = NetworkEvent::Started {
            name: "net",
            max_connections: 5,
        };
        let event = LifecycleEvent::network(&source, &payload);
        let doc: Value = serde_json::from_str(&event.json).unwrap();
        assert_eq!(doc["type"], "network.started");
        assert_eq!(doc["subject"], "node-a");
        assert!(doc["data"].get("agent_id").is_none());
        assert_eq!(doc["data"]["max_connections"], 5);
    }
}

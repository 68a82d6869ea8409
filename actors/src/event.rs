//! The lifecycle event type (PROTOCOL.md §8): CloudEvents 1.0 in JSON structured mode.
//!
//! Events are created by the registry (the one owner of per-agent sequence numbers) and
//! by the server's start-up and shutdown code, serialized once, and shared between
//! publishers as `Arc<LifecycleEvent>`.

use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::SystemTime;

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

impl LifecycleEvent {
    /// Builds an event; `data` gets `node_id` added (and, for agent events, the
    /// `agent_id`, `incarnation` and `seq` passed here).
    pub fn new(
        source: &EventSource,
        kind: EventKind,
        key: Arc<str>,
        incarnation: u64,
        seq: u64,
        mut data: Map<String, Value>,
    ) -> Self {
        let id = uuid::Uuid::new_v4().to_string();
        if !matches!(
            kind,
            EventKind::NetworkStarted | EventKind::NetworkStopping | EventKind::NetworkStopped
        ) {
            data.insert("agent_id".into(), json!(&*key));
            if incarnation > 0 {
                data.insert("incarnation".into(), json!(incarnation));
                data.insert("seq".into(), json!(seq));
            }
        }
        data.insert("node_id".into(), json!(&*source.node_id));
        let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let json = json!({
            "specversion": "1.0",
            "id": id,
            "source": &*source.uri,
            "type": kind.as_str(),
            "time": time,
            "subject": &*key,
            "datacontenttype": "application/json",
            "data": data,
        })
        .to_string();
        Self {
            id,
            kind,
            key,
            incarnation,
            seq,
            json,
        }
    }

    /// A `network.*` event with `data`.
    pub fn network(source: &EventSource, kind: EventKind, data: Map<String, Value>) -> Self {
        Self::new(source, kind, source.node_id.clone(), 0, 0, data)
    }
}

/// A shared, immutable event.
pub type SharedEvent = Arc<LifecycleEvent>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_events_are_cloudevents_with_sequence_data() {
        let source = EventSource::new("tether-1", "node-a");
        let mut data = Map::new();
        data.insert("reason".into(), json!("stale"));
        let event =
            LifecycleEvent::new(&source, EventKind::Disconnected, "alice".into(), 3, 4, data);
        let doc: Value = serde_json::from_str(&event.json).unwrap();
        assert_eq!(doc["specversion"], "1.0");
        assert_eq!(doc["type"], "agent.disconnected");
        assert_eq!(doc["source"], "tether://tether-1/node-a");
        assert_eq!(doc["subject"], "alice");
        assert_eq!(doc["data"]["incarnation"], 3);
        assert_eq!(doc["data"]["seq"], 4);
        assert_eq!(doc["data"]["reason"], "stale");
        assert_eq!(doc["id"], event.id.as_str());
        assert!(doc["time"].as_str().unwrap().ends_with('Z'));
    }
}

/// Why an incarnation ended: the `reason` of `agent.disconnected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// The agent closed its socket (or the socket dropped).
    ClientClosed,
    /// The agent sent `unregister_agent`.
    Unregistered,
    /// The heartbeat declared it stale.
    Stale,
    /// A takeover replaced it.
    Replaced,
    /// The server shut down.
    Shutdown,
    /// An administrator removed it.
    Admin,
    /// Its outbound queue overflowed.
    SlowConsumer,
    /// It broke the protocol (oversized frame, repeated invalid frames).
    ProtocolError,
    /// Its connection failed (I/O error, internal fault).
    Error,
}

impl EndReason {
    /// The `reason` string of `agent.disconnected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::Unregistered => "unregistered",
            Self::Stale => "stale",
            Self::Replaced => "replaced",
            Self::Shutdown => "shutdown",
            Self::Admin => "admin",
            Self::SlowConsumer => "slow_consumer",
            Self::ProtocolError => "protocol_error",
            Self::Error => "error",
        }
    }
}

//! The registry actor: the table of agent id → connection, and the one owner of every
//! agent's lifecycle.
//!
//! It validates registrations and takeovers, numbers incarnations and events, routes
//! messages between agents, answers requests that need the table, and supervises the
//! connection actors: whenever one ends, for any reason, the registry ends the
//! incarnation with exactly one `agent.disconnected` and one `agent.cleaned_up`.
//! Ends the registry decides itself (takeover, stale, admin, slow consumer, shutdown)
//! are published at once, before the connection is told to close, so a dead or slow
//! connection can never hold an agent id or delay the next incarnation.

use crate::bus::{EventBus, Publish};
use crate::clock::{epoch_secs, monotonic_ms, monotonic_to_epoch_secs, ConnectionClock};
use crate::connection::{AgentConnection, Close, RegistrationOutcome, SessionId};
use crate::event::{EndReason, EventKind, EventSource, LifecycleEvent};
use crate::heartbeat::{Heartbeat, StaleReason, Track, Untrack};
use crate::identity::CertificateAuthority;
use crate::outbound::{Outbox, PushError};
use crate::protocol::{self, close_code, MessageKind, Request};
use crate::settings::Settings;
use crate::stats::{Stats, StatsSnapshot};
use actix::prelude::*;
use bytestring::ByteString;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::oneshot;

/// A live WebSocket, registered or not.
struct Socket {
    addr: Addr<AgentConnection>,
    outbox: Outbox,
    remote_addr: Arc<str>,
    /// The agent id this socket is currently registered as.
    agent: Option<Arc<str>>,
}

/// One registered incarnation of an agent.
struct AgentEntry {
    session_id: SessionId,
    /// The protocol's `session_id`: unique per connection.
    session_uuid: Arc<str>,
    incarnation: u64,
    /// Sequence number of the last event published for this incarnation.
    seq: u64,
    metadata: Value,
    remote_addr: Arc<str>,
    connected_at: SystemTime,
    connected_mono_ms: u64,
    clock: Arc<ConnectionClock>,
    outbox: Outbox,
    addr: Addr<AgentConnection>,
    inactive: bool,
    /// Activity resumed before the heartbeat's inactive report arrived.
    active_before_inactive: bool,
}

impl AgentEntry {
    fn name(&self, agent_id: &str) -> String {
        self.metadata
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(agent_id)
            .to_owned()
    }

    fn event_data(&self) -> Map<String, Value> {
        let mut data = Map::new();
        data.insert("session_id".into(), json!(&*self.session_uuid));
        data
    }
}

/// Publishes an event of `entry`'s incarnation, numbering it. A free function so that
/// it can run while `entry` is borrowed from the registry's table.
fn publish_event(
    bus: &Addr<EventBus>,
    source: &EventSource,
    agent_id: &Arc<str>,
    entry: &mut AgentEntry,
    kind: EventKind,
    data: Map<String, Value>,
) {
    entry.seq += 1;
    let event = LifecycleEvent::new(
        source,
        kind,
        agent_id.clone(),
        entry.incarnation,
        entry.seq,
        data,
    );
    bus.do_send(Publish(Arc::new(event)));
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
    pub metadata: Value,
    /// Peer address of the socket.
    pub remote_addr: String,
    /// Frames waiting in the outbound queue.
    pub queue_length: usize,
}

/// A connection actor started (sent by the connection itself).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connected {
    /// The connection.
    pub session_id: SessionId,
    /// Its actor.
    pub addr: Addr<AgentConnection>,
    /// Its outbound queue.
    pub outbox: Outbox,
    /// Peer address.
    pub remote_addr: Arc<str>,
}

/// A connection actor ended (sent from its `stopped()` or `Drop`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionEnded {
    /// The connection.
    pub session_id: SessionId,
    /// The agent id it was registered as, if any.
    pub agent_id: Option<Arc<str>>,
    /// Why it ended.
    pub reason: EndReason,
    /// The close code sent to the agent.
    pub close_code: u16,
}

/// A validated `register_agent` request.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RegisterAgent {
    /// The connection asking.
    pub session_id: SessionId,
    /// A syntactically valid agent id.
    pub agent_id: String,
    /// Metadata object, within the size limit.
    pub metadata: Value,
    /// Certificate offered for a takeover.
    pub certificate: Option<Value>,
    /// Whether the agent asks to take over by force.
    pub force_reconnect: bool,
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
    pub error_code: String,
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

/// A stamped message to route.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Route {
    /// The sending connection.
    pub session_id: SessionId,
    /// The sender's registered id (already written into the frame).
    pub sender_id: Arc<str>,
    /// Where it goes.
    pub kind: MessageKind,
    /// The frame, serialized once.
    pub frame: ByteString,
    /// Its message id, for error frames.
    pub message_id: String,
}

/// Application activity resumed on an inactive agent (sent by its connection).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ActivityResumed {
    /// The connection.
    pub session_id: SessionId,
}

/// The heartbeat's findings about one tracked agent.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum Verdict {
    /// The agent is stale.
    Stale {
        /// The connection.
        session_id: SessionId,
        /// Ping unanswered, or silent past `agent_timeout`.
        reason: StaleReason,
        /// Last frame received, on the monotonic clock.
        last_seen_ms: u64,
    },
    /// The agent has been inactive this long.
    Inactive {
        /// The connection.
        session_id: SessionId,
        /// Seconds since its last application frame.
        inactive_secs: f64,
    },
    /// The agent's queue was full when the heartbeat tried to ping it.
    SlowConsumer {
        /// The connection.
        session_id: SessionId,
    },
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

/// Hands the registry the heartbeat actor's address (sent once at start-up).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachHeartbeat(pub Addr<Heartbeat>);

/// The registry actor.
pub struct Registry {
    settings: Arc<Settings>,
    source: EventSource,
    bus: Addr<EventBus>,
    heartbeat: Option<Addr<Heartbeat>>,
    sockets: HashMap<SessionId, Socket>,
    agents: HashMap<Arc<str>, AgentEntry>,
    /// Registrations per agent id ever seen: incarnations only grow.
    incarnations: HashMap<Arc<str>, u64>,
    certificates: CertificateAuthority,
    stats: Stats,
    inactive_count: usize,
    shutting_down: bool,
    waiters: Vec<(Drained, oneshot::Sender<()>)>,
}

impl Registry {
    /// A registry publishing to `bus` as `source`, signing certificates with `secret`.
    pub fn new(
        settings: Arc<Settings>,
        source: EventSource,
        bus: Addr<EventBus>,
        secret: Vec<u8>,
    ) -> Self {
        let ttl = settings.identity.certificate_ttl;
        Self {
            settings,
            source,
            bus,
            heartbeat: None,
            sockets: HashMap::new(),
            agents: HashMap::new(),
            incarnations: HashMap::new(),
            certificates: CertificateAuthority::new(secret, ttl),
            stats: Stats::new(),
            inactive_count: 0,
            shutting_down: false,
            waiters: Vec::new(),
        }
    }

    /// Publishes an event of `entry`'s incarnation, numbering it.
    fn publish(
        &self,
        agent_id: &Arc<str>,
        entry: &mut AgentEntry,
        kind: EventKind,
        data: Map<String, Value>,
    ) {
        publish_event(&self.bus, &self.source, agent_id, entry, kind, data);
    }

    /// Ends `entry`'s incarnation: `agent.disconnected`, heartbeat untracked,
    /// `agent.cleaned_up`. The entry must already be out of the table.
    fn end_incarnation(
        &mut self,
        agent_id: &Arc<str>,
        mut entry: AgentEntry,
        reason: EndReason,
        code: u16,
    ) {
        if entry.inactive {
            self.inactive_count -= 1;
        }
        let mut data = entry.event_data();
        data.insert("reason".into(), json!(reason.as_str()));
        data.insert("close_code".into(), json!(code));
        data.insert("metadata".into(), entry.metadata.clone());
        self.publish(agent_id, &mut entry, EventKind::Disconnected, data);
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.do_send(Untrack {
                session_id: entry.session_id,
            });
        }
        if let Some(socket) = self.sockets.get_mut(&entry.session_id) {
            socket.agent = None;
        }
        let mut data = entry.event_data();
        let connected_secs = monotonic_ms().saturating_sub(entry.connected_mono_ms) as f64 / 1000.0;
        data.insert("connected_secs".into(), json!(connected_secs));
        data.insert(
            "steps".into(),
            json!([
                "registry_entry_removed",
                "heartbeat_untracked",
                "connection_closed"
            ]),
        );
        self.publish(agent_id, &mut entry, EventKind::CleanedUp, data);
        self.stats.ended(reason.as_str());
        self.check_waiters();
    }

    /// Removes `agent_id` and ends its incarnation now, then tells its connection to
    /// close with `code` (after `notice`, if any).
    fn evict(&mut self, agent_id: &str, reason: EndReason, code: u16, notice: Option<ByteString>) {
        let Some((agent_id, entry)) = self.agents.remove_entry(agent_id) else {
            return;
        };
        let addr = entry.addr.clone();
        self.end_incarnation(&agent_id, entry, reason, code);
        addr.do_send(Close {
            code,
            reason,
            notice,
        });
    }

    /// The agent id currently registered by `session_id`, if that session still holds it.
    fn agent_of(&self, session_id: SessionId) -> Option<Arc<str>> {
        let agent_id = self.sockets.get(&session_id)?.agent.clone()?;
        let entry = self.agents.get(&agent_id)?;
        (entry.session_id == session_id).then_some(agent_id)
    }

    fn check_waiters(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        let (no_agents, no_sockets) = (self.agents.is_empty(), self.sockets.is_empty());
        self.waiters.retain(|(condition, _)| match condition {
            Drained::NoAgents => !no_agents,
            Drained::NoSockets => !no_sockets,
        });
        // Dropping the senders that were removed resolves their waiters.
    }

    fn refuse(
        &mut self,
        session_id: SessionId,
        msg: &RegisterAgent,
        code: &str,
        error: &str,
        close: Option<u16>,
    ) {
        if let Some(socket) = self.sockets.get(&session_id) {
            let frame =
                protocol::response_error("register_agent", msg.request_id.as_ref(), code, error);
            if close.is_some() {
                // Queued before the close order, so that it is written before the close.
                let _ = socket.outbox.push_json(&frame);
                socket.addr.do_send(RegistrationOutcome::Refused(close));
            } else {
                // The connection is unregistered again before the agent can read the
                // answer and retry (see the `Accepted` case).
                socket.addr.do_send(RegistrationOutcome::Refused(close));
                let _ = socket.outbox.push_json(&frame);
            }
        }
        self.registration_failed(Some(&msg.agent_id), code);
    }

    fn registration_failed(&mut self, agent_id: Option<&str>, code: &str) {
        self.stats.refused();
        let mut data = Map::new();
        data.insert("error_code".into(), json!(code));
        let key: Arc<str> = agent_id.unwrap_or("").into();
        let event =
            LifecycleEvent::new(&self.source, EventKind::RegistrationFailed, key, 0, 0, data);
        self.bus.do_send(Publish(Arc::new(event)));
    }

    /// Whether the holder of an agent id is certainly gone: its actor stopped, or it
    /// has been silent past the heartbeat's stale bound (so the heartbeat is about to
    /// declare it stale anyway; a reconnect need not wait for that).
    fn holder_is_dead(&self, entry: &AgentEntry) -> Option<StaleReason> {
        if !entry.addr.connected() {
            return Some(StaleReason::AgentTimeout);
        }
        let hb = &self.settings.heartbeat;
        // The contract's stale bound: a responsive agent is never silent this long.
        let bound_ms = ((hb.interval + hb.ping_timeout + 1.0) * 1000.0) as u64;
        let silent = monotonic_ms().saturating_sub(entry.clock.last_seen_ms());
        (silent > bound_ms).then_some(StaleReason::PingTimeout)
    }

    fn declare_stale(&mut self, agent_id: &str, reason: StaleReason, last_seen_ms: u64) {
        let Some((agent_id, _)) = self.agents.get_key_value(agent_id) else {
            return;
        };
        let agent_id = agent_id.clone();
        let entry = self.agents.get_mut(&agent_id).expect("looked up above");
        self.stats.stale();
        let mut data = entry.event_data();
        data.insert("reason".into(), json!(reason.as_str()));
        data.insert(
            "last_seen".into(),
            json!(monotonic_to_epoch_secs(last_seen_ms)),
        );
        publish_event(
            &self.bus,
            &self.source,
            &agent_id,
            entry,
            EventKind::Stale,
            data,
        );
        self.evict(&agent_id, EndReason::Stale, close_code::STALE, None);
    }

    fn info(&self, agent_id: &str, entry: &AgentEntry) -> AgentInfo {
        AgentInfo {
            agent_id: agent_id.to_owned(),
            name: entry.name(agent_id),
            session_id: entry.session_uuid.to_string(),
            incarnation: entry.incarnation,
            state: if entry.inactive { "inactive" } else { "active" },
            connected_at: humantime::format_rfc3339_millis(entry.connected_at).to_string(),
            last_seen: monotonic_to_epoch_secs(entry.clock.last_seen_ms()),
            last_activity: monotonic_to_epoch_secs(entry.clock.last_activity_ms()),
            metadata: entry.metadata.clone(),
            remote_addr: entry.remote_addr.to_string(),
            queue_length: entry.outbox.len(),
        }
    }

    fn answer(&mut self, session_id: SessionId, request: &Request) -> Value {
        let command = request.command.as_str();
        let request_id = request.request_id();
        match command {
            "claim_agent_id" => {
                let agent_id = request.str_field("agent_id").unwrap_or("");
                if agent_id.is_empty() {
                    return protocol::response_error(
                        command,
                        request_id,
                        "missing_agent_id",
                        "agent_id is required",
                    );
                }
                if !protocol::valid_agent_id(agent_id) {
                    let error = "agent_id must be 1-128 characters of A-Z a-z 0-9 . _ : @ -";
                    return protocol::response_error(
                        command,
                        request_id,
                        "invalid_agent_id",
                        error,
                    );
                }
                match self
                    .certificates
                    .claim(agent_id, request.bool_field("force"), epoch_secs())
                {
                    Ok(certificate) => protocol::response_ok(
                        command,
                        request_id,
                        json!({"agent_id": agent_id, "certificate": certificate}),
                    ),
                    Err(error) => protocol::response_error(
                        command,
                        request_id,
                        "already_claimed",
                        &error.to_string(),
                    ),
                }
            }
            "validate_certificate" => {
                let certificate = request.fields.get("certificate").unwrap_or(&Value::Null);
                match self.certificates.validate(certificate, epoch_secs()) {
                    Ok(agent_id) => protocol::response_ok(
                        command,
                        request_id,
                        json!({"valid": true, "agent_id": agent_id}),
                    ),
                    Err(error) => protocol::response_ok(
                        command,
                        request_id,
                        json!({"valid": false, "error": error.to_string(), "error_code": "invalid_certificate"}),
                    ),
                }
            }
            "get_network_info" => protocol::response_ok(
                command,
                request_id,
                json!({"network_info": {
                    "name": self.settings.network.name,
                    "network_id": self.settings.network.id,
                    "node_id": &*self.source.node_id,
                    "mode": "centralized",
                    "mods": [],
                    "agent_count": self.agents.len(),
                }}),
            ),
            "list_agents" => {
                if self.agent_of(session_id).is_none() {
                    let error = "Register with register_agent before sending other requests";
                    return protocol::response_error(command, request_id, "not_registered", error);
                }
                let agents: Vec<Value> = self
                    .agents
                    .iter()
                    .map(|(id, entry)| {
                        json!({"agent_id": &**id, "name": entry.name(id), "connected": true,
                               "metadata": entry.metadata})
                    })
                    .collect();
                protocol::response_ok(command, request_id, json!({"agents": agents}))
            }
            _ => {
                protocol::response_error(command, request_id, "unknown_command", "Unknown command")
            }
        }
    }

    /// Delivers a frame to one agent; a full queue evicts it as a slow consumer.
    fn deliver(&mut self, agent_id: &str, frame: ByteString) -> bool {
        let Some(entry) = self.agents.get(agent_id) else {
            return false;
        };
        if entry.outbox.push(frame) == Err(PushError::Full) {
            self.evict(
                agent_id,
                EndReason::SlowConsumer,
                close_code::SLOW_CONSUMER,
                None,
            );
        }
        true
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(usize::MAX >> 4);
    }
}

impl Handler<AttachHeartbeat> for Registry {
    type Result = ();

    fn handle(&mut self, msg: AttachHeartbeat, _ctx: &mut Self::Context) {
        self.heartbeat = Some(msg.0);
    }
}

impl Handler<Connected> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Connected, _ctx: &mut Self::Context) {
        self.stats.sockets_opened += 1;
        if self.shutting_down {
            let notice =
                protocol::notification("network_shutdown", None, "The network is shutting down");
            let _ = msg.outbox.push_json(&notice);
        }
        self.sockets.insert(
            msg.session_id,
            Socket {
                addr: msg.addr,
                outbox: msg.outbox,
                remote_addr: msg.remote_addr,
                agent: None,
            },
        );
    }
}

impl Handler<ConnectionEnded> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ConnectionEnded, _ctx: &mut Self::Context) {
        let socket = self.sockets.remove(&msg.session_id);
        let agent_id = socket.and_then(|s| s.agent).or(msg.agent_id);
        if let Some(agent_id) = agent_id {
            let current = self
                .agents
                .get(&agent_id)
                .is_some_and(|e| e.session_id == msg.session_id);
            if current {
                let (agent_id, entry) = self
                    .agents
                    .remove_entry(&agent_id)
                    .expect("entry checked above");
                self.end_incarnation(&agent_id, entry, msg.reason, msg.close_code);
            }
        }
        self.check_waiters();
    }
}

impl Handler<RegisterAgent> for Registry {
    type Result = ();

    fn handle(&mut self, msg: RegisterAgent, _ctx: &mut Self::Context) {
        let session_id = msg.session_id;
        let Some(socket) = self.sockets.get(&session_id) else {
            return; // The socket closed while the request was in flight.
        };
        let remote_addr = socket.remote_addr.clone();
        if self.shutting_down {
            let error = "The network is shutting down";
            return self.refuse(
                session_id,
                &msg,
                "shutting_down",
                error,
                Some(close_code::GOING_AWAY),
            );
        }
        let now = epoch_secs();
        let certificate_ok = match &msg.certificate {
            Some(certificate) => {
                match self
                    .certificates
                    .validate_for(certificate, &msg.agent_id, now)
                {
                    Ok(()) => true,
                    Err(error) => {
                        let error = format!("Invalid certificate: {error}");
                        return self.refuse(session_id, &msg, "invalid_certificate", &error, None);
                    }
                }
            }
            None => false,
        };
        let mut takeover: Option<&'static str> = None;
        if let Some(existing) = self.agents.get(msg.agent_id.as_str()) {
            if let Some(reason) = self.holder_is_dead(existing) {
                let last_seen = existing.clock.last_seen_ms();
                self.declare_stale(&msg.agent_id, reason, last_seen);
            } else if certificate_ok {
                takeover = Some("certificate");
            } else if msg.force_reconnect && self.settings.identity.allow_force_reconnect {
                takeover = Some("force_reconnect");
            } else {
                let error = "Agent with this ID is already connected to the network. Use force_reconnect=true or provide valid certificate to override.";
                return self.refuse(session_id, &msg, "agent_id_in_use", error, None);
            }
        }
        if takeover.is_none() && self.agents.len() >= self.settings.network.max_connections {
            let error = format!(
                "The network is full ({} agents registered); try again later",
                self.settings.network.max_connections
            );
            return self.refuse(
                session_id,
                &msg,
                "server_full",
                &error,
                Some(close_code::TRY_AGAIN_LATER),
            );
        }

        let agent_id: Arc<str> = Arc::from(msg.agent_id.as_str());
        let incarnation = {
            let count = self.incarnations.entry(agent_id.clone()).or_insert(0);
            *count += 1;
            *count
        };
        let session_uuid: Arc<str> = uuid::Uuid::new_v4().to_string().into();
        if let Some(proof) = takeover {
            if let Some(old) = self.agents.get_mut(&agent_id) {
                self.stats.takeovers += 1;
                let mut data = old.event_data();
                data.insert("by_incarnation".into(), json!(incarnation));
                data.insert("by_session_id".into(), json!(&*session_uuid));
                data.insert("proof".into(), json!(proof));
                publish_event(
                    &self.bus,
                    &self.source,
                    &agent_id,
                    old,
                    EventKind::Replaced,
                    data,
                );
                let notice = protocol::notification(
                    "connection_replaced",
                    Some(&agent_id),
                    "Another connection registered as this agent; this connection is closed",
                );
                let notice = ByteString::from(notice.to_string());
                self.evict(
                    &agent_id,
                    EndReason::Replaced,
                    close_code::REPLACED,
                    Some(notice),
                );
            }
        }

        let socket = self
            .sockets
            .get_mut(&session_id)
            .expect("socket checked above");
        socket.agent = Some(agent_id.clone());
        let hb = &self.settings.heartbeat;
        let response = protocol::response_ok(
            "register_agent",
            msg.request_id.as_ref(),
            json!({
                "network_name": self.settings.network.name,
                "network_id": self.settings.network.id,
                "metadata": {},
                "agent_id": &*agent_id,
                "session_id": &*session_uuid,
                "incarnation": incarnation,
                "heartbeat_interval": hb.interval,
                "ping_timeout": hb.ping_timeout,
                "agent_timeout": hb.agent_timeout,
            }),
        );
        // Tell the connection first: it then handles `Accepted` (its mailbox comes
        // before its socket) before any frame the agent sends after reading the response.
        socket
            .addr
            .do_send(RegistrationOutcome::Accepted(agent_id.clone()));
        let _ = socket.outbox.push_json(&response);
        let mut entry = AgentEntry {
            session_id,
            session_uuid,
            incarnation,
            seq: 0,
            metadata: msg.metadata,
            remote_addr: remote_addr.clone(),
            connected_at: SystemTime::now(),
            connected_mono_ms: monotonic_ms(),
            clock: msg.clock,
            outbox: socket.outbox.clone(),
            addr: socket.addr.clone(),
            inactive: false,
            active_before_inactive: false,
        };
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.do_send(Track {
                session_id,
                agent_id: agent_id.clone(),
                clock: entry.clock.clone(),
                outbox: entry.outbox.clone(),
            });
        }
        let mut data = entry.event_data();
        data.insert("metadata".into(), entry.metadata.clone());
        data.insert("remote_addr".into(), json!(&*remote_addr));
        data.insert("takeover".into(), json!(takeover));
        self.publish(&agent_id, &mut entry, EventKind::Registered, data);
        self.agents.insert(agent_id, entry);
        self.stats.registered(self.agents.len());
    }
}

impl Handler<RegistrationRefused> for Registry {
    type Result = ();

    fn handle(&mut self, msg: RegistrationRefused, _ctx: &mut Self::Context) {
        self.registration_failed(msg.agent_id.as_deref(), &msg.error_code);
    }
}

impl Handler<SystemRequest> for Registry {
    type Result = ();

    fn handle(&mut self, msg: SystemRequest, _ctx: &mut Self::Context) {
        let answer = self.answer(msg.session_id, &msg.request);
        if let Some(socket) = self.sockets.get(&msg.session_id) {
            if socket.outbox.push_json(&answer) == Err(PushError::Full) {
                if let Some(agent_id) = self.agent_of(msg.session_id) {
                    self.evict(
                        &agent_id,
                        EndReason::SlowConsumer,
                        close_code::SLOW_CONSUMER,
                        None,
                    );
                }
            }
        }
    }
}

impl Handler<Route> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Route, _ctx: &mut Self::Context) {
        if self.agent_of(msg.session_id).as_deref() != Some(&*msg.sender_id) {
            return; // The sender was replaced or ended while the message was in flight.
        }
        match msg.kind {
            MessageKind::Direct(target) => {
                if !self.deliver(&target, msg.frame) {
                    let error = format!("Agent {target} is not connected");
                    let frame =
                        protocol::error_frame("unknown_agent", &error, Some(&msg.message_id));
                    let frame = ByteString::from(frame.to_string());
                    self.deliver(&msg.sender_id, frame);
                }
            }
            MessageKind::Broadcast(exclude) => {
                let mut slow = Vec::new();
                for (agent_id, entry) in &self.agents {
                    if *agent_id == msg.sender_id || exclude.iter().any(|e| **e == **agent_id) {
                        continue;
                    }
                    if entry.outbox.push(msg.frame.clone()) == Err(PushError::Full) {
                        slow.push(agent_id.clone());
                    }
                }
                for agent_id in slow {
                    self.evict(
                        &agent_id,
                        EndReason::SlowConsumer,
                        close_code::SLOW_CONSUMER,
                        None,
                    );
                }
            }
            MessageKind::Mod => {}
        }
    }
}

impl Handler<ActivityResumed> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ActivityResumed, _ctx: &mut Self::Context) {
        let Some(agent_id) = self.agent_of(msg.session_id) else {
            return;
        };
        let entry = self.agents.get_mut(&agent_id).expect("agent_of checked it");
        if entry.inactive {
            entry.inactive = false;
            self.inactive_count -= 1;
            let mut data = entry.event_data();
            let idle =
                monotonic_ms().saturating_sub(entry.clock.last_activity_ms()) as f64 / 1000.0;
            data.insert("inactive_secs".into(), json!(idle));
            publish_event(
                &self.bus,
                &self.source,
                &agent_id,
                entry,
                EventKind::Active,
                data,
            );
        } else {
            entry.active_before_inactive = true;
        }
    }
}

impl Handler<Verdict> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Verdict, _ctx: &mut Self::Context) {
        match msg {
            Verdict::Stale {
                session_id,
                reason,
                last_seen_ms,
            } => {
                if let Some(agent_id) = self.agent_of(session_id) {
                    self.declare_stale(&agent_id, reason, last_seen_ms);
                }
            }
            Verdict::Inactive {
                session_id,
                inactive_secs,
            } => {
                let Some(agent_id) = self.agent_of(session_id) else {
                    return;
                };
                let entry = self.agents.get_mut(&agent_id).expect("agent_of checked it");
                let (bus, source) = (&self.bus, &self.source);
                let mut data = entry.event_data();
                data.insert("inactive_secs".into(), json!(inactive_secs));
                publish_event(bus, source, &agent_id, entry, EventKind::Inactive, data);
                if entry.active_before_inactive {
                    entry.active_before_inactive = false;
                    let mut data = entry.event_data();
                    data.insert("inactive_secs".into(), json!(inactive_secs));
                    publish_event(bus, source, &agent_id, entry, EventKind::Active, data);
                } else {
                    entry.inactive = true;
                    self.inactive_count += 1;
                }
            }
            Verdict::SlowConsumer { session_id } => {
                if let Some(agent_id) = self.agent_of(session_id) {
                    self.evict(
                        &agent_id,
                        EndReason::SlowConsumer,
                        close_code::SLOW_CONSUMER,
                        None,
                    );
                }
            }
        }
    }
}

impl Handler<ListAgents> for Registry {
    type Result = MessageResult<ListAgents>;

    fn handle(&mut self, _msg: ListAgents, _ctx: &mut Self::Context) -> Self::Result {
        let mut agents: Vec<AgentInfo> =
            self.agents.iter().map(|(id, e)| self.info(id, e)).collect();
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        MessageResult(agents)
    }
}

impl Handler<GetAgent> for Registry {
    type Result = Option<AgentInfo>;

    fn handle(&mut self, msg: GetAgent, _ctx: &mut Self::Context) -> Self::Result {
        self.agents
            .get(msg.0.as_str())
            .map(|e| self.info(&msg.0, e))
    }
}

impl Handler<RemoveAgent> for Registry {
    type Result = bool;

    fn handle(&mut self, msg: RemoveAgent, _ctx: &mut Self::Context) -> bool {
        if !self.agents.contains_key(msg.0.as_str()) {
            return false;
        }
        self.evict(&msg.0, EndReason::Admin, close_code::NORMAL, None);
        true
    }
}

impl Handler<GetStats> for Registry {
    type Result = MessageResult<GetStats>;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Self::Context) -> Self::Result {
        let snapshot =
            self.stats
                .snapshot(self.agents.len(), self.inactive_count, self.sockets.len());
        MessageResult(snapshot)
    }
}

impl Handler<BeginShutdown> for Registry {
    type Result = usize;

    fn handle(&mut self, msg: BeginShutdown, _ctx: &mut Self::Context) -> usize {
        self.shutting_down = true;
        let mut notice = protocol::notification(
            "network_shutdown",
            None,
            "The network is shutting down; disconnect now",
        );
        notice["timeout"] = json!(msg.timeout_secs);
        let notice = ByteString::from(notice.to_string());
        for socket in self.sockets.values() {
            let _ = socket.outbox.push(notice.clone());
        }
        let mut data = Map::new();
        data.insert("agents".into(), json!(self.agents.len()));
        data.insert("open_sockets".into(), json!(self.sockets.len()));
        data.insert("timeout".into(), json!(msg.timeout_secs));
        let event = LifecycleEvent::network(&self.source, EventKind::NetworkStopping, data);
        self.bus.do_send(Publish(Arc::new(event)));
        self.agents.len()
    }
}

impl Handler<WaitFor> for Registry {
    type Result = ();

    fn handle(&mut self, msg: WaitFor, _ctx: &mut Self::Context) {
        self.waiters.push((msg.condition, msg.reply));
        self.check_waiters();
    }
}

impl Handler<CloseAll> for Registry {
    type Result = usize;

    fn handle(&mut self, _msg: CloseAll, _ctx: &mut Self::Context) -> usize {
        let agents: Vec<Arc<str>> = self.agents.keys().cloned().collect();
        for agent_id in &agents {
            self.evict(agent_id, EndReason::Shutdown, close_code::GOING_AWAY, None);
        }
        for socket in self.sockets.values() {
            socket.addr.do_send(Close {
                code: close_code::GOING_AWAY,
                reason: EndReason::Shutdown,
                notice: None,
            });
        }
        agents.len()
    }
}

//! The registry actor: the table of agent id → connection, and the one owner of every
//! agent's lifecycle.
//!
//! It validates registrations and takeovers ([`registration`]; those that involve other
//! nodes of a cluster in [`remote`]), numbers incarnations
//! and events and ends incarnations ([`lifecycle`]), routes messages and answers the
//! requests that need the table ([`routing`]; messages between agents go through the
//! [`Routes`] it keeps, read by the connections), and serves the admin API and the
//! shutdown sequence ([`admin`]). Whenever a connection ends, for any reason, the
//! registry ends its incarnation with exactly one `agent.disconnected` and one
//! `agent.cleaned_up`. Ends the registry decides itself (takeover, stale, admin, slow
//! consumer, shutdown) are published at once, before the connection is told to close,
//! so a dead or slow connection can never hold an agent id or delay the next
//! incarnation.
//!
//! It talks to the rest only through [`Recipient`]s: each connection's
//! [`ConnectionOrder`]s, the heartbeat's [`Watch`], the bus's [`Publish`].

mod admin;
mod incarnations;
mod lifecycle;
pub mod messages;
mod registration;
mod remote;
mod routing;
#[cfg(test)]
mod tests;

pub use messages::*;

use crate::bus::Publish;
use crate::clock::Clock;
use crate::cluster::Cluster;
use crate::event::EventSource;
use crate::heartbeat::Watch;
use crate::identity::CertificateAuthority;
use crate::instructions::Presence;
use crate::liveness::{ConnectionClock, Liveness, SessionId};
use crate::outbound::Outbox;
use crate::routes::Routes;
use crate::settings::Settings;
use crate::stats::Stats;
use actix::prelude::*;
use incarnations::Incarnations;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::oneshot;

/// A live WebSocket, registered or not.
struct Socket {
    orders: Recipient<ConnectionOrder>,
    outbox: Outbox,
    remote_addr: Arc<str>,
    /// The agent id this socket is currently registered as.
    agent: Option<Arc<str>>,
    /// `claim_agent_id` requests this socket made (bounded by
    /// `limits.max_claims_per_connection`).
    claims: u32,
}

impl Socket {
    /// Gives the connection `order` after the frames already sent to it.
    fn order(&self, order: ConnectionOrder) {
        self.outbox.then_send(None, &self.orders, order);
    }

    /// Sends the connection `answer`, then `order` in the same relay turn.
    fn answer_then(&self, answer: &serde_json::Value, order: ConnectionOrder) {
        let answer = crate::outbound::OutFrame::json(answer);
        self.outbox.then_send(Some(answer), &self.orders, order);
    }
}

/// One registered incarnation of an agent. Its connection's outbox and orders are in
/// its [`Socket`] (`sockets[&session_id]`): a cloned address costs about 130 bytes.
struct AgentEntry {
    session_id: SessionId,
    /// The protocol's `session_id`: unique per connection.
    session_uuid: uuid::Uuid,
    incarnation: u64,
    /// Sequence number of the last event published for this incarnation.
    seq: u64,
    /// Registration metadata, kept as the JSON text it was sent as: a parsed object
    /// costs a B-tree node (~600 bytes) whatever its size.
    metadata: Box<RawValue>,
    remote_addr: Arc<str>,
    connected_at: SystemTime,
    connected_mono_ms: u64,
    clock: Arc<ConnectionClock>,
    /// Whether consumers were last told `agent.inactive` (the published state).
    inactive: bool,
}

impl AgentEntry {
    fn name(&self, agent_id: &str) -> String {
        /// The one field of the metadata that is read.
        #[derive(serde::Deserialize)]
        struct Named {
            name: Option<Value>,
        }
        serde_json::from_str::<Named>(self.metadata.get())
            .ok()
            .and_then(|named| named.name?.as_str().map(str::to_owned))
            .unwrap_or_else(|| agent_id.to_owned())
    }
}

/// The registry actor.
pub struct Registry {
    settings: Arc<Settings>,
    rules: Liveness,
    clock: Clock,
    source: EventSource,
    events: Recipient<Publish>,
    heartbeat: Recipient<Watch>,
    sockets: HashMap<SessionId, Socket>,
    agents: HashMap<Arc<str>, AgentEntry>,
    /// The agents' outboxes, for the connections to route messages (kept with `agents`).
    routes: Arc<Routes>,
    /// Last incarnation numbers of ids that left: incarnations only grow.
    incarnations: Incarnations,
    /// Bytes of registration metadata held in `agents`.
    metadata_bytes: usize,
    certificates: CertificateAuthority,
    stats: Stats,
    inactive_count: usize,
    shutting_down: bool,
    waiters: Vec<(Drained, oneshot::Sender<()>)>,
    /// The cluster this node belongs to, if clustered: ids are claimed there.
    cluster: Option<Addr<Cluster>>,
    /// The id a local takeover is re-registering (its old incarnation's end must not
    /// release the claim the new one holds).
    retaking: Option<Arc<str>>,
    /// Ids this node is taking over from another node (registrations of them wait).
    taking_over: HashSet<Arc<str>>,
    /// Ids whose claim is in flight to the cluster, with their metadata's size (other
    /// registrations go on meanwhile; those of the same id are refused).
    claiming: HashMap<Arc<str>, usize>,
    /// Bytes of metadata of the registrations in `claiming`.
    claiming_bytes: usize,
    /// Counts this node's lease losses: a claim granted before one is not admitted.
    lease_losses: u64,
    /// The instruction dispatcher: told when agents that take instructions come and go.
    presence: Option<Recipient<Presence>>,
}

impl Registry {
    /// A registry publishing to `events` as `source`, having agents watched by
    /// `heartbeat`, signing certificates with `secret`, keeping `routes` for the
    /// connections.
    pub fn new(
        settings: Arc<Settings>,
        source: EventSource,
        events: Recipient<Publish>,
        heartbeat: Recipient<Watch>,
        secret: Vec<u8>,
        routes: Arc<Routes>,
    ) -> Self {
        let ttl = settings.identity.certificate_ttl;
        let claim_ttl = settings.identity.claim_ttl;
        let max_unbound = settings.limits.max_outstanding_claims;
        let remembered = settings.limits.remembered_agent_ids;
        Self {
            rules: Liveness::new(&settings.heartbeat),
            settings,
            clock: Clock::Monotonic,
            source,
            events,
            heartbeat,
            sockets: HashMap::new(),
            agents: HashMap::new(),
            routes,
            incarnations: Incarnations::new(remembered),
            metadata_bytes: 0,
            certificates: CertificateAuthority::new(secret, ttl)
                .with_claim_limits(claim_ttl, max_unbound),
            stats: Stats::new(),
            inactive_count: 0,
            shutting_down: false,
            waiters: Vec::new(),
            cluster: None,
            retaking: None,
            taking_over: HashSet::new(),
            claiming: HashMap::new(),
            claiming_bytes: 0,
            lease_losses: 0,
            presence: None,
        }
    }

    /// The same registry telling `presence` when agents that take instructions come
    /// and go.
    pub fn with_instructions(mut self, presence: Recipient<Presence>) -> Self {
        self.presence = Some(presence);
        self
    }

    /// The same registry claiming ids in `cluster`.
    pub fn with_cluster(mut self, cluster: Addr<Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// The same registry deciding liveness on `clock` (the heartbeat's, in tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The agent id currently registered by `session_id`, if that session still holds it.
    fn agent_of(&self, session_id: SessionId) -> Option<Arc<str>> {
        let agent_id = self.sockets.get(&session_id)?.agent.clone()?;
        let entry = self.agents.get(&agent_id)?;
        (entry.session_id == session_id).then_some(agent_id)
    }

    /// Resolves the [`WaitFor`]s whose condition now holds.
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
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(usize::MAX >> 4);
    }
}

//! The cluster actor: this node's membership of a Tether network spread over several
//! processes, coordinated through Redis (no consensus of our own).
//!
//! A node joins as a *member* with a lease (`cluster.node_lease`) it refreshes at a
//! third of its length ([`membership`]). Agent ids are claimed in Redis by one Lua
//! script per id ([`scripts`]): one holder per id cluster-wide, incarnations counted
//! there. A member whose lease expired is lost: one survivor ends the incarnations it
//! held (`agent.disconnected` reason `node_lost`), and the lost member, should it come
//! back, closes its agents (4009) and joins again under a new member id: it never
//! serves an id it may have lost. Messages for agents of other nodes go over Redis
//! pub/sub ([`crossing`]).
//!
//! The registry asks it to [`Claim`] and [`Release`] ids and tells it an incarnation's
//! [`Progress`], and to [`TakeOver`] an id held live on another node ([`takeover`]);
//! connections hand it what the local routing table could not deliver.

mod claims;
mod crossing;
mod direct;
mod directory;
mod keys;
mod link;
mod membership;
mod recovery;
mod scripts;
mod takeover;

pub use crossing::Spread;
pub use direct::{DirectLine, Forward, HOLDER_TTL};
pub use directory::{ClusterNodes, GetHeld, HeldAgent, ListHeld, NodeInfo, RemoveHeld};
pub use keys::Keys;
pub use link::{Ended, RedisLink, RedisTarget, CLUSTER_SCHEME};
pub use takeover::{Answer, HandOver, HandoverRequest, TakeOver, Transfer};

use crate::bus::{Publish, SettleAll};
use crate::event::EventSource;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::routes::Routes;
use crate::settings::{secs, ClusterSettings};
use actix::prelude::*;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest a Redis command may take before the cluster counts Redis as unreachable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Redis could not be reached, or this node is not a live member right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterUnavailable(pub String);

impl std::fmt::Display for ClusterUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The cluster actor's answer to a request, with its failures as the error agents
/// get: `cluster_unavailable` (retryable).
pub fn answered<T>(
    answer: Result<Result<T, ClusterUnavailable>, MailboxError>,
) -> Result<T, ProtocolError> {
    match answer {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(unavailable)) => Err(ProtocolError::new(
            ErrorCode::ClusterUnavailable,
            unavailable.0,
        )),
        Err(_) => Err(ErrorCode::ClusterUnavailable.into()),
    }
}

/// What became of a [`Claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This node holds the id now, as this incarnation.
    Granted {
        /// The cluster-wide incarnation number.
        incarnation: u64,
    },
    /// A live agent on another node holds it.
    HeldElsewhere {
        /// The member holding it.
        member: String,
    },
}

/// Claims `agent_id` for this node (answered once the claim is in Redis).
#[derive(Message)]
#[rtype(result = "Result<ClaimOutcome, ClusterUnavailable>")]
pub struct Claim {
    /// The id.
    pub agent_id: Arc<str>,
    /// The new connection's protocol session id.
    pub session: String,
    /// Its registration metadata (JSON), kept for the end a reaper publishes.
    pub metadata: String,
}

/// The incarnation of `agent_id` ended here: the id is free cluster-wide.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Release {
    /// The id.
    pub agent_id: Arc<str>,
    /// The incarnation that ended (a later one is left alone).
    pub incarnation: u64,
}

/// An event numbered `seq` was published for a held incarnation.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Progress {
    /// The id.
    pub agent_id: Arc<str>,
    /// The incarnation.
    pub incarnation: u64,
    /// The seq of its last event.
    pub seq: u64,
}

/// Told to the registry: this node lost its lease; every agent it holds must be closed
/// (4009) without publishing their ends (the reaper publishes them).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct LeaseLost;

/// Where this node stands in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Not (or no longer) a member: joining at the next tick.
    Outside,
    /// A member whose lease Redis last confirmed at this instant (when the refresh was
    /// sent).
    Member { confirmed: Instant },
}

/// The cluster actor.
pub struct Cluster {
    settings: ClusterSettings,
    keys: Keys,
    node_id: Arc<str>,
    /// The member id this node holds its lease as (a new one after each loss).
    member: Arc<str>,
    joins: u32,
    standing: Standing,
    target: RedisTarget,
    redis: Option<RedisLink>,
    routes: Arc<Routes>,
    events: Recipient<Publish>,
    source: EventSource,
    /// Where acknowledgement of this node's events is awaited (the bus).
    settle: Recipient<SettleAll>,
    registry: Option<TellRegistry>,
    max_connections: usize,
    /// A lease or sweep round trip is in flight (ticks do not pile up).
    busy: bool,
    subscriber: Option<SpawnHandle>,
    /// The subscriber listens (set and cleared by it).
    subscribed: Arc<AtomicBool>,
    /// Releases that failed while Redis was unreachable, retried once it answers.
    unreleased: Vec<Release>,
    /// Takeover requests sent (their ids).
    requests: u64,
    /// Takeover requests waiting for the holder's answer.
    waiting: takeover::Waiting,
    /// What the worker threads send direct messages to other nodes with.
    direct: Arc<DirectLine>,
    /// The node is shutting down (said in its lease: no new agents are sent here).
    leaving: bool,
    /// The lease is refreshed at the next tick (its description changed).
    announce: bool,
}

impl Cluster {
    /// The cluster actor of node `node_id`, delivering to `routes`, publishing the
    /// ends of lost members' agents to `events` as `source`, waiting for this node's
    /// events to be acknowledged through `settle` (the bus).
    pub fn new(
        settings: ClusterSettings,
        node_id: &str,
        max_connections: usize,
        routes: Arc<Routes>,
        events: Recipient<Publish>,
        settle: Recipient<SettleAll>,
        source: EventSource,
    ) -> Result<Self, ClusterUnavailable> {
        let target = RedisTarget::open(&settings.redis_url).map_err(|e| {
            ClusterUnavailable(format!("cluster.redis_url is not a usable Redis URL: {e}"))
        })?;
        let direct = Arc::new(DirectLine::new(
            target.clone(),
            Keys::new(&settings.prefix),
            node_id.into(),
            routes.clone(),
        ));
        Ok(Self {
            keys: Keys::new(&settings.prefix),
            node_id: node_id.into(),
            member: node_id.into(),
            joins: 0,
            standing: Standing::Outside,
            target,
            redis: None,
            routes,
            events,
            settle,
            source,
            registry: None,
            max_connections,
            busy: false,
            subscriber: None,
            subscribed: Arc::new(AtomicBool::new(false)),
            unreleased: Vec::new(),
            requests: 0,
            waiting: Default::default(),
            direct,
            leaving: false,
            announce: false,
            settings,
        })
    }

    /// What the worker threads send direct messages to other nodes with (give it to
    /// the connections).
    pub fn direct_line(&self) -> Arc<DirectLine> {
        self.direct.clone()
    }

    /// The length of the lease.
    fn lease(&self) -> Duration {
        secs(self.settings.node_lease)
    }

    /// The connection to Redis, if this node is a live member.
    fn live(&self) -> Result<RedisLink, ClusterUnavailable> {
        match (&self.redis, self.standing) {
            (Some(redis), Standing::Member { .. }) => Ok(redis.clone()),
            _ => Err(ClusterUnavailable(
                "this node is not connected to its cluster (Redis unreachable or the \
                 node is rejoining); try again shortly"
                    .into(),
            )),
        }
    }

    /// Leaves the cluster: the lease is gone (or may be), so the agents go too.
    fn fence(&mut self, ctx: &mut Context<Self>, why: &str) {
        log::warn!(
            "cluster: member {} lost its lease ({why}); closing its agents (4009) and \
             joining again",
            self.member
        );
        self.standing = Standing::Outside;
        self.direct.set_member(None);
        // The lost member's claims are the reaper's now.
        self.unreleased.clear();
        if let Some(subscriber) = self.subscriber.take() {
            ctx.cancel_future(subscriber);
            self.subscribed.store(false, Ordering::Release);
        }
        if let Some(registry) = &self.registry {
            registry.lease_lost.do_send(LeaseLost);
        }
        crate::metrics::cluster_fenced();
    }
}

/// Introduces the registry (once it exists): told when the lease is lost and when
/// another node takes over one of its ids.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct TellRegistry {
    /// Where [`LeaseLost`] goes.
    pub lease_lost: Recipient<LeaseLost>,
    /// Where [`HandOver`] goes.
    pub hand_over: Recipient<HandOver>,
    /// Where removals asked by other nodes (`DELETE /agents/{id}`) go.
    pub remove: Recipient<crate::registry::RemoveAgent>,
    /// Asked for the claims to re-assert after Redis lost them.
    pub held_claims: Recipient<crate::registry::HeldClaims>,
    /// Told what became of them.
    pub reasserted: Recipient<crate::registry::ClaimsReasserted>,
}

impl Handler<TellRegistry> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: TellRegistry, _ctx: &mut Self::Context) {
        self.registry = Some(msg);
    }
}

impl Actor for Cluster {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(usize::MAX >> 4);
        ctx.wait(fut::wrap_future(self.target.clone().connect()).map(
            |connected, act: &mut Self, _| match connected {
                Ok(redis) => act.redis = Some(redis),
                Err(error) => log::warn!("cluster: {error}; retrying"),
            },
        ));
        let lease = self.lease();
        let tick = (lease / 3).min(Duration::from_secs(1));
        self.tick(ctx);
        ctx.run_interval(tick, |act, ctx| act.tick(ctx));
    }
}

impl Handler<Claim> for Cluster {
    type Result = ResponseActFuture<Self, Result<ClaimOutcome, ClusterUnavailable>>;

    fn handle(&mut self, msg: Claim, _ctx: &mut Self::Context) -> Self::Result {
        let redis = match self.live() {
            Ok(redis) => redis,
            Err(error) => return Box::pin(fut::ready(Err(error))),
        };
        let claim = claims::claim(
            redis,
            self.keys.clone(),
            self.member.clone(),
            self.events.clone(),
            self.source.clone(),
            msg,
        );
        Box::pin(fut::wrap_future(claim))
    }
}

impl Handler<Release> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: Release, ctx: &mut Self::Context) {
        let Some(redis) = self.redis.clone() else {
            return; // Our claims go with the lease: the reaper ends them.
        };
        let release = claims::release(redis, self.keys.clone(), self.member.clone(), msg);
        ctx.spawn(fut::wrap_future(release).map(|result, act: &mut Self, _| {
            if let Err(msg) = result {
                act.unreleased.push(msg);
            }
        }));
    }
}

impl Handler<Progress> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: Progress, ctx: &mut Self::Context) {
        if let Some(redis) = self.redis.clone() {
            let progress = claims::progress(redis, self.keys.clone(), self.member.clone(), msg);
            ctx.spawn(fut::wrap_future(progress));
        }
    }
}

/// The node is shutting down: its lease says so at once, and `/connect` sends no new
/// agents here.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leaving;

impl Handler<Leaving> for Cluster {
    type Result = ();

    fn handle(&mut self, _msg: Leaving, ctx: &mut Self::Context) {
        self.leaving = true;
        self.announce = true;
        self.tick(ctx);
    }
}

/// Which live member other than this one holds an id (`None`: free, or held here).
#[derive(Message)]
#[rtype(result = "Result<Option<String>, ClusterUnavailable>")]
pub struct HeldBy(pub Arc<str>);

impl Handler<HeldBy> for Cluster {
    type Result = ResponseFuture<Result<Option<String>, ClusterUnavailable>>;

    fn handle(&mut self, msg: HeldBy, _ctx: &mut Self::Context) -> Self::Result {
        let redis = match self.live() {
            Ok(redis) => redis,
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        let lookup = claims::held_elsewhere(redis, self.keys.clone(), self.member.clone(), msg.0);
        Box::pin(lookup)
    }
}

/// Where this node stands in its cluster (`/readyz`, `/stats`).
#[derive(Message)]
#[rtype(result = "ClusterStatus")]
pub struct GetClusterStatus;

/// The answer to [`GetClusterStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// The member id this node holds (or will hold) its lease as.
    pub member: String,
    /// A live member: its lease is confirmed.
    pub joined: bool,
    /// Listening for messages from other nodes.
    pub subscribed: bool,
}

impl ClusterStatus {
    /// Whether the node can serve agents as part of its cluster.
    pub fn ready(&self) -> bool {
        self.joined && self.subscribed
    }
}

impl Handler<GetClusterStatus> for Cluster {
    type Result = MessageResult<GetClusterStatus>;

    fn handle(&mut self, _msg: GetClusterStatus, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(ClusterStatus {
            member: self.member.to_string(),
            joined: matches!(self.standing, Standing::Member { .. }),
            subscribed: self.subscribed.load(Ordering::Acquire),
        })
    }
}

//! Membership: joining with a lease, refreshing it, noticing members whose lease ran
//! out and ending their agents (once, by one survivor), and claiming and releasing ids.

use super::{scripts, Claim, ClaimOutcome, Cluster, ClusterUnavailable, Keys, Progress, Release};
use super::{Standing, RESPONSE_TIMEOUT};
use crate::bus::Publish;
use crate::clock::epoch_secs;
use crate::event::{AgentEvent, EventSource, LifecycleEvent, CLEANUP_STEPS};
use crate::routes::Routes;
use actix::prelude::*;
use redis::aio::ConnectionManager;
use redis::Value as Reply;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// What a member says of itself in its lease (and `GET /cluster/nodes` shows).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    /// The member id (the node id, suffixed after a rejoin).
    pub member: String,
    /// The node (process) id, as in its events' `source`.
    pub node_id: String,
    /// The `ws://` URL agents use to reach it.
    pub advertise_url: String,
    /// Agents it held at its last lease refresh.
    pub agents: usize,
    /// Its `network.max_connections`.
    pub max_connections: usize,
    /// Whether it is shutting down (no new agents).
    #[serde(default)]
    pub shutting_down: bool,
}

/// The live members of the cluster, read from their leases.
#[derive(Message)]
#[rtype(result = "Result<Vec<NodeInfo>, ClusterUnavailable>")]
pub struct ClusterNodes;

/// Redis failed: the message for the client and the log.
fn unavailable(what: &str, error: &redis::RedisError) -> ClusterUnavailable {
    ClusterUnavailable(format!(
        "the cluster's Redis did not answer ({what}: {error})"
    ))
}

/// The text of a bulk-string (or integer) reply.
fn text(reply: &Reply) -> Option<String> {
    match reply {
        Reply::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Reply::SimpleString(s) => Some(s.clone()),
        Reply::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn number(reply: Option<&Reply>) -> u64 {
    reply
        .and_then(text)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// An incarnation whose holder is gone, read back from its agent's hash.
struct Orphan {
    incarnation: u64,
    seq: u64,
    session: String,
    metadata: String,
    at: f64,
}

impl Orphan {
    /// From `inc, seq, session, meta, at` replies.
    fn from_replies(fields: &[Reply]) -> Option<Self> {
        let incarnation = number(fields.first());
        (incarnation > 0).then(|| Self {
            incarnation,
            seq: number(fields.get(1)),
            session: fields.get(2).and_then(text).unwrap_or_default(),
            metadata: fields.get(3).and_then(text).unwrap_or_else(|| "{}".into()),
            at: fields
                .get(4)
                .and_then(text)
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.0),
        })
    }

    /// Publishes the end of this incarnation of `agent_id` as a node loss.
    fn publish_end(&self, events: &Recipient<Publish>, source: &EventSource, agent_id: &str) {
        let metadata = RawValue::from_string(self.metadata.clone())
            .unwrap_or_else(|_| RawValue::from_string("{}".into()).expect("valid JSON"));
        let agent_id: Arc<str> = agent_id.into();
        let disconnected = AgentEvent::Disconnected {
            session_id: &self.session,
            reason: "node_lost",
            close_code: None,
            metadata: &metadata,
        };
        let cleaned = AgentEvent::CleanedUp {
            session_id: &self.session,
            connected_secs: (epoch_secs() - self.at).max(0.0),
            steps: CLEANUP_STEPS,
        };
        for (seq, payload) in [(self.seq + 1, disconnected), (self.seq + 2, cleaned)] {
            let event =
                LifecycleEvent::agent(source, agent_id.clone(), self.incarnation, seq, &payload);
            events.do_send(Publish(Arc::new(event)));
        }
        crate::metrics::node_lost_agent();
    }
}

/// Runs [`scripts::CLAIM`] for `msg.agent_id` with `lost` as the holder known lost.
async fn run_claim(
    redis: &mut ConnectionManager,
    keys: &Keys,
    member: &str,
    msg: &Claim,
    lost: &str,
) -> Result<Vec<Reply>, ClusterUnavailable> {
    let mut pipe = redis::pipe();
    pipe.cmd("SADD")
        .arg(keys.held(member))
        .arg(&*msg.agent_id)
        .ignore()
        .cmd("EVAL")
        .arg(scripts::CLAIM)
        .arg(1)
        .arg(keys.agent(&msg.agent_id))
        .arg(member)
        .arg(&msg.session)
        .arg(&msg.metadata)
        .arg(lost)
        .arg(epoch_secs());
    let (reply,): (Vec<Reply>,) = pipe
        .query_async(redis)
        .await
        .map_err(|e| unavailable("claim", &e))?;
    Ok(reply)
}

/// Claims an id: free, ours, or taken from a member whose lease is gone (whose
/// incarnation's end is published here, before the claim is answered).
pub(super) async fn claim(
    mut redis: ConnectionManager,
    keys: Keys,
    member: Arc<str>,
    events: Recipient<Publish>,
    source: EventSource,
    msg: Claim,
) -> Result<ClaimOutcome, ClusterUnavailable> {
    let mut lost = String::new();
    loop {
        let reply = run_claim(&mut redis, &keys, &member, &msg, &lost).await?;
        match reply.first().and_then(text).as_deref() {
            Some("granted") => {
                if let Some(orphan) = Orphan::from_replies(&reply[2..]) {
                    orphan.publish_end(&events, &source, &msg.agent_id);
                }
                return Ok(ClaimOutcome::Granted {
                    incarnation: number(reply.get(1)),
                });
            }
            Some("held") => {
                let holder = reply.get(1).and_then(text).unwrap_or_default();
                let alive: bool = redis::cmd("EXISTS")
                    .arg(keys.lease(&holder))
                    .query_async(&mut redis)
                    .await
                    .map_err(|e| unavailable("lease lookup", &e))?;
                if alive || holder == lost {
                    return Ok(ClaimOutcome::HeldElsewhere { member: holder });
                }
                lost = holder; // Claim again, taking it from the lost member.
            }
            _ => {
                return Err(ClusterUnavailable(format!(
                    "unexpected claim reply {reply:?}"
                )))
            }
        }
    }
}

/// Frees an id this member held (the incarnation that ended only).
pub(super) async fn release(
    mut redis: ConnectionManager,
    keys: Keys,
    member: Arc<str>,
    msg: Release,
) -> Result<(), Release> {
    let mut pipe = redis::pipe();
    pipe.cmd("EVAL")
        .arg(scripts::RELEASE)
        .arg(1)
        .arg(keys.agent(&msg.agent_id))
        .arg(&*member)
        .arg(msg.incarnation)
        .ignore()
        .cmd("SREM")
        .arg(keys.held(&member))
        .arg(&*msg.agent_id)
        .ignore();
    if let Err(error) = pipe.query_async::<()>(&mut redis).await {
        log::warn!(
            "cluster: releasing {} failed ({error}); retried once Redis answers",
            msg.agent_id
        );
        return Err(msg);
    }
    Ok(())
}

/// Retries a release that failed while Redis was unreachable: the id is freed if this
/// member still holds that incarnation, and left off the member's list unless this
/// node holds the id again.
pub(super) async fn release_again(
    mut redis: ConnectionManager,
    keys: Keys,
    member: Arc<str>,
    routes: Arc<Routes>,
    msg: Release,
) -> Result<(), Release> {
    let released: Result<Option<Vec<Reply>>, _> = redis::cmd("EVAL")
        .arg(scripts::RELEASE)
        .arg(1)
        .arg(keys.agent(&msg.agent_id))
        .arg(&*member)
        .arg(msg.incarnation)
        .query_async(&mut redis)
        .await;
    match released {
        Ok(Some(_)) if !routes.contains(&msg.agent_id) => {
            let _ = redis::cmd("SREM")
                .arg(keys.held(&member))
                .arg(&*msg.agent_id)
                .query_async::<()>(&mut redis)
                .await;
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(_) => Err(msg),
    }
}

/// Records an incarnation's last seq.
pub(super) async fn progress(
    mut redis: ConnectionManager,
    keys: Keys,
    member: Arc<str>,
    msg: Progress,
) {
    let result = redis::cmd("EVAL")
        .arg(scripts::PROGRESS)
        .arg(1)
        .arg(keys.agent(&msg.agent_id))
        .arg(&*member)
        .arg(msg.incarnation)
        .arg(msg.seq)
        .query_async::<()>(&mut redis)
        .await;
    if let Err(error) = result {
        log::debug!(
            "cluster: recording the seq of {} failed: {error}",
            msg.agent_id
        );
    }
}

/// Ends the agents of `lost` once, if this node wins the right to.
async fn reap(
    mut redis: ConnectionManager,
    keys: Keys,
    reaper: Arc<str>,
    lost: String,
    lease_ms: u64,
    events: Recipient<Publish>,
    source: EventSource,
) -> Result<usize, redis::RedisError> {
    let won: Option<String> = redis::cmd("SET")
        .arg(keys.reaping(&lost))
        .arg(&*reaper)
        .arg("NX")
        .arg("PX")
        .arg(lease_ms)
        .query_async(&mut redis)
        .await?;
    if won.is_none() {
        return Ok(0); // Another survivor reaps it.
    }
    let held: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys.held(&lost))
        .query_async(&mut redis)
        .await?;
    let mut ended = 0;
    for chunk in held.chunks(256) {
        let mut pipe = redis::pipe();
        for agent_id in chunk {
            pipe.cmd("EVAL")
                .arg(scripts::RELEASE)
                .arg(1)
                .arg(keys.agent(agent_id))
                .arg(&lost)
                .arg("");
        }
        let replies: Vec<Reply> = pipe.query_async(&mut redis).await?;
        for (agent_id, reply) in chunk.iter().zip(replies) {
            if let Reply::Array(fields) = reply {
                if let Some(orphan) = Orphan::from_replies(&fields) {
                    orphan.publish_end(&events, &source, agent_id);
                    ended += 1;
                }
            }
        }
    }
    redis::pipe()
        .cmd("DEL")
        .arg(keys.held(&lost))
        .ignore()
        .cmd("HDEL")
        .arg(keys.members())
        .arg(&lost)
        .ignore()
        .query_async::<()>(&mut redis)
        .await?;
    log::warn!("cluster: member {lost} lost its lease; ended its {ended} agents (node_lost)");
    Ok(ended)
}

/// The members of `members` (id → description) whose lease is gone.
async fn lost_members(
    redis: &mut ConnectionManager,
    keys: &Keys,
    me: &str,
) -> Result<Vec<String>, redis::RedisError> {
    let members: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.members())
        .query_async(redis)
        .await?;
    let others: Vec<String> = members.into_keys().filter(|m| m != me).collect();
    if others.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for member in &others {
        pipe.cmd("EXISTS").arg(keys.lease(member));
    }
    let alive: Vec<bool> = pipe.query_async(redis).await?;
    Ok(others
        .into_iter()
        .zip(alive)
        .filter_map(|(member, alive)| (!alive).then_some(member))
        .collect())
}

/// What a lease round trip found.
enum LeaseCheck {
    /// Redis confirmed the lease (refreshed, or taken on joining) at this instant.
    Confirmed(Instant),
    /// The lease was gone when it was refreshed.
    Expired,
    /// Redis did not answer.
    Unreachable(String),
}

impl Cluster {
    /// This member's description.
    fn info(&self) -> String {
        let info = NodeInfo {
            member: self.member.to_string(),
            node_id: self.node_id.to_string(),
            advertise_url: self.settings.advertise_url.clone(),
            agents: self.routes.len(),
            max_connections: self.max_connections,
            shutting_down: false,
        };
        serde_json::to_string(&info).expect("node info serializes")
    }

    /// Every tick: join, refresh the lease when a third of it has passed, and look for
    /// lost members.
    pub(super) fn tick(&mut self, ctx: &mut Context<Self>) {
        let lease = self.lease();
        if let Standing::Member { confirmed } = self.standing {
            // Unconfirmed for most of the lease: Redis may have let it expire already.
            if confirmed.elapsed() >= lease.mul_f64(0.8) {
                self.fence(
                    ctx,
                    "not confirmed by Redis within 80 % of cluster.node_lease",
                );
            }
        }
        if self.busy {
            return;
        }
        let Some(mut redis) = self.redis.clone() else {
            self.busy = true;
            let client = self.client.clone();
            let connect = super::connect(client);
            ctx.spawn(
                fut::wrap_future(connect).map(|connected, act: &mut Self, ctx| {
                    act.busy = false;
                    match connected {
                        Ok(redis) => {
                            act.redis = Some(redis);
                            act.tick(ctx);
                        }
                        Err(error) => log::warn!("cluster: {error}; retrying"),
                    }
                }),
            );
            return;
        };
        let joining = self.standing == Standing::Outside;
        if joining && self.joins > 0 {
            self.member = format!("{}.{}", self.node_id, self.joins).into();
        }
        let refresh = match self.standing {
            Standing::Outside => true,
            Standing::Member { confirmed } => confirmed.elapsed() >= lease / 3,
        };
        let (keys, member, info) = (self.keys.clone(), self.member.clone(), self.info());
        let lease_ms = lease.as_millis() as u64;
        let (events, source) = (self.events.clone(), self.source.clone());
        self.busy = true;
        let round = async move {
            let check = if refresh {
                let sent = Instant::now();
                let mut set = redis::cmd("SET");
                set.arg(keys.lease(&member))
                    .arg(&info)
                    .arg(if joining { "NX" } else { "XX" })
                    .arg("PX")
                    .arg(lease_ms);
                let mut pipe = redis::pipe();
                pipe.add_command(set)
                    .cmd("HSET")
                    .arg(keys.members())
                    .arg(&*member)
                    .arg(&info)
                    .ignore();
                match pipe.query_async::<(Option<String>,)>(&mut redis).await {
                    Ok((Some(_),)) => Some(LeaseCheck::Confirmed(sent)),
                    Ok((None,)) => Some(LeaseCheck::Expired),
                    Err(error) => Some(LeaseCheck::Unreachable(error.to_string())),
                }
            } else {
                None
            };
            let confirmed = !matches!(
                check,
                Some(LeaseCheck::Expired | LeaseCheck::Unreachable(_))
            );
            if confirmed && !joining {
                match lost_members(&mut redis, &keys, &member).await {
                    Ok(lost) => {
                        for lost in lost {
                            let reaped = reap(
                                redis.clone(),
                                keys.clone(),
                                member.clone(),
                                lost.clone(),
                                lease_ms,
                                events.clone(),
                                source.clone(),
                            );
                            if let Err(error) = reaped.await {
                                log::warn!("cluster: reaping member {lost} failed: {error}");
                            }
                        }
                    }
                    Err(error) => log::debug!("cluster: looking for lost members failed: {error}"),
                }
            }
            check
        };
        let round = tokio::time::timeout(RESPONSE_TIMEOUT * 4, round);
        ctx.spawn(
            fut::wrap_future(round).map(move |check, act: &mut Self, ctx| {
                act.busy = false;
                match check {
                    Ok(Some(LeaseCheck::Confirmed(at))) => {
                        if act.standing == Standing::Outside {
                            act.joined(ctx);
                        }
                        act.standing = Standing::Member { confirmed: at };
                        act.retry_releases(ctx);
                    }
                    Ok(Some(LeaseCheck::Expired)) if joining => {
                        log::warn!(
                            "cluster: member id {} is taken; joining under another",
                            act.member
                        );
                        act.joins += 1;
                    }
                    Ok(Some(LeaseCheck::Expired)) => act.fence(ctx, "Redis no longer had it"),
                    Ok(Some(LeaseCheck::Unreachable(error))) => {
                        log::warn!("cluster: lease refresh failed: {error}");
                    }
                    Ok(None) => {}
                    Err(_) => log::warn!("cluster: a lease round trip timed out"),
                }
            }),
        );
    }

    /// Releases again what could not be released while Redis was unreachable.
    fn retry_releases(&mut self, ctx: &mut Context<Self>) {
        let Some(redis) = self.redis.clone() else {
            return;
        };
        for msg in std::mem::take(&mut self.unreleased) {
            let retry = release_again(
                redis.clone(),
                self.keys.clone(),
                self.member.clone(),
                self.routes.clone(),
                msg,
            );
            ctx.spawn(fut::wrap_future(retry).map(|result, act: &mut Self, _| {
                if let Err(msg) = result {
                    act.unreleased.push(msg);
                }
            }));
        }
    }

    /// Became a member: listens for the messages of its agents.
    fn joined(&mut self, ctx: &mut Context<Self>) {
        log::info!(
            "cluster: joined as member {} (lease {} s, prefix {})",
            self.member,
            self.settings.node_lease,
            self.settings.prefix
        );
        self.joins += 1;
        let subscriber = super::crossing::subscribe(
            self.client.clone(),
            self.keys.clone(),
            self.member.clone(),
            self.routes.clone(),
            self.subscribed.clone(),
        );
        self.subscriber = Some(ctx.spawn(fut::wrap_future(subscriber)));
    }
}

impl Handler<ClusterNodes> for Cluster {
    type Result = ResponseFuture<Result<Vec<NodeInfo>, ClusterUnavailable>>;

    fn handle(&mut self, _msg: ClusterNodes, _ctx: &mut Self::Context) -> Self::Result {
        let redis = self.live();
        let keys = self.keys.clone();
        Box::pin(async move {
            let mut redis = redis?;
            let members: Vec<String> = redis::cmd("HKEYS")
                .arg(keys.members())
                .query_async(&mut redis)
                .await
                .map_err(|e| unavailable("members", &e))?;
            if members.is_empty() {
                return Ok(Vec::new());
            }
            // One GET per lease (their keys are in different hash slots).
            let mut get = redis::pipe();
            for member in &members {
                get.cmd("GET").arg(keys.lease(member));
            }
            let leases: Vec<Option<String>> = get
                .query_async(&mut redis)
                .await
                .map_err(|e| unavailable("leases", &e))?;
            let mut nodes: Vec<NodeInfo> = leases
                .into_iter()
                .flatten()
                .filter_map(|info| serde_json::from_str(&info).ok())
                .collect();
            nodes.sort_by(|a, b| a.member.cmp(&b.member));
            Ok(nodes)
        })
    }
}

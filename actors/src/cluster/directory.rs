//! The cluster's directory, read from Redis by any node: the live members
//! ([`ClusterNodes`]), the agents they hold ([`ListHeld`], [`GetHeld`]), and removing
//! an agent held anywhere ([`RemoveHeld`]).
//!
//! What a node can say of an agent held elsewhere is what the claim keeps in Redis:
//! id, holder, session, incarnation, metadata and registration time. The live details
//! (state, last seen, round trip, queue) are the holder's: ask the holder's
//! `GET /agents/{id}` for them. Listing reads every live member's id set
//! (`O(agents)` per page): it is for admins and dashboards, not for every agent.

use super::claims::{holder, unavailable};
use super::RedisLink;
use super::{Cluster, ClusterUnavailable, Keys};
use actix::prelude::*;
use redis::Value as Reply;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How often a removal looks whether the holder let the agent go.
const REMOVAL_POLL: Duration = Duration::from_millis(20);

/// One claim's fields as read: node, incarnation, session, metadata, registration time.
type ClaimFields = (
    Option<String>,
    Option<u64>,
    Option<String>,
    Option<String>,
    Option<f64>,
);

/// What a member says of itself in its lease (and `GET /cluster/nodes` shows).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    /// The member id (the node id, suffixed after a rejoin).
    pub member: String,
    /// The node (process) id, as in its events' `source`.
    pub node_id: String,
    /// The `ws://` URL agents use to reach it.
    pub advertise_url: String,
    /// Agents it holds (its id set in Redis, read with the list).
    pub agents: usize,
    /// Its `network.max_connections`.
    pub max_connections: usize,
    /// Whether it is shutting down (no new agents).
    #[serde(default)]
    pub shutting_down: bool,
}

impl NodeInfo {
    /// Whether a new agent may be sent there.
    pub fn accepts_agents(&self) -> bool {
        !self.shutting_down && self.agents < self.max_connections
    }
}

/// The live members of the cluster, read from their leases, with the agents each
/// holds now.
#[derive(Message)]
#[rtype(result = "Result<Vec<NodeInfo>, ClusterUnavailable>")]
pub struct ClusterNodes;

/// An agent held by a live member, as its claim records it.
#[derive(Debug, Clone, Serialize)]
pub struct HeldAgent {
    /// The agent id.
    pub agent_id: String,
    /// The node holding it (its events' `source` node id).
    pub node_id: String,
    /// The member holding it.
    pub member: String,
    /// The connection's protocol session id.
    pub session_id: String,
    /// The cluster-wide incarnation.
    pub incarnation: u64,
    /// Registration metadata (JSON text; `{}` if unreadable).
    #[serde(skip)]
    pub metadata: String,
    /// RFC 3339 time of its registration.
    pub connected_at: String,
}

impl HeldAgent {
    /// Its registration metadata (an empty object if unreadable).
    pub fn parsed_metadata(&self) -> serde_json::Value {
        serde_json::from_str(&self.metadata).unwrap_or_else(|_| serde_json::json!({}))
    }

    /// `metadata.name`, or the id.
    pub fn name(&self, metadata: &serde_json::Value) -> String {
        metadata["name"]
            .as_str()
            .map_or_else(|| self.agent_id.clone(), str::to_owned)
    }
}

/// One page of the agents held cluster-wide, in id order, after `after`.
#[derive(Message)]
#[rtype(result = "Result<(Vec<HeldAgent>, bool), ClusterUnavailable>")]
pub struct ListHeld {
    /// The last id of the previous page.
    pub after: Option<String>,
    /// The most agents to return (the `bool` says whether more follow).
    pub limit: usize,
}

/// The agent `0`, if a live member holds it.
#[derive(Message)]
#[rtype(result = "Result<Option<HeldAgent>, ClusterUnavailable>")]
pub struct GetHeld(pub String);

/// Asks the live member holding agent `0` to remove it (close 1000, reason `admin`),
/// and waits (up to `cluster.takeover_timeout`) until it let it go: `Ok(Some(holder))`
/// once removed, `Ok(None)` when no live member holds it.
#[derive(Message)]
#[rtype(result = "Result<Option<String>, ClusterUnavailable>")]
pub struct RemoveHeld(pub String);

/// The live members (id → description), from the members hash and their leases.
async fn live_members(
    redis: &mut RedisLink,
    keys: &Keys,
) -> Result<Vec<NodeInfo>, ClusterUnavailable> {
    let members: Vec<String> = redis::cmd("HKEYS")
        .arg(keys.members())
        .query_async(redis)
        .await
        .map_err(|e| unavailable("members", &e))?;
    if members.is_empty() {
        return Ok(Vec::new());
    }
    // One GET per lease and one SCARD per id set (their keys are in different slots).
    let mut pipe = redis::pipe();
    for member in &members {
        pipe.cmd("GET")
            .arg(keys.lease(member))
            .cmd("SCARD")
            .arg(keys.held(member));
    }
    let replies: Vec<Reply> = pipe
        .query_async(redis)
        .await
        .map_err(|e| unavailable("leases", &e))?;
    let mut nodes: Vec<NodeInfo> = replies
        .chunks(2)
        .filter_map(|pair| {
            let lease: Option<String> = redis::from_redis_value(&pair[0]).ok()?;
            let mut info: NodeInfo = serde_json::from_str(&lease?).ok()?;
            info.agents = redis::from_redis_value(&pair[1]).unwrap_or(info.agents);
            Some(info)
        })
        .collect();
    nodes.sort_by(|a, b| a.member.cmp(&b.member));
    Ok(nodes)
}

/// Reads the claims of `ids` (id, member that should hold it); keeps those the member
/// holds.
async fn read_claims(
    redis: &mut RedisLink,
    keys: &Keys,
    ids: &[(String, &NodeInfo)],
) -> Result<Vec<HeldAgent>, ClusterUnavailable> {
    let mut held = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(256) {
        let mut pipe = redis::pipe();
        for (agent_id, _) in chunk {
            pipe.cmd("HMGET")
                .arg(keys.agent(agent_id))
                .arg(&["node", "inc", "session", "meta", "at"]);
        }
        let replies: Vec<ClaimFields> = pipe
            .query_async(redis)
            .await
            .map_err(|e| unavailable("claims", &e))?;
        for ((agent_id, node), (holder, inc, session, meta, at)) in chunk.iter().zip(replies) {
            if holder.as_deref() != Some(node.member.as_str()) {
                continue; // Left, or moved: listed under its new holder.
            }
            held.push(HeldAgent {
                agent_id: agent_id.clone(),
                node_id: node.node_id.clone(),
                member: node.member.clone(),
                session_id: session.unwrap_or_default(),
                incarnation: inc.unwrap_or(0),
                metadata: meta.unwrap_or_else(|| "{}".into()),
                connected_at: rfc3339(at.unwrap_or(0.0)),
            });
        }
    }
    Ok(held)
}

fn rfc3339(epoch_secs: f64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_secs_f64(epoch_secs.max(0.0));
    humantime::format_rfc3339_millis(at).to_string()
}

async fn list_held(
    mut redis: RedisLink,
    keys: Keys,
    msg: ListHeld,
) -> Result<(Vec<HeldAgent>, bool), ClusterUnavailable> {
    let nodes = live_members(&mut redis, &keys).await?;
    let mut pipe = redis::pipe();
    for node in &nodes {
        pipe.cmd("SMEMBERS").arg(keys.held(&node.member));
    }
    let sets: Vec<Vec<String>> = pipe
        .query_async(&mut redis)
        .await
        .map_err(|e| unavailable("id sets", &e))?;
    let after = msg.after.as_deref();
    let mut ids: Vec<(String, &NodeInfo)> = nodes
        .iter()
        .zip(sets)
        .flat_map(|(node, set)| set.into_iter().map(move |id| (id, node)))
        .filter(|(id, _)| after.is_none_or(|after| id.as_str() > after))
        .collect();
    ids.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    // Read a little past the page: some ids may turn out to have left.
    let mut held = Vec::new();
    let mut start = 0;
    while held.len() <= msg.limit && start < ids.len() {
        let end = (start + msg.limit.saturating_add(1).min(4096)).min(ids.len());
        held.extend(read_claims(&mut redis, &keys, &ids[start..end]).await?);
        start = end;
    }
    let has_more = held.len() > msg.limit;
    held.truncate(msg.limit);
    Ok((held, has_more))
}

async fn get_held(
    mut redis: RedisLink,
    keys: Keys,
    agent_id: String,
) -> Result<Option<HeldAgent>, ClusterUnavailable> {
    let Some(member) = holder(&mut redis, &keys, &agent_id).await? else {
        return Ok(None);
    };
    let lease: Option<String> = redis::cmd("GET")
        .arg(keys.lease(&member))
        .query_async(&mut redis)
        .await
        .map_err(|e| unavailable("lease lookup", &e))?;
    let Some(node) = lease.and_then(|info| serde_json::from_str::<NodeInfo>(&info).ok()) else {
        return Ok(None); // Its holder is lost: about to be ended.
    };
    let held = read_claims(&mut redis, &keys, &[(agent_id, &node)]).await?;
    Ok(held.into_iter().next())
}

impl Handler<ClusterNodes> for Cluster {
    type Result = ResponseFuture<Result<Vec<NodeInfo>, ClusterUnavailable>>;

    fn handle(&mut self, _msg: ClusterNodes, _ctx: &mut Self::Context) -> Self::Result {
        let redis = self.live();
        let keys = self.keys.clone();
        Box::pin(async move { live_members(&mut redis?, &keys).await })
    }
}

impl Handler<ListHeld> for Cluster {
    type Result = ResponseFuture<Result<(Vec<HeldAgent>, bool), ClusterUnavailable>>;

    fn handle(&mut self, msg: ListHeld, _ctx: &mut Self::Context) -> Self::Result {
        let redis = self.live();
        let keys = self.keys.clone();
        Box::pin(async move { list_held(redis?, keys, msg).await })
    }
}

impl Handler<GetHeld> for Cluster {
    type Result = ResponseFuture<Result<Option<HeldAgent>, ClusterUnavailable>>;

    fn handle(&mut self, msg: GetHeld, _ctx: &mut Self::Context) -> Self::Result {
        let redis = self.live();
        let keys = self.keys.clone();
        Box::pin(async move { get_held(redis?, keys, msg.0).await })
    }
}

impl Handler<RemoveHeld> for Cluster {
    type Result = ResponseFuture<Result<Option<String>, ClusterUnavailable>>;

    fn handle(&mut self, msg: RemoveHeld, _ctx: &mut Self::Context) -> Self::Result {
        let redis = self.live();
        let keys = self.keys.clone();
        let timeout = crate::settings::secs(self.settings.takeover_timeout);
        Box::pin(async move {
            let mut redis = redis?;
            let Some(held) = get_held(redis.clone(), keys.clone(), msg.0.clone()).await? else {
                return Ok(None);
            };
            let payload = format!("remove\n{}", held.agent_id);
            let listening = redis
                .publish(&keys.inbox(&held.member), &payload)
                .await
                .map_err(|e| unavailable("removal", &e))?;
            if !listening {
                return Err(ClusterUnavailable(format!(
                    "node {} holds agent {} but does not listen to the cluster",
                    held.member, held.agent_id
                )));
            }
            let gone = async {
                loop {
                    let now = holder(&mut redis, &keys, &held.agent_id).await?;
                    if now.as_deref() != Some(held.member.as_str()) {
                        return Ok(());
                    }
                    tokio::time::sleep(REMOVAL_POLL).await;
                }
            };
            match tokio::time::timeout(timeout, gone).await {
                Ok(Ok(())) => Ok(Some(held.member)),
                Ok(Err(error)) => Err(error),
                Err(_) => Err(ClusterUnavailable(format!(
                    "node {} did not remove agent {} within cluster.takeover_timeout; retry",
                    held.member, held.agent_id
                ))),
            }
        })
    }
}

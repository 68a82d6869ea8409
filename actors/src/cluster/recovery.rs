//! Recovery from a Redis that lost its data (restarted without persistence, or
//! flushed) while this node was a live member.
//!
//! A lease refresh that finds the lease gone normally means this member was lost (it
//! froze, or Redis could not be reached, for longer than the lease): the node closes its
//! agents (4009) and joins again, and a survivor publishes their ends. But when Redis
//! confirmed the lease less than a lease ago, the lease cannot have run out: Redis lost
//! it, together with every claim. No survivor knows of this member any more, so nobody
//! would publish its agents' ends, and closing them would only send the whole fleet
//! reconnecting. Instead the member re-asserts itself: it takes its lease again under the
//! same member id, and claims each agent it holds again ([`scripts::REASSERT`]) with the
//! incarnation, seq, session and metadata it has. Each agent is then
//! - kept: its claim was gone (or still this member's) and is this member's again;
//! - *reaped*: its claim shows that incarnation ended by a survivor (its end was
//!   published there): closed 4009 without publishing, as on a lease loss;
//! - *taken*: another node registered the id meanwhile: its incarnation ends here
//!   (published, close 4009), since nobody else will end it.
//!
//! Incarnation counters of ids not held at the time are lost with Redis's data: run
//! Redis with persistence where incarnations must only grow across such a loss.

use super::membership::{renew_lease, LeaseCheck};
use super::RedisLink;
use super::{scripts, Cluster, Keys, Standing};
use crate::registry::{ClaimsReasserted, HeldClaim, HeldClaims};
use actix::prelude::*;
use redis::Value as Reply;
use std::sync::Arc;
use std::time::Instant;

/// Claims re-asserted per pipelined round trip.
const CHUNK: usize = 256;

/// Takes the lease again under `member`, then claims every agent of `held` again.
async fn reassert(
    mut redis: RedisLink,
    keys: Keys,
    member: Arc<str>,
    info: String,
    lease_ms: u64,
    held: Vec<HeldClaim>,
) -> Result<(Instant, ClaimsReasserted), String> {
    // Taken as on joining, under the same member id.
    let sent = match renew_lease(&mut redis, &keys, &member, &info, true, lease_ms).await {
        LeaseCheck::Confirmed(sent) => sent,
        LeaseCheck::Expired => return Err(format!("member id {member} is taken")),
        LeaseCheck::Unreachable(error) => return Err(error),
    };
    let mut outcome = ClaimsReasserted::default();
    for chunk in held.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for claim in chunk {
            pipe.cmd("SADD")
                .arg(keys.held(&member))
                .arg(&*claim.agent_id)
                .ignore()
                .cmd("EVAL")
                .arg(scripts::REASSERT)
                .arg(1)
                .arg(keys.agent(&claim.agent_id))
                .arg(&*member)
                .arg(claim.incarnation)
                .arg(claim.seq)
                .arg(&claim.session)
                .arg(&claim.metadata)
                .arg(claim.at);
        }
        let replies: Vec<Reply> = pipe
            .query_async(&mut redis)
            .await
            .map_err(|e| e.to_string())?;
        for (claim, reply) in chunk.iter().zip(replies) {
            let claim = (claim.agent_id.clone(), claim.incarnation);
            match reply {
                Reply::Int(1) => outcome.kept.push(claim),
                Reply::Int(2) => outcome.reaped.push(claim),
                _ => outcome.taken.push(claim),
            }
        }
    }
    let lost: Vec<&str> = (outcome.reaped.iter().chain(&outcome.taken))
        .map(|(agent_id, _)| &**agent_id)
        .collect();
    if !lost.is_empty() {
        redis::cmd("SREM")
            .arg(keys.held(&member))
            .arg(lost)
            .query_async::<()>(&mut redis)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok((sent, outcome))
}

impl Cluster {
    /// Whether a lease found gone had been confirmed less than a lease ago (so Redis
    /// lost it: it cannot have run out).
    pub(super) fn lease_was_lost_by_redis(&self) -> bool {
        matches!(self.standing, Standing::Member { confirmed } if confirmed.elapsed() < self.lease())
    }

    /// Re-asserts this member and its agents' claims after Redis lost them (see the
    /// module doc). Until that is done the node is outside the cluster (registrations
    /// and cross-node messages are refused `cluster_unavailable`); if it fails, the node
    /// fences itself as on a lease loss.
    pub(super) fn recover(&mut self, ctx: &mut Context<Self>) {
        log::warn!(
            "cluster: Redis lost member {}'s lease (it was confirmed less than a lease \
             ago: Redis restarted without its data, or was flushed); re-asserting the \
             member and its agents' claims",
            self.member
        );
        let (Some(redis), Some(registry)) = (self.redis.clone(), self.registry.clone()) else {
            return self.fence(ctx, "Redis lost it and this node cannot re-assert it");
        };
        self.standing = Standing::Outside;
        self.direct.set_member(None);
        // No tick joins (under a new member id) while this runs.
        self.busy = true;
        let (keys, member, info) = (self.keys.clone(), self.member.clone(), self.info());
        let lease_ms = self.lease().as_millis() as u64;
        let recovery = async move {
            let held = registry
                .held_claims
                .send(HeldClaims)
                .await
                .map_err(|e| e.to_string())?;
            reassert(redis, keys, member, info, lease_ms, held).await
        };
        ctx.spawn(
            fut::wrap_future(recovery).map(|result, act: &mut Self, ctx| {
                act.busy = false;
                match result {
                    Ok((confirmed, outcome)) => {
                        log::warn!(
                            "cluster: member {} re-asserted: {} agents kept, {} ended by a \
                         survivor meanwhile, {} registered on another node meanwhile",
                            act.member,
                            outcome.kept.len(),
                            outcome.reaped.len(),
                            outcome.taken.len()
                        );
                        act.standing = Standing::Member { confirmed };
                        act.direct.set_member(Some(act.member.clone()));
                        crate::metrics::cluster_reasserted();
                        if let Some(registry) = &act.registry {
                            registry.reasserted.do_send(outcome);
                        }
                    }
                    Err(error) => act.fence(ctx, &format!("re-asserting it failed: {error}")),
                }
            }),
        );
    }
}

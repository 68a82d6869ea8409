//! Membership: joining with a lease, refreshing it, noticing members whose lease ran
//! out and ending their agents (once, by one survivor), listing the live members.

use super::claims::{release_again, Orphan};
use super::directory::NodeInfo;
use super::RedisLink;
use super::{scripts, Cluster, Keys, Standing, RESPONSE_TIMEOUT};
use crate::bus::Publish;
use crate::event::EventSource;
use actix::prelude::*;
use redis::Value as Reply;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Ends the agents of `lost` once, if this node wins the right to.
async fn reap(
    mut redis: RedisLink,
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
    redis: &mut RedisLink,
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

/// Takes (`joining`) or refreshes the lease of `member`, describing it as `info`.
pub(super) async fn renew_lease(
    redis: &mut RedisLink,
    keys: &Keys,
    member: &str,
    info: &str,
    joining: bool,
    lease_ms: u64,
) -> LeaseCheck {
    let sent = Instant::now();
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(keys.lease(member))
        .arg(info)
        .arg(if joining { "NX" } else { "XX" })
        .arg("PX")
        .arg(lease_ms)
        .cmd("HSET")
        .arg(keys.members())
        .arg(member)
        .arg(info)
        .ignore();
    match pipe.query_async::<(Option<String>,)>(redis).await {
        Ok((Some(_),)) => LeaseCheck::Confirmed(sent),
        Ok((None,)) => LeaseCheck::Expired,
        Err(error) => LeaseCheck::Unreachable(error.to_string()),
    }
}

/// Ends the agents of every member whose lease is gone (those this node wins).
async fn reap_lost(
    mut redis: RedisLink,
    keys: Keys,
    reaper: Arc<str>,
    lease_ms: u64,
    events: Recipient<Publish>,
    source: EventSource,
) {
    let lost = match lost_members(&mut redis, &keys, &reaper).await {
        Ok(lost) => lost,
        Err(error) => return log::debug!("cluster: looking for lost members failed: {error}"),
    };
    for lost in lost {
        let reaped = reap(
            redis.clone(),
            keys.clone(),
            reaper.clone(),
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

/// What a lease round trip found.
pub(super) enum LeaseCheck {
    /// Redis confirmed the lease (refreshed, or taken on joining) at this instant.
    Confirmed(Instant),
    /// The lease was gone when it was refreshed.
    Expired,
    /// Redis did not answer.
    Unreachable(String),
}

impl Cluster {
    /// This member's description.
    pub(super) fn info(&self) -> String {
        let info = NodeInfo {
            member: self.member.to_string(),
            node_id: self.node_id.to_string(),
            advertise_url: self.settings.advertise_url.clone(),
            agents: self.routes.len(),
            max_connections: self.max_connections,
            shutting_down: self.leaving,
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
            let connect = self.target.clone().connect();
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
            Standing::Member { confirmed } => {
                std::mem::take(&mut self.announce) || confirmed.elapsed() >= lease / 3
            }
        };
        let (keys, member, info) = (self.keys.clone(), self.member.clone(), self.info());
        let lease_ms = lease.as_millis() as u64;
        let (events, source) = (self.events.clone(), self.source.clone());
        self.busy = true;
        let round = async move {
            let check = if refresh {
                Some(renew_lease(&mut redis, &keys, &member, &info, joining, lease_ms).await)
            } else {
                None
            };
            let confirmed = matches!(check, None | Some(LeaseCheck::Confirmed(_)));
            if confirmed && !joining {
                reap_lost(redis, keys, member, lease_ms, events, source).await;
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
                        act.direct.set_member(Some(act.member.clone()));
                        act.retry_releases(ctx);
                    }
                    Ok(Some(LeaseCheck::Expired)) if joining => {
                        log::warn!(
                            "cluster: member id {} is taken; joining under another",
                            act.member
                        );
                        act.joins += 1;
                    }
                    Ok(Some(LeaseCheck::Expired)) if act.lease_was_lost_by_redis() => {
                        act.recover(ctx)
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
            self.target.clone(),
            self.keys.clone(),
            self.member.clone(),
            self.direct.clone(),
            self.subscribed.clone(),
            ctx.address(),
            self.waiting.clone(),
        );
        self.subscriber = Some(ctx.spawn(fut::wrap_future(subscriber)));
    }
}

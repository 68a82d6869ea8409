//! Claims in Redis: claiming an id (taking it from a lost member if need be),
//! releasing it, recording an incarnation's progress, and reading back the
//! incarnation of an id whose holder is gone.

use super::RedisLink;
use super::{scripts, Claim, ClaimOutcome, ClusterUnavailable, Keys, Progress, Release};
use crate::bus::Publish;
use crate::clock::epoch_secs;
use crate::event::{AgentEvent, EventSource, LifecycleEvent, CLEANUP_STEPS};
use crate::routes::Routes;
use actix::prelude::*;
use redis::Value as Reply;
use serde_json::value::RawValue;
use std::sync::Arc;

/// Redis failed: the message for the client and the log.
pub(super) fn unavailable(what: &str, error: &redis::RedisError) -> ClusterUnavailable {
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
pub(super) struct Orphan {
    incarnation: u64,
    seq: u64,
    session: String,
    metadata: String,
    at: f64,
}

impl Orphan {
    /// From `inc, seq, session, meta, at` replies.
    pub(super) fn from_replies(fields: &[Reply]) -> Option<Self> {
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
    pub(super) fn publish_end(
        &self,
        events: &Recipient<Publish>,
        source: &EventSource,
        agent_id: &str,
    ) {
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
    redis: &mut RedisLink,
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
    mut redis: RedisLink,
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
                    // Not ours after all: off this member's id set (it counts agents).
                    let _ = redis::cmd("SREM")
                        .arg(keys.held(&member))
                        .arg(&*msg.agent_id)
                        .query_async::<()>(&mut redis)
                        .await;
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
    mut redis: RedisLink,
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
    mut redis: RedisLink,
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
pub(super) async fn progress(mut redis: RedisLink, keys: Keys, member: Arc<str>, msg: Progress) {
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

/// The member holding `agent_id` in Redis (live or lost), if any.
pub(super) async fn holder(
    redis: &mut RedisLink,
    keys: &Keys,
    agent_id: &str,
) -> Result<Option<String>, ClusterUnavailable> {
    redis::cmd("HGET")
        .arg(keys.agent(agent_id))
        .arg("node")
        .query_async(redis)
        .await
        .map_err(|e| unavailable("holder lookup", &e))
}

/// The live member other than `me` holding `agent_id`, if any.
pub(super) async fn held_elsewhere(
    mut redis: RedisLink,
    keys: Keys,
    me: Arc<str>,
    agent_id: Arc<str>,
) -> Result<Option<String>, ClusterUnavailable> {
    let holder = holder(&mut redis, &keys, &agent_id).await?;
    let Some(holder) = holder.filter(|holder| **holder != *me) else {
        return Ok(None);
    };
    let alive: bool = redis::cmd("EXISTS")
        .arg(keys.lease(&holder))
        .query_async(&mut redis)
        .await
        .map_err(|e| unavailable("lease lookup", &e))?;
    Ok(alive.then_some(holder))
}

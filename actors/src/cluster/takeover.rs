//! Takeovers across nodes: an agent registers on node B (with its certificate, or
//! `force_reconnect`) while its id is held live on node A.
//!
//! 1. B's registry asks its cluster actor to [`TakeOver`] the id: a [`HandoverRequest`]
//!    goes to A's channel, and B waits for the answer (`cluster.takeover_timeout`, plus a
//!    second for the answer to travel).
//! 2. A's cluster actor hands the request to its registry ([`HandOver`]). The registry
//!    moves the claim to B in Redis ([`Transfer`], one script: A must still hold that
//!    incarnation), then ends its incarnation as a local takeover does
//!    (`connection_replaced`, close 4001, `agent.replaced`, `agent.disconnected`,
//!    `agent.cleaned_up`) and tells its cluster actor to [`Answer`].
//! 3. A's cluster actor waits until A's publishers acknowledged those events (at most
//!    `cluster.takeover_timeout`), then answers on B's channel with the new incarnation.
//!    Only then does B register the agent and publish `agent.registered`.
//!
//! A holder that no longer holds the id answers "gone" and B claims it as usual. A
//! holder that does not answer in time is waited for while it has no subscriber on
//! Redis and its lease lasts (it is dead: once the lease ends B takes the id from the
//! lost member, publishing the old incarnation's end as a node loss, still before its
//! own `agent.registered`); a holder that is subscribed but silent gets the
//! registration refused `cluster_unavailable`. An answer arriving after B stopped
//! waiting releases the id again.

use super::claims::{self, unavailable};
use super::RedisLink;
use super::{Claim, ClaimOutcome, Cluster, ClusterUnavailable, Keys, Release};
use crate::bus::{Publish, SettleAll};
use crate::clock::epoch_secs;
use crate::event::EventSource;
use crate::settings::secs;
use actix::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Time an answer gets to travel back, beyond the holder's own wait.
const ANSWER_TRAVEL: Duration = Duration::from_secs(1);
/// How often a silent, unsubscribed holder's lease is looked at.
const DEAD_HOLDER_POLL: Duration = Duration::from_millis(250);

/// What one node asks the holder of an id (sent on the holder's channel as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandoverRequest {
    /// Unique per asking member.
    pub id: u64,
    /// The id taken over.
    pub agent_id: String,
    /// The asking member, which holds the id next.
    pub to: String,
    /// The new connection's protocol session id.
    pub session: String,
    /// Its registration metadata (JSON text).
    pub metadata: String,
    /// How the new connection proved its right (`certificate`, `force_reconnect`).
    pub proof: String,
}

/// The holder's answer (sent on the asker's channel as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandoverAnswer {
    /// The request's id.
    pub id: u64,
    /// The id.
    pub agent_id: String,
    /// The incarnation the asker now holds; `None`: the holder no longer held the id.
    pub incarnation: Option<u64>,
}

/// Requests this member is waiting to have answered, by id (shared with its
/// subscriber, which hands the answers in).
pub(super) type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Option<u64>>>>>;

/// Asked by this node's registry: take `claim.agent_id` from `holder`, which holds it
/// live. Answered once the id is this node's (`Granted`) or could not be taken.
#[derive(Message)]
#[rtype(result = "Result<ClaimOutcome, ClusterUnavailable>")]
pub struct TakeOver {
    /// The claim, as for a free id.
    pub claim: Claim,
    /// The member holding the id.
    pub holder: String,
    /// How the new connection proved its right.
    pub proof: &'static str,
}

/// Told to this node's registry: another node takes over an id this node holds.
#[derive(Message)]
#[rtype(result = "()")]
pub struct HandOver(pub HandoverRequest);

/// Asked by this node's registry: move the claim of `request.agent_id`, held here as
/// `incarnation`, to the asking member. The new incarnation, or `None` when this member
/// no longer holds that incarnation.
#[derive(Message)]
#[rtype(result = "Result<Option<u64>, ClusterUnavailable>")]
pub struct Transfer {
    /// The request.
    pub request: HandoverRequest,
    /// The incarnation held here.
    pub incarnation: u64,
}

/// Told by this node's registry once it ended the incarnation (`incarnation` is the
/// asker's) or found the id gone (`None`): answer the asker once this node's
/// publishers acknowledged the end.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Answer {
    /// The request.
    pub request: HandoverRequest,
    /// The asker's incarnation, if the id was handed over.
    pub incarnation: Option<u64>,
}

/// A request that arrived on this member's channel (from its subscriber).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Asked(pub HandoverRequest);

/// An answer that arrived after nobody waited for it: the id is released again.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Unwanted(pub HandoverAnswer);

/// The payload of a request or an answer on a member's channel.
pub(super) fn payload<T: Serialize>(kind: &str, body: &T) -> String {
    format!(
        "{kind}\n{}",
        serde_json::to_string(body).expect("handover messages serialize")
    )
}

/// Everything B's side of a takeover needs, off the actor.
struct Asker {
    redis: RedisLink,
    keys: Keys,
    member: Arc<str>,
    events: Recipient<Publish>,
    source: EventSource,
    waiting: Waiting,
    timeout: Duration,
    lease: Duration,
}

impl Asker {
    /// Claims as for a free id (the holder is gone or lost).
    async fn claim(&self, claim: Claim) -> Result<ClaimOutcome, ClusterUnavailable> {
        let (events, source) = (self.events.clone(), self.source.clone());
        let (keys, member) = (self.keys.clone(), self.member.clone());
        claims::claim(self.redis.clone(), keys, member, events, source, claim).await
    }

    /// Whether `holder` has a lease and a subscriber on its channel.
    async fn holder_state(&mut self, holder: &str) -> Result<(bool, bool), ClusterUnavailable> {
        let (alive, subscribers): (bool, Vec<(String, u64)>) = redis::pipe()
            .cmd("EXISTS")
            .arg(self.keys.lease(holder))
            .cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(self.keys.inbox(holder))
            .query_async(&mut self.redis)
            .await
            .map_err(|e| unavailable("takeover", &e))?;
        let subscribed = subscribers.first().is_some_and(|(_, n)| *n > 0);
        Ok((alive, subscribed))
    }

    async fn take_over(
        mut self,
        msg: TakeOver,
        id: u64,
    ) -> Result<ClaimOutcome, ClusterUnavailable> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("not poisoned").insert(id, tx);
        let request = HandoverRequest {
            id,
            agent_id: msg.claim.agent_id.to_string(),
            to: self.member.to_string(),
            session: msg.claim.session.clone(),
            metadata: msg.claim.metadata.clone(),
            proof: msg.proof.to_owned(),
        };
        let sent = self
            .redis
            .publish(
                &self.keys.inbox(&msg.holder),
                &payload("takeover", &request),
            )
            .await;
        let answer = match sent {
            Ok(false) => None, // Nobody listens: the holder is dead or cut off.
            Ok(true) => tokio::time::timeout(self.timeout + ANSWER_TRAVEL, rx)
                .await
                .ok()
                .and_then(Result::ok),
            Err(error) => {
                self.waiting.lock().expect("not poisoned").remove(&id);
                return Err(unavailable("takeover", &error));
            }
        };
        self.waiting.lock().expect("not poisoned").remove(&id);
        match answer {
            Some(Some(incarnation)) => Ok(ClaimOutcome::Granted { incarnation }),
            Some(None) => self.claim(msg.claim).await, // It left meanwhile.
            None => self.silent_holder(msg).await,
        }
    }

    /// The holder did not answer: wait while it is dead (lease but no subscriber) for
    /// its lease to end, then take the id from the lost member.
    async fn silent_holder(mut self, msg: TakeOver) -> Result<ClaimOutcome, ClusterUnavailable> {
        let gives_up = Instant::now() + self.lease + ANSWER_TRAVEL;
        loop {
            let (alive, subscribed) = self.holder_state(&msg.holder).await?;
            if !alive {
                return self.claim(msg.claim).await;
            }
            if subscribed || Instant::now() >= gives_up {
                return Err(ClusterUnavailable(format!(
                    "node {} holds agent {} but did not hand it over within \
                     cluster.takeover_timeout ({} s); retry",
                    msg.holder,
                    msg.claim.agent_id,
                    self.timeout.as_secs_f64()
                )));
            }
            tokio::time::sleep(DEAD_HOLDER_POLL).await;
        }
    }
}

impl Handler<TakeOver> for Cluster {
    type Result = ResponseFuture<Result<ClaimOutcome, ClusterUnavailable>>;

    fn handle(&mut self, msg: TakeOver, _ctx: &mut Self::Context) -> Self::Result {
        let redis = match self.live() {
            Ok(redis) => redis,
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        self.requests += 1;
        let asker = Asker {
            redis,
            keys: self.keys.clone(),
            member: self.member.clone(),
            events: self.events.clone(),
            source: self.source.clone(),
            waiting: self.waiting.clone(),
            timeout: secs(self.settings.takeover_timeout),
            lease: self.lease(),
        };
        Box::pin(asker.take_over(msg, self.requests))
    }
}

impl Handler<Asked> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: Asked, _ctx: &mut Self::Context) {
        match &self.registry {
            Some(registry) => registry.hand_over.do_send(HandOver(msg.0)),
            None => log::warn!("cluster: a takeover request arrived before the registry"),
        }
    }
}

impl Handler<Transfer> for Cluster {
    type Result = ResponseFuture<Result<Option<u64>, ClusterUnavailable>>;

    fn handle(&mut self, msg: Transfer, _ctx: &mut Self::Context) -> Self::Result {
        let mut redis = match self.live() {
            Ok(redis) => redis,
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        let (keys, member) = (self.keys.clone(), self.member.clone());
        Box::pin(async move {
            let request = &msg.request;
            redis::cmd("EVAL")
                .arg(super::scripts::HAND_OVER)
                .arg(1)
                .arg(keys.agent(&request.agent_id))
                .arg(&*member)
                .arg(msg.incarnation)
                .arg(&request.to)
                .arg(&request.session)
                .arg(&request.metadata)
                .arg(epoch_secs())
                .query_async(&mut redis)
                .await
                .map_err(|e| unavailable("hand over", &e))
        })
    }
}

impl Handler<Answer> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: Answer, ctx: &mut Self::Context) {
        let Some(mut redis) = self.redis.clone() else {
            return; // The asker gives up on its own.
        };
        let settle = self.settle.clone();
        let timeout = secs(self.settings.takeover_timeout);
        let channel = self.keys.inbox(&msg.request.to);
        let answer = async move {
            let request = msg.request;
            if msg.incarnation.is_some() {
                let settled = settle.send(SettleAll { timeout }).await.unwrap_or(false);
                if !settled {
                    log::warn!(
                        "cluster: the end of {}'s incarnation on this node was not \
                         acknowledged by every publisher within cluster.takeover_timeout; \
                         handing it over anyway (consumers order by incarnation, seq)",
                        request.agent_id
                    );
                }
            }
            let answer = HandoverAnswer {
                id: request.id,
                agent_id: request.agent_id,
                incarnation: msg.incarnation,
            };
            let sent = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload("handed", &answer))
                .query_async::<u64>(&mut redis)
                .await;
            if let Err(error) = sent {
                log::warn!("cluster: a takeover answer was not sent: {error}");
            }
        };
        ctx.spawn(fut::wrap_future(answer));
    }
}

impl Handler<Unwanted> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: Unwanted, ctx: &mut Self::Context) {
        if let Some(incarnation) = msg.0.incarnation {
            log::warn!(
                "cluster: {} was handed over after its registration gave up; releasing it",
                msg.0.agent_id
            );
            let release = Release {
                agent_id: msg.0.agent_id.into(),
                incarnation,
            };
            <Self as Handler<Release>>::handle(self, release, ctx);
        }
    }
}

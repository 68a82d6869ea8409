//! Direct messages to agents of other nodes, over Redis pub/sub.
//!
//! A direct message the local table cannot deliver is [`Forward`]ed to the member
//! holding its target, published on that member's channel by the sender's own worker
//! thread, on a Redis connection of that thread's ([`DirectLine`]): no hop through
//! another thread on the sending side. The holder is read from
//! the target's hash (`HGET`) and remembered for [`HOLDER_TTL`] ([`Holders`]), so a
//! conversation costs one `PUBLISH` per message, not two commands.
//!
//! A remembered holder may be out of date (the agent moved or left): a member that
//! receives a message for an agent it does not hold sends it on once to the id's
//! current holder (`again`, never a third hop) and tells the sender's member to forget
//! what it remembered (`moved`); when nobody holds the id, the sender gets its
//! `unknown_agent` error through its own member (`bounce`). The taking node of a
//! takeover parks messages for the id until the agent is registered there
//! (`Routes::expect`), so none is lost while it moves.
//!
//! Payloads on a member's channel (agent ids, member ids and message ids contain no
//! newline):
//! - `message\n<target>\n<origin member>\n<sender id>\n<message id>\n<frame>`, and
//!   `again\n…` the same for the second hop;
//! - `moved\n<target>`: forget the holder remembered for `target` (the subscriber does,
//!   on the shared [`DirectLine`]);
//! - `bounce\n<target>\n<sender id>\n<error frame>`: deliver the error to the sender and
//!   forget the holder remembered for `target`.

use super::claims::unavailable;
use super::RedisLink;
use super::{Cluster, ClusterUnavailable, Keys};
use crate::outbound::OutFrame;
use crate::protocol::{self, ErrorCode, ProtocolError};
use crate::routes::Routes;
use actix::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// How long a looked-up holder is used without looking it up again.
pub const HOLDER_TTL: Duration = Duration::from_secs(2);
/// Most holders remembered (about 100 bytes each).
const MOST_HOLDERS: usize = 16_384;

/// A direct message whose target is not on this node.
#[derive(Debug)]
pub struct Forward {
    /// The target agent id.
    pub target: String,
    /// The frame as the target receives it (JSON text).
    pub frame: String,
    /// The sender, told of an `unknown_agent` or `cluster_unavailable` error.
    pub sender_id: String,
    /// The message's id, echoed in such an error.
    pub message_id: String,
}

/// Holders of the ids this node recently sent messages to: agent id → member.
#[derive(Debug, Default)]
pub(super) struct Holders {
    entries: HashMap<String, (Arc<str>, Instant)>,
}

impl Holders {
    /// The member remembered for `agent_id`, unless older than [`HOLDER_TTL`].
    fn get(&self, agent_id: &str) -> Option<Arc<str>> {
        let (member, at) = self.entries.get(agent_id)?;
        (at.elapsed() < HOLDER_TTL).then(|| member.clone())
    }

    fn remember(&mut self, agent_id: String, member: Arc<str>) {
        if self.entries.len() >= MOST_HOLDERS {
            self.entries.retain(|_, (_, at)| at.elapsed() < HOLDER_TTL);
            if self.entries.len() >= MOST_HOLDERS {
                self.entries.clear();
            }
        }
        self.entries.insert(agent_id, (member, Instant::now()));
    }

    pub(super) fn forget(&mut self, agent_id: &str) {
        self.entries.remove(agent_id);
    }
}

/// A direct message on its way between members.
#[derive(Debug, Clone)]
pub(super) struct Crossing {
    pub target: String,
    /// The member of the sender.
    pub origin: String,
    pub sender_id: String,
    pub message_id: String,
    pub frame: String,
}

impl Crossing {
    /// The payload of kind `kind` (`message` or `again`).
    fn payload(&self, kind: &str) -> String {
        format!(
            "{kind}\n{}\n{}\n{}\n{}\n{}",
            self.target, self.origin, self.sender_id, self.message_id, self.frame
        )
    }

    /// Reads the body of a `message` or `again` payload.
    pub(super) fn parse(body: &str) -> Option<Self> {
        let mut parts = body.splitn(5, '\n');
        let mut next = || parts.next().map(str::to_owned);
        Some(Self {
            target: next()?,
            origin: next()?,
            sender_id: next()?,
            message_id: next()?,
            frame: next()?,
        })
    }

    /// The `unknown_agent` error its sender gets.
    fn unknown(&self) -> ProtocolError {
        ProtocolError::new(
            ErrorCode::UnknownAgent,
            format!("Agent {} is not connected", self.target),
        )
    }
}

fn error_to(routes: &Routes, sender_id: &str, error: &ProtocolError, message_id: &str) {
    let frame = protocol::error_frame(error, Some(message_id));
    routes.deliver(sender_id, OutFrame::json(&frame));
}

/// Where a message published to a member's channel went.
enum Reach {
    /// Somebody listens on the channel.
    Listened,
    /// Nobody listens, but the member holds its lease: it lives and does not listen
    /// right now (moving its subscription, or cut from pub/sub only). The message is
    /// lost, the agent is not.
    NotListening,
    /// Nobody listens and the member's lease is gone.
    Gone,
}

/// Publishes `payload` to `member`'s channel; when nobody received it, asks whether
/// the member still lives.
async fn reach(
    redis: &mut RedisLink,
    keys: &Keys,
    member: &str,
    payload: &str,
) -> Result<Reach, redis::RedisError> {
    if redis.publish(&keys.inbox(member), payload).await? {
        return Ok(Reach::Listened);
    }
    let alive: bool = redis::cmd("EXISTS")
        .arg(keys.lease(member))
        .query_async(redis)
        .await?;
    Ok(if alive {
        Reach::NotListening
    } else {
        Reach::Gone
    })
}

async fn holder(
    redis: &mut RedisLink,
    keys: &Keys,
    agent_id: &str,
) -> Result<Option<String>, redis::RedisError> {
    redis::cmd("HGET")
        .arg(keys.agent(agent_id))
        .arg("node")
        .query_async(redis)
        .await
}

/// What became of a forwarded message.
enum Forwarded {
    /// Published to the remembered holder.
    AsRemembered,
    /// Published to this holder, looked up.
    To(Arc<str>),
    /// This holder, looked up, lives but did not listen.
    NotListening(Arc<str>),
    /// Delivered on this node (it holds the target after all).
    Here,
    /// Nobody holds the target.
    Unknown,
}

/// What the worker threads need to send direct messages to other nodes themselves,
/// kept up to date by the cluster actor (its member id, whether it is a live member)
/// and shared with it (the remembered holders).
#[derive(Debug)]
pub struct DirectLine {
    /// The cluster's Redis; its URL names this thread's connection in `LINES`.
    target: super::RedisTarget,
    keys: Keys,
    member: RwLock<Arc<str>>,
    live: AtomicBool,
    holders: Mutex<Holders>,
    routes: Arc<Routes>,
}

thread_local! {
    /// This thread's connections to Redis, by URL (one per worker thread).
    static LINES: RefCell<HashMap<String, RedisLink>> = RefCell::new(HashMap::new());
}

impl DirectLine {
    pub(super) fn new(
        target: super::RedisTarget,
        keys: Keys,
        member: Arc<str>,
        routes: Arc<Routes>,
    ) -> Self {
        Self {
            target,
            keys,
            member: RwLock::new(member),
            live: AtomicBool::new(false),
            holders: Mutex::default(),
            routes,
        }
    }

    /// This node is a live member as `member` (or not, `None`).
    pub(super) fn set_member(&self, member: Option<Arc<str>>) {
        if let Some(member) = member {
            *self.member.write().unwrap_or_else(|e| e.into_inner()) = member;
            self.live.store(true, Ordering::Release);
        } else {
            self.live.store(false, Ordering::Release);
        }
    }

    /// The routing table messages are delivered to.
    pub(super) fn routes(&self) -> &Arc<Routes> {
        &self.routes
    }

    pub(super) fn holders(&self) -> MutexGuard<'_, Holders> {
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This thread's connection to Redis (made on first use, with the cluster's
    /// timeouts).
    async fn connection(&self) -> Result<RedisLink, ClusterUnavailable> {
        let url = self.target.url();
        if let Some(line) = LINES.with(|lines| lines.borrow().get(url).cloned()) {
            return Ok(line);
        }
        let line = self.target.clone().connect().await?;
        LINES.with(|lines| lines.borrow_mut().insert(url.to_owned(), line.clone()));
        Ok(line)
    }

    /// Sends `msg` to the node holding its target, from the calling worker thread.
    pub fn forward(self: &Arc<Self>, msg: Forward) {
        let line = self.clone();
        actix::spawn(async move { line.send(msg).await });
    }

    async fn send(&self, msg: Forward) {
        let routes = &self.routes;
        if !self.live.load(Ordering::Acquire) {
            let error = ProtocolError::new(
                ErrorCode::ClusterUnavailable,
                "this node is not connected to its cluster (Redis unreachable or the node is \
                 rejoining); try again shortly",
            );
            return error_to(routes, &msg.sender_id, &error, &msg.message_id);
        }
        let me = self
            .member
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let remembered = self.holders().get(&msg.target);
        let crossing = Crossing {
            target: msg.target,
            origin: me.to_string(),
            sender_id: msg.sender_id,
            message_id: msg.message_id,
            frame: msg.frame,
        };
        let keys = &self.keys;
        let payload = crossing.payload("message");
        let routed = async {
            let mut redis = self.connection().await?;
            let failed = |e: redis::RedisError| unavailable("message", &e);
            if let Some(member) = remembered {
                if redis
                    .publish(&keys.inbox(&member), &payload)
                    .await
                    .map_err(failed)?
                {
                    return Ok(Forwarded::AsRemembered);
                }
            }
            let holder = holder(&mut redis, keys, &crossing.target)
                .await
                .map_err(failed)?;
            Ok::<_, ClusterUnavailable>(match holder {
                None => Forwarded::Unknown,
                Some(member) if *member == *me => {
                    match routes.deliver(&crossing.target, OutFrame::text(&crossing.frame)) {
                        true => Forwarded::Here,
                        false => Forwarded::Unknown,
                    }
                }
                Some(member) => {
                    let member: Arc<str> = member.into();
                    match reach(&mut redis, keys, &member, &payload)
                        .await
                        .map_err(failed)?
                    {
                        Reach::Listened => Forwarded::To(member),
                        Reach::NotListening => Forwarded::NotListening(member),
                        Reach::Gone => Forwarded::Unknown,
                    }
                }
            })
        };
        let error = match routed.await {
            Ok(Forwarded::AsRemembered) => return crate::metrics::cross_node_message("direct"),
            Ok(Forwarded::To(member)) => {
                crate::metrics::cross_node_message("direct");
                return self.holders().remember(crossing.target, member);
            }
            Ok(Forwarded::Here) => return self.holders().forget(&crossing.target),
            Ok(Forwarded::Unknown) => {
                self.holders().forget(&crossing.target);
                crossing.unknown()
            }
            Ok(Forwarded::NotListening(member)) => unavailable_to(&crossing, &member),
            Err(error) => ProtocolError::new(
                ErrorCode::ClusterUnavailable,
                format!("The message could not be routed through the cluster ({error}); retry"),
            ),
        };
        error_to(routes, &crossing.sender_id, &error, &crossing.message_id);
    }
}

/// A message that reached this member for an agent it does not hold: sent on to the
/// id's holder once, or bounced to its sender as `unknown_agent`.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Reforward(pub Crossing);

impl Handler<Reforward> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: Reforward, ctx: &mut Self::Context) {
        let Ok(mut redis) = self.live() else {
            return crate::metrics::cluster_messages_dropped("cluster_unavailable", 1);
        };
        let (keys, me, routes) = (self.keys.clone(), self.member.clone(), self.routes.clone());
        let crossing = msg.0;
        let again = async move {
            let sent = match holder(&mut redis, &keys, &crossing.target).await {
                // Registered here by now (or expected here).
                Ok(Some(member)) if *member == *me => {
                    routes.deliver(&crossing.target, OutFrame::text(&crossing.frame))
                }
                Ok(Some(member)) => {
                    let moved = format!("moved\n{}", crossing.target);
                    let _ = redis.publish(&keys.inbox(&crossing.origin), &moved).await;
                    let payload = crossing.payload("again");
                    match reach(&mut redis, &keys, &member, &payload).await {
                        Ok(Reach::Listened) => true,
                        Ok(Reach::Gone) => false,
                        // The agent is not known gone: the message is lost, it is not.
                        Ok(Reach::NotListening) | Err(_) => {
                            let error = unavailable_to(&crossing, &member);
                            return bounce(&mut redis, &keys, &crossing, &error).await;
                        }
                    }
                }
                Ok(None) => false,
                Err(_) => {
                    return crate::metrics::cluster_messages_dropped("cluster_unavailable", 1)
                }
            };
            if !sent {
                bounce(&mut redis, &keys, &crossing, &crossing.unknown()).await;
            }
        };
        ctx.spawn(fut::wrap_future(again));
    }
}

/// The `cluster_unavailable` error a sender gets for a message to an agent whose node
/// `member` lives but could not be reached through the cluster.
fn unavailable_to(crossing: &Crossing, member: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::ClusterUnavailable,
        format!(
            "The message could not be routed through the cluster (node {member} holds agent \
             {} but is not listening to the cluster right now); retry",
            crossing.target
        ),
    )
}

/// Answers `crossing`'s sender with `error` through its member.
pub(super) async fn bounce(
    redis: &mut RedisLink,
    keys: &Keys,
    crossing: &Crossing,
    error: &ProtocolError,
) {
    let error = protocol::error_frame(error, Some(&crossing.message_id));
    let payload = format!(
        "bounce\n{}\n{}\n{}",
        crossing.target, crossing.sender_id, error
    );
    if !matches!(
        redis.publish(&keys.inbox(&crossing.origin), &payload).await,
        Ok(true)
    ) {
        crate::metrics::cluster_messages_dropped("sender_gone", 1);
    }
}

/// A `bounce` body: the error for the sender, delivered here; the target's remembered
/// holder is forgotten.
pub(super) fn bounced(routes: &Routes, direct: &DirectLine, body: &str) {
    let mut parts = body.splitn(3, '\n');
    let (Some(target), Some(sender_id), Some(error)) = (parts.next(), parts.next(), parts.next())
    else {
        return log::warn!("cluster: a malformed bounce was ignored");
    };
    direct.holders().forget(target);
    routes.deliver(sender_id, OutFrame::text(error));
}

/// A `message` or `again` body: delivered here, or sent on (`message`) or bounced
/// (`again`) when the agent is not here.
pub(super) fn received(routes: &Routes, cluster: &Addr<Cluster>, kind: &str, body: &str) {
    let Some(crossing) = Crossing::parse(body) else {
        return log::warn!("cluster: a malformed message was ignored");
    };
    if routes.deliver(&crossing.target, OutFrame::text(&crossing.frame)) {
        return;
    }
    if kind == "message" {
        // It moved on (or left) after the sender looked its holder up.
        cluster.do_send(Reforward(crossing));
    } else {
        cluster.do_send(Bounce(crossing));
    }
}

/// Bounce `0` to its sender (from the subscriber, which has no connection of its own).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Bounce(pub Crossing);

impl Handler<Bounce> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: Bounce, ctx: &mut Self::Context) {
        let Some(mut redis) = self.redis.clone() else {
            return crate::metrics::cluster_messages_dropped("cluster_unavailable", 1);
        };
        let keys = self.keys.clone();
        ctx.spawn(fut::wrap_future(async move {
            bounce(&mut redis, &keys, &msg.0, &msg.0.unknown()).await;
        }));
    }
}

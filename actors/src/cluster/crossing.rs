//! Messages between agents of different nodes, over Redis pub/sub.
//!
//! A direct message the local table cannot deliver is [`Forward`]ed: the holder of the
//! target is read from the target's hash and the message is published on that member's
//! channel (`<prefix>:to:<member>`). A broadcast is delivered locally by the sender's
//! connection and [`Spread`] on `<prefix>:broadcast` to the other members, each of
//! which delivers it to its own agents (minus the exclusions). Pub/sub delivers at most
//! once: what is published while a member is not subscribed is lost (documented).
//!
//! A message that reaches a member whose agent moved on meanwhile (taken over by
//! another node between the sender's lookup and the delivery) is forwarded once more to
//! the id's holder as `again` (never forwarded a third time); the taking node parks it
//! until the agent is registered there (`Routes::expect`).
//!
//! Payloads are text. On a member's channel the first line says what follows:
//! `message\n<target>\n<frame>` (or `again\n…`, the second hop), a removal (`remove\n<agent id>`, see
//! [`super::directory`]), or a takeover request or answer (`takeover\n<json>`,
//! `handed\n<json>`, see [`super::takeover`]). On the broadcast
//! channel: `<origin member>\n<excluded ids, space-separated>\n<frame>` (agent ids
//! contain neither spaces nor newlines).

use super::takeover::{Asked, HandoverAnswer, HandoverRequest, Unwanted, Waiting};
use super::{Cluster, Keys};
use crate::outbound::OutFrame;
use crate::protocol::{self, ErrorCode, ProtocolError};
use crate::routes::Routes;
use actix::prelude::*;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Pause before a lost subscription is made again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(250);

/// A direct message whose target is not on this node.
#[derive(Message)]
#[rtype(result = "()")]
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

/// A broadcast already delivered on this node, for the other nodes' agents.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Spread {
    /// The ids it must not reach (the sender's among them).
    pub exclude: Vec<String>,
    /// The frame (JSON text).
    pub frame: String,
}

fn error_to(routes: &Routes, sender_id: &str, error: &ProtocolError, message_id: &str) {
    let frame = protocol::error_frame(error, Some(message_id));
    routes.deliver(sender_id, OutFrame::json(&frame));
}

impl Handler<Forward> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: Forward, ctx: &mut Self::Context) {
        let mut redis = match self.live() {
            Ok(redis) => redis,
            Err(error) => {
                let error = ProtocolError::new(ErrorCode::ClusterUnavailable, error.0);
                return error_to(&self.routes, &msg.sender_id, &error, &msg.message_id);
            }
        };
        let (keys, me, routes) = (self.keys.clone(), self.member.clone(), self.routes.clone());
        let forward = async move {
            let routed = async {
                let holder: Option<String> = redis::cmd("HGET")
                    .arg(keys.agent(&msg.target))
                    .arg("node")
                    .query_async(&mut redis)
                    .await?;
                Ok::<_, redis::RedisError>(match holder {
                    None => false,
                    Some(member) if *member == *me => {
                        routes.deliver(&msg.target, OutFrame::text(&msg.frame))
                    }
                    Some(member) => {
                        let payload = format!("message\n{}\n{}", msg.target, msg.frame);
                        let receivers: u64 = redis::cmd("PUBLISH")
                            .arg(keys.inbox(&member))
                            .arg(payload)
                            .query_async(&mut redis)
                            .await?;
                        receivers > 0
                    }
                })
            };
            let error = match routed.await {
                Ok(true) => return crate::metrics::cross_node_message("direct"),
                Ok(false) => ProtocolError::new(
                    ErrorCode::UnknownAgent,
                    format!("Agent {} is not connected", msg.target),
                ),
                Err(error) => ProtocolError::new(
                    ErrorCode::ClusterUnavailable,
                    format!("The message could not be routed through the cluster ({error}); retry"),
                ),
            };
            error_to(&routes, &msg.sender_id, &error, &msg.message_id);
        };
        ctx.spawn(fut::wrap_future(forward));
    }
}

/// A message forwarded here for an agent that is no longer here: sent on to the id's
/// holder, once.
#[derive(Message)]
#[rtype(result = "()")]
struct Reforward {
    target: String,
    frame: String,
}

impl Handler<Reforward> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: Reforward, ctx: &mut Self::Context) {
        let dropped = || crate::metrics::cluster_messages_dropped("target_gone", 1);
        let Ok(mut redis) = self.live() else {
            return dropped();
        };
        let (keys, me, routes) = (self.keys.clone(), self.member.clone(), self.routes.clone());
        let again = async move {
            let holder: Option<String> = redis::cmd("HGET")
                .arg(keys.agent(&msg.target))
                .arg("node")
                .query_async(&mut redis)
                .await
                .unwrap_or(None);
            let sent = match holder {
                // Registered here by now (or expected here again).
                Some(member) if *member == *me => {
                    routes.deliver(&msg.target, OutFrame::text(&msg.frame))
                }
                Some(member) => {
                    let payload = format!("again\n{}\n{}", msg.target, msg.frame);
                    redis::cmd("PUBLISH")
                        .arg(keys.inbox(&member))
                        .arg(payload)
                        .query_async::<u64>(&mut redis)
                        .await
                        .is_ok_and(|receivers| receivers > 0)
                }
                None => false,
            };
            if !sent {
                dropped();
            }
        };
        ctx.spawn(fut::wrap_future(again));
    }
}

impl Handler<Spread> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: Spread, ctx: &mut Self::Context) {
        let Ok(mut redis) = self.live() else {
            return; // Delivered on this node only (the cluster is unreachable).
        };
        let payload = format!("{}\n{}\n{}", self.member, msg.exclude.join(" "), msg.frame);
        let channel = self.keys.broadcasts();
        let spread = async move {
            let result = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload)
                .query_async::<u64>(&mut redis)
                .await;
            match result {
                Ok(_) => crate::metrics::cross_node_message("broadcast"),
                Err(error) => log::warn!("cluster: a broadcast reached this node only: {error}"),
            }
        };
        ctx.spawn(fut::wrap_future(spread));
    }
}

/// What a subscriber hands on besides messages for agents.
struct Inbox {
    cluster: Addr<Cluster>,
    waiting: Waiting,
}

impl Inbox {
    /// Hands a takeover answer to the request waiting for it, or has it released.
    fn answered(&self, answer: HandoverAnswer) {
        let waiter = self
            .waiting
            .lock()
            .expect("not poisoned")
            .remove(&answer.id);
        match waiter {
            Some(waiter) => {
                if let Err(incarnation) = waiter.send(answer.incarnation) {
                    let late = HandoverAnswer {
                        incarnation,
                        ..answer
                    };
                    self.cluster.do_send(Unwanted(late));
                }
            }
            None => self.cluster.do_send(Unwanted(answer)),
        }
    }

    /// One payload of this member's channel.
    fn received(&self, routes: &Routes, payload: &str) {
        let Some((kind, body)) = payload.split_once('\n') else {
            return log::warn!("cluster: a malformed message was ignored");
        };
        match kind {
            "message" | "again" => {
                let Some((target, frame)) = body.split_once('\n') else {
                    return log::warn!("cluster: a malformed message was ignored");
                };
                if routes.deliver(target, OutFrame::text(frame)) {
                    return;
                }
                if kind == "message" {
                    // It moved on (or left) after the sender looked its holder up.
                    let (target, frame) = (target.to_owned(), frame.to_owned());
                    self.cluster.do_send(Reforward { target, frame });
                } else {
                    crate::metrics::cluster_messages_dropped("target_gone", 1);
                }
            }
            "remove" => self.cluster.do_send(RemoveAsked(body.to_owned())),
            "takeover" => match serde_json::from_str::<HandoverRequest>(body) {
                Ok(request) => self.cluster.do_send(Asked(request)),
                Err(error) => log::warn!("cluster: a malformed takeover request: {error}"),
            },
            "handed" => match serde_json::from_str::<HandoverAnswer>(body) {
                Ok(answer) => self.answered(answer),
                Err(error) => log::warn!("cluster: a malformed takeover answer: {error}"),
            },
            other => log::warn!("cluster: a message of unknown kind {other:?} was ignored"),
        }
    }
}

/// Another node asked (`DELETE /agents/{id}`) to remove an agent held here.
#[derive(Message)]
#[rtype(result = "()")]
struct RemoveAsked(String);

impl Handler<RemoveAsked> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: RemoveAsked, _ctx: &mut Self::Context) {
        if let Some(registry) = &self.registry {
            registry.remove.do_send(crate::registry::RemoveAgent(msg.0));
        }
    }
}

/// Delivers one broadcast to the agents of this node (unless it came from here).
fn spread(routes: &Routes, member: &str, payload: &str) {
    let mut parts = payload.splitn(3, '\n');
    let (Some(origin), Some(exclude), Some(frame)) = (parts.next(), parts.next(), parts.next())
    else {
        return log::warn!("cluster: a malformed broadcast was ignored");
    };
    if origin != member {
        let exclude: Vec<&str> = exclude.split(' ').filter(|id| !id.is_empty()).collect();
        routes.spread(&exclude, OutFrame::text(frame));
    }
}

/// Listens on this member's channel and the broadcast channel for as long as the
/// member lives, subscribing again whenever the subscription drops.
pub(super) async fn subscribe(
    client: redis::Client,
    keys: Keys,
    member: Arc<str>,
    routes: Arc<Routes>,
    subscribed: Arc<AtomicBool>,
    cluster: Addr<Cluster>,
    waiting: Waiting,
) {
    let (inbox, broadcasts) = (keys.inbox(&member), keys.broadcasts());
    let handler = Inbox { cluster, waiting };
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                let subscribing = async {
                    pubsub.subscribe(&inbox).await?;
                    pubsub.subscribe(&broadcasts).await
                };
                if let Err(error) = subscribing.await {
                    log::warn!("cluster: subscribing failed: {error}");
                } else {
                    subscribed.store(true, Ordering::Release);
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        let payload: String = message.get_payload().unwrap_or_default();
                        if message.get_channel_name() == broadcasts {
                            spread(&routes, &member, &payload);
                        } else {
                            handler.received(&routes, &payload);
                        }
                    }
                    subscribed.store(false, Ordering::Release);
                    log::warn!("cluster: the subscription to Redis dropped; subscribing again");
                }
            }
            Err(error) => log::warn!("cluster: cannot subscribe to Redis: {error}"),
        }
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

//! Messages between agents of different nodes, over Redis pub/sub.
//!
//! A direct message the local table cannot deliver is [`Forward`]ed: the holder of the
//! target is read from the target's hash and the message is published on that member's
//! channel (`<prefix>:to:<member>`). A broadcast is delivered locally by the sender's
//! connection and [`Spread`] on `<prefix>:broadcast` to the other members, each of
//! which delivers it to its own agents (minus the exclusions). Pub/sub delivers at most
//! once: what is published while a member is not subscribed is lost (documented).
//!
//! Payloads are text: `<target>\n<frame>` on a member's channel,
//! `<origin member>\n<excluded ids, space-separated>\n<frame>` on the broadcast channel
//! (agent ids contain neither spaces nor newlines).

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
                        let payload = format!("{}\n{}", msg.target, msg.frame);
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

/// Delivers one pub/sub message to the agents of this node.
fn deliver(routes: &Routes, member: &str, broadcasts: &str, channel: &str, payload: &str) {
    if channel == broadcasts {
        let mut parts = payload.splitn(3, '\n');
        let (Some(origin), Some(exclude), Some(frame)) = (parts.next(), parts.next(), parts.next())
        else {
            return log::warn!("cluster: a malformed broadcast was ignored");
        };
        if origin != member {
            let exclude: Vec<&str> = exclude.split(' ').filter(|id| !id.is_empty()).collect();
            routes.spread(&exclude, OutFrame::text(frame));
        }
    } else if let Some((target, frame)) = payload.split_once('\n') {
        // Not here any more (it left or moved): the sender was answered already.
        routes.deliver(target, OutFrame::text(frame));
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
) {
    let (inbox, broadcasts) = (keys.inbox(&member), keys.broadcasts());
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
                        deliver(
                            &routes,
                            &member,
                            &broadcasts,
                            message.get_channel_name(),
                            &payload,
                        );
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

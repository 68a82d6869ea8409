//! What crosses between nodes over Redis pub/sub, and the subscriber that receives it.
//!
//! Direct messages are [`super::direct`]'s. A broadcast is delivered locally by the
//! sender's connection and [`Spread`] on `<prefix>:broadcast` to the other members,
//! each of which delivers it to its own agents (minus the exclusions). Pub/sub delivers
//! at most once: what is published while a member is not subscribed is lost
//! (documented).
//!
//! Payloads are text. On a member's channel (`<prefix>:to:<member>`) the first line says
//! what follows: a direct message (`message`, `again`, `moved`, `bounce`, see
//! [`super::direct`]), a removal (`remove\n<agent id>`, see [`super::directory`]), or a
//! takeover request or answer (`takeover\n<json>`, `handed\n<json>`, see
//! [`super::takeover`]). On the broadcast channel: `<origin member>\n<excluded ids,
//! space-separated>\n<frame>` (agent ids contain neither spaces nor newlines).

use super::direct::{self, DirectLine};
use super::takeover::{Asked, HandoverAnswer, HandoverRequest, Unwanted, Waiting};
use super::Ended;
use super::{Cluster, Keys};
use crate::outbound::OutFrame;
use crate::routes::Routes;
use actix::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Pause before a lost subscription is made again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(250);

/// A broadcast already delivered on this node, for the other nodes' agents.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Spread {
    /// The ids it must not reach (the sender's among them).
    pub exclude: Vec<String>,
    /// The frame (JSON text).
    pub frame: String,
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
    /// Where remembered holders are forgotten.
    direct: Arc<DirectLine>,
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
            "message" | "again" => direct::received(routes, &self.cluster, kind, body),
            "moved" => self.direct.holders().forget(body),
            "bounce" => direct::bounced(routes, &self.direct, body),
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
    target: super::RedisTarget,
    keys: Keys,
    member: Arc<str>,
    direct: Arc<DirectLine>,
    subscribed: Arc<AtomicBool>,
    cluster: Addr<Cluster>,
    waiting: Waiting,
) {
    let (inbox, broadcasts) = (keys.inbox(&member), keys.broadcasts());
    let routes = direct.routes().clone();
    let handler = Inbox {
        cluster,
        waiting,
        direct,
    };
    loop {
        let channels = [inbox.as_str(), broadcasts.as_str()];
        let listening = target.listen(
            &channels,
            || subscribed.store(true, Ordering::Release),
            |channel, payload| {
                if channel == broadcasts {
                    spread(&routes, &member, &payload);
                } else {
                    handler.received(&routes, &payload);
                }
            },
        );
        let ended = listening.await;
        subscribed.store(false, Ordering::Release);
        match ended {
            Ok(Ended::Moved) => continue, // At once: messages published meanwhile are lost.
            Ok(Ended::Dropped) => {
                log::warn!("cluster: the subscription to Redis ended; subscribing again")
            }
            Err(error) => log::warn!("cluster: cannot subscribe to Redis: {error}"),
        }
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

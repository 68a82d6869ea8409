//! Instructions across the nodes of a cluster: every node's dispatcher shares one
//! database (PostgreSQL) but knows only its own agents, so work one node cannot
//! deliver is announced to all of them on Redis (`<prefix>:work`): `agent\n<id>` (an
//! agent's pending instructions: the node holding it runs a delivery round) or
//! `capability\n<name>` (instructions waiting for a capability: nodes with such an
//! agent give them out). A notice lost while Redis is away delays that work until the
//! agent registers again or another notice names it.

use super::Dispatcher;
use crate::cluster::Keys;
use crate::cluster::{RedisLink, RedisTarget};
use actix::prelude::*;
use std::time::Duration;

/// Work one node announces to every node.
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum Notice {
    /// Agent `0` has pending instructions.
    Agent(String),
    /// Instructions wait for capability `0`.
    Capability(String),
}

impl Notice {
    fn payload(&self) -> String {
        match self {
            Self::Agent(id) => format!("agent\n{id}"),
            Self::Capability(name) => format!("capability\n{name}"),
        }
    }

    fn parse(payload: &str) -> Option<Self> {
        match payload.split_once('\n')? {
            ("agent", id) => Some(Self::Agent(id.to_owned())),
            ("capability", name) => Some(Self::Capability(name.to_owned())),
            _ => None,
        }
    }
}

/// This node's line to the other nodes' dispatchers.
pub struct Notices {
    target: RedisTarget,
    channel: String,
    line: Option<RedisLink>,
}

impl Notices {
    /// Notices on the Redis at `redis_url`, under the cluster's `prefix`.
    pub fn new(redis_url: &str, prefix: &str) -> Result<Self, String> {
        let target = RedisTarget::open(redis_url)
            .map_err(|e| format!("cluster.redis_url {redis_url:?}: {e}"))?;
        Ok(Self {
            target,
            channel: Keys::new(prefix).work(),
            line: None,
        })
    }
}

impl Dispatcher {
    /// Announces `notice` to every node (this one included: it ignores what it
    /// cannot serve).
    pub(super) fn announce(&mut self, ctx: &mut Context<Self>, notice: Notice) {
        let Some(notices) = &mut self.notices else {
            return;
        };
        let (target, channel, line) = (
            notices.target.clone(),
            notices.channel.clone(),
            notices.line.clone(),
        );
        let publish = async move {
            let mut line = match line {
                Some(line) => line,
                None => target.connect().await.map_err(|e| e.0)?,
            };
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(notice.payload())
                .query_async::<i64>(&mut line)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(line)
        };
        ctx.spawn(
            fut::wrap_future(publish).map(|result, dispatcher: &mut Self, _| match result {
                Ok(line) => {
                    if let Some(notices) = &mut dispatcher.notices {
                        notices.line = Some(line);
                    }
                }
                Err(error) => {
                    log::warn!("instructions: announcing work to the cluster failed: {error}")
                }
            }),
        );
    }

    /// Listens for the notices of every node for as long as the dispatcher lives.
    pub(super) fn listen(&self, ctx: &mut Context<Self>) {
        let Some(notices) = &self.notices else {
            return;
        };
        let (target, channel, me) = (
            notices.target.clone(),
            notices.channel.clone(),
            ctx.address(),
        );
        ctx.spawn(fut::wrap_future(async move {
            loop {
                let deliver = |_: &str, payload: String| {
                    if let Some(notice) = Notice::parse(&payload) {
                        me.do_send(notice);
                    }
                };
                if let Err(error) = target.listen(&[&channel], || {}, deliver).await {
                    log::warn!("instructions: cannot subscribe to {channel}: {error}");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }));
    }
}

impl Handler<Notice> for Dispatcher {
    type Result = ();

    fn handle(&mut self, notice: Notice, ctx: &mut Self::Context) {
        match notice {
            Notice::Agent(id) => {
                if let Some((agent_id, _)) = self.online.get_key_value(id.as_str()) {
                    let agent_id = agent_id.clone();
                    self.pump(ctx, agent_id);
                }
            }
            Notice::Capability(name) => {
                let able = self
                    .online
                    .values()
                    .any(|online| online.capabilities.contains(&name));
                if able {
                    self.assign_waiting(ctx, name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Notice;

    #[test]
    fn a_notice_reads_back_as_it_was_written() {
        for notice in [
            Notice::Agent("a-1".into()),
            Notice::Capability("gpu".into()),
        ] {
            assert_eq!(Notice::parse(&notice.payload()), Some(notice));
        }
        assert_eq!(Notice::parse("agent"), None);
        assert_eq!(Notice::parse("other\nx"), None);
    }
}

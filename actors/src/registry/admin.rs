//! The admin API's view of the table, and the shutdown sequence's steps.

use super::{AgentEntry, Registry};
use super::{
    AgentInfo, BeginShutdown, CloseAll, ConnectionOrder, GetAgent, GetStats, ListAgents,
    RemoveAgent, WaitFor,
};
use crate::bus::Publish;
use crate::clock::monotonic_to_epoch_secs;
use crate::disconnect::Disconnect;
use crate::event::{LifecycleEvent, NetworkEvent};
use crate::outbound::OutFrame;
use crate::protocol;
use actix::prelude::*;
use serde_json::json;
use std::sync::Arc;

impl Registry {
    fn info(&self, agent_id: &str, entry: &AgentEntry) -> AgentInfo {
        AgentInfo {
            agent_id: agent_id.to_owned(),
            name: entry.name(agent_id),
            session_id: entry.session_uuid.to_string(),
            incarnation: entry.incarnation,
            state: if entry.inactive { "inactive" } else { "active" },
            connected_at: humantime::format_rfc3339_millis(entry.connected_at).to_string(),
            last_seen: monotonic_to_epoch_secs(entry.clock.last_seen_ms()),
            last_activity: monotonic_to_epoch_secs(entry.clock.last_activity_ms()),
            metadata: entry.metadata.clone(),
            remote_addr: entry.remote_addr.to_string(),
            queue_length: entry.clock.queued_frames(),
            node_id: self.source.node_id.to_string(),
            round_trip_ms: entry.clock.last_ping_rtt_ms(),
        }
    }
}

impl Handler<ListAgents> for Registry {
    type Result = MessageResult<ListAgents>;

    fn handle(&mut self, _msg: ListAgents, _ctx: &mut Self::Context) -> Self::Result {
        let mut agents: Vec<AgentInfo> =
            self.agents.iter().map(|(id, e)| self.info(id, e)).collect();
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        MessageResult(agents)
    }
}

impl Handler<GetAgent> for Registry {
    type Result = Option<AgentInfo>;

    fn handle(&mut self, msg: GetAgent, _ctx: &mut Self::Context) -> Self::Result {
        self.agents
            .get(msg.0.as_str())
            .map(|e| self.info(&msg.0, e))
    }
}

impl Handler<RemoveAgent> for Registry {
    type Result = bool;

    fn handle(&mut self, msg: RemoveAgent, _ctx: &mut Self::Context) -> bool {
        if !self.agents.contains_key(msg.0.as_str()) {
            return false;
        }
        self.evict(&msg.0, Disconnect::ADMIN, None);
        true
    }
}

impl Handler<GetStats> for Registry {
    type Result = MessageResult<GetStats>;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Self::Context) -> Self::Result {
        let mut snapshot =
            self.stats
                .snapshot(self.agents.len(), self.inactive_count, self.sockets.len());
        snapshot.metadata_bytes = self.metadata_bytes;
        snapshot.remembered_agent_ids = self.incarnations.remembered();
        snapshot.shutting_down = self.shutting_down;
        MessageResult(snapshot)
    }
}

impl Handler<BeginShutdown> for Registry {
    type Result = usize;

    fn handle(&mut self, msg: BeginShutdown, _ctx: &mut Self::Context) -> usize {
        self.shutting_down = true;
        let mut notice = protocol::notification(
            "network_shutdown",
            None,
            "The network is shutting down; disconnect now",
        );
        notice["timeout"] = json!(msg.timeout_secs);
        if let Some(url) = &msg.reconnect_url {
            notice["reconnect_url"] = json!(url);
        }
        let notice = OutFrame::json(&notice);
        for socket in self.sockets.values() {
            socket.outbox.push(notice.clone());
        }
        let payload = NetworkEvent::Stopping {
            agents: self.agents.len(),
            open_sockets: self.sockets.len(),
            timeout: msg.timeout_secs,
        };
        let event = LifecycleEvent::network(&self.source, &payload);
        self.events.do_send(Publish(Arc::new(event)));
        self.agents.len()
    }
}

impl Handler<WaitFor> for Registry {
    type Result = ();

    fn handle(&mut self, msg: WaitFor, _ctx: &mut Self::Context) {
        self.waiters.push((msg.condition, msg.reply));
        self.check_waiters();
    }
}

impl Handler<CloseAll> for Registry {
    type Result = usize;

    fn handle(&mut self, _msg: CloseAll, _ctx: &mut Self::Context) -> usize {
        let agents: Vec<Arc<str>> = self.agents.keys().cloned().collect();
        for agent_id in &agents {
            self.evict(agent_id, Disconnect::SHUTDOWN, None);
        }
        for socket in self.sockets.values() {
            socket.order(ConnectionOrder::Close {
                disconnect: Disconnect::SHUTDOWN,
                notice: None,
            });
        }
        agents.len()
    }
}

//! Publishing an incarnation's events and ending incarnations: the registry's side of
//! connections starting and ending, of the heartbeat's verdicts, and of activity.

use super::{ActivityResumed, Connected, ConnectionEnded, ConnectionOrder};
use super::{AgentEntry, Registry, Socket};
use super::{ClaimsReasserted, HeldClaim, HeldClaims};
use crate::bus::Publish;
use crate::clock::epoch_secs;
use crate::cluster::{LeaseLost, Progress, Release};
use crate::disconnect::Disconnect;
use crate::event::{AgentEvent, EventSource, LifecycleEvent, CLEANUP_STEPS};
use crate::heartbeat::{StaleReason, Verdict, Watch};
use crate::protocol::{self, ErrorCode};
use actix::prelude::*;
use bytestring::ByteString;
use std::sync::Arc;

/// Publishes an event of `entry`'s incarnation, numbering it. A free function so that
/// it can run while `entry` is borrowed from the registry's table.
pub(super) fn publish(
    events: &Recipient<Publish>,
    source: &EventSource,
    agent_id: &Arc<str>,
    entry: &mut AgentEntry,
    payload: AgentEvent<'_>,
) {
    entry.seq += 1;
    let event = LifecycleEvent::agent(
        source,
        agent_id.clone(),
        entry.incarnation,
        entry.seq,
        &payload,
    );
    events.do_send(Publish(Arc::new(event)));
}

impl Registry {
    /// Ends `entry`'s incarnation: `agent.disconnected`, heartbeat untracked,
    /// `agent.cleaned_up`. The entry must already be out of the table.
    pub(super) fn end_incarnation(
        &mut self,
        agent_id: &Arc<str>,
        mut entry: AgentEntry,
        disconnect: Disconnect,
    ) {
        if let Some(cluster) = &self.cluster {
            if self.retaking.as_deref() != Some(&**agent_id) {
                cluster.do_send(Release {
                    agent_id: agent_id.clone(),
                    incarnation: entry.incarnation,
                });
            }
        }
        let connected_secs = self.forget(agent_id, &entry, disconnect);
        let session_uuid = entry.session_uuid.to_string();
        let metadata = entry.metadata.clone();
        let payload = AgentEvent::Disconnected {
            session_id: &session_uuid,
            reason: disconnect.reason.as_str(),
            close_code: Some(disconnect.code),
            metadata: &metadata,
        };
        publish(&self.events, &self.source, agent_id, &mut entry, payload);
        let payload = AgentEvent::CleanedUp {
            session_id: &session_uuid,
            connected_secs,
            steps: CLEANUP_STEPS,
        };
        publish(&self.events, &self.source, agent_id, &mut entry, payload);
        self.check_waiters();
    }

    /// Lets go of everything this node holds for `entry`'s incarnation (route,
    /// certificate, metadata budget, heartbeat, the socket's id) and counts its end;
    /// the seconds it lasted. The entry must already be out of the table.
    fn forget(&mut self, agent_id: &Arc<str>, entry: &AgentEntry, disconnect: Disconnect) -> f64 {
        self.routes.remove(agent_id, entry.session_id);
        let took_instructions = entry.metadata.get().contains("instructions");
        if let (Some(presence), true) = (&self.presence, took_instructions) {
            // The dispatcher ignores incarnations it was never told of.
            presence.do_send(crate::instructions::Presence::Offline {
                agent_id: agent_id.clone(),
                incarnation: entry.incarnation,
            });
        }
        self.certificates.released(agent_id);
        self.incarnations.departed(agent_id, entry.incarnation);
        self.metadata_bytes -= entry.metadata.get().len();
        if entry.inactive {
            self.inactive_count -= 1;
        }
        self.heartbeat.do_send(Watch::Untrack {
            session_id: entry.session_id,
        });
        if let Some(socket) = self.sockets.get_mut(&entry.session_id) {
            socket.agent = None;
        }
        let lasted_ms = self.clock.now_ms().saturating_sub(entry.connected_mono_ms);
        let lasted_secs = lasted_ms as f64 / 1000.0;
        self.stats.ended(disconnect.reason.as_str(), lasted_secs);
        crate::metrics::incarnation_ended(lasted_secs);
        lasted_secs
    }

    /// Removes `agent_id` and ends its incarnation now, then tells its connection to
    /// close (after `notice`, if any).
    pub(super) fn evict(
        &mut self,
        agent_id: &str,
        disconnect: Disconnect,
        notice: Option<ByteString>,
    ) {
        let Some((agent_id, entry)) = self.agents.remove_entry(agent_id) else {
            return;
        };
        let session_id = entry.session_id;
        self.end_incarnation(&agent_id, entry, disconnect);
        if let Some(socket) = self.sockets.get(&session_id) {
            socket.order(ConnectionOrder::Close { disconnect, notice });
        }
    }

    /// Publishes `agent.stale` for `agent_id` and evicts it (close 4002).
    pub(super) fn declare_stale(&mut self, agent_id: &str, reason: StaleReason, last_seen_ms: u64) {
        let Some((agent_id, entry)) = self.agents.get_key_value(agent_id) else {
            return;
        };
        let agent_id = agent_id.clone();
        let session_uuid = entry.session_uuid.to_string();
        let now = self.clock.now_ms();
        let entry = self.agents.get_mut(&agent_id).expect("looked up above");
        self.stats.stale();
        // `last_seen_ms` is on the registry's clock: its epoch time is now minus its age.
        let age_secs = now.saturating_sub(last_seen_ms) as f64 / 1000.0;
        let payload = AgentEvent::Stale {
            session_id: &session_uuid,
            reason: reason.as_str(),
            last_seen: epoch_secs() - age_secs,
        };
        publish(&self.events, &self.source, &agent_id, entry, payload);
        self.evict(&agent_id, Disconnect::STALE, None);
    }

    /// Tells the cluster the seq of `agent_id`'s last event (the next are a reaper's
    /// if this node is lost).
    fn progress(&self, agent_id: &Arc<str>) {
        if let (Some(cluster), Some(entry)) = (&self.cluster, self.agents.get(agent_id)) {
            cluster.do_send(Progress {
                agent_id: agent_id.clone(),
                incarnation: entry.incarnation,
                seq: entry.seq,
            });
        }
    }

    /// Counts a refused registration and publishes `agent.registration_failed`.
    pub(super) fn registration_failed(&mut self, agent_id: Option<&str>, code: ErrorCode) {
        self.stats.refused();
        crate::metrics::registration_refused(code.as_str());
        let payload = AgentEvent::RegistrationFailed {
            error_code: code.as_str(),
        };
        let key: Arc<str> = agent_id.unwrap_or("").into();
        let event = LifecycleEvent::agent(&self.source, key, 0, 0, &payload);
        self.events.do_send(Publish(Arc::new(event)));
    }
}

impl Handler<Connected> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Connected, _ctx: &mut Self::Context) {
        self.stats.socket_opened();
        if self.shutting_down {
            let notice =
                protocol::notification("network_shutdown", None, "The network is shutting down");
            msg.outbox.push_json(&notice);
        }
        self.sockets.insert(
            msg.session_id,
            Socket {
                orders: msg.orders,
                outbox: msg.outbox,
                remote_addr: msg.remote_addr,
                agent: None,
                claims: 0,
            },
        );
    }
}

impl Handler<ConnectionEnded> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ConnectionEnded, _ctx: &mut Self::Context) {
        let socket = self.sockets.remove(&msg.session_id);
        let agent_id = socket.and_then(|s| s.agent).or(msg.agent_id);
        if let Some(agent_id) = agent_id {
            let current = self
                .agents
                .get(&agent_id)
                .is_some_and(|e| e.session_id == msg.session_id);
            if current {
                let (agent_id, entry) = self
                    .agents
                    .remove_entry(&agent_id)
                    .expect("entry checked above");
                self.end_incarnation(&agent_id, entry, msg.disconnect);
            }
        }
        self.check_waiters();
    }
}

impl Handler<ActivityResumed> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ActivityResumed, _ctx: &mut Self::Context) {
        let Some(agent_id) = self.agent_of(msg.session_id) else {
            return;
        };
        let now = self.clock.now_ms();
        let entry = self.agents.get_mut(&agent_id).expect("agent_of checked it");
        // Not published inactive (the heartbeat's verdict has not come, and will find
        // the activity and be void): nothing to tell.
        if !entry.inactive {
            return;
        }
        entry.inactive = false;
        self.inactive_count -= 1;
        let session_uuid = entry.session_uuid.to_string();
        let idle_ms = now.saturating_sub(entry.clock.last_activity_ms());
        let payload = AgentEvent::Active {
            session_id: &session_uuid,
            inactive_secs: idle_ms as f64 / 1000.0,
        };
        publish(&self.events, &self.source, &agent_id, entry, payload);
        self.progress(&agent_id);
    }
}

impl Handler<Verdict> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Verdict, _ctx: &mut Self::Context) {
        match msg {
            Verdict::Stale {
                session_id,
                reason,
                last_seen_ms,
            } => {
                if let Some(agent_id) = self.agent_of(session_id) {
                    self.declare_stale(&agent_id, reason, last_seen_ms);
                }
            }
            Verdict::Inactive {
                session_id,
                last_activity_ms,
                inactive_secs,
            } => {
                let Some(agent_id) = self.agent_of(session_id) else {
                    return;
                };
                let entry = self.agents.get_mut(&agent_id).expect("agent_of checked it");
                // Activity since the verdict was made voids it.
                if entry.inactive || entry.clock.last_activity_ms() != last_activity_ms {
                    return;
                }
                entry.inactive = true;
                self.inactive_count += 1;
                let session_uuid = entry.session_uuid.to_string();
                let payload = AgentEvent::Inactive {
                    session_id: &session_uuid,
                    inactive_secs,
                };
                publish(&self.events, &self.source, &agent_id, entry, payload);
                self.progress(&agent_id);
            }
        }
    }
}

impl Handler<LeaseLost> for Registry {
    type Result = ();

    /// This node may no longer hold its ids: every agent is closed 4009 and forgotten
    /// without publishing its end, which the node that noticed the loss publishes
    /// (once, cluster-wide).
    fn handle(&mut self, _msg: LeaseLost, _ctx: &mut Self::Context) {
        self.lease_losses += 1;
        let agents: Vec<(Arc<str>, AgentEntry)> = self.agents.drain().collect();
        for (agent_id, entry) in agents {
            self.forget(&agent_id, &entry, Disconnect::NODE_LOST);
            if let Some(socket) = self.sockets.get(&entry.session_id) {
                socket.order(ConnectionOrder::Close {
                    disconnect: Disconnect::NODE_LOST,
                    notice: None,
                });
            }
        }
        self.check_waiters();
    }
}

impl Handler<HeldClaims> for Registry {
    type Result = MessageResult<HeldClaims>;

    fn handle(&mut self, _msg: HeldClaims, _ctx: &mut Self::Context) -> Self::Result {
        let claims = self.agents.iter().map(|(agent_id, entry)| HeldClaim {
            agent_id: agent_id.clone(),
            incarnation: entry.incarnation,
            seq: entry.seq,
            session: entry.session_uuid.to_string(),
            metadata: entry.metadata.get().to_owned(),
            at: entry
                .connected_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        });
        MessageResult(claims.collect())
    }
}

impl Handler<ClaimsReasserted> for Registry {
    type Result = ();

    /// Ends here what the cluster could not claim again; releases again what it
    /// claimed for an incarnation that ended meanwhile (its release found no claim).
    fn handle(&mut self, msg: ClaimsReasserted, _ctx: &mut Self::Context) {
        let current = |act: &Self, agent_id: &str| act.agents.get(agent_id).map(|e| e.incarnation);
        for (agent_id, incarnation) in msg.kept {
            if current(self, &agent_id) != Some(incarnation) {
                if let Some(cluster) = &self.cluster {
                    cluster.do_send(Release {
                        agent_id,
                        incarnation,
                    });
                }
            }
        }
        for (agent_id, incarnation) in msg.reaped {
            if current(self, &agent_id) == Some(incarnation) {
                let (agent_id, entry) = self.agents.remove_entry(&agent_id).expect("present");
                self.forget(&agent_id, &entry, Disconnect::NODE_LOST);
                if let Some(socket) = self.sockets.get(&entry.session_id) {
                    socket.order(ConnectionOrder::Close {
                        disconnect: Disconnect::NODE_LOST,
                        notice: None,
                    });
                }
            }
        }
        for (agent_id, incarnation) in msg.taken {
            if current(self, &agent_id) == Some(incarnation) {
                self.evict(&agent_id, Disconnect::NODE_LOST, None);
            }
        }
        self.check_waiters();
    }
}

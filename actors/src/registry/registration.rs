//! Registration and takeover: who may hold an agent id, numbering incarnations, and
//! ending the old incarnation before the new one is published.

use super::lifecycle::publish;
use super::remote::Claimed;
use super::{AgentEntry, ConnectionOrder, RegisterAgent, RegistrationRefused, Registry};
use crate::clock::epoch_secs;
use crate::cluster::{answered, Claim, ClaimOutcome, Release};
use crate::disconnect::Disconnect;
use crate::event::AgentEvent;
use crate::heartbeat::{StaleReason, Watch};
use crate::instructions::Presence;
use crate::liveness::SessionId;
use crate::protocol::{self, ErrorCode, ProtocolError};
use actix::prelude::*;
use bytestring::ByteString;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::SystemTime;

/// How a registration proved its right to take a live id over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Takeover {
    Certificate,
    ForceReconnect,
}

impl Takeover {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Certificate => "certificate",
            Self::ForceReconnect => "force_reconnect",
        }
    }

    /// The proof another node of the cluster checked.
    pub(super) fn parse(proof: &str) -> Self {
        match proof {
            "certificate" => Self::Certificate,
            _ => Self::ForceReconnect,
        }
    }
}

impl Registry {
    /// Answers `register_agent` with an error, and closes the connection if `close`.
    pub(super) fn refuse(
        &mut self,
        session_id: SessionId,
        msg: &RegisterAgent,
        error: ProtocolError,
        close: Option<Disconnect>,
    ) {
        if let Some(socket) = self.sockets.get(&session_id) {
            let frame = protocol::response_error("register_agent", msg.request_id.as_ref(), &error);
            // The relay writes the answer, then hands the order to the connection in
            // the same turn: the close follows the answer, and the connection is
            // unregistered again before it can read the agent's retry.
            socket.answer_then(&frame, ConnectionOrder::Refused(close));
        }
        self.registration_failed(Some(&msg.registration.agent_id), error.code);
    }

    /// Whether the holder of an agent id is certainly gone: its actor stopped, or it
    /// has been silent past the stale bound (so the heartbeat is about to declare it
    /// stale anyway; a reconnect need not wait for that).
    fn holder_is_dead(&self, entry: &AgentEntry) -> Option<StaleReason> {
        let socket = self.sockets.get(&entry.session_id);
        if socket.is_none_or(|socket| !socket.orders.connected()) {
            return Some(StaleReason::AgentTimeout);
        }
        let last_seen = entry.clock.last_seen_ms();
        self.rules
            .is_past_stale_bound(last_seen, self.clock.now_ms())
            .then_some(StaleReason::PingTimeout)
    }

    /// Decides whether `msg` may take `agent_id`: `Ok(None)` when the id is free (or
    /// its holder was found dead and evicted), `Ok(Some(proof))` for a takeover.
    fn may_take(&mut self, msg: &RegisterAgent) -> Result<Option<Takeover>, ProtocolError> {
        let registration = &msg.registration;
        let certificate_ok = match &registration.certificate {
            Some(certificate) => {
                let agent_id = &registration.agent_id;
                match self
                    .certificates
                    .validate_for(certificate, agent_id, epoch_secs())
                {
                    Ok(()) => true,
                    Err(error) => {
                        return Err(ProtocolError::new(
                            ErrorCode::InvalidCertificate,
                            format!("Invalid certificate: {error}"),
                        ))
                    }
                }
            }
            None => false,
        };
        let Some(existing) = self.agents.get(registration.agent_id.as_str()) else {
            return Ok(None);
        };
        if let Some(reason) = self.holder_is_dead(existing) {
            let last_seen = existing.clock.last_seen_ms();
            self.declare_stale(&registration.agent_id, reason, last_seen);
            Ok(None)
        } else if certificate_ok {
            Ok(Some(Takeover::Certificate))
        } else if registration.force_reconnect && self.settings.identity.allow_force_reconnect {
            Ok(Some(Takeover::ForceReconnect))
        } else {
            Err(ErrorCode::AgentIdInUse.into())
        }
    }

    /// The proof `msg` gives for taking over an id held on another node: its
    /// certificate (validated by `may_take`) or an allowed `force_reconnect`.
    fn remote_proof(&self, msg: &RegisterAgent) -> Option<Takeover> {
        let registration = &msg.registration;
        if registration.certificate.is_some() {
            Some(Takeover::Certificate)
        } else if registration.force_reconnect && self.settings.identity.allow_force_reconnect {
            Some(Takeover::ForceReconnect)
        } else {
            None
        }
    }

    /// Publishes `agent.replaced` for the holder of `agent_id` and evicts it (close
    /// 4001 after a `connection_replaced` notice).
    pub(super) fn replace(
        &mut self,
        agent_id: &Arc<str>,
        by_incarnation: u64,
        by: &str,
        proof: Takeover,
    ) {
        let Some(old) = self.agents.get_mut(agent_id) else {
            return;
        };
        self.stats.takeovers += 1;
        let session_uuid = old.session_uuid.to_string();
        let payload = AgentEvent::Replaced {
            session_id: &session_uuid,
            by_incarnation,
            by_session_id: by,
            proof: proof.as_str(),
        };
        publish(&self.events, &self.source, agent_id, old, payload);
        let notice = protocol::notification(
            "connection_replaced",
            Some(agent_id),
            "Another connection registered as this agent; this connection is closed",
        );
        let notice = ByteString::from(notice.to_string());
        self.evict(agent_id, Disconnect::REPLACED, Some(notice));
    }

    /// The next incarnation of `agent_id`: incarnations of an id only grow.
    fn next_incarnation(&self, agent_id: &str) -> u64 {
        let current = self.agents.get(agent_id).map(|entry| entry.incarnation);
        self.incarnations.next(agent_id, current)
    }

    /// The `register_agent` success answer.
    fn welcome(
        &self,
        msg: &RegisterAgent,
        agent_id: &str,
        session: &str,
        incarnation: u64,
    ) -> Value {
        let hb = &self.settings.heartbeat;
        protocol::response_ok(
            "register_agent",
            msg.request_id.as_ref(),
            json!({
                "network_name": self.settings.network.name,
                "network_id": self.settings.network.id,
                "metadata": {},
                "agent_id": agent_id,
                "session_id": session,
                "incarnation": incarnation,
                "heartbeat_interval": hb.interval,
                "ping_timeout": hb.ping_timeout,
                "agent_timeout": hb.agent_timeout,
            }),
        )
    }
}

impl Handler<RegisterAgent> for Registry {
    type Result = ();

    fn handle(&mut self, msg: RegisterAgent, ctx: &mut Self::Context) {
        let session_id = msg.session_id;
        if !self.sockets.contains_key(&session_id) {
            return; // The socket closed while the request was in flight.
        }
        if self.shutting_down {
            let error = ErrorCode::ShuttingDown.into();
            return self.refuse(session_id, &msg, error, Some(Disconnect::SHUTDOWN));
        }
        let agent_id = msg.registration.agent_id.as_str();
        if self.taking_over.contains(agent_id) || self.claiming.contains_key(agent_id) {
            let error = ProtocolError::new(
                ErrorCode::AgentIdInUse,
                format!(
                    "Agent {agent_id} is being registered by another connection; retry once \
                     that registration is answered"
                ),
            );
            return self.refuse(session_id, &msg, error, None);
        }
        let takeover = match self.may_take(&msg) {
            Ok(takeover) => takeover,
            Err(error) => return self.refuse(session_id, &msg, error, None),
        };
        let max = self.settings.network.max_connections;
        let coming = self.claiming.len() + self.taking_over.len();
        if takeover.is_none() && self.agents.len() + coming >= max {
            let error = ProtocolError::new(
                ErrorCode::ServerFull,
                format!("The network is full ({max} agents registered); try again later"),
            );
            return self.refuse(session_id, &msg, error, Some(Disconnect::SERVER_FULL));
        }

        let metadata = serde_json::value::to_raw_value(&msg.registration.metadata)
            .expect("a JSON object always serializes");
        let replaced = self.agents.get(msg.registration.agent_id.as_str());
        let freed = replaced.map_or(0, |entry| entry.metadata.get().len());
        let held = self.metadata_bytes + self.claiming_bytes - freed + metadata.get().len();
        let budget = self.settings.limits.max_metadata_bytes_total;
        if held > budget {
            let error = ProtocolError::new(
                ErrorCode::ServerFull,
                format!(
                    "The network holds its most registration metadata ({budget} bytes, \
                     limits.max_metadata_bytes_total); register with less metadata or \
                     try again later"
                ),
            );
            return self.refuse(session_id, &msg, error, Some(Disconnect::SERVER_FULL));
        }

        let agent_id: Arc<str> = Arc::from(msg.registration.agent_id.as_str());
        let session = uuid::Uuid::new_v4();
        let Some(cluster) = self.cluster.clone() else {
            let incarnation = self.next_incarnation(&agent_id);
            return self.admit(msg, takeover, metadata, session, incarnation);
        };
        // Clustered: the id is claimed in Redis first (one round trip). Other
        // registrations go on meanwhile, those of this id are refused (`claiming`), and
        // what may change while the claim is in flight is checked when it is answered.
        let bytes = metadata.get().len();
        self.claiming.insert(agent_id.clone(), bytes);
        self.claiming_bytes += bytes;
        let lease_losses = self.lease_losses;
        let claim = Claim {
            agent_id: agent_id.clone(),
            session: session.to_string(),
            metadata: metadata.get().to_owned(),
        };
        let claimed = fut::wrap_future(cluster.send(claim));
        ctx.spawn(claimed.map(move |outcome, act: &mut Self, ctx| {
            act.claiming.remove(&agent_id);
            act.claiming_bytes -= bytes;
            let error = match answered(outcome) {
                Ok(ClaimOutcome::Granted { incarnation }) => {
                    let claimed = Claimed {
                        incarnation,
                        lease_losses,
                    };
                    return act.claimed(msg, takeover, metadata, session, claimed);
                }
                Ok(ClaimOutcome::HeldElsewhere { member }) => match act.remote_proof(&msg) {
                    Some(proof) => {
                        return act.take_over_remote(msg, member, proof, metadata, session, ctx)
                    }
                    None => ProtocolError::new(
                        ErrorCode::AgentIdInUse,
                        format!(
                            "Agent {} is connected to another node of the network ({member}); \
                             present its certificate (or force_reconnect, where allowed) to \
                             take it over",
                            msg.registration.agent_id
                        ),
                    ),
                },
                Err(error) => error,
            };
            act.refuse(session_id, &msg, error, None);
        }));
    }
}

impl Registry {
    /// Registers `msg`'s connection as its agent id, as `incarnation`, ending the
    /// holder's incarnation first on a `takeover`.
    pub(super) fn admit(
        &mut self,
        msg: RegisterAgent,
        takeover: Option<Takeover>,
        metadata: Box<serde_json::value::RawValue>,
        session: uuid::Uuid,
        incarnation: u64,
    ) {
        let session_id = msg.session_id;
        let agent_id: Arc<str> = Arc::from(msg.registration.agent_id.as_str());
        let Some(socket) = self.sockets.get(&session_id) else {
            // The socket closed while the claim was in flight: the claim is let go
            // (unless a local holder being taken over still has the id).
            if let (Some(cluster), false) = (&self.cluster, self.agents.contains_key(&agent_id)) {
                cluster.do_send(Release {
                    agent_id,
                    incarnation,
                });
            }
            return; // The socket closed while the claim was in flight.
        };
        let remote_addr = socket.remote_addr.clone();
        let session_uuid = session.to_string();
        if let Some(proof) = takeover {
            self.retaking = Some(agent_id.clone());
            self.replace(&agent_id, incarnation, &session_uuid, proof);
            self.retaking = None;
        }

        let response = self.welcome(&msg, &agent_id, &session_uuid, incarnation);
        let socket = self
            .sockets
            .get_mut(&session_id)
            .expect("socket checked above");
        socket.agent = Some(agent_id.clone());
        // The relay writes the response and hands `Registered` to the connection in
        // the same turn, so the connection handles it (its mailbox comes before its
        // socket) before any frame the agent sends after reading the response. The
        // routing table is locked from before the response is queued until the agent
        // is in it: every frame routed to the agent comes after the response, and a
        // frame the agent sends at once finds it registered (the relay may write the
        // response on another thread before this one gets to the table).
        let registered = ConnectionOrder::Registered(agent_id.clone());
        self.routes
            .enter_after(agent_id.clone(), session_id, socket.outbox.clone(), || {
                socket.answer_then(&response, registered)
            });
        let mut entry = AgentEntry {
            session_id,
            session_uuid: session,
            incarnation,
            seq: 0,
            metadata,
            remote_addr: remote_addr.clone(),
            connected_at: SystemTime::now(),
            connected_mono_ms: self.clock.now_ms(),
            clock: msg.clock,
            inactive: false,
        };
        // Any certificate presented was validated by `may_take`.
        let presented = msg.registration.certificate.as_ref();
        let hash = presented.and_then(|c| c.get("certificate_hash")?.as_str());
        self.certificates.registered(&agent_id, session_id, hash);
        self.heartbeat.do_send(Watch::Track {
            session_id,
            agent_id: agent_id.clone(),
            clock: entry.clock.clone(),
            outbox: socket.outbox.clone(),
        });
        let metadata = entry.metadata.clone();
        let payload = AgentEvent::Registered {
            session_id: &session_uuid,
            metadata: &metadata,
            remote_addr: &remote_addr,
            takeover: takeover.map(Takeover::as_str),
        };
        publish(&self.events, &self.source, &agent_id, &mut entry, payload);
        if let Some(presence) = &self.presence {
            if let Some(capabilities) =
                crate::instructions::instruction_capabilities(entry.metadata.get())
            {
                presence.do_send(Presence::Online {
                    agent_id: agent_id.clone(),
                    incarnation: entry.incarnation,
                    capabilities,
                });
            }
        }
        self.metadata_bytes += entry.metadata.get().len();
        self.agents.insert(agent_id, entry);
        self.stats.registered(self.agents.len());
    }
}

impl Handler<RegistrationRefused> for Registry {
    type Result = ();

    fn handle(&mut self, msg: RegistrationRefused, _ctx: &mut Self::Context) {
        self.registration_failed(msg.agent_id.as_deref(), msg.error_code);
    }
}

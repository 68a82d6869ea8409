//! Answering the system requests that need the table or the certificate authority.
//! (Messages between agents are routed by the connections, through [`Routes`](crate::routes::Routes).)

use super::{AgentEntry, Registry, SystemRequest};
use crate::clock::epoch_secs;
use crate::cluster::{answered, HeldBy, ListHeld};
use crate::identity::CertificateError;
use crate::liveness::SessionId;
use crate::protocol::command::{Claim, Command, Page, Request};
use crate::protocol::{self, ErrorCode, ProtocolError};
use actix::prelude::*;
use serde_json::{json, Value};
use std::sync::Arc;

impl Registry {
    /// The answer to a request the connection forwarded.
    fn answer(&mut self, session_id: SessionId, request: &Request) -> Value {
        let command = &request.command;
        let (name, request_id) = (command.name(), request.request_id.as_ref());
        let result = match command {
            Command::ClaimAgentId(claim) => claim
                .clone()
                .and_then(|claim| self.claim(session_id, claim)),
            Command::ValidateCertificate { certificate } => Ok(
                match self.certificates.validate(certificate, epoch_secs()) {
                    Ok(agent_id) => json!({"valid": true, "agent_id": agent_id}),
                    Err(error) => json!({
                        "valid": false,
                        "error": error.to_string(),
                        "error_code": ErrorCode::InvalidCertificate.as_str(),
                    }),
                },
            ),
            Command::GetNetworkInfo => Ok(json!({"network_info": {
                "name": self.settings.network.name,
                "network_id": self.settings.network.id,
                "node_id": &*self.source.node_id,
                "mode": "centralized",
                "mods": [],
                "agent_count": self.agents.len(),
            }})),
            Command::ListAgents(_) if self.agent_of(session_id).is_none() => {
                Err(ErrorCode::NotRegistered.into())
            }
            Command::ListAgents(page) => Ok(self.agents_page(page)),
            _ => Err(ErrorCode::UnknownCommand.into()),
        };
        match result {
            Ok(fields) => protocol::response_ok(name, request_id, fields),
            Err(error) => protocol::response_error(name, request_id, &error),
        }
    }

    /// One `list_agents` page: the agents after `page.cursor` in id order, at most
    /// `page.limit` of them, found in one pass (no sort of the whole table).
    fn agents_page(&self, page: &Page) -> Value {
        let after = page.cursor.as_deref();
        let mut page_entries: Vec<(&Arc<str>, &AgentEntry)> = self
            .agents
            .iter()
            .filter(|(id, _)| after.is_none_or(|after| &***id > after))
            .collect();
        let has_more = page_entries.len() > page.limit;
        if has_more {
            page_entries.select_nth_unstable_by_key(page.limit, |(id, _)| *id);
            page_entries.truncate(page.limit);
        }
        page_entries.sort_unstable_by_key(|(id, _)| *id);
        let agents: Vec<Value> = page_entries
            .iter()
            .map(|(id, entry)| {
                json!({"agent_id": &***id, "name": entry.name(id), "connected": true,
                       "metadata": entry.metadata})
            })
            .collect();
        let last = page_entries.last().map(|(id, _)| &***id);
        let next_cursor = if has_more { last } else { None };
        json!({"agents": agents, "has_more": has_more, "next_cursor": next_cursor})
    }

    /// `claim_agent_id`: a certificate for the id. An id held by a live agent is claimed
    /// only by that agent's own connection (a certificate is the proof that takes a
    /// live id over, so no other socket may obtain one); `force` replaces an
    /// outstanding certificate only where `identity.allow_force_reconnect` allows
    /// forcing. The holder's own claim is a renewal: its claim is its own, so it is
    /// replaced in place without `force` and not counted against
    /// `limits.max_claims_per_connection` (an agent connected for weeks renews at
    /// every half-life of its certificate).
    fn claim(&mut self, session_id: SessionId, claim: Claim) -> Result<Value, ProtocolError> {
        let Claim { agent_id, force } = claim;
        let holder = self.agents.get(agent_id.as_str()).map(|h| h.session_id);
        let renewal = holder == Some(session_id);
        if holder.is_some() && !renewal {
            return Err(ProtocolError::new(
                ErrorCode::AgentIdInUse,
                format!(
                    "Agent ID {agent_id} is held by a live connection; only that connection \
                     may claim it (to take the id back, register with the certificate \
                     claimed before)"
                ),
            ));
        }
        let max = self.settings.limits.max_claims_per_connection;
        let Some(socket) = self.sockets.get_mut(&session_id) else {
            return Err(ErrorCode::NotRegistered.into()); // Gone while the request was in flight.
        };
        if !renewal && socket.claims >= max {
            return Err(ProtocolError::new(
                ErrorCode::TooManyClaims,
                format!(
                    "This connection made its {max} claims (limits.max_claims_per_connection); \
                     open a new connection to claim more"
                ),
            ));
        }
        if !renewal {
            socket.claims += 1;
        }
        let force = renewal || (force && self.settings.identity.allow_force_reconnect);
        match self
            .certificates
            .claim(&agent_id, session_id, force, epoch_secs())
        {
            Ok(certificate) => Ok(json!({"agent_id": agent_id, "certificate": certificate})),
            Err(error @ CertificateError::TooManyClaims(_)) => Err(ProtocolError::new(
                ErrorCode::TooManyClaims,
                error.to_string(),
            )),
            Err(error) => Err(ProtocolError::new(
                ErrorCode::AlreadyClaimed,
                error.to_string(),
            )),
        }
    }
}

impl Registry {
    /// Answers `msg` with `result`, found after the request was handled, if its
    /// connection is still there.
    fn respond(&self, msg: &SystemRequest, result: Result<Value, ProtocolError>) {
        let Some(socket) = self.sockets.get(&msg.session_id) else {
            return;
        };
        let (name, request_id) = (msg.request.command.name(), msg.request.request_id.as_ref());
        let frame = match result {
            Ok(fields) => protocol::response_ok(name, request_id, fields),
            Err(error) => protocol::response_error(name, request_id, &error),
        };
        socket.outbox.push_json(&frame);
    }

    /// Answers `msg` on its connection, if it is still there to read it.
    fn answer_on_socket(&mut self, msg: &SystemRequest) {
        let outbox = match self.sockets.get(&msg.session_id) {
            Some(socket) if socket.orders.connected() => socket.outbox.clone(),
            _ => return, // Nobody to answer: do not build what nobody reads.
        };
        outbox.push_json(&self.answer(msg.session_id, &msg.request));
    }
}

impl Registry {
    /// `list_agents` of a clustered node: one page of the agents every live node
    /// holds, read from Redis off the registry (other requests are served meanwhile).
    fn list_cluster_wide(
        &mut self,
        cluster: Addr<crate::cluster::Cluster>,
        page: Page,
        msg: SystemRequest,
        ctx: &mut Context<Self>,
    ) {
        let list = ListHeld {
            after: page.cursor,
            limit: page.limit,
        };
        let listed = fut::wrap_future(cluster.send(list));
        ctx.spawn(listed.map(move |listed, act: &mut Self, _| {
            let page = answered(listed).map(|(held, has_more)| {
                let last = held.last().map(|h| h.agent_id.clone());
                let agents: Vec<Value> = held
                    .into_iter()
                    .map(|held| {
                        let metadata = held.parsed_metadata();
                        let name = held.name(&metadata);
                        json!({"agent_id": held.agent_id, "name": name, "connected": true,
                               "metadata": metadata, "node_id": held.node_id})
                    })
                    .collect();
                let next_cursor = if has_more { last } else { None };
                json!({"agents": agents, "has_more": has_more, "next_cursor": next_cursor})
            });
            act.respond(&msg, page);
        }));
    }
}

impl Handler<SystemRequest> for Registry {
    type Result = ();

    fn handle(&mut self, msg: SystemRequest, ctx: &mut Self::Context) {
        if let (Some(cluster), Command::ListAgents(page)) = (&self.cluster, &msg.request.command) {
            if self.agent_of(msg.session_id).is_some() {
                return self.list_cluster_wide(cluster.clone(), page.clone(), msg, ctx);
            }
        }
        let claimed = match &msg.request.command {
            Command::ClaimAgentId(Ok(claim)) => Some(Arc::<str>::from(claim.agent_id.as_str())),
            _ => None,
        };
        let (Some(cluster), Some(agent_id)) = (self.cluster.clone(), claimed) else {
            return self.answer_on_socket(&msg);
        };
        if self.agents.contains_key(&agent_id) {
            return self.answer_on_socket(&msg);
        }
        // Clustered: an id held live on another node is not claimed here either (a
        // certificate is what takes a live id over). One round trip, waited for.
        let asked = fut::wrap_future(cluster.send(HeldBy(agent_id.clone())));
        ctx.wait(asked.map(move |held, act: &mut Self, _| {
            let error = match answered(held) {
                Ok(None) => return act.answer_on_socket(&msg),
                Ok(Some(member)) => ProtocolError::new(
                    ErrorCode::AgentIdInUse,
                    format!(
                        "Agent ID {agent_id} is held by a live connection on node {member}; \
                         only that connection may claim it (to take the id back, register \
                         with the certificate claimed before)"
                    ),
                ),
                Err(error) => error,
            };
            act.respond(&msg, Err(error));
        }));
    }
}

//! Registrations that involve the other nodes of a cluster: admitting a registration
//! once its claim is granted, taking an id over from the node that holds it, and
//! handing an id held here over to another node (see `cluster::takeover`).

use super::registration::Takeover;
use super::{RegisterAgent, Registry};
use crate::cluster::{
    answered, Answer, Claim, ClaimOutcome, HandOver, Release, TakeOver, Transfer,
};
use crate::disconnect::Disconnect;
use crate::protocol::{ErrorCode, ProtocolError};
use actix::prelude::*;
use std::sync::Arc;

/// A claim the cluster granted: the incarnation, and the lease losses counted when it
/// was asked.
pub(super) struct Claimed {
    pub(super) incarnation: u64,
    pub(super) lease_losses: u64,
}

impl Registry {
    /// Admits `msg` once its claim was granted, unless what changed while the claim was
    /// in flight forbids it (shutdown began, or the lease was lost): then the claim is
    /// released and the registration refused.
    pub(super) fn claimed(
        &mut self,
        msg: RegisterAgent,
        takeover: Option<Takeover>,
        metadata: Box<serde_json::value::RawValue>,
        session: uuid::Uuid,
        claimed: Claimed,
    ) {
        let incarnation = claimed.incarnation;
        let (error, close) = if self.shutting_down {
            (ErrorCode::ShuttingDown.into(), Some(Disconnect::SHUTDOWN))
        } else if self.lease_losses != claimed.lease_losses {
            let error = "this node lost its cluster lease while the registration was \
                         claimed; retry (on any node)";
            (
                ProtocolError::new(ErrorCode::ClusterUnavailable, error),
                None,
            )
        } else {
            return self.admit(msg, takeover, metadata, session, incarnation);
        };
        if let Some(cluster) = &self.cluster {
            let agent_id = msg.registration.agent_id.as_str().into();
            cluster.do_send(Release {
                agent_id,
                incarnation,
            });
        }
        self.refuse(msg.session_id, &msg, error, close);
    }
}

impl Registry {
    /// Takes `msg`'s id over from `holder`, another node, which ends its incarnation
    /// first (see `cluster::takeover`). Other registrations are served meanwhile;
    /// those of the same id are refused until this one is answered.
    pub(super) fn take_over_remote(
        &mut self,
        msg: RegisterAgent,
        holder: String,
        proof: Takeover,
        metadata: Box<serde_json::value::RawValue>,
        session: uuid::Uuid,
        ctx: &mut Context<Self>,
    ) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let agent_id: Arc<str> = Arc::from(msg.registration.agent_id.as_str());
        self.taking_over.insert(agent_id.clone());
        // Messages for it wait here once the claim moved (see `Routes::expect`).
        self.routes.expect(agent_id.clone());
        let request = TakeOver {
            claim: Claim {
                agent_id: agent_id.clone(),
                session: session.to_string(),
                metadata: metadata.get().to_owned(),
            },
            holder,
            proof: proof.as_str(),
        };
        let taken = fut::wrap_future(cluster.send(request));
        ctx.spawn(taken.map(move |outcome, act: &mut Self, _| {
            act.taking_over.remove(&agent_id);
            let refusal = match answered(outcome) {
                Ok(ClaimOutcome::Granted { incarnation }) => {
                    // Writes what was parked for the agent behind its answer.
                    act.admit(msg, Some(proof), metadata, session, incarnation);
                    None
                }
                Ok(ClaimOutcome::HeldElsewhere { member }) => Some((
                    msg,
                    ProtocolError::new(
                        ErrorCode::AgentIdInUse,
                        format!(
                            "Agent {agent_id} was registered on node {member} meanwhile; retry"
                        ),
                    ),
                )),
                Err(error) => Some((msg, error)),
            };
            // Not entered (refused, or its socket closed meanwhile): what was parked
            // for it is dropped.
            let dropped = act.routes.abandon(&agent_id);
            if dropped > 0 {
                log::warn!(
                    "cluster: {dropped} messages for {agent_id} were dropped: its takeover failed"
                );
                crate::metrics::cluster_messages_dropped("takeover_failed", dropped);
            }
            if let Some((msg, error)) = refusal {
                act.refuse(msg.session_id, &msg, error, None);
            }
        }));
    }
}

impl Handler<HandOver> for Registry {
    type Result = ();

    /// Another node takes over an id held here: the claim moves to it in Redis, then
    /// this incarnation ends as in a local takeover, then the asker is answered (by
    /// the cluster actor, once this node's publishers acknowledged the end).
    fn handle(&mut self, msg: HandOver, ctx: &mut Self::Context) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let request = msg.0;
        let Some(entry) = self.agents.get(request.agent_id.as_str()) else {
            return cluster.do_send(Answer {
                request,
                incarnation: None,
            });
        };
        let transfer = Transfer {
            request: request.clone(),
            incarnation: entry.incarnation,
        };
        // Waited for (one round trip), so the entry stays as it is meanwhile.
        let moved = fut::wrap_future(cluster.send(transfer));
        ctx.wait(moved.map(move |moved, act: &mut Self, _| {
            let incarnation = match moved {
                Ok(Ok(incarnation)) => incarnation,
                Ok(Err(error)) => {
                    return log::warn!(
                        "cluster: {} could not be handed over: {error}",
                        request.agent_id
                    )
                }
                Err(_) => return,
            };
            if let Some(by_incarnation) = incarnation {
                let agent_id: Arc<str> = request.agent_id.as_str().into();
                let proof = Takeover::parse(&request.proof);
                act.replace(&agent_id, by_incarnation, &request.session, proof);
            }
            cluster.do_send(Answer {
                request,
                incarnation,
            });
        }));
    }
}

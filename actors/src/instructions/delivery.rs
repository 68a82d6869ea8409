//! Sending instructions to agents and hearing back: an agent's backlog in creation
//! order (one round at a time per agent), instructions given to a capability
//! (`least_loaded` or `round_robin`), deliveries taken back, acknowledgements.

use super::model::{Instruction, State, Strategy};
use super::{Dispatcher, StoreError};
use crate::clock::epoch_ms;
use crate::outbound::OutFrame;
use crate::protocol::{self, ErrorCode, ProtocolError};
use actix::prelude::*;
use std::sync::Arc;

/// Instructions read from the backlog at once.
const ROUND: i64 = 200;

/// Deliveries made by one task: each with whether its frame reached the agent's
/// connection on this node.
type Deliveries = Vec<(Instruction, bool)>;

impl Dispatcher {
    /// Sends `agent_id` its pending instructions in creation order, unless a round is
    /// already running for it (which then runs once more).
    pub(super) fn pump(&mut self, ctx: &mut Context<Self>, agent_id: Arc<str>) {
        let Some(online) = self.online.get_mut(&agent_id) else {
            return;
        };
        if online.busy {
            online.again = true;
            return;
        }
        online.busy = true;
        online.again = false;
        let incarnation = online.incarnation;
        let (store, emit, routes) = (self.store.clone(), self.emit.clone(), self.routes.clone());
        let agent = agent_id.clone();
        let round = async move {
            let mut delivered: Deliveries = Vec::new();
            loop {
                let now = epoch_ms() as i64;
                let batch = match store.deliver_backlog(&agent, now, ROUND).await {
                    Ok(batch) => batch,
                    Err(error) => return (delivered, Some(error)),
                };
                let full = batch.len() as i64 == ROUND;
                let mut reachable = true;
                for instruction in batch {
                    emit.instruction(&instruction);
                    // Once a frame does not reach the agent, the rest are taken back too.
                    reachable =
                        reachable && routes.deliver(&agent, OutFrame::text(&instruction.frame()));
                    delivered.push((instruction, reachable));
                }
                if !full || !reachable {
                    return (delivered, None);
                }
            }
        };
        ctx.spawn(fut::wrap_future(round).map(
            move |(delivered, error), dispatcher: &mut Self, ctx| {
                dispatcher.note_deliveries(ctx, &agent_id, incarnation, delivered);
                if let Some(error) = error {
                    log::warn!("instructions: delivering to {agent_id} failed: {error}");
                    dispatcher.rescan = true;
                }
                dispatcher.round_ended(ctx, agent_id, incarnation);
            },
        ));
    }

    /// A delivery to `agent_id`'s `incarnation` finished: another round runs if
    /// something was created for it meanwhile.
    pub(super) fn round_ended(
        &mut self,
        ctx: &mut Context<Self>,
        agent_id: Arc<str>,
        incarnation: u64,
    ) {
        if let Some(online) = self.online.get_mut(&agent_id) {
            if online.incarnation == incarnation {
                online.busy = false;
                if online.again {
                    self.pump(ctx, agent_id);
                }
            }
        }
    }

    /// Records deliveries made to `agent_id`'s `incarnation`: their deadlines, and
    /// their acknowledgement awaited; one whose frame did not reach that incarnation
    /// is taken back at once.
    pub(super) fn note_deliveries(
        &mut self,
        ctx: &mut Context<Self>,
        agent_id: &Arc<str>,
        incarnation: u64,
        delivered: Deliveries,
    ) {
        for (instruction, sent) in delivered {
            let attempt = instruction.attempt;
            let deadline = instruction.ack_deadline_ms.unwrap_or(i64::MAX);
            match self.online.get_mut(agent_id) {
                Some(online) if sent && online.incarnation == incarnation => {
                    online.unacked.insert(instruction.id.clone(), attempt);
                    self.deadlines.add(
                        deadline,
                        &instruction.id,
                        super::deadlines::Due::Ack(attempt),
                    );
                }
                _ => self.take_back(ctx, instruction.id, attempt, "connection_ended"),
            }
        }
    }

    /// The online agent an instruction for `capability` goes to, by `strategy`.
    fn choose(&mut self, capability: &str, strategy: Strategy) -> Option<Arc<str>> {
        let mut able: Vec<(&Arc<str>, usize)> = self
            .online
            .iter()
            .filter(|(_, online)| online.capabilities.iter().any(|c| c == capability))
            .map(|(id, online)| (id, online.load()))
            .collect();
        if able.is_empty() {
            return None;
        }
        able.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let turn = self.turns.entry(capability.to_owned()).or_default();
        *turn = turn.wrapping_add(1);
        let chosen = match strategy {
            Strategy::RoundRobin => able[*turn % able.len()].0,
            Strategy::LeastLoaded => {
                let least = able.iter().map(|(_, load)| *load).min().expect("not empty");
                let tied: Vec<_> = able.iter().filter(|(_, load)| *load == least).collect();
                tied[*turn % tied.len()].0
            }
        };
        Some(chosen.clone())
    }

    /// Gives pending `instruction` (asking for a capability) to an online agent with
    /// that capability; it waits when there is none.
    pub(super) fn assign(&mut self, ctx: &mut Context<Self>, instruction: Instruction) {
        let Some(capability) = instruction.capability.clone() else {
            return;
        };
        let strategy = instruction.strategy.unwrap_or(Strategy::LeastLoaded);
        let Some(agent_id) = self.choose(&capability, strategy) else {
            // No agent here has it: perhaps one on another node.
            return self.announce(ctx, super::Notice::Capability(capability));
        };
        let online = self
            .online
            .get_mut(&agent_id)
            .expect("chosen among the online");
        online.assigning += 1;
        let incarnation = online.incarnation;
        let (store, emit, routes) = (self.store.clone(), self.emit.clone(), self.routes.clone());
        let agent = agent_id.clone();
        let deliver = async move {
            let delivered = store
                .deliver(&instruction.id, &agent, epoch_ms() as i64)
                .await?;
            Ok::<_, StoreError>(delivered.map(|instruction| {
                emit.instruction(&instruction);
                let sent = routes.deliver(&agent, OutFrame::text(&instruction.frame()));
                vec![(instruction, sent)]
            }))
        };
        ctx.spawn(
            fut::wrap_future(deliver).map(move |result, dispatcher: &mut Self, ctx| {
                if let Some(online) = dispatcher.online.get_mut(&agent_id) {
                    if online.incarnation == incarnation {
                        online.assigning -= 1;
                    }
                }
                match result {
                    Ok(Some(delivered)) => {
                        dispatcher.note_deliveries(ctx, &agent_id, incarnation, delivered)
                    }
                    Ok(None) => {}
                    Err(error) => {
                        log::warn!("instructions: assigning to {agent_id} failed: {error}");
                        dispatcher.rescan = true;
                    }
                }
            }),
        );
    }

    /// Gives out the pending instructions that ask for `capability`.
    pub(super) fn assign_waiting(&mut self, ctx: &mut Context<Self>, capability: String) {
        if capability == "instructions" {
            return;
        }
        let store = self.store.clone();
        let waiting = async move {
            store
                .waiting_for(&capability, epoch_ms() as i64, 1000)
                .await
        };
        ctx.spawn(fut::wrap_future(waiting).map(
            |result, dispatcher: &mut Self, ctx| match result {
                Ok(waiting) => {
                    for instruction in waiting {
                        dispatcher.assign(ctx, instruction);
                    }
                }
                Err(error) => {
                    log::warn!("instructions: reading waiting instructions failed: {error}");
                    dispatcher.rescan = true;
                }
            },
        ));
    }

    /// Takes delivery `attempt` of `id` back: pending again and sent on (to its agent
    /// when it comes back, or to another agent with its capability), or `failed` when
    /// that was its last attempt.
    pub(super) fn take_back(
        &mut self,
        ctx: &mut Context<Self>,
        id: String,
        attempt: i64,
        reason: &'static str,
    ) {
        let (store, emit) = (self.store.clone(), self.emit.clone());
        let take_back = async move {
            let taken = store
                .take_back(&id, attempt, reason, epoch_ms() as i64)
                .await?;
            if let Some(instruction) = taken.as_ref().filter(|i| i.state == State::Failed) {
                emit.instruction(instruction);
            }
            Ok::<_, StoreError>(taken)
        };
        ctx.spawn(fut::wrap_future(take_back).map(
            |result, dispatcher: &mut Self, ctx| match result {
                Ok(Some(instruction)) => {
                    if let Some(online) = instruction
                        .agent_id
                        .as_deref()
                        .and_then(|agent| dispatcher.online.get_mut(agent))
                    {
                        online.unacked.remove(&instruction.id);
                    }
                    if instruction.state == State::Failed {
                        dispatcher.deadlines.forget(&instruction.id);
                    } else {
                        dispatcher.send_on(ctx, instruction);
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    log::warn!("instructions: taking a delivery back failed: {error}");
                    dispatcher.rescan = true;
                }
            },
        ));
    }

    /// Sends a pending instruction to whoever should get it now, if anyone is online.
    pub(super) fn send_on(&mut self, ctx: &mut Context<Self>, instruction: Instruction) {
        if instruction.capability.is_some() {
            self.assign(ctx, instruction);
        } else if let Some(agent_id) = instruction.agent_id {
            match self.online.get_key_value(agent_id.as_str()) {
                Some((agent_id, _)) => {
                    let agent_id = agent_id.clone();
                    self.pump(ctx, agent_id);
                }
                // Perhaps online on another node.
                None => self.announce(ctx, super::Notice::Agent(agent_id)),
            }
        }
    }

    /// Forgets what was kept in memory for a finished instruction.
    pub(super) fn forget_delivery(&mut self, instruction: &Instruction) {
        self.deadlines.forget(&instruction.id);
        if let Some(online) = instruction
            .agent_id
            .as_deref()
            .and_then(|agent| self.online.get_mut(agent))
        {
            online.unacked.remove(&instruction.id);
        }
    }
}

impl Dispatcher {
    /// Answers `agent_id`'s acknowledgement of `instruction_id` with the error `code`.
    pub(super) fn refuse_ack(&self, agent_id: &str, code: ErrorCode, instruction_id: String) {
        crate::metrics::frame_rejected(code.as_str());
        let mut frame = protocol::error_frame(&ProtocolError::from(code), None);
        frame["instruction_id"] = serde_json::Value::String(instruction_id);
        self.routes.deliver(agent_id, OutFrame::json(&frame));
    }
}

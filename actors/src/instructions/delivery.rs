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

/// A change that failed on a storage error is tried again this much later (ms).
pub(super) const RETRY_MS: i64 = 1000;

/// Instructions read from the backlog at once.
const ROUND: i64 = 200;

impl Dispatcher {
    /// Sends `agent_id` its pending instructions in creation order, unless a round is
    /// already running for it (which then runs once more).
    pub(super) fn pump(&mut self, ctx: &mut Context<Self>, agent_id: Arc<str>) {
        let Some(online) = self.online.get_mut(&agent_id) else {
            return;
        };
        if online.unreachable {
            return;
        }
        if online.busy {
            online.again = true;
            return;
        }
        online.busy = true;
        online.again = false;
        let incarnation = online.incarnation;
        let (store, emit) = (self.store.clone(), self.emit.clone());
        let agent = agent_id.clone();
        // One batch per round; a full batch runs another round after it is sent.
        let round = async move {
            let batch = store
                .deliver_backlog(&agent, epoch_ms() as i64, ROUND)
                .await?;
            for instruction in &batch {
                emit.instruction(instruction);
            }
            Ok::<_, StoreError>(batch)
        };
        ctx.spawn(
            fut::wrap_future(round).map(move |result, dispatcher: &mut Self, ctx| {
                match result {
                    Ok(batch) => {
                        let full = batch.len() as i64 == ROUND;
                        dispatcher.note_deliveries(ctx, &agent_id, incarnation, batch);
                        if full {
                            if let Some(online) = dispatcher.online.get_mut(&agent_id) {
                                online.again = true;
                            }
                        }
                    }
                    Err(error) => {
                        log::warn!("instructions: delivering to {agent_id} failed: {error}");
                        dispatcher.rescan = true;
                    }
                }
                dispatcher.round_ended(ctx, agent_id, incarnation);
            }),
        );
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

    /// Sends deliveries stored for `agent_id`'s `incarnation`, in order, once their
    /// acknowledgements are awaited (so an acknowledgement can never come before the
    /// dispatcher knows of its delivery); one that cannot reach that incarnation is
    /// taken back at once, and so is every later one.
    pub(super) fn note_deliveries(
        &mut self,
        ctx: &mut Context<Self>,
        agent_id: &Arc<str>,
        incarnation: u64,
        delivered: Vec<Instruction>,
    ) {
        let mut reachable = true;
        for instruction in delivered {
            let attempt = instruction.attempt;
            let deadline = instruction.ack_deadline_ms.unwrap_or(i64::MAX);
            match self.online.get_mut(agent_id) {
                Some(online) if reachable && online.incarnation == incarnation => {
                    online.unacked.insert(instruction.id.clone(), attempt);
                    self.deadlines.add(
                        deadline,
                        &instruction.id,
                        super::deadlines::Due::Ack(attempt),
                    );
                    reachable = self
                        .routes
                        .deliver(agent_id, OutFrame::text(&instruction.frame()));
                    if !reachable {
                        // Its connection is gone; the registry's word follows. Until
                        // then nothing more is sent to it.
                        if let Some(online) = self.online.get_mut(agent_id) {
                            online.unacked.remove(&instruction.id);
                            online.unreachable = true;
                        }
                        self.take_back(ctx, instruction.id, attempt, "connection_ended");
                    }
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
            .filter(|(_, online)| {
                !online.unreachable && online.capabilities.iter().any(|c| c == capability)
            })
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
        let (store, emit) = (self.store.clone(), self.emit.clone());
        let agent = agent_id.clone();
        let deliver = async move {
            let delivered = store
                .deliver(&instruction.id, &agent, epoch_ms() as i64)
                .await?;
            if let Some(instruction) = &delivered {
                emit.instruction(instruction);
            }
            Ok::<_, StoreError>(delivered)
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
                        dispatcher.note_deliveries(ctx, &agent_id, incarnation, vec![delivered])
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

    /// Gives out the pending instructions that ask for `capability`, a page at a time.
    pub(super) fn assign_waiting(&mut self, ctx: &mut Context<Self>, capability: String) {
        self.assign_waiting_after(ctx, capability, 0);
    }

    fn assign_waiting_after(&mut self, ctx: &mut Context<Self>, capability: String, after: i64) {
        const PAGE: i64 = 1000;
        let store = self.store.clone();
        let name = capability.clone();
        let waiting = async move {
            store
                .waiting_for(&name, epoch_ms() as i64, after, PAGE)
                .await
        };
        ctx.spawn(
            fut::wrap_future(waiting).map(move |result, dispatcher: &mut Self, ctx| match result {
                Ok(waiting) => {
                    let next = waiting.last().map(|last| last.seq);
                    let full = waiting.len() as i64 == PAGE;
                    for instruction in waiting {
                        dispatcher.assign(ctx, instruction);
                    }
                    if let (true, Some(after)) = (full, next) {
                        dispatcher.assign_waiting_after(ctx, capability, after);
                    }
                }
                Err(error) => {
                    log::warn!("instructions: reading waiting instructions failed: {error}");
                    dispatcher.rescan = true;
                }
            }),
        );
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
        let retry_id = id.clone();
        let take_back = async move {
            let taken = store
                .take_back(&id, attempt, reason, epoch_ms() as i64)
                .await?;
            if let Some(instruction) = taken.as_ref().filter(|i| i.state == State::Failed) {
                emit.instruction(instruction);
            }
            Ok::<_, StoreError>(taken)
        };
        ctx.spawn(
            fut::wrap_future(take_back).map(
                move |result, dispatcher: &mut Self, ctx| match result {
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
                        log::warn!(
                            "instructions: taking a delivery back failed (retried in 1 s): {error}"
                        );
                        let retry = epoch_ms() as i64 + RETRY_MS;
                        dispatcher.deadlines.add(
                            retry,
                            &retry_id,
                            super::deadlines::Due::Retake(attempt, reason),
                        );
                    }
                },
            ),
        );
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

//! Agents' acknowledgements: checked against what the dispatcher knows first (an agent
//! that takes no instructions, or names more than [`MOST_WRONG_ACKS`] a second that
//! it does not hold, is answered without the database), then stored in batches: while one batch is being committed
//! the next gathers, so under load many acknowledgements share one transaction.

use super::model::{Instruction, State};
use super::store::FinishedBy;
use super::{Acknowledge, Dispatcher, MOST_WRONG_ACKS};
use crate::clock::epoch_ms;
use crate::protocol::{AckStatus, ErrorCode};
use actix::prelude::*;
use std::sync::Arc;

/// Most acknowledgements committed in one transaction.
const MOST_PER_BATCH: usize = 256;

/// What became of a batch: the instructions finished, and the acknowledgements
/// refused with why.
type Settled = (Vec<Instruction>, Vec<(Arc<str>, String, ErrorCode)>);

impl Handler<Acknowledge> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Acknowledge, ctx: &mut Self::Context) {
        let Acknowledge { agent_id, ack } = msg;
        let refusal = match self.online.get_mut(&agent_id) {
            None => Some(ErrorCode::UnknownInstruction),
            Some(online) if !online.unacked.contains_key(&ack.instruction_id) => {
                let now = epoch_ms() as i64;
                if now - online.wrong_acks_since >= 1000 {
                    online.wrong_acks_since = now;
                    online.wrong_acks = 0;
                }
                // Counted before the database answers, so a flood cannot outrun it.
                online.wrong_acks += 1;
                (online.wrong_acks > MOST_WRONG_ACKS).then_some(ErrorCode::RateLimited)
            }
            Some(_) => None,
        };
        if let Some(code) = refusal {
            return self.refuse_ack(&agent_id, code, ack.instruction_id);
        }
        let state = match ack.status {
            AckStatus::Done => State::Done,
            AckStatus::Failed => State::Failed,
            AckStatus::Rejected => State::Rejected,
        };
        self.acks.push(FinishedBy {
            agent_id,
            instruction_id: ack.instruction_id,
            state,
            result: ack.result,
        });
        self.store_acks(ctx);
    }
}

impl Dispatcher {
    /// Commits the acknowledgements gathered, unless a batch is being committed (the
    /// next one starts when it is).
    fn store_acks(&mut self, ctx: &mut Context<Self>) {
        if self.storing_acks || self.acks.is_empty() {
            return;
        }
        self.storing_acks = true;
        let rest = self.acks.split_off(self.acks.len().min(MOST_PER_BATCH));
        let batch = std::mem::replace(&mut self.acks, rest);
        let (store, emit) = (self.store.clone(), self.emit.clone());
        let settle = async move {
            let now = epoch_ms() as i64;
            let mut settled: Settled = (Vec::new(), Vec::new());
            let outcomes = match store.finish_acks(&batch, now).await {
                Ok(outcomes) => outcomes,
                Err(error) => {
                    log::warn!(
                        "instructions: storing {} acknowledgements failed: {error}",
                        batch.len()
                    );
                    for ack in batch {
                        settled.1.push((
                            ack.agent_id,
                            ack.instruction_id,
                            ErrorCode::StorageUnavailable,
                        ));
                    }
                    return settled;
                }
            };
            for (ack, outcome) in batch.into_iter().zip(outcomes) {
                match outcome {
                    Some(instruction) => {
                        emit.instruction(&instruction);
                        if let Some(session) = &instruction.session_id {
                            let _ = store.touch_session(session, now).await;
                        }
                        settled.0.push(instruction);
                    }
                    None => {
                        let code = match store.get(&ack.instruction_id).await {
                            Ok(None) => ErrorCode::UnknownInstruction,
                            Ok(Some(found)) if found.state.is_final() => {
                                ErrorCode::InstructionFinished
                            }
                            Ok(Some(_)) => ErrorCode::NotYourInstruction,
                            Err(_) => ErrorCode::StorageUnavailable,
                        };
                        settled.1.push((ack.agent_id, ack.instruction_id, code));
                    }
                }
            }
            settled
        };
        ctx.spawn(fut::wrap_future(settle).map(
            |(finished, refused): Settled, dispatcher: &mut Self, ctx| {
                for instruction in &finished {
                    dispatcher.forget_delivery(instruction);
                }
                for (agent_id, instruction_id, code) in refused {
                    dispatcher.refuse_ack(&agent_id, code, instruction_id);
                }
                dispatcher.storing_acks = false;
                dispatcher.store_acks(ctx);
            },
        ));
    }
}

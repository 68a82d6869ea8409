//! Creating instructions (`POST /agents/{id}/instructions`, `POST /instructions`):
//! stored in batches (one transaction for what arrived while the previous batch was
//! committed), in arrival order, which is their creation order. An instruction for an
//! online agent with no delivery round running (so nothing older is pending for it)
//! is stored already delivered and sent at once; a round started meanwhile waits for
//! it, so the agent's order holds.

use super::model::{Instruction, SessionState, State};
use super::requests::check_session;
use super::store::ToStore;
use super::{deadlines::Due, CreateInstruction, Dispatcher, NewInstruction, Refused};
use crate::clock::epoch_ms;
use actix::prelude::*;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Most instructions stored in one transaction.
const MOST_PER_BATCH: usize = 256;

/// A creation waiting for its batch.
pub(super) struct QueuedCreate {
    new: NewInstruction,
    /// The online agent (and its incarnation) it is delivered to at once, if any.
    direct: Option<(Arc<str>, u64)>,
    reply: oneshot::Sender<Result<Instruction, Refused>>,
}

impl Handler<CreateInstruction> for Dispatcher {
    type Result = ResponseFuture<Result<Instruction, Refused>>;

    fn handle(&mut self, msg: CreateInstruction, ctx: &mut Self::Context) -> Self::Result {
        let new = msg.0;
        let direct = new
            .agent_id
            .as_deref()
            .and_then(|agent| self.online.get_key_value(agent))
            .filter(|(_, online)| !online.busy && !online.unreachable)
            .map(|(agent, online)| (agent.clone(), online.incarnation));
        if let Some((agent, _)) = &direct {
            self.online.get_mut(agent).expect("online").busy = true;
        }
        let (reply, answer) = oneshot::channel();
        self.creates.push(QueuedCreate { new, direct, reply });
        self.store_creates(ctx);
        Box::pin(async move {
            answer
                .await
                .unwrap_or_else(|_| Err(Refused::Unavailable("the dispatcher stopped".into())))
        })
    }
}

/// Stores `items` (each with the agent it goes to at once, if any); the outcome of
/// each, in order. Events are published once the batch is committed.
async fn store_batch(
    store: super::Store,
    emit: super::Emitter,
    items: Vec<(NewInstruction, Option<Arc<str>>)>,
) -> Vec<Result<Instruction, Refused>> {
    let now = epoch_ms() as i64;
    let mut outcomes: Vec<Option<Result<Instruction, Refused>>> = Vec::new();
    outcomes.resize_with(items.len(), || None);
    let mut storing = Vec::new();
    for (i, (new, _)) in items.iter().enumerate() {
        match check_session(&store, new).await {
            Ok(()) => storing.push(i),
            Err(refusal) => outcomes[i] = Some(Err(refusal)),
        }
    }
    let ids: Vec<String> = storing
        .iter()
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let to_store: Vec<ToStore> = storing
        .iter()
        .zip(&ids)
        .map(|(&i, id)| ToStore {
            new: &items[i].0,
            id,
            to: items[i].1.as_deref(),
        })
        .collect();
    match store.insert_many(&to_store, now).await {
        Ok(stored) => {
            for (&i, instruction) in storing.iter().zip(stored) {
                if instruction.state == State::Delivered {
                    emit.instruction(&instruction.as_created());
                }
                emit.instruction(&instruction);
                outcomes[i] = Some(Ok(instruction));
            }
        }
        Err(error) => {
            for &i in &storing {
                outcomes[i] = Some(Err(Refused::from(error.clone())));
            }
        }
    }
    for (outcome, (new, _)) in outcomes.iter_mut().zip(&items) {
        let (Some(Ok(created)), Some(session)) = (outcome.as_ref(), &new.session_id) else {
            continue;
        };
        // Stored: a failure from here on must not answer 503 (a retry would create it
        // twice).
        if let Err(error) = store.touch_session(session, now).await {
            log::warn!("instructions: recording activity in session {session} failed: {error}");
        }
        // Closed after the check above: cancelled like the rest of its instructions.
        if let Ok(Some(found)) = store.session(session).await {
            if found.state == SessionState::Closed {
                if let Ok(Some(cancelled)) = store
                    .finish(&created.id, State::Cancelled, "session_closed", now)
                    .await
                {
                    emit.instruction(&cancelled);
                    *outcome = Some(Ok(cancelled));
                }
            }
        }
    }
    outcomes
        .into_iter()
        .map(|outcome| outcome.expect("every creation is settled"))
        .collect()
}

impl Dispatcher {
    /// Stores the creations gathered, unless a batch is being stored (the next one
    /// starts when it is).
    fn store_creates(&mut self, ctx: &mut Context<Self>) {
        if self.storing_creates || self.creates.is_empty() {
            return;
        }
        self.storing_creates = true;
        let rest = self
            .creates
            .split_off(self.creates.len().min(MOST_PER_BATCH));
        let batch = std::mem::replace(&mut self.creates, rest);
        let mut items = Vec::with_capacity(batch.len());
        let mut waiting = Vec::with_capacity(batch.len());
        for QueuedCreate { new, direct, reply } in batch {
            items.push((new, direct.as_ref().map(|(agent, _)| agent.clone())));
            waiting.push((direct, reply));
        }
        let stored = store_batch(self.store.clone(), self.emit.clone(), items);
        ctx.spawn(fut::wrap_future(stored).map(
            move |outcomes: Vec<Result<Instruction, Refused>>, dispatcher: &mut Self, ctx| {
                for ((direct, reply), outcome) in waiting.into_iter().zip(outcomes) {
                    let answer = dispatcher.created(ctx, direct.as_ref(), outcome);
                    if let Some((agent, incarnation)) = direct {
                        dispatcher.round_ended(ctx, agent, incarnation);
                    }
                    let _ = reply.send(answer);
                }
                dispatcher.storing_creates = false;
                dispatcher.store_creates(ctx);
            },
        ));
    }

    /// Follows a stored creation up (its expiry; sent at once, or sent on); the answer
    /// shows it as it was created.
    fn created(
        &mut self,
        ctx: &mut Context<Self>,
        direct: Option<&(Arc<str>, u64)>,
        outcome: Result<Instruction, Refused>,
    ) -> Result<Instruction, Refused> {
        let instruction = outcome?;
        // Its session closed while it was created: cancelled already.
        if instruction.state.is_final() {
            return Ok(instruction);
        }
        self.deadlines
            .add(instruction.expires_at_ms, &instruction.id, Due::Expiry);
        let answer = instruction.as_created();
        match direct {
            Some((agent, incarnation)) => {
                self.note_deliveries(ctx, agent, *incarnation, vec![instruction])
            }
            None => self.send_on(ctx, instruction),
        }
        Ok(answer)
    }
}

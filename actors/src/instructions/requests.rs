//! What the admin API asks of the dispatcher: create and cancel instructions, open
//! and close sessions. Reads go to the [`Store`](super::Store) directly.

use super::model::{Instruction, Session, SessionState, State};
use super::{Dispatcher, NewInstruction, NewSession, StoreError};
use crate::clock::epoch_ms;
use actix::prelude::*;

/// Why a request was refused (the admin API's status code follows the variant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// 404: nothing has this id.
    NotFound(String),
    /// 409: it exists but is in a state that does not allow this.
    Conflict(String),
    /// 503: the storage cannot be reached.
    Unavailable(String),
}

impl From<StoreError> for Refused {
    fn from(error: StoreError) -> Self {
        Self::Unavailable(error.0)
    }
}

/// Creates an instruction (`POST /agents/{id}/instructions`, `POST /instructions`).
#[derive(Message, Debug)]
#[rtype(result = "Result<Instruction, Refused>")]
pub struct CreateInstruction(pub NewInstruction);

/// Cancels an unfinished instruction (`DELETE /instructions/{id}`).
#[derive(Message, Debug)]
#[rtype(result = "Result<Instruction, Refused>")]
pub struct CancelInstruction(pub String);

/// Opens a session (`POST /sessions`).
#[derive(Message, Debug)]
#[rtype(result = "Result<Session, Refused>")]
pub struct OpenSession(pub NewSession);

/// Closes an open session and cancels its unfinished instructions
/// (`POST /sessions/{id}/close`).
#[derive(Message, Debug)]
#[rtype(result = "Result<Session, Refused>")]
pub struct CloseSession(pub String);

/// Checks that `session_id` is open and, when the instruction names its agent, that
/// it is the session's agent.
pub(super) async fn check_session(
    store: &super::Store,
    new: &NewInstruction,
) -> Result<(), Refused> {
    let Some(session_id) = &new.session_id else {
        return Ok(());
    };
    let session = store
        .session(session_id)
        .await?
        .ok_or_else(|| Refused::NotFound(format!("no session has the id {session_id:?}")))?;
    if session.state != SessionState::Open {
        return Err(Refused::Conflict(format!(
            "session {session_id} is closed: open a new one"
        )));
    }
    if let Some(agent_id) = &new.agent_id {
        if *agent_id != session.agent_id {
            return Err(Refused::Conflict(format!(
                "session {session_id} is with agent {}, not {agent_id}",
                session.agent_id
            )));
        }
    }
    Ok(())
}

impl Handler<CancelInstruction> for Dispatcher {
    type Result = ResponseActFuture<Self, Result<Instruction, Refused>>;

    fn handle(&mut self, msg: CancelInstruction, _ctx: &mut Self::Context) -> Self::Result {
        let (store, emit) = (self.store.clone(), self.emit.clone());
        let id = msg.0;
        let cancel = async move {
            let now = epoch_ms() as i64;
            match store
                .finish(&id, State::Cancelled, "cancelled", now)
                .await?
            {
                Some(instruction) => {
                    emit.instruction(&instruction);
                    Ok(instruction)
                }
                None => Err(match store.get(&id).await? {
                    None => Refused::NotFound(format!("no instruction has the id {id:?}")),
                    Some(found) => Refused::Conflict(format!(
                        "instruction {id} already finished ({})",
                        found.state.as_str()
                    )),
                }),
            }
        };
        Box::pin(fut::wrap_future(cancel).map(
            |result: Result<Instruction, Refused>, dispatcher: &mut Self, _| {
                if let Ok(instruction) = &result {
                    dispatcher.forget_delivery(instruction);
                }
                result
            },
        ))
    }
}

impl Handler<OpenSession> for Dispatcher {
    type Result = ResponseFuture<Result<Session, Refused>>;

    fn handle(&mut self, msg: OpenSession, _ctx: &mut Self::Context) -> Self::Result {
        let (store, emit) = (self.store.clone(), self.emit.clone());
        Box::pin(async move {
            let id = uuid::Uuid::new_v4().to_string();
            let session = store.open_session(&msg.0, &id, epoch_ms() as i64).await?;
            emit.session(&session);
            Ok(session)
        })
    }
}

impl Handler<CloseSession> for Dispatcher {
    type Result = ResponseActFuture<Self, Result<Session, Refused>>;

    fn handle(&mut self, msg: CloseSession, ctx: &mut Self::Context) -> Self::Result {
        let (reply, closed) = tokio::sync::oneshot::channel();
        self.close_session(ctx, msg.0, "closed", Some(reply));
        Box::pin(fut::wrap_future(async move {
            closed
                .await
                .unwrap_or_else(|_| Err(Refused::Unavailable("the dispatcher stopped".into())))
        }))
    }
}

impl Dispatcher {
    /// Closes session `id` for `reason` and cancels its unfinished instructions;
    /// answers `reply` (if given) with the closed session.
    pub(super) fn close_session(
        &mut self,
        ctx: &mut Context<Self>,
        id: String,
        reason: &'static str,
        reply: Option<tokio::sync::oneshot::Sender<Result<Session, Refused>>>,
    ) {
        let (store, emit) = (self.store.clone(), self.emit.clone());
        let close = async move {
            let now = epoch_ms() as i64;
            let Some((session, cancelled)) = store.close_session(&id, reason, now).await? else {
                return Err(match store.session(&id).await? {
                    None => Refused::NotFound(format!("no session has the id {id:?}")),
                    Some(_) => Refused::Conflict(format!("session {id} is already closed")),
                });
            };
            emit.session(&session);
            for instruction in &cancelled {
                emit.instruction(instruction);
            }
            Ok((session, cancelled))
        };
        ctx.spawn(fut::wrap_future(close).map(
            move |result: Result<(Session, Vec<Instruction>), Refused>,
                  dispatcher: &mut Self,
                  _| {
                let answer = result.map(|(session, cancelled)| {
                    for instruction in &cancelled {
                        dispatcher.forget_delivery(instruction);
                    }
                    session
                });
                if let Err(Refused::Unavailable(error)) = &answer {
                    log::warn!("instructions: closing a session failed: {error}");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(answer);
                }
            },
        ));
    }
}

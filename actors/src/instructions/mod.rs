//! The dispatcher actor: durable work for agents (issue 13, PROTOCOL.md §11).
//!
//! Instructions and sessions live in the [`Store`] (SQLite or PostgreSQL); this actor
//! moves them through their states and sends them to the agents that take
//! instructions (those that registered with `"instructions"` in
//! `metadata.capabilities`), which the registry reports as [`Presence`]. It sends an
//! agent's instructions through the routing table, in creation order, one delivery
//! round at a time per agent ([`delivery`]); it takes a delivery back when its agent's
//! connection ends or its acknowledgement is late, and expires what outlives its
//! `ttl` ([`deadlines`]); it creates and cancels instructions and opens and closes
//! sessions for the admin API ([`requests`]).
//!
//! Every change is made by the database first (a conditional update: of two changes
//! racing for one instruction, one wins) and its CloudEvent is published right after
//! the commit, from the same task, so events of one instruction leave in the order of
//! their `seq`. What this actor keeps in memory (who is online, deadlines, loads) is a
//! cache of the store: at start it is rebuilt from the unfinished instructions.

mod acks;
mod creates;
mod deadlines;
mod delivery;
pub mod model;
mod notices;
mod requests;
pub mod store;

pub use notices::{Notice, Notices};
pub use requests::{CancelInstruction, CloseSession, CreateInstruction, OpenSession, Refused};
pub use store::{NewInstruction, NewSession, Store, StoreError};

use crate::bus::Publish;
use crate::clock::epoch_ms;
use crate::event::{EventKind, EventSource, LifecycleEvent};
use crate::protocol::InstructionAck;
use crate::routes::Routes;
use crate::settings::{secs, InstructionsSettings, SessionsSettings};
use actix::prelude::*;
use deadlines::Deadlines;
use model::{Instruction, Session, State};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;

/// An agent that takes instructions came or went (from the registry).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum Presence {
    /// Registered with `"instructions"` among its capabilities.
    Online {
        /// Its id.
        agent_id: Arc<str>,
        /// Its incarnation.
        incarnation: u64,
        /// Every capability it listed.
        capabilities: Vec<String>,
    },
    /// That incarnation ended.
    Offline {
        /// Its id.
        agent_id: Arc<str>,
        /// The incarnation that ended.
        incarnation: u64,
    },
}

/// An agent's `instruction_ack` (from its connection).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Acknowledge {
    /// The agent that sent it.
    pub agent_id: Arc<str>,
    /// What it said.
    pub ack: InstructionAck,
}

/// Publishes instruction and session events.
#[derive(Clone)]
pub(crate) struct Emitter {
    events: Recipient<Publish>,
    source: EventSource,
}

impl Emitter {
    /// The event of `instruction` reaching its current state (`created` when pending
    /// for the first time).
    pub(crate) fn instruction(&self, instruction: &Instruction) {
        let kind = match instruction.state {
            State::Pending => EventKind::InstructionCreated,
            State::Delivered => EventKind::InstructionDelivered,
            State::Done => EventKind::InstructionDone,
            State::Failed => EventKind::InstructionFailed,
            State::Rejected => EventKind::InstructionRejected,
            State::Expired => EventKind::InstructionExpired,
            State::Cancelled => EventKind::InstructionCancelled,
        };
        let data = json!({
            "instruction_id": instruction.id,
            "agent_id": instruction.agent_id,
            "capability": instruction.capability,
            "session_id": instruction.session_id,
            "state": instruction.state.as_str(),
            "attempt": instruction.attempt,
            "max_attempts": instruction.max_attempts,
            "expires_at": model::rfc3339(instruction.expires_at_ms),
            "reason": instruction.reason,
            "result": instruction.result.as_deref().and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok()),
        });
        self.publish(kind, &instruction.id, instruction.version, &data);
        crate::metrics::instruction_event(instruction.state.as_str());
    }

    /// `session.opened` or `session.closed`.
    pub(crate) fn session(&self, session: &Session) {
        let kind = match session.state {
            model::SessionState::Open => EventKind::SessionOpened,
            model::SessionState::Closed => EventKind::SessionClosed,
        };
        let data = json!({
            "session_id": session.id,
            "agent_id": session.agent_id,
            "name": session.name,
            "state": session.state.as_str(),
            "close_reason": session.close_reason,
        });
        self.publish(kind, &session.id, session.version, &data);
    }

    fn publish(&self, kind: EventKind, key: &str, version: i64, data: &serde_json::Value) {
        let event = LifecycleEvent::work(&self.source, kind, key.into(), version as u64, data);
        self.events.do_send(Publish(Arc::new(event)));
    }
}

/// An online agent that takes instructions.
#[derive(Debug)]
struct Online {
    incarnation: u64,
    capabilities: Vec<String>,
    /// Instructions delivered to this incarnation and not yet acknowledged, with the
    /// attempt they were delivered as.
    unacked: HashMap<String, i64>,
    /// Instructions chosen for it by capability and not yet delivered.
    assigning: usize,
    /// A delivery round is running for it.
    busy: bool,
    /// Something was created for it while the round ran: run another.
    again: bool,
    /// A frame could not reach its connection (it ended; the registry's `Offline`
    /// is on its way): nothing more is sent to it.
    unreachable: bool,
    /// Acknowledgements of this incarnation that named no instruction it holds, in the
    /// current second (`wrong_acks_since`, epoch ms): past [`MOST_WRONG_ACKS`] they are
    /// refused without a look at the database.
    wrong_acks: u32,
    wrong_acks_since: i64,
}

/// Acknowledgements of instructions an agent does not hold (unknown, foreign,
/// finished or taken back) it may make per second before they are refused
/// `rate_limited` without a look at the database.
const MOST_WRONG_ACKS: u32 = 50;

impl Online {
    /// What `least_loaded` compares.
    fn load(&self) -> usize {
        self.unacked.len() + self.assigning
    }
}

/// The dispatcher actor.
pub struct Dispatcher {
    store: Store,
    routes: Arc<Routes>,
    emit: Emitter,
    settings: InstructionsSettings,
    sessions: SessionsSettings,
    online: HashMap<Arc<str>, Online>,
    deadlines: Deadlines,
    /// Round-robin turn per capability.
    turns: HashMap<String, usize>,
    /// A database error left work undone: look at every online agent's backlog again
    /// on the next sweep.
    rescan: bool,
    /// When idle sessions were last looked for (epoch ms).
    last_idle_check: i64,
    /// When overdue deadlines were last looked for in the storage (epoch ms).
    last_overdue_check: i64,
    /// When clustered: work announced to and by the other nodes.
    notices: Option<Notices>,
    /// Acknowledgements waiting to be stored.
    acks: Vec<store::FinishedBy>,
    /// A batch of acknowledgements is being committed.
    storing_acks: bool,
    /// Creations waiting to be stored.
    creates: Vec<creates::QueuedCreate>,
    /// A batch of creations is being committed.
    storing_creates: bool,
}

impl Dispatcher {
    /// A dispatcher over `store`, sending through `routes`, publishing to `events` as
    /// `source`.
    pub fn new(
        store: Store,
        routes: Arc<Routes>,
        events: Recipient<Publish>,
        source: EventSource,
        settings: InstructionsSettings,
        sessions: SessionsSettings,
    ) -> Self {
        Self {
            store,
            routes,
            emit: Emitter { events, source },
            settings,
            sessions,
            online: HashMap::new(),
            deadlines: Deadlines::default(),
            turns: HashMap::new(),
            rescan: false,
            last_idle_check: 0,
            last_overdue_check: epoch_ms() as i64,
            notices: None,
            acks: Vec::new(),
            storing_acks: false,
            creates: Vec::new(),
            storing_creates: false,
        }
    }

    /// The same dispatcher as one node of a cluster: work it cannot deliver is
    /// announced through `notices`, and deliveries outstanding at start are left to
    /// their deadlines (another node may be holding their agents).
    pub fn with_notices(mut self, notices: Notices) -> Self {
        self.notices = Some(notices);
        self
    }
}

impl Actor for Dispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(usize::MAX >> 4);
        self.recover(ctx);
        self.listen(ctx);
        let every = secs(self.settings.sweep_interval.max(0.01));
        ctx.run_interval(every, |dispatcher, ctx| dispatcher.sweep(ctx));
    }
}

impl Handler<Presence> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Presence, ctx: &mut Self::Context) {
        match msg {
            Presence::Online {
                agent_id,
                incarnation,
                capabilities,
            } => {
                self.online.insert(
                    agent_id.clone(),
                    Online {
                        incarnation,
                        capabilities: capabilities.clone(),
                        unacked: HashMap::new(),
                        assigning: 0,
                        busy: false,
                        again: false,
                        unreachable: false,
                        wrong_acks: 0,
                        wrong_acks_since: 0,
                    },
                );
                self.pump(ctx, agent_id);
                for capability in capabilities {
                    self.assign_waiting(ctx, capability);
                }
            }
            Presence::Offline {
                agent_id,
                incarnation,
            } => {
                let current = self
                    .online
                    .get(&agent_id)
                    .is_some_and(|online| online.incarnation == incarnation);
                if current {
                    let online = self.online.remove(&agent_id).expect("checked above");
                    for (id, attempt) in online.unacked {
                        self.take_back(ctx, id, attempt, "connection_ended");
                    }
                }
            }
        }
    }
}

/// Whether `metadata` (a registration's JSON text) lists `"instructions"` among its
/// `capabilities`; then every capability it lists.
pub fn instruction_capabilities(metadata: &str) -> Option<Vec<String>> {
    if !metadata.contains("instructions") {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Listed {
        #[serde(default)]
        capabilities: Option<serde_json::Value>,
    }
    let listed: Listed = serde_json::from_str(metadata).ok()?;
    let capabilities: Vec<String> = listed
        .capabilities?
        .as_array()?
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect();
    capabilities
        .iter()
        .any(|c| c == "instructions")
        .then_some(capabilities)
}

#[cfg(test)]
mod tests {
    use super::instruction_capabilities;

    #[test]
    fn only_an_agent_listing_instructions_takes_them() {
        let caps = instruction_capabilities(r#"{"capabilities":["gpu","instructions"]}"#);
        assert_eq!(
            caps,
            Some(vec!["gpu".to_owned(), "instructions".to_owned()])
        );
        assert_eq!(
            instruction_capabilities(r#"{"capabilities":["gpu"]}"#),
            None
        );
        assert_eq!(instruction_capabilities(r#"{"name":"instructions"}"#), None);
        assert_eq!(
            instruction_capabilities(r#"{"capabilities":"instructions"}"#),
            None
        );
        assert_eq!(instruction_capabilities("{}"), None);
    }
}

//! Time in the dispatcher: acknowledgement deadlines, expiries and idle sessions,
//! checked every `instructions.sweep_interval`, and the recovery of what was
//! unfinished when the server stopped.

use super::model::State;
use super::store::Outstanding;
use super::Dispatcher;
use crate::clock::epoch_ms;
use actix::prelude::*;
use std::collections::{BTreeSet, HashMap};

/// What falls due.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Due {
    /// Delivery `attempt` was not acknowledged in time.
    Ack(i64),
    /// Taking delivery `attempt` back for this reason failed on a storage error: again.
    Retake(i64, &'static str),
    /// The instruction's `ttl` ran out.
    Expiry,
}

/// Deadlines in time order: (epoch ms, instruction id, what), and by instruction.
#[derive(Debug, Default)]
pub(super) struct Deadlines {
    due: BTreeSet<(i64, String, Due)>,
    of: HashMap<String, Vec<(i64, Due)>>,
}

impl Deadlines {
    pub(super) fn add(&mut self, at_ms: i64, id: &str, due: Due) {
        if self.due.insert((at_ms, id.to_owned(), due.clone())) {
            self.of.entry(id.to_owned()).or_default().push((at_ms, due));
        }
    }

    /// Drops every deadline of `id` (it finished).
    pub(super) fn forget(&mut self, id: &str) {
        for (at, due) in self.of.remove(id).unwrap_or_default() {
            self.due.remove(&(at, id.to_owned(), due));
        }
    }

    /// Removes and returns what is due at `now_ms`.
    fn take_due(&mut self, now_ms: i64) -> Vec<(String, Due)> {
        let mut due = Vec::new();
        while let Some(first) = self.due.first() {
            if first.0 > now_ms {
                break;
            }
            let (at, id, what) = self.due.pop_first().expect("first exists");
            if let Some(left) = self.of.get_mut(&id) {
                left.retain(|entry| *entry != (at, what.clone()));
                if left.is_empty() {
                    self.of.remove(&id);
                }
            }
            due.push((id, what));
        }
        due
    }

    /// Deadlines held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.due.len()
    }
}

/// Idle sessions are looked for at most this often (ms).
const IDLE_CHECK_MS: i64 = 1000;
/// Most idle sessions closed per check.
const IDLE_BATCH: i64 = 500;

impl Dispatcher {
    /// Rebuilds the deadlines from the store; deliveries made before a restart are
    /// taken back (their connections ended with the server).
    pub(super) fn recover(&mut self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let unfinished = async move { store.outstanding().await };
        ctx.wait(fut::wrap_future(unfinished).map(
            |result, dispatcher: &mut Self, ctx| match result {
                Ok(unfinished) => {
                    log::info!(
                        "instructions: {} unfinished in storage at start",
                        unfinished.len()
                    );
                    for instruction in unfinished {
                        dispatcher.recovered(ctx, instruction);
                    }
                }
                Err(error) => {
                    log::error!("instructions: cannot read unfinished instructions: {error}");
                    dispatcher.rescan = true;
                }
            },
        ));
    }

    fn recovered(&mut self, ctx: &mut Context<Self>, instruction: Outstanding) {
        self.deadlines
            .add(instruction.expires_at_ms, &instruction.id, Due::Expiry);
        if instruction.delivered {
            let attempt = instruction.attempt;
            match (&self.notices, instruction.ack_deadline_ms) {
                // Clustered: its agent may be on a node that is still running.
                (Some(_), Some(deadline)) => {
                    self.deadlines
                        .add(deadline, &instruction.id, Due::Ack(attempt))
                }
                _ => self.take_back(ctx, instruction.id, attempt, "server_restarted"),
            }
        }
    }

    /// Handles what fell due; looks for idle sessions once a second.
    pub(super) fn sweep(&mut self, ctx: &mut Context<Self>) {
        let now = epoch_ms() as i64;
        for (id, due) in self.deadlines.take_due(now) {
            match due {
                Due::Ack(attempt) => self.take_back(ctx, id, attempt, "ack_timeout"),
                Due::Retake(attempt, reason) => self.take_back(ctx, id, attempt, reason),
                Due::Expiry => self.expire(ctx, id),
            }
        }
        if self.rescan {
            // Work left undone by a storage error: every online agent's backlog, and
            // what waits for the capabilities they have.
            self.rescan = false;
            let agents: Vec<_> = self.online.keys().cloned().collect();
            let mut capabilities: Vec<String> = self
                .online
                .values()
                .flat_map(|online| online.capabilities.iter().cloned())
                .collect();
            capabilities.sort_unstable();
            capabilities.dedup();
            for agent_id in agents {
                self.pump(ctx, agent_id);
            }
            for capability in capabilities {
                self.assign_waiting(ctx, capability);
            }
        }
        if now - self.last_idle_check >= IDLE_CHECK_MS {
            self.last_idle_check = now;
            self.close_idle_sessions(ctx, now);
        }
        let overdue_ms = (self.settings.overdue_check * 1000.0) as i64;
        if now - self.last_overdue_check >= overdue_ms {
            self.last_overdue_check = now;
            self.handle_overdue(ctx, now - overdue_ms);
        }
    }

    /// Expires and takes back what was due before `cutoff` and no deadline of this
    /// node's handled: in a cluster, a lost node's (every node looks; the storage lets
    /// one change each).
    fn handle_overdue(&mut self, ctx: &mut Context<Self>, cutoff: i64) {
        const MOST: i64 = 1000;
        let (store, emit) = (self.store.clone(), self.emit.clone());
        let overdue = async move {
            let now = epoch_ms() as i64;
            let expired = store.expire_overdue(cutoff, now, MOST).await?;
            let taken = store.take_back_overdue(cutoff, now, MOST).await?;
            for instruction in expired.iter().chain(&taken) {
                if instruction.state.is_final() {
                    emit.instruction(instruction);
                }
            }
            Ok::<_, super::StoreError>(expired.into_iter().chain(taken).collect::<Vec<_>>())
        };
        ctx.spawn(fut::wrap_future(overdue).map(
            |result, dispatcher: &mut Self, ctx| match result {
                Ok(changed) => {
                    if !changed.is_empty() {
                        log::info!("instructions: {} overdue deadlines handled", changed.len());
                    }
                    for instruction in changed {
                        if let Some(online) = instruction
                            .agent_id
                            .as_deref()
                            .and_then(|agent| dispatcher.online.get_mut(agent))
                        {
                            online.unacked.remove(&instruction.id);
                        }
                        if instruction.state.is_final() {
                            dispatcher.deadlines.forget(&instruction.id);
                        } else {
                            dispatcher.send_on(ctx, instruction);
                        }
                    }
                }
                Err(error) => {
                    log::warn!("instructions: looking for overdue deadlines failed: {error}")
                }
            },
        ));
    }

    fn expire(&mut self, ctx: &mut Context<Self>, id: String) {
        let (store, emit) = (self.store.clone(), self.emit.clone());
        let retry_id = id.clone();
        let expire = async move {
            let now = epoch_ms() as i64;
            let expired = store.finish(&id, State::Expired, "ttl", now).await?;
            if let Some(instruction) = &expired {
                emit.instruction(instruction);
            }
            Ok::<_, super::StoreError>(expired)
        };
        ctx.spawn(fut::wrap_future(expire).map(
            move |result, dispatcher: &mut Self, _| match result {
                Ok(Some(instruction)) => dispatcher.forget_delivery(&instruction),
                Ok(None) => {}
                Err(error) => {
                    log::warn!("instructions: expiring failed (retried in 1 s): {error}");
                    let retry = epoch_ms() as i64 + super::delivery::RETRY_MS;
                    dispatcher.deadlines.add(retry, &retry_id, Due::Expiry);
                }
            },
        ));
    }

    fn close_idle_sessions(&mut self, ctx: &mut Context<Self>, now: i64) {
        let idle_ms = (self.sessions.idle_timeout * 1000.0) as i64;
        let store = self.store.clone();
        let idle = async move { store.idle_sessions(now - idle_ms, IDLE_BATCH).await };
        ctx.spawn(
            fut::wrap_future(idle).map(|result, dispatcher: &mut Self, ctx| match result {
                Ok(ids) => {
                    for id in ids {
                        dispatcher.close_session(ctx, id, "idle", None);
                    }
                }
                Err(error) => log::warn!("instructions: looking for idle sessions failed: {error}"),
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_is_due_is_taken_in_time_order() {
        let mut deadlines = Deadlines::default();
        deadlines.add(30, "c", Due::Expiry);
        deadlines.add(10, "a", Due::Ack(1));
        deadlines.add(20, "b", Due::Ack(2));
        assert_eq!(
            deadlines.take_due(20),
            [("a".to_owned(), Due::Ack(1)), ("b".to_owned(), Due::Ack(2))]
        );
        assert!(deadlines.take_due(29).is_empty());
        assert_eq!(deadlines.take_due(31), [("c".to_owned(), Due::Expiry)]);
        assert_eq!(deadlines.len(), 0);
    }

    #[test]
    fn a_finished_instruction_leaves_no_deadline() {
        let mut deadlines = Deadlines::default();
        deadlines.add(10, "a", Due::Ack(1));
        deadlines.add(50, "a", Due::Expiry);
        deadlines.add(20, "b", Due::Expiry);
        deadlines.forget("a");
        assert_eq!(deadlines.len(), 1);
        assert_eq!(deadlines.take_due(100), [("b".to_owned(), Due::Expiry)]);
        assert!(deadlines.of.is_empty());
    }
}

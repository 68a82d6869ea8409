//! The routing table: agent id → the outbox of the connection registered as it, read
//! by every worker thread, written only by the registry.
//!
//! A message between agents goes from the sender's connection straight to the
//! recipient's relay (`connection → relay → send`), without a hop through the registry's
//! thread. The registry stays the one owner of every agent's lifecycle: it enters an
//! agent here after it has sent the agent its registration answer (so whatever is routed
//! to the agent comes after that answer, on the same relay), and removes it when it ends
//! the incarnation, before it tells the connection to close. A sender that was replaced or
//! ended is no longer the entry of its id, and its messages are dropped, as the registry
//! dropped them before.
//!
//! A broadcast is handed out by the sender's worker: one relay message per worker thread,
//! one `send` per copy there. Its exclusion list is a hash set once it is longer than a
//! few ids, so a long list costs its length once, not once per agent.

use crate::liveness::SessionId;
use crate::outbound::{Batches, OutFrame, Outbox};
use crate::protocol::MessageKind;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// Exclusion lists longer than this are looked up in a hash set.
const SCAN_EXCLUSIONS: usize = 8;

/// Where an agent's frames go.
#[derive(Debug, Clone, Copy)]
struct Route {
    /// The connection registered as the agent.
    session_id: SessionId,
    outbox: Outbox,
}

/// The routing table, shared by the registry (which writes it) and the connections.
#[derive(Debug, Default)]
pub struct Routes {
    table: RwLock<HashMap<Arc<str>, Route>>,
}

/// What became of a routed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Handed to the relays of this many recipients.
    Sent(usize),
    /// The direct message's target is not registered (answer `unknown_agent`).
    UnknownTarget,
    /// The sender no longer holds its id (replaced or ended while the frame was read):
    /// dropped.
    SenderGone,
}

impl Routes {
    /// An empty table.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<Arc<str>, Route>> {
        // The table holds plain values: a panic elsewhere cannot leave it half-written.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters `agent_id` as registered by `session_id`, after running `answer` (which
    /// queues the agent's registration answer on its relay), with the table locked
    /// throughout (registry only). Whatever is routed to the agent queues behind its
    /// answer, and whoever reads the table after the agent could have read that answer
    /// finds the agent in it: a message the agent sends at once is not taken for one of
    /// a sender that is gone, and a message sent to it at once (from this node or
    /// another) is not lost.
    pub(crate) fn enter_after(
        &self,
        agent_id: Arc<str>,
        session_id: SessionId,
        outbox: Outbox,
        answer: impl FnOnce(),
    ) {
        let route = Route { session_id, outbox };
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        answer();
        table.insert(agent_id, route);
    }

    /// Removes `agent_id` if `session_id` still holds it (registry only).
    pub(crate) fn remove(&self, agent_id: &str, session_id: SessionId) {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if table
            .get(agent_id)
            .is_some_and(|r| r.session_id == session_id)
        {
            table.remove(agent_id);
        }
    }

    /// Number of agents in the table.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Routes `frame` (already stamped with `sender_id`) from the connection
    /// `session_id` as `kind` says.
    pub fn route(
        &self,
        session_id: SessionId,
        sender_id: &str,
        kind: &MessageKind,
        frame: OutFrame,
    ) -> Routed {
        let table = self.read();
        if table
            .get(sender_id)
            .is_none_or(|r| r.session_id != session_id)
        {
            return Routed::SenderGone;
        }
        match kind {
            MessageKind::Direct(target) => match table.get(target.as_str()) {
                Some(route) => {
                    route.outbox.push(frame);
                    Routed::Sent(1)
                }
                None => Routed::UnknownTarget,
            },
            MessageKind::Broadcast(exclude) => {
                let excluded = Exclusions::new(sender_id, exclude);
                let mut copies = Batches::default();
                let mut sent = 0;
                for (agent_id, route) in table.iter() {
                    if !excluded.contains(agent_id) {
                        copies.push(&route.outbox, frame.clone());
                        sent += 1;
                    }
                }
                drop(table);
                copies.send();
                Routed::Sent(sent)
            }
            MessageKind::Mod => Routed::Sent(0),
        }
    }
}

impl Routes {
    /// Whether `agent_id` is registered on this node.
    pub fn contains(&self, agent_id: &str) -> bool {
        self.read().contains_key(agent_id)
    }

    /// Hands `frame` to the agent `agent_id` of this node (a message that came from
    /// another node); false if it is not registered here.
    pub fn deliver(&self, agent_id: &str, frame: OutFrame) -> bool {
        match self.read().get(agent_id) {
            Some(route) => {
                route.outbox.push(frame);
                true
            }
            None => false,
        }
    }

    /// Hands `frame` to every agent of this node but those in `exclude` (a broadcast
    /// from another node); the number of copies.
    pub fn spread(&self, exclude: &[&str], frame: OutFrame) -> usize {
        let excluded: HashSet<&str> = exclude.iter().copied().collect();
        let table = self.read();
        let mut copies = Batches::default();
        let mut sent = 0;
        for (agent_id, route) in table.iter() {
            if !excluded.contains(&**agent_id) {
                copies.push(&route.outbox, frame.clone());
                sent += 1;
            }
        }
        drop(table);
        copies.send();
        sent
    }
}

/// The sender and a broadcast's `exclude_agent_ids`.
enum Exclusions<'a> {
    Few(&'a str, &'a [String]),
    Many(&'a str, HashSet<&'a str>),
}

impl<'a> Exclusions<'a> {
    fn new(sender_id: &'a str, exclude: &'a [String]) -> Self {
        if exclude.len() <= SCAN_EXCLUSIONS {
            Self::Few(sender_id, exclude)
        } else {
            Self::Many(sender_id, exclude.iter().map(String::as_str).collect())
        }
    }

    fn contains(&self, agent_id: &str) -> bool {
        match self {
            Self::Few(sender, ids) => *sender == agent_id || ids.iter().any(|id| id == agent_id),
            Self::Many(sender, ids) => *sender == agent_id || ids.contains(agent_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions_hold_the_sender_and_every_listed_id_short_or_long() {
        let long: Vec<String> = (0..100).map(|i| format!("agent-{i}")).collect();
        for exclude in [&long[..3], &long[..]] {
            let excluded = Exclusions::new("me", exclude);
            assert!(excluded.contains("me"));
            assert!(exclude.iter().all(|id| excluded.contains(id)));
            assert!(!excluded.contains("agent-100"));
        }
    }
}

//! The routing table: agent id → the outbox of the connection registered as it, read
//! by every worker thread, written only by the registry.
//!
//! A message between agents goes from the sender's connection straight into the
//! recipient's socket (`connection → send`, on the sender's thread), without a hop
//! through the registry's thread or the recipient's. The registry stays the one owner of
//! every agent's lifecycle: it enters an agent here after it has sent the agent its
//! registration answer (so whatever is routed to the agent comes after that answer: a
//! frame is written on the spot only once the answer is out, and follows it through the
//! relay until then), and removes it when it ends
//! the incarnation, before it tells the connection to close. A sender that was replaced or
//! ended is no longer the entry of its id, and its messages are dropped, as the registry
//! dropped them before.
//!
//! An id being taken over from another node of the cluster is *expected* here until
//! its registration is answered: direct messages for it (from this node, or forwarded
//! by others once the claim moved here) are parked, within a byte budget, and written
//! behind its registration answer, so a cross-node takeover loses no message.
//!
//! A broadcast is handed out by the sender's worker: one relay message per worker thread,
//! one `send` per copy there. Its exclusion list is a hash set once it is longer than a
//! few ids, so a long list costs its length once, not once per agent.

use crate::liveness::SessionId;
use crate::outbound::{Batches, OutFrame, Outbox};
use crate::protocol::MessageKind;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

/// Exclusion lists longer than this are looked up in a hash set.
const SCAN_EXCLUSIONS: usize = 8;

/// Most bytes of frames parked for one expected id (beyond: `unknown_agent`, or
/// dropped and counted when forwarded from another node).
const PARKED_BYTES: usize = 1 << 20;

/// Where an agent's frames go.
#[derive(Debug, Clone)]
struct Route {
    /// The connection registered as the agent.
    session_id: SessionId,
    outbox: Outbox,
}

/// The routing table, shared by the registry (which writes it) and the connections.
#[derive(Debug, Default)]
pub struct Routes {
    table: RwLock<HashMap<Arc<str>, Route>>,
    /// Frames for ids being taken over from another node, in arrival order. Locked
    /// only with `table` held (read or write), so parking and flushing cannot cross.
    expected: Mutex<HashMap<Arc<str>, Parked>>,
}

/// Frames waiting for an expected id.
#[derive(Debug, Default)]
struct Parked {
    frames: Vec<OutFrame>,
    bytes: usize,
}

/// What became of a routed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Handed to this many recipients.
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
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        answer();
        if let Some(parked) = self.expected().remove(&agent_id) {
            for frame in parked.frames {
                outbox.push(frame);
            }
        }
        let route = Route { session_id, outbox };
        table.insert(agent_id, route);
    }

    fn expected(&self) -> MutexGuard<'_, HashMap<Arc<str>, Parked>> {
        self.expected.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Expects `agent_id`, being taken over from another node (registry only): direct
    /// messages for it are parked until [`Routes::enter_after`] writes them behind its
    /// registration answer, or [`Routes::abandon`] drops them.
    pub(crate) fn expect(&self, agent_id: Arc<str>) {
        let _table = self.read();
        self.expected().entry(agent_id).or_default();
    }

    /// Stops expecting `agent_id` (its takeover failed, or it was entered): the
    /// number of parked frames dropped.
    pub(crate) fn abandon(&self, agent_id: &str) -> usize {
        let _table = self.read();
        self.expected()
            .remove(agent_id)
            .map_or(0, |parked| parked.frames.len())
    }

    /// Parks `frame` for `agent_id` if it is expected and within its budget (call with
    /// the table read-locked, having missed the id there).
    fn park(&self, agent_id: &str, frame: OutFrame) -> bool {
        let mut expected = self.expected();
        let Some(parked) = expected.get_mut(agent_id) else {
            return false;
        };
        if parked.bytes + frame.0.len() > PARKED_BYTES {
            return false;
        }
        parked.bytes += frame.0.len();
        parked.frames.push(frame);
        true
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
    /// `session_id` as `kind` says: the copies for this node's agents go into `out`,
    /// which the caller sends.
    pub fn route(
        &self,
        session_id: SessionId,
        sender_id: &str,
        kind: &MessageKind,
        frame: OutFrame,
        out: &mut Batches,
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
                    out.push(&route.outbox, frame);
                    Routed::Sent(1)
                }
                None if self.park(target, frame) => Routed::Sent(1),
                None => Routed::UnknownTarget,
            },
            MessageKind::Broadcast(exclude) => {
                let excluded = Exclusions::new(sender_id, exclude);
                let mut sent = 0;
                for (agent_id, route) in table.iter() {
                    if !excluded.contains(agent_id) {
                        out.push(&route.outbox, frame.clone());
                        sent += 1;
                    }
                }
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
    /// another node), or parks it while the id is expected; false if neither.
    pub fn deliver(&self, agent_id: &str, frame: OutFrame) -> bool {
        let table = self.read();
        let outbox = match table.get(agent_id) {
            Some(route) => route.outbox.clone(),
            None => return self.park(agent_id, frame),
        };
        drop(table); // The write may be a system call.
        outbox.push(frame);
        true
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

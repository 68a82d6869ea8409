//! Turns the server's at-least-once instruction delivery into once per process for
//! the application: remembers which instructions the application holds and which
//! acknowledgements it sent, so a redelivery is dropped or answered again.

use std::collections::{HashMap, HashSet, VecDeque};

/// Acknowledgements remembered (and instructions held) at most.
const REMEMBERED: usize = 10_000;

/// What to do with an instruction that arrived.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// First seen: hand it to the application.
    New,
    /// The application holds it and has not acknowledged it: drop the copy.
    Held,
    /// The application acknowledged it: send this acknowledgement frame again.
    Acknowledged(String),
}

/// The instructions of one agent, across its connections.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    held: HashSet<String>,
    held_order: VecDeque<String>,
    acks: HashMap<String, String>,
    ack_order: VecDeque<String>,
    /// Instructions acknowledged again by the agent itself: an `instruction_finished`
    /// answer to that is expected, not news for the application.
    resent: HashSet<String>,
}

impl Ledger {
    /// Records that `instruction_id` arrived, and says what to do with it.
    pub(crate) fn arrived(&mut self, instruction_id: &str) -> Delivery {
        if let Some(frame) = self.acks.get(instruction_id) {
            self.resent.insert(instruction_id.to_owned());
            return Delivery::Acknowledged(frame.clone());
        }
        if self.held.contains(instruction_id) {
            return Delivery::Held;
        }
        remember(&mut self.held_order, instruction_id, |evicted| {
            self.held.remove(evicted);
        });
        self.held.insert(instruction_id.to_owned());
        Delivery::New
    }

    /// Records the application's acknowledgement `frame` of `instruction_id`.
    pub(crate) fn acknowledged(&mut self, instruction_id: &str, frame: &str) {
        self.held.remove(instruction_id);
        if self
            .acks
            .insert(instruction_id.to_owned(), frame.to_owned())
            .is_none()
        {
            let (acks, resent) = (&mut self.acks, &mut self.resent);
            remember(&mut self.ack_order, instruction_id, |evicted| {
                acks.remove(evicted);
                resent.remove(evicted);
            });
        }
    }

    /// Whether an `instruction_finished` for `instruction_id` answers an
    /// acknowledgement the agent sent again by itself (the application need not know).
    pub(crate) fn answers_resent_ack(&mut self, instruction_id: &str) -> bool {
        self.resent.remove(instruction_id)
    }
}

/// Appends `id` to `order`, evicting the oldest beyond [`REMEMBERED`].
fn remember(order: &mut VecDeque<String>, id: &str, mut evict: impl FnMut(&str)) {
    order.push_back(id.to_owned());
    while order.len() > REMEMBERED {
        if let Some(oldest) = order.pop_front() {
            evict(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redelivery_is_dropped_while_held_and_acknowledged_again_once_acked() {
        let mut ledger = Ledger::default();
        assert_eq!(ledger.arrived("i1"), Delivery::New);
        assert_eq!(ledger.arrived("i1"), Delivery::Held);
        ledger.acknowledged("i1", "ACK");
        assert_eq!(ledger.arrived("i1"), Delivery::Acknowledged("ACK".into()));
        assert!(ledger.answers_resent_ack("i1"));
        assert!(!ledger.answers_resent_ack("i1"), "only once per resend");
    }

    #[test]
    fn memory_is_bounded() {
        let mut ledger = Ledger::default();
        for n in 0..REMEMBERED + 10 {
            let id = n.to_string();
            ledger.arrived(&id);
            ledger.acknowledged(&id, "ACK");
        }
        assert_eq!(ledger.acks.len(), REMEMBERED);
        assert!(ledger.held.is_empty());
        assert_eq!(
            ledger.arrived("0"),
            Delivery::New,
            "the oldest was forgotten"
        );
    }
}

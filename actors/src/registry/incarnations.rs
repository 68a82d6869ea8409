//! Incarnation numbers: per agent id they only grow, with memory bounded by
//! `limits.remembered_agent_ids`.
//!
//! A registered agent's number is in its entry; an id that left is remembered here
//! with its last number, oldest departures forgotten first once more than the limit
//! have left. Forgetting raises a floor that every later first-seen id starts above,
//! so an id that is forgotten and comes back still gets a number above every one it
//! had: `incarnation` starts at 1 until the node has forgotten an id, and only ever
//! grows per id.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Last incarnation numbers of ids that left, bounded.
pub(super) struct Incarnations {
    /// Last number of each id that left and has not registered again.
    departed: HashMap<Arc<str>, u64>,
    /// Departures, oldest first; an entry whose number no longer matches `departed`
    /// (the id registered again) is skipped when it comes up.
    order: VecDeque<(Arc<str>, u64)>,
    /// Above every number forgotten.
    floor: u64,
    capacity: usize,
}

impl Incarnations {
    /// Remembers at most `capacity` ids that left.
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            departed: HashMap::new(),
            order: VecDeque::new(),
            floor: 0,
            capacity,
        }
    }

    /// The next number of `agent_id`, whose registered incarnation (if any) is
    /// `current`.
    pub(super) fn next(&self, agent_id: &str, current: Option<u64>) -> u64 {
        let last = current.or_else(|| self.departed.get(agent_id).copied());
        last.unwrap_or(0).max(self.floor) + 1
    }

    /// `agent_id` registered: its number is in its entry now.
    pub(super) fn registered(&mut self, agent_id: &str) {
        self.departed.remove(agent_id);
    }

    /// `agent_id` left after `incarnation`.
    pub(super) fn departed(&mut self, agent_id: &Arc<str>, incarnation: u64) {
        if self.capacity == 0 {
            self.floor = self.floor.max(incarnation);
            return;
        }
        self.departed.insert(agent_id.clone(), incarnation);
        self.order.push_back((agent_id.clone(), incarnation));
        while self.departed.len() > self.capacity {
            let Some((id, number)) = self.order.pop_front() else {
                break;
            };
            if self.departed.get(&id) == Some(&number) {
                self.departed.remove(&id);
                self.floor = self.floor.max(number);
            }
        }
        // Departures of ids that registered again pile up in `order` only; drop them
        // once they outnumber the live ones, so `order` stays within 2 × capacity.
        if self.order.len() > 2 * self.capacity {
            let departed = &self.departed;
            self.order
                .retain(|(id, number)| departed.get(id) == Some(number));
        }
    }

    /// Ids remembered after they left (`/stats`).
    pub(super) fn remembered(&self) -> usize {
        self.departed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn numbers_count_registrations_from_one_while_nothing_is_forgotten() {
        let mut numbers = Incarnations::new(10);
        assert_eq!(numbers.next("a", None), 1);
        numbers.registered("a");
        assert_eq!(numbers.next("a", Some(1)), 2); // a takeover
        numbers.departed(&id("a"), 2);
        assert_eq!(numbers.next("a", None), 3);
        assert_eq!(numbers.next("b", None), 1);
    }

    #[test]
    fn a_forgotten_id_that_returns_still_gets_a_larger_number() {
        let mut numbers = Incarnations::new(2);
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            numbers.departed(&id(name), 5 + i as u64);
        }
        assert_eq!(numbers.remembered(), 2);
        // "a" (5) and "b" (6) were forgotten: the floor is 6.
        assert!(numbers.next("a", None) > 5);
        assert!(numbers.next("b", None) > 6);
        assert_eq!(numbers.next("c", None), 8);
        assert_eq!(numbers.next("d", None), 9);
    }

    #[test]
    fn ids_that_come_and_go_repeatedly_keep_memory_bounded() {
        let mut numbers = Incarnations::new(3);
        for round in 1..=1000u64 {
            numbers.registered("a");
            numbers.departed(&id("a"), round);
        }
        assert_eq!(numbers.remembered(), 1);
        assert!(numbers.order.len() <= 6, "{}", numbers.order.len());
        assert_eq!(numbers.next("a", None), 1001);
    }

    #[test]
    fn with_no_memory_every_number_is_above_every_earlier_one() {
        let mut numbers = Incarnations::new(0);
        numbers.departed(&id("a"), 1);
        assert_eq!(numbers.next("a", None), 2);
        assert_eq!(numbers.next("b", None), 2);
        assert_eq!(numbers.remembered(), 0);
    }
}

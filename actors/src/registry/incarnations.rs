//! Incarnation numbers: per agent id they only grow, with memory bounded by
//! `limits.remembered_agent_ids`.
//!
//! A registered agent's number is in its entry; an id that left is remembered here
//! with its last number, oldest departures forgotten first once more than the limit
//! are remembered. Forgetting raises a floor that every later first-seen id starts
//! above, so an id that is forgotten and comes back still gets a number above every one
//! it had: `incarnation` starts at 1 until the node has forgotten an id, and only ever
//! grows per id.
//!
//! Ids are remembered by a keyed 64-bit hash, not by their text (two words per id
//! instead of a copy of the id and its allocation: ≈ 1.6 MiB less per 12 000 ids,
//! BENCHMARKS.md). Ids whose hashes collide share one number, the larger, so a number
//! can only come out higher than it would have, never lower; for the same reason a
//! remembered number is not dropped when its id registers again (another id may share
//! it): it is overwritten by the id's next departure, or forgotten in turn.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

/// Last incarnation numbers of ids that left, bounded.
pub(super) struct Incarnations {
    /// Last number of each remembered id's hash. Its hasher, keyed per process, also
    /// hashes the ids ([`key`](Self::key)), so clients cannot choose ids that collide.
    departed: HashMap<u64, u64>,
    /// Departures (hash, number), oldest first; an entry whose number no longer
    /// matches `departed` (the id left again since) is skipped when it comes up.
    order: VecDeque<(u64, u64)>,
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

    fn key(&self, agent_id: &str) -> u64 {
        self.departed.hasher().hash_one(agent_id)
    }

    /// The next number of `agent_id`, whose registered incarnation (if any) is
    /// `current`.
    pub(super) fn next(&self, agent_id: &str, current: Option<u64>) -> u64 {
        let last = current.or_else(|| self.departed.get(&self.key(agent_id)).copied());
        last.unwrap_or(0).max(self.floor) + 1
    }

    /// `agent_id` left after `incarnation`.
    pub(super) fn departed(&mut self, agent_id: &str, incarnation: u64) {
        if self.capacity == 0 {
            self.floor = self.floor.max(incarnation);
            return;
        }
        let key = self.key(agent_id);
        let number = self.departed.entry(key).or_insert(0);
        *number = (*number).max(incarnation);
        self.order.push_back((key, *number));
        while self.departed.len() > self.capacity {
            let Some((key, number)) = self.order.pop_front() else {
                break;
            };
            if self.departed.get(&key) == Some(&number) {
                self.departed.remove(&key);
                self.floor = self.floor.max(number);
            }
        }
        // Departures of ids that left again pile up in `order` only; drop them once
        // they outnumber the live ones, so `order` stays within 2 × capacity.
        if self.order.len() > 2 * self.capacity {
            let departed = &self.departed;
            self.order
                .retain(|(key, number)| departed.get(key) == Some(number));
        }
    }

    /// Ids remembered (`/stats`): ids that left, some of which may have registered
    /// again since.
    pub(super) fn remembered(&self) -> usize {
        self.departed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_count_registrations_from_one_while_nothing_is_forgotten() {
        let mut numbers = Incarnations::new(10);
        assert_eq!(numbers.next("a", None), 1);
        assert_eq!(numbers.next("a", Some(1)), 2); // a takeover
        numbers.departed("a", 2);
        assert_eq!(numbers.next("a", None), 3);
        assert_eq!(numbers.next("b", None), 1);
    }

    #[test]
    fn a_forgotten_id_that_returns_still_gets_a_larger_number() {
        let mut numbers = Incarnations::new(2);
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            numbers.departed(name, 5 + i as u64);
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
            numbers.departed("a", round);
        }
        assert_eq!(numbers.remembered(), 1);
        assert!(numbers.order.len() <= 6, "{}", numbers.order.len());
        assert_eq!(numbers.next("a", None), 1001);
    }

    #[test]
    fn a_remembered_number_shared_by_colliding_ids_keeps_the_larger() {
        // Two ids whose hashes collide write to one entry; modelled here by one id
        // leaving with a smaller number after a larger one.
        let mut numbers = Incarnations::new(10);
        numbers.departed("a", 5);
        numbers.departed("a", 3);
        assert_eq!(numbers.next("a", None), 6);
        assert_eq!(numbers.remembered(), 1);
    }

    #[test]
    fn with_no_memory_every_number_is_above_every_earlier_one() {
        let mut numbers = Incarnations::new(0);
        numbers.departed("a", 1);
        assert_eq!(numbers.next("a", None), 2);
        assert_eq!(numbers.next("b", None), 2);
        assert_eq!(numbers.remembered(), 0);
    }
}

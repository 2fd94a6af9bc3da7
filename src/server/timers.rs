//! Deadlines the event loop keeps for its clients: when a client slowed down by flood control
//! may be read again, when a closing client's last output is given up on, and when a TLS
//! handshake has taken too long. The loop's poll
//! timeout comes from the earliest one.
//!
//! A timer names its client by slot and never-reused id, so one that fires after the client has
//! gone (or its slot went to someone else) is recognised and ignored: nothing is cancelled.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use crate::persist::ClientRef;

/// What is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// The client has earned lines again: read it.
    Resume(ClientRef),
    /// The client's last output has had its time: close it now.
    CloseDeadline(ClientRef),
    /// The client's TLS handshake has had its time: close it if it is still not done.
    HandshakeDeadline(ClientRef),
}

/// Pending deadlines, earliest first.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<Entry>>,
    /// Breaks ties so timers set for the same instant fire in the order they were set.
    added: u64,
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    at: Instant,
    order: u64,
    due: Due,
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Timers {
    pub fn add(&mut self, at: Instant, due: Due) {
        self.added += 1;
        self.heap.push(Reverse(Entry {
            at,
            order: self.added,
            due,
        }));
    }

    /// When the earliest timer is due.
    pub fn next_at(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(entry)| entry.at)
    }

    /// The next timer due at or before `now`, taken off the list.
    pub fn pop_due(&mut self, now: Instant) -> Option<Due> {
        if self.next_at()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse(entry)| entry.due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timers_fire_in_time_order_and_not_before_they_are_due() {
        let start = Instant::now();
        let client = |n| ClientRef {
            slot: n,
            id: n as u64,
        };
        let mut timers = Timers::default();
        timers.add(
            start + Duration::from_secs(2),
            Due::CloseDeadline(client(1)),
        );
        timers.add(start + Duration::from_secs(1), Due::Resume(client(2)));
        timers.add(start + Duration::from_secs(1), Due::Resume(client(3)));
        assert_eq!(timers.next_at(), Some(start + Duration::from_secs(1)));
        assert_eq!(timers.pop_due(start), None);
        let later = start + Duration::from_secs(5);
        assert_eq!(timers.pop_due(later), Some(Due::Resume(client(2))));
        assert_eq!(timers.pop_due(later), Some(Due::Resume(client(3))));
        assert_eq!(timers.pop_due(later), Some(Due::CloseDeadline(client(1))));
        assert_eq!(timers.pop_due(later), None);
    }
}

//! Join and leave notices, coalesced so that a crowd arriving at once costs one line per client.
//!
//! Announcing every join to everyone costs O(N²): after a restart 10 000 clients reconnect and
//! each join is copied to up to 10 000 others. So a join (or leave) is announced at once only
//! when no line of its kind went out within the last `--presence-interval`; later ones are
//! gathered and announced together when the interval ends, one line per kind:
//! `* alice, bob and carol joined`, `* alice, bob, carol, dave, erin and 37 others joined`.
//!
//! Each recipient hears only of what happened while it was in the chat, and never of its own
//! join. Clients are numbered in the order they join (a TLS client after its handshake), so
//! "in the chat before this happened" is "number below a mark" and each recipient's part of a
//! gathered list is a suffix of it: the few distinct lines are built once each.
//!
//! Order stays causal without giving up the gathering: a client whose join is still waiting
//! that speaks, renames itself or leaves has its own join announced first (the other waiting
//! joins keep waiting), so nobody sees `<bob> hi`, `* bob is now robert` or `* bob left` before
//! `* bob joined`. And before a name that is waiting in a gathered leave is taken again, the
//! leaves go out, so `* bob left` never comes after the new bob has spoken.

use std::time::{Duration, Instant};

use super::room::Room;
use crate::persist::ClientRef;
use crate::protocol;

/// Names shown in one gathered notice; the rest are counted (`and 37 others`).
pub const NAMES_SHOWN: usize = 5;

/// The two kinds of presence notice, each coalesced on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Joined,
    Left,
}

impl Kind {
    fn verb(self) -> &'static str {
        match self {
            Kind::Joined => "joined",
            Kind::Left => "left",
        }
    }
}

/// Presence notices of both kinds, with their gathering state.
#[derive(Debug)]
pub struct Presence {
    interval: Duration,
    joins: Gathering,
    leaves: Gathering,
}

/// One kind's state.
#[derive(Debug)]
struct Gathering {
    kind: Kind,
    /// When a line of this kind last reached anyone.
    last_sent: Option<Instant>,
    /// Waiting to be announced, oldest first.
    waiting: Vec<Event>,
}

/// A join or leave waiting to be announced.
#[derive(Debug)]
struct Event {
    name: String,
    /// Clients whose join order is below this were in the chat when it happened and hear of
    /// it. Never decreasing along `waiting`, so each recipient's share is a suffix of the list.
    heard_below: u64,
    /// For a join: who joined, to mark as announced once the line goes out (`None` for a
    /// client of another cluster node).
    joiner: Option<ClientRef>,
}

impl Presence {
    pub fn new(interval: Duration) -> Self {
        Presence {
            interval,
            joins: Gathering::new(Kind::Joined),
            leaves: Gathering::new(Kind::Left),
        }
    }

    /// Announces the client in `slot` to the others, now or with the next gathered line.
    pub fn joined(&mut self, room: &mut Room, slot: usize, now: Instant) {
        let Some(conn) = room.get(slot) else { return };
        let event = Event {
            name: conn.name.clone(),
            heard_below: conn.join_order,
            joiner: Some(ClientRef {
                slot,
                id: conn.id(),
            }),
        };
        if self
            .joins
            .now_or_gathered(room, Some(slot), event, now, self.interval)
        {
            if let Some(conn) = room.get_mut(slot) {
                conn.announced = true;
            }
        }
    }

    /// Tells the others that `client`, called `name`, left. If its join is still waiting, that
    /// join goes out first.
    pub fn left(&mut self, room: &mut Room, client: ClientRef, name: &str, now: Instant) {
        self.announce_join_of(room, client, now);
        self.leave(room, name, now);
    }

    /// A client of another cluster node joined: everyone here hears of it, now or gathered.
    pub fn remote_joined(&mut self, room: &mut Room, name: &str, now: Instant) {
        let event = Event::heard_by_all(room, name);
        self.joins
            .now_or_gathered(room, None, event, now, self.interval);
    }

    /// A client of another cluster node left (its join goes out first if it is waiting).
    pub fn remote_left(&mut self, room: &mut Room, name: &str, now: Instant) {
        self.announce_remote_join(room, name, now);
        self.leave(room, name, now);
    }

    /// Announces the waiting join of another node's client called `name` now, before a line
    /// from it; the other waiting joins keep waiting.
    pub fn announce_remote_join(&mut self, room: &mut Room, name: &str, now: Instant) {
        let waiting = self.joins.waiting.iter();
        let Some(at) = waiting
            .into_iter()
            .position(|event| event.joiner.is_none() && event.name == name)
        else {
            return;
        };
        let event = self.joins.waiting.remove(at);
        self.joins.send(room, &[event], now);
    }

    fn leave(&mut self, room: &mut Room, name: &str, now: Instant) {
        let event = Event::heard_by_all(room, name);
        self.leaves
            .now_or_gathered(room, None, event, now, self.interval);
    }

    /// Announces `client`'s join now if it is still waiting (before a line from it), to those
    /// who were connected before it; the other waiting joins keep waiting.
    pub fn announce_join_of(&mut self, room: &mut Room, client: ClientRef, now: Instant) {
        let Some(at) = self
            .joins
            .waiting
            .iter()
            .position(|event| event.joiner == Some(client))
        else {
            return;
        };
        let event = self.joins.waiting.remove(at);
        self.joins.send(room, &[event], now);
    }

    /// Sends the gathered leaves now if `name` is among them, before someone takes that name:
    /// otherwise `* bob left` would come after the new bob's first words.
    pub fn before_name_taken(&mut self, room: &mut Room, name: &str, now: Instant) {
        let waiting = self.leaves.waiting.iter();
        if waiting
            .into_iter()
            .any(|e| e.name.eq_ignore_ascii_case(name))
        {
            // Joins first, as always: some of the leavers may have joined in the same interval.
            self.joins.announce(room, now);
            self.leaves.announce(room, now);
        }
    }

    /// Sends the gathered lines whose interval has ended; joins first.
    pub fn announce_due(&mut self, room: &mut Room, now: Instant) {
        for gathering in [&mut self.joins, &mut self.leaves] {
            if gathering.due(self.interval).is_some_and(|due| due <= now) {
                gathering.announce(room, now);
            }
        }
    }

    /// When the next gathered line is due, if any is waiting.
    pub fn next_due(&self) -> Option<Instant> {
        [
            self.joins.due(self.interval),
            self.leaves.due(self.interval),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

impl Event {
    /// An event every client in the chat now hears of (and none who joins later).
    fn heard_by_all(room: &Room, name: &str) -> Self {
        Event {
            name: name.to_string(),
            heard_below: room.next_join_order(),
            joiner: None,
        }
    }
}

impl Gathering {
    /// Sends `event`'s line to every open client but `except` now, if nothing of this kind is
    /// waiting and none went out within `interval`; else gathers it. True if it went now.
    fn now_or_gathered(
        &mut self,
        room: &mut Room,
        except: Option<usize>,
        event: Event,
        now: Instant,
        interval: Duration,
    ) -> bool {
        if !self.may_announce_at_once(now, interval) {
            self.waiting.push(event);
            return false;
        }
        let line = gathered_line(std::slice::from_ref(&event), self.kind);
        if room.notice_all(except, &line) > 0 {
            self.last_sent = Some(now);
        }
        true
    }

    fn new(kind: Kind) -> Self {
        Gathering {
            kind,
            last_sent: None,
            waiting: Vec::new(),
        }
    }

    /// Nothing is waiting and no line of this kind went out within the interval.
    fn may_announce_at_once(&self, now: Instant, interval: Duration) -> bool {
        self.waiting.is_empty()
            && self
                .last_sent
                .is_none_or(|sent| now.saturating_duration_since(sent) >= interval)
    }

    fn due(&self, interval: Duration) -> Option<Instant> {
        if self.waiting.is_empty() {
            return None;
        }
        // Something waits only while a line went out within the interval.
        self.last_sent.map(|sent| sent + interval)
    }

    /// Sends the waiting events, each open client its share as one line.
    fn announce(&mut self, room: &mut Room, now: Instant) {
        let waiting = std::mem::take(&mut self.waiting);
        self.send(room, &waiting, now);
    }

    /// Sends each open client its share of `events` (oldest first) as one line, and marks the
    /// joiners among them announced.
    fn send(&mut self, room: &mut Room, events: &[Event], now: Instant) {
        if events.is_empty() {
            return;
        }
        // Most recipients were there before all of it and share the whole list's line.
        let whole = gathered_line(events, self.kind);
        let mut reached = 0;
        for (client, join_order) in room.open_clients() {
            let first = events.partition_point(|event| event.heard_below <= join_order);
            let share = &events[first..];
            if share.is_empty() {
                continue;
            }
            if first == 0 {
                room.notice(client.slot, &whole);
            } else {
                room.notice(client.slot, &gathered_line(share, self.kind));
            }
            reached += 1;
        }
        for joiner in events.iter().filter_map(|event| event.joiner) {
            if let Some(conn) = room.get_mut(joiner.slot).filter(|c| c.id() == joiner.id) {
                conn.announced = true;
            }
        }
        if reached > 0 {
            self.last_sent = Some(now);
        }
    }
}

/// `alice joined`, `alice and bob joined`, `alice, bob and carol joined` (up to five names),
/// `alice, bob, carol, dave, erin and 37 others joined` (`and 1 other`). Only the names shown
/// are collected: in a storm each newcomer's share is a different long suffix.
fn gathered_line(events: &[Event], kind: Kind) -> String {
    let names: Vec<&str> = events
        .iter()
        .take(NAMES_SHOWN)
        .map(|event| event.name.as_str())
        .collect();
    protocol::presence(&names, events.len() - names.len(), kind.verb())
}

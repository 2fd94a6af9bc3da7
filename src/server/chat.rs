//! What each client line does: chat, commands, joins and leaves, and save failures.
//!
//! The rules of the chat, between the wire (`protocol`) and delivery (`room::Room`). No I/O:
//! it only queues lines in the room and hands messages to the persistence queue.

use std::net::SocketAddr;
use std::time::Instant;

use super::connection::CloseReason;
use super::flood::Verdict;
use super::room::Room;
use crate::persist::{Persister, Record, SaveFailure, SubmitError};
use crate::protocol::{self, Command};

/// Greets a new client and tells the others.
pub fn joined(room: &mut Room, slot: usize) {
    let Some(name) = room.get(slot).map(|conn| conn.name.clone()) else {
        return;
    };
    room.notice(slot, &protocol::welcome(&name));
    room.notice_all(Some(slot), &protocol::joined(&name));
}

/// Tells the others that `name` has gone.
pub fn left(room: &mut Room, name: &str) {
    room.notice_all(None, &protocol::left(name));
}

/// Applies one line from the client in `slot`, received at `now`.
pub fn line(
    room: &mut Room,
    persister: Option<&Persister>,
    slot: usize,
    bytes: &[u8],
    now: Instant,
) {
    if let Some(conn) = room.get_mut(slot) {
        conn.note_line();
    }
    let text = protocol::sanitize(bytes);
    let command = protocol::parse(&text);
    // Blank lines do nothing, and /quit should work even for a client over its limit.
    let free = matches!(command, Command::Empty | Command::Quit);
    if !free && !within_flood_limit(room, slot, now) {
        return;
    }
    match command {
        Command::Chat(message) => chat(room, persister, slot, message),
        Command::Nick(name) => nick(room, slot, name),
        Command::Who => {
            let who = protocol::who(room.names());
            room.notice(slot, &who);
        }
        Command::Help => {
            for line in protocol::HELP_LINES {
                room.notice(slot, line);
            }
        }
        Command::Quit => {
            room.notice(slot, protocol::BYE);
            room.close(slot, CloseReason::Quit);
        }
        Command::Empty => {}
        Command::Usage(usage) => room.error(slot, usage),
        Command::Unknown => room.error(slot, protocol::UNKNOWN_COMMAND),
    }
}

/// Tells the client its line was too long and dropped; disconnects a client that keeps
/// sending them.
pub fn too_long(room: &mut Room, slot: usize) {
    let limits = *room.limits();
    let Some(count) = room.get_mut(slot).map(|conn| conn.note_overlong()) else {
        return;
    };
    if count > limits.max_overlong {
        room.error(slot, &protocol::too_many_overlong(limits.max_line));
        room.close(slot, CloseReason::TooManyOverlong);
    } else {
        room.error(slot, &protocol::line_too_long(limits.max_line));
    }
}

/// Takes a flood-control token for the line; warns once per burst when there is none.
fn within_flood_limit(room: &mut Room, slot: usize, now: Instant) -> bool {
    match room.take_flood_token(slot, now) {
        Verdict::Allowed => true,
        Verdict::Dropped { warn } => {
            if let (true, Some(limit)) = (warn, room.limits().flood) {
                room.error(slot, &protocol::slow_down(limit));
            }
            false
        }
    }
}

/// Reports messages that could not be stored to their senders, if still connected.
pub fn not_saved(room: &mut Room, failures: Vec<SaveFailure>) {
    for failure in failures {
        if room.find(failure.sender).is_some() {
            let text = protocol::not_saved(&failure.content, &failure.reason);
            room.error(failure.sender.slot, &text);
        }
    }
}

fn chat(room: &mut Room, persister: Option<&Persister>, slot: usize, message: &str) {
    let Some(conn) = room.get(slot) else { return };
    let (name, addr) = (conn.name.clone(), conn.addr());
    room.chat(slot, &name, message);
    if let Some(persister) = persister {
        store(room, persister, slot, name, addr, message);
    }
}

/// Hands the message to the persistence thread; a full queue is reported at once.
fn store(
    room: &mut Room,
    persister: &Persister,
    slot: usize,
    nick: String,
    addr: SocketAddr,
    message: &str,
) {
    let Some(sender) = room.client_ref(slot) else {
        return;
    };
    // Encoded once, here: the persistence thread and the driver pass these bytes on as they are.
    let record = Record::new(sender, &nick, addr, message, bson::DateTime::now());
    if let Err(SubmitError { content, reason }) = persister.submit(record) {
        room.error(slot, &protocol::not_saved(&content, reason));
    }
}

fn nick(room: &mut Room, slot: usize, name: &str) {
    if protocol::validate_nick(name).is_err() {
        return room.error(slot, &protocol::invalid_nick());
    }
    if room.name_taken(name, slot) {
        return room.error(slot, &protocol::nick_taken(name));
    }
    let Some(conn) = room.get_mut(slot) else {
        return;
    };
    if conn.name == name {
        return;
    }
    let old = std::mem::replace(&mut conn.name, name.to_string());
    room.notice_all(None, &protocol::renamed(&old, name));
}

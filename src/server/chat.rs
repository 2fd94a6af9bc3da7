//! What each client line does: chat, commands, joins, flood and overlong-line rules, and save
//! failures.
//!
//! The rules of the chat, between the wire (`protocol`) and delivery (`room::Room`). No I/O:
//! it only queues lines in the room and hands messages to the persistence queue.

use std::net::SocketAddr;
use std::time::Instant;

use super::connection::CloseReason;
use super::history::History;
use super::presence::Presence;
use super::room::Room;
use super::stats::Stats;
use crate::persist::{ClientRef, Persister, Record, SaveFailure, SubmitError};
use crate::protocol::{self, Command};

/// What a line may change besides the room: presence notices, the save queue, history; and
/// the loop's figures, for `/stats`.
pub struct Services<'a> {
    pub presence: &'a mut Presence,
    pub persister: Option<&'a Persister>,
    pub history: &'a mut History,
    pub stats: &'a Stats,
}

/// Lets a new client into the chat (a TLS client once its handshake is done): greets it,
/// tells the others (see `presence` for when) and asks for its history.
pub fn joined(room: &mut Room, services: Services<'_>, slot: usize, now: Instant) {
    let join_order = room.take_join_order();
    let Some(conn) = room.get_mut(slot) else {
        return;
    };
    conn.joined = true;
    conn.join_order = join_order;
    let name = conn.name.clone();
    room.notice(slot, &protocol::welcome(&name));
    services.presence.joined(room, slot, now);
    services
        .history
        .on_join(room, services.persister, slot, now);
}

/// Applies one line from the client in `slot`, received at `now`. The loop has framed no more
/// lines than the client's flood allowance, so each one that counts has its token.
pub fn line(room: &mut Room, services: Services<'_>, slot: usize, bytes: &[u8], now: Instant) {
    let Services {
        presence,
        persister,
        history,
        stats,
    } = services;
    let Some(conn) = room.get_mut(slot) else {
        return;
    };
    conn.note_line();
    let text = protocol::sanitize(bytes);
    let command = protocol::parse(&text);
    // Blank lines do nothing and cost nothing.
    if !matches!(command, Command::Empty | Command::Quit) {
        conn.spend_flood_token();
    }
    // Others hear of a client's join before they hear anything from it.
    let client = ClientRef {
        slot,
        id: conn.id(),
    };
    if matches!(
        command,
        Command::Chat(_) | Command::Me(_) | Command::Nick(_)
    ) && !conn.announced
    {
        presence.announce_join_of(room, client, now);
    }
    match command {
        Command::Chat(message) => chat(room, persister, slot, message),
        Command::Me(action) => act(room, persister, slot, action),
        Command::History(count) => history.command(room, persister, slot, count, now),
        Command::Nick(name) => nick(room, presence, client, name, now),
        Command::Who => {
            let who = protocol::who(room.names());
            room.notice(slot, &who);
        }
        Command::Stats => {
            // The asker's own chat gathered this turn is counted as delivered first.
            room.send_gathered_chat();
            let figures = stats.line(room, persister, now);
            room.notice(slot, &figures);
        }
        Command::Help => {
            for line in protocol::HELP_LINES {
                room.notice(slot, line);
            }
        }
        Command::Quit => room.leave(slot, CloseReason::Quit, Some(protocol::BYE)),
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

/// The client has more lines than its flood allowance: they wait. Says so once per burst;
/// true if it did (a new burst was delayed).
pub fn flood_delayed(room: &mut Room, slot: usize) -> bool {
    let Some(limit) = room.limits().flood else {
        return false;
    };
    let first = room
        .get_mut(slot)
        .is_some_and(|conn| conn.first_delay_in_burst());
    if first {
        room.error(slot, &protocol::slow_down(limit));
    }
    first
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
        store(room, persister, slot, (name, addr), message, false);
    }
}

/// `/me ACTION`: `* NAME ACTION` to the others, stored as an action.
fn act(room: &mut Room, persister: Option<&Persister>, slot: usize, action: &str) {
    let Some(conn) = room.get(slot) else { return };
    let (name, addr) = (conn.name.clone(), conn.addr());
    room.action(slot, &name, action);
    if let Some(persister) = persister {
        store(room, persister, slot, (name, addr), action, true);
    }
}

/// Hands the message to the persistence thread; a full queue is reported at once.
fn store(
    room: &mut Room,
    persister: &Persister,
    slot: usize,
    (nick, addr): (String, SocketAddr),
    message: &str,
    action: bool,
) {
    let Some(sender) = room.client_ref(slot) else {
        return;
    };
    // Encoded once, here: the persistence thread and the driver pass these bytes on as they are.
    let mut record = Record::new(sender, &nick, addr, message, bson::DateTime::now());
    if action {
        record = record.action();
    }
    if let Err(SubmitError { content, reason }) = persister.submit(record) {
        room.error(slot, &protocol::not_saved(&content, reason));
    }
}

/// Renames the client; everyone is told (its join, if it was still waiting, went out first).
fn nick(room: &mut Room, presence: &mut Presence, client: ClientRef, name: &str, now: Instant) {
    let slot = client.slot;
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
    presence.before_name_taken(room, name, now);
    room.notice_all(None, &protocol::renamed(&old, name));
}

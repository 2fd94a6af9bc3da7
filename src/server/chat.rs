//! What each client line does: chat, commands, joins, flood and overlong-line rules, and save
//! failures.
//!
//! The rules of the chat, between the wire (`protocol`) and delivery (`room::Room`). No I/O:
//! it only queues lines in the room and hands messages to the persistence queue.

use std::time::Instant;

use super::connection::CloseReason;
use super::history::History;
use super::presence::Presence;
use super::room::Room;
use super::roster::Roster;
use super::stats::Stats;
use crate::cluster::ClaimRefused;
use crate::persist::{ClientRef, Persister, Record, SaveFailure, SubmitError, MAY_STILL_BE_SAVED};
use crate::protocol::{self, Command};

/// What a line may change besides the room: presence notices, the save queue, history, the
/// other cluster nodes; and the loop's figures, for `/stats`.
pub struct Services<'a> {
    pub presence: &'a mut Presence,
    pub persister: Option<&'a Persister>,
    pub history: &'a mut History,
    pub stats: &'a Stats,
    /// `None` without `--cluster`.
    pub roster: Option<&'a Roster>,
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
    conn.joined_millis = bson::DateTime::now().timestamp_millis();
    let name = conn.name.clone();
    if let Some(roster) = services.roster {
        roster.local_joined(conn.id(), &name, conn.joined_millis);
    }
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
        roster,
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
        Command::Chat(message) => say(room, (persister, roster), slot, message, false),
        Command::Me(action) => say(room, (persister, roster), slot, action, true),
        Command::History(count) => history.command(room, persister, slot, count, now),
        Command::Nick(name) => nick(room, (presence, roster), client, name, now),
        Command::Who => {
            let who = match roster {
                Some(roster) => roster.who(room),
                None => protocol::who(room.names()),
            };
            room.notice(slot, &who);
        }
        Command::Stats => {
            // The asker's own chat gathered this turn is counted as delivered first.
            room.send_gathered_chat();
            let mut figures = stats.line(room, persister, now);
            if let Some(roster) = roster {
                figures.push_str(&roster.stats());
            }
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

/// Reports messages that could not be stored to their senders, if still connected;
/// `clustered`: the line also says the other servers did not get it.
pub fn not_saved(room: &mut Room, failures: Vec<SaveFailure>, clustered: bool) {
    for failure in failures {
        if room.find(failure.sender).is_some() {
            let reason = unsaved_reason(&failure.reason, clustered);
            let text = protocol::not_saved(&failure.content, &reason);
            room.error(failure.sender.slot, &text);
        }
    }
}

/// With `--cluster`, a message that was not stored reached no other server (it is not in the
/// change stream), unless it may still have been stored.
fn unsaved_reason(reason: &str, clustered: bool) -> String {
    match clustered {
        false => reason.to_string(),
        true if reason.ends_with(MAY_STILL_BE_SAVED) => {
            format!("{reason}, and then reach other servers")
        }
        true => format!("{reason}; {}", protocol::NOT_SENT_TO_OTHERS),
    }
}

/// A chat line (`<NAME> TEXT`) or, with `action`, a `/me` (`* NAME ACTION`) to the others, and
/// to the save queue (and through the database to the other cluster nodes).
fn say(
    room: &mut Room,
    (persister, roster): (Option<&Persister>, Option<&Roster>),
    slot: usize,
    text: &str,
    action: bool,
) {
    let Some(conn) = room.get(slot) else { return };
    let (name, addr) = (conn.name.clone(), conn.addr());
    if action {
        room.action(slot, &name, text);
    } else {
        room.chat(slot, &name, text);
    }
    let Some(persister) = persister else { return };
    let Some(sender) = room.client_ref(slot) else {
        return;
    };
    // Encoded once, here: the persistence thread and the driver pass these bytes on as they are.
    let mut record = Record::new(sender, &name, addr, text, bson::DateTime::now());
    if action {
        record = record.action();
    }
    if let Some(roster) = roster {
        record = record.node(roster.node_id());
    }
    if let Err(SubmitError { content, reason }) = persister.submit(record) {
        let reason = unsaved_reason(reason, roster.is_some());
        room.error(slot, &protocol::not_saved(&content, &reason));
    }
}

/// `/nick NAME`: checked here against this node's clients and the other nodes' known ones;
/// with `--cluster` the database settles it (a unique index) and the rename happens when
/// `nick_claimed` hears back.
fn nick(
    room: &mut Room,
    (presence, roster): (&mut Presence, Option<&Roster>),
    client: ClientRef,
    name: &str,
    now: Instant,
) {
    let slot = client.slot;
    if protocol::validate_nick(name).is_err() {
        return room.error(slot, &protocol::invalid_nick());
    }
    if room.name_taken(name, slot) || roster.is_some_and(|roster| roster.name_taken(name)) {
        return room.error(slot, &protocol::nick_taken(name));
    }
    if room.get(slot).is_none_or(|conn| conn.name == name) {
        return;
    }
    match roster {
        Some(roster) => roster.claim(client, name),
        None => rename(room, presence, client, name, now),
    }
}

/// The database's answer to a `/nick` claim (`--cluster`).
pub fn nick_claimed(
    room: &mut Room,
    presence: &mut Presence,
    (client, name): (ClientRef, &str),
    result: Result<(), ClaimRefused>,
    now: Instant,
) {
    if room.find(client).is_none() {
        return;
    }
    match result {
        Ok(()) => rename(room, presence, client, name, now),
        Err(ClaimRefused::Taken) => room.error(client.slot, &protocol::nick_taken(name)),
        Err(ClaimRefused::Unsettled(reason)) => {
            room.error(client.slot, &protocol::nick_unsettled(&reason))
        }
    }
}

/// Renames the client; everyone is told (its join, if it was still waiting, went out first).
fn rename(room: &mut Room, presence: &mut Presence, client: ClientRef, name: &str, now: Instant) {
    let Some(conn) = room.find_mut(client) else {
        return;
    };
    if conn.name == name {
        return;
    }
    let old = std::mem::replace(&mut conn.name, name.to_string());
    presence.before_name_taken(room, name, now);
    room.notice_all(None, &protocol::renamed(&old, name));
}

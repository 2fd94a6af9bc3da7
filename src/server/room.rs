//! The room: every connection, and delivering lines to one, some or all of them.
//!
//! A line is encoded once into a scratch buffer and its bytes are copied into each recipient's
//! output buffer; nothing is written to sockets here. Chat lines from one sender are gathered
//! and copied to everyone else in one piece (until another line is sent, or the loop calls
//! `send_gathered_chat` after each client's input), so a burst of lines costs one copy per
//! recipient, not one per line per recipient. Recipients are put on a flush list and the event
//! loop writes each one once per turn.

use std::net::SocketAddr;
use std::time::Instant;

use mio::{Registry, Token};

use super::connection::{CloseReason, Connection, FlushOutcome, OutputTotal};
use super::per_address::PerAddress;
use super::transport::{Transport, WireBytes};
use crate::config::ClientLimits;
use crate::persist::ClientRef;
use crate::protocol;

/// Tokens below this are the listeners and the waker; client slot `n` has token `n + FIRST`.
pub const FIRST_CLIENT_TOKEN: usize = 3;

/// All connections, indexed by slot.
#[derive(Debug)]
pub struct Room {
    slots: Vec<Option<Connection>>,
    /// Clients that have joined the chat so far (see `take_join_order`).
    joins_so_far: u64,
    /// Empty slots, reused so the table stays as small as the peak number of clients.
    free: Vec<usize>,
    next_id: u64,
    /// Slots with output queued since the last flush.
    to_flush: Vec<usize>,
    /// Slots marked closing since the last reap.
    to_reap: Vec<usize>,
    /// Where a line is encoded once before being copied to recipients.
    line: Vec<u8>,
    /// Chat lines from `chat_from`, encoded, not yet copied to the others.
    gathered_chat: Vec<u8>,
    chat_from: Option<usize>,
    /// Chat lines in `gathered_chat`: each is one delivery per recipient.
    gathered_lines: u64,
    limits: ClientLimits,
    /// Output pending over all connections, and its bound (`--max-output-total`).
    output_total: OutputTotal,
    max_output_total: usize,
    traffic: Traffic,
    /// Bytes over the network of connections already gone.
    wire_of_closed: WireBytes,
    per_address: PerAddress,
}

/// What went through the room since the start, for `/stats`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Traffic {
    /// Chat messages and actions accepted from clients.
    pub msgs_in: u64,
    /// Chat messages and actions queued to recipients, one per recipient.
    pub deliveries_out: u64,
    /// Bytes over the network (TLS records, not the text inside), every connection.
    pub wire: WireBytes,
}

/// Gathered chat is sent on once it reaches this size, so one copy stays cache-friendly and the
/// output limit is judged on pieces of a sensible size.
const GATHER_AT_MOST: usize = 16 * 1024;

impl Room {
    pub fn new(limits: ClientLimits, max_output_total: usize, per_address: PerAddress) -> Self {
        Room {
            slots: Vec::new(),
            joins_so_far: 0,
            free: Vec::new(),
            next_id: 1,
            to_flush: Vec::new(),
            to_reap: Vec::new(),
            line: Vec::new(),
            gathered_chat: Vec::new(),
            chat_from: None,
            gathered_lines: 0,
            limits,
            output_total: OutputTotal::default(),
            max_output_total,
            traffic: Traffic::default(),
            wire_of_closed: WireBytes::default(),
            per_address,
        }
    }

    /// Adds a new client and registers its socket. Returns its slot.
    pub fn add(
        &mut self,
        transport: Transport,
        addr: SocketAddr,
        registry: &Registry,
        now: Instant,
    ) -> std::io::Result<usize> {
        let slot = self.free.pop().unwrap_or(self.slots.len());
        let token = Token(slot + FIRST_CLIENT_TOKEN);
        let id = self.next_id;
        let total = self.output_total.clone();
        let conn = Connection::new(
            transport,
            addr,
            (token, id),
            registry,
            &self.limits,
            total,
            now,
        );
        let conn = match conn {
            Ok(conn) => conn,
            Err(err) => {
                if slot < self.slots.len() {
                    self.free.push(slot);
                }
                return Err(err);
            }
        };
        self.next_id += 1;
        self.per_address.connected(addr.ip());
        if slot == self.slots.len() {
            self.slots.push(Some(conn));
        } else {
            self.slots[slot] = Some(conn);
        }
        Ok(slot)
    }

    /// `--max-per-ip`, if `ip` already holds that many connections.
    pub fn address_full(&self, ip: std::net::IpAddr) -> Option<usize> {
        self.per_address.full(ip)
    }

    pub fn limits(&self) -> &ClientLimits {
        &self.limits
    }

    /// The slot of a client token, if it is one.
    pub fn slot_of(token: Token) -> Option<usize> {
        token.0.checked_sub(FIRST_CLIENT_TOKEN)
    }

    pub fn get(&self, slot: usize) -> Option<&Connection> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Connection> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    /// The connection `client` names, if it is still connected.
    pub fn find(&self, client: ClientRef) -> Option<&Connection> {
        self.get(client.slot).filter(|conn| conn.id() == client.id)
    }

    pub fn find_mut(&mut self, client: ClientRef) -> Option<&mut Connection> {
        self.get_mut(client.slot)
            .filter(|conn| conn.id() == client.id)
    }

    /// How `slot` is named in persistence reports.
    pub fn client_ref(&self, slot: usize) -> Option<ClientRef> {
        self.get(slot).map(|conn| ClientRef {
            slot,
            id: conn.id(),
        })
    }

    /// Connected clients, closing ones included.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Places a client in the order of joining the chat: every client in the chat now joined
    /// before it. A TLS client joins after its handshake, so this is not the order of
    /// connecting (connection ids).
    pub fn take_join_order(&mut self) -> u64 {
        self.joins_so_far += 1;
        self.joins_so_far
    }

    /// The place the next client to join will get: every client in the chat has a lower one.
    pub fn next_join_order(&self) -> u64 {
        self.joins_so_far + 1
    }

    /// Slot, id and join order of every open connection, for lines that differ per recipient.
    pub fn open_clients(&self) -> Vec<(ClientRef, u64)> {
        self.open_connections()
            .map(|(slot, conn)| {
                let client = ClientRef {
                    slot,
                    id: conn.id(),
                };
                (client, conn.join_order)
            })
            .collect()
    }

    /// Names of open connections.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> {
        let names: Vec<&str> = self
            .open_connections()
            .map(|(_, conn)| conn.name.as_str())
            .collect();
        names.into_iter()
    }

    /// Name and join time (wall clock, milliseconds) of every open connection, for `/who`
    /// across cluster nodes.
    pub fn names_and_join_times(&self) -> impl Iterator<Item = (&str, i64)> {
        self.open_connections()
            .map(|(_, conn)| (conn.name.as_str(), conn.joined_millis))
    }

    /// True if an open connection other than `except` is called `name`.
    pub fn name_taken(&self, name: &str, except: usize) -> bool {
        self.open_connections()
            .any(|(slot, conn)| slot != except && conn.name.eq_ignore_ascii_case(name))
    }

    /// `<NAME> TEXT` to every open connection except the sender, gathered with the sender's
    /// next lines (see the module docs).
    pub fn chat(&mut self, from: usize, name: &str, text: &str) {
        if self.chat_from != Some(from) {
            self.send_gathered_chat();
        }
        protocol::write_chat(&mut self.gathered_chat, name, text);
        self.gathered_lines += 1;
        self.traffic.msgs_in += 1;
        self.chat_from = Some(from);
        if self.gathered_chat.len() >= GATHER_AT_MOST {
            self.send_gathered_chat();
        }
    }

    /// Copies the gathered chat lines to everyone but their sender. Every other kind of line
    /// calls this first, so all recipients see lines in the order they were sent.
    pub fn send_gathered_chat(&mut self) {
        let Some(from) = self.chat_from.take() else {
            return;
        };
        std::mem::swap(&mut self.line, &mut self.gathered_chat);
        let recipients = self.fan_out(Some(from)) as u64;
        std::mem::swap(&mut self.line, &mut self.gathered_chat);
        self.gathered_chat.clear();
        self.traffic.deliveries_out += recipients * std::mem::take(&mut self.gathered_lines);
    }

    /// `/me`: `* NAME ACTION` to every open connection except the sender; a message like chat.
    pub fn action(&mut self, from: usize, name: &str, action: &str) {
        self.traffic.msgs_in += 1;
        let recipients = self.notice_all(Some(from), &protocol::action(name, action));
        self.traffic.deliveries_out += recipients as u64;
    }

    /// A message of another cluster node: `<NAME> TEXT` (or `* NAME ACTION`) to every open
    /// connection; counted as deliveries, not as messages in.
    pub fn remote_chat(&mut self, name: &str, text: &str, action: bool) {
        self.send_gathered_chat();
        self.line.clear();
        if action {
            protocol::write_notice(&mut self.line, &protocol::action(name, text));
        } else {
            protocol::write_chat(&mut self.line, name, text);
        }
        let recipients = self.fan_out(None);
        self.traffic.deliveries_out += recipients as u64;
    }

    /// Chat counts so far, and bytes over the network of every connection, gone or here.
    pub fn traffic(&self) -> Traffic {
        let mut traffic = self.traffic;
        traffic.wire = self.wire_of_closed;
        for conn in self.slots.iter().flatten() {
            traffic.wire.add(conn.wire_bytes());
        }
        traffic
    }

    /// `* TEXT` to every open connection except `except`; returns how many it went to.
    pub fn notice_all(&mut self, except: Option<usize>, text: &str) -> usize {
        self.send_gathered_chat();
        self.line.clear();
        protocol::write_notice(&mut self.line, text);
        self.fan_out(except)
    }

    /// `* TEXT` to one connection.
    pub fn notice(&mut self, slot: usize, text: &str) {
        self.send_gathered_chat();
        self.line.clear();
        protocol::write_notice(&mut self.line, text);
        self.deliver(slot);
    }

    /// `! TEXT` to one connection.
    pub fn error(&mut self, slot: usize, text: &str) {
        self.send_gathered_chat();
        self.line.clear();
        protocol::write_error(&mut self.line, text);
        self.deliver(slot);
    }

    /// `/quit` or end of input: `goodbye` (if any) goes out after every history answer the
    /// client still waits for, and the connection closes after that (see
    /// `Connection::leave_after_history`); at once if none is due.
    pub fn leave(&mut self, slot: usize, reason: CloseReason, goodbye: Option<&str>) {
        let waits = self
            .get_mut(slot)
            .is_some_and(|conn| conn.leave_after_history(reason));
        if let Some(text) = goodbye {
            self.notice(slot, text);
        }
        if !waits {
            self.close(slot, reason);
        }
    }

    /// Marks `slot` for closing after this turn.
    pub fn close(&mut self, slot: usize, reason: CloseReason) {
        if let Some(conn) = self.get_mut(slot) {
            if conn.close(reason) {
                self.to_reap.push(slot);
            }
        }
    }

    /// True if connections are waiting to be reaped.
    pub fn has_closing(&self) -> bool {
        !self.to_reap.is_empty()
    }

    /// True if output was queued since the last `take_flush_list`.
    pub fn has_output_to_flush(&self) -> bool {
        !self.to_flush.is_empty() || self.chat_from.is_some()
    }

    /// Hands over the slots that have output queued, clearing their scheduled flag.
    pub fn take_flush_list(&mut self, into: &mut Vec<usize>) {
        self.send_gathered_chat();
        into.append(&mut self.to_flush);
        for &slot in into.iter() {
            if let Some(conn) = self.get_mut(slot) {
                conn.flush_scheduled = false;
            }
        }
    }

    /// The slots marked closing since the last call. They stay in the room (out of every
    /// delivery) until `remove`d, so a closing client can still be given its last output.
    pub fn take_to_reap(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.to_reap)
    }

    /// Takes a connection out; its slot becomes free.
    pub fn remove(&mut self, slot: usize) -> Option<Connection> {
        let conn = self.slots.get_mut(slot).and_then(Option::take)?;
        self.free.push(slot);
        self.wire_of_closed.add(conn.wire_bytes());
        self.per_address.disconnected(conn.addr().ip());
        Some(conn)
    }

    /// Frees the buffers of connections that were quiet since the last sweep. Returns the bytes
    /// freed.
    pub fn shrink_idle(&mut self) -> usize {
        let mut freed = 0;
        for conn in self.slots.iter_mut().flatten() {
            freed += conn.shrink_if_idle();
        }
        for buffer in [&mut self.line, &mut self.gathered_chat] {
            if buffer.capacity() > GATHER_AT_MOST + self.limits.max_line * 2 + 64 {
                freed += buffer.capacity();
                *buffer = Vec::new();
            }
        }
        freed
    }

    /// True if any connection, closing ones still writing their last output included, has
    /// output not yet written.
    pub fn has_pending_output(&self) -> bool {
        self.slots.iter().flatten().any(Connection::needs_flush)
    }

    /// Every open slot, for shutdown notices.
    pub fn slots_in_use(&self) -> Vec<usize> {
        self.open_connections().map(|(slot, _)| slot).collect()
    }

    /// Every occupied slot, closing connections included, for the final close.
    pub fn occupied_slots(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&slot| self.slots[slot].is_some())
            .collect()
    }

    fn open_connections(&self) -> impl Iterator<Item = (usize, &Connection)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, conn)| conn.as_ref().map(|conn| (slot, conn)))
            .filter(|(_, conn)| conn.joined && conn.closing().is_none())
    }

    /// Copies the encoded line to every open connection except `except`; returns how many it
    /// was queued for.
    fn fan_out(&mut self, except: Option<usize>) -> usize {
        let mut delivered = 0;
        for slot in 0..self.slots.len() {
            if Some(slot) != except && self.deliver(slot) {
                delivered += 1;
            }
        }
        delivered
    }

    /// Puts the answer to history request `ticket` (encoded `lines`) in place for `client`,
    /// with the output that waited for it, and files the client for flushing (or reaping, if
    /// this took it over its output limit). False if the client is gone or no longer waits for
    /// that answer.
    pub fn history_arrived(&mut self, client: ClientRef, ticket: u64, lines: &[u8]) -> bool {
        // Chat gathered before this moment goes first, to this client as to everyone.
        self.send_gathered_chat();
        let max_output = self.limits.max_output;
        let Some(conn) = self.find_mut(client) else {
            return false;
        };
        match conn.history_arrived(ticket, lines, max_output) {
            None => return false,
            Some(false) => self.to_reap.push(client.slot),
            Some(true) => {
                if let Some(reason) = conn.ready_to_leave() {
                    self.close(client.slot, reason);
                }
                self.schedule_flush(client.slot);
            }
        }
        true
    }

    /// Files `slot` for this turn's flush, once.
    pub fn schedule_flush(&mut self, slot: usize) {
        if let Some(conn) = self.slots.get_mut(slot).and_then(Option::as_mut) {
            if !conn.flush_scheduled {
                conn.flush_scheduled = true;
                self.to_flush.push(slot);
            }
        }
    }

    /// Keeps the output of all clients within `--max-output-total` before `extra` bytes go to
    /// `slot`: while they would not fit, the client with the most pending output is given what
    /// its socket takes now (output is written once per turn, so most of what is pending may
    /// only have been queued this turn), and only if it takes nothing is it cut off as a slow
    /// consumer, its output dropped. False if that was `slot` itself.
    fn make_room(&mut self, slot: usize, extra: usize) -> bool {
        while self.output_total.get() + extra > self.max_output_total {
            let Some(largest) = self.largest_backlog() else {
                return true; // nothing pending anywhere: one line over the bound goes out
            };
            let Some(conn) = self.get_mut(largest) else {
                return true;
            };
            let before = conn.pending_output();
            let reason = match conn.flush() {
                FlushOutcome::Failed(reason) => reason,
                _ if conn.pending_output() < before => continue,
                _ => CloseReason::LargestBacklog,
            };
            conn.discard_output();
            if conn.close(reason) {
                self.to_reap.push(largest);
            }
            if largest == slot {
                return false;
            }
        }
        true
    }

    /// The connection with the most output pending, closing ones still writing included.
    fn largest_backlog(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, conn)| Some((slot, conn.as_ref()?.pending_output())))
            .filter(|&(_, pending)| pending > 0)
            .max_by_key(|&(_, pending)| pending)
            .map(|(slot, _)| slot)
    }

    /// Queues the encoded line to one open connection and files it for flushing, or for
    /// reaping when this line takes it over the output limit. True if it was queued.
    fn deliver(&mut self, slot: usize) -> bool {
        let Some(conn) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        if !conn.joined || conn.closing().is_some() {
            return false;
        }
        if !self.make_room(slot, self.line.len()) {
            return false;
        }
        let Some(conn) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        if !conn.queue(&self.line, self.limits.max_output) {
            self.to_reap.push(slot);
            return false;
        }
        if !conn.flush_scheduled {
            conn.flush_scheduled = true;
            self.to_flush.push(slot);
        }
        true
    }
}

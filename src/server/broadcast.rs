//! The room: every connection, and delivering lines to one, some or all of them.
//!
//! A line is encoded once into a scratch buffer and its bytes are copied into each recipient's
//! output buffer; nothing is written to sockets here. Recipients are put on a flush list and the
//! event loop writes each one once per turn, so a burst of messages costs one write per
//! recipient, not one per message per recipient.

use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Registry, Token};

use super::connection::{CloseReason, Connection};
use super::flood::Verdict;
use super::inbox::ClientRef;
use crate::config::ClientLimits;
use crate::protocol;

/// Tokens below this are the listener and the waker; client slot `n` has token `n + FIRST`.
pub const FIRST_CLIENT_TOKEN: usize = 2;

/// All connections, indexed by slot.
#[derive(Debug)]
pub struct Room {
    slots: Vec<Option<Connection>>,
    /// Empty slots, reused so the table stays as small as the peak number of clients.
    free: Vec<usize>,
    next_id: u64,
    /// Slots with output queued since the last flush.
    to_flush: Vec<usize>,
    /// Slots marked closing since the last reap.
    to_reap: Vec<usize>,
    /// Where a line is encoded once before being copied to recipients.
    line: Vec<u8>,
    limits: ClientLimits,
}

impl Room {
    pub fn new(limits: ClientLimits) -> Self {
        Room {
            slots: Vec::new(),
            free: Vec::new(),
            next_id: 1,
            to_flush: Vec::new(),
            to_reap: Vec::new(),
            line: Vec::new(),
            limits,
        }
    }

    /// Adds a new client and registers its socket. Returns its slot.
    pub fn add(
        &mut self,
        socket: TcpStream,
        addr: SocketAddr,
        registry: &Registry,
        now: Instant,
    ) -> std::io::Result<usize> {
        let slot = self.free.pop().unwrap_or(self.slots.len());
        let token = Token(slot + FIRST_CLIENT_TOKEN);
        let id = self.next_id;
        let conn = match Connection::new(socket, addr, token, id, registry, &self.limits, now) {
            Ok(conn) => conn,
            Err(err) => {
                if slot < self.slots.len() {
                    self.free.push(slot);
                }
                return Err(err);
            }
        };
        self.next_id += 1;
        if slot == self.slots.len() {
            self.slots.push(Some(conn));
        } else {
            self.slots[slot] = Some(conn);
        }
        Ok(slot)
    }

    pub fn limits(&self) -> &ClientLimits {
        &self.limits
    }

    /// Takes a flood-control token for a line from `slot`.
    pub fn take_flood_token(&mut self, slot: usize, now: Instant) -> Verdict {
        let Some(limit) = self.limits.flood else {
            return Verdict::Allowed;
        };
        match self.get_mut(slot) {
            Some(conn) => conn.take_flood_token(limit, now),
            None => Verdict::Dropped { warn: false },
        }
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

    /// Names of open connections.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> {
        let names: Vec<&str> = self
            .open_connections()
            .map(|(_, conn)| conn.name.as_str())
            .collect();
        names.into_iter()
    }

    /// True if an open connection other than `except` is called `name`.
    pub fn name_taken(&self, name: &str, except: usize) -> bool {
        self.open_connections()
            .any(|(slot, conn)| slot != except && conn.name.eq_ignore_ascii_case(name))
    }

    /// `<NAME> TEXT` to every open connection except the sender.
    pub fn chat(&mut self, from: usize, name: &str, text: &str) {
        self.line.clear();
        protocol::write_chat(&mut self.line, name, text);
        self.fan_out(Some(from));
    }

    /// `* TEXT` to every open connection except `except`.
    pub fn notice_all(&mut self, except: Option<usize>, text: &str) {
        self.line.clear();
        protocol::write_notice(&mut self.line, text);
        self.fan_out(except);
    }

    /// `* TEXT` to one connection.
    pub fn notice(&mut self, slot: usize, text: &str) {
        self.line.clear();
        protocol::write_notice(&mut self.line, text);
        self.deliver(slot);
    }

    /// `! TEXT` to one connection.
    pub fn error(&mut self, slot: usize, text: &str) {
        self.line.clear();
        protocol::write_error(&mut self.line, text);
        self.deliver(slot);
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

    /// Hands over the slots that have output queued, clearing their scheduled flag.
    pub fn take_flush_list(&mut self, into: &mut Vec<usize>) {
        into.append(&mut self.to_flush);
        for &slot in into.iter() {
            if let Some(conn) = self.get_mut(slot) {
                conn.flush_scheduled = false;
            }
        }
    }

    /// Removes the connections marked closing and returns them, so the caller can say goodbye
    /// and log. Their slots become free.
    pub fn take_closed(&mut self) -> Vec<Connection> {
        let mut closed = Vec::with_capacity(self.to_reap.len());
        for slot in std::mem::take(&mut self.to_reap) {
            if let Some(conn) = self.slots.get_mut(slot).and_then(Option::take) {
                self.free.push(slot);
                closed.push(conn);
            }
        }
        closed
    }

    /// Frees the buffers of connections that were quiet since the last sweep. Returns the bytes
    /// freed.
    pub fn shrink_idle(&mut self) -> usize {
        let mut freed = 0;
        for conn in self.slots.iter_mut().flatten() {
            freed += conn.shrink_if_idle();
        }
        if self.line.capacity() > self.limits.max_line * 2 + 64 {
            freed += self.line.capacity();
            self.line = Vec::new();
        }
        freed
    }

    /// True if any open connection has output not yet written.
    pub fn has_pending_output(&self) -> bool {
        self.open_connections()
            .any(|(_, conn)| conn.pending_output() > 0)
    }

    /// Every slot still in use, for shutdown.
    pub fn slots_in_use(&self) -> Vec<usize> {
        self.open_connections().map(|(slot, _)| slot).collect()
    }

    fn open_connections(&self) -> impl Iterator<Item = (usize, &Connection)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, conn)| conn.as_ref().map(|conn| (slot, conn)))
            .filter(|(_, conn)| conn.closing().is_none())
    }

    /// Copies the encoded line to every open connection except `except`.
    fn fan_out(&mut self, except: Option<usize>) {
        for slot in 0..self.slots.len() {
            if Some(slot) != except {
                self.deliver(slot);
            }
        }
    }

    /// Queues the encoded line to one open connection and files it for flushing, or for
    /// reaping when this line takes it over the output limit.
    fn deliver(&mut self, slot: usize) {
        let Some(conn) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if conn.closing().is_some() {
            return;
        }
        if !conn.queue(&self.line, self.limits.max_output) {
            self.to_reap.push(slot);
        } else if !conn.flush_scheduled {
            conn.flush_scheduled = true;
            self.to_flush.push(slot);
        }
    }
}

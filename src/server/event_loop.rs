//! The event loop: one thread, one `mio::Poll`, the listener and every client socket.
//!
//! Each turn: wait for readiness, accept new clients, read and handle what clients sent,
//! take in what other threads sent (inbox), reap closed connections, then write each
//! connection's pending output once. Readiness is edge-triggered, so every socket operation runs
//! until `WouldBlock`; a client that still has input after its per-turn budget is read again
//! next turn without waiting, so one flooding client cannot starve the rest.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use super::chat;
use super::connection::{CloseReason, FlushOutcome, Input, InputBatch, ReadOutcome};
use super::heap;
use super::inbox::{Inbox, LoopInput};
use super::room::Room;
use crate::config::ClientLimits;
use crate::persist::{ClientRef, Persister};
use crate::protocol;
use crate::telnet::HEADROOM;
use crate::{error, info, warn};

pub const LISTENER: Token = Token(0);
pub const WAKER: Token = Token(1);

/// Size of the one read buffer all connections share, in bytes.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read from one connection per turn before others get their turn. One chunk: short lines
/// grow several times over on their way out (`a` becomes `<127.0.0.1:50312> a\r\n`), so this
/// also bounds what one sender adds to every recipient's output in a turn (about 0.7 MB).
const READ_BUDGET: usize = READ_CHUNK;
/// Connections accepted per turn before the clients already in get their turn: a connection
/// flood (refused ones included) cannot starve them.
const ACCEPT_BUDGET: usize = 256;
/// Readiness events taken per poll.
const EVENTS_CAPACITY: usize = 1024;
/// How soon to try accepting again after an accept error such as running out of descriptors.
/// The listener is edge-triggered: connections already waiting would otherwise sit in the
/// backlog until yet another one arrives.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How often idle connections give back their buffers.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Freed buffer bytes in one sweep that make returning free heap memory to the OS worthwhile.
const TRIM_AFTER_FREEING: usize = 256 * 1024;
/// Connections closed since the last sweep that make it worthwhile: each leaves its buffers
/// and connection state in the heap.
const TRIM_AFTER_CLOSING: usize = 64;
/// How often a stopping server looks at its inbox while waiting for slow clients.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);

/// The state one thread owns while serving.
pub struct EventLoop {
    pub(super) poll: Poll,
    pub(super) listener: TcpListener,
    pub(super) inbox: Inbox,
    pub(super) persister: Option<Persister>,
    pub(super) room: Room,
    max_clients: usize,
    shutdown_timeout: Duration,
    scratch: Vec<u8>,
    batch: InputBatch,
    /// Clients whose read budget ran out; read again next turn.
    read_again: Vec<ClientRef>,
    flush_list: Vec<usize>,
    last_sweep: Instant,
    closed_since_sweep: usize,
    /// The last accept failed (e.g. EMFILE); retry every turn and at least every ACCEPT_RETRY.
    accept_failing: bool,
    /// The accept budget ran out with connections possibly waiting: accept again next turn.
    accept_again: bool,
    /// At `max_clients`: new clients are being refused (logged once per episode).
    refusing: bool,
    /// When this turn's events arrived: the time flood control charges lines at.
    now: Instant,
    running: bool,
}

impl EventLoop {
    /// Puts the parts together; the listener is registered here.
    pub(super) fn new(
        poll: Poll,
        mut listener: TcpListener,
        inbox: Inbox,
        persister: Option<Persister>,
        limits: ClientLimits,
        max_clients: usize,
        shutdown_timeout: Duration,
    ) -> io::Result<Self> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(EventLoop {
            poll,
            listener,
            inbox,
            persister,
            room: Room::new(limits),
            max_clients,
            shutdown_timeout,
            scratch: vec![0; HEADROOM + READ_CHUNK],
            batch: InputBatch::default(),
            read_again: Vec::new(),
            flush_list: Vec::new(),
            last_sweep: Instant::now(),
            closed_since_sweep: 0,
            accept_failing: false,
            accept_again: false,
            refusing: false,
            now: Instant::now(),
            running: true,
        })
    }

    /// Serves until a shutdown request arrives.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        while self.running {
            let timeout = if !self.read_again.is_empty() || self.accept_again {
                Duration::ZERO
            } else if self.accept_failing {
                ACCEPT_RETRY
            } else {
                SWEEP_INTERVAL
            };
            if let Err(err) = self.poll.poll(&mut events, Some(timeout)) {
                if err.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            self.now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    WAKER => {} // drained below, every turn
                    token => self.client_ready(token, event.is_writable()),
                }
            }
            self.drain_inbox();
            if self.accept_failing || std::mem::take(&mut self.accept_again) {
                // Connections closed since may have freed descriptors, or the budget ran out.
                // Before `end_turn`, so the welcome lines of clients accepted here are written
                // this turn.
                self.accept_all();
            }
            self.read_again_pending();
            self.end_turn();
        }
        self.shut_down();
        Ok(())
    }

    /// Reaps closed connections, writes pending output, and now and then frees idle buffers.
    fn end_turn(&mut self) {
        // Reaping queues `left` notices and flushing can find dead sockets: repeat until both
        // settle. Each extra round removes at least one connection, so this ends.
        loop {
            self.reap_closed();
            self.flush_pending();
            if !self.room.has_closing() {
                break;
            }
        }
        if self.last_sweep.elapsed() >= SWEEP_INTERVAL {
            self.batch.shrink_if_large();
            let freed = self.room.shrink_idle();
            let closed = std::mem::take(&mut self.closed_since_sweep);
            if freed >= TRIM_AFTER_FREEING || closed >= TRIM_AFTER_CLOSING {
                heap::give_back_free_memory();
            }
            self.last_sweep = Instant::now();
        }
    }

    fn accept_all(&mut self) {
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.accept() {
                Ok((socket, addr)) => self.admit(socket, addr),
                Err(err) if err.kind() == ErrorKind::WouldBlock => {
                    if std::mem::take(&mut self.accept_failing) {
                        info!("accepting connections again");
                    }
                    return;
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    // E.g. out of file descriptors. Waiting clients stay in the backlog; retry
                    // soon, logging once rather than on every retry.
                    if !self.accept_failing {
                        error!("accept failed: {err}; retrying every {ACCEPT_RETRY:?}");
                        self.accept_failing = true;
                    }
                    return;
                }
            }
        }
        self.accept_again = true;
    }

    /// Adds a new client to the room, or refuses it when the server is full.
    fn admit(&mut self, socket: TcpStream, addr: SocketAddr) {
        if self.room.len() >= self.max_clients {
            return self.refuse(socket);
        }
        if std::mem::take(&mut self.refusing) {
            info!("below --max-clients again: accepting new clients");
        }
        match self.room.add(socket, addr, self.poll.registry(), self.now) {
            Ok(slot) => {
                info!("client {addr} connected ({} online)", self.room.len());
                chat::joined(&mut self.room, slot);
            }
            Err(err) => warn!("could not set up client {addr}: {err}"),
        }
    }

    /// Tells a client over `--max-clients` that the server is full and closes it, without ever
    /// registering it. One short line always fits in a new socket's send buffer.
    fn refuse(&mut self, mut socket: TcpStream) {
        if !self.refusing {
            warn!(
                "server full ({} clients, --max-clients): refusing new clients",
                self.max_clients
            );
            self.refusing = true;
        }
        let mut line = Vec::new();
        protocol::write_error(&mut line, &protocol::server_full(self.max_clients));
        let _ = socket.write(&line);
        // Whatever the client already sent would turn the close into a reset that can destroy
        // the line above before the client reads it.
        let _ = socket.read(&mut self.scratch);
        let _ = socket.shutdown(std::net::Shutdown::Write);
    }

    fn drain_inbox(&mut self) {
        while let Some(input) = self.inbox.next() {
            match input {
                LoopInput::NotSaved(failures) => chat::not_saved(&mut self.room, failures),
                LoopInput::Shutdown => self.running = false,
            }
        }
    }

    fn client_ready(&mut self, token: Token, writable: bool) {
        let Some(slot) = Room::slot_of(token) else {
            return;
        };
        if writable {
            self.write_ready(slot);
        }
        // Readiness flags are hints: always try to read; `WouldBlock` costs one syscall.
        self.read_from(slot);
    }

    /// Reads what the client sent, within the budget, and acts on each line.
    fn read_from(&mut self, slot: usize) {
        let Some(conn) = self.room.get_mut(slot) else {
            return;
        };
        if conn.closing().is_some() {
            return;
        }
        let client = ClientRef {
            slot,
            id: conn.id(),
        };
        self.batch.clear();
        let outcome = conn.read(&mut self.scratch, READ_BUDGET, &mut self.batch);
        for item in self.batch.items() {
            if self
                .room
                .get(slot)
                .is_none_or(|conn| conn.closing().is_some())
            {
                break;
            }
            match item {
                Input::Line(range) => chat::line(
                    &mut self.room,
                    self.persister.as_ref(),
                    slot,
                    self.batch.line(range),
                    self.now,
                ),
                Input::TooLong => chat::too_long(&mut self.room, slot),
            }
        }
        self.room.send_gathered_chat();
        match outcome {
            ReadOutcome::Drained => {}
            ReadOutcome::BudgetSpent => self.read_again.push(client),
            ReadOutcome::Closed(reason) => self.room.close(slot, reason),
        }
    }

    fn read_again_pending(&mut self) {
        for client in std::mem::take(&mut self.read_again) {
            if self.room.find(client).is_some() {
                self.read_from(client.slot);
            }
        }
    }

    /// The socket can take more output again.
    fn write_ready(&mut self, slot: usize) {
        if let Some(conn) = self.room.get_mut(slot) {
            if conn.closing().is_none() && conn.pending_output() > 0 {
                self.flush_one(slot);
            }
        }
    }

    /// Writes each connection that got output this turn: one write per connection per turn,
    /// however many lines it received.
    fn flush_pending(&mut self) {
        let mut list = std::mem::take(&mut self.flush_list);
        self.room.take_flush_list(&mut list);
        for &slot in &list {
            self.flush_one(slot);
        }
        list.clear();
        self.flush_list = list;
    }

    fn flush_one(&mut self, slot: usize) {
        let registry = self.poll.registry();
        let Some(conn) = self.room.get_mut(slot) else {
            return;
        };
        if conn.closing().is_some() {
            return;
        }
        let outcome = conn.flush();
        let interest = match outcome {
            FlushOutcome::Done => conn.set_wants_writable(registry, false),
            FlushOutcome::Blocked => conn.set_wants_writable(registry, true),
            FlushOutcome::Failed(reason) => return self.room.close(slot, reason),
        };
        if let Err(err) = interest {
            self.room.close(slot, CloseReason::WriteError(err.kind()));
        }
    }

    /// Removes connections marked closing, giving well-behaved ones their last output first,
    /// and tells the others they left.
    fn reap_closed(&mut self) {
        for mut conn in self.room.take_closed() {
            self.closed_since_sweep += 1;
            let reason = conn.closing().unwrap_or(CloseReason::Shutdown);
            if reason.flushes_first() && conn.flush() == FlushOutcome::Done {
                conn.say_goodbye();
            }
            conn.deregister(self.poll.registry());
            info!(
                "client {} ({}) disconnected: {}",
                conn.addr(),
                conn.name,
                reason.describe()
            );
            if self.running {
                chat::left(&mut self.room, &conn.name);
            }
        }
    }

    /// Stops accepting and closes the save queue, says goodbye to every client, then for up to
    /// `--shutdown-timeout` keeps writing their output and delivering save reports until every
    /// client has taken its output and persistence has dealt with everything accepted.
    fn shut_down(&mut self) {
        let deadline = Instant::now() + self.shutdown_timeout;
        let _ = self.poll.registry().deregister(&mut self.listener);
        if let Some(persister) = &mut self.persister {
            persister.close();
        }
        let slots = self.room.slots_in_use();
        info!("shutting down; {} clients connected", slots.len());
        for slot in slots {
            self.room.notice(slot, "server shutting down");
        }
        self.drain_before_exit(deadline);
        self.close_everyone();
        self.finish_persistence(deadline);
    }

    /// Turns of the loop that only write and deliver reports (input is no longer read), until
    /// nothing is left to do or `deadline`.
    fn drain_before_exit(&mut self, deadline: Instant) {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            self.drain_inbox();
            self.end_turn();
            let storing = self.persister.as_ref().is_some_and(|p| !p.is_done());
            let left = deadline.saturating_duration_since(Instant::now());
            if (!storing && !self.room.has_pending_output()) || left.is_zero() {
                return;
            }
            if let Err(err) = self.poll.poll(&mut events, Some(left.min(SHUTDOWN_POLL))) {
                if err.kind() != ErrorKind::Interrupted {
                    return;
                }
            }
            for event in events.iter() {
                if let Some(slot) = Room::slot_of(event.token()).filter(|_| event.is_writable()) {
                    self.write_ready(slot);
                }
            }
        }
    }

    /// Closes every connection: with a FIN where all output was taken.
    fn close_everyone(&mut self) {
        for slot in self.room.slots_in_use() {
            self.room.close(slot, CloseReason::Shutdown);
        }
        let mut unflushed = 0;
        for mut conn in self.room.take_closed() {
            if conn.pending_output() == 0 {
                conn.say_goodbye();
            } else {
                unflushed += 1;
            }
        }
        if unflushed > 0 {
            warn!("{unflushed} clients did not take their last output within --shutdown-timeout");
        }
    }

    /// Collects the persistence thread's figures, waiting for it only until `deadline`.
    fn finish_persistence(&mut self, deadline: Instant) {
        let Some(persister) = self.persister.take() else {
            return;
        };
        // Clients are gone: late failure reports have no one to go to.
        let inbox = &self.inbox;
        let discard_reports = || while inbox.next().is_some() {};
        let left = deadline.saturating_duration_since(Instant::now());
        match persister.finish(left, discard_reports) {
            Ok(stats) => info!(
                "persistence stopped: {} messages saved, {} not saved",
                stats.saved, stats.failed
            ),
            Err(unsettled) => warn!(
                "persistence still busy at --shutdown-timeout: {unsettled} accepted messages not confirmed stored"
            ),
        }
    }
}

//! The event loop: one thread, one `mio::Poll`, the listener and every client socket.
//!
//! Each turn: wait for readiness or the next timer, fire due timers (flood-delayed clients read
//! again, closing clients given up on, gathered presence notices sent), accept new clients,
//! note which clients have input, take in what other threads sent (inbox), read each noted
//! client once and act on its lines, then reap closed connections and write each connection's
//! pending output once. Readiness is edge-triggered, so every socket operation runs until
//! `WouldBlock`; a client that still has input after its per-turn budget is read again next
//! turn, after the others, so one flooding client cannot starve the rest.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use socket2::SockRef;

use super::chat::{self, Services};
use super::connection::{CloseReason, FlushOutcome, Input, InputBatch, ReadOutcome};
use super::heap;
use super::history::History;
use super::inbox::{Inbox, LoopInput};
use super::per_address::PerAddress;
use super::presence::Presence;
use super::room::Room;
use super::roster::Roster;
use super::socket_options::{ClientSocketOptions, INHERITED_FROM_LISTENER};
use super::stats::Stats;
use super::timers::{Due, Timers};
use super::transport::Transport;
use crate::cluster::{Cluster, ClusterInput};
use crate::config::ServerConfig;
use crate::persist::{ClientRef, Persister};
use crate::protocol;
use crate::telnet::HEADROOM;
use crate::{debug, error, info, warn};

/// The loop's parts a client's line may change besides the room (`chat::Services`). A macro,
/// not a method: the fields are borrowed beside `self.room` and `self.batch`, which a `&mut
/// self` method would lock whole.
macro_rules! services {
    ($loop:expr) => {
        Services {
            presence: &mut $loop.presence,
            persister: $loop.persister.as_ref(),
            history: &mut $loop.history,
            stats: &$loop.stats,
            roster: $loop.roster.as_ref(),
        }
    };
}

pub const LISTENER: Token = Token(0);
pub const WAKER: Token = Token(1);
pub const TLS_LISTENER: Token = Token(2);

/// Size of the one read buffer all connections share, in bytes.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read from one connection per turn before others get their turn. One chunk: short lines
/// grow several times over on their way out (`a` becomes `<127.0.0.1:50312> a\r\n`), so this
/// also bounds what one sender adds to every recipient's output in a turn (about 0.7 MB).
const READ_BUDGET: usize = READ_CHUNK;
/// Connections accepted per turn before the clients already in get their turn: a connection
/// flood (refused ones included) cannot starve them.
const ACCEPT_BUDGET: usize = 1024;
/// Clients read or written between two looks at the listener during a long pass over many of
/// them. A line to a crowd makes a turn long (10 000 writes take about 100 ms); connections
/// arriving meanwhile in a reconnect storm would overflow the listen backlog and wait a second
/// for the kernel's SYN retry.
const ACCEPT_BETWEEN: usize = 512;
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
/// How long a client closed after being told why (`/quit`, end of its input, overlong lines)
/// has to take its last output before the connection is closed anyway: long enough for a
/// client that reads, short enough that one that does not gives its slot back soon.
pub const CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TLS client has to finish its handshake before it is closed: ample for a slow
/// link, and a connection that never speaks gives its slot back soon.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Inbox items acted on per turn, a batch of other nodes' events counting one per event (so at
/// most about one batch of 1000), before sockets are served again.
const INBOX_BUDGET: usize = 1024;
/// At least this long, even past `--shutdown-timeout`, for a cluster node to remove its
/// presence documents so that the other nodes see its users leave at once.
const CLUSTER_STOP_GRACE: Duration = Duration::from_secs(2);

/// The listening sockets: plain TCP, TLS (with its certificate), or both.
pub struct Listeners {
    pub plain: Option<TcpListener>,
    pub tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
}

impl Listeners {
    /// The listener `tls` names, if there is one.
    fn get(&self, tls: bool) -> Option<&TcpListener> {
        if tls {
            self.tls.as_ref().map(|(listener, _)| listener)
        } else {
            self.plain.as_ref()
        }
    }

    /// Each listener with its poll token.
    fn with_tokens(&mut self) -> impl Iterator<Item = (&mut TcpListener, Token)> {
        let plain = self.plain.as_mut().map(|listener| (listener, LISTENER));
        let tls = self
            .tls
            .as_mut()
            .map(|(listener, _)| (listener, TLS_LISTENER));
        plain.into_iter().chain(tls)
    }

    fn register(&mut self, poll: &Poll) -> io::Result<()> {
        for (listener, token) in self.with_tokens() {
            poll.registry()
                .register(listener, token, Interest::READABLE)?;
        }
        Ok(())
    }

    fn deregister(&mut self, poll: &Poll) {
        for (listener, _) in self.with_tokens() {
            let _ = poll.registry().deregister(listener);
        }
    }
}

/// The state one thread owns while serving.
pub struct EventLoop {
    pub(super) poll: Poll,
    listeners: Listeners,
    pub(super) inbox: Inbox,
    pub(super) persister: Option<Persister>,
    /// The other cluster nodes (`--cluster`).
    roster: Option<Roster>,
    pub(super) room: Room,
    presence: Presence,
    history: History,
    timers: Timers,
    stats: Stats,
    /// `--stats-interval`, and when the stats line is logged next.
    stats_interval: Option<Duration>,
    next_stats_log: Option<Instant>,
    max_clients: usize,
    socket_options: ClientSocketOptions,
    shutdown_timeout: Duration,
    scratch: Vec<u8>,
    batch: InputBatch,
    /// Clients to read this turn, each once (`Connection::read_queued` marks them).
    to_read: Vec<ClientRef>,
    /// Clients whose read budget ran out; read again next turn, after the others.
    read_again: Vec<ClientRef>,
    flush_list: Vec<usize>,
    last_sweep: Instant,
    closed_since_sweep: usize,
    /// The last accept failed (e.g. EMFILE); retry every turn and at least every ACCEPT_RETRY.
    /// Per listener (plain, TLS): so one that fails and one that is idle do not take turns
    /// logging "failed" and "accepting again".
    accept_failing: [bool; 2],
    /// The accept budget ran out with connections possibly waiting: accept again next turn.
    accept_again: bool,
    /// The inbox budget ran out with input possibly waiting: read it again next turn.
    inbox_again: bool,
    /// At `max_clients`: new clients are being refused (logged once per episode).
    refusing: bool,
    /// When this turn's events arrived: the time flood control and timers go by.
    now: Instant,
    running: bool,
}

impl EventLoop {
    /// Puts the parts together; the listener is registered here.
    pub(super) fn new(
        poll: Poll,
        mut listeners: Listeners,
        inbox: Inbox,
        persister: Option<Persister>,
        cluster: Option<Cluster>,
        config: &ServerConfig,
    ) -> io::Result<Self> {
        listeners.register(&poll)?;
        let socket_options = ClientSocketOptions::new(config.keepalive);
        // Accepted sockets inherit these where the system allows (see `socket_options`).
        for (listener, _) in listeners.with_tokens() {
            socket_options.apply(SockRef::from(&*listener))?;
        }
        let per_address = PerAddress::new(config.max_per_ip, &config.max_per_ip_exempt);
        let now = Instant::now();
        Ok(EventLoop {
            poll,
            listeners,
            inbox,
            persister,
            roster: cluster.map(|cluster| Roster::new(cluster, now)),
            room: Room::new(config.limits, config.max_output_total, per_address),
            presence: Presence::new(config.presence_interval),
            history: History::new(
                config.history_on_join,
                config.history_max,
                config
                    .store
                    .as_ref()
                    .map_or(Duration::ZERO, |store| store.timeout),
            ),
            timers: Timers::default(),
            stats: Stats::new(config.max_clients, now),
            stats_interval: config.stats_interval,
            next_stats_log: config.stats_interval.map(|every| now + every),
            max_clients: config.max_clients,
            socket_options,
            shutdown_timeout: config.shutdown_timeout,
            scratch: vec![0; HEADROOM + READ_CHUNK],
            batch: InputBatch::default(),
            to_read: Vec::new(),
            read_again: Vec::new(),
            flush_list: Vec::new(),
            last_sweep: Instant::now(),
            closed_since_sweep: 0,
            accept_failing: [false; 2],
            accept_again: false,
            inbox_again: false,
            refusing: false,
            now,
            running: true,
        })
    }

    /// Serves until a shutdown request arrives.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        while self.running {
            self.turn(&mut events)?;
        }
        self.shut_down();
        Ok(())
    }

    /// One turn: wait, then act on everything that is ready.
    fn turn(&mut self, events: &mut Events) -> io::Result<()> {
        if let Err(err) = self.poll.poll(events, Some(self.poll_timeout())) {
            if err.kind() == ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(err);
        }
        self.now = Instant::now();
        self.fire_timers();
        for event in events.iter() {
            match event.token() {
                LISTENER | TLS_LISTENER => self.accept_all(),
                WAKER => {} // drained below, every turn
                token => self.client_ready(token, event.is_writable()),
            }
        }
        self.drain_inbox();
        if self.accept_failing.contains(&true) || std::mem::take(&mut self.accept_again) {
            // Connections closed since may have freed descriptors, or the budget ran out.
            // Before `end_turn`, so the welcome lines of clients accepted here are written
            // this turn.
            self.accept_all();
        }
        self.read_queued();
        self.end_turn();
        Ok(())
    }

    /// How long the next poll may wait: not at all with reads or accepts left over, else until
    /// the next timer, gathered notice, accept retry or idle sweep.
    fn poll_timeout(&self) -> Duration {
        if !self.read_again.is_empty()
            || self.accept_again
            || self.inbox_again
            || self.room.has_output_to_flush()
        {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut wake = self.last_sweep + SWEEP_INTERVAL;
        if self.accept_failing.contains(&true) {
            wake = wake.min(now + ACCEPT_RETRY);
        }
        let next_dues = [
            self.timers.next_at(),
            self.presence.next_due(),
            self.history.next_due(),
            self.next_stats_log,
            self.roster.as_ref().and_then(Roster::next_due),
        ];
        for due in next_dues.into_iter().flatten() {
            wake = wake.min(due);
        }
        wake.saturating_duration_since(now)
    }

    /// Acts on every timer that is due, and sends gathered presence notices whose time came.
    fn fire_timers(&mut self) {
        self.presence.announce_due(&mut self.room, self.now);
        self.history.expire_due(&mut self.room, self.now);
        if let Some(roster) = &mut self.roster {
            roster.check_nodes(&mut self.room, &mut self.presence, self.now);
        }
        self.log_stats_if_due();
        while let Some(due) = self.timers.pop_due(self.now) {
            match due {
                Due::Resume(client) => {
                    if let Some(conn) = self.room.find_mut(client) {
                        conn.throttled = false;
                        self.queue_read(client.slot);
                    }
                }
                Due::CloseDeadline(client) => {
                    if self.room.find(client).is_some_and(|conn| conn.draining) {
                        self.finish_close(client.slot, false);
                    }
                }
                Due::HandshakeDeadline(client) => {
                    if self
                        .room
                        .find(client)
                        .is_some_and(|conn| conn.is_handshaking())
                    {
                        self.room.close(client.slot, CloseReason::HandshakeTimeout);
                    }
                }
            }
        }
    }

    /// `--stats-interval`: the `/stats` line in the log.
    fn log_stats_if_due(&mut self) {
        let (Some(every), Some(due)) = (self.stats_interval, self.next_stats_log) else {
            return;
        };
        if self.now < due {
            return;
        }
        // As a client sees it, `* ` included, so one search finds both.
        info!(
            "* {}",
            self.stats
                .line(&self.room, self.persister.as_ref(), self.now)
        );
        // From now, not from `due`: a loop that was busy does not log a burst to catch up.
        self.next_stats_log = Some(self.now + every);
    }

    /// Reaps closed connections, writes pending output, and now and then frees idle buffers.
    fn end_turn(&mut self) {
        // Reaping queues `left` notices and flushing can find dead sockets: repeat until both
        // settle. Each extra round takes at least one connection out of the room, so this ends.
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

    /// Accepts what waits on every listener, up to a budget each.
    fn accept_all(&mut self) {
        let plain = self.accept_from(false);
        let tls = self.accept_from(true);
        self.accept_again = plain || tls;
    }

    /// Accepts from one listener; true if its budget ran out with connections possibly left.
    fn accept_from(&mut self, tls: bool) -> bool {
        for _ in 0..ACCEPT_BUDGET {
            let Some(listener) = self.listeners.get(tls) else {
                return false;
            };
            match listener.accept() {
                Ok((socket, addr)) => self.admit(socket, addr, tls),
                Err(err) if err.kind() == ErrorKind::WouldBlock => {
                    if std::mem::take(&mut self.accept_failing[usize::from(tls)]) {
                        info!("accepting connections again");
                    }
                    return false;
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    // E.g. out of file descriptors. Waiting clients stay in the backlog; retry
                    // soon, logging once rather than on every retry.
                    if !self.accept_failing[usize::from(tls)] {
                        error!("accept failed: {err}; retrying every {ACCEPT_RETRY:?}");
                        self.accept_failing[usize::from(tls)] = true;
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Adds a new client to the room, or refuses it when the server is full or its address
    /// holds `--max-per-ip` connections. A plain client joins the chat at once, a TLS one when
    /// its handshake is done (see `read_from`).
    fn admit(&mut self, socket: TcpStream, addr: SocketAddr, tls: bool) {
        if self.room.len() >= self.max_clients {
            self.stats.rejected_full += 1;
            self.log_server_full();
            return refuse(socket, tls, &protocol::server_full(self.max_clients));
        }
        if std::mem::take(&mut self.refusing) {
            info!("below --max-clients again: accepting new clients");
        }
        if let Some(limit) = self.room.address_full(addr.ip()) {
            self.stats.rejected_per_ip += 1;
            debug!("client {addr} refused: its address holds {limit} connections (--max-per-ip)");
            return refuse(socket, tls, &protocol::too_many_from_address(limit));
        }
        if !INHERITED_FROM_LISTENER {
            if let Err(err) = self.socket_options.apply(SockRef::from(&socket)) {
                return warn!("could not set up client {addr}: {err}");
            }
        }
        let transport = match &self.listeners.tls {
            Some((_, config)) if tls => match Transport::tls(socket, config) {
                Ok(transport) => transport,
                Err(err) => return warn!("could not set up TLS client {addr}: {err}"),
            },
            _ => Transport::Plain(socket),
        };
        match self
            .room
            .add(transport, addr, self.poll.registry(), self.now)
        {
            Ok(slot) => {
                self.stats.connections_total += 1;
                debug!("client {addr} connected ({} online)", self.room.len());
                if tls {
                    let client = self.room.client_ref(slot).expect("just added");
                    let deadline = self.now + HANDSHAKE_TIMEOUT;
                    self.timers.add(deadline, Due::HandshakeDeadline(client));
                } else {
                    self.join(slot);
                }
            }
            Err(err) => warn!("could not set up client {addr}: {err}"),
        }
    }

    /// Lets the client in `slot` into the chat.
    fn join(&mut self, slot: usize) {
        chat::joined(&mut self.room, services!(self), slot, self.now);
    }

    /// Says once per episode that the server is full.
    fn log_server_full(&mut self) {
        if !self.refusing {
            warn!(
                "server full ({} clients, --max-clients): refusing new clients",
                self.max_clients
            );
            self.refusing = true;
        }
    }

    /// Acts on what other threads sent, up to `INBOX_BUDGET` items (a batch of other nodes'
    /// messages counts as one per message): a change stream with a backlog refills the inbox
    /// as fast as it is read, and clients' sockets must be served between its batches. What
    /// is left is read next turn, which then does not wait.
    fn drain_inbox(&mut self) {
        self.inbox_again = false;
        let mut budget = INBOX_BUDGET;
        while budget > 0 {
            let Some(input) = self.inbox.next() else {
                return;
            };
            budget = budget.saturating_sub(input.weight());
            match input {
                LoopInput::NotSaved(failures) => {
                    self.stats.failed_saves += failures.len() as u64;
                    chat::not_saved(&mut self.room, failures, self.roster.is_some());
                }
                LoopInput::History(reply) => self.history.answer(&mut self.room, reply),
                LoopInput::Cluster(input) => self.act_on_cluster_input(input),
                LoopInput::Shutdown => self.running = false,
            }
        }
        self.inbox_again = true;
    }

    /// Other nodes' events, and the answers to this node's `/nick` claims.
    fn act_on_cluster_input(&mut self, input: ClusterInput) {
        match input {
            ClusterInput::Events(events) => {
                if let Some(roster) = &mut self.roster {
                    roster.apply(&mut self.room, &mut self.presence, events, self.now);
                }
            }
            ClusterInput::NickClaimed {
                client,
                nick,
                result,
            } => {
                let claim = (client, nick.as_str());
                chat::nick_claimed(&mut self.room, &mut self.presence, claim, result, self.now);
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
        self.queue_read(slot);
    }

    /// Puts the client on this turn's read list, unless it is already on it (one read per
    /// client per turn, however many events it had) or waits for its flood allowance.
    fn queue_read(&mut self, slot: usize) {
        let Some(conn) = self.room.get_mut(slot) else {
            return;
        };
        if conn.read_queued || conn.throttled || conn.done_reading() {
            return;
        }
        conn.read_queued = true;
        self.to_read.push(ClientRef {
            slot,
            id: conn.id(),
        });
    }

    /// Reads every client noted this turn once, then those whose budget ran out last turn.
    fn read_queued(&mut self) {
        let mut list = std::mem::take(&mut self.to_read);
        list.append(&mut self.read_again);
        for (read, &client) in list.iter().enumerate() {
            self.accept_between(read);
            if let Some(conn) = self.room.find_mut(client) {
                conn.read_queued = false;
                self.read_from(client.slot);
            }
        }
        list.clear();
        self.to_read = list;
    }

    /// Reads what the client sent, within the budget and its flood allowance, and acts on each
    /// line. A TLS client whose handshake this read finished joins the chat first.
    fn read_from(&mut self, slot: usize) {
        let flood = self.room.limits().flood;
        let Some(conn) = self.room.get_mut(slot) else {
            return;
        };
        if conn.done_reading() {
            return;
        }
        let client = ClientRef {
            slot,
            id: conn.id(),
        };
        let allowance = conn.line_allowance(flood, self.now);
        self.batch.clear();
        let outcome = conn.read(&mut self.scratch, READ_BUDGET, &mut self.batch, allowance);
        let handshake_done = !conn.joined && !conn.is_handshaking() && conn.closing().is_none();
        if conn.needs_flush() {
            // TLS handshake replies, which no line of the chat would schedule.
            self.room.schedule_flush(slot);
        }
        if handshake_done {
            self.join(slot);
        }
        self.act_on_batch(slot);
        self.after_read(client, outcome);
    }

    /// Applies the lines just read from `slot`, stopping if one of them ends its reading.
    fn act_on_batch(&mut self, slot: usize) {
        for item in self.batch.items() {
            if self.room.get(slot).is_none_or(|conn| conn.done_reading()) {
                break;
            }
            match item {
                Input::Line(range) => {
                    let line = self.batch.line(range);
                    chat::line(&mut self.room, services!(self), slot, line, self.now);
                }
                Input::TooLong => chat::too_long(&mut self.room, slot),
            }
        }
        self.room.send_gathered_chat();
    }

    /// What a read's end means for the client: read again next turn, wait for its flood
    /// allowance, or close.
    fn after_read(&mut self, client: ClientRef, outcome: ReadOutcome) {
        match outcome {
            ReadOutcome::Drained => {}
            ReadOutcome::BudgetSpent => {
                if let Some(conn) = self.room.find_mut(client) {
                    conn.read_queued = true;
                    self.read_again.push(client);
                }
            }
            ReadOutcome::Throttled => self.throttle(client),
            // End of input: answers to history asked for before it still go out.
            ReadOutcome::Closed(CloseReason::PeerClosed) => {
                self.room.leave(client.slot, CloseReason::PeerClosed, None);
            }
            ReadOutcome::Closed(reason) => self.room.close(client.slot, reason),
        }
    }

    /// The client used up its flood allowance: it is not read again until it has earned more
    /// lines, and is told once per burst if lines of its are waiting.
    fn throttle(&mut self, client: ClientRef) {
        let Some(limit) = self.room.limits().flood else {
            return;
        };
        let Some(conn) = self.room.find_mut(client) else {
            return;
        };
        if conn.done_reading() {
            return;
        }
        let resume_at = conn.flood_resume_at(limit).unwrap_or(self.now);
        // Only a client that has used its tokens is being slowed down (a `/quit` is framed
        // against the allowance but costs nothing).
        let waiting = conn.has_held_input() && conn.line_allowance(Some(limit), self.now) == 0;
        conn.throttled = true;
        self.timers.add(resume_at, Due::Resume(client));
        if waiting && chat::flood_delayed(&mut self.room, client.slot) {
            self.stats.flood_delayed += 1;
        }
    }

    /// The socket can take more output again.
    fn write_ready(&mut self, slot: usize) {
        let Some(conn) = self.room.get_mut(slot) else {
            return;
        };
        if conn.draining {
            match conn.flush() {
                FlushOutcome::Blocked => {}
                FlushOutcome::Done => self.finish_close(slot, true),
                FlushOutcome::Failed(_) => self.finish_close(slot, false),
            }
        } else if conn.closing().is_none() && conn.needs_flush() {
            self.flush_one(slot);
        }
    }

    /// Writes each connection that got output this turn: one write per connection per turn,
    /// however many lines it received. A line to a crowd makes this long (10 000 writes take
    /// about 100 ms), so it accepts what is waiting as it goes (`accept_between`), and writes
    /// those clients' welcomes in a second pass.
    fn flush_pending(&mut self) {
        for pass in 0..2 {
            let mut list = std::mem::take(&mut self.flush_list);
            self.room.take_flush_list(&mut list);
            for (written, &slot) in list.iter().enumerate() {
                if pass == 0 {
                    self.accept_between(written);
                }
                self.flush_one(slot);
            }
            let done = list.is_empty();
            list.clear();
            self.flush_list = list;
            if done {
                return;
            }
        }
    }

    /// Accepts what is waiting every `ACCEPT_BETWEEN` clients handled in a long pass over
    /// many of them, so a reconnect storm does not overflow the listen backlog meanwhile.
    fn accept_between(&mut self, handled: usize) {
        if handled > 0 && handled.is_multiple_of(ACCEPT_BETWEEN) && self.running {
            self.accept_all();
        }
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

    /// Takes connections marked closing out of the room and tells the others they left. One
    /// that was told why it is closed keeps its slot while it writes its last output, up to
    /// `CLOSE_DRAIN_TIMEOUT`; the others are closed at once.
    fn reap_closed(&mut self) {
        for slot in self.room.take_to_reap() {
            let registry = self.poll.registry();
            let Some(conn) = self.room.get_mut(slot) else {
                continue;
            };
            if conn.draining {
                continue;
            }
            let reason = conn.closing().unwrap_or(CloseReason::Shutdown);
            let (name, id, joined) = (conn.name.clone(), conn.id(), conn.joined);
            let blocked = reason.flushes_first() && conn.flush() == FlushOutcome::Blocked;
            // Also while stopping: `drain_before_exit` writes closing clients' output too.
            if blocked && conn.set_wants_writable(registry, true).is_ok() {
                conn.draining = true;
                let client = ClientRef { slot, id };
                self.timers
                    .add(self.now + CLOSE_DRAIN_TIMEOUT, Due::CloseDeadline(client));
            } else {
                let flushed = reason.flushes_first() && !blocked;
                self.finish_close(slot, flushed);
            }
            if self.running && joined {
                let client = ClientRef { slot, id };
                self.presence.left(&mut self.room, client, &name, self.now);
            }
            if let Some(roster) = self.roster.as_ref().filter(|_| joined) {
                roster.local_left(id);
            }
        }
    }

    /// Removes a closing connection: with a FIN after its output if `flushed`, else at once.
    fn finish_close(&mut self, slot: usize, flushed: bool) {
        let Some(mut conn) = self.room.remove(slot) else {
            return;
        };
        self.closed_since_sweep += 1;
        if flushed {
            conn.say_goodbye();
        }
        conn.deregister(self.poll.registry());
        let reason = conn.closing().unwrap_or(CloseReason::Shutdown);
        if reason.is_slow_consumer() {
            self.stats.slow_consumers += 1;
        }
        if conn.is_handshaking() {
            // Counted, and logged only at debug: scanners and broken clients are common.
            self.stats.tls_handshake_failures += 1;
        }
        let unsent = if conn.pending_output() > 0 {
            format!(
                " ({} bytes of its last output not taken)",
                conn.pending_output()
            )
        } else {
            String::new()
        };
        let (addr, name) = (conn.addr(), &conn.name);
        if reason.is_slow_consumer() {
            warn!("client {addr} ({name}) disconnected: {}", reason.describe());
        } else {
            debug!(
                "client {addr} ({name}) disconnected: {}{unsent}",
                reason.describe()
            );
        }
    }

    /// Stops accepting and closes the save queue, says goodbye to every client, then for up to
    /// `--shutdown-timeout` keeps writing their output and delivering save reports until every
    /// client has taken its output and persistence has dealt with everything accepted.
    fn shut_down(&mut self) {
        let deadline = Instant::now() + self.shutdown_timeout;
        self.listeners.deregister(&self.poll);
        if let Some(persister) = &mut self.persister {
            persister.close();
        }
        // Output held for history answers flows now: the goodbye must not wait behind them.
        self.history
            .give_up_all(&mut self.room, "server shutting down");
        let slots = self.room.slots_in_use();
        info!("shutting down; {} clients connected", slots.len());
        for slot in slots {
            self.room.notice(slot, "server shutting down");
        }
        self.drain_before_exit(deadline);
        self.close_everyone();
        self.finish_persistence(deadline);
        if let Some(roster) = self.roster.take() {
            // After the messages are stored: the other nodes deliver them, then see this
            // node's users leave. Clients are gone, so what still arrives is dropped.
            let inbox = &self.inbox;
            let discard = || while inbox.next().is_some() {};
            roster.stop(deadline.max(Instant::now() + CLUSTER_STOP_GRACE), discard);
        }
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

    /// Closes every connection, closing ones included: with a FIN where all output was taken.
    fn close_everyone(&mut self) {
        for slot in self.room.slots_in_use() {
            self.room.close(slot, CloseReason::Shutdown);
        }
        self.room.take_to_reap();
        let mut unflushed = 0;
        for slot in self.room.occupied_slots() {
            let Some(mut conn) = self.room.remove(slot) else {
                continue;
            };
            if !conn.needs_flush() {
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

/// Tells a refused client why (in the clear: on the TLS port no line can reach it before a
/// handshake, so it is only closed) and closes it, without ever registering it. One short line
/// always fits in a new socket's send buffer.
fn refuse(mut socket: TcpStream, tls: bool, why: &str) {
    if !tls {
        let mut line = Vec::new();
        protocol::write_error(&mut line, why);
        let _ = socket.write(&line);
        // Whatever the client already sent would turn the close into a reset that can destroy
        // the line above before the client reads it.
        let _ = socket.read(&mut [0; 4096]);
    }
    let _ = socket.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream as StdStream;
    use std::thread;

    /// A loop on a free loopback port that the test drives turn by turn.
    fn loop_for_test(config: &ServerConfig) -> (EventLoop, SocketAddr) {
        let poll = Poll::new().unwrap();
        let waker = mio::Waker::new(poll.registry(), WAKER).unwrap();
        let (_sender, inbox) = Inbox::new(waker);
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let listeners = Listeners {
            plain: Some(listener),
            tls: None,
        };
        let event_loop = EventLoop::new(poll, listeners, inbox, None, None, config).unwrap();
        (event_loop, addr)
    }

    /// A client sending as fast as loopback goes has new data, and so a new readiness event, in
    /// nearly every turn; it must still get one read budget per turn, not one per event.
    #[test]
    fn a_flooding_client_is_read_at_most_one_budget_per_turn() {
        const LINES: usize = 8000;
        const LINE: usize = 1000;
        let mut config = ServerConfig::local(None);
        config.limits.flood = None;
        let (mut event_loop, addr) = loop_for_test(&config);
        let mut flooder = StdStream::connect(addr).unwrap();
        let writer = thread::spawn(move || {
            let mut line = vec![b'x'; LINE - 1];
            line.push(b'\n');
            for _ in 0..LINES {
                flooder.write_all(&line).unwrap();
            }
            flooder
        });
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        let (mut read_before, mut most_in_a_turn, mut turns) = (0, 0, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while read_before < (LINES * LINE) as u64 && Instant::now() < deadline {
            event_loop.turn(&mut events).unwrap();
            turns += 1;
            let read = event_loop.room.get(0).map_or(0, |conn| conn.bytes_read());
            most_in_a_turn = most_in_a_turn.max(read - read_before);
            read_before = read;
        }
        let _flooder = writer.join().unwrap();
        assert_eq!(
            read_before,
            (LINES * LINE) as u64,
            "all read, in {turns} turns"
        );
        assert!(
            most_in_a_turn <= READ_BUDGET as u64,
            "{most_in_a_turn} bytes read from one client in one turn (budget {READ_BUDGET})"
        );
    }
}

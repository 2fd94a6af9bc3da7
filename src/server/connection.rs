//! One client connection: its socket, its read framing and its write buffer.
//!
//! The only place that reads from or writes to a client socket. Every nonblocking call follows
//! mio's pattern: repeat until `WouldBlock`, retry on `Interrupted`, treat `Ok(0)` as closed.
//! A connection never removes itself: it records a `CloseReason` and the event loop reaps it
//! after the turn, so a handler can never free a connection another handler still refers to.
//!
//! Input is framed only as far as the client's flood allowance goes; the rest of a read is held
//! here (at most one read's worth) and the socket is not read again until it is used up, so a
//! client over its rate is slowed down without losing or reordering anything.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mio::{Interest, Registry, Token};

use super::flood::TokenBucket;
use super::transport::{Transport, WireBytes};
use crate::config::{ClientLimits, FloodLimit};
use crate::framing::{Frame, LineFramer};
use crate::telnet::{TelnetFilter, HEADROOM};

/// Why a connection is being closed; decides whether pending output is flushed first and what
/// the log says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed its side (EOF).
    PeerClosed,
    /// The client sent `/quit`.
    Quit,
    /// Reading failed (reset, …).
    ReadError(ErrorKind),
    /// Writing failed (broken pipe, reset, …).
    WriteError(ErrorKind),
    /// The client did not read and its pending output passed `--max-output`.
    SlowConsumer,
    /// All clients' pending output reached `--max-output-total` and this one had the most.
    LargestBacklog,
    /// The client kept sending lines over `--max-line`.
    TooManyOverlong,
    /// The server is stopping.
    Shutdown,
    /// The TLS handshake did not finish within `HANDSHAKE_TIMEOUT`.
    HandshakeTimeout,
}

impl CloseReason {
    /// Cut off for not reading (its own limit or the total one): counted and logged as such.
    pub fn is_slow_consumer(self) -> bool {
        matches!(
            self,
            CloseReason::SlowConsumer | CloseReason::LargestBacklog
        )
    }

    /// Whether output still pending is worth sending before closing: not after an I/O error,
    /// and not to a slow consumer, whose backlog is the problem.
    pub fn flushes_first(self) -> bool {
        matches!(
            self,
            CloseReason::PeerClosed
                | CloseReason::Quit
                | CloseReason::TooManyOverlong
                | CloseReason::Shutdown
        )
    }

    /// Words for the log.
    pub fn describe(self) -> String {
        match self {
            CloseReason::PeerClosed => "closed by client".to_string(),
            CloseReason::Quit => "quit".to_string(),
            CloseReason::ReadError(kind) => format!("read error: {kind}"),
            CloseReason::WriteError(kind) => format!("write error: {kind}"),
            CloseReason::SlowConsumer => "slow consumer: output limit reached".to_string(),
            CloseReason::LargestBacklog => {
                "slow consumer: most output pending at --max-output-total".to_string()
            }
            CloseReason::TooManyOverlong => "too many overlong lines".to_string(),
            CloseReason::Shutdown => "server shutting down".to_string(),
            CloseReason::HandshakeTimeout => "TLS handshake not finished in time".to_string(),
        }
    }
}

/// Lines read from one connection in one turn, copied out of the framer so the chat logic can
/// use them while it has the whole room (this connection included) borrowed mutably.
#[derive(Debug, Default)]
pub struct InputBatch {
    bytes: Vec<u8>,
    items: Vec<Input>,
}

/// One thing a client sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A line, as a range of `InputBatch` bytes.
    Line(Range<usize>),
    /// A line over `--max-line`, already discarded.
    TooLong,
}

impl InputBatch {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.items.clear();
    }

    /// Frees the buffers after a turn that read an unusually large number of lines.
    pub fn shrink_if_large(&mut self) {
        const KEEP_BYTES: usize = 128 * 1024;
        const KEEP_ITEMS: usize = 4096;
        if self.bytes.capacity() > KEEP_BYTES || self.items.capacity() > KEEP_ITEMS {
            *self = InputBatch::default();
        }
    }

    pub fn items(&self) -> &[Input] {
        &self.items
    }

    pub fn line(&self, range: &Range<usize>) -> &[u8] {
        &self.bytes[range.clone()]
    }

    fn push(&mut self, frame: Frame<'_>) {
        let item = match frame {
            Frame::Line(line) => {
                let start = self.bytes.len();
                self.bytes.extend_from_slice(line);
                Input::Line(start..self.bytes.len())
            }
            Frame::TooLong => Input::TooLong,
        };
        self.items.push(item);
    }
}

/// How a read pass ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// The socket said `WouldBlock`: wait for the next readable event.
    Drained,
    /// The per-turn budget ran out with data possibly left: read again next turn, since an
    /// edge-triggered poll will not report it again.
    BudgetSpent,
    /// The flood allowance ran out: input is held or may be waiting in the socket; read again
    /// when the client has earned more lines.
    Throttled,
    /// End of stream or an error.
    Closed(CloseReason),
}

/// How a flush ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Nothing left to send.
    Done,
    /// The socket is full; the rest waits for a writable event.
    Blocked,
    /// The write failed; the connection must close.
    Failed(CloseReason),
}

/// Output pending over all connections, for `--max-output-total`: every output buffer adds
/// what it takes in and takes off what it writes or drops. An atomic only because the loop
/// may be moved to its thread; one thread touches it.
#[derive(Clone, Debug, Default)]
pub struct OutputTotal(Arc<AtomicUsize>);

impl OutputTotal {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: usize) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }

    fn sub(&self, bytes: usize) {
        self.0.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Pending output: a byte buffer with a consumed prefix, so a partial write costs no copy.
#[derive(Debug, Default)]
struct OutputBuffer {
    bytes: Vec<u8>,
    /// Bytes before `head` are already written.
    head: usize,
    /// Where this buffer's pending bytes are summed with everyone else's.
    total: OutputTotal,
}

/// A drained output buffer above this capacity is freed at once: a burst should not leave
/// its memory behind. Smaller ones are kept for reuse until the idle sweep.
const KEEP_OUTPUT_CAPACITY: usize = 256 * 1024;
/// Held input (see `Connection::read`) is kept for reuse up to this capacity once used up.
const KEEP_HELD_CAPACITY: usize = 16 * 1024;

impl OutputBuffer {
    fn pending(&self) -> &[u8] {
        &self.bytes[self.head..]
    }

    fn len(&self) -> usize {
        self.bytes.len() - self.head
    }

    fn push(&mut self, data: &[u8]) {
        // Reclaim the written prefix only when the buffer would otherwise grow, and only if it
        // is at least half of what is there: each byte is moved at most once on average.
        let would_grow = self.bytes.len() + data.len() > self.bytes.capacity();
        if would_grow && self.head > 0 && self.head * 2 >= self.bytes.len() {
            self.bytes.drain(..self.head);
            self.head = 0;
        }
        self.bytes.extend_from_slice(data);
        self.total.add(data.len());
    }

    fn consume(&mut self, written: usize) {
        self.total.sub(written);
        self.head += written;
        if self.head == self.bytes.len() {
            self.head = 0;
            self.bytes.clear();
            if self.bytes.capacity() > KEEP_OUTPUT_CAPACITY {
                self.bytes = Vec::new();
            }
        }
    }

    /// Frees the buffer if nothing is pending; returns the bytes freed.
    fn shrink_if_idle(&mut self) -> usize {
        if self.len() > 0 {
            return 0;
        }
        let freed = self.bytes.capacity();
        (self.bytes, self.head) = (Vec::new(), 0);
        freed
    }

    /// Drops everything pending.
    fn discard(&mut self) {
        self.consume(self.len());
    }
}

impl Drop for OutputBuffer {
    fn drop(&mut self) {
        self.total.sub(self.len());
    }
}

/// A history request waiting for its answer, and the output queued after it.
#[derive(Debug)]
struct HistoryWait {
    ticket: u64,
    held: Vec<u8>,
}

/// One connected client.
#[derive(Debug)]
pub struct Connection {
    transport: Transport,
    /// What crossed the network, both ways, for `/stats`.
    wire: WireBytes,
    token: Token,
    /// Never reused, unlike the token: persistence reports carry it so a failure can never reach
    /// a later client that happens to get the same slot.
    id: u64,
    addr: SocketAddr,
    /// The name shown as `<NAME>`: the nick, or `IP:PORT` until one is set.
    pub name: String,
    telnet: TelnetFilter,
    framer: LineFramer,
    output: OutputBuffer,
    /// Flood control; `None` when it is off.
    bucket: Option<TokenBucket>,
    /// Input read (and telnet-filtered) but not yet framed, because the flood allowance ran out;
    /// `held[held_from..]` is still to come. At most one read's worth.
    held: Vec<u8>,
    held_from: usize,
    /// Waiting for its flood allowance: not read on readiness events, only when the loop's
    /// timer says it has earned lines again.
    pub throttled: bool,
    /// Already on the loop's list of connections to read this turn: one read per turn each.
    pub read_queued: bool,
    /// In the chat: welcomed, receiving lines, listed. A TLS client joins once its handshake
    /// is done, so a stalled handshake is never announced and gets no chat.
    pub joined: bool,
    /// Its place in the order of joining (`Room::take_join_order`): presence notices go to
    /// those who joined before the event.
    pub join_order: u64,
    /// When it joined, wall clock in milliseconds: `/who` orders a cluster's clients by it.
    pub joined_millis: i64,
    /// Others have been told it joined (a join may be gathered for a while, see `presence`).
    pub announced: bool,
    /// Closed, but still writing its last output (bounded by a deadline) before the FIN.
    pub draining: bool,
    /// Overlong lines sent in a row (a line within the limit resets it).
    overlong_lines: u32,
    /// Bytes read from the socket so far.
    bytes_read: u64,
    closing: Option<CloseReason>,
    /// Registered for writable events, which is only while output is blocked.
    wants_writable: bool,
    /// Already on the loop's list of connections to flush this turn.
    pub flush_scheduled: bool,
    /// History requests not answered yet, oldest first, each with the output queued after it:
    /// that output waits for the answer, so history arrives as one block where it was asked
    /// for (right after the welcome, for a join).
    history_waits: VecDeque<HistoryWait>,
    /// Bytes held in `history_waits`; they count against the output limit.
    held_output: usize,
    /// `/history` requests not answered yet: their answers join the output when they come,
    /// and nothing waits for them.
    answers_due: Vec<u64>,
    /// Leaving (`/quit`, end of input) while history answers were due: it is closed for this
    /// reason once the last one is in its output or given up on, so a piped
    /// `/history 5` then `/quit` gets its answer before the goodbye.
    leave_after_history: Option<CloseReason>,
    /// Sent or received something since the last idle sweep: keep its buffers for reuse.
    active_since_sweep: bool,
}

impl Connection {
    /// Registers the socket for readable events under `token`; its output counts in `total`.
    pub fn new(
        mut transport: Transport,
        addr: SocketAddr,
        (token, id): (Token, u64),
        registry: &Registry,
        limits: &ClientLimits,
        total: OutputTotal,
        now: Instant,
    ) -> io::Result<Self> {
        registry.register(transport.socket(), token, Interest::READABLE)?;
        Ok(Connection {
            transport,
            wire: WireBytes::default(),
            token,
            id,
            addr,
            name: addr.to_string(),
            telnet: TelnetFilter::default(),
            framer: LineFramer::new(limits.max_line),
            output: OutputBuffer {
                bytes: Vec::new(),
                head: 0,
                total,
            },
            bucket: limits.flood.map(|limit| TokenBucket::full(limit, now)),
            held: Vec::new(),
            held_from: 0,
            throttled: false,
            read_queued: false,
            joined: false,
            join_order: 0,
            joined_millis: 0,
            announced: false,
            draining: false,
            overlong_lines: 0,
            bytes_read: 0,
            closing: None,
            wants_writable: false,
            flush_scheduled: false,
            history_waits: VecDeque::new(),
            held_output: 0,
            answers_due: Vec::new(),
            leave_after_history: None,
            active_since_sweep: false,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// True while its TLS handshake is not finished (never for plain TCP).
    pub fn is_handshaking(&self) -> bool {
        self.transport.is_handshaking()
    }

    /// Bytes received and sent over the network so far.
    pub fn wire_bytes(&self) -> WireBytes {
        self.wire
    }

    /// Bytes read from the client so far.
    #[cfg(test)]
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    pub fn closing(&self) -> Option<CloseReason> {
        self.closing
    }

    /// Closing, or leaving once its history answers are in: nothing more is read from it.
    pub fn done_reading(&self) -> bool {
        self.closing.is_some() || self.leave_after_history.is_some()
    }

    /// Prepares to close for `reason` after the history answers still due; false if none are
    /// (close now). Pending `/history` answers then hold later output as a join's does, so
    /// what is queued from now on (the goodbye) comes after them.
    pub fn leave_after_history(&mut self, reason: CloseReason) -> bool {
        if !self.awaits_history() {
            return false;
        }
        for ticket in self.answers_due.drain(..) {
            self.history_waits.push_back(HistoryWait {
                ticket,
                held: Vec::new(),
            });
        }
        self.leave_after_history = Some(reason);
        true
    }

    /// The reason to close now, if it is leaving and no history answer is due any more.
    pub fn ready_to_leave(&self) -> Option<CloseReason> {
        self.leave_after_history.filter(|_| !self.awaits_history())
    }

    /// Some history answer, on join or for `/history`, has not arrived yet.
    fn awaits_history(&self) -> bool {
        !self.history_waits.is_empty() || !self.answers_due.is_empty()
    }

    /// Marks the connection for closing; the first reason wins. Returns true if it was open.
    /// Output held for history answers goes out without them: its last lines (a goodbye, the
    /// reason it is closed) must not wait for an answer it no longer needs.
    pub fn close(&mut self, reason: CloseReason) -> bool {
        if self.closing.is_some() {
            return false;
        }
        for wait in std::mem::take(&mut self.history_waits) {
            self.output.push(&wait.held);
        }
        self.held_output = 0;
        self.answers_due.clear();
        self.closing = Some(reason);
        true
    }

    /// Lines the client may send at `now`: what `read` may frame.
    pub fn line_allowance(&mut self, limit: Option<FloodLimit>, now: Instant) -> usize {
        match (&mut self.bucket, limit) {
            (Some(bucket), Some(limit)) => bucket.available(limit, now) as usize,
            _ => usize::MAX,
        }
    }

    /// Charges one line to flood control (nothing when it is off).
    pub fn spend_flood_token(&mut self) {
        if let Some(bucket) = &mut self.bucket {
            bucket.spend();
        }
    }

    /// When a throttled client will have earned lines again.
    pub fn flood_resume_at(&self, limit: FloodLimit) -> Option<Instant> {
        self.bucket.map(|bucket| bucket.refilled_at(limit))
    }

    /// True the first time in a burst that this client's lines were delayed.
    pub fn first_delay_in_burst(&mut self) -> bool {
        self.bucket
            .as_mut()
            .is_some_and(TokenBucket::first_delay_in_burst)
    }

    /// Input read but not yet framed is waiting.
    pub fn has_held_input(&self) -> bool {
        self.held_from < self.held.len()
    }

    /// Counts one more overlong line and returns how many came in a row.
    pub fn note_overlong(&mut self) -> u32 {
        self.overlong_lines += 1;
        self.overlong_lines
    }

    /// A line within the limit arrived: a person who once pasted too much is not counted
    /// against forever.
    pub fn note_line(&mut self) {
        self.overlong_lines = 0;
    }

    /// Appends to `batch` at most `max_lines` lines: first from held input, then read from the
    /// socket (up to `budget` bytes through `scratch`, telnet commands removed). Input beyond
    /// `max_lines` is held for the next call, and the socket is not read while any is held.
    pub fn read(
        &mut self,
        scratch: &mut [u8],
        budget: usize,
        batch: &mut InputBatch,
        max_lines: usize,
    ) -> ReadOutcome {
        self.active_since_sweep = true;
        let mut lines_left = max_lines;
        if self.has_held_input() {
            let held = std::mem::take(&mut self.held);
            let mut input = &held[self.held_from..];
            self.frame(&mut input, batch, &mut lines_left);
            self.held_from = held.len() - input.len();
            self.held = held;
            if self.has_held_input() {
                return ReadOutcome::Throttled;
            }
            self.release_held();
        }
        let mut total = 0;
        while total < budget {
            if lines_left == 0 {
                return ReadOutcome::Throttled;
            }
            // Never past the budget: the last read of a turn takes only what is left of it.
            let room = scratch.len().min(HEADROOM + budget - total);
            match self
                .transport
                .read(&mut scratch[HEADROOM..room], &mut self.wire)
            {
                Ok(0) => return ReadOutcome::Closed(CloseReason::PeerClosed),
                Ok(n) => {
                    total += n;
                    self.bytes_read += n as u64;
                    let mut input = self.telnet.filter(&mut scratch[..HEADROOM + n]);
                    self.frame(&mut input, batch, &mut lines_left);
                    if !input.is_empty() {
                        self.held.extend_from_slice(input);
                        return ReadOutcome::Throttled;
                    }
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => return ReadOutcome::Drained,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => return ReadOutcome::Closed(CloseReason::ReadError(err.kind())),
            }
        }
        ReadOutcome::BudgetSpent
    }

    /// Frames lines from `input` into `batch` while `lines_left` allows; what is not framed
    /// stays in `input`. Blank lines do nothing and cost no flood token, so they do not count.
    fn frame(&mut self, input: &mut &[u8], batch: &mut InputBatch, lines_left: &mut usize) {
        while *lines_left > 0 {
            let Some(frame) = self.framer.next_frame(input) else {
                return;
            };
            let blank =
                matches!(frame, Frame::Line(line) if line.iter().all(u8::is_ascii_whitespace));
            batch.push(frame);
            if !blank {
                *lines_left -= 1;
            }
        }
    }

    /// Empties the held input, freeing it unless it is small enough to reuse.
    fn release_held(&mut self) {
        self.held.clear();
        self.held_from = 0;
        if self.held.capacity() > KEEP_HELD_CAPACITY {
            self.held = Vec::new();
        }
    }

    /// Queues bytes for sending (behind the last unanswered history request, if any). Returns
    /// false, and marks the connection for closing, when the client is a slow consumer (its
    /// output would pass `max_output`) or writing to it failed. Nothing is queued once the
    /// connection is closing.
    pub fn queue(&mut self, data: &[u8], max_output: usize) -> bool {
        if self.closing.is_some() || !self.fits(data.len(), max_output) {
            return false;
        }
        match self.history_waits.back_mut() {
            Some(wait) => {
                wait.held.extend_from_slice(data);
                self.held_output += data.len();
            }
            None => self.output.push(data),
        }
        self.active_since_sweep = true;
        true
    }

    /// True if `extra` more bytes keep the client within `max_output`; else closes it.
    fn fits(&mut self, extra: usize, max_output: usize) -> bool {
        let pending = |conn: &Self| conn.output.len() + conn.held_output + extra;
        if pending(self) > max_output {
            // Output is normally written once per turn, so one busy turn can queue more than
            // the limit for a client that reads perfectly well. Give the socket what it takes
            // now, and judge the client only on what it has not taken.
            if let FlushOutcome::Failed(reason) = self.flush() {
                self.close(reason);
                return false;
            }
            if pending(self) > max_output {
                self.close(CloseReason::SlowConsumer);
                return false;
            }
        }
        true
    }

    /// Notes a history request. With `hold`, output from now on waits behind it until its
    /// answer (`history_arrived`) or until it is given up on; without, the answer joins the
    /// output whenever it comes.
    pub fn wait_for_history(&mut self, ticket: u64, hold: bool) {
        if !hold {
            return self.answers_due.push(ticket);
        }
        self.history_waits.push_back(HistoryWait {
            ticket,
            held: Vec::new(),
        });
    }

    /// Puts the answer to request `ticket` (`lines`, already encoded) where it was asked for,
    /// followed by the output that waited for it. `None` if no such request is waiting; else
    /// whether the client stays within its output limit.
    pub fn history_arrived(
        &mut self,
        ticket: u64,
        lines: &[u8],
        max_output: usize,
    ) -> Option<bool> {
        if let Some(due) = self.answers_due.iter().position(|&t| t == ticket) {
            self.answers_due.swap_remove(due);
            return Some(self.queue(lines, max_output));
        }
        let index = self
            .history_waits
            .iter()
            .position(|wait| wait.ticket == ticket)?;
        if self.closing.is_some() || !self.fits(lines.len(), max_output) {
            return Some(false);
        }
        let wait = self.history_waits.remove(index)?;
        self.held_output -= wait.held.len();
        // What was queued before the request: the output, or what an earlier request holds.
        match index.checked_sub(1) {
            Some(earlier) => {
                let held = &mut self.history_waits[earlier].held;
                held.extend_from_slice(lines);
                held.extend_from_slice(&wait.held);
                self.held_output += lines.len() + wait.held.len();
            }
            None => {
                self.output.push(lines);
                self.output.push(&wait.held);
            }
        }
        self.active_since_sweep = true;
        Some(true)
    }

    /// Bytes queued and not yet written.
    pub fn pending_output(&self) -> usize {
        self.output.len()
    }

    /// True if anything waits to be written: queued output, or TLS records (a handshake
    /// reply, say) with no output of the client's own.
    pub fn needs_flush(&self) -> bool {
        self.output.len() > 0 || self.transport.has_records_to_send()
    }

    /// Drops the pending output of a client being cut off for the sake of the others.
    pub fn discard_output(&mut self) {
        self.output.discard();
    }

    /// Writes queued output until done or the socket is full.
    pub fn flush(&mut self) -> FlushOutcome {
        while self.output.len() > 0 {
            match self.transport.write(self.output.pending(), &mut self.wire) {
                Ok(0) => {
                    return FlushOutcome::Failed(CloseReason::WriteError(ErrorKind::WriteZero))
                }
                Ok(n) => self.output.consume(n),
                Err(err) => match flush_error(err) {
                    Some(outcome) => return outcome,
                    None => continue,
                },
            }
        }
        loop {
            match self.transport.send_records(&mut self.wire) {
                Ok(()) => return FlushOutcome::Done,
                Err(err) => match flush_error(err) {
                    Some(outcome) => return outcome,
                    None => continue,
                },
            }
        }
    }

    /// Asks for writable events only while output is blocked, so an idle socket does not wake
    /// the loop.
    pub fn set_wants_writable(&mut self, registry: &Registry, wanted: bool) -> io::Result<()> {
        if self.wants_writable == wanted {
            return Ok(());
        }
        let interest = if wanted {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        registry.reregister(self.transport.socket(), self.token, interest)?;
        self.wants_writable = wanted;
        Ok(())
    }

    /// Frees the buffers of a connection that has been quiet for a whole sweep interval, so
    /// idle connections cost little memory while busy ones keep reusing theirs. Returns the
    /// bytes freed.
    pub fn shrink_if_idle(&mut self) -> usize {
        if std::mem::take(&mut self.active_since_sweep) {
            return 0;
        }
        let held = if self.has_held_input() {
            0
        } else {
            std::mem::take(&mut self.held).capacity()
        };
        self.output.shrink_if_idle() + self.framer.shrink_if_idle() + held
    }

    /// Ends a connection whose output is all written with a FIN. Unread input is read and
    /// discarded first: closing a socket with unread input makes the kernel send a reset, which
    /// can destroy the last lines before the client reads them.
    pub fn say_goodbye(&mut self) {
        self.transport.close_notify(&mut self.wire);
        let socket = self.transport.socket();
        let mut sink = [0u8; 4096];
        for _ in 0..16 {
            match socket.read(&mut sink) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        let _ = socket.shutdown(std::net::Shutdown::Write);
    }

    /// Removes the socket from the poll; the socket closes when the connection is dropped.
    pub fn deregister(&mut self, registry: &Registry) {
        // The socket is about to be closed, which removes it from epoll anyway.
        let _ = registry.deregister(self.transport.socket());
    }
}

/// What a failed write means for a flush: `None` to try again (interrupted), else how the
/// flush ends.
fn flush_error(err: io::Error) -> Option<FlushOutcome> {
    match err.kind() {
        ErrorKind::Interrupted => None,
        ErrorKind::WouldBlock => Some(FlushOutcome::Blocked),
        kind => Some(FlushOutcome::Failed(CloseReason::WriteError(kind))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_writes_keep_the_rest_in_order() {
        let mut out = OutputBuffer::default();
        out.push(b"hello ");
        out.consume(3);
        out.push(b"world");
        assert_eq!(out.pending(), b"lo world");
        out.consume(out.len());
        assert_eq!(out.len(), 0);
    }

    #[test]
    fn a_burst_buffer_is_freed_when_drained_and_a_small_one_by_the_sweep() {
        let mut out = OutputBuffer::default();
        out.push(&vec![b'x'; 2 * KEEP_OUTPUT_CAPACITY]);
        out.consume(out.len());
        assert_eq!(
            out.bytes.capacity(),
            0,
            "a drained burst buffer is freed at once"
        );

        out.push(b"small");
        assert_eq!(out.shrink_if_idle(), 0, "pending output is never freed");
        out.consume(5);
        assert!(out.bytes.capacity() > 0, "small buffers are kept for reuse");
        assert!(out.shrink_if_idle() > 0);
        assert_eq!(out.bytes.capacity(), 0);
    }
}

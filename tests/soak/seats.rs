//! One client thread: it drives its seats over nonblocking sockets (mio) through sessions of
//! connect, nick, numbered messages, linger and leave, and checks every line the server sends.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::common::DEADLINE;
use crate::run::{Shared, SECONDS_TRACKED};
use crate::totals::{message_text, min_opt, RunTotals, SessionLog};
use crate::{SEATS, SOAK};

/// How long a session stays after its last message. A message that cannot be stored is
/// reported once its batch fails, which takes at most 3 × the mongo timeout (the server's batch
/// watchdog), possibly after waiting behind one earlier batch as long: 6 s, plus margin.
const LINGER: Duration = Duration::from_secs(7);
/// Messages per session, inclusive range.
const MESSAGES_PER_SESSION: (u64, u64) = (3, 10);
/// Pause between a session's messages, ms, inclusive range. About 0.5 lines/s per client,
/// far below the server's flood limit (20 lines/s), and a few hundred messages/s in all, each
/// delivered to about 1000 receivers.
const SEND_INTERVAL_MS: (u64, u64) = (1000, 3000);
/// Pause before a session's first message, ms.
const FIRST_SEND_MS: (u64, u64) = (200, 2000);
/// Time a seat stays disconnected between sessions, ms. Short next to a session (about 20 s),
/// so most seats are connected at any moment.
const OFFLINE_MS: (u64, u64) = (200, 1500);
/// The first connections are spread over this long, ms.
const START_SPREAD_MS: u64 = 2000;
/// Percentage of sessions that leave with `/quit`; the others just close the socket.
const QUIT_PERCENT: u64 = 50;

/// Where a seat is in its cycle.
#[derive(Debug)]
enum Phase {
    /// Disconnected; connects again at the instant.
    Offline(Instant),
    /// Connected, waiting for the welcome line.
    Welcoming(Instant),
    /// `/nick` sent, waiting for the rename notice naming the address from the welcome.
    Naming { since: Instant, address: String },
    /// Sending: the next message is due at `next`, `left` more to go.
    Chatting { next: Instant, left: u64 },
    /// Done sending; leaves at `until`, with `/quit` or by closing the socket.
    Lingering { until: Instant, quit: bool },
    /// `/quit` sent, waiting for the server to close.
    Quitting(Instant),
    /// The run is over for this seat.
    Done,
}

struct Connection {
    stream: TcpStream,
    local: SocketAddr,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Writing failed; the seat handles it as a lost connection on its next tick.
    broken: Option<String>,
}

struct Seat {
    /// Global seat number, part of every nick.
    number: usize,
    /// Sessions started so far; the current one is `generation - 1`.
    generation: u32,
    phase: Phase,
    conn: Option<Connection>,
    /// Index of the current session in `Worker::totals.session_logs`.
    session: Option<usize>,
    /// When the current session last sent a message.
    last_send: Option<Instant>,
    /// Per sending seat: (its generation + 1, last sequence number) seen by this session.
    last_seen: Vec<(u32, u64)>,
}

pub struct Worker {
    id: usize,
    addr: SocketAddr,
    poll: Poll,
    seats: Vec<Seat>,
    totals: RunTotals,
    rng: Rng,
    shared: Arc<Shared>,
    stop_at: Instant,
    /// Chat lines received since they were last added to `shared.deliveries`.
    unpublished: u64,
}

impl Worker {
    pub fn new(id: usize, addr: SocketAddr, seats: Range<usize>, shared: Arc<Shared>) -> Worker {
        let mut rng =
            Rng(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
        let start = shared.start;
        let seats = seats
            .map(|number| Seat {
                number,
                generation: 0,
                phase: Phase::Offline(
                    start + Duration::from_millis(rng.range((0, START_SPREAD_MS))),
                ),
                conn: None,
                session: None,
                last_send: None,
                last_seen: vec![(0, 0); SEATS],
            })
            .collect();
        Worker {
            id,
            addr,
            poll: Poll::new().expect("create a poll"),
            seats,
            totals: RunTotals::default(),
            rng,
            stop_at: start + SOAK,
            shared,
            unpublished: 0,
        }
    }

    /// Drives the seats until all are done, or until a hard deadline.
    pub fn run(mut self) -> RunTotals {
        let hard_deadline = self.stop_at + LINGER + DEADLINE * 3;
        let mut events = Events::with_capacity(1024);
        let mut scratch = vec![0u8; 64 * 1024];
        loop {
            match self.poll.poll(&mut events, Some(Duration::from_millis(20))) {
                Ok(()) => {}
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => panic!("soak-{}: poll failed: {err}", self.id),
            }
            for event in events.iter() {
                self.service(event.token().0, &mut scratch);
            }
            let now = Instant::now();
            for index in 0..self.seats.len() {
                self.tick(index, now);
            }
            self.publish_deliveries();
            if self
                .seats
                .iter()
                .all(|seat| matches!(seat.phase, Phase::Done))
            {
                break;
            }
            if now > hard_deadline {
                for index in 0..self.seats.len() {
                    if !matches!(self.seats[index].phase, Phase::Done) {
                        let phase = format!("{:?}", self.seats[index].phase);
                        self.totals.anomaly(
                            "seat still busy at the hard deadline",
                            format!("seat {}: {phase}", self.seats[index].number),
                        );
                        self.end_session(index, now, true);
                    }
                }
                break;
            }
        }
        self.publish_deliveries();
        self.totals
    }

    fn publish_deliveries(&mut self) {
        let second = (self.shared.start.elapsed().as_secs() as usize).min(SECONDS_TRACKED - 1);
        self.shared.deliveries[second].fetch_add(self.unpublished, Ordering::Relaxed);
        self.totals.deliveries += self.unpublished;
        self.unpublished = 0;
    }

    /// A readiness event: write what is pending, read and handle every complete line.
    fn service(&mut self, index: usize, scratch: &mut [u8]) {
        let Some(conn) = self
            .seats
            .get_mut(index)
            .and_then(|seat| seat.conn.as_mut())
        else {
            return;
        };
        flush(conn);
        loop {
            let Some(conn) = self.seats[index].conn.as_mut() else {
                return;
            };
            let closed = match conn.stream.read(scratch) {
                Ok(0) => "end of stream".to_string(),
                Ok(n) => {
                    conn.input.extend_from_slice(&scratch[..n]);
                    let mut input = std::mem::take(&mut conn.input);
                    let mut consumed = 0;
                    while let Some(end) = input[consumed..].iter().position(|&b| b == b'\n') {
                        let line = &input[consumed..consumed + end + 1];
                        consumed += end + 1;
                        self.line(index, line);
                    }
                    input.drain(..consumed);
                    match self.seats[index].conn.as_mut() {
                        Some(conn) => conn.input = input,
                        None => return, // the line ended the session
                    }
                    continue;
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => err.to_string(),
            };
            return self.connection_ended(index, closed);
        }
    }

    /// The server closed the connection (or it broke).
    fn connection_ended(&mut self, index: usize, reason: String) {
        let now = Instant::now();
        if matches!(self.seats[index].phase, Phase::Quitting(_)) {
            self.totals.quit += 1;
            self.end_session(index, now, false);
        } else {
            let phase = format!("{:?}", self.seats[index].phase);
            self.totals.anomaly(
                "connection closed by the server unasked",
                format!("seat {} in {phase}: {reason}", self.seats[index].number),
            );
            self.end_session(index, now, true);
        }
    }

    /// One line from the server, `\r\n` included.
    fn line(&mut self, index: usize, raw: &[u8]) {
        let seat_number = self.seats[index].number;
        let Some(text) = raw
            .strip_suffix(b"\r\n")
            .and_then(|line| std::str::from_utf8(line).ok())
        else {
            let sample = format!("seat {seat_number}: {:?}", String::from_utf8_lossy(raw));
            return self
                .totals
                .anomaly("line not UTF-8 or not ending in CRLF", sample);
        };
        if let Some(chat) = text.strip_prefix('<') {
            self.chat(index, chat);
        } else if let Some(notice) = text.strip_prefix("* ") {
            self.notice(index, notice);
        } else if let Some(error) = text.strip_prefix("! ") {
            self.error(index, error);
        } else {
            self.totals
                .anomaly("unknown line", format!("seat {seat_number}: {text:?}"));
        }
    }

    /// `<NAME> NAME SEQ` from another client: check the per-sender order.
    fn chat(&mut self, index: usize, chat: &str) {
        let parsed = chat.split_once("> ").and_then(|(name, text)| {
            let (seat, generation) = parse_nick(name)?;
            let (text_name, seq) = text.split_once(' ')?;
            let seq: u64 = seq.parse().ok()?;
            (text_name == name && seat < SEATS).then_some((seat, generation, seq))
        });
        let seat = &mut self.seats[index];
        let Some((from, generation, seq)) = parsed else {
            let sample = format!("seat {}: <{chat}", seat.number);
            return self
                .totals
                .anomaly("chat line not from a soak client", sample);
        };
        self.unpublished += 1;
        if from == seat.number && generation + 1 == seat.generation {
            self.totals.own_echo += 1;
            return;
        }
        let last = &mut seat.last_seen[from];
        if last.0 < generation + 1 {
            *last = (generation + 1, seq);
        } else if last.0 == generation + 1 {
            if seq <= last.1 {
                self.totals.order_violations += 1;
                let sample = format!(
                    "seat {} got s{from}g{generation} {seq} after {}",
                    seat.number, last.1
                );
                self.totals
                    .anomaly("message out of per-sender order", sample);
            } else {
                last.1 = seq;
            }
        } else {
            self.totals.stale_generation += 1;
        }
    }

    fn notice(&mut self, index: usize, notice: &str) {
        let now = Instant::now();
        let seat = &self.seats[index];
        let own_nick = |name: &str| parse_nick(name) == Some((seat.number, seat.generation - 1));
        match &seat.phase {
            Phase::Welcoming(_) => {
                let local = seat.conn.as_ref().expect("connected while welcoming").local;
                let named = notice
                    .strip_prefix("welcome, you are ")
                    .and_then(|rest| rest.split(' ').next());
                if named != Some(local.to_string().as_str()) {
                    let sample = format!("seat {} ({local}): {notice:?}", seat.number);
                    return self.totals.anomaly("first line not the welcome", sample);
                }
                let nick = self.nick(index);
                self.send(index, &format!("/nick {nick}"));
                self.seats[index].phase = Phase::Naming {
                    since: now,
                    address: local.to_string(),
                };
            }
            Phase::Naming { address, .. }
                if notice
                    .strip_prefix(address.as_str())
                    .and_then(|rest| rest.strip_prefix(" is now "))
                    .is_some_and(own_nick) =>
            {
                self.seats[index].phase = if now >= self.stop_at {
                    Phase::Lingering {
                        until: now,
                        quit: true,
                    }
                } else {
                    let first = Duration::from_millis(self.rng.range(FIRST_SEND_MS));
                    Phase::Chatting {
                        next: now + first,
                        left: self.rng.range(MESSAGES_PER_SESSION),
                    }
                };
            }
            phase => {
                let known = notice.ends_with(" joined")
                    || notice.ends_with(" left")
                    || notice.contains(" is now ")
                    || notice.contains(" online: ")
                    || (notice == "bye" && matches!(phase, Phase::Quitting(_)));
                if notice.starts_with("welcome") || notice.contains("shutting down") {
                    let sample = format!("seat {}: {notice:?}", seat.number);
                    self.totals.anomaly("unexpected notice", sample);
                } else if !known {
                    let word = notice.split(' ').next().unwrap_or("").to_string();
                    *self.totals.other_notices.entry(word).or_default() += 1;
                }
            }
        }
    }

    /// `! …`: a save failure report for this session's message, or a problem.
    fn error(&mut self, index: usize, error: &str) {
        let seat_number = self.seats[index].number;
        let Some(report) = error.strip_prefix("not saved: \"") else {
            let kind = if error.starts_with("slow down") {
                "flood limit hit (`! slow down`)"
            } else {
                "error line"
            };
            return self
                .totals
                .anomaly(kind, format!("seat {seat_number}: ! {error}"));
        };
        let parsed = report.split_once("\" (").and_then(|(quoted, reason)| {
            let reason = reason.strip_suffix(')')?;
            let (nick, seq) = quoted.split_once(' ')?;
            Some((nick, seq.parse::<u64>().ok()?, reason))
        });
        let session = self.seats[index]
            .session
            .map(|s| &mut self.totals.session_logs[s]);
        let (Some((nick, seq, reason)), Some(session)) = (parsed, session) else {
            let sample = format!("seat {seat_number}: ! {error}");
            return self.totals.anomaly("unparsable not-saved report", sample);
        };
        if nick != session.nick || seq == 0 || seq > session.sent {
            let sample = format!("session {}: ! {error}", session.nick);
            return self
                .totals
                .anomaly("not-saved report for a message not sent here", sample);
        }
        if session.reported.insert(seq, reason.to_string()).is_some() {
            let sample = format!("session {}: ! {error}", session.nick);
            return self.totals.anomaly("message reported twice", sample);
        }
        *self
            .totals
            .report_reasons
            .entry(reason.to_string())
            .or_default() += 1;
        let at = Some(self.shared.start.elapsed());
        self.totals.first_report = min_opt(self.totals.first_report, at);
        self.totals.last_report = self.totals.last_report.max(at);
    }

    /// Time-driven steps: connect, send, leave, and timeouts.
    fn tick(&mut self, index: usize, now: Instant) {
        if let Some(reason) = self.seats[index]
            .conn
            .as_mut()
            .and_then(|c| c.broken.take())
        {
            return self.connection_ended(index, reason);
        }
        if let Some(conn) = self.seats[index].conn.as_mut() {
            if !conn.output.is_empty() {
                flush(conn);
            }
        }
        let stop_at = self.stop_at;
        match self.seats[index].phase {
            Phase::Offline(_) if now >= stop_at => self.seats[index].phase = Phase::Done,
            Phase::Offline(at) if now >= at => self.connect(index, now),
            Phase::Welcoming(since) | Phase::Naming { since, .. } if now > since + DEADLINE => {
                let sample = format!(
                    "seat {}: {:?}",
                    self.seats[index].number, self.seats[index].phase
                );
                self.totals
                    .anomaly("no welcome or nick confirmation in time", sample);
                self.end_session(index, now, true);
            }
            Phase::Chatting { .. } if now >= stop_at => {
                self.seats[index].phase = Phase::Lingering {
                    until: self.last_send(index).map_or(now, |t| t + LINGER),
                    quit: self.rng.range((1, 100)) <= QUIT_PERCENT,
                }
            }
            Phase::Chatting { next, left } if now >= next => {
                let session = self.seats[index].session.expect("chatting in a session");
                let log = &mut self.totals.session_logs[session];
                log.sent += 1;
                log.sent_at.push(self.shared.start.elapsed().as_secs_f32());
                let text = message_text(&log.nick, log.sent);
                self.totals.sent += 1;
                self.send(index, &text);
                self.seats[index].phase = if left <= 1 {
                    Phase::Lingering {
                        until: now + LINGER,
                        quit: self.rng.range((1, 100)) <= QUIT_PERCENT,
                    }
                } else {
                    Phase::Chatting {
                        next: now + Duration::from_millis(self.rng.range(SEND_INTERVAL_MS)),
                        left: left - 1,
                    }
                };
                self.seats[index].last_send = Some(now);
            }
            Phase::Lingering { until, quit } if now >= until => {
                if quit {
                    self.send(index, "/quit");
                    self.seats[index].phase = Phase::Quitting(now);
                } else {
                    self.totals.dropped += 1;
                    self.end_session(index, now, false);
                }
            }
            Phase::Quitting(since) if now > since + DEADLINE => {
                let sample = format!("seat {}", self.seats[index].number);
                self.totals
                    .anomaly("server did not close after /quit", sample);
                self.end_session(index, now, true);
            }
            _ => {}
        }
    }

    fn last_send(&self, index: usize) -> Option<Instant> {
        self.seats[index].last_send
    }

    fn nick(&self, index: usize) -> String {
        let seat = &self.seats[index];
        format!("s{}g{}", seat.number, seat.generation - 1)
    }

    fn connect(&mut self, index: usize, now: Instant) {
        let connected = std::net::TcpStream::connect_timeout(&self.addr, DEADLINE).and_then(|s| {
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            let local = s.local_addr()?;
            let mut stream = TcpStream::from_std(s);
            self.poll.registry().register(
                &mut stream,
                Token(index),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok((stream, local))
        });
        let seat = &mut self.seats[index];
        let (stream, local) = match connected {
            Ok(connected) => connected,
            Err(err) => {
                let sample = format!("seat {}: {err}", seat.number);
                seat.phase = Phase::Offline(now + Duration::from_secs(1));
                return self.totals.anomaly("connect failed", sample);
            }
        };
        seat.conn = Some(Connection {
            stream,
            local,
            input: Vec::new(),
            output: Vec::new(),
            broken: None,
        });
        seat.generation += 1;
        seat.last_send = None;
        seat.last_seen.iter_mut().for_each(|entry| *entry = (0, 0));
        seat.phase = Phase::Welcoming(now);
        seat.session = Some(self.totals.session_logs.len());
        let nick = format!("s{}g{}", seat.number, seat.generation - 1);
        self.totals.session_logs.push(SessionLog {
            nick,
            sent: 0,
            sent_at: Vec::new(),
            reported: HashMap::new(),
            cut_off: false,
        });
        self.totals.sessions += 1;
    }

    /// Queues a line and tries to write it at once.
    fn send(&mut self, index: usize, line: &str) {
        if let Some(conn) = self.seats[index].conn.as_mut() {
            conn.output.extend_from_slice(line.as_bytes());
            conn.output.push(b'\n');
            flush(conn);
        }
    }

    /// Closes the connection (if any) and schedules the next session, or ends the seat.
    fn end_session(&mut self, index: usize, now: Instant, cut_off: bool) {
        let seat = &mut self.seats[index];
        if let Some(mut conn) = seat.conn.take() {
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
        if let Some(session) = seat.session.take() {
            if cut_off {
                self.totals.session_logs[session].cut_off = true;
                self.totals.cut_off += 1;
            }
        }
        seat.phase = if now >= self.stop_at {
            Phase::Done
        } else {
            Phase::Offline(now + Duration::from_millis(self.rng.range(OFFLINE_MS)))
        };
    }
}

/// Writes pending output until done or the socket is full; a failure marks the connection.
fn flush(conn: &mut Connection) {
    while !conn.output.is_empty() && conn.broken.is_none() {
        match conn.stream.write(&conn.output) {
            Ok(0) => conn.broken = Some("write returned 0".to_string()),
            Ok(n) => {
                conn.output.drain(..n);
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => return,
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => conn.broken = Some(format!("write failed: {err}")),
        }
    }
}

/// `s{seat}g{generation}` → (seat, generation).
fn parse_nick(name: &str) -> Option<(usize, u32)> {
    let (seat, generation) = name.strip_prefix('s')?.split_once('g')?;
    Some((seat.parse().ok()?, generation.parse().ok()?))
}

/// A small xorshift generator: the test needs variety, not quality, and no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}
